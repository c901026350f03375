// `sieve`: Sieve's command-line tool.
//
//   sieve generate [--target ADDR] [options] PROMPT   stream a completion from a running sieved
//   sieve generate --model DIR [options] PROMPT       generate in-process from a checkpoint
//   sieve generate --config FILE [options] PROMPT     ... configured as sieved (--set KEY=VALUE)
//   sieve health | tokenize | models                  ask a running sieved
//   sieve calibrate --method minference --model DIR --text FILE --output FILE
//                                                     offline sparse-attention pattern search
//
// Text streams to stdout as it is generated; per-phase timings go to stderr at the end. In a
// build without gRPC (-DSIEVE_BUILD_SERVER=OFF) only the in-process mode exists.
#include <iostream>
#include <string>
#include <string_view>

#include "cli/calibrate.h"
#include "cli/calibrate_double_sparsity.h"
#include "cli/local.h"
#include "cli/options.h"
#ifdef SIEVE_CLI_WITH_GRPC
#include "cli/remote.h"
#endif

namespace sieve::cli {
namespace {

constexpr char kUsage[] = R"(usage: sieve COMMAND [options]

commands:
  generate PROMPT         stream a completion from the server at --target (default
                          localhost:50051); with --model DIR or --config FILE, generate
                          in-process instead
  health                  print the server's health: SERVING or NOT_SERVING
  tokenize TEXT           print the token ids of TEXT
  models                  list the served models
  calibrate --method M    offline sparse-attention calibration of a model, in-process:
                          minference (--model DIR --text FILE --output FILE writes the
                          per-head MInference pattern file) or double-sparsity (--model DIR
                          --output FILE writes the DoubleSparsity channel calibration)
  --version               print the version and exit

Against a daemon with bearer tokens or TLS, the remote commands read SIEVE_TOKEN,
SIEVE_TLS_CA_FILE, and for mutual TLS SIEVE_TLS_CERT_FILE and SIEVE_TLS_KEY_FILE.

`sieve COMMAND --help` describes a command's options.
)";

constexpr char kGenerateUsage[] = R"(usage: sieve generate [options] PROMPT | --prompt-file FILE

Streams a continuation of PROMPT to stdout, then the finish reason, token counts and per-phase
timings (queue, prefill, time to first token, decode) to stderr.

where:
  --target ADDR          server address (default localhost:50051)
  --model DIR            generate in-process from the checkpoint in DIR (config.json,
                         *.safetensors, tokenizer.json) with the engine sieved runs, without
                         a server (also --set model.directory=DIR)
  --model-name NAME      served model to use (default: the server's default model)
options:
  --max-tokens N         tokens to generate (default 64)
  --temperature T        0 = greedy (default 0.8)
  --top-k K              keep the K most likely tokens (default 0 = off)
  --top-p P              nucleus sampling mass (default 1.0)
  --min-p P              drop tokens below P x the top probability (default 0)
  --repetition-penalty R (default 1.0)
  --seed S               reproducible sampling
  --stop STRING          stop string (repeatable)
  --ignore-eos           keep generating past end-of-sequence
  --no-bos               do not add the tokenizer's special tokens (BOS) to the prompt
  --prompt-file FILE     read the prompt from FILE (its bytes exactly) instead of PROMPT
  --no-echo              print only the continuation, not the prompt before it
server only:
  --priority N           scheduling priority, higher first (default 0)
  --timeout SECONDS      the call's deadline; the server cancels the request when it passes
  --request-id ID        id echoed by the server and written to its logs
in-process only:
  --config FILE          generate in-process, configured by this sieved YAML file (backend,
                         KV cache, scheduler, ...); without it every key takes its default,
                         except that the KV pool holds just this request (`sieved --help`
                         lists the keys)
  --set KEY=VALUE        override one configuration key (repeatable), e.g.
                         --set model.backend=cuda
  --threads N            CPU threads of the cpu backend (default: all)
  --page-size N          same as --set kv_cache.page_size_tokens=N
)";

int Generate(int argc, char** argv) {
  absl::StatusOr<GenerateOptions> options = ParseGenerateOptions(argc, argv);
  if (!options.ok()) {
    std::cerr << "sieve: " << options.status().message() << "\n" << kGenerateUsage;
    return 2;
  }
  if (options->help) {
    std::cout << kGenerateUsage;
    return 0;
  }
  if (!options->model_dir.empty() || !options->config_path.empty()) {
    return RunLocalGenerate(*options);
  }
  if (!options->overrides.empty()) {
    std::cerr << "sieve: --set and --page-size configure the in-process mode; add --model DIR "
                 "or --config FILE\n";
    return 2;
  }
#ifdef SIEVE_CLI_WITH_GRPC
  return RunRemoteGenerate(*options);
#else
  std::cerr << "sieve: this build has no gRPC client (built with -DSIEVE_BUILD_SERVER=OFF); "
               "use --model DIR to generate in-process\n";
  return 2;
#endif
}

// `sieve calibrate --method M ...`: the one dispatch of the calibration methods; each method's
// command has its own file (cli/calibrate.h: minference; cli/calibrate_double_sparsity.h).
int Calibrate(int argc, char** argv) {
  for (int i = 0; i + 1 < argc; ++i) {
    if (std::string_view(argv[i]) == "--method") {
      const std::string_view method = argv[i + 1];
      if (method == "minference") return RunCalibrate(argc, argv);
      if (method == "double-sparsity") return RunCalibrateDoubleSparsity(argc, argv);
      std::cerr << "sieve calibrate: unknown --method '" << method
                << "' (minference, double-sparsity)\n";
      return 2;
    }
  }
  bool help = false;
  for (int i = 0; i < argc; ++i) {
    const std::string_view a = argv[i];
    help = help || a == "--help" || a == "-h";
  }
  if (help) {
    std::cout << "sieve calibrate --method minference:\n";
    char help_arg[] = "--help";
    char* help_argv[] = {help_arg, nullptr};
    RunCalibrate(1, help_argv);
    std::cout << "\n" << kCalibrateDoubleSparsityUsage;
    return 0;
  }
  std::cerr << "sieve calibrate: --method is required (minference, double-sparsity)\n";
  return 2;
}

int Main(int argc, char** argv) {
  const std::string_view command = argc >= 2 ? argv[1] : "";
  if (command.empty() || command == "--help" || command == "-h" || command == "help") {
    std::cout << kUsage;
    return command.empty() ? 2 : 0;
  }
  if (command == "--version" || command == "version") {
    std::cout << "sieve " << SIEVE_VERSION << "\n";
    return 0;
  }
  if (command == "generate") return Generate(argc - 2, argv + 2);
  if (command == "calibrate") return Calibrate(argc - 2, argv + 2);
#ifdef SIEVE_CLI_WITH_GRPC
  if (command == "health") return RunHealth(argc - 2, argv + 2);
  if (command == "tokenize") return RunTokenize(argc - 2, argv + 2);
  if (command == "models") return RunModels(argc - 2, argv + 2);
#else
  if (command == "health" || command == "tokenize" || command == "models") {
    std::cerr << "sieve: '" << command << "' needs the gRPC client, which this build lacks "
              << "(built with -DSIEVE_BUILD_SERVER=OFF)\n";
    return 2;
  }
#endif
  std::cerr << "sieve: unknown command '" << command << "'\n" << kUsage;
  return 2;
}

}  // namespace
}  // namespace sieve::cli

int main(int argc, char** argv) { return sieve::cli::Main(argc, argv); }
