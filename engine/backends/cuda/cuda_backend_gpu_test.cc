// The CUDA backend on a GPU (label `gpu`), against the CPU backend and the goldens:
//   - the operators of one layer on random weights, step by step through prefill, chunked
//     prefill mixed with decode, and pure decode, against CpuBackend (fast and simple attention);
//   - the embedded model's logits against CpuBackend and the fp32 transformers goldens within 2e-2
//     relative L2 error per position, and (when SIEVE_HF_BF16_LOGITS names the file that
//     scripts/transformers_bf16_logits.py wrote) against transformers in bf16 (see that test);
//   - greedy continuations against the goldens for 32 tokens, teacher-forced so that a
//     divergence is measured (margins) rather than cascading, and only near-ties may diverge;
//     then through the Engine, alone and batched, up to the first near-tie;
//   - batched steps against single-request steps;
//   - malformed calls and CUDA failures as Status values.
// Run from the repository root (SIEVE_SOURCE_DIR set by CTest). Numbers are printed as
// "[measure] ..." lines for the record.
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engine/backends/cpu_backend.h"
#include "engine/backends/cuda/cuda_backend.h"
#include "engine/serving/engine.h"
#include "engine/status_macros.h"
#include "kernels/cpu/half.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine_config.h"
#include "engine/model/safetensors.h"
#include "engine/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using ::testing::HasSubstr;

constexpr double kMaxRelError = 2e-2;

std::string ModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

nlohmann::json LoadGolden() {
  std::ifstream in(ModelDir() + "/golden.json");
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
}

std::vector<int32_t> Ids(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

double RelativeError(absl::Span<const float> got, absl::Span<const float> want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (double{got[i]} - want[i]) * (double{got[i]} - want[i]);
    den += double{want[i]} * want[i];
  }
  return std::sqrt(num / den);
}

std::unique_ptr<ModelRunner> Runner(const std::string& backend, int32_t page_size,
                                    int32_t max_step_tokens) {
  ModelRunnerOptions o = RunnerOptionsFor(EngineConfig());
  o.backend = backend;
  o.page_size = page_size;
  o.num_pages = 4096 / page_size * 4;
  o.max_step_tokens = max_step_tokens;
  o.max_step_logits = 8;
  auto r = ModelRunner::Load(ModelDir(), o);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? std::move(*r) : nullptr;
}

// Runs `ids` with the prefix [0, n - k) as prefill chunks of at most `chunk` tokens and the last
// k tokens one decode step each; returns the logits of the last k positions.
std::vector<float> LastLogits(ModelRunner& runner, const std::vector<int32_t>& ids, int k,
                              int chunk) {
  const int32_t ps = runner.options().page_size;
  std::vector<int32_t> pages;
  for (int32_t p = 0; p * ps < static_cast<int32_t>(ids.size()); ++p) pages.push_back(p);
  std::vector<float> out;
  const int n = static_cast<int>(ids.size());
  int done = 0;
  while (done < n) {
    const bool in_tail = done >= n - k;
    const int len = in_tail ? 1 : std::min(chunk, n - k - done);
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

// Argmax (ties to the lowest id) and the gap between the best and second-best logit.
std::pair<int32_t, float> ArgmaxAndMargin(absl::Span<const float> logits) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  }
  float second = -INFINITY;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (static_cast<int32_t>(i) != best) second = std::max(second, logits[i]);
  }
  return {best, logits[best] - second};
}

class CudaModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { golden_ = new nlohmann::json(LoadGolden()); }
  static void TearDownTestSuite() { delete golden_; }
  static nlohmann::json* golden_;
};
nlohmann::json* CudaModelTest::golden_ = nullptr;

TEST_F(CudaModelTest, LogitsMatchCpuBackendAndGoldens) {
  ASSERT_FALSE(golden_->is_discarded());
  auto file = SafetensorsFile::Open(ModelDir() + "/golden_logits.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  // Pages of 16 with prefill chunks of 64 (prefill kernel over cached pages, then decode), and
  // pages of 1 with the whole prefill in one step.
  for (auto [page_size, chunk] : {std::pair{16, 64}, std::pair{1, 4096}}) {
    auto cuda = Runner("cuda", page_size, 4096);
    auto cpu = Runner("cpu", page_size, 4096);
    ASSERT_NE(cuda, nullptr);
    ASSERT_NE(cpu, nullptr);
    EXPECT_EQ(cuda->backend_name(), "cuda");
    const int64_t vocab = cuda->config().vocab_size;
    double worst_cpu = 0, worst_golden = 0;
    int exact_ties = 0;  // positions whose two best logits are equal (fp32 logits: none)
    for (const auto& c : (*golden_)["logits"]) {
      const std::vector<int32_t> ids = Ids(c["ids"]);
      const int k = c["last_positions"];
      auto view = (*file)->Get(c["name"].get<std::string>());
      ASSERT_TRUE(view.ok()) << view.status();
      std::vector<float> want(view->numel());
      ASSERT_TRUE(CopyToFloat32(*view, absl::MakeSpan(want)).ok());
      const int tail = std::min<int>(k, static_cast<int>(ids.size()) - 1);
      const std::vector<float> got = LastLogits(*cuda, ids, tail, chunk);
      const std::vector<float> ref = LastLogits(*cpu, ids, tail, chunk);
      ASSERT_EQ(static_cast<int64_t>(got.size()), tail * vocab);
      ASSERT_EQ(ref.size(), got.size());
      for (int p = 0; p < tail; ++p) {
        auto g = absl::MakeConstSpan(got).subspan(p * vocab, vocab);
        auto r = absl::MakeConstSpan(ref).subspan(p * vocab, vocab);
        auto w = absl::MakeConstSpan(want).subspan((k - tail + p) * vocab, vocab);
        const double e_cpu = RelativeError(g, r), e_golden = RelativeError(g, w);
        worst_cpu = std::max(worst_cpu, e_cpu);
        worst_golden = std::max(worst_golden, e_golden);
        exact_ties += ArgmaxAndMargin(g).second == 0.0f;
        EXPECT_LT(e_cpu, kMaxRelError) << c["name"] << " position " << ids.size() - tail + p;
        EXPECT_LT(e_golden, kMaxRelError) << c["name"] << " position " << ids.size() - tail + p;
      }
    }
    EXPECT_EQ(exact_ties, 0);
    std::printf("[measure] page_size %d chunk %d: max rel L2 vs cpu backend %.3e, vs fp32 golden "
                "%.3e; exact top-2 ties %d\n", page_size, chunk, worst_cpu, worst_golden,
                exact_ties);
  }
}

// transformers in bf16 rounds at more points than this backend (the normalized hidden state
// before the norm weight, cos and sin, q * cos and rotate_half(q) * sin, silu(gate) before the
// product, and the logits themselves, which this backend returns in fp32), so it sits farther
// from fp32 than this backend does, and the two bf16 pipelines differ from each other by about
// their errors added in quadrature. Measured 2026-11-23 on an H100 with fp32 logits: this backend
// 1.79e-2 from the fp32 goldens at worst, transformers bf16 2.52e-2, the two 2.74e-2 apart (the
// long prompt; bf16 logits gave 2.75e-2, so their rounding was not what kept the two apart).
// 2026-12-04 on an H200, with the one-row GEMV (kernels/cuda/gemv.h) summing in another order:
// 1.85e-2, 2.52e-2 and 2.98e-2 (the same long prompt). An exact fp32 pipeline would itself be
// 2.52e-2 from transformers bf16 there, above the 2e-2. So the checks are: this backend is at most 0.8x as far from the fp32 goldens as transformers bf16
// is, and within 3e-2 of transformers bf16 at every position; the 2e-2 target is
// reported by the [measure] line.
TEST_F(CudaModelTest, LogitsMatchTransformersBf16) {
  const char* path = std::getenv("SIEVE_HF_BF16_LOGITS");
  if (path == nullptr || *path == '\0') {
    GTEST_SKIP() << "SIEVE_HF_BF16_LOGITS is not set (see scripts/transformers_bf16_logits.py)";
  }
  auto hf = SafetensorsFile::Open(path);
  ASSERT_TRUE(hf.ok()) << hf.status();
  auto fp32 = SafetensorsFile::Open(ModelDir() + "/golden_logits.safetensors");
  ASSERT_TRUE(fp32.ok()) << fp32.status();
  auto cuda = Runner("cuda", 16, 4096);
  ASSERT_NE(cuda, nullptr);
  const int64_t vocab = cuda->config().vocab_size;
  auto load = [](const SafetensorsFile& f, const std::string& name) {
    auto view = f.Get(name);
    EXPECT_TRUE(view.ok()) << view.status();
    std::vector<float> v(view.ok() ? view->numel() : 0);
    if (view.ok()) {
      EXPECT_TRUE(CopyToFloat32(*view, absl::MakeSpan(v)).ok());
    }
    return v;
  };
  double worst_hf = 0, worst_ours_fp32 = 0, worst_hf_fp32 = 0;
  for (const auto& c : (*golden_)["logits"]) {
    const std::vector<int32_t> ids = Ids(c["ids"]);
    const int k = c["last_positions"];
    const std::string name = c["name"];
    const std::vector<float> want = load(**hf, name), ref = load(**fp32, name);
    ASSERT_EQ(static_cast<int64_t>(want.size()), k * vocab);
    ASSERT_EQ(ref.size(), want.size());
    const int tail = std::min<int>(k, static_cast<int>(ids.size()) - 1);
    const std::vector<float> got = LastLogits(*cuda, ids, tail, 4096);
    ASSERT_EQ(static_cast<int64_t>(got.size()), tail * vocab);
    double prompt_hf = 0, prompt_ours = 0, prompt_hf_fp32 = 0;
    for (int p = 0; p < tail; ++p) {
      auto g = absl::MakeConstSpan(got).subspan(p * vocab, vocab);
      auto w = absl::MakeConstSpan(want).subspan((k - tail + p) * vocab, vocab);
      auto r = absl::MakeConstSpan(ref).subspan((k - tail + p) * vocab, vocab);
      const double e = RelativeError(g, w);
      prompt_hf = std::max(prompt_hf, e);
      prompt_ours = std::max(prompt_ours, RelativeError(g, r));
      prompt_hf_fp32 = std::max(prompt_hf_fp32, RelativeError(w, r));
      EXPECT_LT(e, 3e-2) << name << " position " << ids.size() - tail + p;
    }
    std::printf("[measure] %s: max rel L2 cuda vs transformers bf16 %.3e; vs fp32: cuda %.3e, "
                "transformers bf16 %.3e\n", name.c_str(), prompt_hf, prompt_ours, prompt_hf_fp32);
    worst_hf = std::max(worst_hf, prompt_hf);
    worst_ours_fp32 = std::max(worst_ours_fp32, prompt_ours);
    worst_hf_fp32 = std::max(worst_hf_fp32, prompt_hf_fp32);
  }
  EXPECT_LE(worst_ours_fp32, 0.8 * worst_hf_fp32);
  std::printf("[measure] max rel L2 vs transformers bf16: %.3e (target 2e-2); vs fp32 goldens: "
              "cuda %.3e, transformers bf16 %.3e\n", worst_hf, worst_ours_fp32, worst_hf_fp32);
}

// Where greedy decoding on the CUDA backend, fed the golden tokens, first picks another token.
struct Divergence {
  int step = 32;             // 32: none in the first 32 tokens
  int32_t cuda_token = -1;   // what the CUDA backend picked there
  float cuda_gap = 0;        // its logit of that token minus its logit of the golden token
  float fp32_margin = 0;     // the CPU backend's (fp32) top-2 margin there
};

// A divergence is a near-tie when the golden token was within two bf16 steps of the top at the
// logits' magnitude (0.125 for logits in [16, 32)) on the GPU, and within 0.1 of the runner-up
// in fp32: bf16 rounding of the hidden states and logits can then swap the order.
bool IsNearTie(const Divergence& d) { return d.cuda_gap <= 0.125f && d.fp32_margin < 0.1f; }

Divergence TeacherForced(ModelRunner& cuda, ModelRunner& cpu, std::vector<int32_t> ids,
                         const std::vector<int32_t>& want, float& smallest_margin) {
  const int64_t vocab = cuda.config().vocab_size;
  for (int i = 0; i < 32; ++i) {
    // The whole sequence each step: prefill chunks of 64, then the last token decoded.
    const std::vector<float> g = LastLogits(cuda, ids, 1, 64);
    EXPECT_EQ(static_cast<int64_t>(g.size()), vocab);
    if (static_cast<int64_t>(g.size()) != vocab) return Divergence{i};
    auto [best, margin] = ArgmaxAndMargin(g);
    smallest_margin = std::min(smallest_margin, margin);
    if (best != want[i]) {
      const std::vector<float> r = LastLogits(cpu, ids, 1, 64);
      return Divergence{i, best, g[best] - g[want[i]], ArgmaxAndMargin(r).second};
    }
    ids.push_back(want[i]);
  }
  return Divergence{};
}

// Greedy decoding fed the golden tokens: the CUDA argmax must be the golden token at every step
// of the first 32, except at a near-tie (reported with its margins).
TEST_F(CudaModelTest, GreedyTeacherForcedAgreesWithGoldens) {
  auto cuda = Runner("cuda", 16, 64);
  auto cpu = Runner("cpu", 16, 64);
  ASSERT_NE(cuda, nullptr);
  ASSERT_NE(cpu, nullptr);
  float smallest_margin = INFINITY;
  int prompt_index = 0;
  for (const auto& c : (*golden_)["greedy"]) {
    const std::vector<int32_t> want = Ids(c["output_ids"]);
    ASSERT_GE(want.size(), 32u);
    const Divergence d = TeacherForced(*cuda, *cpu, Ids(c["prompt_ids"]), want, smallest_margin);
    if (d.step < 32) {
      std::printf("[measure] greedy prompt %d: first differs at token %d: cuda %d, golden %d; "
                  "cuda logit gap %.4f, fp32 top-2 margin %.4f (%s)\n",
                  prompt_index, d.step, d.cuda_token, want[d.step], d.cuda_gap, d.fp32_margin,
                  IsNearTie(d) ? "near-tie" : "NOT a near-tie");
      EXPECT_TRUE(IsNearTie(d)) << "prompt " << prompt_index << " token " << d.step;
    } else {
      std::printf("[measure] greedy prompt %d: agrees for 32 tokens\n", prompt_index);
    }
    ++prompt_index;
  }
  std::printf("[measure] greedy: smallest cuda top-2 margin %.4f\n", smallest_margin);
}

// Collects one request's tokens; Wait() blocks until it finished.
class CollectingSink : public RequestSink {
 public:
  void OnTokens(const TokenDelta& delta) override {
    std::lock_guard<std::mutex> lock(mu_);
    tokens_.insert(tokens_.end(), delta.token_ids.begin(), delta.token_ids.end());
  }
  void OnFinish(const RequestOutcome&) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      finished_ = true;
    }
    cv_.notify_all();
  }
  std::vector<int32_t> Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return finished_; });
    return tokens_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int32_t> tokens_;
  bool finished_ = false;
};

// Submits greedy requests for `prompts` at once; returns their tokens in order.
std::vector<std::vector<int32_t>> Greedy(Engine& engine,
                                         const std::vector<std::vector<int32_t>>& prompts,
                                         const std::vector<int32_t>& max_tokens) {
  std::vector<std::shared_ptr<CollectingSink>> sinks;
  for (size_t i = 0; i < prompts.size(); ++i) {
    RequestSpec spec;
    spec.prompt = prompts[i];
    spec.sampling.temperature = 0.0f;
    spec.stop.max_tokens = max_tokens[i];
    sinks.push_back(std::make_shared<CollectingSink>());
    spec.sink = sinks.back();
    absl::StatusOr<RequestId> id = engine.Submit(std::move(spec));
    EXPECT_TRUE(id.ok()) << id.status();
    if (!id.ok()) return std::vector<std::vector<int32_t>>(prompts.size());
  }
  std::vector<std::vector<int32_t>> out;
  for (auto& sink : sinks) out.push_back(sink->Wait());
  return out;
}

// Free-running greedy decoding through the Engine on cuda, alone and batched with a long prompt:
// each continuation equals the golden one up to its first near-tie (where the teacher-forced run
// above diverges; all 32 tokens when there is none).
TEST_F(CudaModelTest, EngineGreedyAloneAndBatched) {
  auto cuda = Runner("cuda", 16, 64);
  auto cpu = Runner("cpu", 16, 64);
  ASSERT_NE(cuda, nullptr);
  ASSERT_NE(cpu, nullptr);
  std::vector<std::vector<int32_t>> prompts, want;
  std::vector<int> agree;  // tokens that must equal the golden ones
  float unused = INFINITY;
  for (const auto& c : (*golden_)["greedy"]) {
    prompts.push_back(Ids(c["prompt_ids"]));
    want.push_back(Ids(c["output_ids"]));
    const Divergence d = TeacherForced(*cuda, *cpu, prompts.back(), want.back(), unused);
    agree.push_back(IsNearTie(d) ? d.step : 32);
  }
  auto prefix = [](const std::vector<int32_t>& v, int n) {
    return std::vector<int32_t>(v.begin(), v.begin() + std::min<size_t>(n, v.size()));
  };
  EngineConfig config;
  config.model.directory = ModelDir();
  config.model.backend = "cuda";
  config.kv_cache.num_pages = 4096 / 16 * 4;
  config.scheduler.max_batch_tokens = 64;  // a small step budget forces chunked prefill
  config.scheduler.prefill_chunk_tokens = 64;
  auto engine = Engine::Create(config, nullptr);
  ASSERT_TRUE(engine.ok()) << engine.status();
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int32_t> alone = Greedy(**engine, {prompts[i]}, {32})[0];
    EXPECT_EQ(prefix(alone, agree[i]), prefix(want[i], agree[i])) << "prompt " << i << " alone";
  }
  std::vector<int32_t> max_tokens(prompts.size(), 32);
  prompts.insert(prompts.begin() + 1, Ids((*golden_)["logits"].back()["ids"]));
  max_tokens.insert(max_tokens.begin() + 1, 8);
  const std::vector<std::vector<int32_t>> batched = Greedy(**engine, prompts, max_tokens);
  const size_t at[3] = {0, 2, 3};
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(prefix(batched[at[i]], agree[i]), prefix(want[i], agree[i]))
        << "prompt " << i << " batched";
  }
  ASSERT_TRUE((*engine)->WaitIdle(absl::Seconds(60)));
  const EngineLoad load = (*engine)->load();
  EXPECT_EQ(load.kv_pages_used, load.kv_pages_cached);  // only the prefix cache holds pages
  // The same batch on two prefill and two decode workers (issue 11 item 3): chunks of one
  // prompt land on either prefill worker's stream, so each chunk's KV must be written before the
  // next chunk reads it on the other stream; the same tokens up to the first near-tie.
  config.pools.prefill_workers = 2;
  config.pools.decode_workers = 2;
  config.scheduler.max_batch_tokens = 128;
  config.scheduler.prefill_chunk_tokens = 32;
  auto workers = Engine::Create(config, nullptr);
  ASSERT_TRUE(workers.ok()) << workers.status();
  for (int rep = 0; rep < 2; ++rep) {
    const std::vector<std::vector<int32_t>> out = Greedy(**workers, prompts, max_tokens);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(prefix(out[at[i]], agree[i]), prefix(want[i], agree[i]))
          << "prompt " << i << " on two prefill workers, round " << rep;
    }
  }
  ASSERT_TRUE((*workers)->WaitIdle(absl::Seconds(60)));
  const EngineLoad wl = (*workers)->load();
  EXPECT_EQ(wl.kv_pages_used, wl.kv_pages_cached);
}

// Each sequence's logits are the same alone or batched with others of different lengths and
// phases, within bf16 noise (rel L2 < 7.5e-3, 5.3e-3 measured: the GEMMs of different row counts
// may take different cuBLASLt algorithms, and the decode split depends on the batch; decode steps
// run as CUDA-graph steps of buckets 1 and 4) and with the same argmax.
TEST_F(CudaModelTest, BatchedEqualsAlone) {
  auto r = Runner("cuda", 16, 256);
  ASSERT_NE(r, nullptr);
  ModelRunner& m = *r;
  const int64_t vocab = m.config().vocab_size;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(2, 4095);
  auto random_tokens = [&](int n) {
    std::vector<int32_t> v(n);
    for (int32_t& t : v) t = tok(rng);
    return v;
  };
  std::vector<std::vector<int32_t>> prompts = {random_tokens(5), random_tokens(37),
                                               random_tokens(16)};
  std::vector<std::vector<int32_t>> pages = {{0}, {5, 3, 9}, {7, 8}};
  double worst = 0;
  auto compare = [&](absl::Span<const float> got, absl::Span<const float> want,
                     const std::string& what) {
    const double e = RelativeError(got, want);
    worst = std::max(worst, e);
    EXPECT_LT(e, 7.5e-3) << what;
    EXPECT_EQ(ArgmaxAndMargin(got).first, ArgmaxAndMargin(want).first) << what;
  };
  std::vector<std::vector<float>> alone(3);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(m.Forward({SequenceStep{prompts[i], 0, pages[i], true}}, alone[i]).ok());
  }
  std::vector<SequenceStep> batch;
  for (int i = 0; i < 3; ++i) batch.push_back({prompts[i], 0, pages[i], true});
  std::vector<float> together;
  ASSERT_TRUE(m.Forward(batch, together).ok());
  ASSERT_EQ(together.size(), 3 * vocab);
  for (int i = 0; i < 3; ++i) {
    compare(absl::MakeConstSpan(together).subspan(i * vocab, vocab), alone[i],
            "prefill seq " + std::to_string(i));
  }
  // Decode tokens: each alone, then all three in one decode step.
  std::vector<int32_t> next = {42};
  std::vector<std::vector<float>> dec_alone(3);
  const int cached[3] = {5, 37, 16};
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(m.Forward({SequenceStep{next, cached[i], pages[i], true}}, dec_alone[i]).ok());
  }
  std::vector<SequenceStep> dec_batch;
  for (int i = 0; i < 3; ++i) dec_batch.push_back({next, cached[i], pages[i], true});
  std::vector<float> dec_together;
  ASSERT_TRUE(m.Forward(dec_batch, dec_together).ok());
  for (int i = 0; i < 3; ++i) {
    compare(absl::MakeConstSpan(dec_together).subspan(i * vocab, vocab), dec_alone[i],
            "decode seq " + std::to_string(i));
  }
  // A decode token next to a re-prefill of sequence 0 (one prefill-kernel step).
  std::vector<float> mixed;
  ASSERT_TRUE(m.Forward({SequenceStep{prompts[0], 0, pages[0], false},
                         SequenceStep{next, 37, pages[1], true}},
                        mixed)
                  .ok());
  ASSERT_EQ(mixed.size(), static_cast<size_t>(vocab));
  compare(mixed, dec_alone[1], "mixed step");
  std::printf("[measure] batched vs alone: max rel L2 %.3e\n", worst);
}

// --- One layer, operator by operator, against the CPU backend -------------------------------------

// A sequence's share of a hand-made step.
struct SeqSpec {
  int32_t num_new;
  int32_t num_cached;
  std::vector<int32_t> pages;
};

BatchLayout MakeLayout(const std::vector<SeqSpec>& seqs, int32_t page_size) {
  BatchLayout l;
  l.query_start = {0};
  size_t stride = 1;
  for (const SeqSpec& s : seqs) stride = std::max(stride, s.pages.size());
  l.page_table_stride = static_cast<int32_t>(stride);
  for (const SeqSpec& s : seqs) {
    for (int32_t t = 0; t < s.num_new; ++t) {
      const int32_t pos = s.num_cached + t;
      l.positions.push_back(pos);
      l.slots.push_back(int64_t{s.pages[pos / page_size]} * page_size + pos % page_size);
    }
    l.query_start.push_back(l.num_tokens());
    l.kv_lens.push_back(s.num_cached + s.num_new);
    l.page_table.insert(l.page_table.end(), s.pages.begin(), s.pages.end());
    l.page_table.resize(l.kv_lens.size() * stride, 0);
  }
  return l;
}

// Random weights of one layer (values exactly representable in bf16, so that both backends hold
// the same numbers) and the buffers of one backend.
struct LayerCase {
  static constexpr int64_t kHidden = 512, kInter = 704, kVocab = 300, kMaxTokens = 64;
  AttentionShape shape{8, 2, 128};
  int64_t q_cols() const { return int64_t{shape.num_q_heads} * shape.head_dim; }
  int64_t qkv_cols() const { return q_cols() + 2 * int64_t{shape.num_kv_heads} * shape.head_dim; }
  std::vector<std::vector<float>> host;  // embed, norm1, qkv, qkv_bias, o, norm2, gate_up, down

  explicit LayerCase(uint32_t seed) {
    std::mt19937 rng(seed);
    auto make = [&](int64_t n, float mean, float stddev) {
      std::normal_distribution<float> d(mean, stddev);
      std::vector<float> v(n);
      for (float& x : v) x = kernels::Bf16ToFloat(kernels::FloatToBf16(d(rng)));
      host.push_back(std::move(v));
    };
    make(kVocab * kHidden, 0.0f, 1.0f);
    make(kHidden, 1.0f, 0.1f);
    make(qkv_cols() * kHidden, 0.0f, 0.05f);
    make(qkv_cols(), 0.0f, 0.1f);
    make(kHidden * q_cols(), 0.0f, 0.03f);
    make(kHidden, 1.0f, 0.1f);
    make(2 * kInter * kHidden, 0.0f, 0.05f);
    make(kHidden * kInter, 0.0f, 0.04f);
  }
};

struct LayerOnBackend {
  Backend* b = nullptr;
  std::unique_ptr<BackendStream> stream;
  Tensor w[8];
  Tensor hidden, normed, qkv, q, attn, proj, gate_up, act, last;

  absl::Status Init(Backend& backend, const LayerCase& c) {
    b = &backend;
    const int64_t cols[8] = {c.kHidden, c.kHidden, c.kHidden, c.qkv_cols(),
                             c.q_cols(), c.kHidden, c.kHidden, c.kInter};
    for (int i = 0; i < 8; ++i) {
      TensorView v;
      v.name = "w" + std::to_string(i);
      v.dtype = DType::kF32;
      v.shape = {static_cast<int64_t>(c.host[i].size()) / cols[i], cols[i]};
      if (i == 1 || i == 3 || i == 5) v.shape = {static_cast<int64_t>(c.host[i].size())};
      v.bytes = absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(c.host[i].data()),
                                    c.host[i].size() * sizeof(float));
      SIEVE_ASSIGN_OR_RETURN(w[i], b->UploadWeight({v}, cols[i]));
    }
    SIEVE_RETURN_IF_ERROR(b->AllocateKvCache(1, 16, 16, c.shape));
    SIEVE_ASSIGN_OR_RETURN(stream, b->CreateStream({}));
    const int64_t m = c.kMaxTokens;
    SIEVE_ASSIGN_OR_RETURN(hidden, b->Allocate(m, c.kHidden));
    SIEVE_ASSIGN_OR_RETURN(normed, b->Allocate(m, c.kHidden));
    SIEVE_ASSIGN_OR_RETURN(qkv, b->Allocate(m, c.qkv_cols()));
    SIEVE_ASSIGN_OR_RETURN(q, b->Allocate(m, c.q_cols()));
    SIEVE_ASSIGN_OR_RETURN(attn, b->Allocate(m, c.q_cols()));
    SIEVE_ASSIGN_OR_RETURN(proj, b->Allocate(m, c.kHidden));
    SIEVE_ASSIGN_OR_RETURN(gate_up, b->Allocate(m, 2 * c.kInter));
    SIEVE_ASSIGN_OR_RETURN(act, b->Allocate(m, c.kInter));
    SIEVE_ASSIGN_OR_RETURN(last, b->Allocate(8, c.kHidden));
    return absl::OkStatus();
  }

  // One step of the layer; returns the attention output and the final norm of each sequence's
  // last token.
  absl::Status Step(const LayerCase& c, const BatchLayout& l, const std::vector<int32_t>& tokens,
                    const RopeTables& rope, std::vector<float>& attn_out,
                    std::vector<float>& last_out) {
    const int64_t n = l.num_tokens();
    BackendStream& st = *stream;
    SIEVE_RETURN_IF_ERROR(b->BeginStep(st, l));
    Tensor h = hidden.FirstRows(n), nm = normed.FirstRows(n), pr = proj.FirstRows(n);
    SIEVE_RETURN_IF_ERROR(b->Embed(st, tokens, w[0], h));
    SIEVE_RETURN_IF_ERROR(b->RmsNorm(st, h, w[1], 1e-5f, nm));
    SIEVE_RETURN_IF_ERROR(b->Linear(st, nm, w[2], w[3], qkv.FirstRows(n)));
    SIEVE_RETURN_IF_ERROR(b->RopeAndCacheKv(st, 0, qkv.FirstRows(n), c.shape, rope, q.FirstRows(n)));
    SIEVE_RETURN_IF_ERROR(b->Attention(st, 0, q.FirstRows(n), c.shape, 0.0883883f, AttentionPlan{},
                                        attn.FirstRows(n)));
    SIEVE_RETURN_IF_ERROR(b->Linear(st, attn.FirstRows(n), w[4], Tensor{}, pr));
    SIEVE_RETURN_IF_ERROR(b->AddRmsNorm(st, pr, h, w[5], 1e-5f, nm));
    SIEVE_RETURN_IF_ERROR(b->Linear(st, nm, w[6], Tensor{}, gate_up.FirstRows(n)));
    SIEVE_RETURN_IF_ERROR(b->SiluMul(st, gate_up.FirstRows(n), act.FirstRows(n)));
    SIEVE_RETURN_IF_ERROR(b->Linear(st, act.FirstRows(n), w[7], Tensor{}, pr));
    SIEVE_RETURN_IF_ERROR(b->AddRmsNorm(st, pr, h, w[1], 1e-5f, nm));
    std::vector<int32_t> rows;
    for (size_t s = 1; s < l.query_start.size(); ++s) rows.push_back(l.query_start[s] - 1);
    Tensor lr = last.FirstRows(static_cast<int64_t>(rows.size()));
    SIEVE_RETURN_IF_ERROR(b->GatherRows(st, nm, rows, lr));
    attn_out.assign(n * c.q_cols(), 0.0f);
    last_out.assign(rows.size() * c.kHidden, 0.0f);
    SIEVE_RETURN_IF_ERROR(b->CopyToHost(st, attn.FirstRows(n), absl::MakeSpan(attn_out)));
    return b->CopyToHost(st, lr, absl::MakeSpan(last_out));
  }
};

void CheckLayerAgainstCpu(CudaBackendOptions::Attention attention,
                          const std::vector<std::string>& want_paths) {
  LayerCase c(11);
  CudaBackendOptions o;
  o.attention = attention;
  auto cuda = CudaBackend::Create(o);
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  CpuBackend cpu(0);
  LayerOnBackend g, r;
  ASSERT_TRUE(g.Init(**cuda, c).ok());
  ASSERT_TRUE(r.Init(cpu, c).ok());
  RopeParams rp;
  rp.type = RopeParams::Type::kLlama3;
  rp.theta = 500000.0;
  rp.rotary_dim = 128;
  rp.factor = 8.0;
  auto rope = ComputeRopeTables(rp);
  ASSERT_TRUE(rope.ok()) << rope.status();
  // Prefill of two sequences; chunked prefill next to a decode; two decodes.
  const std::vector<std::vector<SeqSpec>> steps = {
      {{16, 0, {3, 1, 7}}, {20, 0, {0, 5}}},
      {{21, 16, {3, 1, 7}}, {1, 20, {0, 5}}},
      {{1, 37, {3, 1, 7}}, {1, 21, {0, 5}}}};
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> tok(0, LayerCase::kVocab - 1);
  for (size_t i = 0; i < steps.size(); ++i) {
    const BatchLayout l = MakeLayout(steps[i], 16);
    std::vector<int32_t> tokens(l.num_tokens());
    for (int32_t& t : tokens) t = tok(rng);
    std::vector<float> ga, gl, ra, rl;
    absl::Status st = g.Step(c, l, tokens, *rope, ga, gl);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_EQ(CudaBackend::PlannedAttention(*g.stream), want_paths[i]) << "step " << i;
    st = r.Step(c, l, tokens, *rope, ra, rl);
    ASSERT_TRUE(st.ok()) << st;
    const double ea = RelativeError(ga, ra), el = RelativeError(gl, rl);
    EXPECT_LT(ea, kMaxRelError) << "attention output, step " << i;
    EXPECT_LT(el, kMaxRelError) << "layer output, step " << i;
    std::printf("[measure] layer step %zu (%s): rel L2 attention %.3e, output %.3e\n", i,
                want_paths[i].c_str(), ea, el);
  }
}

TEST(CudaBackendTest, LayerMatchesCpuWithFastAttention) {
  CheckLayerAgainstCpu(CudaBackendOptions::Attention::kAuto, {"prefill", "prefill", "decode"});
}

TEST(CudaBackendTest, LayerMatchesCpuWithSimpleAttention) {
  CheckLayerAgainstCpu(CudaBackendOptions::Attention::kSimple, {"simple", "simple", "simple"});
}

TEST(CudaBackendTest, MalformedCallsAndCudaFailuresAreStatuses) {
  CudaBackendOptions bad;
  bad.device = 99;
  auto none = CudaBackend::Create(bad);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);

  auto b = CudaBackend::Create();
  ASSERT_TRUE(b.ok()) << b.status();
  CudaBackend& cuda = **b;
  // A device allocation that cannot succeed names the CUDA call, file and line.
  auto huge = cuda.Allocate(int64_t{1} << 40, 1 << 12);
  ASSERT_FALSE(huge.ok());
  EXPECT_THAT(huge.status().message(), HasSubstr("cudaMalloc"));
  EXPECT_THAT(huge.status().message(), HasSubstr("cuda_backend.cc:"));

  std::vector<float> w(10, 1.0f);
  TensorView v{"w", DType::kF32, {10}, absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(w.data()), 40)};
  EXPECT_EQ(cuda.UploadWeight({v}, 3).status().code(), absl::StatusCode::kInvalidArgument);
  auto table = cuda.UploadWeight({v}, 5);
  ASSERT_TRUE(table.ok()) << table.status();

  auto stream = cuda.CreateStream({});
  ASSERT_TRUE(stream.ok()) << stream.status();
  const BatchLayout l = MakeLayout({{2, 0, {0}}}, 16);
  EXPECT_EQ(cuda.BeginStep(**stream, l).code(), absl::StatusCode::kFailedPrecondition);  // no KV
  ASSERT_TRUE(cuda.AllocateKvCache(1, 4, 16, AttentionShape{2, 1, 64}).ok());
  auto out = cuda.Allocate(4, 5);
  ASSERT_TRUE(out.ok());
  const std::vector<int32_t> ids = {0, 1};
  EXPECT_THAT(cuda.Embed(**stream, ids, *table, out->FirstRows(2)).message(),
              HasSubstr("before BeginStep"));
  BatchLayout far = l;
  far.slots[1] = 64;  // one past the pool
  EXPECT_EQ(cuda.BeginStep(**stream, far).code(), absl::StatusCode::kInternal);
  ASSERT_TRUE(cuda.BeginStep(**stream, l).ok());
  const std::vector<int32_t> oov = {0, 2};
  EXPECT_EQ(cuda.Embed(**stream, oov, *table, out->FirstRows(2)).code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(cuda.Embed(**stream, ids, *table, out->FirstRows(2)).ok());
  std::vector<float> host(10);
  ASSERT_TRUE(cuda.CopyToHost(**stream, out->FirstRows(2), absl::MakeSpan(host)).ok());
  EXPECT_EQ(host, std::vector<float>(10, 1.0f));
  EXPECT_FALSE(cuda.CopyToHost(**stream, out->FirstRows(2), absl::MakeSpan(host).subspan(1)).ok());
}

TEST(CudaBackendTest, KvPagesRoundTripThroughHostMemory) {
  // Transfers between daemons (docs/disaggregation.md) copy whole pages, every layer's K then V.
  auto b = CudaBackend::Create();
  ASSERT_TRUE(b.ok()) << b.status();
  CudaBackend& cuda = **b;
  const AttentionShape shape{4, 2, 64};
  constexpr int32_t kLayers = 3, kPages = 8, kPageSize = 16;
  ASSERT_TRUE(cuda.AllocateKvCache(kLayers, kPages, kPageSize, shape).ok());
  const int64_t page_bytes = cuda.KvPageBytes(kLayers, kPageSize, shape);
  EXPECT_EQ(page_bytes, int64_t{2} * kLayers * kPageSize * 2 * 64 * 2);  // bf16
  const std::vector<int32_t> pages = {5, 1, 6};
  std::vector<uint8_t> in(pages.size() * page_bytes);
  std::mt19937 rng(3);
  for (uint8_t& x : in) x = static_cast<uint8_t>(rng());
  ASSERT_TRUE(cuda.WriteKvPages(pages, in).ok());
  std::vector<uint8_t> out(in.size());
  ASSERT_TRUE(cuda.ReadKvPages(pages, absl::MakeSpan(out)).ok());
  EXPECT_EQ(out, in);
  // One page at a time, in another order, reads the same bytes.
  std::vector<uint8_t> one(page_bytes);
  for (size_t i = 0; i < pages.size(); ++i) {
    ASSERT_TRUE(cuda.ReadKvPages({pages[i]}, absl::MakeSpan(one)).ok());
    EXPECT_TRUE(std::equal(one.begin(), one.end(), in.begin() + i * page_bytes)) << pages[i];
  }
  // Other pages are untouched (the pool starts zeroed).
  ASSERT_TRUE(cuda.ReadKvPages({2}, absl::MakeSpan(one)).ok());
  EXPECT_EQ(one, std::vector<uint8_t>(page_bytes, 0));
  EXPECT_EQ(cuda.ReadKvPages({kPages}, absl::MakeSpan(one)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda.WriteKvPages({0}, absl::MakeConstSpan(in).first(10)).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sieve::engine
