// PagedAttentionRef with a sparse index: every block listed equals dense attention exactly, and
// a random subset of key blocks and columns equals an independent masked softmax over
// contiguous copies of the keys, on fresh random inputs for several page, query-block and
// key-block sizes, batched sequences of different lengths and GQA.
#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention/paged_attention.h"

namespace sieve::kernels {
namespace {

struct Shape {
  int page_size, query_block, key_block;
};

class SparseRefTest : public ::testing::TestWithParam<Shape> {
 protected:
  // Two sequences: (kv_len, q_len) = (70, 70) (a whole prompt) and (45, 9) (a chunk).
  void SetUp() override {
    const Shape sh = GetParam();
    ps_ = sh.page_size;
    kv_lens_ = {70, 45};
    q_lens_ = {70, 9};
    query_start_ = {0, q_lens_[0], q_lens_[0] + q_lens_[1]};
    const int tokens = query_start_.back();
    stride_ = (kv_lens_[0] + ps_ - 1) / ps_;
    const int pages = stride_ * 2 + 3;
    std::mt19937 rng(1234 + ps_ * 31 + sh.query_block * 7 + sh.key_block);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    k_.resize(static_cast<size_t>(pages) * ps_ * kKv * kD);
    v_.resize(k_.size());
    q_.resize(static_cast<size_t>(tokens) * kQ * kD);
    for (auto* vec : {&k_, &v_, &q_}) {
      for (float& x : *vec) x = u(rng);
    }
    // Pages in a shuffled order, so that page order differs from position order.
    std::vector<int> ids(pages);
    for (int i = 0; i < pages; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), rng);
    page_table_.assign(2 * stride_, 0);
    for (int i = 0; i < 2 * stride_; ++i) page_table_[i] = ids[i];
  }

  PagedAttentionParams<float> Params(std::vector<float>& out) {
    out.assign(q_.size(), -5.0f);
    PagedAttentionParams<float> p;
    p.q = q_.data();
    p.k_cache = k_.data();
    p.v_cache = v_.data();
    p.out = out.data();
    p.page_table = page_table_.data();
    p.kv_lens = kv_lens_.data();
    p.query_start = query_start_.data();
    p.page_table_stride = stride_;
    p.num_seqs = 2;
    p.num_q_heads = kQ;
    p.num_kv_heads = kKv;
    p.head_dim = kD;
    p.page_size = ps_;
    p.scale = 0.3f;
    return p;
  }

  // The index listing, per row, key blocks kept with probability `keep` (all when keep >= 1)
  // and, when `columns`, a few single positions outside the kept blocks.
  void BuildIndex(double keep, bool columns, std::mt19937& rng) {
    const Shape sh = GetParam();
    qbs_ = {0};
    for (int s = 0; s < 2; ++s) qbs_.push_back(qbs_.back() + (q_lens_[s] + sh.query_block - 1) / sh.query_block);
    rows_ = {0};
    cols_start_ = {0};
    blocks_.clear();
    cols_.clear();
    std::bernoulli_distribution take(std::min(keep, 1.0));
    for (int s = 0; s < 2; ++s) {
      const int nkb = (kv_lens_[s] + sh.key_block - 1) / sh.key_block;
      for (int b = qbs_[s]; b < qbs_[s + 1]; ++b) {
        for (int h = 0; h < kQ; ++h) {
          std::set<int> kept;
          for (int j = 0; j < nkb; ++j) {
            if (keep >= 1.0 || take(rng)) {
              blocks_.push_back(j);
              kept.insert(j);
            }
          }
          rows_.push_back(static_cast<int32_t>(blocks_.size()));
          if (columns) {
            for (int t = 0; t < kv_lens_[s]; t += 5) {
              if (!kept.count(t / sh.key_block) && take(rng)) cols_.push_back(t);
            }
          }
          cols_start_.push_back(static_cast<int32_t>(cols_.size()));
        }
      }
    }
    index_.query_block = sh.query_block;
    index_.key_block = sh.key_block;
    index_.query_block_start = qbs_.data();
    index_.row_start = rows_.data();
    index_.key_blocks = blocks_.data();
    index_.column_start = columns ? cols_start_.data() : nullptr;
    index_.columns = cols_.data();
  }

  // Whether the index lets row `r` read position t.
  bool Listed(int r, int t) const {
    for (int i = rows_[r]; i < rows_[r + 1]; ++i) {
      if (blocks_[i] == t / index_.key_block) return true;
    }
    if (index_.column_start != nullptr) {
      for (int i = cols_start_[r]; i < cols_start_[r + 1]; ++i) {
        if (cols_[i] == t) return true;
      }
    }
    return false;
  }

  // Independent check: copy each sequence's keys and values out of the pages, then a masked
  // softmax per (query, head).
  void ExpectMatchesMaskedSoftmax(const std::vector<float>& out) const {
    const int group = kQ / kKv;
    for (int s = 0; s < 2; ++s) {
      for (int j = 0; j < q_lens_[s]; ++j) {
        const int token = query_start_[s] + j;
        const int pos = kv_lens_[s] - q_lens_[s] + j;
        for (int h = 0; h < kQ; ++h) {
          const int row = (qbs_[s] + j / index_.query_block) * kQ + h;
          std::vector<double> w;
          std::vector<int> ts;
          double mx = -INFINITY;
          for (int t = 0; t <= pos; ++t) {
            if (!Listed(row, t)) continue;
            const float* k = Kv(k_, s, t, h / group);
            double dot = 0;
            for (int i = 0; i < kD; ++i) dot += double{q_[(token * kQ + h) * kD + i]} * k[i];
            w.push_back(dot * 0.3);
            ts.push_back(t);
            mx = std::max(mx, w.back());
          }
          for (int i = 0; i < kD; ++i) {
            double num = 0, den = 0;
            for (size_t n = 0; n < w.size(); ++n) {
              const double e = std::exp(w[n] - mx);
              den += e;
              num += e * Kv(v_, s, ts[n], h / group)[i];
            }
            const double want = w.empty() ? 0.0 : num / den;
            ASSERT_NEAR(out[(token * kQ + h) * kD + i], want, 1e-5)
                << "seq " << s << " query " << j << " head " << h << " dim " << i;
          }
        }
      }
    }
  }

  const float* Kv(const std::vector<float>& cache, int s, int t, int kv_head) const {
    const int64_t page = page_table_[s * stride_ + t / ps_];
    return cache.data() + ((page * ps_ + t % ps_) * kKv + kv_head) * kD;
  }

  static constexpr int kQ = 4, kKv = 2, kD = 16;
  int ps_ = 0, stride_ = 0;
  std::vector<int32_t> kv_lens_, q_lens_, query_start_, page_table_;
  std::vector<float> q_, k_, v_;
  std::vector<int32_t> qbs_, rows_, blocks_, cols_start_, cols_;
  SparseAttentionIndex index_;
};

TEST_P(SparseRefTest, EveryBlockListedEqualsDenseExactly) {
  std::vector<float> dense, sparse;
  PagedAttentionRef(Params(dense), 2);
  std::mt19937 rng(1);
  BuildIndex(1.0, /*columns=*/false, rng);
  PagedAttentionParams<float> p = Params(sparse);
  p.sparse = &index_;
  PagedAttentionRef(p, 2);
  EXPECT_EQ(sparse, dense);
}

TEST_P(SparseRefTest, RandomBlocksAndColumnsEqualAMaskedSoftmax) {
  for (int seed = 0; seed < 3; ++seed) {
    std::mt19937 rng(seed);
    BuildIndex(0.4, /*columns=*/true, rng);
    std::vector<float> out;
    PagedAttentionParams<float> p = Params(out);
    p.sparse = &index_;
    PagedAttentionRef(p, 1);
    ExpectMatchesMaskedSoftmax(out);
  }
}

TEST_P(SparseRefTest, ARowWithNothingToReadGivesZeros) {
  std::mt19937 rng(9);
  BuildIndex(0.0, /*columns=*/false, rng);
  std::vector<float> out;
  PagedAttentionParams<float> p = Params(out);
  p.sparse = &index_;
  PagedAttentionRef(p, 1);
  for (float x : out) ASSERT_EQ(x, 0.0f);
}

INSTANTIATE_TEST_SUITE_P(Shapes, SparseRefTest,
                         ::testing::Values(Shape{16, 64, 16}, Shape{16, 1, 16}, Shape{4, 8, 32},
                                           Shape{8, 16, 8}, Shape{1, 3, 5}));

}  // namespace
}  // namespace sieve::kernels
