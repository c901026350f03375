// The Engine on AsyncBackend: operators run later on executor threads (with random delays), as
// on a GPU, so every path that frees, shares or reuses a KV page is exercised while the device
// may still be writing it: chunked prefill across several prefill workers, prefix-cache sharing,
// cancellation, deadlines, preemption under a small pool, eviction, and injected faults. Each
// request's greedy output must equal what a synchronous CPU engine gives it alone, and no page or
// request may be left behind.
#include <atomic>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "engine/serving/engine.h"
#include "engine/testing/async_backend.h"
#include "engine/testing/golden_cases.h"
#include "engine/testing/recording_sink.h"
#include "gtest/gtest.h"

namespace sieve::engine::testing {
namespace {

constexpr absl::Duration kWait = absl::Seconds(120);

using Case = GoldenCase;

EngineConfig BaseConfig(const std::string& backend, int32_t page_size, int32_t num_pages) {
  EngineConfig c;
  c.model.directory = EmbeddedModelDir();
  c.model.name = "embedded";
  c.model.backend = backend;
  c.model.cpu_threads = 1;
  c.kv_cache.page_size_tokens = page_size;
  c.kv_cache.num_pages = num_pages;
  // Chunks of 24 under a step budget of 192: a step's chunks spread over every prefill worker
  // (each batch goes to the worker with the most room), and a sequence's next chunk often lands
  // on another worker.
  c.scheduler.max_batch_tokens = 192;
  c.scheduler.prefill_chunk_tokens = 24;
  return c;
}

// Counts device-lost reports and submits a callback's requests after a given prefill step.
class TestObserver : public EngineObserver {
 public:
  void OnStep(Pool pool, double, int32_t) override {
    if (pool != Pool::kPrefill || !hook) return;
    const int step = ++prefill_steps;
    if (step == after_prefill_step || (every_prefill_step > 0 && step % every_prefill_step == 0)) {
      hook();
    }
  }
  void OnDeviceLost(const absl::Status&) override { ++device_lost; }

  std::atomic<int> prefill_steps{0};
  int after_prefill_step = -1;  // the hook runs after this prefill step
  int every_prefill_step = 0;   // and after every this many (0: not)
  std::function<void()> hook;  // runs on the scheduler thread
  std::atomic<int> device_lost{0};
};

class AsyncEngineTest : public ::testing::TestWithParam<int> {
 protected:
  static void SetUpTestSuite() {
    cases_ = new std::vector<Case>(GoldenCases());
    ASSERT_FALSE(cases_->empty());
    // Two share a 256-token prefix: the 256-token case and this one.
    Case shared;
    shared.prompt.assign((*cases_)[6].prompt.begin(), (*cases_)[6].prompt.end());
    shared.prompt.insert(shared.prompt.end(), (*cases_)[7].prompt.begin() + 10,
                         (*cases_)[7].prompt.begin() + 40);
    shared.max_tokens = 8;
    cases_->push_back(std::move(shared));
    // The reference: each case alone on the synchronous CPU backend.
    auto ref = Engine::Create(BaseConfig("cpu", 16, 256), nullptr);
    ASSERT_TRUE(ref.ok()) << ref.status();
    FillWanted(**ref, *cases_, kWait);
  }
  static void TearDownTestSuite() { delete cases_; }

  // An engine on a fresh AsyncBackend registration: a step's operators start up to 6 ms after
  // they are queued (unless a waiting call drains their stream), each after a random delay of up
  // to 0.1 ms.
  std::unique_ptr<Engine> Make(EngineConfig c, EngineObserver* observer = nullptr) {
    const std::string name = "cpu-async-" + std::to_string(next_backend_++);
    AsyncBackendOptions o;
    o.max_delay_us = 100;
    o.max_latency_us = 6000;
    o.seed = static_cast<uint64_t>(next_backend_) * 7919 + GetParam();
    control_ = RegisterAsyncBackend(name, o);
    c.model.backend = name;
    c.pools.prefill_workers = GetParam();
    c.pools.decode_workers = 2;
    auto e = Engine::Create(c, observer);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(*e) : nullptr;
  }

  // Every request is gone, every used page is held only by the prefix cache, and no step touched
  // a KV page before the step writing it was known to be finished.
  void ExpectBaseline(Engine& e) {
    EXPECT_EQ(control_->violations(), 0) << control_->first_violation();
    ExpectEngineAtBaseline(e, kWait);
  }

  // Waits for `sink` and checks that it finished by length with the reference output.
  static void ExpectReference(RecordingSink& sink, const Case& c, const std::string& what) {
    ASSERT_TRUE(sink.WaitFinished(kWait)) << what;
    EXPECT_EQ(sink.outcome().finish, FinishReason::kLength) << what << ": "
                                                             << sink.outcome().status;
    EXPECT_EQ(sink.tokens(), c.want) << what << ", prompt of " << c.prompt.size();
    EXPECT_EQ(sink.finishes(), 1) << what;
    EXPECT_EQ(sink.contract_breaches(), 0) << what;
  }

  static std::vector<Case>* cases_;
  static int next_backend_;
  std::shared_ptr<AsyncBackendControl> control_;
};

std::vector<Case>* AsyncEngineTest::cases_ = nullptr;
int AsyncEngineTest::next_backend_ = 0;

// Prompts take many chunks, and a request of higher priority than all before it arrives every
// other prefill step: it goes ahead of them in the step's order, which moves their next chunks
// to other prefill workers, so a chunk must not start before the previous one's KV exists.
TEST_P(AsyncEngineTest, ChunkedPrefillsOnSeveralWorkersMatchTheSynchronousOutputs) {
  const size_t n = 2 * cases_->size();
  std::vector<std::shared_ptr<RecordingSink>> sinks(n);
  for (auto& sink : sinks) sink = std::make_shared<RecordingSink>();
  std::mutex mu;
  size_t next = 0;        // guarded by mu: the next request to send
  Engine* raw = nullptr;  // set before the first send
  auto send_next = [&] {
    std::lock_guard<std::mutex> lock(mu);
    if (next >= n) return;
    RequestSpec s = GreedyRequest((*cases_)[next % cases_->size()], sinks[next]);
    s.priority = static_cast<int32_t>(next);
    EXPECT_TRUE(raw->Submit(std::move(s)).ok());
    ++next;
  };
  TestObserver obs;
  obs.every_prefill_step = 2;
  obs.hook = send_next;
  EngineConfig c = BaseConfig("", 16, 512);
  c.scheduler.enable_prefix_caching = false;
  auto e = Make(c, &obs);
  ASSERT_NE(e, nullptr);
  raw = e.get();
  send_next();
  // The hook sends the rest as prefill steps go by; should the engine run dry first, send here.
  while (true) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (next >= n) break;
    }
    if (e->WaitIdle(absl::Milliseconds(5))) send_next();
  }
  for (size_t i = 0; i < n; ++i) {
    ExpectReference(*sinks[i], (*cases_)[i % cases_->size()], "request " + std::to_string(i));
  }
  ExpectBaseline(*e);
  // The callers really ran ahead of the device.
  EXPECT_GT(control_->ops_waited_for(), 0);
}

// Pages offered to the prefix cache by a prefilling request are adopted by later requests with
// the same prompt while the first one is still prefilling.
TEST_P(AsyncEngineTest, PrefixCachePagesAreSharedOnlyOnceWritten) {
  const Case& longest = (*cases_)[7];  // 300 tokens
  const Case& sharing = (*cases_)[8];  // its first 256 tokens, then others
  std::vector<std::shared_ptr<RecordingSink>> later;
  Engine* raw = nullptr;  // set before the first Submit, read by the hook after it
  TestObserver obs;
  obs.after_prefill_step = 3;
  obs.hook = [&] {
    for (const Case* k : {&longest, &sharing, &longest}) {
      later.push_back(std::make_shared<RecordingSink>());
      EXPECT_TRUE(raw->Submit(GreedyRequest(*k, later.back())).ok());
    }
  };
  auto e = Make(BaseConfig("", 16, 512), &obs);
  ASSERT_NE(e, nullptr);
  raw = e.get();
  auto first = std::make_shared<RecordingSink>();
  ASSERT_TRUE(e->Submit(GreedyRequest(longest, first)).ok());
  ExpectReference(*first, longest, "first");
  ASSERT_TRUE(e->WaitIdle(kWait));
  ASSERT_EQ(later.size(), 3u);
  ExpectReference(*later[0], longest, "second");
  ExpectReference(*later[1], sharing, "sharing");
  ExpectReference(*later[2], longest, "third");
  int64_t cached = 0;
  for (const auto& s : later) cached += s->outcome().cached_tokens;
  EXPECT_GT(cached, 0);
  ExpectBaseline(*e);
}

// Cancellations and deadlines at random moments (queued, between chunks, mid-decode) while the
// survivors reuse the freed pages of a small pool: a page freed under a running step would
// corrupt a survivor's KV.
TEST_P(AsyncEngineTest, CancellationsAndDeadlinesNeverFreePagesUnderARunningStep) {
  EngineConfig c = BaseConfig("", 16, 80);
  auto e = Make(c);
  ASSERT_NE(e, nullptr);
  std::mt19937 rng(GetParam());
  struct Sent {
    const Case* c;
    std::shared_ptr<RecordingSink> sink;
    RequestId id;
    bool doomed;
  };
  std::vector<Sent> sent;
  for (int rep = 0; rep < 3; ++rep) {
    for (const Case& k : *cases_) {
      auto sink = std::make_shared<RecordingSink>();
      RequestSpec s = GreedyRequest(k, sink);
      const bool doomed = rng() % 2 == 0;
      if (doomed && rng() % 2 == 0) s.deadline = absl::Now() + absl::Milliseconds(rng() % 150);
      auto id = e->Submit(std::move(s));
      ASSERT_TRUE(id.ok()) << id.status();
      sent.push_back({&k, sink, *id, doomed});
    }
  }
  for (const Sent& s : sent) {
    if (!s.doomed) continue;
    absl::SleepFor(absl::Milliseconds(rng() % 25));
    e->Cancel(s.id);
  }
  int survivors = 0, cancelled = 0;
  for (size_t i = 0; i < sent.size(); ++i) {
    const Sent& s = sent[i];
    ASSERT_TRUE(s.sink->WaitFinished(kWait));
    EXPECT_EQ(s.sink->finishes(), 1);
    EXPECT_EQ(s.sink->contract_breaches(), 0);
    if (!s.doomed) {
      ExpectReference(*s.sink, *s.c, "survivor " + std::to_string(i));
      ++survivors;
    } else if (s.sink->outcome().finish == FinishReason::kCancelled) {
      ++cancelled;
      // Whatever it streamed before the end is a prefix of its reference output.
      const std::vector<int32_t> got = s.sink->tokens();
      ASSERT_LE(got.size(), s.c->want.size());
      EXPECT_TRUE(std::equal(got.begin(), got.end(), s.c->want.begin())) << i;
    }
  }
  EXPECT_GT(survivors, 0);
  EXPECT_GT(cancelled, 0);
  ExpectBaseline(*e);
}

// A pool too small for the requests together: requests are preempted, recomputed and evicted
// from the prefix cache while other steps run.
TEST_P(AsyncEngineTest, PreemptionAndEvictionUnderASmallPoolKeepOutputs) {
  for (bool caching : {false, true}) {
    EngineConfig c = BaseConfig("", 4, 100);  // 400 tokens; each request needs up to 79 pages
    c.scheduler.enable_prefix_caching = caching;
    c.scheduler.prefill_chunk_tokens = 8;
    auto e = Make(c);
    ASSERT_NE(e, nullptr);
    std::vector<std::shared_ptr<RecordingSink>> sinks;
    for (const Case& k : *cases_) {
      sinks.push_back(std::make_shared<RecordingSink>());
      ASSERT_TRUE(e->Submit(GreedyRequest(k, sinks.back())).ok());
    }
    int preemptions = 0;
    for (size_t i = 0; i < sinks.size(); ++i) {
      ExpectReference(*sinks[i], (*cases_)[i], "caching " + std::to_string(caching));
      preemptions += sinks[i]->outcome().preemptions;
    }
    EXPECT_GT(preemptions, 0) << "caching " << caching;
    ExpectBaseline(*e);
  }
}

// A recoverable backend error fails the requests of its step only; the engine keeps serving.
TEST_P(AsyncEngineTest, RecoverableFaultFailsOnlyItsStep) {
  TestObserver obs;
  auto e = Make(BaseConfig("", 16, 512), &obs);
  ASSERT_NE(e, nullptr);
  control_->InjectFault(40, FaultKind::kRecoverable);
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (const Case& k : *cases_) {
    sinks.push_back(std::make_shared<RecordingSink>());
    ASSERT_TRUE(e->Submit(GreedyRequest(k, sinks.back())).ok());
  }
  int failed = 0;
  for (size_t i = 0; i < sinks.size(); ++i) {
    ASSERT_TRUE(sinks[i]->WaitFinished(kWait));
    const RequestOutcome o = sinks[i]->outcome();
    if (o.finish == FinishReason::kError) {
      ++failed;
      EXPECT_EQ(o.status.code(), absl::StatusCode::kInternal) << o.status;
      EXPECT_FALSE(IsDeviceLost(o.status));
    } else {
      ExpectReference(*sinks[i], (*cases_)[i], "request " + std::to_string(i));
    }
  }
  EXPECT_GE(failed, 1);
  EXPECT_LT(failed, static_cast<int>(sinks.size()));
  EXPECT_TRUE(e->health().ok());
  EXPECT_EQ(obs.device_lost, 0);
  // Still serving.
  auto again = std::make_shared<RecordingSink>();
  ASSERT_TRUE(e->Submit(GreedyRequest((*cases_)[3], again)).ok());
  ExpectReference(*again, (*cases_)[3], "after the fault");
  ExpectBaseline(*e);
}

// An unrecoverable error (a lost device) ends every request, turns health bad within the step
// that saw it, is reported once, and refuses new requests.
TEST_P(AsyncEngineTest, FatalFaultEndsEveryRequestAndStopsServing) {
  TestObserver obs;
  auto e = Make(BaseConfig("", 16, 512), &obs);
  ASSERT_NE(e, nullptr);
  control_->InjectFault(60, FaultKind::kFatal);
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (int rep = 0; rep < 2; ++rep) {
    for (const Case& k : *cases_) {
      sinks.push_back(std::make_shared<RecordingSink>());
      ASSERT_TRUE(e->Submit(GreedyRequest(k, sinks.back())).ok());
    }
  }
  for (const auto& s : sinks) {
    ASSERT_TRUE(s->WaitFinished(kWait));
    EXPECT_EQ(s->outcome().finish, FinishReason::kError);
    EXPECT_TRUE(IsDeviceLost(s->outcome().status)) << s->outcome().status;
    EXPECT_EQ(s->outcome().status.code(), absl::StatusCode::kUnavailable);
    EXPECT_EQ(s->finishes(), 1);
  }
  EXPECT_TRUE(control_->device_lost());
  EXPECT_EQ(obs.device_lost, 1);
  EXPECT_TRUE(IsDeviceLost(e->health())) << e->health();
  auto late = e->Submit(GreedyRequest((*cases_)[0], std::make_shared<RecordingSink>()));
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(late.status().message().find("stopped serving"), std::string::npos) << late.status();
  ExpectBaseline(*e);
}

// A step that never finishes (a hung device): after pools.step_timeout_s (2 s) the watchdog fails the
// engine as for a lost device (health, OnDeviceLost once, requests outside the hung step end, new
// ones are refused); once the step is let go, its requests end too and nothing is left behind.
TEST_P(AsyncEngineTest, WatchdogFailsTheEngineWhenAStepHangs) {
  TestObserver obs;
  EngineConfig c = BaseConfig("", 16, 512);
  c.pools.step_timeout_s = 2.0;  // a normal step here takes milliseconds
  auto e = Make(c, &obs);
  ASSERT_NE(e, nullptr);
  control_->InjectFault(60, FaultKind::kHang);
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (const Case& k : *cases_) {
    sinks.push_back(std::make_shared<RecordingSink>());
    ASSERT_TRUE(e->Submit(GreedyRequest(k, sinks.back())).ok());
  }
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (obs.device_lost == 0 && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_EQ(obs.device_lost, 1);
  EXPECT_TRUE(control_->hanging());
  const absl::Status health = e->health();
  EXPECT_TRUE(IsDeviceLost(health)) << health;
  EXPECT_NE(health.message().find("stalled"), std::string::npos) << health;
  auto late = e->Submit(GreedyRequest((*cases_)[0], std::make_shared<RecordingSink>()));
  EXPECT_EQ(late.status().code(), absl::StatusCode::kUnavailable);
  control_->ReleaseHangs();
  // Requests that finished before the stall did so normally; every other one failed.
  int failed = 0;
  for (size_t i = 0; i < sinks.size(); ++i) {
    ASSERT_TRUE(sinks[i]->WaitFinished(kWait));
    EXPECT_EQ(sinks[i]->finishes(), 1);
    if (sinks[i]->outcome().finish == FinishReason::kError) {
      ++failed;
    } else {
      ExpectReference(*sinks[i], (*cases_)[i], "finished before the stall");
    }
  }
  EXPECT_GT(failed, 0);
  ExpectBaseline(*e);
}

INSTANTIATE_TEST_SUITE_P(PrefillWorkers, AsyncEngineTest, ::testing::Values(2, 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return std::to_string(info.param) + "Workers";
                         });

}  // namespace
}  // namespace sieve::engine::testing
