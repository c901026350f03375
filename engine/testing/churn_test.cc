// Churn in CI: a thousand requests with cancellations and deadlines landing in every phase
// (queued, prefilling, at the first token, decoding, in the last step, after a preemption), on
// a KV pool small enough to preempt, with output on its own thread and inline. Afterwards the KV
// pages requests hold, the running and waiting counts, the open streams (sinks the engine still
// holds, requests without OnFinish), the threads and the file descriptors are back at baseline.
// bench/churn_bench.cc runs the same with ten thousand requests.
#include "engine/testing/churn.h"

#include <cstdlib>
#include <iostream>

#include "gtest/gtest.h"

namespace sieve::engine::testing {
namespace {

std::string ModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

class ChurnTest : public ::testing::TestWithParam<int32_t> {};

TEST_P(ChurnTest, EveryPhaseCancelledAndEverythingBackAtBaseline) {
  auto engine = Engine::Create(ChurnEngineConfig(ModelDir(), /*output_workers=*/GetParam()),
                               nullptr);
  ASSERT_TRUE(engine.ok()) << engine.status();
  ChurnOptions options;
  options.requests = 600;
  options.seed = 11 + GetParam();
  absl::StatusOr<ChurnResult> r = RunChurn(**engine, options);
  ASSERT_TRUE(r.ok()) << r.status();
  SCOPED_TRACE(r->ToMarkdown());
  std::cout << r->ToMarkdown();
  EXPECT_EQ(r->submitted, options.requests);
  EXPECT_EQ(r->rejected, 0);
  EXPECT_EQ(r->errors, 0);
  EXPECT_EQ(r->completed + r->cancelled, r->submitted);
  // Every phase was hit (each fate is drawn for about a seventh of the requests).
  EXPECT_GT(r->ended_queued, 0);
  EXPECT_GT(r->ended_prefilling, 0);
  EXPECT_GT(r->ended_first_token, 0);
  EXPECT_GT(r->ended_decoding, 0);
  EXPECT_GT(r->ended_last_step, 0);
  EXPECT_GT(r->ended_preempted, 0);
  EXPECT_GT(r->preemptions, 0);
  EXPECT_GT(r->deadlines, 0);
  // Back at baseline.
  EXPECT_EQ(r->contract_breaches, 0);
  EXPECT_EQ(r->missing_finishes, 0);
  EXPECT_EQ(r->sinks_still_referenced, 0);
  EXPECT_EQ(r->load_after.running_prefill + r->load_after.running_decode, 0);
  EXPECT_EQ(r->load_after.waiting, 0);
  EXPECT_EQ(r->load_after.kv_pages_used, r->load_after.kv_pages_cached);
  EXPECT_EQ(r->threads_after, r->threads_before);
  EXPECT_EQ(r->fds_after, r->fds_before);
  EXPECT_TRUE(r->AtBaseline());
}

INSTANTIATE_TEST_SUITE_P(OutputWorkers, ChurnTest, ::testing::Values(1, 0),
                         [](const ::testing::TestParamInfo<int32_t>& info) {
                           return info.param == 0 ? std::string("Inline")
                                                  : std::string("OutputThread");
                         });

}  // namespace
}  // namespace sieve::engine::testing
