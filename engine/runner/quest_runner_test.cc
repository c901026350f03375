// The sparse decode seam through the runner with the embedded model: Quest page bounds follow
// every append (prefill chunks that start mid-page, decode tokens) on recycled pages that held
// another sequence's bounds, after a preemption recomputes a sequence on other pages, and when a
// second sequence continues from shared prefix pages (SPARSE_ATTENTION 6.4.3); the Quest policy
// reads a fraction of the keys, all of them under a per-request dense override, and decodes the
// same logits as dense when its budget covers the context.
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "engine/attention/attention_policy.h"
#include "engine/attention/quest_policy.h"
#include "engine/backends/cpu_backend.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine_config.h"
#include "engine/testing/sparse_decode_setup.h"
#include "kernels/cpu/half.h"
#include "kernels/sparse/quest.h"

namespace sieve::engine {
namespace {

constexpr int32_t kPage = 16;

std::unique_ptr<ModelRunner> QuestRunner() {
  ModelRunnerOptions o = testing::SparseDecodeRunnerOptions();
  o.quest_page_bounds = true;
  auto r = ModelRunner::Load(testing::EmbeddedModelDir(), o);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? std::move(*r) : nullptr;
}

std::vector<int32_t> RandomTokens(int n, uint32_t seed, int vocab) {
  return testing::RandomTokens(n, seed, 0, vocab - 1);
}

// Runs tokens [from, to) of `tokens` as one step over `pages`.
void Step(ModelWorker& w, const std::vector<int32_t>& tokens, int from, int to,
          const std::vector<int32_t>& pages, bool dense = false) {
  ASSERT_TRUE(testing::RunSequenceStep(w, tokens, from, to, pages, dense).ok());
}

// Every page of a `len`-token sequence on `pages` has the bounds recomputed from its keys.
void ExpectBoundsExact(const ModelRunner& r, const std::vector<int32_t>& pages, int len,
                       const std::string& what) {
  const auto& cpu = dynamic_cast<const CpuBackend&>(r.backend());
  const int32_t kvh = static_cast<int32_t>(r.config().num_key_value_heads);
  const int32_t d = static_cast<int32_t>(r.config().head_dim);
  std::vector<float> ref(2 * d), widened(2 * d);
  for (int32_t layer = 0; layer < r.config().num_hidden_layers; ++layer) {
    for (int j = 0; j * kPage < len; ++j) {
      for (int32_t g = 0; g < kvh; ++g) {
        kernels::QuestBoundsRef(cpu.k_cache(layer).data(), pages[j], g,
                                std::min(kPage, len - j * kPage), kvh, d, kPage, ref.data(),
                                cpu.kv_layout());
        if (cpu.page_bounds_bf16()) {  // the engine's default: Mx rounded up, Mn down
          for (int32_t c = 0; c < d; ++c) {
            ref[c] = kernels::Bf16ToFloat(kernels::Bf16RoundUp(ref[c]));
            ref[d + c] = kernels::Bf16ToFloat(kernels::Bf16RoundDown(ref[d + c]));
          }
        }
        const float* got = kernels::QuestPageBounds(cpu.page_bounds(layer).data(),
                                                    cpu.page_bounds_bf16(), pages[j], g, kvh, d,
                                                    widened.data());
        ASSERT_TRUE(std::equal(ref.begin(), ref.end(), got))
            << what << ": layer " << layer << " page " << j << " head " << g;
      }
    }
  }
}

TEST(QuestRunnerTest, PageBoundsFollowEveryAppend) {
  std::unique_ptr<ModelRunner> r = QuestRunner();
  ASSERT_NE(r, nullptr);
  // The engine keeps bfloat16 bounds on its fp32 cache (half the side pool; cpu_backend.h).
  EXPECT_TRUE(dynamic_cast<const CpuBackend&>(r->backend()).page_bounds_bf16());
  ModelWorker& w = r->default_worker();
  const int vocab = static_cast<int>(r->config().vocab_size);
  // Junk on pages 10..14 and 30..34 first: their bounds are stale when A gets them.
  const std::vector<int32_t> junk = RandomTokens(80, 1, vocab);
  Step(w, junk, 0, 80, {10, 11, 12, 13, 14});
  Step(w, junk, 0, 80, {30, 31, 32, 33, 34});
  const std::vector<int32_t> a = RandomTokens(75, 2, vocab);
  const std::vector<int32_t> pages_a = {10, 11, 12, 13, 14};
  int done = 0;
  for (int chunk : {7, 20, 30, 13}) {  // chunks start at 7, 27, 57: mid-page
    Step(w, a, done, done + chunk, pages_a);
    done += chunk;
    ExpectBoundsExact(*r, pages_a, done, "A chunk to " + std::to_string(done));
  }
  for (; done < 75; ++done) {  // decode tokens
    Step(w, a, done, done + 1, pages_a);
    ExpectBoundsExact(*r, pages_a, done + 1, "A decode to " + std::to_string(done + 1));
  }
  // Preemption by recompute: A again on pages that held junk.
  const std::vector<int32_t> pages_a2 = {30, 31, 32, 33, 34};
  Step(w, a, 0, 33, pages_a2);
  Step(w, a, 33, 75, pages_a2);
  ExpectBoundsExact(*r, pages_a2, 75, "A recomputed");
  // B shares A's first four (full) pages through the prefix cache and goes on in its own.
  const auto& cpu = dynamic_cast<const CpuBackend&>(r->backend());
  const std::vector<float> shared_before(cpu.page_bounds(3).begin(), cpu.page_bounds(3).end());
  std::vector<int32_t> b(a.begin(), a.begin() + 64);
  const std::vector<int32_t> tail = RandomTokens(30, 3, vocab);
  b.insert(b.end(), tail.begin(), tail.end());
  const std::vector<int32_t> pages_b = {30, 31, 32, 33, 20, 21};
  Step(w, b, 64, 85, pages_b);
  Step(w, b, 85, 86, pages_b);
  Step(w, b, 86, 94, pages_b);
  ExpectBoundsExact(*r, pages_b, 94, "B after the shared prefix");
  ExpectBoundsExact(*r, pages_a2, 64, "A's shared pages");
  const int64_t per_page = kernels::QuestRegionFloats(
      static_cast<int32_t>(r->config().head_dim), cpu.page_bounds_bf16()) *
      r->config().num_key_value_heads;
  for (int32_t page : {30, 31, 32, 33}) {
    EXPECT_TRUE(std::equal(shared_before.begin() + page * per_page,
                           shared_before.begin() + (page + 1) * per_page,
                           cpu.page_bounds(3).begin() + page * per_page))
        << "shared page " << page << " changed";
  }
}

// Decode one token of a 300-token context with `policy`; returns its logits.
std::vector<float> DecodeWith(ModelRunner& r, std::unique_ptr<AttentionPolicy> policy,
                              bool dense_override, DecodeAttentionStats* stats) {
  auto w = r.CreateWorker({}, std::move(policy));
  EXPECT_TRUE(w.ok()) << w.status();
  const std::vector<int32_t> t = RandomTokens(301, 9, static_cast<int>(r.config().vocab_size));
  std::vector<int32_t> pages(19);
  std::iota(pages.begin(), pages.end(), 40);
  Step(**w, t, 0, 150, pages);
  Step(**w, t, 150, 300, pages);
  (*w)->TakeDecodeStats();
  SequenceStep s;
  s.tokens = absl::MakeConstSpan(t).subspan(300, 1);
  s.num_cached = 300;
  s.pages = pages;
  s.want_logits = true;
  s.dense_decode = dense_override;
  std::vector<float> logits;
  EXPECT_TRUE((*w)->Forward({&s, 1}, logits).ok());
  *stats = (*w)->TakeDecodeStats();
  return logits;
}

TEST(QuestRunnerTest, QuestPolicyReadsAFractionAndCoveringBudgetEqualsDense) {
  std::unique_ptr<ModelRunner> r = QuestRunner();
  ASSERT_NE(r, nullptr);
  DecodePolicySettings s;
  s.sparse_min_tokens = 0;
  s.dense_layers = 1;
  s.token_budget = 4 * kPage;
  s.page_size = kPage;
  DecodeAttentionStats dense_stats, sparse_stats, override_stats, covering_stats;
  const std::vector<float> dense =
      DecodeWith(*r, std::make_unique<DenseAttentionPolicy>(), false, &dense_stats);
  EXPECT_EQ(dense_stats.dense_pairs, 0) << "the dense policy keeps no decode stats";
  auto quest = MakeQuestPolicy(s);
  ASSERT_TRUE(quest.ok()) << quest.status();
  const std::vector<float> sparse = DecodeWith(*r, std::move(*quest), false, &sparse_stats);
  // Layer 0 dense (301 keys x 4 heads), layers 1..3 read 4 pages of 16 per head.
  const int64_t heads = r->config().num_attention_heads;
  ASSERT_EQ(r->config().num_hidden_layers, 4);
  EXPECT_EQ(sparse_stats.dense_pairs, heads * r->config().num_hidden_layers * 301);
  EXPECT_EQ(sparse_stats.read_pairs, heads * (301 + 3 * (3 * kPage + 301 % kPage)));
  EXPECT_GT(sparse_stats.selection_seconds, 0);
  EXPECT_NE(sparse, dense);
  // The per-request override reads every key, and so does a budget covering the context.
  quest = MakeQuestPolicy(s);
  ASSERT_TRUE(quest.ok());
  EXPECT_EQ(DecodeWith(*r, std::move(*quest), true, &override_stats), dense);
  EXPECT_EQ(override_stats.read_pairs, override_stats.dense_pairs);
  s.token_budget = 19 * kPage;
  quest = MakeQuestPolicy(s);
  ASSERT_TRUE(quest.ok());
  EXPECT_EQ(DecodeWith(*r, std::move(*quest), false, &covering_stats), dense);
  EXPECT_EQ(covering_stats.read_pairs, covering_stats.dense_pairs);
}

TEST(QuestRunnerTest, BudgetBelowTwoPagesIsRejected) {
  DecodePolicySettings s;
  s.token_budget = 31;
  s.page_size = kPage;
  auto p = MakeQuestPolicy(s);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("attention.decode.token_budget"), std::string::npos);
}

}  // namespace
}  // namespace sieve::engine
