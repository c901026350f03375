// The DoubleSparsity calibration file: per layer and head, the channels ranked by a statistic
// (SPARSE_ATTENTION.md section 4.2), written by `sieve calibrate --method double-sparsity` and
// read through attention.decode.double_sparsity.calibration_file.
//
// Format (JSON, one object; every key required unless noted):
//   {
//     "format": "sieve-double-sparsity-calibration",
//     "version": 1,
//     "statistic": "qk",              // "q", "k" or "qk" (section 4.2's options)
//     "num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 64,
//     "calibration_tokens": 4096,     // tokens the means were taken over (>= 1)
//     "source": "...",                // optional: free text (model, text file)
//     "layers": [                     // num_layers entries
//       { "channels": [[12, 40, ...], ...],   // per head: a permutation of 0..head_dim-1,
//                                              // descending statistic
//         "means":    [[0.93, 0.88, ...], ...] // per head: the mean statistic of channel c
//       }, ...
//     ]
//   }
// Heads per layer: num_kv_heads for "k", else num_q_heads. Channel indices are in the layout
// the engine stores q and k in (its own RoPE layout).
#ifndef SIEVE_ENGINE_ATTENTION_DOUBLE_SPARSITY_CALIBRATION_H_
#define SIEVE_ENGINE_ATTENTION_DOUBLE_SPARSITY_CALIBRATION_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/sparse/double_sparsity_calibration.h"

namespace sieve::engine {

inline constexpr std::string_view kDsCalibrationFormat = "sieve-double-sparsity-calibration";

struct DsCalibration {
  kernels::DsStatistic statistic = kernels::DsStatistic::kQK;
  int32_t num_layers = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t calibration_tokens = 0;
  std::string source;
  // [layer][head][head_dim], heads() per layer.
  std::vector<std::vector<std::vector<int32_t>>> channels;
  std::vector<std::vector<std::vector<double>>> means;

  // Rows per layer: num_kv_heads for the k statistic, else num_q_heads.
  int heads() const;

  // The first `r` channels of every label head of `layer`, [label_heads * r]: label heads are
  // the KV heads (per_kv_head) or the query heads. Query-head rankings become per-KV-head ones by
  // ranking the sum of the group's means; a KV-head (k) ranking serves each of its query heads.
  std::vector<int32_t> LabelChannels(int layer, int r, bool per_kv_head) const;
};

// The statistic's name in the file ("q", "k", "qk") and back (InvalidArgument otherwise).
std::string_view DsStatisticName(kernels::DsStatistic statistic);
absl::StatusOr<kernels::DsStatistic> ParseDsStatistic(std::string_view name);

// Builds the calibration from one DsChannelStats per layer (all of the same statistic).
DsCalibration DsCalibrationFromStats(const std::vector<kernels::DsChannelStats>& layers,
                                     int num_q_heads, int num_kv_heads, std::string source);

// Parses the file's text; `what` names it in errors (e.g. the path). Errors name the key and
// say what is wrong (missing, wrong type, out of range, not a permutation).
absl::StatusOr<DsCalibration> ParseDsCalibration(std::string_view text, std::string_view what);

// Reads and parses `path`.
absl::StatusOr<DsCalibration> LoadDsCalibration(const std::string& path);

// The file's text, and writing it to `path`.
std::string DsCalibrationToJson(const DsCalibration& calibration);
absl::Status WriteDsCalibration(const DsCalibration& calibration, const std::string& path);

// InvalidArgument naming the first of num_layers, num_q_heads, num_kv_heads, head_dim that
// differs from the model's.
absl::Status CheckDsCalibrationFits(const DsCalibration& calibration, int num_layers,
                                    int num_q_heads, int num_kv_heads, int head_dim);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_ATTENTION_DOUBLE_SPARSITY_CALIBRATION_H_
