// The DoubleSparsity channels an engine decodes with: from attention.decode.double_sparsity.
// calibration_file, or from a calibration run at start-up on the model's bundled
// calibration.txt; without either the engine refuses to start and says how to calibrate.
#ifndef SIEVE_ENGINE_SERVING_DS_STARTUP_H_
#define SIEVE_ENGINE_SERVING_DS_STARTUP_H_

#include "absl/status/statusor.h"
#include "engine/attention/double_sparsity_calibration.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine_config.h"
#include "engine/tokenizer/tokenizer.h"

namespace sieve::engine {

// Loads (and checks against the model) or computes the calibration for `config`. Runs the model
// on `runner` when it calibrates (before the engine serves anything).
absl::StatusOr<DsCalibration> DoubleSparsityCalibrationFor(const EngineConfig& config,
                                                           ModelRunner& runner,
                                                           const Tokenizer& tokenizer);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_DS_STARTUP_H_
