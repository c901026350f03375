// Block-sparse paged prefill on the GPU (PagedPrefillRun with p.sparse, the mma.sync and the
// wgmma kernels) against PagedAttentionRef with the same block-sparse index (label `gpu`): random bf16 inputs on
// shuffled pages, several sequences in one batch (fresh prompts and chunks over earlier keys,
// chunk starts aligned to 128 and not), random key-block subsets per (query block, head) with
// key blocks of 64, 128 and 256 keys, rows that list nothing, and every block listed (= dense).
//
// Tolerance: relative L2 error <= 1e-2 and max abs error <= 2e-2, as the dense prefill test: P
// and the output are rounded to bf16 (2^-8 relative), outputs are averages of unit-variance
// values, which gives a few 1e-3 relative.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_prefill.h"
#include "kernels/cpu/half.h"

namespace sieve::kernels {
namespace {

constexpr int kPage = 16, kQueryBlock = 128;

template <typename T>
T* Upload(const std::vector<T>& h) {
  T* d = nullptr;
  cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T));
  cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

struct Case {
  int d, hkv, group, key_block;
  double keep;  // probability that a causal key block is listed
};

class SparsePrefillGpuTest : public ::testing::TestWithParam<Case> {};

TEST_P(SparsePrefillGpuTest, MatchesTheReferenceOnTheSameIndex) {
  const Case c = GetParam();
  const char* env = std::getenv("SIEVE_TEST_SEED");
  std::mt19937_64 rng((env ? std::strtoull(env, nullptr, 10) : 20261205ull) + c.key_block);
  const int d = c.d, hkv = c.hkv, hq = hkv * c.group;
  // (kv_len, q_len): a fresh prompt, a chunk aligned to 128, a chunk starting mid-block, a
  // one-query sequence.
  const std::vector<std::pair<int, int>> seqs = {{700, 700}, {1280, 512}, {1000, 333}, {90, 1}};
  const int n = static_cast<int>(seqs.size());
  int stride = 0, total_pages = 0, tokens = 0;
  for (auto [kv, q] : seqs) {
    stride = std::max(stride, (kv + kPage - 1) / kPage);
    total_pages += (kv + kPage - 1) / kPage;
    tokens += q;
  }
  std::vector<int32_t> ids(total_pages + 2);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> table(n * stride, ids.back()), kv_lens, query_start = {0};
  int next = 0;
  for (int s = 0; s < n; ++s) {
    for (int j = 0; j * kPage < seqs[s].first; ++j) table[s * stride + j] = ids[next++];
    kv_lens.push_back(seqs[s].first);
    query_start.push_back(query_start.back() + seqs[s].second);
  }
  const size_t kv_elems = ids.size() * kPage * hkv * d;
  std::uniform_real_distribution<float> u(-1.7f, 1.7f);
  std::vector<uint16_t> q(static_cast<size_t>(tokens) * hq * d), k(kv_elems), v(kv_elems);
  for (auto& x : q) x = FloatToBf16(u(rng));
  for (auto& x : k) x = FloatToBf16(u(rng));
  for (auto& x : v) x = FloatToBf16(u(rng));
  for (bool all : {false, true}) {
    SCOPED_TRACE(all ? "every causal block" : "random blocks");
    // The index: per (query block, head) a random subset of the causal key blocks.
    std::bernoulli_distribution keep(c.keep);
    std::vector<int32_t> qbs = {0}, row_start = {0}, blocks;
    for (int s = 0; s < n; ++s) {
      const int q_len = seqs[s].second, first = seqs[s].first - q_len;
      const int qblocks = (q_len + kQueryBlock - 1) / kQueryBlock;
      qbs.push_back(qbs.back() + qblocks);
      for (int b = 0; b < qblocks; ++b) {
        const int last_pos = first + std::min(q_len, (b + 1) * kQueryBlock) - 1;
        for (int h = 0; h < hq; ++h) {
          for (int j = 0; j * c.key_block <= last_pos; ++j) {
            if (all || keep(rng)) blocks.push_back(j);
          }
          row_start.push_back(static_cast<int32_t>(blocks.size()));
        }
      }
    }
    // Reference.
    std::vector<float> qf(q.size()), kf(k.size()), vf(v.size()), want(q.size());
    for (size_t i = 0; i < q.size(); ++i) qf[i] = Bf16ToFloat(q[i]);
    for (size_t i = 0; i < k.size(); ++i) kf[i] = Bf16ToFloat(k[i]);
    for (size_t i = 0; i < v.size(); ++i) vf[i] = Bf16ToFloat(v[i]);
    SparseAttentionIndex idx;
    idx.query_block = kQueryBlock;
    idx.key_block = c.key_block;
    idx.query_block_start = qbs.data();
    idx.row_start = row_start.data();
    idx.key_blocks = blocks.data();
    PagedAttentionParams<float> rp;
    rp.q = qf.data();
    rp.k_cache = kf.data();
    rp.v_cache = vf.data();
    rp.out = want.data();
    rp.page_table = table.data();
    rp.kv_lens = kv_lens.data();
    rp.query_start = query_start.data();
    rp.page_table_stride = stride;
    rp.num_seqs = n;
    rp.num_q_heads = hq;
    rp.num_kv_heads = hkv;
    rp.head_dim = d;
    rp.page_size = kPage;
    rp.scale = 1.0f / std::sqrt(static_cast<float>(d));
    rp.sparse = &idx;
    PagedAttentionRef(rp, 0);
    // GPU.
    auto* dq = reinterpret_cast<__nv_bfloat16*>(Upload(q));
    auto* dk = reinterpret_cast<__nv_bfloat16*>(Upload(k));
    auto* dv = reinterpret_cast<__nv_bfloat16*>(Upload(v));
    std::vector<uint16_t> poison(q.size(), 0x7fc0);
    auto* dout = reinterpret_cast<__nv_bfloat16*>(Upload(poison));
    int32_t *dtable = Upload(table), *dkv = Upload(kv_lens), *dqs = Upload(query_start);
    int32_t *dqbs = Upload(qbs), *drs = Upload(row_start), *dblocks = Upload(blocks);
    SparseAttentionIndex didx = idx;
    didx.query_block_start = dqbs;
    didx.row_start = drs;
    didx.key_blocks = dblocks;
    PagedAttentionParams<__nv_bfloat16> p;
    p.q = dq;
    p.k_cache = dk;
    p.v_cache = dv;
    p.out = dout;
    p.page_table = dtable;
    p.kv_lens = dkv;
    p.query_start = dqs;
    p.page_table_stride = stride;
    p.num_seqs = n;
    p.num_q_heads = hq;
    p.num_kv_heads = hkv;
    p.head_dim = d;
    p.page_size = kPage;
    p.scale = rp.scale;
    p.sparse = &didx;
    PagedPrefillShape shape{n, hq, hkv, d, 700};
    int dev = 0, sms = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    // Both kernels run an index of 128-query blocks whose key blocks are whole tiles (mma.sync:
    // 64 keys, wgmma: 128 keys); the wgmma kernel refuses 64-key blocks.
    for (PagedPrefillKernel kernel : {PagedPrefillKernel::kMmaSync, PagedPrefillKernel::kWgmma}) {
      const bool wgmma = kernel == PagedPrefillKernel::kWgmma;
      SCOPED_TRACE(wgmma ? "wgmma" : "mma.sync");
      const PagedPrefillPlan plan = Plan(shape, sms, kernel);
      if (wgmma && c.key_block % 128 != 0) {
        EXPECT_EQ(PagedPrefillRun(p, plan, nullptr, nullptr), cudaErrorInvalidValue);
        continue;
      }
      cudaMemcpy(dout, poison.data(), poison.size() * 2, cudaMemcpyHostToDevice);
      ASSERT_EQ(PagedPrefillRun(p, plan, nullptr, nullptr), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<uint16_t> got(q.size());
      cudaMemcpy(got.data(), dout, got.size() * 2, cudaMemcpyDeviceToHost);
      double e2 = 0, r2 = 0, max_abs = 0;
      for (size_t i = 0; i < want.size(); ++i) {
        const double e = double{Bf16ToFloat(got[i])} - want[i];
        ASSERT_TRUE(std::isfinite(e)) << "output element " << i;
        e2 += e * e;
        r2 += double{want[i]} * want[i];
        max_abs = std::max(max_abs, std::abs(e));
      }
      EXPECT_LE(std::sqrt(e2 / std::max(r2, 1e-30)), 1e-2);
      EXPECT_LE(max_abs, 2e-2);
    }
    for (void* ptr : {static_cast<void*>(dq), static_cast<void*>(dk), static_cast<void*>(dv),
                      static_cast<void*>(dout), static_cast<void*>(dtable),
                      static_cast<void*>(dkv), static_cast<void*>(dqs), static_cast<void*>(dqbs),
                      static_cast<void*>(drs), static_cast<void*>(dblocks)}) {
      cudaFree(ptr);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, SparsePrefillGpuTest,
                         ::testing::Values(Case{128, 2, 4, 128, 0.4}, Case{64, 4, 1, 64, 0.3},
                                           Case{128, 1, 8, 256, 0.5}, Case{128, 2, 2, 128, 0.05},
                                           Case{64, 2, 2, 128, 0.3}));

}  // namespace
}  // namespace sieve::kernels
