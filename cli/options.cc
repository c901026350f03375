#include "cli/options.h"

#include <fstream>
#include <iterator>
#include <type_traits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace sieve::cli {

std::string_view Args::Next() {
  inline_value_.reset();
  std::string_view arg = args_[next_++];
  if (arg.starts_with("--")) {
    if (const size_t eq = arg.find('='); eq != arg.npos) {
      inline_value_ = std::string(arg.substr(eq + 1));
      return arg.substr(0, eq);
    }
  }
  return arg;
}

absl::StatusOr<std::string> Args::Value(std::string_view name) {
  if (inline_value_.has_value()) {
    std::string value = *std::move(inline_value_);
    inline_value_.reset();
    return value;
  }
  if (!more()) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(name), " needs a value"));
  }
  return args_[next_++];
}

template <typename T>
absl::StatusOr<T> Args::Number(std::string_view name) {
  absl::StatusOr<std::string> text = Value(name);
  if (!text.ok()) return text.status();
  T value{};
  bool ok;
  if constexpr (std::is_same_v<T, float>) {
    ok = absl::SimpleAtof(*text, &value);
  } else if constexpr (std::is_same_v<T, double>) {
    ok = absl::SimpleAtod(*text, &value);
  } else {
    ok = absl::SimpleAtoi(*text, &value);
  }
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(name), ": not a number: '", *text, "'"));
  }
  return value;
}

template absl::StatusOr<int32_t> Args::Number<int32_t>(std::string_view);
template absl::StatusOr<int64_t> Args::Number<int64_t>(std::string_view);
template absl::StatusOr<uint64_t> Args::Number<uint64_t>(std::string_view);
template absl::StatusOr<float> Args::Number<float>(std::string_view);
template absl::StatusOr<double> Args::Number<double>(std::string_view);

// Stores the parsed value of an option in `out`, or returns the parse error.
#define SIEVE_CLI_SET(out, expr)                  \
  do {                                            \
    auto value_or = (expr);                       \
    if (!value_or.ok()) return value_or.status(); \
    out = *std::move(value_or);                   \
  } while (0)

absl::StatusOr<GenerateOptions> ParseGenerateOptions(int argc, char** argv) {
  GenerateOptions o;
  Args args(argc, argv);
  bool have_prompt = false;
  while (args.more()) {
    const std::string name(args.Next());
    if (name == "--help" || name == "-h") {
      o.help = true;
    } else if (name == "--target") {
      SIEVE_CLI_SET(o.target, args.Value(name));
    } else if (name == "--model") {
      SIEVE_CLI_SET(o.model_dir, args.Value(name));
      o.overrides.push_back(absl::StrCat("model.directory=", o.model_dir));
    } else if (name == "--model-name") {
      SIEVE_CLI_SET(o.model_name, args.Value(name));
    } else if (name == "--max-tokens") {
      SIEVE_CLI_SET(o.max_tokens, args.Number<int32_t>(name));
    } else if (name == "--temperature") {
      SIEVE_CLI_SET(o.temperature, args.Number<float>(name));
    } else if (name == "--top-k") {
      SIEVE_CLI_SET(o.top_k, args.Number<int32_t>(name));
    } else if (name == "--top-p") {
      SIEVE_CLI_SET(o.top_p, args.Number<float>(name));
    } else if (name == "--min-p") {
      SIEVE_CLI_SET(o.min_p, args.Number<float>(name));
    } else if (name == "--repetition-penalty") {
      SIEVE_CLI_SET(o.repetition_penalty, args.Number<float>(name));
    } else if (name == "--seed") {
      SIEVE_CLI_SET(o.seed, args.Number<uint64_t>(name));
    } else if (name == "--stop") {
      std::string stop;
      SIEVE_CLI_SET(stop, args.Value(name));
      o.stop.push_back(std::move(stop));
    } else if (name == "--ignore-eos") {
      o.ignore_eos = true;
    } else if (name == "--no-bos") {
      o.add_special_tokens = false;
    } else if (name == "--no-echo") {
      o.echo = false;
    } else if (name == "--prompt-file") {
      std::string path;
      SIEVE_CLI_SET(path, args.Value(name));
      if (have_prompt) return absl::InvalidArgumentError("more than one prompt given");
      std::ifstream in(path, std::ios::binary);
      if (!in) return absl::NotFoundError(absl::StrCat("--prompt-file: cannot read ", path));
      o.prompt.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
      if (in.bad()) return absl::DataLossError(absl::StrCat("--prompt-file: error reading ", path));
      have_prompt = true;
    } else if (name == "--priority") {
      SIEVE_CLI_SET(o.priority, args.Number<int32_t>(name));
    } else if (name == "--timeout") {
      SIEVE_CLI_SET(o.timeout_s, args.Number<double>(name));
    } else if (name == "--request-id") {
      SIEVE_CLI_SET(o.request_id, args.Value(name));
    } else if (name == "--threads") {
      SIEVE_CLI_SET(o.threads, args.Number<int32_t>(name));
    } else if (name == "--page-size") {
      int32_t page_size = 0;
      SIEVE_CLI_SET(page_size, args.Number<int32_t>(name));
      o.overrides.push_back(absl::StrCat("kv_cache.page_size_tokens=", page_size));
    } else if (name == "--config") {
      SIEVE_CLI_SET(o.config_path, args.Value(name));
    } else if (name == "--set") {
      std::string assignment;
      SIEVE_CLI_SET(assignment, args.Value(name));
      o.overrides.push_back(std::move(assignment));
    } else if (name.starts_with("--")) {
      return absl::InvalidArgumentError(absl::StrCat("unknown option ", name));
    } else if (!have_prompt) {
      o.prompt = name;
      have_prompt = true;
    } else {
      return absl::InvalidArgumentError(
          "more than one prompt given (quote the prompt, or give it with --prompt-file)");
    }
  }
  if (!have_prompt && !o.help) return absl::InvalidArgumentError("no prompt given");
  return o;
}

#undef SIEVE_CLI_SET

}  // namespace sieve::cli
