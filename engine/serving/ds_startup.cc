#include "engine/serving/ds_startup.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/runner/double_sparsity_calibrate.h"
#include "engine/status_macros.h"

namespace sieve::engine {

absl::StatusOr<DsCalibration> DoubleSparsityCalibrationFor(const EngineConfig& config,
                                                           ModelRunner& runner,
                                                           const Tokenizer& tokenizer) {
  const DoubleSparsityDecodeConfig& ds = config.attention.decode.double_sparsity;
  const ModelConfig& mc = runner.config();
  const int layers = static_cast<int>(mc.num_hidden_layers);
  const int hq = static_cast<int>(mc.num_attention_heads);
  const int hkv = static_cast<int>(mc.num_key_value_heads);
  const int d = static_cast<int>(mc.head_dim);
  if (!ds.calibration_file.empty()) {
    absl::StatusOr<DsCalibration> loaded = LoadDsCalibration(ds.calibration_file);
    if (!loaded.ok()) {
      return absl::Status(loaded.status().code(),
                          absl::StrCat("attention.decode.double_sparsity.calibration_file: ",
                                       loaded.status().message()));
    }
    DsCalibration c = *std::move(loaded);
    absl::Status fits = CheckDsCalibrationFits(c, layers, hq, hkv, d);
    if (!fits.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "attention.decode.double_sparsity.calibration_file ", ds.calibration_file, ": ",
          fits.message()));
    }
    return c;
  }
  const std::filesystem::path text = std::filesystem::path(config.model.directory) / "calibration.txt";
  std::ifstream in(text, std::ios::binary);
  if (!in) {
    return absl::FailedPreconditionError(absl::StrCat(
        "attention.decode.method double_sparsity needs the model's channel statistics: set "
        "attention.decode.double_sparsity.calibration_file to the file `sieve calibrate --method "
        "double-sparsity --model ", config.model.directory, " --text FILE --output FILE` writes "
        "(FILE: text like what the model will serve), or ship ", text.string(),
        " for a calibration at start-up"));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  SIEVE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer.Encode(buf.str(), false));
  DsCalibrateOptions o;
  SIEVE_ASSIGN_OR_RETURN(o.statistic, ParseDsStatistic(ds.statistic));
  return CalibrateDoubleSparsity(runner, ids, o,
                                 absl::StrCat("start-up calibration on ", text.string()));
}

}  // namespace sieve::engine
