// Churn at scale (issue 15, item 2): ten thousand requests through the Engine on the embedded
// model, with random cancellations and deadlines landing in every phase (engine/testing/churn.h),
// then the baseline check: KV pages held by requests, running and waiting counts, open streams,
// threads and file descriptors as before. Prints a Markdown table; exits 1 if not at baseline.
//   churn_bench [--requests N] [--seed S] [--output-workers W]      (from the repository root)
#include <cstdio>
#include <cstdlib>
#include <string>

#include "engine/testing/churn.h"

int main(int argc, char** argv) {
  sieve::engine::testing::ChurnOptions options;
  options.requests = 10000;
  int32_t output_workers = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const char* value = argv[i + 1];
    if (flag == "--requests") {
      options.requests = std::atoll(value);
    } else if (flag == "--seed") {
      options.seed = std::strtoull(value, nullptr, 10);
    } else if (flag == "--output-workers") {
      output_workers = std::atoi(value);
    } else {
      std::fprintf(stderr, "unknown flag %s (flags: --requests, --seed, --output-workers)\n",
                   flag.c_str());
      return 2;
    }
  }
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  const std::string model = std::string(root != nullptr ? root : ".") + "/models/embedded";
  auto engine = sieve::engine::Engine::Create(
      sieve::engine::testing::ChurnEngineConfig(model, output_workers), nullptr);
  if (!engine.ok()) {
    std::fprintf(stderr, "engine: %s\n", engine.status().ToString().c_str());
    return 2;
  }
  auto result = sieve::engine::testing::RunChurn(**engine, options);
  if (!result.ok()) {
    std::fprintf(stderr, "churn: %s\n", result.status().ToString().c_str());
    return 1;
  }
  std::printf("churn: %lld requests, seed %llu, output workers %d\n\n%s",
              static_cast<long long>(options.requests),
              static_cast<unsigned long long>(options.seed), output_workers,
              result->ToMarkdown().c_str());
  return result->AtBaseline() ? 0 : 1;
}
