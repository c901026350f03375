// `sieve calibrate --method minference`: MInference's offline, kernel-aware pattern search
// (SPARSE_ATTENTION.md section 1.3) on a real model. The model prefills the calibration text in
// one step on the cpu backend; at every layer a calibration attention policy runs dense
// attention and each candidate pattern's plan (Backend::MInferenceIndex, then the backend's own
// attention kernel: the kernel-aware part) over the layer's real queries and cached keys, and
// counts per query head the output elements off dense by more than the threshold; each head gets
// the first candidate with the fewest (kernels/sparse/minference_search.h). The result is a
// pattern file (engine/attention/minference_patterns.h) for
// attention.prefill.minference.pattern_file.
#ifndef SIEVE_CLI_CALIBRATE_H_
#define SIEVE_CLI_CALIBRATE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/attention/minference_patterns.h"

namespace sieve::cli {

struct CalibrateOptions {
  std::string method = "minference";
  std::string model_dir;
  std::string text_path;
  std::string output_path;
  int32_t max_tokens = 30000;  // the text is cut to this many tokens (the reference uses 30,000)
  int32_t page_size = 16;
  int threads = 0;             // cpu backend threads (0: all)
  float threshold = 5e-3f;     // |sparse - dense| above this counts as an error
  bool add_special_tokens = true;
};

struct CalibrationResult {
  engine::MInferencePatterns patterns;        // [layer][query head]
  std::vector<std::vector<int64_t>> errors;   // [layer][query head] the chosen candidate's count
  int32_t tokens = 0;                         // calibration tokens used
  std::string file_text;                      // the pattern file written (or to write)
};

// Runs the search (writes options.output_path unless it is empty). Errors name the file or
// setting at fault.
absl::StatusOr<CalibrationResult> CalibrateMInference(const CalibrateOptions& options);

// `sieve calibrate ARGS`: parses, runs, prints a summary to stderr; the process exit code.
int RunCalibrate(int argc, char** argv);

}  // namespace sieve::cli

#endif  // SIEVE_CLI_CALIBRATE_H_
