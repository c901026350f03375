// The KV page layouts (paged_attention.h: token-major, as the CUDA kernels read it; head-major,
// the cpu backend's) hold the same rows in another order, so every CPU reader of the cache must
// give bit-identical results on a batch and on its head-major copy: attention (the reference and
// the fast kernel, dense, sparse and decode), Quest's page bounds, DoubleSparsity's labels and the
// MInference and XAttention estimators. A reader that ignored the layout would read other rows.
#include <cstdint>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/attention/paged_kv_test_util.h"
#include "kernels/sparse/double_sparsity.h"
#include "kernels/sparse/minference.h"
#include "kernels/sparse/quest.h"
#include "kernels/sparse/xattention.h"

namespace sieve::kernels {
namespace {

using test_util::PagedBatch;

// `pool` (token-major pages) rewritten head-major.
std::vector<float> HeadMajor(const std::vector<float>& pool, int pages, int ps, int kvh, int d) {
  std::vector<float> out(pool.size());
  for (int p = 0; p < pages; ++p) {
    for (int t = 0; t < ps; ++t) {
      for (int g = 0; g < kvh; ++g) {
        const int64_t from = KvRowOffset(KvLayout::kTokenMajor, p, t, g, ps, kvh, d);
        const int64_t to = KvRowOffset(KvLayout::kHeadMajor, p, t, g, ps, kvh, d);
        std::memcpy(out.data() + to, pool.data() + from, sizeof(float) * d);
      }
    }
  }
  return out;
}

// A batch and its head-major twin (same q, K and V rows).
struct Twins {
  PagedBatch tok, head;
  Twins(const std::vector<test_util::SeqLens>& seqs, int ps, int d, int qh, int kvh, uint32_t seed)
      : tok(seqs, ps, d, qh, kvh, seed), head(tok) {
    head.layout = KvLayout::kHeadMajor;
    head.k = HeadMajor(tok.k, tok.num_pages, ps, kvh, d);
    head.v = HeadMajor(tok.v, tok.num_pages, ps, kvh, d);
  }
};

TEST(KvLayoutTest, RowOffsetsOfBothLayoutsCoverEveryRowOnce) {
  constexpr int kPs = 16, kKvh = 3, kD = 8, kPages = 2;
  for (const KvLayout l : {KvLayout::kTokenMajor, KvLayout::kHeadMajor}) {
    std::vector<int> seen(kPages * kPs * kKvh, 0);
    for (int p = 0; p < kPages; ++p) {
      for (int t = 0; t < kPs; ++t) {
        for (int g = 0; g < kKvh; ++g) {
          const int64_t at = KvRowOffset(l, p, t, g, kPs, kKvh, kD);
          ASSERT_EQ(at % kD, 0);
          ASSERT_GE(at, int64_t{p} * kPs * kKvh * kD);  // inside its page
          ASSERT_LT(at, int64_t{p + 1} * kPs * kKvh * kD);
          ++seen[at / kD];
        }
      }
    }
    for (const int s : seen) EXPECT_EQ(s, 1);
  }
  // Head-major: one head's rows of a page are consecutive.
  EXPECT_EQ(KvRowOffset(KvLayout::kHeadMajor, 1, 5, 2, kPs, kKvh, kD) -
                KvRowOffset(KvLayout::kHeadMajor, 1, 4, 2, kPs, kKvh, kD),
            kD);
}

TEST(KvLayoutTest, AttentionIsTheSameOnBothLayouts) {
  // Prefill chunks, long decodes (split along the keys) and a GQA group of 4.
  const Twins w({{1, 1}, {700, 1}, {3000, 1}, {517, 131}, {96, 96}}, 16, 64, 8, 2, 21);
  std::vector<float> a;
  for (const int threads : {1, 2}) {
    std::vector<float> b;
    PagedAttentionCpu(w.tok.Params(a), threads);
    PagedAttentionCpu(w.head.Params(b), threads);
    EXPECT_EQ(a, b) << "fast kernel, " << threads << " threads";
  }
  std::vector<float> ra, rb;
  PagedAttentionRef(w.tok.Params(ra), 2);
  PagedAttentionRef(w.head.Params(rb), 2);
  EXPECT_EQ(ra, rb) << "reference";
  // A sparse index: every other page of each decode row, columns on the prefill rows.
  SparseAttentionIndex x;
  x.query_block = 1;
  x.key_block = 16;
  std::vector<int32_t> qbs{0}, row_start{0}, blocks;
  const int heads = 8;
  for (size_t s = 0; s < w.tok.kv_lens.size(); ++s) {
    const int q_len = w.tok.query_start[s + 1] - w.tok.query_start[s];
    qbs.push_back(qbs.back() + q_len);
    for (int j = 0; j < q_len; ++j) {
      for (int h = 0; h < heads; ++h) {
        // Query heads 0-3 (KV head 0) share one page set; 4-7 alternate.
        const int first = h < 4 ? 0 : (h + j) % 2;
        for (int kb = first; kb * 16 < w.tok.kv_lens[s]; kb += 2) blocks.push_back(kb);
        row_start.push_back(static_cast<int32_t>(blocks.size()));
      }
    }
  }
  x.query_block_start = qbs.data();
  x.row_start = row_start.data();
  x.key_blocks = blocks.data();
  std::vector<float> sa, sb, sra, srb;
  for (const bool shared : {true, false}) {
    PagedAttentionCpuOptions o;
    o.group_shared_rows = shared;
    PagedAttentionCpu(w.tok.Params(sa, &x), 2, o);
    PagedAttentionCpu(w.head.Params(sb, &x), 2, o);
    EXPECT_EQ(sa, sb) << "sparse, fast kernel, group_shared_rows " << shared;
  }
  PagedAttentionRef(w.tok.Params(sra, &x), 2);
  PagedAttentionRef(w.head.Params(srb, &x), 2);
  EXPECT_EQ(sra, srb) << "sparse, reference";
  EXPECT_NE(sa, a) << "the sparse index must change the output for the check to mean anything";
}

TEST(KvLayoutTest, QuestBoundsAndDsLabelsAreTheSameOnBothLayouts) {
  constexpr int kPs = 16, kD = 64, kKvh = 2, kQh = 8;
  const Twins w({{300, 300}, {77, 77}}, kPs, kD, kQh, kKvh, 5);
  // Quest: every written slot appended in position order.
  std::vector<int64_t> slots;
  for (size_t s = 0; s < w.tok.kv_lens.size(); ++s) {
    for (int t = 0; t < w.tok.kv_lens[s]; ++t) slots.push_back(w.tok.Slot(static_cast<int>(s), t));
  }
  const int64_t region = QuestRegionFloats(kD, false);
  std::vector<float> ba(w.tok.num_pages * kKvh * region, -5.0f), bb = ba;
  for (const auto& [batch, bounds] : {std::pair{&w.tok, &ba}, std::pair{&w.head, &bb}}) {
    QuestBoundsUpdate u;
    u.k_cache = batch->k.data();
    u.kv_layout = batch->layout;
    u.bounds = bounds->data();
    u.slots = slots.data();
    u.num_tokens = static_cast<int32_t>(slots.size());
    u.num_kv_heads = kKvh;
    u.head_dim = kD;
    u.page_size = kPs;
    QuestUpdateBounds(u);
  }
  EXPECT_EQ(ba, bb) << "Quest page bounds";
  std::vector<float> ra(2 * kD), rb(2 * kD);
  const int32_t page = w.tok.page_table[1];
  QuestBoundsRef(w.tok.k.data(), page, 1, kPs, kKvh, kD, kPs, ra.data());
  QuestBoundsRef(w.head.k.data(), page, 1, kPs, kKvh, kD, kPs, rb.data(), KvLayout::kHeadMajor);
  EXPECT_EQ(ra, rb) << "Quest reference bounds";
  // DoubleSparsity: labels of every token read from the cache.
  DoubleSparsityShape sh;
  sh.num_q_heads = kQh;
  sh.num_kv_heads = kKvh;
  sh.head_dim = kD;
  sh.page_size = kPs;
  sh.channels = 8;
  std::vector<int32_t> channels(DsLabelHeads(sh) * sh.channels);
  for (size_t i = 0; i < channels.size(); ++i) {
    channels[i] = static_cast<int32_t>((i * 7 + i / sh.channels) % kD);
  }
  ASSERT_EQ(DsValidateChannels(sh, channels.data()), "");
  const std::vector<int32_t> all_new{0, w.tok.kv_lens[0], w.tok.kv_lens[0] + w.tok.kv_lens[1]};
  std::vector<uint8_t> la(w.tok.num_pages * DsLabelPageBytes(sh), 0), lb = la;
  for (const auto& [batch, labels] : {std::pair{&w.tok, &la}, std::pair{&w.head, &lb}}) {
    DsAppendParams p;
    p.k_cache = batch->k.data();
    p.kv_layout = batch->layout;
    p.page_table = batch->page_table.data();
    p.page_table_stride = batch->stride;
    p.kv_lens = batch->kv_lens.data();
    p.query_start = all_new.data();
    p.num_seqs = 2;
    p.channels = channels.data();
    p.labels = labels->data();
    DsWriteLabels(sh, p, 2);
  }
  EXPECT_EQ(la, lb) << "DoubleSparsity labels";
  EXPECT_NE(la, std::vector<uint8_t>(la.size(), 0)) << "no label written";
}

TEST(KvLayoutTest, PrefillEstimatorsAreTheSameOnBothLayouts) {
  constexpr int kPs = 16, kD = 64, kKvh = 2, kQh = 4;
  const Twins w({{2000, 700}}, kPs, kD, kQh, kKvh, 9);
  // MInference: vertical-slash scores (fp64 reference and fp32 fast path) and block-sparse picks.
  for (int h = 0; h < kQh; ++h) {
    minference::VsScores ra, rb;
    minference::VsScoresRef(w.tok.Params(), 0, h, minference::kDefaultLastQ, &ra);
    minference::VsScoresRef(w.head.Params(), 0, h, minference::kDefaultLastQ, &rb);
    EXPECT_EQ(ra.vertical, rb.vertical) << "head " << h;
    EXPECT_EQ(ra.slash, rb.slash) << "head " << h;
    std::vector<float> va(2000), sa(2000), vb(2000), sb(2000);
    minference::VsScoresCpu(w.tok.Params(), 0, h, minference::kDefaultLastQ, va.data(), sa.data());
    minference::VsScoresCpu(w.head.Params(), 0, h, minference::kDefaultLastQ, vb.data(),
                            sb.data());
    EXPECT_EQ(va, vb) << "head " << h;
    EXPECT_EQ(sa, sb) << "head " << h;
    std::vector<int32_t> oa, ba, ob, bb;
    minference::BlockSparseCpu(w.tok.Params(), 0, h, 5, &oa, &ba);
    minference::BlockSparseCpu(w.head.Params(), 0, h, 5, &ob, &bb);
    EXPECT_EQ(ba, bb) << "head " << h;
    minference::BlockSparseRef(w.tok.Params(), 0, h, 5, &oa, &ba);
    minference::BlockSparseRef(w.head.Params(), 0, h, 5, &ob, &bb);
    EXPECT_EQ(ba, bb) << "head " << h;
  }
  // XAttention: antidiagonal block mass, fp64 reference and fast path.
  auto xparams = [&](const PagedBatch& b) {
    XAttentionParams p;
    p.q = b.q.data();
    p.q_row_stride = int64_t{kQh} * kD;
    p.k_cache = b.k.data();
    p.page_table = b.page_table.data();
    p.page_size = kPs;
    p.kv_layout = b.layout;
    p.num_q_heads = kQh;
    p.num_kv_heads = kKvh;
    p.head_dim = kD;
    p.q_len = 700;
    p.kv_len = 2000;
    return p;
  };
  const XAttentionParams xa = xparams(w.tok), xb = xparams(w.head);
  const int64_t cells =
      int64_t{kQh} * XAttentionQueryBlocks(xa) * XAttentionKeyBlocks(xa);
  std::vector<double> ma(cells), mb(cells);
  XAttentionBlockMassRef(xa, ma.data());
  XAttentionBlockMassRef(xb, mb.data());
  EXPECT_EQ(ma, mb) << "XAttention reference";
  std::vector<float> fa(cells), fb(cells);
  XAttentionBlockMassCpu(xa, fa.data(), 2);
  XAttentionBlockMassCpu(xb, fb.data(), 2);
  EXPECT_EQ(fa, fb) << "XAttention fast path";
}

}  // namespace
}  // namespace sieve::kernels
