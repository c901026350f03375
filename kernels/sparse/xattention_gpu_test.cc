// XAttention's block-mass estimator on the GPU (xattention_cuda.h) against the fp64 reference
// XAttentionBlockMassRef on the same bf16 values (label `gpu`): lengths not multiples of S or B,
// chunks aligned to B and not, GQA and MHA, d 64 and 128, strides 4, 8, 16 and 32 (key groups
// across pages: the independent-tile kernel's page-table path); then the
// threshold selection (XAttentionSelectBlocks, shared with the CPU path) on both; then the
// device selection (XAttentionSelectGpu) and index (XAttentionBuildIndexGpu) against the host's
// on the same masses, exactly: on the estimator's masses at several thresholds, and on masses
// full of ties. The cases include the benchmark's shape (32 query heads, 8 KV heads, d 128,
// S 16, B 128) at 4K tokens, 16K tokens with 8 heads, a 16K prompt's last 4K chunk, and row-tile
// counts 1, 2, 3, 8 and 10 of the tensor-core kernel (128 query groups per tile; the
// independent-tile kernel's bands hold 8).
//
// Tolerance, derived as the CPU fast path's (xattention_test.cc): fp32 accumulation of S * d
// products errs by at most gamma_{S d} sum |q_e k_e| <= gamma_{S d} |Q_a| |K_b| (Cauchy-Schwarz
// over the reshaped rows), so |dz| <= gamma_{S d} max|Q_a| max|K_b| / (sqrt(d) S) (u = 2^-24, and
// 2^-23 for the tensor-core kernel, whose fp32 accumulation may truncate); a block mass
// then moves by at most A (exp(2 dz) - 1), by A n 2^-23 through the fp32 sum of a row's n <=
// kv_len / S + 1 exponentials that normalises it, plus the rounding of the exponentials (expf,
// 2 ulp) and of the block sums: 1e-5 of the row total. (The tensor-core kernel's online softmax
// rescales a row's running sum once per key tile, n / 64 more roundings: inside the n 2^-23.)
//
// The one-sweep kernels (a workspace) compute the same fp32 scores z and row sums L, but a mass
// is sum_r exp(P - E) with P = w + log s (w: the row's max over a warp tile, s: the block's fp32
// sum of at most 32 terms exp(z - w), relative error <= 33 u, u = 2^-24) and E = M + log L
// (M: the row's max). With Z = max|z| and l = log(n + 1): |log s| <= 2 Z + l, |P| <= 3 Z + l,
// |log L| <= l, |E| <= Z + l. The exponent P - E errs by at most: logf (1 ulp, 2u |log s| and
// 2u |log L|), s's sum error (33 u, absolute in log), the two additions (u |P|, u |E|) and the
// subtraction (u (|P| + |E|)): in all <= u (12 Z + 8 l + 33) <= 2^-23 (6 Z + 4 l + 33); each
// entry's share moves by expm1 of that (relative; L's own error is norm_err's, the exp's
// rounding is inside the 1e-5 of the row total). Z is taken as the Cauchy-Schwarz bound + dz.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/half.h"
#include "kernels/sparse/xattention.h"
#include "kernels/sparse/xattention_cuda.h"

namespace sieve::kernels {
namespace {

constexpr int kPage = 16;

struct Case {
  int hq, hkv, d, kv_len, q_len, stride, block;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << "hq" << c.hq << "_hkv" << c.hkv << "_d" << c.d << "_kv" << c.kv_len << "_q" << c.q_len
      << "_S" << c.stride << "_B" << c.block;
}

// Runs XAttentionSelectGpu and XAttentionBuildIndexGpu on `mass` (host copy of the device
// layout) and expects every row's selection, and the index, to equal the host's
// (XAttentionSelectBlocks on the same values as doubles; rows of the index in (query block,
// head) order). `per_head` empty: one threshold.
void ExpectDeviceSelectionMatchesHost(XAttentionSelectGpuParams sp, const std::vector<float>& mass,
                                      const std::vector<double>& per_head) {
  SCOPED_TRACE(per_head.empty() ? "threshold " + std::to_string(sp.threshold)
                                : std::string("per-head thresholds"));
  const int rows = sp.num_q_heads * sp.q_blocks, kb = sp.k_blocks;
  ASSERT_EQ(mass.size(), static_cast<size_t>(rows) * kb);
  float* dmass = nullptr;
  int32_t *dcount = nullptr, *dblocks = nullptr, *drs = nullptr, *dkb = nullptr;
  double* dtau = nullptr;
  ASSERT_EQ(cudaMalloc(&dmass, mass.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dcount, rows * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dblocks, mass.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&drs, (rows + 1) * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dkb, mass.size() * 4), cudaSuccess);
  cudaMemcpy(dmass, mass.data(), mass.size() * 4, cudaMemcpyHostToDevice);
  cudaMemset(dcount, 0xff, rows * 4);
  cudaMemset(drs, 0xff, (rows + 1) * 4);
  if (!per_head.empty()) {
    ASSERT_EQ(cudaMalloc(&dtau, per_head.size() * 8), cudaSuccess);
    cudaMemcpy(dtau, per_head.data(), per_head.size() * 8, cudaMemcpyHostToDevice);
    sp.head_thresholds = dtau;
  }
  ASSERT_EQ(XAttentionSelectGpu(sp, dmass, dcount, dblocks, nullptr), cudaSuccess);
  ASSERT_EQ(XAttentionBuildIndexGpu(sp, dcount, dblocks, drs, dkb, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<int32_t> count(rows), blocks(mass.size()), rs(rows + 1);
  cudaMemcpy(count.data(), dcount, rows * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(blocks.data(), dblocks, blocks.size() * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(rs.data(), drs, (rows + 1) * 4, cudaMemcpyDeviceToHost);
  ASSERT_GE(rs[rows], 0);
  std::vector<int32_t> kbl(std::max(rs[rows], 1));
  cudaMemcpy(kbl.data(), dkb, rs[rows] * 4, cudaMemcpyDeviceToHost);
  for (void* ptr : {static_cast<void*>(dmass), static_cast<void*>(dcount),
                    static_cast<void*>(dblocks), static_cast<void*>(drs), static_cast<void*>(dkb),
                    static_cast<void*>(dtau)}) {
    cudaFree(ptr);
  }
  std::vector<int32_t> sel, order, want_rs = {0}, want_kb;
  std::vector<double> row;
  for (int mi = 0; mi < sp.q_blocks; ++mi) {
    for (int h = 0; h < sp.num_q_heads; ++h) {
      const int m = sp.first_query_block + mi, r = h * sp.q_blocks + mi;
      row.assign(mass.begin() + static_cast<size_t>(r) * kb,
                 mass.begin() + static_cast<size_t>(r) * kb + m + 1);
      XAttentionSelectBlocks(row.data(), m, per_head.empty() ? sp.threshold : per_head[h], sel,
                             order);
      ASSERT_EQ(count[r], static_cast<int>(sel.size())) << "head " << h << " query block " << m;
      for (size_t j = 0; j < sel.size(); ++j) {
        ASSERT_EQ(blocks[static_cast<size_t>(r) * kb + j], sel[j])
            << "head " << h << " query block " << m << " entry " << j;
      }
      want_kb.insert(want_kb.end(), sel.begin(), sel.end());
      want_rs.push_back(static_cast<int32_t>(want_kb.size()));
    }
  }
  ASSERT_EQ(rs, want_rs);
  kbl.resize(rs[rows]);
  ASSERT_EQ(kbl, want_kb);
}

// Masses drawn from a few values (many ties, zeros included), per-row totals arbitrary: the tie
// rule (lower index first) and the fp64 walk must match the host exactly.
TEST(XAttentionSelectGpuTest, MatchesTheHostWithTies) {
  std::mt19937 rng(20261205u);
  const float values[] = {0.0f, 0.125f, 0.25f, 0.25f, 0.5f, 1.0f / 3.0f, 3.0f};
  XAttentionSelectGpuParams sp;
  sp.num_q_heads = 3;
  sp.first_query_block = 7;
  sp.q_blocks = 300;  // rows up to 306 blocks: a 512-key sort
  sp.k_blocks = 307;
  std::vector<float> mass(static_cast<size_t>(sp.num_q_heads) * sp.q_blocks * sp.k_blocks);
  for (auto& x : mass) x = values[rng() % 7];
  for (double tau : {0.0, 0.3, 0.9, 1.0, 1.5}) {
    sp.threshold = tau;
    ExpectDeviceSelectionMatchesHost(sp, mass, {});
  }
  ExpectDeviceSelectionMatchesHost(sp, mass, {0.2, 0.95, 0.6});
  // Unsupported shapes are refused without a launch.
  sp.k_blocks = 100;  // first_query_block + q_blocks > k_blocks
  EXPECT_EQ(XAttentionSelectGpu(sp, nullptr, nullptr, nullptr, nullptr), cudaErrorInvalidValue);
}

TEST(XAttentionGpuSupportsTest, RefusesShapesItCannotRun) {
  XAttentionGpuParams p;
  p.page_size = 16;
  p.num_q_heads = 32;
  p.num_kv_heads = 8;
  p.head_dim = 128;
  p.q_len = p.kv_len = 1 << 20;  // 1M tokens: tensor cores yes, CUDA cores no (8192 key blocks)
  EXPECT_TRUE(XAttentionGpuSupports(p));
  p.tensor_cores = false;
  EXPECT_FALSE(XAttentionGpuSupports(p));
  p.kv_len = p.q_len = 4096;
  p.wgmma = true;  // a tensor-core kernel only
  EXPECT_FALSE(XAttentionGpuSupports(p));
  p.wgmma = false;
  EXPECT_TRUE(XAttentionGpuSupports(p));
  p.q_len = p.kv_len = 1 << 20;
  p.tensor_cores = true;
  p.tile_keys = 96;
  EXPECT_FALSE(XAttentionGpuSupports(p));
  p.tile_keys = 128;
  p.head_dim = 96;
  EXPECT_FALSE(XAttentionGpuSupports(p));
  p.head_dim = 128;
  p.block_size = 48;  // B / S = 3
  EXPECT_FALSE(XAttentionGpuSupports(p));
  p.block_size = 128;
  p.num_kv_heads = 5;
  EXPECT_FALSE(XAttentionGpuSupports(p));
  // Refused without a launch (null pointers are never touched).
  EXPECT_EQ(XAttentionBlockMassGpu(p, nullptr, nullptr), cudaErrorInvalidValue);
}

class XAttentionGpuTest : public ::testing::TestWithParam<Case> {};

TEST_P(XAttentionGpuTest, MassesMatchTheReference) {
  const Case c = GetParam();
  const char* env = std::getenv("SIEVE_TEST_SEED");
  std::mt19937 rng(env ? std::strtoul(env, nullptr, 10) : 20261205u + c.kv_len);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int num_pages = (c.kv_len + kPage - 1) / kPage;
  std::vector<int32_t> pages(num_pages);
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), rng);
  std::vector<uint16_t> kb(static_cast<size_t>(num_pages) * kPage * c.hkv * c.d);
  std::vector<uint16_t> qb(static_cast<size_t>(c.q_len) * c.hq * c.d);
  for (auto& x : kb) x = FloatToBf16(normal(rng));
  for (auto& x : qb) x = FloatToBf16(normal(rng));
  std::vector<float> kf(kb.size()), qf(qb.size());
  for (size_t i = 0; i < kb.size(); ++i) kf[i] = Bf16ToFloat(kb[i]);
  for (size_t i = 0; i < qb.size(); ++i) qf[i] = Bf16ToFloat(qb[i]);

  XAttentionParams rp;
  rp.q = qf.data();
  rp.q_row_stride = int64_t{c.hq} * c.d;
  rp.k_cache = kf.data();
  rp.page_table = pages.data();
  rp.page_size = kPage;
  rp.num_q_heads = c.hq;
  rp.num_kv_heads = c.hkv;
  rp.head_dim = c.d;
  rp.q_len = c.q_len;
  rp.kv_len = c.kv_len;
  rp.stride = c.stride;
  rp.block_size = c.block;
  const int qbk = XAttentionQueryBlocks(rp), kbk = XAttentionKeyBlocks(rp);
  const size_t n = static_cast<size_t>(c.hq) * qbk * kbk;
  std::vector<double> ref(n);
  XAttentionBlockMassRef(rp, ref.data());

  __nv_bfloat16 *dq = nullptr, *dk = nullptr;
  int32_t* dpages = nullptr;
  float* dmass = nullptr;
  ASSERT_EQ(cudaMalloc(&dq, qb.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dk, kb.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dpages, pages.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dmass, n * 4), cudaSuccess);
  cudaMemcpy(dq, qb.data(), qb.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dk, kb.data(), kb.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dpages, pages.data(), pages.size() * 4, cudaMemcpyHostToDevice);
  XAttentionGpuParams gp;
  gp.q = dq;
  gp.q_row_stride = rp.q_row_stride;
  gp.k_cache = dk;
  gp.page_table = dpages;
  gp.page_size = kPage;
  gp.num_q_heads = c.hq;
  gp.num_kv_heads = c.hkv;
  gp.head_dim = c.d;
  gp.q_len = c.q_len;
  gp.kv_len = c.kv_len;
  gp.stride = c.stride;
  gp.block_size = c.block;
  ASSERT_TRUE(XAttentionGpuSupports(gp));
  // The tensor-core kernel (the default, 64-key-group tiles), with 128-key-group tiles, then the
  // CUDA-core one, then the one-sweep tensor-core kernels (64- and 128-group tiles, and wgmma,
  // row sweeps and independent tiles: on an sm_90 device; elsewhere they must be refused).
  constexpr int kKernels = 7;
  const char* kNames[kKernels] = {"tensor cores, 64-group tiles", "tensor cores, 128-group tiles",
                                  "CUDA cores", "one sweep, 64-group tiles",
                                  "one sweep, 128-group tiles", "one sweep, wgmma",
                                  "one sweep, wgmma, independent tiles"};
  int dev = 0, major = 0;
  ASSERT_EQ(cudaGetDevice(&dev), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), cudaSuccess);
  const auto one_sweep = [](int kernel) { return kernel >= 3; };
  const auto tensor = [](int kernel) { return kernel != 2; };
  const size_t ws_bytes = XAttentionGpuWorkspaceBytes(gp);
  ASSERT_GT(ws_bytes, 0u);
  float* dws = nullptr;
  ASSERT_EQ(cudaMalloc(&dws, ws_bytes), cudaSuccess);
  std::vector<std::vector<float>> results;
  for (int kernel = 0; kernel < kKernels; ++kernel) {
    gp.tensor_cores = tensor(kernel);
    gp.tile_keys = kernel == 1 || kernel == 4 ? 128 : 64;
    gp.workspace = one_sweep(kernel) ? dws : nullptr;
    gp.wgmma = kernel >= 5;
    gp.independent_tiles = kernel == 6;
    cudaMemset(dmass, 0xff, n * 4);  // NaN: every entry must be written
    cudaMemset(dws, 0xff, ws_bytes);  // NaN: entries the kernel leaves must never be read
    if (gp.wgmma && major != 9) {
      ASSERT_EQ(XAttentionBlockMassGpu(gp, dmass, nullptr), cudaErrorInvalidValue);
      results.push_back(results[3]);  // not run here: its checks repeat kernel 3's
      continue;
    }
    ASSERT_EQ(XAttentionBlockMassGpu(gp, dmass, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    results.emplace_back(n);
    cudaMemcpy(results.back().data(), dmass, n * 4, cudaMemcpyDeviceToHost);
  }
  cudaFree(dq);
  cudaFree(dk);
  cudaFree(dpages);
  cudaFree(dmass);
  cudaFree(dws);

  // The score error bound (see the file comment).
  const int S = c.stride, first = c.kv_len - c.q_len;
  double max_q = 0, max_k = 0;
  for (int h = 0; h < c.hq; ++h) {
    for (int a = first / S; a <= (c.kv_len - 1) / S; ++a) {
      double s2 = 0;
      for (int pos = a * S; pos < a * S + S; ++pos) {
        if (pos < first || pos >= c.kv_len) continue;
        const float* v = qf.data() + (static_cast<size_t>(pos - first) * c.hq + h) * c.d;
        for (int e = 0; e < c.d; ++e) s2 += double{v[e]} * v[e];
      }
      max_q = std::max(max_q, std::sqrt(s2));
    }
  }
  for (int g = 0; g < c.hkv; ++g) {
    for (int b = 0; b <= (c.kv_len - 1) / S; ++b) {
      double s2 = 0;
      for (int pos = b * S; pos < std::min(c.kv_len, b * S + S); ++pos) {
        const float* v =
            kf.data() + ((static_cast<size_t>(pages[pos / kPage]) * kPage + pos % kPage) * c.hkv + g) * c.d;
        for (int e = 0; e < c.d; ++e) s2 += double{v[e]} * v[e];
      }
      max_k = std::max(max_k, std::sqrt(s2));
    }
  }
  // Unit roundoff per kernel: 2^-24 on the CUDA cores; the tensor cores' fp32 accumulation may
  // truncate instead of rounding, so 2^-23 there.
  const auto score_bound = [&](int unit_exp) {
    const double nu = static_cast<double>(S) * c.d * std::ldexp(1.0, unit_exp);
    return nu / (1 - nu) * max_q * max_k / (std::sqrt(static_cast<double>(c.d)) * S);
  };

  std::vector<int32_t> sel_gpu, order;
  for (int kernel = 0; kernel < kKernels; ++kernel) {
    SCOPED_TRACE(kNames[kernel]);
    const std::vector<float>& got = results[kernel];
    const double dz = score_bound(tensor(kernel) ? -23 : -24);
    // The row's fp32 sum of exponentials over at most kv_len / S + 1 terms (any order, so
    // the worst case) scales every probability of the row by its relative error.
    const double n_terms = c.kv_len / S + 1;
    double norm_err = n_terms * std::ldexp(1.0, -23);
    if (one_sweep(kernel)) {  // the log-domain partial sums (see the file comment)
      const double z_max = max_q * max_k / (std::sqrt(static_cast<double>(c.d)) * S) + dz;
      norm_err += std::expm1(std::ldexp(6 * z_max + 4 * std::log(n_terms + 1) + 33, -23));
    }
    for (int h = 0; h < c.hq; ++h) {
      for (int mi = 0; mi < qbk; ++mi) {
        const size_t row = (static_cast<size_t>(h) * qbk + mi) * kbk;
        double total = 0;
        for (int nb = 0; nb < kbk; ++nb) total += ref[row + nb];
        for (int nb = 0; nb < kbk; ++nb) {
          ASSERT_TRUE(std::isfinite(got[row + nb])) << "head " << h << " block " << mi;
          ASSERT_NEAR(got[row + nb], ref[row + nb],
                      ref[row + nb] * (std::expm1(2 * dz) + norm_err) + 1e-5 * total)
              << "head " << h << " query block " << mi << " key block " << nb;
        }
        // tau > 1 keeps every causal block on both (dense).
        const int m = XAttentionFirstQueryBlock(rp) + mi;
        std::vector<double> g64(got.begin() + row, got.begin() + row + m + 1);
        XAttentionSelectBlocks(g64.data(), m, 1.01, sel_gpu, order);
        ASSERT_EQ(static_cast<int>(sel_gpu.size()), m + 1);
      }
    }
  }
  // The device selection and index on the tensor-core masses, against the host's.
  XAttentionSelectGpuParams sp;
  sp.num_q_heads = c.hq;
  sp.first_query_block = XAttentionFirstQueryBlock(rp);
  sp.q_blocks = qbk;
  sp.k_blocks = kbk;
  for (double tau : {0.5, 0.9, 0.99, 1.01}) {
    sp.threshold = tau;
    ExpectDeviceSelectionMatchesHost(sp, results[0], {});
  }
  std::vector<double> per_head(c.hq);
  for (int h = 0; h < c.hq; ++h) per_head[h] = 0.3 + 0.65 * h / c.hq;
  ExpectDeviceSelectionMatchesHost(sp, results[0], per_head);
  sp.threshold = 0.9;  // and on the one-sweep masses
  ExpectDeviceSelectionMatchesHost(sp, results[3], {});
  ExpectDeviceSelectionMatchesHost(sp, results[5], {});
}

INSTANTIATE_TEST_SUITE_P(
    Cases, XAttentionGpuTest,
    ::testing::Values(Case{4, 1, 128, 1000, 1000, 16, 128},   // GQA 4, N not a multiple of B
                      Case{2, 2, 64, 777, 777, 8, 128},       // MHA, N not a multiple of S
                      Case{4, 2, 128, 1536, 512, 16, 128},    // chunk aligned to B
                      Case{4, 2, 128, 1300, 300, 16, 128},    // chunk starting inside a block
                      Case{2, 1, 64, 900, 900, 4, 128},       // S = 4: 32 rows per block
                      Case{2, 1, 128, 513, 513, 4, 64},       // B = 64
                      Case{2, 2, 128, 2048, 2048, 8, 128},
                      Case{2, 1, 128, 3000, 3000, 8, 64},     // 3 row tiles: a lone middle one
                      Case{4, 2, 64, 5000, 1700, 4, 128},     // d 64, chunk inside a block, R 32
                      Case{32, 8, 128, 4096, 4096, 16, 128},  // the benchmark's heads at 4K
                      Case{8, 2, 128, 16384, 16384, 16, 128}, // 16K tokens: 8 row tiles
                      Case{8, 2, 128, 16384, 4096, 16, 128},  // a 16K prompt's last 4K chunk
                      Case{4, 1, 64, 20000, 7000, 16, 128},   // 10 row tiles: 2 bands of 8
                      Case{4, 2, 128, 3000, 1100, 32, 128})); // S 32: groups span 2 pages

}  // namespace
}  // namespace sieve::kernels
