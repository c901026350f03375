// kv_cache.dtype bfloat16 on the cpu backend (keys and values rounded to bfloat16 as written,
// widened as read, fp32 arithmetic): the embedded model's logits stay within a derived
// tolerance of the fp32 cache's, the engine's greedy continuations of the golden prompts equal
// the fp32 ones wherever fp32's top-two margin leaves room for that error, and the sparse decode
// methods (whose side data read the stored keys) and the page copies of disaggregation run on it.
// The configuration checks are in engine_config_test.cc.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "engine/backends/cpu_backend.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine.h"
#include "engine/serving/engine_config.h"
#include "engine/testing/recording_sink.h"
#include "gtest/gtest.h"
#include "kernels/sparse/quest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

constexpr absl::Duration kWait = absl::Seconds(120);

// Tolerance on the relative L2 error of a position's logits, bf16 KV against fp32 KV (same
// weights, same fp32 arithmetic). Derivation: rounding to bfloat16 (8 significant bits) moves
// each stored K and V element by at most u = 2^-9 relative. A value error of u per element
// moves an attention output (a convex combination of V rows) by at most u relative; a key error
// moves each score q.k/sqrt(d) by at most u |q||k|/sqrt(d), and the embedded model's scores
// stay within a few units, so each softmax weight moves by about u relative: together about 2u
// on each layer's attention output. The residual stream adds those outputs to the embeddings and
// MLPs (which see the same relative error), and four layers accumulate at most 4 x 2u = 8u
// relative in the final hidden state if nothing cancels; the LM head is linear. 8u = 1.6e-2.
// (For scale: the cuda backend's all-bf16 path is held to 2e-2.)
constexpr double kMaxRelError = 8.0 / 512;

std::string ModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

nlohmann::json Golden() {
  std::ifstream in(ModelDir() + "/golden.json");
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str(), nullptr, false);
}

EngineConfig Config(const std::string& kv_dtype) {
  EngineConfig c;
  c.model.directory = ModelDir();
  c.model.name = "embedded";
  c.model.cpu_threads = 2;
  c.kv_cache.page_size_tokens = 16;
  c.kv_cache.num_pages = 256;
  c.kv_cache.dtype = kv_dtype;
  c.scheduler.max_batch_tokens = 256;
  c.scheduler.prefill_chunk_tokens = 64;
  return c;
}

std::unique_ptr<ModelRunner> Runner(const std::string& kv_dtype) {
  ModelRunnerOptions o = RunnerOptionsFor(Config(kv_dtype));
  o.num_pages = 256;
  o.max_step_logits = 8;
  auto r = ModelRunner::Load(ModelDir(), o);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? std::move(*r) : nullptr;
}

// The logits after each of the last k tokens of ids: the earlier tokens prefilled in chunks of
// 64, then one decode step per position (teacher forcing). [k, vocab].
std::vector<float> LastLogits(ModelRunner& runner, const std::vector<int32_t>& ids, int k) {
  const int32_t ps = runner.options().page_size;
  std::vector<int32_t> pages;
  for (int32_t p = 0; p * ps < static_cast<int32_t>(ids.size()); ++p) pages.push_back(p);
  std::vector<float> out;
  const int n = static_cast<int>(ids.size());
  for (int done = 0; done < n;) {
    const bool in_tail = done >= n - k;
    const int len = in_tail ? 1 : std::min(64, n - k - done);
    SequenceStep s;
    s.tokens = absl::MakeConstSpan(ids).subspan(done, len);
    s.num_cached = done;
    s.pages = pages;
    s.want_logits = in_tail;
    std::vector<float> logits;
    const absl::Status st = runner.Forward({s}, logits);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) return {};
    out.insert(out.end(), logits.begin(), logits.end());
    done += len;
  }
  return out;
}

double RelativeError(absl::Span<const float> got, absl::Span<const float> want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (double{got[i]} - want[i]) * (double{got[i]} - want[i]);
    den += double{want[i]} * want[i];
  }
  return std::sqrt(num / den);
}

int32_t Argmax(absl::Span<const float> x) {
  return static_cast<int32_t>(std::max_element(x.begin(), x.end()) - x.begin());
}

// The gap between the largest and second-largest entries.
float Margin(absl::Span<const float> x) {
  const int32_t best = Argmax(x);
  float second = -INFINITY;
  for (size_t i = 0; i < x.size(); ++i) {
    if (static_cast<int32_t>(i) != best) second = std::max(second, x[i]);
  }
  return x[best] - second;
}

float MaxAbsDiff(absl::Span<const float> a, absl::Span<const float> b) {
  float m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// Golden prompts + their fp32 greedy continuations (teacher-forced) and the long prompt's last
// 16 positions: every position's logits within kMaxRelError of the fp32 cache's.
TEST(KvCacheDtypeTest, Bf16LogitsWithinToleranceOfFp32) {
  const nlohmann::json golden = Golden();
  ASSERT_FALSE(golden.is_discarded());
  auto r32 = Runner("float32"), r16 = Runner("bfloat16");
  ASSERT_NE(r32, nullptr);
  ASSERT_NE(r16, nullptr);
  const int64_t vocab = r32->config().vocab_size;
  std::vector<std::pair<std::vector<int32_t>, int>> cases;  // (ids, positions checked)
  for (const auto& c : golden["greedy"]) {
    std::vector<int32_t> ids = c["prompt_ids"].get<std::vector<int32_t>>();
    const std::vector<int32_t> out = c["output_ids"].get<std::vector<int32_t>>();
    ids.insert(ids.end(), out.begin(), out.end() - 1);
    cases.push_back({ids, static_cast<int>(out.size())});
  }
  cases.push_back({golden["logits"].back()["ids"].get<std::vector<int32_t>>(), 16});
  double worst = 0;
  for (const auto& [ids, k] : cases) {
    const std::vector<float> a = LastLogits(*r32, ids, k), b = LastLogits(*r16, ids, k);
    ASSERT_EQ(a.size(), static_cast<size_t>(k * vocab));
    ASSERT_EQ(b.size(), a.size());
    bool all_same = true;
    for (int p = 0; p < k; ++p) {
      auto x = absl::MakeConstSpan(a).subspan(p * vocab, vocab);
      auto y = absl::MakeConstSpan(b).subspan(p * vocab, vocab);
      const double e = RelativeError(y, x);
      worst = std::max(worst, e);
      all_same = all_same && e == 0;
      EXPECT_LT(e, kMaxRelError) << ids.size() << "-token case, position " << ids.size() - k + p;
    }
    EXPECT_FALSE(all_same) << "bf16 KV gave the fp32 logits exactly: the cache is not bf16";
  }
  std::printf("[measure] bf16 vs fp32 KV: worst relative L2 logit error %.3e (tolerance %.3e)\n",
              worst, kMaxRelError);
}

// The engine's greedy continuation of each golden prompt with a bf16 cache equals the fp32 one
// (the golden output) at least up to the first position where fp32's top-two margin is at most
// twice the largest logit difference the bf16 cache makes there (teacher-forced): a smaller
// perturbation cannot change the argmax, so until then the tokens must agree.
TEST(KvCacheDtypeTest, Bf16EngineGreedyMatchesFp32WhereMarginsAllow) {
  const nlohmann::json golden = Golden();
  ASSERT_FALSE(golden.is_discarded());
  auto r32 = Runner("float32"), r16 = Runner("bfloat16");
  ASSERT_NE(r32, nullptr);
  ASSERT_NE(r16, nullptr);
  const int64_t vocab = r32->config().vocab_size;
  auto engine = Engine::Create(Config("bfloat16"), nullptr);
  ASSERT_TRUE(engine.ok()) << engine.status();
  int compared = 0, total = 0, leading_equal = 0;
  for (const auto& c : golden["greedy"]) {
    const std::vector<int32_t> prompt = c["prompt_ids"].get<std::vector<int32_t>>();
    const std::vector<int32_t> want = c["output_ids"].get<std::vector<int32_t>>();
    std::vector<int32_t> ids = prompt;
    ids.insert(ids.end(), want.begin(), want.end() - 1);
    const int k = static_cast<int>(want.size());
    const std::vector<float> a = LastLogits(*r32, ids, k), b = LastLogits(*r16, ids, k);
    ASSERT_EQ(a.size(), static_cast<size_t>(k * vocab));
    int safe = 0;  // leading positions where the argmax cannot move
    while (safe < k) {
      auto x = absl::MakeConstSpan(a).subspan(safe * vocab, vocab);
      auto y = absl::MakeConstSpan(b).subspan(safe * vocab, vocab);
      ASSERT_EQ(Argmax(x), want[safe]) << "the golden output is fp32's greedy choice";
      if (Margin(x) <= 2 * MaxAbsDiff(x, y)) break;
      ++safe;
    }
    auto sink = std::make_shared<testing::RecordingSink>();
    RequestSpec s;
    s.prompt = prompt;
    s.sampling.temperature = 0;
    s.stop.max_tokens = k;
    s.sink = sink;
    ASSERT_TRUE((*engine)->Submit(std::move(s)).ok());
    ASSERT_TRUE(sink->WaitFinished(kWait));
    const std::vector<int32_t> got = sink->tokens();
    ASSERT_EQ(got.size(), want.size());
    EXPECT_TRUE(std::equal(got.begin(), got.begin() + safe, want.begin()))
        << "bf16 KV changed a greedy token within the first " << safe << " positions";
    compared += safe;
    total += k;
    leading_equal += static_cast<int>(
        std::mismatch(got.begin(), got.end(), want.begin()).first - got.begin());
  }
  EXPECT_GT(compared, 0) << "no position had a margin to compare";
  std::printf("[measure] bf16 KV greedy: %d of %d golden tokens inside the margin, all equal; "
              "%d of %d equal before each prompt's first difference\n",
              compared, total, leading_equal, total);
}

// Quest and DoubleSparsity with a bf16 cache (their page bounds and labels read the stored keys)
// with a budget that covers every key give the bf16 dense output.
TEST(KvCacheDtypeTest, Bf16SparseDecodeWithCoveringBudgetEqualsDense) {
  const nlohmann::json golden = Golden();
  ASSERT_FALSE(golden.is_discarded());
  const std::vector<int32_t> prompt = golden["logits"].back()["ids"].get<std::vector<int32_t>>();
  auto run = [&](const EngineConfig& config) {
    auto engine = Engine::Create(config, nullptr);
    EXPECT_TRUE(engine.ok()) << engine.status();
    if (!engine.ok()) return std::vector<int32_t>();
    auto sink = std::make_shared<testing::RecordingSink>();
    RequestSpec s;
    s.prompt = prompt;
    s.sampling.temperature = 0;
    s.stop.max_tokens = 12;
    s.sink = sink;
    EXPECT_TRUE((*engine)->Submit(std::move(s)).ok());
    EXPECT_TRUE(sink->WaitFinished(kWait));
    EXPECT_TRUE(sink->outcome().status.ok()) << sink->outcome().status;
    return sink->tokens();
  };
  const std::vector<int32_t> dense = run(Config("bfloat16"));
  ASSERT_EQ(dense.size(), 12u);
  for (const std::string method : {"quest", "double_sparsity"}) {
    EngineConfig c = Config("bfloat16");
    c.attention.decode.method = method;
    c.attention.decode.sparse_min_tokens = 0;
    c.attention.decode.dense_layers = 1;
    c.attention.decode.token_budget = 4096;  // covers the whole context: equals dense
    if (method == "double_sparsity") c.attention.decode.double_sparsity.channels = 8;
    EXPECT_EQ(run(c), dense) << method;
  }
}

// With a bf16 cache the keys are stored as bfloat16 (every widened key has zero low 16 bits) and
// Quest's page bounds, kept current on every append (prefill chunks starting mid-page, then
// decode steps), equal the bounds recomputed from those stored keys, exactly. The bounds are
// bfloat16 themselves (quest.h bf16_bounds): the side data is half an fp32 cache's per page.
TEST(KvCacheDtypeTest, Bf16QuestBoundsAreThoseOfTheStoredKeys) {
  const nlohmann::json golden = Golden();
  ASSERT_FALSE(golden.is_discarded());
  const std::vector<int32_t> ids = golden["logits"].back()["ids"].get<std::vector<int32_t>>();
  ModelRunnerOptions o = RunnerOptionsFor(Config("bfloat16"));
  o.num_pages = 256;
  o.max_step_logits = 8;
  o.quest_page_bounds = true;
  auto r = ModelRunner::Load(ModelDir(), o);
  ASSERT_TRUE(r.ok()) << r.status();
  const int32_t ps = o.page_size;
  std::vector<int32_t> pages;  // scattered: page j of the sequence is page 3j + 1 of the pool
  for (int32_t p = 0; p * ps < static_cast<int32_t>(ids.size()); ++p) pages.push_back(3 * p + 1);
  const int n = static_cast<int>(ids.size());
  for (int done = 0; done < n;) {
    const int len = done < n - 5 ? std::min(50, n - 5 - done) : 1;  // 50: chunks start mid-page
    SequenceStep s;
    s.tokens = absl::MakeConstSpan(ids).subspan(done, len);
    s.num_cached = done;
    s.pages = pages;
    s.want_logits = done + len == n;
    std::vector<float> unused;
    ASSERT_TRUE((*r)->Forward({s}, unused).ok());
    done += len;
  }
  const auto& cpu = dynamic_cast<const CpuBackend&>((*r)->backend());
  ASSERT_EQ(cpu.kv_dtype(), kernels::KvDtype::kBfloat16);
  ASSERT_TRUE(cpu.page_bounds_bf16());
  const int32_t kvh = static_cast<int32_t>((*r)->config().num_key_value_heads);
  const int32_t d = static_cast<int32_t>((*r)->config().head_dim);
  const int32_t layers = static_cast<int32_t>((*r)->config().num_hidden_layers);
  // 2 bytes per bound: max and min per channel, KV head and layer.
  EXPECT_EQ((*r)->side_data_bytes_per_page(), int64_t{layers} * kvh * 2 * d * 2);
  EXPECT_EQ(cpu.page_bounds(0).size(), size_t{256} * kvh * d);  // 256 pages of 2d bf16 values
  std::vector<float> ref(2 * d), widened(2 * d);
  for (int32_t layer = 0; layer < (*r)->config().num_hidden_layers; ++layer) {
    const std::vector<float> keys = cpu.KeysAsFloat(layer);
    int nonzero = 0;
    for (const float k : keys) {
      uint32_t u;
      std::memcpy(&u, &k, sizeof u);
      ASSERT_EQ(u & 0xffffu, 0u) << "layer " << layer << ": a key that is not a bfloat16";
      nonzero += k != 0.0f;
    }
    EXPECT_GT(nonzero, 0) << "layer " << layer << ": no key written";
    for (size_t j = 0; j < pages.size(); ++j) {
      const int32_t valid = std::min<int32_t>(ps, n - static_cast<int32_t>(j) * ps);
      for (int32_t g = 0; g < kvh; ++g) {
        kernels::QuestBoundsRef(keys.data(), pages[j], g, valid, kvh, d, ps, ref.data(),
                                cpu.kv_layout());
        const float* got = kernels::QuestPageBounds(cpu.page_bounds(layer).data(),
                                                    /*bf16_bounds=*/true, pages[j], g, kvh, d,
                                                    widened.data());
        ASSERT_TRUE(std::equal(ref.begin(), ref.end(), got))
            << "layer " << layer << " page " << j << " head " << g;
      }
    }
  }
}

// A bf16 cache's pages are half an fp32 cache's bytes; copied out of one runner and into
// another (ReadKvPages / WriteKvPages: what disaggregation and page imports move), the next
// decode step's logits are bitwise those of the runner that prefilled them.
TEST(KvCacheDtypeTest, Bf16PagesCopyBetweenRunners) {
  const nlohmann::json golden = Golden();
  ASSERT_FALSE(golden.is_discarded());
  const std::vector<int32_t> ids = golden["logits"].back()["ids"].get<std::vector<int32_t>>();
  auto r32 = Runner("float32"), a = Runner("bfloat16"), b = Runner("bfloat16");
  ASSERT_NE(r32, nullptr);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(2 * a->kv_page_bytes(), r32->kv_page_bytes());
  const int n = static_cast<int>(ids.size()) - 1;  // prefilled; the last token decodes
  const int32_t ps = a->options().page_size;
  std::vector<int32_t> pages;
  for (int32_t p = 0; p * ps < n + 1; ++p) pages.push_back(p);
  for (int done = 0; done < n; done += 64) {
    SequenceStep s;
    s.tokens = absl::MakeConstSpan(ids).subspan(done, std::min(64, n - done));
    s.num_cached = done;
    s.pages = pages;
    std::vector<float> unused;
    ASSERT_TRUE(a->Forward({s}, unused).ok());
  }
  const std::vector<int32_t> full(pages.begin(), pages.begin() + (n + ps - 1) / ps);
  std::vector<uint8_t> bytes(full.size() * a->kv_page_bytes());
  ASSERT_TRUE(a->ReadKvPages(full, absl::MakeSpan(bytes)).ok());
  ASSERT_TRUE(b->WriteKvPages(full, bytes).ok());
  std::vector<float> la, lb;
  for (auto [runner, logits] : {std::pair{a.get(), &la}, std::pair{b.get(), &lb}}) {
    SequenceStep s;
    s.tokens = absl::MakeConstSpan(ids).subspan(n, 1);
    s.num_cached = n;
    s.pages = pages;
    s.want_logits = true;
    ASSERT_TRUE(runner->Forward({s}, *logits).ok());
  }
  EXPECT_EQ(la, lb);
}

}  // namespace
}  // namespace sieve::engine
