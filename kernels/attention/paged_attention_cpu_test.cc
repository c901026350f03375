// PagedAttentionCpu against the fp64-accumulating reference PagedAttentionRef on fresh random
// inputs: page size x head dim x GQA group, each on a batch of sequences with different
// (kv_len, q_len) (one key, page boundaries, odd lengths, query blocks longer than a tile,
// whole prompts, ~3000 keys), dense and sparse (random key blocks and columns, empty rows, every
// block listed); and a batched call gives each sequence what a call of its own gives.
//
// Tolerance, per query row, relative L2 error ||out - ref|| / ||ref|| <= 2e-5. Derivation: the
// kernel accumulates in fp32 (unit roundoff u = 2^-24 ~ 6e-8) where the reference uses fp64.
// A score (a d-term dot product times 1/sqrt(d)) is off by about sqrt(d) u |q||k| / sqrt(d),
// a few u in absolute terms, which is a relative error of a few u on each softmax weight; the
// vectorised exp adds ~2 u. The output sums n weighted values whose partial sums grow like
// sqrt(n) times the result's scale (random V, near-uniform weights), so rounding the running
// sum adds ~ sqrt(n) u relative to the result; each rescale by the online-softmax correction
// adds u more, at most once per 64-key tile. With n <= 3001 keys: sqrt(n) u ~ 3.3e-6, plus
// n / 64 u ~ 2.8e-6 in the worst case for rescales, plus a few u: ~ 7e-6, so 2e-5 leaves a
// factor ~3 for the constants. Rows with no readable key must be exactly zero.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/attention/paged_kv_test_util.h"
#include "kernels/cpu/half.h"

namespace sieve::kernels {
namespace {

constexpr double kRelTol = 2e-5;
constexpr int kKvHeads = 2;

using Seq = test_util::SeqLens;

struct Shape {
  int page_size, head_dim, group;
  KvLayout layout = KvLayout::kTokenMajor;
};

std::string Name(const ::testing::TestParamInfo<Shape>& i) {
  return "page" + std::to_string(i.param.page_size) + "_d" + std::to_string(i.param.head_dim) +
         "_group" + std::to_string(i.param.group) +
         (i.param.layout == KvLayout::kHeadMajor ? "_headmajor" : "");
}

// A batch of sequences in a shuffled paged cache with random q, K and V in [-1, 1], kKvHeads
// KV heads of sh.group query heads each.
struct Batch : test_util::PagedBatch {
  Batch(const std::vector<Seq>& seqs, const Shape& sh, uint32_t seed)
      : PagedBatch(seqs, sh.page_size, sh.head_dim, kKvHeads * sh.group, kKvHeads, seed) {
    layout = sh.layout;
  }
};

// Per-row relative L2 error within kRelTol; rows the reference zeroes must be exactly zero.
void ExpectClose(const std::vector<float>& out, const std::vector<float>& ref, int d,
                 const std::string& what) {
  int bad = 0;
  for (size_t r = 0; r < ref.size() / d; ++r) {
    double err = 0, norm = 0;
    for (int i = 0; i < d; ++i) {
      const double a = out[r * d + i], b = ref[r * d + i];
      err += (a - b) * (a - b);
      norm += b * b;
    }
    const bool ok = norm == 0 ? err == 0 : std::sqrt(err / norm) <= kRelTol;
    if (!ok && ++bad <= 5) {
      ADD_FAILURE() << what << " row " << r << ": relative error "
                    << (norm == 0 ? err : std::sqrt(err / norm)) << " (|ref|^2 = " << norm << ")";
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

// Sequences of every kind in one batch: (kv_len, q_len).
std::vector<Seq> MixedSeqs(int ps) {
  return {{1, 1},           {ps, 1},        {5 * ps + 1, 3}, {2999, 1},
          {3001, 9},        {200, 200},     {517, 131},      {2 * ps, 2 * ps}};
}

class PagedAttentionCpuTest : public ::testing::TestWithParam<Shape> {};

TEST_P(PagedAttentionCpuTest, DenseMatchesReference) {
  const Shape sh = GetParam();
  const Batch b(MixedSeqs(sh.page_size), sh, 17 + sh.page_size * 7 + sh.head_dim + sh.group);
  std::vector<float> out, ref;
  PagedAttentionRef(b.Params(ref), 0);
  PagedAttentionCpu(b.Params(out), 2);
  ExpectClose(out, ref, sh.head_dim, "dense");
}

// Builds a random sparse index over batch b: each row lists each key block with probability
// `p_block` and each other position as a column with probability `p_column`; with p_block 1 it
// lists every block.
struct RandomIndex {
  std::vector<int32_t> query_block_start, row_start, key_blocks, column_start, columns;
  SparseAttentionIndex index;

  // With `share_group` > 1, the rows of most groups of share_group consecutive query heads (a
  // KV head's) repeat the group's first row, as a selection shared per KV head does.
  RandomIndex(const Batch& b, int query_block, int key_block, double p_block, double p_column,
              uint32_t seed, int share_group = 1) {
    std::mt19937 rng(seed);
    std::bernoulli_distribution block(p_block), column(p_column), share(0.7);
    std::vector<int32_t> lead_blocks, lead_columns;
    bool sharing = false;
    query_block_start.push_back(0);
    row_start.push_back(0);
    column_start.push_back(0);
    for (size_t s = 0; s < b.kv_lens.size(); ++s) {
      const int q_len = b.query_start[s + 1] - b.query_start[s];
      const int blocks = (q_len + query_block - 1) / query_block;
      query_block_start.push_back(query_block_start.back() + blocks);
      const int key_blocks_n = (b.kv_lens[s] + key_block - 1) / key_block;
      for (int r = 0; r < blocks * b.q_heads; ++r) {
        if (share_group > 1 && r % share_group == 0) sharing = share(rng);
        if (sharing && r % share_group != 0) {
          key_blocks.insert(key_blocks.end(), lead_blocks.begin(), lead_blocks.end());
          columns.insert(columns.end(), lead_columns.begin(), lead_columns.end());
          row_start.push_back(static_cast<int32_t>(key_blocks.size()));
          column_start.push_back(static_cast<int32_t>(columns.size()));
          continue;
        }
        const size_t blocks_before = key_blocks.size(), columns_before = columns.size();
        std::vector<bool> listed(key_blocks_n);
        for (int j = 0; j < key_blocks_n; ++j) {
          listed[j] = block(rng);
          if (listed[j]) key_blocks.push_back(j);
        }
        for (int t = 0; t < b.kv_lens[s]; ++t) {
          if (!listed[t / key_block] && column(rng)) columns.push_back(t);
        }
        row_start.push_back(static_cast<int32_t>(key_blocks.size()));
        column_start.push_back(static_cast<int32_t>(columns.size()));
        lead_blocks.assign(key_blocks.begin() + blocks_before, key_blocks.end());
        lead_columns.assign(columns.begin() + columns_before, columns.end());
      }
    }
    index.query_block = query_block;
    index.key_block = key_block;
    index.query_block_start = query_block_start.data();
    index.row_start = row_start.data();
    index.key_blocks = key_blocks.data();
    index.column_start = column_start.data();
    index.columns = columns.data();
  }
};

TEST_P(PagedAttentionCpuTest, SparseMatchesReference) {
  const Shape sh = GetParam();
  const Batch b(MixedSeqs(sh.page_size), sh, 91 + sh.page_size * 5 + sh.head_dim + sh.group);
  // (query_block, key_block, p_block, p_column): decode-like pages, prefill-like blocks with
  // vertical columns, and sparse enough that some rows read nothing.
  const struct {
    int qb, kb;
    double pb, pc;
  } cases[] = {{1, sh.page_size, 0.5, 0.0}, {16, 16, 0.3, 0.02}, {64, 32, 0.05, 0.0}};
  uint32_t seed = 5;
  for (const auto& c : cases) {
    const RandomIndex x(b, c.qb, c.kb, c.pb, c.pc, seed++);
    std::vector<float> out, ref;
    PagedAttentionRef(b.Params(ref, &x.index), 0);
    PagedAttentionCpu(b.Params(out, &x.index), 2);
    ExpectClose(out, ref, sh.head_dim,
                "sparse qb " + std::to_string(c.qb) + " kb " + std::to_string(c.kb));
  }
}

TEST_P(PagedAttentionCpuTest, EveryBlockListedEqualsDense) {
  const Shape sh = GetParam();
  const Batch b(MixedSeqs(sh.page_size), sh, 33 + sh.page_size + sh.head_dim * 3 + sh.group);
  std::vector<float> dense_ref, dense, all;
  PagedAttentionRef(b.Params(dense_ref), 0);
  PagedAttentionCpu(b.Params(dense), 2);
  const RandomIndex x(b, 8, sh.page_size, 1.0, 0.0, 7);
  PagedAttentionCpu(b.Params(all, &x.index), 2);
  ExpectClose(all, dense_ref, sh.head_dim, "every block listed vs dense reference");
  ExpectClose(all, dense, sh.head_dim, "every block listed vs dense kernel");
}

// A group-shared plan listing every block in query blocks of 128 (each cut into sub-items of a
// dense item's 128 / group queries, the cut dense items make) equals the dense kernel bit for
// bit: the same rows meet the same keys in the same order.
TEST_P(PagedAttentionCpuTest, GroupSharedBlocksListingEverythingEqualDenseBitwise) {
  const Shape sh = GetParam();
  const Batch b({{300, 300}, {517, 131}, {2999, 1}}, sh, 57 + sh.page_size + sh.head_dim + sh.group);
  std::vector<float> dense, all;
  PagedAttentionCpu(b.Params(dense), 2);
  const RandomIndex x(b, 128, sh.page_size, 1.0, 0.0, 11, sh.group);
  PagedAttentionCpu(b.Params(all, &x.index), 2);
  EXPECT_EQ(all, dense);
}

TEST_P(PagedAttentionCpuTest, BatchedEqualsSingle) {
  const Shape sh = GetParam();
  const std::vector<Seq> seqs = {{5 * sh.page_size + 1, 3}, {200, 200}, {517, 131}};
  const Batch b(seqs, sh, 3 + sh.page_size + sh.head_dim + sh.group);
  std::vector<float> batched;
  PagedAttentionCpu(b.Params(batched), 2);
  const size_t row = static_cast<size_t>(b.q_heads) * sh.head_dim;
  for (size_t s = 0; s < seqs.size(); ++s) {
    Batch one = b;  // the same cache; only sequence s in the call
    one.kv_lens = {b.kv_lens[s]};
    one.query_start = {0, b.query_start[s + 1] - b.query_start[s]};
    one.page_table.assign(b.page_table.begin() + s * b.stride,
                          b.page_table.begin() + (s + 1) * b.stride);
    one.q.assign(b.q.begin() + b.query_start[s] * row, b.q.begin() + b.query_start[s + 1] * row);
    std::vector<float> single;
    PagedAttentionCpu(one.Params(single), 1);
    EXPECT_TRUE(std::equal(single.begin(), single.end(), batched.begin() + b.query_start[s] * row))
        << "sequence " << s;
  }
}

// Split-KV: decode and short-query rows over long KV (cut into 512-key parts and merged) match
// the reference, dense and sparse (the parts of a sparse row cut through blocks and columns), on
// 1 and 3 threads with bitwise-equal results. Same tolerance derivation as above with n <= 9000:
// sqrt(n) u ~ 5.7e-6, the merge adds one rescale per part (~18 u ~ 1e-6): within 2e-5.
TEST_P(PagedAttentionCpuTest, SplitKvLongDecodeMatchesReference) {
  const Shape sh = GetParam();
  const std::vector<Seq> seqs = {{9000, 1}, {513, 1}, {4097, 16}, {1030, 17}, {7000, 2}};
  const Batch b(seqs, sh, 7 + sh.page_size * 3 + sh.head_dim + sh.group * 11);
  std::vector<float> out, out3, ref;
  PagedAttentionRef(b.Params(ref), 0);
  PagedAttentionCpu(b.Params(out), 1);
  PagedAttentionCpu(b.Params(out3), 3);
  ExpectClose(out, ref, sh.head_dim, "split-KV dense");
  EXPECT_EQ(out, out3) << "split-KV results depend on the thread count";
  const RandomIndex x(b, 1, sh.page_size, 0.4, 0.01, 23);
  PagedAttentionRef(b.Params(ref, &x.index), 0);
  PagedAttentionCpu(b.Params(out, &x.index), 3);
  ExpectClose(out, ref, sh.head_dim, "split-KV sparse");
}

// Rows of a KV head's query heads that list the same keys run as items over the group (each
// K/V row read once; query blocks longer than a dense item's 128 / group queries cut into
// sub-items of that many, qb 64 and 128 below); groups that do not share, and shares over
// split-KV parts, stay exact. With group_shared_rows off (one item per row, the A/B baseline
// of the benchmarks) the same holds.
TEST_P(PagedAttentionCpuTest, GroupSharedRowsMatchReference) {
  const Shape sh = GetParam();
  const std::vector<Seq> seqs = {{9000, 1}, {700, 1}, {5 * sh.page_size + 1, 3}, {517, 131},
                                 {300, 300}};
  const Batch b(seqs, sh, 41 + sh.page_size * 3 + sh.head_dim + sh.group * 5);
  for (const auto& [qb, pb, pc] : {std::tuple{1, 0.0, 0.1}, std::tuple{1, 0.3, 0.02},
                                   std::tuple{16, 0.3, 0.02}, std::tuple{64, 0.3, 0.02},
                                   std::tuple{128, 0.2, 0.01}}) {
    const RandomIndex x(b, qb, sh.page_size, pb, pc, 29 + qb, sh.group);
    std::vector<float> out, out1, ref;
    PagedAttentionRef(b.Params(ref, &x.index), 0);
    PagedAttentionCpu(b.Params(out, &x.index), 3);
    PagedAttentionCpu(b.Params(out1, &x.index), 1);
    ExpectClose(out, ref, sh.head_dim, "group-shared rows qb " + std::to_string(qb));
    EXPECT_EQ(out, out1) << "group-shared results depend on the thread count";
    std::vector<float> per_row;
    PagedAttentionCpu(b.Params(per_row, &x.index), 3, {.group_shared_rows = false});
    ExpectClose(per_row, ref, sh.head_dim, "per-row items qb " + std::to_string(qb));
  }
}

// 16-bit KV caches (bfloat16, float16). The batch's K and V are rounded to the 16-bit type (its
// bit patterns passed to the kernel) and replaced by their exact fp32 widening, on which the
// reference and the fp32 kernel run. Tolerance: the kernel widens every K and V element exactly
// and then does the fp32 instantiation's arithmetic in the same order, so its inputs are the
// reference's inputs and the fp32 derivation above applies unchanged (kRelTol); and its output
// must equal the fp32 kernel's on the widened cache bit for bit (one code path). Covers dense,
// sparse (decode pages, prefill blocks with columns, group-shared rows), split-KV decode over
// 9000 keys, prefill chunks, and every block listed == dense bitwise. (Bitwise where the sparse
// items cut the rows as the dense ones do: query blocks of a dense item's 128 / group queries.
// Other cuts change which items are split-KV parts, hence the order of the sums; they are
// compared within kRelTol, as EveryBlockListedEqualsDense does for fp32.)
struct Kv16 {
  std::vector<uint16_t> k, v;
  KvDtype dtype;
  Kv16(Batch& b, KvDtype t) : k(RoundToKv16(b.k, t)), v(RoundToKv16(b.v, t)), dtype(t) {}
  PagedKvCache Cache() const { return {k.data(), v.data(), dtype}; }
};

TEST_P(PagedAttentionCpuTest, Kv16MatchesReferenceOnRoundedKv) {
  const Shape sh = GetParam();
  std::vector<Seq> seqs = MixedSeqs(sh.page_size);
  seqs.push_back({9000, 1});   // split-KV decode
  seqs.push_back({4097, 16});  // split-KV short chunk
  for (const KvDtype t : {KvDtype::kBfloat16, KvDtype::kFloat16}) {
    const std::string name = KvDtypeName(t);
    Batch b(seqs, sh, 61 + sh.page_size * 3 + sh.head_dim + sh.group * 7 + static_cast<int>(t));
    const Kv16 kv(b, t);
    std::vector<float> ref, out, out32;
    PagedAttentionRef(b.Params(ref), 0);
    PagedAttentionCpu(b.Params(out), kv.Cache(), 2);
    PagedAttentionCpu(b.Params(out32), 2);
    ExpectClose(out, ref, sh.head_dim, name + " dense");
    EXPECT_EQ(out, out32) << name << " dense differs from the fp32 kernel on the widened cache";
    const std::vector<float> dense = out;
    const struct {
      int qb, kb;
      double pb, pc;
      int share;
    } cases[] = {{1, sh.page_size, 0.5, 0.0, 1},
                 {1, sh.page_size, 0.3, 0.01, sh.group},
                 {16, 16, 0.3, 0.02, 1},
                 {128 / sh.group, sh.page_size, 1.0, 0.0, 1}};  // every block listed
    uint32_t seed = 3;
    for (const auto& c : cases) {
      const std::string what = name + " sparse qb " + std::to_string(c.qb) + " pb " +
                               std::to_string(c.pb) + " share " + std::to_string(c.share);
      const RandomIndex x(b, c.qb, c.kb, c.pb, c.pc, seed++, c.share);
      PagedAttentionRef(b.Params(ref, &x.index), 0);
      PagedAttentionCpu(b.Params(out, &x.index), kv.Cache(), 2);
      PagedAttentionCpu(b.Params(out32, &x.index), 2);
      ExpectClose(out, ref, sh.head_dim, what);
      EXPECT_EQ(out, out32) << what << ": differs from the fp32 kernel on the widened cache";
      if (c.pb == 1.0) {
        EXPECT_EQ(out, dense) << what << ": every block listed != dense";
      }
    }
  }
}

// FloatToF16 (the tests' float16 caches) rounds to nearest even: every binary16 value survives
// a round trip, and midpoints between neighbours go to the even one.
TEST(HalfTest, FloatToF16RoundsToNearestEven) {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    const float f = F16ToFloat(bits);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16(f))));
      continue;
    }
    ASSERT_EQ(FloatToF16(f), bits) << h;
    if ((h & 0x7fffu) >= 0x7bffu) continue;  // the next value up is inf
    const float next = F16ToFloat(static_cast<uint16_t>(h + 1));
    const float mid = 0.5f * (f + next);     // exact in fp32
    ASSERT_EQ(FloatToF16(mid), (h & 1u) ? h + 1 : h) << h;
  }
  EXPECT_EQ(FloatToF16(65520.0f), 0x7c00u);
  EXPECT_EQ(FloatToF16(65519.0f), 0x7bffu);
  EXPECT_EQ(FloatToF16(std::ldexp(1.0f, -25)), 0u);  // half the smallest subnormal: tie to 0
  EXPECT_EQ(FloatToF16(std::ldexp(1.5f, -25)), 1u);
}

std::vector<Shape> Shapes() {
  std::vector<Shape> shapes;
  for (int page_size : {1, 4, 16, 64}) {
    for (int head_dim : {64, 128}) {
      for (int group : {1, 2, 4, 8}) shapes.push_back({page_size, head_dim, group});
    }
  }
  // The cpu backend's head-major pages (paged_attention.h): every test again on a subset.
  for (int page_size : {4, 16}) {
    for (int head_dim : {64, 128}) {
      for (int group : {1, 4}) {
        shapes.push_back({page_size, head_dim, group, KvLayout::kHeadMajor});
      }
    }
  }
  return shapes;
}

INSTANTIATE_TEST_SUITE_P(Sweep, PagedAttentionCpuTest, ::testing::ValuesIn(Shapes()), Name);

}  // namespace
}  // namespace sieve::kernels
