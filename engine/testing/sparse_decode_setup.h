// The setup the sparse decode tests share (Quest and DoubleSparsity through the runner and the
// engine, with the embedded model): where the model is, a small runner and engine configured
// for a decode method, greedy generation of one request, random prompts, one runner step, and an
// observer of the decode attention stats. Header-only; for tests.
#ifndef SIEVE_ENGINE_TESTING_SPARSE_DECODE_SETUP_H_
#define SIEVE_ENGINE_TESTING_SPARSE_DECODE_SETUP_H_

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine.h"
#include "engine/serving/engine_config.h"
#include "engine/testing/recording_sink.h"

namespace sieve::engine::testing {

// models/embedded under $SIEVE_SOURCE_DIR (ctest sets it), else under the working directory.
inline std::string EmbeddedModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

// Records the decode attention stats the engine reports (OnDecodeAttention).
class DecodeStatsObserver : public EngineObserver {
 public:
  void OnDecodeAttention(double fraction, double seconds) override {
    std::lock_guard<std::mutex> lock(mu);
    fractions.push_back(fraction);
    selection_seconds += seconds;
  }
  std::mutex mu;
  std::vector<double> fractions;
  double selection_seconds = 0;
};

// The embedded model on 2 threads, 128 pages of 16 tokens, prefill chunks of 100 tokens (so
// chunks start mid-page), decoding with `method` under a budget of `budget` tokens from the
// first decode token (sparse_min_tokens 0), layer 0 dense.
inline EngineConfig SparseDecodeEngineConfig(const std::string& method, int32_t budget) {
  EngineConfig c;
  c.model.directory = EmbeddedModelDir();
  c.model.name = "embedded";
  c.model.cpu_threads = 2;
  c.kv_cache.page_size_tokens = 16;
  c.kv_cache.num_pages = 128;
  c.scheduler.max_batch_tokens = 256;
  c.scheduler.prefill_chunk_tokens = 100;
  c.attention.decode.method = method;
  c.attention.decode.sparse_min_tokens = 0;
  c.attention.decode.dense_layers = 1;
  c.attention.decode.token_budget = budget;
  return c;
}

// Greedy tokens of one request (EOS ignored) on a fresh engine of config `c`; empty when the
// engine cannot be made or the request does not finish within two minutes.
inline std::vector<int32_t> GenerateGreedy(const EngineConfig& c,
                                           const std::vector<int32_t>& prompt,
                                           int32_t max_tokens, EngineObserver* observer = nullptr) {
  auto engine = Engine::Create(c, observer);
  if (!engine.ok()) return {};
  auto sink = std::make_shared<RecordingSink>();
  RequestSpec s;
  s.prompt = prompt;
  s.sampling.temperature = 0;
  s.stop.max_tokens = max_tokens;
  s.stop.ignore_eos = true;
  s.sink = sink;
  if (!(*engine)->Submit(std::move(s)).ok() || !sink->WaitFinished(absl::Seconds(120))) return {};
  return sink->tokens();
}

// `n` tokens drawn uniformly from [lo, hi] with `seed`.
inline std::vector<int32_t> RandomTokens(int n, uint32_t seed, int32_t lo, int32_t hi) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = std::uniform_int_distribution<int32_t>(lo, hi)(rng);
  return t;
}

// Runner options for the sparse decode runner tests: 64 pages of 16 tokens, steps of up to 256
// tokens and 8 logits rows, 2 threads; the caller turns the side data on.
inline ModelRunnerOptions SparseDecodeRunnerOptions() {
  ModelRunnerOptions o = RunnerOptionsFor(EngineConfig());
  o.page_size = 16;
  o.num_pages = 64;
  o.max_step_tokens = 256;
  o.max_step_logits = 8;
  o.num_threads = 2;
  return o;
}

// Runs tokens [from, to) of `tokens` as one step of one sequence over `pages` (the first
// `from` tokens cached), asking for dense decode attention when `dense`; its logits go to
// `logits_out` when given.
inline absl::Status RunSequenceStep(ModelWorker& w, const std::vector<int32_t>& tokens, int from,
                                    int to, const std::vector<int32_t>& pages, bool dense = false,
                                    std::vector<float>* logits_out = nullptr) {
  SequenceStep s;
  s.tokens = absl::MakeConstSpan(tokens).subspan(from, to - from);
  s.num_cached = from;
  s.pages = pages;
  s.want_logits = true;
  s.dense_decode = dense;
  std::vector<float> logits;
  absl::Status st = w.Forward({&s, 1}, logits);
  if (st.ok() && logits_out != nullptr) *logits_out = std::move(logits);
  return st;
}

}  // namespace sieve::engine::testing

#endif  // SIEVE_ENGINE_TESTING_SPARSE_DECODE_SETUP_H_
