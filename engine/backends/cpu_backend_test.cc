#include "engine/backends/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/half.h"
#include "kernels/sparse/double_sparsity.h"
#include "kernels/sparse/minference.h"
#include "kernels/sparse/quest.h"
#include "kernels/sparse/xattention.h"

namespace sieve::engine {
namespace {

TensorView View(const std::vector<float>& v, std::vector<int64_t> shape) {
  return TensorView{"t", DType::kF32, std::move(shape),
                    absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(v.data()),
                                        v.size() * sizeof(float))};
}

// Logits is the final projection straight to the host: the same numbers as Linear followed by
// CopyToHost, with its sizes checked.
TEST(CpuBackendTest, LogitsEqualLinearThenCopy) {
  CpuBackend b(2);
  std::mt19937 rng(4);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> x(3 * 24), w(37 * 24);
  for (float& v : x) v = d(rng);
  for (float& v : w) v = d(rng);
  auto tx = b.UploadWeight({View(x, {3, 24})}, 24);
  auto tw = b.UploadWeight({View(w, {37, 24})}, 24);
  ASSERT_TRUE(tx.ok() && tw.ok());
  auto out = b.Allocate(3, 37);
  ASSERT_TRUE(out.ok());
  auto stream = b.CreateStream({});
  ASSERT_TRUE(stream.ok());
  ASSERT_TRUE(b.Linear(**stream, *tx, *tw, Tensor{}, *out).ok());
  std::vector<float> want(3 * 37), got(3 * 37, NAN);
  ASSERT_TRUE(b.CopyToHost(**stream, *out, absl::MakeSpan(want)).ok());
  ASSERT_TRUE(b.Logits(**stream, *tx, *tw, absl::MakeSpan(got)).ok());
  EXPECT_EQ(got, want);
  double dot = 0;
  for (int c = 0; c < 24; ++c) dot += double{x[2 * 24 + c]} * w[36 * 24 + c];
  EXPECT_NEAR(got[2 * 37 + 36], dot, 1e-4);

  std::vector<float> small(3 * 37 - 1);
  EXPECT_EQ(b.Logits(**stream, *tx, *tw, absl::MakeSpan(small)).code(), absl::StatusCode::kInternal);
  auto narrow = b.Allocate(3, 23);
  ASSERT_TRUE(narrow.ok());
  EXPECT_EQ(b.Logits(**stream, *narrow, *tw, absl::MakeSpan(got)).code(),
            absl::StatusCode::kInternal);
  // No step graphs on the CPU.
  EXPECT_FALSE(b.SupportsStepGraphs());
  BatchLayout l;
  EXPECT_EQ(b.BeginGraphStep(**stream, l, {}).status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(b.EndGraphStep(**stream, {}).code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(b.GraphLogits(**stream, *tx, *tw).code(), absl::StatusCode::kUnimplemented);
}

// Pages written by WriteKvPages (an import) get their side data rebuilt from the written keys:
// Quest bounds equal the reference recomputation over the page's 16 keys, with nothing left of
// what the page held before; DoubleSparsity labels hold each token's outlier channels (fp16).
// With bfloat16 bounds (the default) the stored bounds are the reference's rounded outward: the max
// up and the min down to bfloat16.
void RebuildSideDataOfWrittenPages(bool bf16_bounds) {
  constexpr int32_t kLayers = 2, kPages = 6, kPs = 16, kHkv = 2, kHq = 4, kD = 64, kR = 8;
  const AttentionShape shape{kHq, kHkv, kD};
  // Head-major, as the engine runs a sparse decode method.
  CpuBackend b(2, kernels::KvDtype::kFloat32, bf16_bounds, kernels::KvLayout::kHeadMajor);
  ASSERT_EQ(b.page_bounds_bf16(), bf16_bounds);
  ASSERT_TRUE(b.AllocateKvCache(kLayers, kPages, kPs, shape).ok());
  // Nothing allocated yet: a clear refusal.
  const std::vector<int32_t> pages = {3, 1};
  EXPECT_EQ(b.RebuildPageBounds(pages, shape).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(b.RebuildDsLabels(pages).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(b.AllocatePageBounds(kLayers, shape).ok());
  kernels::DoubleSparsityShape ds;
  ds.num_q_heads = kHq;
  ds.num_kv_heads = kHkv;
  ds.head_dim = kD;
  ds.channels = kR;
  ASSERT_TRUE(b.AllocateDsLabels(kLayers, ds).ok());
  std::mt19937 rng(11);
  for (int32_t l = 0; l < kLayers; ++l) {
    std::vector<int32_t> channels(kHq * kR);
    for (int32_t h = 0; h < kHq; ++h) {
      std::vector<int32_t> perm(kD);
      for (int32_t c = 0; c < kD; ++c) perm[c] = c;
      std::shuffle(perm.begin(), perm.end(), rng);
      std::copy(perm.begin(), perm.begin() + kR, channels.begin() + h * kR);
    }
    ASSERT_TRUE(b.SetDsChannels(l, channels).ok());
  }
  const int64_t page_bytes = b.KvPageBytes(kLayers, kPs, shape);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fresh = [&](float offset) {
    std::vector<float> v(pages.size() * page_bytes / sizeof(float));
    for (float& x : v) x = normal(rng) + offset;
    std::vector<uint8_t> bytes(v.size() * sizeof(float));
    std::memcpy(bytes.data(), v.data(), bytes.size());
    return bytes;
  };
  // Stale side data first (keys far above the second write's), then the write that counts.
  for (const float offset : {50.0f, 0.0f}) {
    ASSERT_TRUE(b.WriteKvPages(pages, fresh(offset)).ok());
    ASSERT_TRUE(b.RebuildPageBounds(pages, shape).ok());
    ASSERT_TRUE(b.RebuildDsLabels(pages).ok());
  }
  const kernels::DoubleSparsityShape& s = b.ds_labels()->shape();
  for (int32_t l = 0; l < kLayers; ++l) {
    absl::Span<const float> k = b.k_cache(l), bounds = b.page_bounds(l);
    for (const int32_t p : pages) {
      for (int32_t g = 0; g < kHkv; ++g) {
        std::vector<float> want(2 * kD);
        kernels::QuestBoundsRef(k.data(), p, g, kPs, kHkv, kD, kPs, want.data(),
                                b.kv_layout());
        EXPECT_LT(want[0], 20.0f);  // the stale write's keys (~50) are gone
        if (bf16_bounds) {  // Mx (first) rounded up, Mn down
          for (int32_t c = 0; c < kD; ++c) {
            want[c] = kernels::Bf16ToFloat(kernels::Bf16RoundUp(want[c]));
            want[kD + c] = kernels::Bf16ToFloat(kernels::Bf16RoundDown(want[kD + c]));
          }
        }
        std::vector<float> widened(2 * kD);
        const float* got = kernels::QuestPageBounds(bounds.data(), bf16_bounds, p, g, kHkv, kD,
                                                    widened.data());
        EXPECT_EQ(std::vector<float>(got, got + 2 * kD), want) << "layer " << l << " page " << p;
      }
      const uint8_t* labels = b.ds_labels()->labels(l) + p * kernels::DsLabelPageBytes(s);
      const std::vector<int32_t>& ch = b.ds_labels()->channels(l);
      for (int32_t h = 0; h < kHq; ++h) {
        for (int32_t i = 0; i < kR; ++i) {
          for (int32_t t = 0; t < kPs; ++t) {
            const float key = k[kernels::KvRowOffset(b.kv_layout(), p, t,
                                                     h / (kHq / kHkv), kPs, kHkv, kD) +
                                ch[h * kR + i]];
            // fp16 rounding: relative error at most 2^-11 (11 significand bits), absolute 2^-25
            // for subnormals.
            EXPECT_NEAR(kernels::DsReadLabel(s, labels, h, i, t), key,
                        std::ldexp(std::fabs(key), -11) + std::ldexp(1.0f, -24));
          }
        }
      }
    }
  }
  // Pages outside the pool are refused.
  const std::vector<int32_t> outside = {kPages};
  EXPECT_EQ(b.RebuildPageBounds(outside, shape).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(b.RebuildDsLabels(outside).code(), absl::StatusCode::kInvalidArgument);
}

TEST(CpuBackendTest, RebuildSideDataOfWrittenPagesFp32Bounds) { RebuildSideDataOfWrittenPages(false); }
TEST(CpuBackendTest, RebuildSideDataOfWrittenPagesBf16Bounds) { RebuildSideDataOfWrittenPages(true); }

// Quest decode through the backend on a bfloat16 cache: its bfloat16 page bounds (half the side
// pool per page) equal fp32 bounds of the same keys, widened, and so select exactly the pages
// fp32 bounds select (quest.h: bfloat16 keys round nothing, so the fp32 scores, ties included,
// are identical), per query head and per KV head over several budgets; the attention outputs
// are then the same bit for bit, and a budget that covers every page gives the dense output.
// Bounds are built by UpdatePageBounds over appends of random sizes (chunks start mid-page) on
// shuffled pages that held other keys first.
// Transfers keep the token-major layout of backend.h whatever the pools' layout, so a page read
// from one backend is what any backend's import expects: WriteKvPages puts wire row (slot, head)
// at the pool's row (slot, head) of its layout, and ReadKvPages returns the same bytes.
TEST(CpuBackendTest, TransfersUseTheTokenMajorWireLayout) {
  constexpr int32_t kLayers = 2, kPages = 5, kPs = 16, kHkv = 4, kHq = 8, kD = 32;
  const AttentionShape shape{kHq, kHkv, kD};
  for (const kernels::KvLayout layout :
       {kernels::KvLayout::kHeadMajor, kernels::KvLayout::kTokenMajor}) {
    CpuBackend b(2, kernels::KvDtype::kFloat32, /*bf16_page_bounds=*/false, layout);
    ASSERT_EQ(b.kv_layout(), layout);
    ASSERT_TRUE(b.AllocateKvCache(kLayers, kPages, kPs, shape).ok());
    const std::vector<int32_t> pages = {4, 0, 2};
    const int64_t page_bytes = b.KvPageBytes(kLayers, kPs, shape);
    std::vector<float> wire(pages.size() * page_bytes / sizeof(float));
    std::mt19937 rng(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& x : wire) x = normal(rng);
    std::vector<uint8_t> bytes(wire.size() * sizeof(float));
    std::memcpy(bytes.data(), wire.data(), bytes.size());
    ASSERT_TRUE(b.WriteKvPages(pages, bytes).ok());
    const int64_t block = int64_t{kPs} * kHkv * kD;  // one layer's K (or V) of one page
    for (size_t i = 0; i < pages.size(); ++i) {
      for (int32_t l = 0; l < kLayers; ++l) {
        const float* k_wire = wire.data() + (static_cast<int64_t>(i) * kLayers + l) * 2 * block;
        for (int32_t t = 0; t < kPs; ++t) {
          for (int32_t g = 0; g < kHkv; ++g) {
            const int64_t at = kernels::KvRowOffset(layout, pages[i], t, g, kPs, kHkv, kD);
            const float* want = k_wire + (int64_t{t} * kHkv + g) * kD;
            ASSERT_TRUE(std::equal(want, want + kD, b.k_cache(l).data() + at))
                << "page " << pages[i] << " layer " << l << " slot " << t << " head " << g;
            ASSERT_TRUE(std::equal(want + block, want + block + kD, b.v_cache(l).data() + at))
                << "V: page " << pages[i] << " layer " << l << " slot " << t << " head " << g;
          }
        }
      }
    }
    std::vector<uint8_t> back(bytes.size());
    ASSERT_TRUE(b.ReadKvPages(pages, absl::MakeSpan(back)).ok());
    EXPECT_EQ(back, bytes);
  }
}

TEST(CpuBackendTest, Bf16CacheQuestBoundsSelectAsFp32Bounds) {
  constexpr int32_t kLayers = 2, kPages = 96, kPs = 16, kHkv = 2, kHq = 8, kD = 64;
  const AttentionShape shape{kHq, kHkv, kD};
  CpuBackend b16(2, kernels::KvDtype::kBfloat16);
  CpuBackend b32(2, kernels::KvDtype::kBfloat16, /*bf16_page_bounds=*/false);
  EXPECT_TRUE(b16.page_bounds_bf16());
  EXPECT_FALSE(b32.page_bounds_bf16());
  EXPECT_TRUE(CpuBackend(2).page_bounds_bf16());  // an fp32 cache too (rounded outward)
  EXPECT_EQ(b16.PageBoundsBytes(kLayers, shape), int64_t{kLayers} * kHkv * 2 * kD * 2);
  EXPECT_EQ(b32.PageBoundsBytes(kLayers, shape), 2 * b16.PageBoundsBytes(kLayers, shape));
  std::vector<int32_t> all(kPages);
  for (int32_t p = 0; p < kPages; ++p) all[p] = p;
  std::mt19937 rng(23);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::unique_ptr<BackendStream>> streams;
  for (CpuBackend* b : {&b16, &b32}) {
    ASSERT_TRUE(b->AllocateKvCache(kLayers, kPages, kPs, shape).ok());
    ASSERT_TRUE(b->AllocatePageBounds(kLayers, shape).ok());
    auto st = b->CreateStream({});
    ASSERT_TRUE(st.ok());
    streams.push_back(std::move(*st));
  }
  EXPECT_EQ(b16.page_bounds(0).size(), size_t{kPages} * kHkv * kD);  // 2 * kD bf16 per region
  // Random bfloat16 K and V on every page, the same in both backends; written twice so that
  // the bounds of the first keys are stale when the second ones are appended.
  auto write_all = [&](float offset) {
    std::vector<uint16_t> kv(kPages * b16.KvPageBytes(kLayers, kPs, shape) / 2);
    for (uint16_t& x : kv) x = kernels::FloatToBf16(normal(rng) + offset);
    const absl::Span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(kv.data()),
                                          kv.size() * 2);
    ASSERT_TRUE(b16.WriteKvPages(all, bytes).ok());
    ASSERT_TRUE(b32.WriteKvPages(all, bytes).ok());
  };
  std::shuffle(all.begin(), all.end(), rng);
  const std::vector<int32_t> lens = {600, 333, 520};  // 38 + 21 + 33 pages of the 96
  std::vector<std::vector<int32_t>> seq_pages;
  for (size_t s = 0, next = 0; s < lens.size(); ++s) {
    const int32_t n = (lens[s] + kPs - 1) / kPs;
    seq_pages.emplace_back(all.begin() + next, all.begin() + next + n);
    next += n;
  }
  // Appends of 1..40 tokens of sequence s up to `len`, each a step that updates every layer.
  auto append = [&](size_t s, int32_t len) {
    std::uniform_int_distribution<int32_t> chunk(1, 40);
    for (int32_t done = 0; done < len;) {
      const int32_t n = std::min(len - done, chunk(rng));
      BatchLayout l;
      for (int32_t t = done; t < done + n; ++t) {
        l.positions.push_back(t);
        l.slots.push_back(int64_t{seq_pages[s][t / kPs]} * kPs + t % kPs);
      }
      l.query_start = {0, n};
      l.kv_lens = {done + n};
      l.page_table = seq_pages[s];
      l.page_table_stride = static_cast<int32_t>(seq_pages[s].size());
      for (int i = 0; i < 2; ++i) {
        CpuBackend& b = i == 0 ? b16 : b32;
        ASSERT_TRUE(b.BeginStep(*streams[i], l).ok());
        for (int32_t layer = 0; layer < kLayers; ++layer) {
          ASSERT_TRUE(b.UpdatePageBounds(*streams[i], layer, shape).ok());
        }
      }
      done += n;
    }
  };
  write_all(40.0f);  // stale: keys far above the second write's
  for (size_t s = 0; s < lens.size(); ++s) append(s, lens[s]);
  write_all(0.0f);
  for (size_t s = 0; s < lens.size(); ++s) append(s, lens[s]);
  // The bounds, widened, equal the fp32 ones exactly (and the stale keys are gone).
  std::vector<float> widened(2 * kD);
  for (int32_t layer = 0; layer < kLayers; ++layer) {
    for (size_t s = 0; s < lens.size(); ++s) {
      for (const int32_t p : seq_pages[s]) {
        for (int32_t g = 0; g < kHkv; ++g) {
          const float* w = kernels::QuestPageBounds(b16.page_bounds(layer).data(), true, p, g,
                                                    kHkv, kD, widened.data());
          const float* f = b32.page_bounds(layer).data() + (int64_t{p} * kHkv + g) * 2 * kD;
          ASSERT_TRUE(std::equal(w, w + 2 * kD, f)) << "layer " << layer << " page " << p;
          ASSERT_LT(f[0], 20.0f);
        }
      }
    }
  }
  // One decode step: each sequence's last token queries its whole context.
  BatchLayout d;
  d.query_start = {0};
  d.page_table_stride = 38;
  for (size_t s = 0; s < lens.size(); ++s) {
    const int32_t t = lens[s] - 1;
    d.positions.push_back(t);
    d.slots.push_back(int64_t{seq_pages[s][t / kPs]} * kPs + t % kPs);
    d.query_start.push_back(static_cast<int32_t>(s) + 1);
    d.kv_lens.push_back(lens[s]);
    std::vector<int32_t> row = seq_pages[s];
    row.resize(d.page_table_stride, seq_pages[s][0]);
    d.page_table.insert(d.page_table.end(), row.begin(), row.end());
  }
  std::vector<float> q(lens.size() * kHq * kD);
  for (float& x : q) x = normal(rng);
  Tensor qt[2], out[2];
  for (int i = 0; i < 2; ++i) {
    CpuBackend& b = i == 0 ? b16 : b32;
    auto a = b.Allocate(3, kHq * kD), o = b.Allocate(3, kHq * kD);
    ASSERT_TRUE(a.ok() && o.ok());
    qt[i] = *a;
    out[i] = *o;
    std::copy(q.begin(), q.end(), static_cast<float*>(qt[i].data));
    ASSERT_TRUE(b.BeginStep(*streams[i], d).ok());
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(kD));
  auto attend = [&](int i, const AttentionPlan& plan) {
    CpuBackend& b = i == 0 ? b16 : b32;
    EXPECT_TRUE(b.Attention(*streams[i], 1, qt[i], shape, scale, plan, out[i]).ok());
    const float* o = static_cast<const float*>(out[i].data);
    return std::vector<float>(o, o + q.size());
  };
  AttentionPlan dense;
  const std::vector<float> dense_out = attend(0, dense);
  for (const bool per_kv_head : {false, true}) {
    for (const int32_t budget : {2, 5, 12, 38}) {
      Backend::QuestPlanOptions opt;
      opt.page_budget = budget;
      opt.per_kv_head = per_kv_head;
      AttentionPlan plan[2];
      for (int i = 0; i < 2; ++i) {
        CpuBackend& b = i == 0 ? b16 : b32;
        ASSERT_TRUE(b.PlanQuestPages(*streams[i], 1, qt[i], shape, opt, plan[i]).ok());
      }
      ASSERT_EQ(plan[0].row_start, plan[1].row_start);
      ASSERT_EQ(plan[0].key_blocks, plan[1].key_blocks)
          << "budget " << budget << " per_kv_head " << per_kv_head;
      const std::vector<float> a = attend(0, plan[0]), c = attend(1, plan[1]);
      EXPECT_EQ(a, c) << "budget " << budget;
      if (budget >= 38) {
        EXPECT_EQ(a, dense_out) << "a budget that covers every page is dense";
      } else {
        EXPECT_EQ(plan[0].key_blocks.size(), size_t{3} * kHq * budget);  // every row cut
        EXPECT_NE(a, dense_out);
      }
    }
  }
}

// kv_cache.dtype bfloat16: the backend passes the cache's element type to both prefill
// estimators, so XAttention's block masses and MInference's plan equal, bit for bit, what the
// kernels give on the stored keys widened to fp32 (KeysAsFloat); read as fp32, the bfloat16 pool
// would give other numbers (and past the first half of the pool, garbage). Both row layouts.
TEST(CpuBackendTest, PrefillEstimatorsReadABfloat16Cache) {
  constexpr int32_t kPages = 40, kPs = 16, kHkv = 2, kHq = 4, kD = 64, kN = 600;
  const AttentionShape shape{kHq, kHkv, kD};
  for (const kernels::KvLayout layout : {kernels::KvLayout::kTokenMajor,
                                         kernels::KvLayout::kHeadMajor}) {
    SCOPED_TRACE(layout == kernels::KvLayout::kTokenMajor ? "token-major" : "head-major");
    CpuBackend b(2, kernels::KvDtype::kBfloat16, true, layout);
    ASSERT_TRUE(b.AllocateKvCache(1, kPages, kPs, shape).ok());
    std::mt19937 rng(23);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<int32_t> pages(kPages);
    for (int32_t i = 0; i < kPages; ++i) pages[i] = i;
    std::shuffle(pages.begin(), pages.end(), rng);
    // Every page's K and V (wire layout, bfloat16 bit patterns), keys of a random scale per page.
    const int64_t page_elems = b.KvPageBytes(1, kPs, shape) / 2;
    std::vector<uint16_t> kv(kPages * page_elems);
    for (int32_t i = 0; i < kPages; ++i) {
      const float scale = 0.5f + static_cast<float>(i % 5);
      for (int64_t e = 0; e < page_elems; ++e) {
        kv[i * page_elems + e] = kernels::FloatToBf16(scale * normal(rng));
      }
    }
    ASSERT_TRUE(b.WriteKvPages(pages, absl::MakeConstSpan(
                                          reinterpret_cast<const uint8_t*>(kv.data()),
                                          kv.size() * sizeof(uint16_t)))
                    .ok());
    // One sequence: the last 200 of its 600 tokens are this step's queries (a chunk).
    constexpr int32_t kQ = 200;
    BatchLayout l;
    for (int32_t t = kN - kQ; t < kN; ++t) {
      l.positions.push_back(t);
      l.slots.push_back(int64_t{pages[t / kPs]} * kPs + t % kPs);
    }
    l.query_start = {0, kQ};
    l.kv_lens = {kN};
    l.page_table.assign(pages.begin(), pages.begin() + (kN + kPs - 1) / kPs);
    l.page_table_stride = static_cast<int32_t>(l.page_table.size());
    auto stream = b.CreateStream({});
    ASSERT_TRUE(stream.ok());
    ASSERT_TRUE(b.BeginStep(**stream, l).ok());
    auto q = b.Allocate(kQ, kHq * kD);
    ASSERT_TRUE(q.ok());
    float* qf = static_cast<float*>(q->data);
    for (int64_t i = 0; i < int64_t{kQ} * kHq * kD; ++i) qf[i] = normal(rng);
    const std::vector<float> keys = b.KeysAsFloat(0);

    XAttentionEstimate xe;
    xe.stride = 8;
    xe.block_size = 64;
    std::vector<float> mass;
    ASSERT_TRUE(b.XAttentionBlockMass(**stream, 0, *q, shape, xe, mass).ok());
    kernels::XAttentionParams xp;
    xp.kv_layout = layout;
    xp.q = qf;
    xp.q_row_stride = kHq * kD;
    xp.k_cache = keys.data();
    xp.page_table = l.page_table.data();
    xp.page_size = kPs;
    xp.num_q_heads = kHq;
    xp.num_kv_heads = kHkv;
    xp.head_dim = kD;
    xp.q_len = kQ;
    xp.kv_len = kN;
    xp.stride = xe.stride;
    xp.block_size = xe.block_size;
    std::vector<float> want(mass.size(), -1.0f);
    kernels::XAttentionBlockMassCpu(xp, want.data(), 2);
    EXPECT_EQ(mass, want);

    const std::vector<kernels::minference::HeadPattern> patterns = {
        {kernels::minference::Pattern::kVerticalSlash, 40, 90},
        {kernels::minference::Pattern::kBlockSparse, 3, 0},
        {kernels::minference::Pattern::kVerticalSlash, 100, 30},
        {kernels::minference::Pattern::kAShape, 64, 128}};
    MInferenceEstimate me;
    me.patterns = patterns;
    kernels::minference::MInferencePlan plan, want_plan;
    ASSERT_TRUE(b.MInferenceIndex(**stream, 0, *q, shape, me, plan).ok());
    const int32_t query_start[2] = {0, kQ};
    const int32_t kv_len = kN;
    kernels::PagedAttentionParams<float> mp;
    mp.kv_layout = layout;
    mp.q = qf;
    mp.k_cache = keys.data();
    mp.page_table = l.page_table.data();
    mp.page_table_stride = l.page_table_stride;
    mp.kv_lens = &kv_len;
    mp.query_start = query_start;
    mp.num_seqs = 1;
    mp.num_q_heads = kHq;
    mp.num_kv_heads = kHkv;
    mp.head_dim = kD;
    mp.page_size = kPs;
    mp.scale = 1.0f / std::sqrt(static_cast<float>(kD));
    kernels::minference::Options mo;
    mo.num_threads = 2;
    kernels::minference::BuildPlan(mp, patterns.data(), mo, &want_plan);
    EXPECT_EQ(plan.query_block_start, want_plan.query_block_start);
    EXPECT_EQ(plan.row_start, want_plan.row_start);
    EXPECT_EQ(plan.key_blocks, want_plan.key_blocks);
    EXPECT_EQ(plan.column_start, want_plan.column_start);
    EXPECT_EQ(plan.columns, want_plan.columns);
  }
}

}  // namespace
}  // namespace sieve::engine
