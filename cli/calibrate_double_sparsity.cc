#include "cli/calibrate_double_sparsity.h"

#include <charconv>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "engine/runner/double_sparsity_calibrate.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine_config.h"
#include "engine/tokenizer/tokenizer.h"

namespace sieve::cli {

const char kCalibrateDoubleSparsityUsage[] = R"(usage: sieve calibrate --method double-sparsity --model DIR [--text FILE] --output FILE [options]

Runs the model in DIR over the text in FILE on the cpu backend, averages a per-channel statistic
of every layer's queries and keys over all its tokens, and writes each head's channels ranked by
it as JSON: the file attention.decode.double_sparsity.calibration_file names.

where:
  --model DIR            Hugging Face checkpoint folder (config.json, *.safetensors,
                         tokenizer.json)
  --text FILE            calibration text (UTF-8); default: DIR/calibration.txt when the model
                         ships one (the embedded model does)
  --output FILE          the calibration file to write
options:
  --statistic S          qk (default; |q_c k_c| after RoPE, per query head), q (|q_c| before
                         RoPE, per query head) or k (|k_c| before RoPE, per KV head)
  --sequence-tokens N    cut the text into sequences of N tokens (default 512)
  --threads N            CPU threads (default: all)
)";

namespace {

int Usage(const std::string& problem) {
  std::cerr << "sieve calibrate: " << problem << "\n" << kCalibrateDoubleSparsityUsage;
  return 2;
}

bool ParseInt(std::string_view s, int& out) {
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && end == s.data() + s.size();
}

}  // namespace

int RunCalibrateDoubleSparsity(int argc, char** argv) {
  std::string model, text, output, statistic = "qk";
  int sequence_tokens = 512, threads = 0;
  for (int i = 0; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--help" || a == "-h") {
      std::cout << kCalibrateDoubleSparsityUsage;
      return 0;
    }
    if (i + 1 >= argc) return Usage(absl::StrCat("unknown or incomplete option '", std::string(a), "'"));
    const std::string_view v = argv[++i];
    if (a == "--method") {
      if (v != "double-sparsity") return Usage(absl::StrCat("--method ", std::string(v), " is not this command's"));
    } else if (a == "--model") {
      model = v;
    } else if (a == "--text") {
      text = v;
    } else if (a == "--output") {
      output = v;
    } else if (a == "--statistic") {
      statistic = v;
    } else if (a == "--sequence-tokens") {
      if (!ParseInt(v, sequence_tokens) || sequence_tokens < 1) {
        return Usage("--sequence-tokens must be a positive integer");
      }
    } else if (a == "--threads") {
      if (!ParseInt(v, threads) || threads < 0) return Usage("--threads must be >= 0");
    } else {
      return Usage(absl::StrCat("unknown option '", std::string(a), "'"));
    }
  }
  if (model.empty()) return Usage("--model DIR is required");
  if (output.empty()) return Usage("--output FILE is required");
  if (text.empty()) {
    text = (std::filesystem::path(model) / "calibration.txt").string();
    if (!std::filesystem::exists(text)) {
      return Usage(absl::StrCat("--text FILE is required (", model,
                                " ships no calibration.txt)"));
    }
  }
  absl::StatusOr<kernels::DsStatistic> stat = engine::ParseDsStatistic(statistic);
  if (!stat.ok()) return Usage(absl::StrCat("--statistic: ", stat.status().message()));

  std::ifstream in(text, std::ios::binary);
  if (!in) {
    std::cerr << "sieve calibrate: cannot read the text file " << text << "\n";
    return 1;
  }
  std::stringstream buf;
  buf << in.rdbuf();
  auto tokenizer = engine::Tokenizer::FromDirectory(model);
  if (!tokenizer.ok()) {
    std::cerr << "sieve calibrate: " << tokenizer.status() << "\n";
    return 1;
  }
  auto ids = (*tokenizer)->Encode(buf.str(), /*add_special_tokens=*/false);
  if (!ids.ok() || ids->empty()) {
    std::cerr << "sieve calibrate: " << text << ": "
              << (ids.ok() ? std::string("no tokens") : std::string(ids.status().message()))
              << "\n";
    return 1;
  }
  engine::ModelRunnerOptions ro = engine::RunnerOptionsFor(engine::EngineConfig());
  ro.backend = "cpu";
  ro.num_threads = threads;
  ro.page_size = 16;
  ro.num_pages = (sequence_tokens + ro.page_size - 1) / ro.page_size;
  ro.max_step_tokens = sequence_tokens;
  ro.max_step_logits = 1;
  auto runner = engine::ModelRunner::Load(model, ro);
  if (!runner.ok()) {
    std::cerr << "sieve calibrate: " << runner.status() << "\n";
    return 1;
  }
  engine::DsCalibrateOptions co;
  co.statistic = *stat;
  co.sequence_tokens = sequence_tokens;
  auto calibration = engine::CalibrateDoubleSparsity(
      **runner, *ids, co, absl::StrCat("model ", model, ", text ", text));
  if (!calibration.ok()) {
    std::cerr << "sieve calibrate: " << calibration.status() << "\n";
    return 1;
  }
  if (absl::Status s = engine::WriteDsCalibration(*calibration, output); !s.ok()) {
    std::cerr << "sieve calibrate: " << s << "\n";
    return 1;
  }
  std::cerr << "[sieve] double-sparsity calibration (" << statistic << ") of "
            << calibration->num_layers << " layers over " << calibration->calibration_tokens
            << " tokens written to " << output << "\n";
  return 0;
}

}  // namespace sieve::cli
