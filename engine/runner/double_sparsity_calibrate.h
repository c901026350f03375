// DoubleSparsity calibration on a loaded model (SPARSE_ATTENTION.md section 4.2): runs the model
// over a text with an attention policy that copies each layer's q, k and v projections to the
// host (AttentionStep::qkv) and averages the chosen per-channel statistic over every token.
// `sieve calibrate --method double-sparsity` and the engine's start-up calibration use it.
#ifndef SIEVE_ENGINE_RUNNER_DOUBLE_SPARSITY_CALIBRATE_H_
#define SIEVE_ENGINE_RUNNER_DOUBLE_SPARSITY_CALIBRATE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/attention/double_sparsity_calibration.h"
#include "engine/runner/model_runner.h"

namespace sieve::engine {

struct DsCalibrateOptions {
  kernels::DsStatistic statistic = kernels::DsStatistic::kQK;
  // The text is cut into independent sequences of at most this many tokens (the reference cuts
  // its calibration text into 512-token sequences). At most the runner's max_step_tokens and
  // its KV pool.
  int32_t sequence_tokens = 512;
};

// Runs `runner` over `tokens` (>= 1) and returns the calibration. q and k statistics use the
// projections before RoPE, qk the rotated ones (RoPE applied on the host with the model's
// tables, as the backend applies it). Writes the KV pages 0 .. ceil(sequence_tokens /
// page_size) - 1: run it before the pool serves anything. `source` goes into the file.
absl::StatusOr<DsCalibration> CalibrateDoubleSparsity(ModelRunner& runner,
                                                      absl::Span<const int32_t> tokens,
                                                      const DsCalibrateOptions& options,
                                                      std::string source);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_RUNNER_DOUBLE_SPARSITY_CALIBRATE_H_
