// GPU checks of kernels/cuda (ops.h, gemm.h) and the simple attention kernel against the CPU
// references of kernels/cpu/ops.h and kernels/attention/paged_attention.h (label `gpu`).
//
// Every case draws fresh seeded random inputs (never zeros; SIEVE_TEST_SEED overrides the base
// seed), rounds them to bf16, runs the reference in fp32 on the same bf16 values, poisons every
// output with NaN before the run and checks that every element was written. Sizes include one
// row, many rows and odd widths (which take the scalar, not the 16-byte, path).
//
// Tolerances: relative L2 error <= 1e-2 (bf16 rounding of one output gives about 2e-3; RoPE and
// attention a little more), exact equality for copies (gather, V cache write, bf16 -> fp32,
// the rounded residual).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_simple.h"
#include "kernels/cpu/half.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemv.h"
#include "kernels/cuda/ops.h"

namespace sieve::kernels {
namespace {

using bf16 = __nv_bfloat16;
constexpr double kMaxRelL2 = 1e-2;
constexpr uint16_t kBf16Nan = 0x7fc0;

uint32_t Seed(uint32_t salt) {
  const char* env = std::getenv("SIEVE_TEST_SEED");
  return (env ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10)) : 20261123u) * 31u + salt;
}

// Host bf16 values with their fp32 images.
struct HostBf16 {
  std::vector<uint16_t> bits;
  std::vector<float> f;
};

HostBf16 Random(size_t n, std::mt19937& rng, float mean = 0.0f, float stddev = 1.0f) {
  std::normal_distribution<float> dist(mean, stddev);
  HostBf16 h;
  h.bits.resize(n);
  h.f.resize(n);
  for (size_t i = 0; i < n; ++i) {
    float v = dist(rng);
    if (v == 0.0f) v = 0.5f;  // never zero
    h.bits[i] = FloatToBf16(v);
    h.f[i] = Bf16ToFloat(h.bits[i]);
  }
  return h;
}

// A device array that frees itself.
template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(1, n) * sizeof(T)), cudaSuccess);
  }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
};

template <typename T>
void Upload(Dev<T>& d, const std::vector<T>& h) {
  ASSERT_EQ(cudaMemcpy(d.p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
}
Dev<bf16>* MakeBf16(const std::vector<uint16_t>& bits) {
  auto* d = new Dev<bf16>(bits.size());
  cudaMemcpy(d->p, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice);
  return d;
}
void Poison(Dev<bf16>& d) {
  std::vector<uint16_t> nan(d.n, kBf16Nan);
  cudaMemcpy(d.p, nan.data(), d.n * 2, cudaMemcpyHostToDevice);
}
std::vector<uint16_t> DownloadBits(const Dev<bf16>& d) {
  std::vector<uint16_t> h(d.n);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(h.data(), d.p, d.n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}
std::vector<float> Download(const Dev<bf16>& d) {
  std::vector<uint16_t> bits = DownloadBits(d);
  std::vector<float> f(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) f[i] = Bf16ToFloat(bits[i]);
  return f;
}

// Relative L2 error; infinity when any element is not finite (unwritten NaN poison included).
double RelL2(const std::vector<float>& got, const std::vector<float>& want) {
  EXPECT_EQ(got.size(), want.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (double{got[i]} - want[i]) * (double{got[i]} - want[i]);
    den += double{want[i]} * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

TEST(CudaOpsTest, GatherRowsCopiesExactly) {
  std::mt19937 rng(Seed(1));
  for (int64_t cols : {256, 257, 8}) {
    for (int64_t n : {1, 37}) {
      const int64_t rows = 50;
      HostBf16 x = Random(rows * cols, rng);
      std::vector<int32_t> ids(n);
      std::uniform_int_distribution<int32_t> pick(0, rows - 1);
      for (auto& i : ids) i = pick(rng);
      std::unique_ptr<Dev<bf16>> dx(MakeBf16(x.bits));
      Dev<int32_t> did(n);
      Upload(did, ids);
      Dev<bf16> out(n * cols);
      Poison(out);
      ASSERT_EQ(GatherRowsBf16(dx->p, rows, cols, did.p, n, out.p, nullptr), cudaSuccess);
      std::vector<uint16_t> got = DownloadBits(out);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t c = 0; c < cols; ++c) {
          ASSERT_EQ(got[i * cols + c], x.bits[ids[i] * cols + c]) << "row " << i << " col " << c;
        }
      }
    }
  }
  // Bad arguments launch nothing.
  EXPECT_EQ(GatherRowsBf16(nullptr, 1, 8, nullptr, 1, nullptr, nullptr), cudaErrorInvalidValue);
}

TEST(CudaOpsTest, RmsNormMatchesReference) {
  std::mt19937 rng(Seed(2));
  for (int64_t dim : {64, 257, 4096}) {
    for (int64_t rows : {1, 130}) {
      HostBf16 x = Random(rows * dim, rng, 0.3f, 2.0f);
      HostBf16 w = Random(dim, rng, 1.0f, 0.2f);
      std::unique_ptr<Dev<bf16>> dx(MakeBf16(x.bits)), dw(MakeBf16(w.bits));
      Dev<bf16> out(rows * dim);
      Poison(out);
      ASSERT_EQ(RmsNormBf16(dx->p, dw->p, rows, dim, 1e-5f, out.p, nullptr), cudaSuccess);
      std::vector<float> want(rows * dim);
      RmsNormRef(x.f.data(), w.f.data(), rows, dim, 1e-5f, want.data());
      const double err = RelL2(Download(out), want);
      EXPECT_LE(err, kMaxRelL2) << "dim " << dim << " rows " << rows;
      EXPECT_LE(err, 5e-3) << "bf16 output rounding alone is ~2e-3";
    }
  }
}

TEST(CudaOpsTest, AddRmsNormMatchesReferenceAndRoundsResidual) {
  std::mt19937 rng(Seed(3));
  for (int64_t dim : {256, 100, 2048}) {
    for (int64_t rows : {1, 67}) {
      HostBf16 x = Random(rows * dim, rng), res = Random(rows * dim, rng, 0.0f, 3.0f);
      HostBf16 w = Random(dim, rng, 1.0f, 0.2f);
      std::unique_ptr<Dev<bf16>> dx(MakeBf16(x.bits)), dres(MakeBf16(res.bits)),
          dw(MakeBf16(w.bits));
      Dev<bf16> out(rows * dim);
      Poison(out);
      ASSERT_EQ(AddRmsNormBf16(dx->p, dres->p, dw->p, rows, dim, 1e-6f, out.p, nullptr),
                cudaSuccess);
      std::vector<uint16_t> got_res = DownloadBits(*dres);
      std::vector<float> rounded(rows * dim);
      for (int64_t i = 0; i < rows * dim; ++i) {
        const uint16_t want_bits = FloatToBf16(res.f[i] + x.f[i]);
        ASSERT_EQ(got_res[i], want_bits) << "residual element " << i;
        rounded[i] = Bf16ToFloat(want_bits);
      }
      // The norm of the rounded residual (what a bf16 model computes) and of the exact sum.
      std::vector<float> want(rows * dim), exact_res = res.f, want_exact(rows * dim);
      RmsNormRef(rounded.data(), w.f.data(), rows, dim, 1e-6f, want.data());
      AddRmsNormRef(x.f.data(), exact_res.data(), w.f.data(), rows, dim, 1e-6f, want_exact.data());
      const std::vector<float> got = Download(out);
      EXPECT_LE(RelL2(got, want), 5e-3) << "dim " << dim << " rows " << rows;
      EXPECT_LE(RelL2(got, want_exact), kMaxRelL2) << "dim " << dim << " rows " << rows;
    }
  }
}

TEST(CudaOpsTest, SiluMulMatchesReference) {
  std::mt19937 rng(Seed(4));
  for (int64_t inter : {768, 1001}) {
    for (int64_t rows : {1, 33}) {
      HostBf16 gu = Random(rows * 2 * inter, rng, 0.0f, 2.0f);
      std::unique_ptr<Dev<bf16>> dgu(MakeBf16(gu.bits));
      Dev<bf16> out(rows * inter);
      Poison(out);
      ASSERT_EQ(SiluMulBf16(dgu->p, rows, inter, out.p, nullptr), cudaSuccess);
      std::vector<float> want(rows * inter);
      SiluMulRef(gu.f.data(), rows, inter, want.data());
      EXPECT_LE(RelL2(Download(out), want), 5e-3) << "inter " << inter << " rows " << rows;
    }
  }
}

TEST(CudaOpsTest, Bf16ToFloatIsExact) {
  std::mt19937 rng(Seed(5));
  for (int64_t n : {1, 1000003}) {
    HostBf16 x = Random(n, rng, 0.0f, 100.0f);
    std::unique_ptr<Dev<bf16>> dx(MakeBf16(x.bits));
    Dev<float> out(n);
    ASSERT_EQ(cudaMemset(out.p, 0xff, n * sizeof(float)), cudaSuccess);
    ASSERT_EQ(Bf16ToFloat(dx->p, n, out.p, nullptr), cudaSuccess);
    std::vector<float> got(n);
    ASSERT_EQ(cudaMemcpy(got.data(), out.p, n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(got[i], x.f[i]) << i;
  }
}

// One RoPE case: `tokens` tokens at random positions (some past 100K) written to shuffled slots.
void CheckRope(int tokens, int hq, int hkv, int d, int half, float scaling, std::mt19937& rng) {
  SCOPED_TRACE("tokens " + std::to_string(tokens) + " d " + std::to_string(d) + " half " +
               std::to_string(half));
  const int64_t q_cols = int64_t{hq} * d, kv_cols = int64_t{hkv} * d;
  const int64_t cols = q_cols + 2 * kv_cols + 8;  // a padded row stride
  HostBf16 qkv = Random(tokens * cols, rng);
  RopeQkvParams p;
  p.half_rot = half;
  for (int i = 0; i < half; ++i) {
    p.inv_freq[i] = static_cast<float>(std::pow(500000.0, -2.0 * i / (2.0 * half)));
  }
  std::vector<int32_t> pos(tokens);
  std::uniform_int_distribution<int32_t> pick_pos(0, 131071);
  for (auto& v : pos) v = pick_pos(rng);
  pos[0] = 0;
  const int64_t num_slots = 4 * tokens + 3;
  std::vector<int64_t> perm(num_slots);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int64_t> slots(perm.begin(), perm.begin() + tokens);
  std::unique_ptr<Dev<bf16>> dqkv(MakeBf16(qkv.bits));
  Dev<bf16> q_out(tokens * q_cols), kc(num_slots * kv_cols), vc(num_slots * kv_cols);
  Poison(q_out);
  Poison(kc);
  Poison(vc);
  Dev<int32_t> dpos(tokens);
  Dev<int64_t> dslots(tokens);
  Upload(dpos, pos);
  Upload(dslots, slots);
  p.qkv = dqkv->p;
  p.qkv_stride = cols;
  p.q_out = q_out.p;
  p.k_cache = kc.p;
  p.v_cache = vc.p;
  p.positions = dpos.p;
  p.slots = dslots.p;
  p.num_slots = num_slots;
  p.num_tokens = tokens;
  p.num_q_heads = hq;
  p.num_kv_heads = hkv;
  p.head_dim = d;
  p.attention_scaling = scaling;
  ASSERT_EQ(RopeQkvAndCacheKvBf16(p, nullptr), cudaSuccess);
  // Reference: RopeRef on the fp32 images of q and k.
  std::vector<float> q(tokens * q_cols), k(tokens * kv_cols);
  for (int t = 0; t < tokens; ++t) {
    std::copy_n(qkv.f.begin() + t * cols, q_cols, q.begin() + t * q_cols);
    std::copy_n(qkv.f.begin() + t * cols + q_cols, kv_cols, k.begin() + t * kv_cols);
  }
  RopeRef(q.data(), pos.data(), tokens, hq, d, p.inv_freq, half, scaling);
  RopeRef(k.data(), pos.data(), tokens, hkv, d, p.inv_freq, half, scaling);
  EXPECT_LE(RelL2(Download(q_out), q), 5e-3);
  const std::vector<float> kgot = Download(kc);
  const std::vector<uint16_t> vgot = DownloadBits(vc);
  std::vector<float> kslot(tokens * kv_cols);
  for (int t = 0; t < tokens; ++t) {
    std::copy_n(kgot.begin() + slots[t] * kv_cols, kv_cols, kslot.begin() + t * kv_cols);
    for (int64_t e = 0; e < kv_cols; ++e) {
      ASSERT_EQ(vgot[slots[t] * kv_cols + e], qkv.bits[t * cols + q_cols + kv_cols + e]);
    }
  }
  EXPECT_LE(RelL2(kslot, k), 5e-3);
  // Slots no token owns are untouched.
  for (int64_t s = tokens; s < num_slots; ++s) {
    ASSERT_EQ(vgot[perm[s] * kv_cols], kBf16Nan) << "slot " << perm[s] << " was written";
  }
}

TEST(CudaOpsTest, RopeAndKvWriteMatchReference) {
  std::mt19937 rng(Seed(6));
  CheckRope(1, 4, 2, 64, 32, 1.0f, rng);
  CheckRope(37, 32, 8, 128, 64, 1.0f, rng);
  CheckRope(2, 32, 8, 128, 64, 1.0f, rng);  // a decode step of the 8B shape, one block per head
  CheckRope(5, 6, 3, 96, 24, 1.25f, rng);  // partial rotary, YaRN-style scaling
  CheckRope(3, 2, 1, 256, 128, 1.0f, rng);
}

// One GEMM case against LinearRef on the bf16 images, with a bf16 output or (f32) an fp32 one.
void CheckGemm(BlasLtGemm& gemm, void* ws, size_t ws_bytes, int64_t m, int64_t n, int64_t k,
               bool bias, std::mt19937& rng, bool f32 = false) {
  SCOPED_TRACE("m " + std::to_string(m) + " n " + std::to_string(n) + " k " + std::to_string(k) +
               (bias ? " bias" : "") + (f32 ? " fp32 out" : ""));
  HostBf16 x = Random(m * k, rng), w = Random(n * k, rng, 0.0f, 0.05f), b = Random(n, rng);
  std::unique_ptr<Dev<bf16>> dx(MakeBf16(x.bits)), dw(MakeBf16(w.bits)), db(MakeBf16(b.bits));
  Dev<bf16> y(f32 ? 0 : m * n);
  Dev<float> yf(f32 ? m * n : 0);
  Poison(y);
  std::vector<float> nan(yf.n, NAN);
  Upload(yf, nan);
  GemmArgs g;
  g.x = dx->p;
  g.w = dw->p;
  g.bias = bias ? db->p : nullptr;
  if (f32) {
    g.y_f32 = yf.p;
  } else {
    g.y = y.p;
  }
  g.m = m;
  g.n = n;
  g.k = k;
  ASSERT_EQ(gemm.Run(g, ws, ws_bytes, nullptr), CUBLAS_STATUS_SUCCESS);
  std::vector<float> want(m * n);
  LinearRef(x.f.data(), w.f.data(), bias ? b.f.data() : nullptr, m, k, n, want.data());
  if (!f32) {
    EXPECT_LE(RelL2(Download(y), want), 5e-3);
    return;
  }
  std::vector<float> got(m * n);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(got.data(), yf.p, got.size() * sizeof(float), cudaMemcpyDeviceToHost),
            cudaSuccess);
  // fp32 sums of exact bf16 products: only the order of additions differs from the reference.
  EXPECT_LE(RelL2(got, want), 1e-5);
}

TEST(CudaGemmTest, MatchesLinearReference) {
  BlasLtGemm gemm;
  ASSERT_EQ(gemm.Init(), CUBLAS_STATUS_SUCCESS);
  const size_t ws_bytes = size_t{32} << 20;
  Dev<char> ws(ws_bytes);
  std::mt19937 rng(Seed(7));
  CheckGemm(gemm, ws.p, ws_bytes, 1, 4096, 256, false, rng);
  CheckGemm(gemm, ws.p, ws_bytes, 17, 768, 256, true, rng);
  CheckGemm(gemm, ws.p, ws_bytes, 300, 1000, 768, false, rng);
  CheckGemm(gemm, ws.p, ws_bytes, 3, 37, 72, true, rng);
  CheckGemm(gemm, ws.p, ws_bytes, 5, 64, 250, false, rng);  // rows 4-byte aligned only
  CheckGemm(gemm, ws.p, ws_bytes, 1, 4096, 256, false, rng);  // cached shape
  EXPECT_EQ(gemm.cached_shapes(), 5u);
  // fp32 outputs (the logits): a shape already cached for bf16 gets its own entry.
  CheckGemm(gemm, ws.p, ws_bytes, 1, 4096, 256, false, rng, /*f32=*/true);
  CheckGemm(gemm, ws.p, ws_bytes, 7, 1001, 320, false, rng, /*f32=*/true);
  CheckGemm(gemm, ws.p, ws_bytes, 64, 4096, 512, false, rng, /*f32=*/true);
  EXPECT_EQ(gemm.cached_shapes(), 8u);
  GemmArgs bad;
  EXPECT_EQ(gemm.Run(bad, ws.p, ws_bytes, nullptr), CUBLAS_STATUS_INVALID_VALUE);
  // Both outputs, or a bias with the fp32 output, are refused.
  Dev<bf16> x(64), w(64), y(64);
  Dev<float> yf(64);
  GemmArgs both{x.p, w.p, nullptr, y.p, yf.p, 8, 8, 8};
  EXPECT_EQ(gemm.Run(both, ws.p, ws_bytes, nullptr), CUBLAS_STATUS_INVALID_VALUE);
  GemmArgs f32_bias{x.p, w.p, w.p, nullptr, yf.p, 8, 8, 8};
  EXPECT_EQ(gemm.Run(f32_bias, ws.p, ws_bytes, nullptr), CUBLAS_STATUS_INVALID_VALUE);
  BlasLtGemm uninit;
  EXPECT_EQ(uninit.Run(bad, nullptr, 0, nullptr), CUBLAS_STATUS_NOT_INITIALIZED);
}

// GemvBf16 against LinearRef on the bf16 images and against cuBLASLt on the same inputs.
void CheckGemv(BlasLtGemm& gemm, void* ws, size_t ws_bytes, int64_t m, int64_t n, int64_t k,
               bool bias, std::mt19937& rng) {
  SCOPED_TRACE("gemv m " + std::to_string(m) + " n " + std::to_string(n) + " k " +
               std::to_string(k) + (bias ? " bias" : ""));
  HostBf16 x = Random(m * k, rng), w = Random(n * k, rng, 0.0f, 0.05f), b = Random(n, rng);
  std::unique_ptr<Dev<bf16>> dx(MakeBf16(x.bits)), dw(MakeBf16(w.bits)), db(MakeBf16(b.bits));
  Dev<bf16> y(m * n), y_blas(m * n);
  Poison(y);
  GemmArgs g;
  g.x = dx->p;
  g.w = dw->p;
  g.bias = bias ? db->p : nullptr;
  g.y = y.p;
  g.m = m;
  g.n = n;
  g.k = k;
  ASSERT_TRUE(GemvSupported(g));
  ASSERT_EQ(GemvBf16(g, nullptr), cudaSuccess);
  g.y = y_blas.p;
  ASSERT_EQ(gemm.Run(g, ws, ws_bytes, nullptr), CUBLAS_STATUS_SUCCESS);
  std::vector<float> want(m * n);
  LinearRef(x.f.data(), w.f.data(), bias ? b.f.data() : nullptr, m, k, n, want.data());
  const std::vector<float> got = Download(y);
  // fp32 sums rounded once to bf16: within bf16 rounding of the reference, like cuBLASLt.
  EXPECT_LE(RelL2(got, want), 5e-3);
  EXPECT_LE(RelL2(got, Download(y_blas)), 5e-3);
  for (float v : got) ASSERT_TRUE(std::isfinite(v));  // every output written (poison is NaN)
}

TEST(CudaGemvTest, MatchesLinearReferenceAndCublas) {
  BlasLtGemm gemm;
  ASSERT_EQ(gemm.Init(), CUBLAS_STATUS_SUCCESS);
  const size_t ws_bytes = size_t{32} << 20;
  Dev<char> ws(ws_bytes);
  std::mt19937 rng(Seed(8));
  CheckGemv(gemm, ws.p, ws_bytes, 1, 4096, 256, false, rng);
  CheckGemv(gemm, ws.p, ws_bytes, 1, 7, 8, true, rng);        // fewer columns than a block's warps
  CheckGemv(gemm, ws.p, ws_bytes, 2, 37, 72, true, rng);      // k not a multiple of a warp's step
  CheckGemv(gemm, ws.p, ws_bytes, 3, 1000, 768, false, rng);
  CheckGemv(gemm, ws.p, ws_bytes, 4, 6144, 4096, true, rng);  // the 8B qkv shape
  CheckGemv(gemm, ws.p, ws_bytes, 1, 4096, 14336, false, rng);  // the 8B down_proj shape
  CheckGemv(gemm, ws.p, ws_bytes, 2, 520, 2056, false, rng);  // k = 8 past whole unrolled steps
}

TEST(CudaGemvTest, RefusesWhatItCannotRun) {
  Dev<bf16> x(64), w(64 * 64), y(64);
  Dev<float> yf(64);
  GemmArgs ok{x.p, w.p, nullptr, y.p, nullptr, 1, 8, 8};
  EXPECT_TRUE(GemvSupported(ok));
  GemmArgs rows = ok;
  rows.m = kGemvMaxRows + 1;
  GemmArgs odd_k = ok;
  odd_k.k = 12;
  GemmArgs misaligned = ok;
  misaligned.x = x.p + 1;
  GemmArgs f32 = ok;
  f32.y = nullptr;
  f32.y_f32 = yf.p;
  GemmArgs empty = ok;
  empty.m = 0;
  for (const GemmArgs& g : {rows, odd_k, misaligned, f32, empty}) {
    EXPECT_FALSE(GemvSupported(g));
    EXPECT_EQ(GemvBf16(g, nullptr), cudaErrorInvalidValue);
  }
}

// The simple attention kernel against PagedAttentionRef: sequences mixing prefill chunks (with
// cached prefixes) and decode rows, pages shuffled.
void CheckSimpleAttention(int d, int hq, int hkv, int page_size, std::mt19937& rng) {
  SCOPED_TRACE("d " + std::to_string(d) + " heads " + std::to_string(hq) + "/" +
               std::to_string(hkv) + " page " + std::to_string(page_size));
  const std::vector<std::pair<int, int>> seqs = {{1, 1}, {1, 300}, {17, 17}, {40, 133}, {5, 64}};
  std::vector<int32_t> query_start = {0}, kv_lens;
  int stride = 0;
  for (auto [q_len, kv_len] : seqs) {
    query_start.push_back(query_start.back() + q_len);
    kv_lens.push_back(kv_len);
    stride = std::max(stride, (kv_len + page_size - 1) / page_size);
  }
  const int num_seqs = static_cast<int>(seqs.size());
  const int num_pages = num_seqs * stride + 3;
  std::vector<int32_t> perm(num_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> table(num_seqs * stride);
  for (size_t i = 0; i < table.size(); ++i) table[i] = perm[i];
  const int tokens = query_start.back();
  const int64_t kv_elems = int64_t{num_pages} * page_size * hkv * d;
  HostBf16 q = Random(int64_t{tokens} * hq * d, rng), k = Random(kv_elems, rng),
           v = Random(kv_elems, rng);
  std::unique_ptr<Dev<bf16>> dq(MakeBf16(q.bits)), dk(MakeBf16(k.bits)), dv(MakeBf16(v.bits));
  Dev<bf16> out(int64_t{tokens} * hq * d);
  Poison(out);
  Dev<int32_t> dqs(query_start.size()), dkv(kv_lens.size()), dtable(table.size());
  Upload(dqs, query_start);
  Upload(dkv, kv_lens);
  Upload(dtable, table);
  PagedAttentionParams<bf16> p;
  p.q = dq->p;
  p.k_cache = dk->p;
  p.v_cache = dv->p;
  p.out = out.p;
  p.page_table = dtable.p;
  p.kv_lens = dkv.p;
  p.query_start = dqs.p;
  p.page_table_stride = stride;
  p.num_seqs = num_seqs;
  p.num_q_heads = hq;
  p.num_kv_heads = hkv;
  p.head_dim = d;
  p.page_size = page_size;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  ASSERT_EQ(PagedAttentionSimpleRun(p, tokens, nullptr), cudaSuccess);
  std::vector<float> want(int64_t{tokens} * hq * d);
  PagedAttentionParams<float> r;
  r.q = q.f.data();
  r.k_cache = k.f.data();
  r.v_cache = v.f.data();
  r.out = want.data();
  r.page_table = table.data();
  r.kv_lens = kv_lens.data();
  r.query_start = query_start.data();
  r.page_table_stride = stride;
  r.num_seqs = num_seqs;
  r.num_q_heads = hq;
  r.num_kv_heads = hkv;
  r.head_dim = d;
  r.page_size = page_size;
  r.scale = p.scale;
  PagedAttentionRef(r, 0);
  EXPECT_LE(RelL2(Download(out), want), kMaxRelL2);
}

TEST(CudaSimpleAttentionTest, MatchesReference) {
  std::mt19937 rng(Seed(8));
  CheckSimpleAttention(64, 4, 2, 16, rng);
  CheckSimpleAttention(128, 8, 2, 1, rng);
  CheckSimpleAttention(80, 3, 3, 7, rng);
  CheckSimpleAttention(256, 4, 1, 32, rng);
  PagedAttentionParams<bf16> bad;
  bad.head_dim = 512;
  EXPECT_EQ(PagedAttentionSimpleRun(bad, 1, nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace sieve::kernels
