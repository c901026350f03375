// The engine's watchdog thread (pools.step_timeout_s) sees what the scheduler thread cannot see
// about itself: a sink that never returns, which holds the scheduler thread (output inline,
// pools.output_workers 0) or an output thread. Within a few timeouts health() fails with a
// DeviceLost status naming the stall, OnDeviceLost comes once, and Submit refuses new requests;
// once the sink returns, every request ends and the engine shuts down cleanly. (A hung worker
// step is tested in engine/testing/async_engine_test.cc and tests/integration_test.cc.)
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "engine/backends/backend.h"
#include "engine/serving/engine.h"
#include "engine/testing/recording_sink.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

std::string ModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

class LostObserver : public EngineObserver {
 public:
  void OnDeviceLost(const absl::Status& status) override {
    std::lock_guard<std::mutex> lock(mu);
    ++calls;
    message = std::string(status.message());
  }
  std::mutex mu;
  int calls = 0;
  std::string message;
};

class EngineWatchdogTest : public ::testing::TestWithParam<int32_t> {};

TEST_P(EngineWatchdogTest, ABlockedSinkTurnsHealthFailedAndTheEngineStillStops) {
  const int32_t output_workers = GetParam();
  EngineConfig c;
  c.model.directory = ModelDir();
  c.model.cpu_threads = 1;
  c.kv_cache.num_pages = 256;
  // A step, an iteration and an output batch take milliseconds here; 1 s is a stall.
  c.pools.step_timeout_s = 1.0;
  c.pools.output_workers = output_workers;
  LostObserver observer;
  auto engine = Engine::Create(c, &observer);
  ASSERT_TRUE(engine.ok()) << engine.status();
  Engine& e = **engine;
  // A healthy engine stays healthy past the timeout while idle and while serving.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  EXPECT_TRUE(e.health().ok());
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  auto blocked = std::make_shared<testing::RecordingSink>();
  blocked->set_on_tokens([&](size_t n) {
    if (n != 3) return;
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return release; });
  });
  auto other = std::make_shared<testing::RecordingSink>();
  for (auto& sink : {blocked, other}) {
    RequestSpec s;
    for (int t = 0; t < 20; ++t) s.prompt.push_back(5 + 7 * t);
    s.sampling.temperature = 0;
    s.stop.max_tokens = 64;
    s.stop.ignore_eos = true;
    s.sink = sink;
    ASSERT_TRUE(e.Submit(std::move(s)).ok());
  }
  const auto start = std::chrono::steady_clock::now();
  while (e.health().ok() && std::chrono::steady_clock::now() - start < std::chrono::seconds(20)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const absl::Status health = e.health();
  ASSERT_FALSE(health.ok()) << "the watchdog did not trip";
  EXPECT_TRUE(IsDeviceLost(health)) << health;
  EXPECT_NE(health.message().find("stalled"), std::string::npos) << health;
  EXPECT_NE(health.message().find("pools.step_timeout_s"), std::string::npos) << health;
  {
    std::lock_guard<std::mutex> lock(observer.mu);
    EXPECT_EQ(observer.calls, 1);
  }
  RequestSpec late;
  late.prompt = {5, 6, 7};
  late.stop.max_tokens = 4;
  late.sink = std::make_shared<testing::RecordingSink>();
  EXPECT_TRUE(absl::IsUnavailable(e.Submit(std::move(late)).status()));
  // The sink returns: both requests end (with the failure), and the engine stops cleanly.
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
  }
  cv.notify_all();
  EXPECT_TRUE(blocked->WaitFinished(absl::Seconds(30)));
  EXPECT_TRUE(other->WaitFinished(absl::Seconds(30)));
  EXPECT_LE(blocked->outcome().generated_tokens, 64);
  EXPECT_TRUE(e.WaitIdle(absl::Seconds(30)));
  std::lock_guard<std::mutex> lock(observer.mu);
  EXPECT_EQ(observer.calls, 1);
}

INSTANTIATE_TEST_SUITE_P(OutputWorkers, EngineWatchdogTest, ::testing::Values(0, 1),
                         [](const ::testing::TestParamInfo<int32_t>& info) {
                           return info.param == 0 ? std::string("SinkOnSchedulerThread")
                                                  : std::string("SinkOnOutputThread");
                         });

}  // namespace
}  // namespace sieve::engine
