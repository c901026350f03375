// Command-line parsing shared by the `sieve` subcommands: a small argument cursor and the
// options of `sieve generate`, which both the gRPC client and the in-process mode use.
#ifndef SIEVE_CLI_OPTIONS_H_
#define SIEVE_CLI_OPTIONS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sieve::cli {

// The server `sieve` talks to unless --target says otherwise.
inline constexpr char kDefaultTarget[] = "localhost:50051";

// Walks the arguments of one subcommand: `--name VALUE`, `--name=VALUE`, flags and positionals.
class Args {
 public:
  Args(int argc, char** argv) : args_(argv, argv + argc) {}

  // True while arguments are left.
  bool more() const { return next_ < args_.size(); }

  // Takes the next argument. For `--name=value` returns "--name" and keeps "value" for Value().
  std::string_view Next();

  // The value of the option just taken: its `=value` part or the following argument.
  // InvalidArgument when there is none.
  absl::StatusOr<std::string> Value(std::string_view name);

  // Value() parsed as a number of type T (int32_t, uint64_t, float, double).
  template <typename T>
  absl::StatusOr<T> Number(std::string_view name);

 private:
  std::vector<std::string> args_;
  size_t next_ = 0;
  std::optional<std::string> inline_value_;
};

// Everything `sieve generate` accepts. Unset optionals keep the defaults of the mode that runs.
struct GenerateOptions {
  std::string target = kDefaultTarget;  // gRPC server address (client mode)
  std::string model_dir;                // --model DIR: generate in-process instead (also an
                                        // override of model.directory)
  std::string model_name;               // --model-name: served model to ask for (client mode)
  std::string prompt;
  int32_t max_tokens = 64;
  float temperature = 0.8f;
  std::optional<int32_t> top_k;
  std::optional<float> top_p;
  std::optional<float> min_p;
  std::optional<float> repetition_penalty;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  bool add_special_tokens = true;
  bool echo = true;                     // print the prompt before the continuation
  int32_t priority = 0;                 // client mode
  std::optional<double> timeout_s;      // client mode: the call's deadline
  std::string request_id;               // client mode
  int threads = 0;                      // in-process mode: CPU threads (0 = all)
  // In-process mode: the daemon's configuration file (--config), and its key overrides in
  // command-line order (--set KEY=VALUE; --model DIR and --page-size N add
  // model.directory=DIR and kv_cache.page_size_tokens=N).
  std::string config_path;
  std::vector<std::string> overrides;
  bool help = false;
};

// Parses the arguments after `generate`. InvalidArgument names the bad option.
absl::StatusOr<GenerateOptions> ParseGenerateOptions(int argc, char** argv);

}  // namespace sieve::cli

#endif  // SIEVE_CLI_OPTIONS_H_
