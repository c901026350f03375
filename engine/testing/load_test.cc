// Load (issue 15, item 1) at the engine: a thousand concurrent streams on the embedded model all
// complete without an error, and submissions past the queue limit are refused at once with
// ResourceExhausted while those thousand run. (The daemon's RESOURCE_EXHAUSTED path is
// tests/integration_test.cc QueueTest; the daemon at 1,000 streams is bench/results/
// 2026-12-05-load-streams-cpu.md.)
#include <atomic>
#include <chrono>
#include <cstdlib>

#include "engine/serving/engine.h"
#include "engine/testing/recording_sink.h"
#include "gtest/gtest.h"

namespace sieve::engine::testing {
namespace {

std::string ModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

TEST(LoadTest, AThousandStreamsCompleteAndOverflowIsRefusedAtOnce) {
  constexpr int kStreams = 1000;
  constexpr int kOverflow = 500;
  constexpr int kTokens = 8;
  EngineConfig c;
  c.model.directory = ModelDir();
  c.model.cpu_threads = 1;
  c.kv_cache.num_pages = 2048;  // 1000 x (24 + 8) tokens fit in 2000 pages of 16
  c.scheduler.max_running_requests = 256;
  c.scheduler.max_queued_requests = kStreams;
  c.scheduler.max_batch_tokens = 2048;
  auto engine = Engine::Create(c, nullptr);
  ASSERT_TRUE(engine.ok()) << engine.status();
  Engine& e = **engine;
  std::vector<std::shared_ptr<RecordingSink>> admitted;
  int rejected = 0, other_errors = 0;
  std::chrono::nanoseconds slowest_refusal{0};
  for (int i = 0; i < kStreams + kOverflow; ++i) {
    RequestSpec s;
    for (int t = 0; t < 24; ++t) s.prompt.push_back(2 + (i * 131 + t * 17) % 4000);
    s.sampling.temperature = 0;
    s.stop.max_tokens = kTokens;
    s.stop.ignore_eos = true;
    auto sink = std::make_shared<RecordingSink>();
    s.sink = sink;
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<RequestId> id = e.Submit(std::move(s));
    const auto took = std::chrono::steady_clock::now() - start;
    if (id.ok()) {
      admitted.push_back(std::move(sink));
    } else if (absl::IsResourceExhausted(id.status())) {
      ++rejected;
      slowest_refusal = std::max(slowest_refusal, took);
    } else {
      ++other_errors;
    }
  }
  // The first kStreams always fit the queue; of the rest, at most max_running_requests more
  // (admitted meanwhile) plus any that finished during submission can be accepted. Submitting
  // takes milliseconds; a request needs a prefill and 8 decode steps of up to 256 rows.
  EXPECT_GE(static_cast<int>(admitted.size()), kStreams);
  EXPECT_GT(rejected, 0);
  EXPECT_EQ(other_errors, 0);
  // "At once": Submit never waits for the model; a refusal is a few pointer moves under a lock.
  // 100 ms bounds a descheduled thread on a loaded 2-core machine.
  EXPECT_LT(slowest_refusal, std::chrono::milliseconds(100));
  int errors = 0;
  for (auto& sink : admitted) {
    ASSERT_TRUE(sink->WaitFinished(absl::Minutes(5)));
    const RequestOutcome o = sink->outcome();
    if (o.finish != FinishReason::kLength || sink->tokens().size() != kTokens) ++errors;
    EXPECT_EQ(sink->contract_breaches(), 0);
  }
  EXPECT_EQ(errors, 0) << "of " << admitted.size() << " admitted streams";
  ASSERT_TRUE(e.WaitIdle(absl::Seconds(30)));
  const EngineLoad l = e.load();
  EXPECT_EQ(l.running_prefill + l.running_decode + l.waiting, 0);
  EXPECT_EQ(l.kv_pages_used, l.kv_pages_cached);
}

}  // namespace
}  // namespace sieve::engine::testing
