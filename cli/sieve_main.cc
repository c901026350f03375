// `sieve`: Sieve's command-line tool.
//
//   sieve generate --model DIR [options] "prompt"   generate in-process from a checkpoint
//
// Text streams to stdout as it is generated; per-phase timings go to stderr at the end.
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/generator.h"
#include "engine/model_runner.h"
#include "engine/tokenizer.h"

namespace sieve {
namespace {

constexpr char kUsage[] = R"(usage: sieve generate --model DIR [options] PROMPT

Generates a continuation of PROMPT with the Hugging Face Llama-family checkpoint in DIR
(config.json, *.safetensors, tokenizer.json) on the CPU backend, streaming text to stdout.

options:
  --model DIR            checkpoint directory (e.g. models/embedded)
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
  --threads N            CPU threads (default: all)
  --page-size N          KV page size in tokens (default 16)
)";

int Fail(std::string_view message) {
  std::cerr << "sieve: " << message << "\n";
  return 2;
}

int Generate(int argc, char** argv) {
  std::string model_dir, prompt;
  bool have_prompt = false, add_special = true;
  engine::GenerationRequest req;
  req.stop.max_tokens = 64;
  req.sampling.temperature = 0.8f;
  engine::ModelRunnerOptions options;
  for (int i = 0; i < argc; ++i) {
    std::string_view a = argv[i];
    auto value = [&](std::string_view name) -> const char* {
      if (i + 1 >= argc) {
        std::cerr << "sieve: " << name << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    auto number = [&](std::string_view name, auto* out) {
      const char* v = value(name);
      bool ok;
      if constexpr (std::is_floating_point_v<std::remove_pointer_t<decltype(out)>>) {
        ok = absl::SimpleAtof(v, out);
      } else {
        ok = absl::SimpleAtoi(v, out);
      }
      if (!ok) {
        std::cerr << "sieve: " << name << ": not a number: " << v << "\n";
        std::exit(2);
      }
    };
    if (a == "--model") model_dir = value(a);
    else if (a == "--max-tokens") number(a, &req.stop.max_tokens);
    else if (a == "--temperature") number(a, &req.sampling.temperature);
    else if (a == "--top-k") number(a, &req.sampling.top_k);
    else if (a == "--top-p") number(a, &req.sampling.top_p);
    else if (a == "--min-p") number(a, &req.sampling.min_p);
    else if (a == "--repetition-penalty") number(a, &req.sampling.repetition_penalty);
    else if (a == "--seed") {
      uint64_t seed;
      number(a, &seed);
      req.sampling.seed = seed;
    } else if (a == "--stop") req.stop.stop_strings.push_back(value(a));
    else if (a == "--ignore-eos") req.stop.ignore_eos = true;
    else if (a == "--no-bos") add_special = false;
    else if (a == "--threads") number(a, &options.num_threads);
    else if (a == "--page-size") number(a, &options.page_size);
    else if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      return 0;
    } else if (a.starts_with("--")) {
      return Fail(absl::StrCat("unknown option ", std::string(a), "\n", kUsage));
    } else if (!have_prompt) {
      prompt = std::string(a);
      have_prompt = true;
    } else {
      return Fail("more than one prompt given (quote the prompt)");
    }
  }
  if (model_dir.empty()) return Fail(absl::StrCat("--model is required\n", kUsage));
  if (!have_prompt) return Fail(absl::StrCat("no prompt given\n", kUsage));

  auto tokenizer = engine::Tokenizer::FromDirectory(model_dir);
  if (!tokenizer.ok()) return Fail(tokenizer.status().ToString());
  auto ids = (*tokenizer)->Encode(prompt, add_special);
  if (!ids.ok()) return Fail(ids.status().ToString());
  req.prompt = *ids;
  // Enough KV for this request, in whole pages.
  const int64_t tokens = static_cast<int64_t>(req.prompt.size()) + req.stop.max_tokens;
  options.num_pages = static_cast<int32_t>((tokens + options.page_size - 1) / options.page_size);
  options.max_step_tokens = 512;
  options.max_step_logits = 1;
  auto runner = engine::ModelRunner::Load(model_dir, options);
  if (!runner.ok()) return Fail(runner.status().ToString());
  engine::Generator generator(**runner, **tokenizer);

  std::cout << prompt << std::flush;
  auto results = generator.Generate({req}, [](size_t, std::string_view delta) {
    std::cout << delta << std::flush;
  });
  std::cout << "\n";
  if (!results.ok()) return Fail(results.status().ToString());
  const engine::GenerationResult& r = (*results)[0];
  const double decode_s = r.total_s - r.time_to_first_token_s;
  const size_t n = r.tokens.size();
  std::fprintf(stderr,
               "[sieve] finish: %s | prompt %zu tokens, generated %zu | time to first token "
               "%.1f ms (prefill %.0f tok/s) | decode %.1f ms/token | total %.2f s\n",
               std::string(engine::FinishReasonToString(r.finish)).c_str(), req.prompt.size(), n,
               r.time_to_first_token_s * 1e3, req.prompt.size() / r.time_to_first_token_s,
               n > 1 ? decode_s * 1e3 / (n - 1) : 0.0, r.total_s);
  return 0;
}

}  // namespace
}  // namespace sieve

int main(int argc, char** argv) {
  if (argc < 2 || std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h") {
    std::cout << sieve::kUsage;
    return argc < 2 ? 2 : 0;
  }
  if (std::string_view(argv[1]) == "generate") return sieve::Generate(argc - 2, argv + 2);
  return sieve::Fail(absl::StrCat("unknown command '", argv[1], "'\n", sieve::kUsage));
}
