// Output processing off the scheduler thread (OutputPool, pools.output_workers): the streams a
// client receives (token ids, text deltas, logprobs, finish reason, matched stop, usage) are the
// same whether detokenizing, stop strings and the sink calls run on the scheduler thread (0
// output workers, the old behaviour) or on 1 or 3 output threads; the sinks really run off the
// scheduler thread; a stop string found after the scheduler ran ahead drops the overrun tokens.
#include "engine/serving/output_pool.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "engine/serving/engine.h"
#include "engine/testing/recording_sink.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

constexpr absl::Duration kWait = absl::Seconds(60);

std::string ModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

struct Golden {
  std::vector<int32_t> prompt, want;
};

std::vector<Golden> LoadGolden() {
  std::ifstream in(ModelDir() + "/golden.json");
  std::stringstream ss;
  ss << in.rdbuf();
  const nlohmann::json golden = nlohmann::json::parse(ss.str(), nullptr, false);
  std::vector<Golden> out;
  if (golden.is_discarded()) return out;
  for (const auto& c : golden["greedy"]) {
    out.push_back({c["prompt_ids"].get<std::vector<int32_t>>(),
                   c["output_ids"].get<std::vector<int32_t>>()});
  }
  return out;
}

EngineConfig Config(int32_t output_workers) {
  EngineConfig c;
  c.model.directory = ModelDir();
  c.model.cpu_threads = 1;
  c.kv_cache.num_pages = 256;
  c.scheduler.max_batch_tokens = 256;
  c.scheduler.prefill_chunk_tokens = 64;
  c.pools.output_workers = output_workers;
  return c;
}

// Records the thread of every OnLoad (always the scheduler thread).
class ThreadObserver : public EngineObserver {
 public:
  void OnLoad(const EngineLoad&) override {
    std::lock_guard<std::mutex> lock(mu);
    load_thread = std::this_thread::get_id();
  }
  void OnFinished(const RequestOutcome& o) override {
    std::lock_guard<std::mutex> lock(mu);
    finished_generated += o.generated_tokens;
    ++finished;
  }
  std::mutex mu;
  std::thread::id load_thread;
  int64_t finished_generated = 0;
  int finished = 0;
};

// A sink that also records the text of each delta and the thread it was called on.
class DeltaSink : public testing::RecordingSink {
 public:
  void OnTokens(const TokenDelta& delta) override {
    {
      std::lock_guard<std::mutex> lock(delta_mu_);
      deltas_.push_back(delta.text);
      thread_ = std::this_thread::get_id();
    }
    testing::RecordingSink::OnTokens(delta);
  }
  std::vector<std::string> deltas() const {
    std::lock_guard<std::mutex> lock(delta_mu_);
    return deltas_;
  }
  std::thread::id thread() const {
    std::lock_guard<std::mutex> lock(delta_mu_);
    return thread_;
  }

 private:
  mutable std::mutex delta_mu_;
  std::vector<std::string> deltas_;
  std::thread::id thread_;
};

// What a client sees of one request.
struct Stream {
  std::vector<int32_t> tokens;
  std::vector<std::string> deltas;
  std::vector<int32_t> logprob_ids;
  FinishReason finish = FinishReason::kNone;
  std::string matched_stop;
  std::optional<int32_t> matched_stop_token;
  int32_t generated = 0;
  bool operator==(const Stream&) const = default;
  // Compared apart, within 1e-4: batches of other compositions may sum fp32 rows in another
  // order (relative error ~1e-6 over 256-768 terms), and log-probabilities here are above -30.
  std::vector<float> logprobs;
};

// Runs a fixed mix of requests at once (plain greedy, stop strings, a stop token, seeded
// sampling with logprobs, a short max_tokens) and returns what each streamed.
std::vector<Stream> RunMix(int32_t output_workers, const std::vector<Golden>& golden,
                           std::thread::id* sink_thread, std::thread::id* load_thread) {
  ThreadObserver observer;
  auto engine = Engine::Create(Config(output_workers), &observer);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return {};
  Engine& e = **engine;
  std::vector<RequestSpec> specs;
  for (size_t i = 0; i < golden.size(); ++i) {
    const Golden& g = golden[i];
    const std::string text = *e.tokenizer().Decode(g.want, true);
    for (int variant = 0; variant < 5; ++variant) {
      RequestSpec s;
      s.prompt = g.prompt;
      s.sampling.temperature = 0;
      s.stop.max_tokens = 32;
      switch (variant) {
        case 1:  // a stop string from the middle of the golden text, and one that never matches
          if (text.size() > 12 + i) s.stop.stop_strings = {"never appears", text.substr(8 + i, 3)};
          break;
        case 2:
          s.stop.stop_token_ids = {g.want[4 + i % 4]};
          break;
        case 3:
          s.sampling.temperature = 0.9f;
          s.sampling.seed = 77 + i;
          s.sampling.return_logprob = true;
          s.sampling.top_logprobs = 2;
          s.stop.ignore_eos = true;
          break;
        case 4:
          s.stop.max_tokens = 3;
          break;
      }
      specs.push_back(std::move(s));
    }
  }
  std::vector<std::shared_ptr<DeltaSink>> sinks;
  for (RequestSpec& s : specs) {
    sinks.push_back(std::make_shared<DeltaSink>());
    s.sink = sinks.back();
    EXPECT_TRUE(e.Submit(std::move(s)).ok());
  }
  std::vector<Stream> out;
  for (auto& sink : sinks) {
    EXPECT_TRUE(sink->WaitFinished(kWait));
    EXPECT_EQ(sink->contract_breaches(), 0);
    Stream st;
    st.tokens = sink->tokens();
    st.deltas = sink->deltas();
    for (const TokenLogprob& lp : sink->logprobs()) {
      st.logprob_ids.push_back(lp.id);
      st.logprobs.push_back(lp.logprob);
      for (const auto& [id, p] : lp.top) {
        st.logprob_ids.push_back(id);
        st.logprobs.push_back(p);
      }
    }
    const RequestOutcome o = sink->outcome();
    st.finish = o.finish;
    st.matched_stop = o.matched_stop;
    st.matched_stop_token = o.matched_stop_token;
    st.generated = o.generated_tokens;
    EXPECT_EQ(static_cast<size_t>(o.generated_tokens), st.tokens.size());
    out.push_back(std::move(st));
    *sink_thread = sink->thread();
  }
  EXPECT_TRUE(e.WaitIdle(kWait));
  const EngineLoad l = e.load();
  EXPECT_EQ(l.running_prefill + l.running_decode + l.waiting, 0);
  EXPECT_EQ(l.kv_pages_used, l.kv_pages_cached);
  std::lock_guard<std::mutex> lock(observer.mu);
  *load_thread = observer.load_thread;
  EXPECT_EQ(observer.finished, static_cast<int>(sinks.size()));
  int64_t streamed = 0;
  for (const Stream& st : out) streamed += st.generated;
  EXPECT_EQ(observer.finished_generated, streamed);
  return out;
}

TEST(OutputPoolTest, StreamsAreTheSameInlineAndOnOutputThreads) {
  const std::vector<Golden> golden = LoadGolden();
  ASSERT_GE(golden.size(), 3u);
  std::thread::id sink_thread, load_thread;
  const std::vector<Stream> inline_streams = RunMix(0, golden, &sink_thread, &load_thread);
  ASSERT_FALSE(inline_streams.empty());
  // Inline, the sinks run on the scheduler thread (where OnLoad runs).
  EXPECT_EQ(sink_thread, load_thread);
  // The mix exercises every finish path.
  int stops = 0, stop_tokens = 0, lengths = 0;
  for (const Stream& s : inline_streams) {
    stops += !s.matched_stop.empty();
    stop_tokens += s.matched_stop_token.has_value();
    lengths += s.finish == FinishReason::kLength;
  }
  EXPECT_GT(stops, 0);
  EXPECT_GT(stop_tokens, 0);
  EXPECT_GT(lengths, 0);
  for (int32_t workers : {1, 3}) {
    const std::vector<Stream> threaded = RunMix(workers, golden, &sink_thread, &load_thread);
    ASSERT_EQ(threaded.size(), inline_streams.size());
    for (size_t i = 0; i < threaded.size(); ++i) {
      Stream a = threaded[i], b = inline_streams[i];
      ASSERT_EQ(a.logprobs.size(), b.logprobs.size()) << "request " << i;
      for (size_t j = 0; j < a.logprobs.size(); ++j) {
        EXPECT_NEAR(a.logprobs[j], b.logprobs[j], 1e-4) << "request " << i << ", logprob " << j;
      }
      a.logprobs.clear();
      b.logprobs.clear();
      EXPECT_TRUE(a == b) << "request " << i << ", " << workers << " output workers";
    }
    EXPECT_NE(sink_thread, load_thread) << workers << " output workers";
  }
}

// A slow sink holds its output thread: the scheduler thread samples on, and the stop string is
// found several tokens later. The tokens after it are neither streamed nor counted, and the
// request's pages are released.
TEST(OutputPoolTest, AStopStringFoundLateDropsTheTokensSampledAfterIt) {
  const std::vector<Golden> golden = LoadGolden();
  ASSERT_GE(golden.size(), 1u);
  auto engine = Engine::Create(Config(1), nullptr);
  ASSERT_TRUE(engine.ok()) << engine.status();
  Engine& e = **engine;
  const Golden& g = golden[0];
  const std::string text = *e.tokenizer().Decode(g.want, true);
  ASSERT_GT(text.size(), 24u);
  const std::string stop = text.substr(16, 4);
  auto sink = std::make_shared<DeltaSink>();
  std::atomic<int> calls{0};
  sink->set_on_tokens([&calls](size_t) {
    ++calls;
    std::this_thread::sleep_for(std::chrono::milliseconds(40));
  });
  RequestSpec s;
  s.prompt = g.prompt;
  s.sampling.temperature = 0;
  s.stop.max_tokens = 32;
  s.stop.stop_strings = {stop};
  s.sink = sink;
  ASSERT_TRUE(e.Submit(std::move(s)).ok());
  ASSERT_TRUE(sink->WaitFinished(kWait));
  const RequestOutcome o = sink->outcome();
  EXPECT_EQ(o.finish, FinishReason::kStop);
  EXPECT_EQ(o.matched_stop, stop);
  EXPECT_EQ(sink->text(), text.substr(0, text.find(stop)));
  const std::vector<int32_t> tokens = sink->tokens();
  ASSERT_LT(tokens.size(), g.want.size());
  EXPECT_EQ(tokens, std::vector<int32_t>(g.want.begin(), g.want.begin() + tokens.size()));
  EXPECT_EQ(static_cast<size_t>(o.generated_tokens), tokens.size());
  EXPECT_EQ(calls.load(), static_cast<int>(tokens.size()));
  EXPECT_EQ(sink->contract_breaches(), 0);
  EXPECT_TRUE(e.WaitIdle(kWait));
  const EngineLoad l = e.load();
  EXPECT_EQ(l.running_prefill + l.running_decode + l.waiting, 0);
  EXPECT_EQ(l.kv_pages_used, l.kv_pages_cached);
}

TEST(OutputPoolTest, NegativeOutputWorkersIsRejectedByName) {
  EngineConfig c = Config(-1);
  const absl::Status st = c.Validate();
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("pools.output_workers"), std::string::npos) << st;
}

}  // namespace
}  // namespace sieve::engine
