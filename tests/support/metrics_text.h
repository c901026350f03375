// A parser of the Prometheus text exposition format (version 0.0.4), for tests and tools that
// read Sieve's /metrics endpoint and check names, types, labels and values.
#ifndef SIEVE_TESTS_SUPPORT_METRICS_TEXT_H_
#define SIEVE_TESTS_SUPPORT_METRICS_TEXT_H_

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace sieve::test_support {

// One sample line: `name{label="value",...} value [timestamp]`.
struct MetricSample {
  std::string name;                          // e.g. "sieve_step_seconds_bucket"
  std::map<std::string, std::string> labels;  // unescaped label values
  double value = 0;                          // +Inf, -Inf and NaN are allowed
};

// A parsed exposition: every sample plus the declared type and help of each family.
struct ParsedMetrics {
  std::vector<MetricSample> samples;            // in the order they appeared
  std::map<std::string, std::string> types;     // family name -> "counter", "gauge", ...
  std::map<std::string, std::string> help;      // family name -> help text

  // Returns the value of the first sample named `name` whose labels include all of `labels`
  // (other labels are ignored), or nullopt when there is none.
  std::optional<double> Find(absl::string_view name,
                             const std::map<std::string, std::string>& labels = {}) const;

  // Returns the sum of the values of all samples named `name` whose labels include `labels`
  // (0 when there are none).
  double Sum(absl::string_view name, const std::map<std::string, std::string>& labels = {}) const;

  // Returns the samples named `name` whose labels include all of `labels`.
  std::vector<MetricSample> All(absl::string_view name,
                                const std::map<std::string, std::string>& labels = {}) const;
};

// Parses `text`. Returns InvalidArgument naming the line number for a malformed line
// (bad name, unterminated label value, bad escape, missing or bad value).
absl::StatusOr<ParsedMetrics> ParseMetricsText(absl::string_view text);

}  // namespace sieve::test_support

#endif  // SIEVE_TESTS_SUPPORT_METRICS_TEXT_H_
