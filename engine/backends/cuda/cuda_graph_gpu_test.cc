// CUDA-graph decode steps on a GPU (label `gpu`):
//   - the backend's graph-step calls: eager, record, replay with new inputs (checked against
//     host arithmetic), misuse as Status values, abort of a recording, the plan's KV rounding;
//   - on the embedded model, graph steps against eager steps of the same decode step (same
//     weights, same KV) for batches of 1, 3 and 8 sequences (padded to buckets 1, 4, 8) whose
//     contexts grow across page boundaries, and free-running greedy decoding with graphs on and
//     off giving the same tokens;
//   - padding rows never touch the KV of other sequences (a bystander's logits are unchanged
//     after many padded graph steps, its pages next to the scratch page);
//   - when recordings are made, replayed and replaced.
// Run from the repository root (SIEVE_SOURCE_DIR set by CTest). "[measure]" lines are for the
// record.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "engine/backends/cuda/cuda_backend.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine_config.h"
#include "engine/status_macros.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/half.h"

namespace sieve::engine {
namespace {

using ::testing::HasSubstr;

std::string ModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
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

// Argmax (ties to the lowest id) and the gap to the runner-up.
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

std::unique_ptr<ModelRunner> Runner(bool graphs, int32_t num_pages = 256) {
  ModelRunnerOptions o = RunnerOptionsFor(EngineConfig());
  o.backend = "cuda";
  o.page_size = 16;
  o.num_pages = num_pages;
  o.max_step_tokens = 512;
  o.max_step_logits = 8;
  o.cuda_graphs = graphs;
  auto r = ModelRunner::Load(ModelDir(), o);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? std::move(*r) : nullptr;
}

// A sequence of a test: its tokens so far and the pages that hold them (and room to grow).
struct Seq {
  std::vector<int32_t> ids;
  std::vector<int32_t> pages;
};

// `n` sequences with random prompts of the given lengths, each with distinct pages drawn from a
// shuffled pool (never `avoid`), enough for `room` more tokens.
std::vector<Seq> MakeSeqs(const std::vector<int>& lens, int room, int32_t num_pages,
                          std::mt19937& rng, const std::vector<int32_t>& avoid = {}) {
  std::vector<int32_t> pool(num_pages);
  std::iota(pool.begin(), pool.end(), 0);
  pool.erase(std::remove_if(pool.begin(), pool.end(),
                            [&](int32_t p) {
                              return std::find(avoid.begin(), avoid.end(), p) != avoid.end();
                            }),
             pool.end());
  std::shuffle(pool.begin(), pool.end(), rng);
  std::uniform_int_distribution<int32_t> tok(2, 4095);
  std::vector<Seq> seqs;
  size_t next = 0;
  for (int len : lens) {
    Seq s;
    for (int i = 0; i < len; ++i) s.ids.push_back(tok(rng));
    const int pages = (len + room + 15) / 16;
    for (int i = 0; i < pages; ++i) s.pages.push_back(pool.at(next++));
    seqs.push_back(std::move(s));
  }
  return seqs;
}

// Prefills every sequence (one multi-token step: the eager path) and returns each one's last
// logits.
std::vector<float> Prefill(ModelRunner& m, const std::vector<Seq>& seqs) {
  std::vector<SequenceStep> batch;
  for (const Seq& s : seqs) batch.push_back({s.ids, 0, s.pages, true});
  std::vector<float> logits;
  const absl::Status st = m.Forward(batch, logits);
  EXPECT_TRUE(st.ok()) << st;
  return logits;
}

// One decode step of every sequence with `next` as its new tokens; the logits of each.
std::vector<float> Decode(ModelRunner& m, const std::vector<Seq>& seqs,
                          const std::vector<int32_t>& next) {
  std::vector<SequenceStep> batch;
  for (size_t i = 0; i < seqs.size(); ++i) {
    batch.push_back({absl::MakeConstSpan(next).subspan(i, 1),
                     static_cast<int32_t>(seqs[i].ids.size()), seqs[i].pages, true});
  }
  std::vector<float> logits;
  const absl::Status st = m.Forward(batch, logits);
  EXPECT_TRUE(st.ok()) << st;
  return logits;
}

// --- The backend's graph-step calls ----------------------------------------------------------------

// A one-layer "model" on the backend: embedding rows of `cols`, logits = embedding * table^T.
struct TinyGraph {
  static constexpr int64_t kRows = 37, kCols = 64;
  std::unique_ptr<CudaBackend> b;
  std::unique_ptr<BackendStream> stream;
  std::vector<float> host;  // [kRows, kCols], bf16-exact
  Tensor table, x;

  absl::Status Init() {
    SIEVE_ASSIGN_OR_RETURN(b, CudaBackend::Create());
    std::mt19937 rng(3);
    std::normal_distribution<float> d(0.0f, 1.0f);
    host.resize(kRows * kCols);
    for (float& v : host) v = kernels::Bf16ToFloat(kernels::FloatToBf16(d(rng)));
    TensorView v{"table", DType::kF32, {kRows, kCols},
                 absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(host.data()),
                                     host.size() * sizeof(float))};
    SIEVE_ASSIGN_OR_RETURN(table, b->UploadWeight({v}, kCols));
    SIEVE_ASSIGN_OR_RETURN(x, b->Allocate(8, kCols));
    SIEVE_RETURN_IF_ERROR(b->AllocateKvCache(1, 8, 16, AttentionShape{2, 1, 64}));
    SIEVE_ASSIGN_OR_RETURN(stream, b->CreateStream({}));
    return absl::OkStatus();
  }

  // A decode layout of `n` sequences, sequence i with i + 1 tokens in page i.
  static BatchLayout Layout(int32_t n) {
    BatchLayout l;
    l.page_table_stride = 1;
    l.query_start = {0};
    for (int32_t i = 0; i < n; ++i) {
      l.positions.push_back(i);
      l.slots.push_back(int64_t{i} * 16 + i);
      l.kv_lens.push_back(i + 1);
      l.page_table.push_back(i);
      l.query_start.push_back(i + 1);
    }
    return l;
  }

  // One graph step over `tokens`; returns its mode and the logits in `out`.
  absl::StatusOr<StepGraphMode> Step(const BatchLayout& l, const std::vector<int32_t>& tokens,
                                     std::vector<float>& out) {
    SIEVE_ASSIGN_OR_RETURN(StepGraphMode mode, b->BeginGraphStep(*stream, l, tokens));
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (mode != StepGraphMode::kReplay) {
      absl::Status st = b->Embed(*stream, tokens, table, x.FirstRows(n));
      if (st.ok()) st = b->GraphLogits(*stream, x.FirstRows(n), table);
      if (!st.ok()) {
        b->AbortGraphStep(*stream);
        return st;
      }
    }
    out.assign(n * kRows, NAN);
    SIEVE_RETURN_IF_ERROR(b->EndGraphStep(*stream, absl::MakeSpan(out)));
    return mode;
  }

  // Largest |got - table[tokens] . table^T| over all logits.
  double MaxError(const std::vector<int32_t>& tokens, const std::vector<float>& got) const {
    double worst = 0;
    for (size_t i = 0; i < tokens.size(); ++i) {
      for (int64_t v = 0; v < kRows; ++v) {
        double want = 0;
        for (int64_t c = 0; c < kCols; ++c) {
          want += double{host[tokens[i] * kCols + c]} * host[v * kCols + c];
        }
        const float g = got[i * kRows + v];
        worst = std::max(worst, std::isfinite(g) ? std::abs(g - want) : INFINITY);
      }
    }
    return worst;
  }
};

TEST(CudaGraphStepTest, EagerRecordReplayWithNewInputs) {
  TinyGraph t;
  ASSERT_TRUE(t.Init().ok());
  const BatchLayout l = TinyGraph::Layout(3);
  std::mt19937 rng(9);
  std::uniform_int_distribution<int32_t> tok(0, TinyGraph::kRows - 1);
  const StepGraphMode want[5] = {StepGraphMode::kEager, StepGraphMode::kRecord,
                                 StepGraphMode::kReplay, StepGraphMode::kReplay,
                                 StepGraphMode::kReplay};
  for (int step = 0; step < 5; ++step) {
    std::vector<int32_t> tokens = {tok(rng), tok(rng), tok(rng)};
    std::vector<float> out;
    auto mode = t.Step(l, tokens, out);
    ASSERT_TRUE(mode.ok()) << mode.status();
    EXPECT_EQ(*mode, want[step]) << "step " << step;
    // fp32 sums of bf16 products: only the order of additions differs.
    EXPECT_LT(t.MaxError(tokens, out), 1e-3) << "step " << step;
  }
  // Only the first two rows' logits: a shorter copy.
  std::vector<int32_t> tokens = {5, 6, 7};
  ASSERT_TRUE(t.b->BeginGraphStep(*t.stream, l, tokens).ok());
  std::vector<float> two(2 * TinyGraph::kRows, NAN);
  ASSERT_TRUE(t.b->EndGraphStep(*t.stream, absl::MakeSpan(two)).ok());
  EXPECT_LT(t.MaxError({5, 6}, two), 1e-3);
  const StepGraphStats stats = t.b->GraphStats(*t.stream);
  EXPECT_EQ(stats.eager_steps, 1);
  EXPECT_EQ(stats.recorded_steps, 1);
  EXPECT_EQ(stats.replayed_steps, 4);
  EXPECT_EQ(stats.live_recordings, 1);
  EXPECT_GT(stats.record_seconds, 0.0);
  // Another sequence count has its own recording; the first one stays.
  std::vector<float> out;
  for (int step = 0; step < 3; ++step) {
    std::vector<int32_t> four = {tok(rng), tok(rng), tok(rng), tok(rng)};
    auto mode = t.Step(TinyGraph::Layout(4), four, out);
    ASSERT_TRUE(mode.ok()) << mode.status();
    EXPECT_LT(t.MaxError(four, out), 1e-3);
  }
  EXPECT_EQ(t.b->GraphStats(*t.stream).live_recordings, 2);
  auto mode = t.Step(l, {1, 2, 3}, out);
  ASSERT_TRUE(mode.ok()) << mode.status();
  EXPECT_EQ(*mode, StepGraphMode::kReplay);
  EXPECT_LT(t.MaxError({1, 2, 3}, out), 1e-3);
}

TEST(CudaGraphStepTest, MisuseIsStatusAndAbortDropsTheRecording) {
  TinyGraph t;
  ASSERT_TRUE(t.Init().ok());
  BackendStream& st = *t.stream;
  CudaBackend& b = *t.b;
  const BatchLayout l = TinyGraph::Layout(2);
  std::vector<int32_t> tokens = {1, 2};
  std::vector<float> out(2 * TinyGraph::kRows);
  EXPECT_EQ(b.EndGraphStep(st, absl::MakeSpan(out)).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(b.GraphLogits(st, t.x.FirstRows(2), t.table).code(),
            absl::StatusCode::kFailedPrecondition);
  const std::vector<int32_t> three = {1, 2, 3};
  EXPECT_EQ(b.BeginGraphStep(st, l, three).status().code(), absl::StatusCode::kInvalidArgument);
  BatchLayout prefill = l;  // sequence 1 with two query tokens
  prefill.positions = {0, 0, 1};
  prefill.slots = {0, 16, 17};
  prefill.kv_lens = {1, 2};
  prefill.query_start = {0, 1, 3};
  EXPECT_EQ(b.BeginGraphStep(st, prefill, three).status().code(),
            absl::StatusCode::kInvalidArgument);
  BatchLayout far = l;
  far.slots[1] = 8 * 16;  // past the pool
  EXPECT_FALSE(b.BeginGraphStep(st, far, tokens).ok());
  const std::vector<int32_t> negative = {1, -1};
  EXPECT_EQ(b.BeginGraphStep(st, l, negative).status().code(), absl::StatusCode::kInvalidArgument);

  // Inside a step: what cannot be recorded is refused.
  auto mode = b.BeginGraphStep(st, l, tokens);
  ASSERT_TRUE(mode.ok()) << mode.status();
  EXPECT_EQ(*mode, StepGraphMode::kEager);
  EXPECT_EQ(b.BeginGraphStep(st, l, tokens).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(b.BeginStep(st, l).code(), absl::StatusCode::kFailedPrecondition);
  const std::vector<int32_t> copy = tokens;  // same ids, other memory
  EXPECT_THAT(b.Embed(st, copy, t.table, t.x.FirstRows(2)).message(),
              HasSubstr("tokens it was begun with"));
  EXPECT_EQ(b.GatherRows(st, t.x, {0, 1}, t.x.FirstRows(2)).code(),
            absl::StatusCode::kFailedPrecondition);
  std::vector<float> host(2 * TinyGraph::kCols);
  EXPECT_EQ(b.CopyToHost(st, t.x.FirstRows(2), absl::MakeSpan(host)).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(b.Logits(st, t.x.FirstRows(2), t.table, absl::MakeSpan(out)).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(b.GraphLogits(st, t.x.FirstRows(3), t.table).code(), absl::StatusCode::kInternal);
  ASSERT_TRUE(b.Embed(st, tokens, t.table, t.x.FirstRows(2)).ok());
  ASSERT_TRUE(b.GraphLogits(st, t.x.FirstRows(2), t.table).ok());
  std::vector<float> too_many(3 * TinyGraph::kRows);
  EXPECT_EQ(b.EndGraphStep(st, absl::MakeSpan(too_many)).code(), absl::StatusCode::kInternal);

  // The second step records; aborting it leaves no recording, and the next step is eager again.
  mode = b.BeginGraphStep(st, l, tokens);
  ASSERT_TRUE(mode.ok()) << mode.status();
  EXPECT_EQ(*mode, StepGraphMode::kRecord);
  ASSERT_TRUE(b.Embed(st, tokens, t.table, t.x.FirstRows(2)).ok());
  b.AbortGraphStep(st);
  EXPECT_EQ(b.GraphStats(st).live_recordings, 0);
  auto again = t.Step(l, tokens, out);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, StepGraphMode::kEager);
  EXPECT_LT(t.MaxError(tokens, out), 1e-3);
  // The stream still runs eager steps and their fp32 logits.
  ASSERT_TRUE(b.BeginStep(st, l).ok());
  ASSERT_TRUE(b.Embed(st, tokens, t.table, t.x.FirstRows(2)).ok());
  ASSERT_TRUE(b.Logits(st, t.x.FirstRows(2), t.table, absl::MakeSpan(out)).ok());
  EXPECT_LT(t.MaxError(tokens, out), 1e-3);
  EXPECT_FALSE(b.Logits(st, t.x.FirstRows(2), t.table, absl::MakeSpan(out).subspan(1)).ok());
}

TEST(CudaGraphStepTest, PlanKvLengthIsTheTileOrRoundedUpByAtMostAThirtySecond) {
  auto exact = CudaBackend::Create();  // default: the exact plan (tile granularity)
  ASSERT_TRUE(exact.ok()) << exact.status();
  EXPECT_EQ((*exact)->GraphPlanKvLen(1), 64);
  EXPECT_EQ((*exact)->GraphPlanKvLen(65), 128);
  EXPECT_EQ((*exact)->GraphPlanKvLen(4097), 4160);
  EXPECT_EQ((*exact)->GraphPlanKvLen(131073), 131136);
  CudaBackendOptions o;
  o.graph_kv_quantum_shift = 5;
  auto b = CudaBackend::Create(o);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->GraphPlanKvLen(1), 64);
  EXPECT_EQ((*b)->GraphPlanKvLen(64), 64);
  EXPECT_EQ((*b)->GraphPlanKvLen(65), 128);
  EXPECT_EQ((*b)->GraphPlanKvLen(1000), 1024);
  EXPECT_EQ((*b)->GraphPlanKvLen(4097), 4224);     // quantum 128
  EXPECT_EQ((*b)->GraphPlanKvLen(32769), 33792);   // quantum 1024
  EXPECT_EQ((*b)->GraphPlanKvLen(131073), 135168);  // quantum 4096
  for (int32_t len : {100, 777, 5000, 65537, 1 << 20}) {
    const int32_t r = (*b)->GraphPlanKvLen(len);
    EXPECT_GE(r, len);
    EXPECT_LE(r - len, std::max(64, len / 32)) << len;
  }
}

// Copies to the host larger than one 2 MiB chunk go through the chunked pipeline: every element
// arrives, exactly for CopyToHost, to fp32 rounding for Logits.
TEST(CudaGraphStepTest, LargeHostCopiesArriveWhole) {
  auto b = CudaBackend::Create();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_TRUE((*b)->AllocateKvCache(1, 4, 16, AttentionShape{2, 1, 64}).ok());
  auto stream = (*b)->CreateStream({});
  ASSERT_TRUE(stream.ok()) << stream.status();
  std::mt19937 rng(12);
  std::normal_distribution<float> d(0.0f, 1.0f);
  auto upload = [&](int64_t rows, int64_t cols, std::vector<float>& host) {
    host.resize(rows * cols);
    for (float& v : host) v = kernels::Bf16ToFloat(kernels::FloatToBf16(d(rng)));
    TensorView v{"t", DType::kF32, {rows, cols},
                 absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(host.data()),
                                     host.size() * sizeof(float))};
    return (*b)->UploadWeight({v}, cols);
  };
  std::vector<float> big_host, x_host, w_host;
  auto big = upload(1100, 1024, big_host);  // 1.1M floats: 3 chunks
  auto x = upload(200, 64, x_host);
  auto w = upload(3001, 64, w_host);       // logits 600200 floats: 2 chunks
  ASSERT_TRUE(big.ok() && x.ok() && w.ok());
  std::vector<float> got(big_host.size(), NAN);
  ASSERT_TRUE((*b)->CopyToHost(**stream, *big, absl::MakeSpan(got)).ok());
  EXPECT_EQ(got, big_host);
  std::vector<float> logits(200 * 3001, NAN);
  ASSERT_TRUE((*b)->Logits(**stream, *x, *w, absl::MakeSpan(logits)).ok());
  double worst = 0;
  for (int64_t r = 0; r < 200; r += 7) {
    for (int64_t v = 0; v < 3001; ++v) {
      double want = 0;
      for (int64_t c = 0; c < 64; ++c) want += double{x_host[r * 64 + c]} * w_host[v * 64 + c];
      const float g = logits[r * 3001 + v];
      worst = std::max(worst, std::isfinite(g) ? std::abs(g - want) : INFINITY);
    }
  }
  EXPECT_LT(worst, 1e-3);
  EXPECT_TRUE(std::all_of(logits.begin(), logits.end(), [](float v) { return std::isfinite(v); }));
}

// --- The model -----------------------------------------------------------------------------------

// Each decode step runs eagerly, then again as a graph step over the same KV (it rewrites the
// same slots); the two agree within bf16 noise (different decode split and GEMM row count) and
// pick the same token except at a near-tie. Contexts grow across page boundaries (pages of 16),
// so strides and decode plans change and recordings are replaced.
TEST(CudaGraphModelTest, GraphStepsEqualEagerSteps) {
  auto r = Runner(true);
  ASSERT_NE(r, nullptr);
  ASSERT_TRUE(r->uses_step_graphs());
  ModelRunner& m = *r;
  const int64_t vocab = m.config().vocab_size;
  std::mt19937 rng(11);
  const std::vector<int> lens = {15, 16, 31, 1, 47, 64, 5, 33};
  constexpr int kSteps = 40;
  double worst = 0;
  int near_ties = 0;
  for (int batch : {1, 3, 8}) {
    SCOPED_TRACE("batch " + std::to_string(batch));
    std::vector<Seq> seqs = MakeSeqs(std::vector<int>(lens.begin(), lens.begin() + batch),
                                     kSteps, 256, rng);
    const std::vector<float> first = Prefill(m, seqs);
    ASSERT_EQ(static_cast<int64_t>(first.size()), batch * vocab);
    std::vector<int32_t> next(batch);
    for (int i = 0; i < batch; ++i) {
      next[i] = ArgmaxAndMargin(absl::MakeConstSpan(first).subspan(i * vocab, vocab)).first;
    }
    const StepGraphStats before = m.graph_stats();
    for (int step = 0; step < kSteps; ++step) {
      m.default_worker().SetStepGraphs(false);
      const std::vector<float> eager = Decode(m, seqs, next);
      m.default_worker().SetStepGraphs(true);
      const std::vector<float> graph = Decode(m, seqs, next);
      ASSERT_EQ(graph.size(), eager.size());
      ASSERT_EQ(static_cast<int64_t>(eager.size()), batch * vocab);
      for (int i = 0; i < batch; ++i) {
        auto e = absl::MakeConstSpan(eager).subspan(i * vocab, vocab);
        auto g = absl::MakeConstSpan(graph).subspan(i * vocab, vocab);
        const double err = RelativeError(g, e);
        worst = std::max(worst, err);
        EXPECT_LT(err, 1e-2) << "step " << step << " seq " << i;
        const auto [best, margin] = ArgmaxAndMargin(e);
        if (ArgmaxAndMargin(g).first != best) {
          ++near_ties;
          EXPECT_LT(margin, 0.02f) << "step " << step << " seq " << i;
        }
        seqs[i].ids.push_back(next[i]);
        next[i] = best;
      }
    }
    const StepGraphStats after = m.graph_stats();
    const int64_t graph_steps = (after.eager_steps - before.eager_steps) +
                                (after.recorded_steps - before.recorded_steps) +
                                (after.replayed_steps - before.replayed_steps);
    EXPECT_EQ(graph_steps, kSteps);
    EXPECT_GT(after.replayed_steps - before.replayed_steps, kSteps / 2);
    std::printf("[measure] batch %d: %ld eager, %ld recorded, %ld replayed graph steps\n", batch,
                after.eager_steps - before.eager_steps,
                after.recorded_steps - before.recorded_steps,
                after.replayed_steps - before.replayed_steps);
  }
  std::printf("[measure] graph vs eager decode steps: max rel L2 %.3e, argmax differs at %d "
              "near-ties\n", worst, near_ties);
}

// Free-running greedy decoding, graphs on and off, in separate runners: the same tokens.
TEST(CudaGraphModelTest, GreedyTokensEqualWithAndWithoutGraphs) {
  auto on = Runner(true);
  auto off = Runner(false);
  ASSERT_NE(on, nullptr);
  ASSERT_NE(off, nullptr);
  EXPECT_FALSE(off->uses_step_graphs());
  const int64_t vocab = on->config().vocab_size;
  for (int batch : {1, 3, 8}) {
    std::mt19937 rng(100 + batch);
    std::vector<Seq> seqs = MakeSeqs({9, 16, 40, 3, 17, 32, 64, 21}, 36, 256, rng);
    seqs.resize(batch);
    std::vector<Seq> seqs_off = seqs;
    std::vector<float> a = Prefill(*on, seqs), b = Prefill(*off, seqs_off);
    std::vector<int32_t> next_on(batch), next_off(batch);
    for (int step = 0; step < 32; ++step) {
      for (int i = 0; i < batch; ++i) {
        next_on[i] = ArgmaxAndMargin(absl::MakeConstSpan(a).subspan(i * vocab, vocab)).first;
        const auto [t, margin] = ArgmaxAndMargin(absl::MakeConstSpan(b).subspan(i * vocab, vocab));
        next_off[i] = t;
        EXPECT_EQ(next_on[i], next_off[i]) << "batch " << batch << " seq " << i << " token "
                                           << step << " (eager top-2 margin " << margin << ")";
      }
      if (next_on != next_off) break;
      a = Decode(*on, seqs, next_on);
      b = Decode(*off, seqs_off, next_off);
      for (int i = 0; i < batch; ++i) {
        seqs[i].ids.push_back(next_on[i]);
        seqs_off[i].ids.push_back(next_off[i]);
      }
    }
  }
  EXPECT_EQ(off->graph_stats().replayed_steps, 0);
  EXPECT_GT(on->graph_stats().replayed_steps, 0);
}

// Padding rows write only the scratch page: a bystander sequence whose pages are page 0 and the
// last page of the pool (next to the scratch page) gives the same logits before and after many
// padded graph steps of other sequences (3 sequences in bucket 4, 5 in bucket 8).
TEST(CudaGraphModelTest, PaddingRowsNeverTouchOtherSequences) {
  constexpr int32_t kPages = 64;
  auto r = Runner(true, kPages);
  ASSERT_NE(r, nullptr);
  ModelRunner& m = *r;
  std::mt19937 rng(5);
  Seq bystander = MakeSeqs({20}, 0, kPages, rng)[0];
  bystander.pages = {0, kPages - 1};
  Prefill(m, {bystander});
  const std::vector<int32_t> probe_token = {77};
  auto probe = [&]() {
    // Replayed once recorded: the same graph on the same inputs.
    std::vector<float> last;
    for (int i = 0; i < 3; ++i) last = Decode(m, {bystander}, probe_token);
    return last;
  };
  const std::vector<float> before = probe();
  for (int batch : {3, 5}) {
    std::vector<Seq> seqs = MakeSeqs(std::vector<int>(batch, 14), 40, kPages, rng, {0, kPages - 1});
    Prefill(m, seqs);
    std::vector<int32_t> next(batch, 9);
    for (int step = 0; step < 40; ++step) {
      Decode(m, seqs, next);
      for (int i = 0; i < batch; ++i) seqs[i].ids.push_back(next[i]);
    }
  }
  const std::vector<float> after = probe();
  ASSERT_EQ(after.size(), before.size());
  const double err = RelativeError(after, before);
  EXPECT_LT(err, 1e-6);
  std::printf("[measure] bystander logits after padded graph steps: rel L2 change %.3e\n", err);
}

// When recordings are made: the first step of a shape is eager, the second recorded, later ones
// replayed, also after an eager prefill step in between; more pages than the stride holds make
// a new shape.
TEST(CudaGraphModelTest, RecordingsAreMadeOnTheSecondStepAndReplacedOnNewShapes) {
  auto r = Runner(true);
  ASSERT_NE(r, nullptr);
  ModelRunner& m = *r;
  std::mt19937 rng(8);
  // 40 tokens in 4 pages: decode positions 40..59 keep stride 4 and the plan for 64 tokens.
  std::vector<Seq> seqs = MakeSeqs({40}, 20, 256, rng);
  ASSERT_EQ(seqs[0].pages.size(), 4u);
  Prefill(m, seqs);
  std::vector<int32_t> next = {3};
  auto step = [&]() {
    Decode(m, seqs, next);
    seqs[0].ids.push_back(next[0]);
  };
  auto expect = [&](int64_t eager, int64_t recorded, int64_t replayed, const char* when) {
    const StepGraphStats s = m.graph_stats();
    EXPECT_EQ(s.eager_steps, eager) << when;
    EXPECT_EQ(s.recorded_steps, recorded) << when;
    EXPECT_EQ(s.replayed_steps, replayed) << when;
  };
  step();
  expect(1, 0, 0, "first step");
  step();
  expect(1, 1, 0, "second step");
  for (int i = 0; i < 5; ++i) step();
  expect(1, 1, 5, "five more");
  // A prefill step of another sequence (eager), then decode replays again.
  std::vector<Seq> other = MakeSeqs({30}, 0, 256, rng, seqs[0].pages);
  Prefill(m, other);
  step();
  expect(1, 1, 6, "after a prefill step");
  EXPECT_EQ(m.graph_stats().live_recordings, 1);
  // A fifth page: stride 8, a new shape.
  std::vector<Seq> grown = MakeSeqs({1}, 16, 256, rng, seqs[0].pages);
  seqs[0].pages.push_back(grown[0].pages[0]);
  step();
  step();
  step();
  expect(2, 2, 7, "stride 8");
  EXPECT_EQ(m.graph_stats().live_recordings, 1);
  // Two sequences: a second bucket with its own recording.
  std::vector<Seq> two = MakeSeqs({10, 12}, 8, 256, rng, seqs[0].pages);
  Prefill(m, two);
  std::vector<int32_t> next2 = {4, 5};
  for (int i = 0; i < 3; ++i) {
    Decode(m, two, next2);
    for (Seq& s : two) s.ids.push_back(4);
  }
  EXPECT_EQ(m.graph_stats().live_recordings, 2);
}

TEST(CudaGraphModelTest, CpuRunnerHasNoStepGraphs) {
  ModelRunnerOptions o = RunnerOptionsFor(EngineConfig());
  o.backend = "cpu";
  o.num_pages = 16;
  o.max_step_tokens = 64;
  o.max_step_logits = 4;
  auto r = ModelRunner::Load(ModelDir(), o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE((*r)->uses_step_graphs());
  std::mt19937 rng(1);
  std::vector<Seq> seqs = MakeSeqs({5}, 2, 16, rng);
  Prefill(**r, seqs);
  const std::vector<float> logits = Decode(**r, seqs, {7});
  EXPECT_EQ(static_cast<int64_t>(logits.size()), (*r)->config().vocab_size);
  EXPECT_EQ((*r)->graph_stats().eager_steps, 0);
}

}  // namespace
}  // namespace sieve::engine
