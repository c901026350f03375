// MInference per-head pattern files (attention.prefill.minference.pattern_file): which pattern
// and budgets each (layer, query head) uses, as `sieve calibrate --method minference` writes them.
//
// Format (JSON). Either MInference's own config list, or an object holding it:
//
//   {
//     "format": "sieve-minference-patterns", "version": 1,       (optional, checked if present)
//     "num_layers": 2, "num_q_heads": 4,                          (optional, checked if present)
//     "calibration": { ... },                                     (optional, free-form metadata)
//     "layers": [                                                 (required)
//       {"0": ["vertical_and_slash", 1000, 6096, 12], "1": ["stream_llm", 100, 800, 0], ...},
//       ...                                                       (one object per layer)
//     ]
//   }
//
// `layers[l]` maps a query head id (decimal string) to [pattern, a, b] or [pattern, a, b, score]:
//   "vertical_and_slash": a = vertical_size, b = slash_size (SPARSE_ATTENTION.md 1.4);
//   "stream_llm" (A-shape): a = n_init, b = n_local;
//   "block_sparse": a = top_k key blocks of 64 (b is ignored; the search writes 0).
// Sizes are integers >= 1 (block_sparse: b >= 0); `score` is the search's error count (ignored
// when loading). A head missing from its layer's object uses the method's default VS budgets.
// The list must have exactly one entry per model layer.
#ifndef SIEVE_ENGINE_ATTENTION_MINFERENCE_PATTERNS_H_
#define SIEVE_ENGINE_ATTENTION_MINFERENCE_PATTERNS_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/sparse/minference.h"

namespace sieve::engine {

using MInferenceHeadPattern = kernels::minference::HeadPattern;

// [layer][query head].
using MInferencePatterns = std::vector<std::vector<MInferenceHeadPattern>>;

// Parses a pattern file's text for a model of `num_layers` layers and `num_q_heads` query heads;
// heads the file omits get `default_pattern`. InvalidArgument naming `source`, the layer and head
// and what is wrong.
absl::StatusOr<MInferencePatterns> ParseMInferencePatterns(
    std::string_view text, std::string_view source, int32_t num_layers, int32_t num_q_heads,
    const MInferenceHeadPattern& default_pattern);

// Reads and parses the file at `path` (NotFound / InvalidArgument naming it).
absl::StatusOr<MInferencePatterns> LoadMInferencePatterns(
    const std::string& path, int32_t num_layers, int32_t num_q_heads,
    const MInferenceHeadPattern& default_pattern);

// The file text (object form) for `patterns` with per-head `scores` ([layer][head], may be
// empty: 0) and a free-form JSON object `calibration_json` ("" for none).
std::string MInferencePatternsToJson(const MInferencePatterns& patterns,
                                     const std::vector<std::vector<int64_t>>& scores,
                                     std::string_view calibration_json);

// "vertical_and_slash", "stream_llm", "block_sparse".
std::string_view MInferencePatternName(kernels::minference::Pattern p);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_ATTENTION_MINFERENCE_PATTERNS_H_
