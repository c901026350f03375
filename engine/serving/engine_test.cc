// The Engine on the embedded model: greedy outputs equal the golden continuations alone, under
// concurrency from several threads and under preemption; cancellation, deadlines, queue limits,
// validation, draining, prefix caching and shutdown leave no request state or KV page behind.
#include "engine/serving/engine.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "engine/runner/model_runner.h"
#include "engine/testing/recording_sink.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using ::testing::HasSubstr;

constexpr absl::Duration kWait = absl::Seconds(60);

std::string ModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

// Records what the engine streams to one request (engine/testing/recording_sink.h), waiting
// up to kWait by default.
class RecordingSink : public testing::RecordingSink {
 public:
  bool WaitFinished(absl::Duration timeout = kWait) {
    return testing::RecordingSink::WaitFinished(timeout);
  }
  bool WaitTokens(size_t n, absl::Duration timeout = kWait) {
    return testing::RecordingSink::WaitTokens(n, timeout);
  }
};

// Counts observer events.
class CountingObserver : public EngineObserver {
 public:
  void OnRejected(RejectReason reason) override { ++rejected[static_cast<int>(reason)]; }
  void OnFirstToken(const RequestTimings& t) override {
    ++first_tokens;
    if (!(t.time_to_first_token_s >= t.prefill_s && t.prefill_s >= 0 && t.queue_s >= 0)) {
      ++bad_timings;
    }
  }
  void OnInterTokenLatency(double s) override {
    ++inter_tokens;
    if (s < 0) ++bad_timings;
  }
  void OnFinished(const RequestOutcome&) override { ++finished; }
  void OnPreempted() override { ++preempted; }
  void OnStep(Pool pool, double seconds, int32_t tokens) override {
    step_tokens[pool == Pool::kPrefill ? 0 : 1] += tokens;
    if (seconds < 0 || tokens <= 0) ++bad_timings;
  }
  void OnLoad(const EngineLoad&) override { ++loads; }

  std::atomic<int> rejected[3] = {0, 0, 0};
  std::atomic<int> first_tokens{0}, inter_tokens{0}, finished{0}, preempted{0}, loads{0};
  std::atomic<int> bad_timings{0};
  std::atomic<int64_t> step_tokens[2] = {0, 0};
};

struct Case {
  std::vector<int32_t> prompt;
  std::vector<int32_t> want;  // greedy continuation
  int32_t max_tokens = 32;
};

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::ifstream in(ModelDir() + "/golden.json");
    std::stringstream ss;
    ss << in.rdbuf();
    const nlohmann::json golden = nlohmann::json::parse(ss.str(), nullptr, false);
    ASSERT_FALSE(golden.is_discarded());
    golden_ = new std::vector<Case>();
    for (const auto& c : golden["greedy"]) {
      golden_->push_back({c["prompt_ids"].get<std::vector<int32_t>>(),
                          c["output_ids"].get<std::vector<int32_t>>(), 32});
    }
    ASSERT_GE(golden_->size(), 3u);
    long_prompt_ =
        new std::vector<int32_t>(golden["logits"].back()["ids"].get<std::vector<int32_t>>());
    ASSERT_GE(long_prompt_->size(), 300u);
    // Mixed-length fillers, their greedy continuations computed alone, each prompt prefilled in
    // one step.
    fillers_ = new std::vector<Case>();
    EngineConfig c = Config();
    c.scheduler.max_batch_tokens = 512;
    c.scheduler.prefill_chunk_tokens = 512;
    auto engine = Engine::Create(c, nullptr);
    ASSERT_TRUE(engine.ok()) << engine.status();
    for (int len : {21, 47, 90, 160, 301}) {
      Case f;
      f.prompt.assign(long_prompt_->begin(), long_prompt_->begin() + len);
      f.max_tokens = 12 + len % 9;
      auto sink = std::make_shared<RecordingSink>();
      ASSERT_TRUE((*engine)->Submit(Greedy(f.prompt, f.max_tokens, sink)).ok());
      ASSERT_TRUE(sink->WaitFinished());
      f.want = sink->tokens();
      fillers_->push_back(std::move(f));
    }
  }
  static void TearDownTestSuite() {
    delete golden_;
    delete fillers_;
    delete long_prompt_;
  }

  static EngineConfig Config(int32_t page_size = 16, int32_t num_pages = 256) {
    EngineConfig c;
    c.model.directory = ModelDir();
    c.model.name = "embedded";
    c.model.cpu_threads = 1;
    c.kv_cache.page_size_tokens = page_size;
    c.kv_cache.num_pages = num_pages;
    c.scheduler.max_batch_tokens = 256;
    c.scheduler.prefill_chunk_tokens = 64;
    return c;
  }

  std::unique_ptr<Engine> Make(const EngineConfig& c, EngineObserver* observer = nullptr) {
    auto e = Engine::Create(c, observer);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(*e) : nullptr;
  }

  static RequestSpec Greedy(const std::vector<int32_t>& prompt, int32_t max_tokens,
                            std::shared_ptr<RecordingSink> sink) {
    RequestSpec s;
    s.prompt = prompt;
    s.sampling.temperature = 0;
    s.stop.max_tokens = max_tokens;
    s.sink = std::move(sink);
    return s;
  }

  // Submits a greedy request; returns its sink (null on error, with a test failure).
  static std::shared_ptr<RecordingSink> Run(Engine& e, const Case& c, int32_t priority = 0) {
    auto sink = std::make_shared<RecordingSink>();
    RequestSpec s = Greedy(c.prompt, c.max_tokens, sink);
    s.priority = priority;
    auto id = e.Submit(std::move(s));
    EXPECT_TRUE(id.ok()) << id.status();
    return id.ok() ? sink : nullptr;
  }

  // Nothing is queued or running and every used page is held only by the prefix cache.
  static void ExpectBaseline(const Engine& e) {
    const EngineLoad l = e.load();
    EXPECT_EQ(l.running_prefill, 0);
    EXPECT_EQ(l.running_decode, 0);
    EXPECT_EQ(l.waiting, 0);
    EXPECT_EQ(l.waiting_tokens, 0);
    EXPECT_EQ(l.kv_pages_used - l.kv_pages_cached, 0);
    EXPECT_EQ(l.kv_pages_used + l.kv_pages_free, e.model_info().kv_pages);
  }

  static std::vector<Case>* golden_;
  static std::vector<Case>* fillers_;
  static std::vector<int32_t>* long_prompt_;
};

std::vector<Case>* EngineTest::golden_ = nullptr;
std::vector<Case>* EngineTest::fillers_ = nullptr;
std::vector<int32_t>* EngineTest::long_prompt_ = nullptr;

TEST_F(EngineTest, GreedyAloneEqualsGolden) {
  CountingObserver obs;
  auto e = Make(Config(), &obs);
  ASSERT_NE(e, nullptr);
  for (const Case& c : *golden_) {
    auto sink = Run(*e, c);
    ASSERT_TRUE(sink->WaitFinished());
    EXPECT_EQ(sink->tokens(), c.want);
    auto text = e->tokenizer().Decode(c.want, /*skip_special_tokens=*/true);
    ASSERT_TRUE(text.ok());
    EXPECT_EQ(sink->text(), *text);
    const RequestOutcome o = sink->outcome();
    EXPECT_EQ(o.finish, FinishReason::kLength);
    EXPECT_TRUE(o.status.ok());
    EXPECT_EQ(o.prompt_tokens, static_cast<int32_t>(c.prompt.size()));
    EXPECT_EQ(o.generated_tokens, 32);
    EXPECT_EQ(o.preemptions, 0);
    const RequestTimings& t = o.timings;
    EXPECT_GE(t.queue_s, 0);
    EXPECT_GT(t.prefill_s, 0);
    EXPECT_NEAR(t.time_to_first_token_s, t.queue_s + t.prefill_s, 1e-6);
    EXPECT_GT(t.decode_s, 0);
    EXPECT_GE(t.total_s, t.time_to_first_token_s + t.decode_s - 1e-6);
    EXPECT_EQ(sink->finishes(), 1);
    EXPECT_EQ(sink->empty_deltas(), 0);
  }
  ASSERT_TRUE(e->WaitIdle(kWait));
  ExpectBaseline(*e);
  const int n = static_cast<int>(golden_->size());
  EXPECT_EQ(obs.first_tokens, n);
  EXPECT_EQ(obs.inter_tokens, n * 31);
  EXPECT_EQ(obs.finished, n);
  EXPECT_EQ(obs.bad_timings, 0);
  EXPECT_GT(obs.loads, 0);
  int64_t prompt = 0;
  for (const Case& c : *golden_) prompt += static_cast<int64_t>(c.prompt.size());
  // Every prompt token is prefilled and every generated token but the last is decoded.
  EXPECT_EQ(obs.step_tokens[0] + obs.step_tokens[1], prompt + n * 31);
  EXPECT_EQ(obs.step_tokens[1], n * 31);
  const ModelInfo info = e->model_info();
  EXPECT_EQ(info.name, "embedded");
  EXPECT_EQ(info.architecture, "llama");
  EXPECT_EQ(info.backend, "cpu");
  EXPECT_EQ(info.context_tokens, 256 * 16);
  EXPECT_EQ(info.vocab_size, 4096);
  EXPECT_EQ(info.page_size, 16);
  EXPECT_EQ(info.dtype, "float32");
  EXPECT_EQ(info.attention_policy, "prefill=dense decode=dense");
  EXPECT_EQ(info.eos_token_ids, e->tokenizer().eos_ids());  // config.json's are the tokenizer's
}

// kv_cache.num_pages 0: the pool is sized from the free memory by the backend's page size, and
// capped at what max_running_requests full contexts can use.
TEST_F(EngineTest, DerivesTheKvPoolSizeFromFreeMemory) {
  EngineConfig c = Config();
  c.kv_cache.num_pages = 0;
  c.model.max_context_tokens = 1000;
  c.scheduler.max_running_requests = 4;
  auto e = Make(c);
  ASSERT_NE(e, nullptr);
  // 4 x ceil(1000 / 16) pages (64 KiB each for the embedded model: the memory allows more).
  EXPECT_EQ(e->model_info().kv_pages, 4 * 63);
  auto sink = Run(*e, (*golden_)[0]);
  ASSERT_TRUE(sink->WaitFinished());
  EXPECT_EQ(sink->tokens(), (*golden_)[0].want);
}

// 20 requests of mixed lengths from four threads, on two workers per pool, with pages of 4 so
// that identical prompts share cached pages while they run.
TEST_F(EngineTest, ConcurrentRequestsFromSeveralThreadsEqualTheirAloneOutputs) {
  EngineConfig c = Config(/*page_size=*/4, /*num_pages=*/1024);
  c.pools.prefill_workers = 2;
  c.pools.decode_workers = 2;
  c.scheduler.max_batch_tokens = 96;
  c.scheduler.prefill_chunk_tokens = 40;
  auto e = Make(c);
  ASSERT_NE(e, nullptr);
  std::vector<const Case*> cases;
  for (int rep = 0; rep < 5; ++rep) {
    for (const Case& g : *golden_) cases.push_back(&g);
  }
  for (const Case& f : *fillers_) cases.push_back(&f);
  ASSERT_GE(cases.size(), 16u);
  std::vector<std::shared_ptr<RecordingSink>> sinks(cases.size());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = t; i < cases.size(); i += 4)
        sinks[i] = Run(*e, *cases[i], /*priority=*/i % 3);
    });
  }
  for (std::thread& th : threads) th.join();
  for (size_t i = 0; i < cases.size(); ++i) {
    ASSERT_NE(sinks[i], nullptr);
    ASSERT_TRUE(sinks[i]->WaitFinished());
    EXPECT_EQ(sinks[i]->tokens(), cases[i]->want)
        << "request " << i << ", prompt of " << cases[i]->prompt.size();
    EXPECT_EQ(sinks[i]->finishes(), 1);
  }
  ASSERT_TRUE(e->WaitIdle(kWait));
  ExpectBaseline(*e);
  EXPECT_GT(e->load().prefix_cache_hit_tokens, 0);
}

TEST_F(EngineTest, PreemptionUnderASmallKvPoolKeepsGreedyOutputs) {
  for (bool caching : {false, true}) {
    // 40 pages of 4 tokens; each request needs 12 pages to finish, so at most three fit.
    EngineConfig c = Config(/*page_size=*/4, /*num_pages=*/40);
    c.scheduler.enable_prefix_caching = caching;
    c.scheduler.prefill_chunk_tokens = 8;
    CountingObserver obs;
    auto e = Make(c, &obs);
    ASSERT_NE(e, nullptr);
    std::vector<std::shared_ptr<RecordingSink>> sinks;
    for (int rep = 0; rep < 3; ++rep) {
      for (const Case& g : *golden_) sinks.push_back(Run(*e, g, /*priority=*/rep));
    }
    int preemptions = 0;
    for (size_t i = 0; i < sinks.size(); ++i) {
      ASSERT_TRUE(sinks[i]->WaitFinished());
      EXPECT_EQ(sinks[i]->tokens(), (*golden_)[i % golden_->size()].want) << i;
      preemptions += sinks[i]->outcome().preemptions;
    }
    EXPECT_GT(preemptions, 0) << "caching " << caching;
    EXPECT_EQ(obs.preempted, preemptions);
    ASSERT_TRUE(e->WaitIdle(kWait));
    ExpectBaseline(*e);
  }
}

// A request that would run for a long time: ignore EOS, many tokens.
RequestSpec LongRunning(const std::vector<int32_t>& prompt, std::shared_ptr<RecordingSink> sink) {
  RequestSpec s;
  s.prompt = prompt;
  s.sampling.temperature = 0;
  s.stop.max_tokens = 4000;  // several seconds of decoding: cancelled long before the end
  s.stop.ignore_eos = true;
  s.sink = std::move(sink);
  return s;
}

TEST_F(EngineTest, CancellationFreesEverythingInAnyState) {
  EngineConfig c = Config();
  c.scheduler.max_running_requests = 1;
  auto e = Make(c);
  ASSERT_NE(e, nullptr);
  const std::vector<int32_t>& prompt = (*golden_)[0].prompt;
  auto a = std::make_shared<RecordingSink>();
  auto ida = e->Submit(LongRunning(prompt, a));
  ASSERT_TRUE(ida.ok());
  ASSERT_TRUE(a->WaitTokens(5));
  // Queued behind `a` (max_running_requests = 1), then cancelled there.
  auto q = std::make_shared<RecordingSink>();
  auto idq = e->Submit(LongRunning(prompt, q));
  ASSERT_TRUE(idq.ok());
  for (int i = 0; i < 1000 && e->load().waiting != 1; ++i) absl::SleepFor(absl::Milliseconds(2));
  EXPECT_EQ(e->load().waiting, 1);
  e->Cancel(*idq);
  ASSERT_TRUE(q->WaitFinished());
  EXPECT_EQ(q->outcome().generated_tokens, 0);
  EXPECT_GT(q->outcome().timings.queue_s, 0);
  // `b` cancels itself from inside its sink, on the engine's own thread, once `a` is gone.
  auto b = std::make_shared<RecordingSink>();
  std::atomic<RequestId> idb{0};
  std::atomic<bool> fired{false};
  Engine* raw = e.get();
  b->set_on_tokens([&idb, &fired, raw](size_t n) {
    if (n >= 3 && idb.load() != 0 && !fired.exchange(true)) raw->Cancel(idb.load());
  });
  auto idb_or = e->Submit(LongRunning(prompt, b));
  ASSERT_TRUE(idb_or.ok());
  idb = *idb_or;
  // Mid-stream, from the test thread; twice, and an unknown id.
  e->Cancel(*ida);
  e->Cancel(*ida);
  e->Cancel(987654321);
  for (const auto& s : {a, b, q}) {
    ASSERT_TRUE(s->WaitFinished());
    EXPECT_EQ(s->outcome().finish, FinishReason::kCancelled);
    EXPECT_TRUE(s->outcome().status.ok());
    EXPECT_EQ(s->finishes(), 1);
    EXPECT_EQ(s->calls_after_finish(), 0);
  }
  EXPECT_GE(a->tokens().size(), 5u);
  EXPECT_LT(a->tokens().size(), 4000u);
  EXPECT_GE(b->outcome().generated_tokens, 3);
  EXPECT_LT(b->outcome().generated_tokens, 4000);
  ASSERT_TRUE(e->WaitIdle(kWait));
  ExpectBaseline(*e);
  e->Cancel(*ida);  // finished: ignored
}

TEST_F(EngineTest, DeadlinesCancelRunningAndQueuedRequests) {
  auto e = Make(Config());
  ASSERT_NE(e, nullptr);
  const std::vector<int32_t>& prompt = (*golden_)[1].prompt;
  auto running = std::make_shared<RecordingSink>();
  RequestSpec s = LongRunning(prompt, running);
  s.deadline = absl::Now() + absl::Seconds(1);  // long enough for tokens, even under TSan
  ASSERT_TRUE(e->Submit(std::move(s)).ok());
  auto expired = std::make_shared<RecordingSink>();
  s = LongRunning(prompt, expired);
  s.deadline = absl::Now() - absl::Seconds(1);
  ASSERT_TRUE(e->Submit(std::move(s)).ok());
  for (const auto& sink : {running, expired}) {
    ASSERT_TRUE(sink->WaitFinished());
    EXPECT_EQ(sink->outcome().finish, FinishReason::kCancelled);
  }
  EXPECT_GE(running->outcome().timings.total_s, 0.99);
  EXPECT_LT(running->outcome().timings.total_s, 30);
  EXPECT_GT(running->outcome().generated_tokens, 0);
  EXPECT_LT(running->outcome().generated_tokens, 4000);
  ASSERT_TRUE(e->WaitIdle(kWait));
  ExpectBaseline(*e);
}

TEST_F(EngineTest, QueueLimitsRejectAtOnce) {
  EngineConfig c = Config();
  c.scheduler.max_running_requests = 1;
  c.scheduler.max_queued_requests = 2;
  c.scheduler.max_queued_tokens = 20;
  CountingObserver obs;
  auto e = Make(c, &obs);
  ASSERT_NE(e, nullptr);
  const std::vector<int32_t> prompt((*golden_)[1].prompt);  // 8 tokens
  auto running = std::make_shared<RecordingSink>();
  auto id_running = e->Submit(LongRunning(prompt, running));
  ASSERT_TRUE(id_running.ok());
  ASSERT_TRUE(running->WaitTokens(1));
  auto b = std::make_shared<RecordingSink>(), cc = std::make_shared<RecordingSink>();
  auto idb = e->Submit(LongRunning(prompt, b));
  ASSERT_TRUE(idb.ok());
  ASSERT_TRUE(e->Submit(LongRunning(prompt, cc)).ok());  // 16 tokens queued
  auto d = std::make_shared<RecordingSink>();
  auto full = e->Submit(LongRunning({5, 6, 7}, d));  // a third queued request
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(full.status().message()), HasSubstr("requests wait"));
  e->Cancel(*idb);
  ASSERT_TRUE(b->WaitFinished());
  for (int i = 0; i < 1000 && e->load().waiting != 1; ++i) absl::SleepFor(absl::Milliseconds(2));
  // One queued request of 8 tokens: 8 + 13 > 20 tokens.
  auto tokens_full = e->Submit(LongRunning(std::vector<int32_t>(13, 42), d));
  EXPECT_EQ(tokens_full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(tokens_full.status().message()), HasSubstr("prompt tokens wait"));
  EXPECT_TRUE(e->Submit(LongRunning(std::vector<int32_t>(12, 42), d)).ok());  // 20 fits
  EXPECT_EQ(obs.rejected[static_cast<int>(RejectReason::kQueueFull)], 2);
  e.reset();  // cancels the rest
  EXPECT_EQ(d->finishes(), 1);
  EXPECT_EQ(running->outcome().finish, FinishReason::kCancelled);
}

TEST_F(EngineTest, SubmitValidatesEveryField) {
  EngineConfig c = Config(/*page_size=*/16, /*num_pages=*/8);  // a KV pool of 128 tokens
  CountingObserver obs;
  auto e = Make(c, &obs);
  ASSERT_NE(e, nullptr);
  auto sink = std::make_shared<RecordingSink>();
  auto code = [&](std::function<void(RequestSpec&)> edit) {
    RequestSpec s = Greedy({1, 2, 3}, 4, sink);
    edit(s);
    return e->Submit(std::move(s)).status().code();
  };
  using absl::StatusCode;
  EXPECT_EQ(code([](RequestSpec&) {}), StatusCode::kOk);
  EXPECT_EQ(code([](RequestSpec& s) { s.sink = nullptr; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](RequestSpec& s) { s.prompt.clear(); }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](RequestSpec& s) { s.prompt[1] = -1; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](RequestSpec& s) { s.prompt[2] = 4096; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](RequestSpec& s) { s.sampling.temperature = std::nanf(""); }),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](RequestSpec& s) { s.sampling.top_p = 0; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](RequestSpec& s) { s.sampling.top_logprobs = 21; }),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](RequestSpec& s) { s.stop.max_tokens = 0; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](RequestSpec& s) { s.stop.stop_token_ids = {4096}; }),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](RequestSpec& s) { s.stop.stop_strings.assign(17, "x"); }),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code([](RequestSpec& s) { s.stop.max_tokens = 126; }), StatusCode::kOutOfRange);
  EXPECT_EQ(code([](RequestSpec& s) { s.stop.max_tokens = 125; }), StatusCode::kOk);
  auto msg = e->Submit(Greedy({1, 2, 3}, 200, sink)).status();
  EXPECT_THAT(std::string(msg.message()), HasSubstr("KV cache of 128 tokens"));
  EXPECT_EQ(obs.rejected[static_cast<int>(RejectReason::kInvalid)], 12);
  ASSERT_TRUE(e->WaitIdle(kWait));
  EXPECT_EQ(sink->finishes(), 2);  // only the two accepted requests

  c.model.max_context_tokens = 50;
  c.kv_cache.num_pages = 64;
  auto limited = Make(c);
  ASSERT_NE(limited, nullptr);
  msg = limited->Submit(Greedy({1, 2, 3}, 48, sink)).status();
  EXPECT_EQ(msg.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(msg.message()), HasSubstr("context limit of 50"));
  EXPECT_EQ(limited->model_info().context_tokens, 50);
  EXPECT_TRUE(limited->Submit(Greedy({1, 2, 3}, 47, sink)).ok());
  ASSERT_TRUE(limited->WaitIdle(kWait));
}

TEST_F(EngineTest, CreateRejectsBadConfigs) {
  EngineConfig c = Config();
  c.scheduler.max_batch_tokens = 0;
  EXPECT_EQ(Engine::Create(c, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  c = Config();
  c.scheduler.max_queued_requests = 0;
  EXPECT_EQ(Engine::Create(c, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  c = Config();
  c.pools.decode_priority = "urgent";
  EXPECT_THAT(std::string(Engine::Create(c, nullptr).status().message()),
              HasSubstr("pools.decode_priority must be one of: high, normal, got 'urgent'"));
  c = Config();
  c.attention.decode.method = "h2o";
  EXPECT_THAT(std::string(Engine::Create(c, nullptr).status().message()),
              HasSubstr("attention.decode.method must be one of: dense, quest, double_sparsity, "
                        "got 'h2o'"));
  c = Config();
  c.model.dtype = "bfloat16";
  EXPECT_THAT(std::string(Engine::Create(c, nullptr).status().message()),
              HasSubstr("model.dtype bfloat16 is not what the cpu backend computes in"));
  c = Config();
  c.model.devices = {0};
  EXPECT_THAT(std::string(Engine::Create(c, nullptr).status().message()),
              HasSubstr("model.devices must be empty with model.backend cpu"));
  c = Config();
  c.model.directory = ::testing::TempDir() + "/no_such_model";
  EXPECT_FALSE(Engine::Create(c, nullptr).ok());

  // A context limit beyond the model's: the embedded model with max_position_embeddings 64.
  const std::string dir = ::testing::TempDir() + "/short_context_model";
  std::filesystem::create_directories(dir);
  for (const char* f : {"model.safetensors", "tokenizer.json", "tokenizer_config.json"}) {
    std::filesystem::copy_file(ModelDir() + "/" + f, dir + "/" + f,
                               std::filesystem::copy_options::overwrite_existing);
  }
  std::ifstream in(ModelDir() + "/config.json");
  nlohmann::json model = nlohmann::json::parse(in);
  model["max_position_embeddings"] = 64;
  std::ofstream(dir + "/config.json") << model.dump();
  c = Config();
  c.model.directory = dir;
  c.model.max_context_tokens = 100;
  auto st = Engine::Create(c, nullptr).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("max_position_embeddings (64)"));
}

TEST_F(EngineTest, DrainingRefusesNewRequestsAndFinishesOldOnes) {
  CountingObserver obs;
  auto e = Make(Config(), &obs);
  ASSERT_NE(e, nullptr);
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (const Case& g : *golden_) sinks.push_back(Run(*e, g));
  e->StartDraining();
  auto refused = e->Submit(Greedy((*golden_)[0].prompt, 4, std::make_shared<RecordingSink>()));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(obs.rejected[static_cast<int>(RejectReason::kDraining)], 1);
  ASSERT_TRUE(e->WaitIdle(kWait));
  for (size_t i = 0; i < sinks.size(); ++i) {
    EXPECT_EQ(sinks[i]->outcome().finish, FinishReason::kLength);
    EXPECT_EQ(sinks[i]->tokens(), (*golden_)[i].want);
  }
  ExpectBaseline(*e);
}

// Time spent before Submit fetching the prompt's KV elsewhere (a decode daemon's transfer phase)
// counts in the time to first token and the total, and nowhere in the engine's own phases. The
// 40 s given here is never waited: the engine adds it, so the checks hold exactly (to the 1e-6 of
// summing seconds) and the engine's own phases stay far below it.
TEST_F(EngineTest, TransferPhaseCountsInTimeToFirstTokenAndTotal) {
  CountingObserver obs;
  auto e = Make(Config(), &obs);
  ASSERT_NE(e, nullptr);
  const Case& c = (*golden_)[0];
  auto sink = std::make_shared<RecordingSink>();
  RequestSpec spec = Greedy(c.prompt, c.max_tokens, sink);
  spec.kv_transfer_s = 40.0;
  ASSERT_TRUE(e->Submit(std::move(spec)).ok());
  ASSERT_TRUE(sink->WaitFinished());
  EXPECT_EQ(sink->tokens(), c.want);
  const RequestTimings t = sink->outcome().timings;
  EXPECT_EQ(t.transfer_s, 40.0);
  EXPECT_LT(t.queue_s + t.prefill_s + t.decode_s, 40.0);
  EXPECT_NEAR(t.time_to_first_token_s, 40.0 + t.queue_s + t.prefill_s, 1e-6);
  EXPECT_GE(t.total_s, t.time_to_first_token_s + t.decode_s - 1e-6);
  EXPECT_EQ(obs.bad_timings, 0);
  // A request without one has none.
  auto plain = Run(*e, c);
  ASSERT_TRUE(plain->WaitFinished());
  EXPECT_EQ(plain->outcome().timings.transfer_s, 0);
  EXPECT_LT(plain->outcome().timings.time_to_first_token_s, 40.0);
}

TEST_F(EngineTest, RepeatedLongPromptHitsThePrefixCache) {
  auto e = Make(Config());
  ASSERT_NE(e, nullptr);
  const Case& c = (*fillers_)[3];  // 160 tokens
  auto first = Run(*e, c);
  ASSERT_TRUE(first->WaitFinished());
  EXPECT_EQ(first->outcome().cached_tokens, 0);
  auto second = Run(*e, c);
  ASSERT_TRUE(second->WaitFinished());
  EXPECT_EQ(second->outcome().cached_tokens, 144);  // (160 - 1) / 16 full pages
  EXPECT_EQ(second->tokens(), c.want);
  EXPECT_EQ(first->tokens(), c.want);
  ASSERT_TRUE(e->WaitIdle(kWait));
  const EngineLoad l = e->load();
  EXPECT_EQ(l.prefix_cache_query_tokens, 320);
  EXPECT_EQ(l.prefix_cache_hit_tokens, 144);
  EXPECT_GT(l.kv_pages_cached, 0);
  ExpectBaseline(*e);
}

TEST_F(EngineTest, StopTokensAndStopStringsEndRequests) {
  auto e = Make(Config());
  ASSERT_NE(e, nullptr);
  const Case& g = (*golden_)[0];
  // A stop token: the first occurrence of the 6th golden token.
  const int32_t stop_id = g.want[5];
  const size_t at = std::find(g.want.begin(), g.want.end(), stop_id) - g.want.begin();
  auto sink = std::make_shared<RecordingSink>();
  RequestSpec s = Greedy(g.prompt, 32, sink);
  s.stop.stop_token_ids = {stop_id};
  ASSERT_TRUE(e->Submit(std::move(s)).ok());
  ASSERT_TRUE(sink->WaitFinished());
  EXPECT_EQ(sink->outcome().finish, FinishReason::kStop);
  EXPECT_EQ(sink->outcome().matched_stop_token, stop_id);
  EXPECT_EQ(sink->tokens(), std::vector<int32_t>(g.want.begin(), g.want.begin() + at + 1));
  // A stop string from the middle of the golden text.
  const std::string text = *e->tokenizer().Decode(g.want, true);
  ASSERT_GT(text.size(), 20u);
  const std::string stop = text.substr(12, 4);
  const size_t first = text.find(stop);
  sink = std::make_shared<RecordingSink>();
  s = Greedy(g.prompt, 32, sink);
  s.stop.stop_strings = {"never appears", stop};
  ASSERT_TRUE(e->Submit(std::move(s)).ok());
  ASSERT_TRUE(sink->WaitFinished());
  EXPECT_EQ(sink->outcome().finish, FinishReason::kStop);
  EXPECT_EQ(sink->outcome().matched_stop, stop);
  EXPECT_EQ(sink->text(), text.substr(0, first));
  EXPECT_LT(sink->tokens().size(), 32u);
  ASSERT_TRUE(e->WaitIdle(kWait));
  ExpectBaseline(*e);
}

TEST_F(EngineTest, SeededSamplingIsReproducibleAndReportsLogprobs) {
  auto e = Make(Config());
  ASSERT_NE(e, nullptr);
  std::shared_ptr<RecordingSink> sinks[2];
  for (auto& sink : sinks) {
    sink = std::make_shared<RecordingSink>();
    RequestSpec s;
    s.prompt = (*golden_)[2].prompt;
    s.sampling.temperature = 0.9f;
    s.sampling.top_p = 0.95f;
    s.sampling.seed = 1234;
    s.sampling.return_logprob = true;
    s.sampling.top_logprobs = 3;
    s.stop.max_tokens = 24;
    s.stop.ignore_eos = true;
    s.sink = sink;
    ASSERT_TRUE(e->Submit(std::move(s)).ok());
  }
  for (auto& sink : sinks) ASSERT_TRUE(sink->WaitFinished());
  EXPECT_EQ(sinks[0]->tokens(), sinks[1]->tokens());
  EXPECT_EQ(sinks[0]->tokens().size(), 24u);
  const std::vector<TokenLogprob> lp = sinks[0]->logprobs();
  ASSERT_EQ(lp.size(), 24u);
  for (size_t i = 0; i < lp.size(); ++i) {
    EXPECT_EQ(lp[i].id, sinks[0]->tokens()[i]);
    EXPECT_LE(lp[i].logprob, 0.0f);
    EXPECT_EQ(lp[i].top.size(), 3u);
  }
}

// The reference of seeded sampling: one sequence on `runner` (the prompt in one step, then one
// token per step), each token drawn by SampleToken on this thread from SamplerRng(seed), which
// takes one draw per token.
std::vector<SampledToken> HostSampled(ModelRunner& runner, const std::vector<int32_t>& prompt,
                                      const SamplingParams& params, int32_t n) {
  std::vector<int32_t> tokens = prompt;
  std::vector<int32_t> pages;
  const int32_t ps = runner.options().page_size;
  for (int32_t p = 0; p * ps < static_cast<int32_t>(prompt.size()) + n; ++p) pages.push_back(p);
  TokenHistory history;
  history.AddPrompt(prompt);
  SamplerRng rng(*params.seed);
  std::vector<SampledToken> out;
  for (int32_t cached = 0; static_cast<int32_t>(out.size()) < n;) {
    SequenceStep step;
    step.tokens = absl::MakeConstSpan(tokens).subspan(cached);
    step.num_cached = cached;
    step.pages = pages;
    step.want_logits = true;
    std::vector<float> logits;
    EXPECT_TRUE(runner.Forward({step}, logits).ok());
    cached = static_cast<int32_t>(tokens.size());
    absl::StatusOr<SampledToken> token = SampleToken(absl::MakeSpan(logits), params, history, rng);
    EXPECT_TRUE(token.ok()) << token.status();
    if (!token.ok()) break;
    tokens.push_back(token->id);
    history.AddGenerated(token->id);
    out.push_back(*token);
  }
  return out;
}

// The decode workers sample with the draw the scheduler thread took from the request's stream
// when it built the step, reading the request's token history: with a seed, the engine's tokens
// and logprobs equal those of SampleToken on the host, for penalties and filters alike (one
// draw per token on both paths).
TEST_F(EngineTest, WorkerSamplingEqualsHostSampling) {
  std::vector<RequestSpec> requests(3);
  for (size_t i = 0; i < requests.size(); ++i) {
    RequestSpec& g = requests[i];
    g.prompt = (*golden_)[i].prompt;
    g.sampling.seed = 77 + i;
    g.sampling.return_logprob = true;
    g.stop.max_tokens = 20;
    g.stop.ignore_eos = true;
  }
  requests[0].sampling.temperature = 0.8f;
  requests[0].sampling.top_k = 20;
  requests[0].sampling.repetition_penalty = 1.3f;
  requests[1].sampling.top_p = 0.9f;
  requests[1].sampling.presence_penalty = 0.7f;
  requests[1].sampling.frequency_penalty = 0.4f;
  requests[2].sampling.min_p = 0.05f;
  requests[2].sampling.temperature = 1.2f;
  ModelRunnerOptions o = RunnerOptionsFor(Config());
  o.num_pages = 64;
  o.max_step_tokens = 512;
  auto runner = ModelRunner::Load(ModelDir(), o);
  ASSERT_TRUE(runner.ok()) << runner.status();

  auto e = Make(Config());
  ASSERT_NE(e, nullptr);
  // One request at a time: batches that depend on timing would change the fp32 logits in their
  // last bits, and a draw near a CDF boundary could then go either way.
  for (size_t i = 0; i < requests.size(); ++i) {
    const std::vector<SampledToken> host =
        HostSampled(**runner, requests[i].prompt, requests[i].sampling, 20);
    auto sink = std::make_shared<RecordingSink>();
    RequestSpec s = requests[i];
    s.sink = sink;
    ASSERT_TRUE(e->Submit(std::move(s)).ok());
    ASSERT_TRUE(sink->WaitFinished());
    const std::vector<TokenLogprob> lp = sink->logprobs();
    ASSERT_EQ(sink->tokens().size(), host.size()) << "request " << i;
    ASSERT_EQ(lp.size(), host.size());
    for (size_t t = 0; t < host.size(); ++t) {
      EXPECT_EQ(sink->tokens()[t], host[t].id) << "request " << i << " token " << t;
      EXPECT_NEAR(lp[t].logprob, host[t].logprob, 1e-4) << "request " << i;
    }
  }
  ASSERT_TRUE(e->WaitIdle(kWait));
  ExpectBaseline(*e);
}

TEST_F(EngineTest, DestructorWithRequestsInFlightFinishesEachOnce) {
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  {
    EngineConfig c = Config();
    c.scheduler.max_running_requests = 4;
    auto e = Make(c);
    ASSERT_NE(e, nullptr);
    for (int i = 0; i < 8; ++i) {
      sinks.push_back(std::make_shared<RecordingSink>());
      ASSERT_TRUE(e->Submit(LongRunning((*golden_)[i % 3].prompt, sinks.back())).ok());
    }
    ASSERT_TRUE(sinks[0]->WaitTokens(3));
  }
  for (const auto& s : sinks) {
    EXPECT_EQ(s->finishes(), 1);
    EXPECT_EQ(s->calls_after_finish(), 0);
    EXPECT_EQ(s->outcome().finish, FinishReason::kCancelled);
  }
}

}  // namespace
}  // namespace sieve::engine
