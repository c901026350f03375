// What the engine tests over asynchronous and faulty backends share (async_engine_test.cc,
// fault_engine_test.cc): greedy requests cut from the embedded model's longest golden prompt,
// each with the tokens a reference engine gave it alone, and the check that an engine is back
// at its baseline. Header-only; for tests.
#ifndef SIEVE_ENGINE_TESTING_GOLDEN_CASES_H_
#define SIEVE_ENGINE_TESTING_GOLDEN_CASES_H_

#include <cstdint>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "engine/serving/engine.h"
#include "engine/testing/recording_sink.h"
#include "engine/testing/sparse_decode_setup.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine::testing {

struct GoldenCase {
  std::vector<int32_t> prompt;
  std::vector<int32_t> want;  // greedy tokens of a reference engine, the request alone
  int32_t max_tokens = 0;
};

// Prompts of 9 to 300 tokens (1 to 19 pages of 16, some ending mid-page) cut from the longest
// golden prompt, with 6 to 15 tokens each; `want` left empty. Empty (and a test failure) when
// golden.json cannot be read.
inline std::vector<GoldenCase> GoldenCases() {
  std::ifstream in(EmbeddedModelDir() + "/golden.json");
  std::stringstream ss;
  ss << in.rdbuf();
  const nlohmann::json golden = nlohmann::json::parse(ss.str(), nullptr, false);
  EXPECT_FALSE(golden.is_discarded());
  if (golden.is_discarded()) return {};
  const auto long_prompt = golden["logits"].back()["ids"].get<std::vector<int32_t>>();
  EXPECT_GE(long_prompt.size(), 300u);
  if (long_prompt.size() < 300u) return {};
  std::vector<GoldenCase> cases;
  int i = 0;
  for (int len : {9, 37, 64, 101, 150, 203, 256, 300}) {
    GoldenCase c;
    c.prompt.assign(long_prompt.begin(), long_prompt.begin() + len);
    c.max_tokens = 6 + (i++ % 4) * 3;
    cases.push_back(std::move(c));
  }
  return cases;
}

// A greedy request for `c` that ignores end-of-sequence tokens.
inline RequestSpec GreedyRequest(const GoldenCase& c, std::shared_ptr<RecordingSink> sink) {
  RequestSpec s;
  s.prompt = c.prompt;
  s.sampling.temperature = 0;
  s.stop.max_tokens = c.max_tokens;
  s.stop.ignore_eos = true;
  s.sink = std::move(sink);
  return s;
}

// Fills every case's `want` from `reference`, one request at a time.
inline void FillWanted(Engine& reference, std::vector<GoldenCase>& cases, absl::Duration wait) {
  for (GoldenCase& c : cases) {
    auto sink = std::make_shared<RecordingSink>();
    ASSERT_TRUE(reference.Submit(GreedyRequest(c, sink)).ok());
    ASSERT_TRUE(sink->WaitFinished(wait));
    ASSERT_EQ(sink->outcome().finish, FinishReason::kLength) << sink->outcome().status;
    c.want = sink->tokens();
  }
}

// Every request is gone and every used KV page is held only by the prefix cache.
inline void ExpectEngineAtBaseline(Engine& e, absl::Duration wait) {
  ASSERT_TRUE(e.WaitIdle(wait));
  const EngineLoad l = e.load();
  EXPECT_EQ(l.running_prefill + l.running_decode + l.waiting, 0);
  EXPECT_EQ(l.kv_pages_used - l.kv_pages_cached, 0);
  EXPECT_EQ(l.kv_pages_used + l.kv_pages_free, e.model_info().kv_pages);
}

}  // namespace sieve::engine::testing

#endif  // SIEVE_ENGINE_TESTING_GOLDEN_CASES_H_
