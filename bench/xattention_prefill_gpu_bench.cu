// XAttention prefill on the GPU against dense prefill, measured in the same run.
//
// One Llama-3.1-8B attention layer (32 query heads, 8 KV heads, head dim 128, bf16, page 16), one
// fresh prompt of 16K and 32K tokens (--tokens to change) with the structure real attention has
// (bench/structured_attention.h, parameters printed). Timed on the device (median of --iters,
// events):
//   dense_wgmma  PagedPrefillRun, the Hopper wgmma kernel (the production dense path)
//   dense_mma    PagedPrefillRun, the mma.sync kernel (the inner loop the sparse run shares)
//   estimate     XAttentionBlockMassGpu (stride 16, block 128), the tensor-core kernel (64-key-group
//                tiles, the default)
//   est_n128     the same with 128-key-group tiles (tile_keys = 128; not in the end-to-end sum)
//   est_1sw      the one-sweep estimate (a workspace, 64-key-group tiles: each GEMM tile once,
//                log-domain partial sums, then the normalising kernel); e2e_1sw is end2end with
//                it in place of `estimate`
//   est_wg       the one-sweep estimate on wgmma (128-key-group tiles); e2e_wg likewise
//   est_it       the wgmma one sweep with independent tiles (XAttentionGpuParams::
//                independent_tiles; its own line, masses checked as est_wg's)
//   est_cuda     the same on the CUDA-core kernel (the cross-check; not in the end-to-end sum;
//                median of at most 3 runs, --no-cuda-core skips it; skipped above 32K tokens)
//   select       XAttentionSelectGpu + XAttentionBuildIndexGpu (tau 0.9): the device selection
//                and block-sparse index
//   sparse       PagedPrefillRun on that index (mma.sync, block-sparse); and on the wgmma kernel
//                (sparse_wg, its own line, with its output checked against mma.sync's)
// and on the host, as the engine does it today: the threshold selection and plan assembly
// (select_host, timed once). Reported: density (computed causal 128x128 tiles / all causal
// tiles), end2end = dense_wgmma / (estimate + select + sparse), dense_mma / sparse, tile parity
// (dense_mma / (sparse / density)), and the estimator's tensor-core rate (the two sweeps' causal
// GEMM flops / estimate). Checked in the same run, each printed as PASS or FAIL (exit status 1
// on a FAIL): the device selection equals the host's row for row, and the tensor-core masses
// agree with the CUDA-core kernel's within 1e-3 of each query block's total, and the one-sweep
// masses with the two-sweep ones within the same limit. Above 32K tokens the dense baselines
// are timed over at most 3 runs (dense_mma takes ~0.7 s a call at 128K). Each length's wall
// time (inputs, uploads, checks included) is printed.
//
// --lean times the production path alone (est_it, select, sparse on wgmma, one dense wgmma run;
// no host selection, no checks), for lengths the full run cannot fit in a call (512K).
//
//   usage: xattention_prefill_gpu_bench [--iters N] [--tau T] [--tokens N[,N...]]
//                                       [--no-cuda-core] [--lean]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "bench/bench_cuda.cuh"
#include "bench/structured_attention.h"
#include "kernels/attention/paged_prefill.h"
#include "kernels/cpu/half.h"
#include "kernels/sparse/xattention.h"
#include "kernels/sparse/xattention_cuda.h"

namespace {

using namespace sieve::kernels;  // NOLINT: a benchmark's one translation unit

constexpr int kHq = 32, kHkv = 8, kD = 128, kPage = 16, kStride = 16, kBlock = 128;

using sieve::bench::MedianMs;

template <typename T>
T* Upload(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

__nv_bfloat16* UploadBf16(const std::vector<float>& f) {
  std::vector<uint16_t> h(f.size());
  for (size_t i = 0; i < f.size(); ++i) h[i] = FloatToBf16(f[i]);
  return reinterpret_cast<__nv_bfloat16*>(Upload(h));
}

// One layer's inputs on the device (structured, pages in order: page j holds positions
// [16 j, 16 j + 16); the generator's [tokens, heads, d] rows are exactly the cache layout) and
// the dense prefill parameters over them.
struct Layer {
  __nv_bfloat16 *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr;
  int32_t *d_table = nullptr, *d_kv = nullptr, *d_qs = nullptr;
  PagedAttentionParams<__nv_bfloat16> p;
};

Layer MakeLayer(int tokens, bool first) {
  sieve::bench::StructuredAttentionParams sp;
  sp.tokens = tokens;
  const sieve::bench::StructuredAttention in = sieve::bench::MakeStructuredAttention(sp);
  if (first) std::printf("inputs: %s\n", sp.Describe().c_str());
  const int pages = tokens / kPage;
  std::vector<int32_t> table(pages);
  for (int i = 0; i < pages; ++i) table[i] = i;
  Layer l;
  l.q = UploadBf16(in.q);
  l.k = UploadBf16(in.k);
  l.v = UploadBf16(in.v);
  CHECK_CUDA(cudaMalloc(&l.out, in.q.size() * 2));
  l.d_table = Upload(table);
  l.d_kv = Upload(std::vector<int32_t>{tokens});
  l.d_qs = Upload(std::vector<int32_t>{0, tokens});
  PagedAttentionParams<__nv_bfloat16>& p = l.p;
  p.q = l.q;
  p.k_cache = l.k;
  p.v_cache = l.v;
  p.out = l.out;
  p.page_table = l.d_table;
  p.kv_lens = l.d_kv;
  p.query_start = l.d_qs;
  p.page_table_stride = pages;
  p.num_seqs = 1;
  p.num_q_heads = kHq;
  p.num_kv_heads = kHkv;
  p.head_dim = kD;
  p.page_size = kPage;
  p.scale = 0.08838834764f;
  return l;
}

void FreeLayer(Layer& l) {
  for (void* ptr : {static_cast<void*>(l.q), static_cast<void*>(l.k), static_cast<void*>(l.v),
                    static_cast<void*>(l.out), static_cast<void*>(l.d_table),
                    static_cast<void*>(l.d_kv), static_cast<void*>(l.d_qs)}) {
    CHECK_CUDA(cudaFree(ptr));
  }
}

// XAttention's estimate over the layer (S 16, B 128; the kernel options left at their defaults).
XAttentionGpuParams EstimatorParams(const Layer& l, int tokens) {
  XAttentionGpuParams xp;
  xp.q = l.q;
  xp.q_row_stride = kHq * kD;
  xp.k_cache = l.k;
  xp.page_table = l.d_table;
  xp.page_size = kPage;
  xp.num_q_heads = kHq;
  xp.num_kv_heads = kHkv;
  xp.head_dim = kD;
  xp.q_len = tokens;
  xp.kv_len = tokens;
  xp.stride = kStride;
  xp.block_size = kBlock;
  return xp;
}

// The device selection (tau) and block-sparse index of the masses d_mass, timed (median of
// iters): Index() is the sparse kernels' view of it; Free() releases its buffers.
struct DeviceSelection {
  int32_t *count = nullptr, *sel = nullptr, *rs = nullptr, *kb = nullptr, *qbs = nullptr;
  double ms = 0;

  SparseAttentionIndex Index() const {
    SparseAttentionIndex idx;
    idx.query_block = kBlock;
    idx.key_block = kBlock;
    idx.query_block_start = qbs;
    idx.row_start = rs;
    idx.key_blocks = kb;
    return idx;
  }
  void Free() const {
    for (int32_t* ptr : {count, sel, rs, kb, qbs}) CHECK_CUDA(cudaFree(ptr));
  }
};

DeviceSelection SelectOnDevice(const float* d_mass, int blocks, double tau, int iters) {
  XAttentionSelectGpuParams selp;
  selp.num_q_heads = kHq;
  selp.first_query_block = 0;
  selp.q_blocks = blocks;
  selp.k_blocks = blocks;
  selp.threshold = tau;
  const size_t n_mass = static_cast<size_t>(kHq) * blocks * blocks;
  DeviceSelection d;
  CHECK_CUDA(cudaMalloc(&d.count, static_cast<size_t>(kHq) * blocks * 4));
  CHECK_CUDA(cudaMalloc(&d.sel, n_mass * 4));
  CHECK_CUDA(cudaMalloc(&d.rs, (static_cast<size_t>(kHq) * blocks + 1) * 4));
  CHECK_CUDA(cudaMalloc(&d.kb, n_mass * 4));
  d.ms = MedianMs(iters, [&] {
    CHECK_CUDA(XAttentionSelectGpu(selp, d_mass, d.count, d.sel, nullptr));
    CHECK_CUDA(XAttentionBuildIndexGpu(selp, d.count, d.sel, d.rs, d.kb, nullptr));
  });
  d.qbs = Upload(std::vector<int32_t>{0, blocks});
  return d;
}

// --lean: the production path only (the estimate with independent tiles, the device selection,
// the wgmma block-sparse kernel) and one dense wgmma run, no host selection and no checks: what
// fits a long length (512K) in a device call. Density from the device index's total.
void RunLean(int tokens, int iters, double tau, int sms, bool first) {
  Layer l = MakeLayer(tokens, first);
  const PagedPrefillShape shape{1, kHq, kHkv, kD, tokens};
  const PagedPrefillPlan wg = Plan(shape, sms, PagedPrefillKernel::kWgmma);
  const double dense_wg = MedianMs(1, [&] { CHECK_CUDA(PagedPrefillRun(l.p, wg, nullptr, nullptr)); });
  XAttentionGpuParams xp = EstimatorParams(l, tokens);
  xp.tensor_cores = true;
  xp.wgmma = true;
  xp.independent_tiles = true;
  const int blocks = tokens / kBlock;
  const size_t n_mass = static_cast<size_t>(kHq) * blocks * blocks;
  float *d_mass = nullptr, *d_ws = nullptr;
  CHECK_CUDA(cudaMalloc(&d_mass, n_mass * 4));
  CHECK_CUDA(cudaMalloc(&d_ws, XAttentionGpuWorkspaceBytes(xp)));
  xp.workspace = d_ws;
  const double est_it = MedianMs(iters, [&] { CHECK_CUDA(XAttentionBlockMassGpu(xp, d_mass, nullptr)); });
  CHECK_CUDA(cudaFree(d_ws));
  const DeviceSelection ds = SelectOnDevice(d_mass, blocks, tau, iters);
  const double select_ms = ds.ms;
  int32_t total_blocks = 0;
  CHECK_CUDA(cudaMemcpy(&total_blocks, ds.rs + static_cast<size_t>(kHq) * blocks, 4,
                        cudaMemcpyDeviceToHost));
  const double density = total_blocks / (static_cast<double>(kHq) * blocks * (blocks + 1) / 2);
  const SparseAttentionIndex idx = ds.Index();
  PagedAttentionParams<__nv_bfloat16> ps = l.p;
  ps.sparse = &idx;
  const double sparse_wg = MedianMs(iters, [&] { CHECK_CUDA(PagedPrefillRun(ps, wg, nullptr, nullptr)); });
  const double total = est_it + select_ms + sparse_wg;
  std::printf("lean %6d: estimate (independent tiles) %.3f ms + select %.3f ms + sparse (wgmma) "
              "%.3f ms = %.3f ms at density %.2f%%; dense wgmma %.2f ms (1 run): %.2fx\n",
              tokens, est_it, select_ms, sparse_wg, total, 100 * density, dense_wg,
              dense_wg / total);
  CHECK_CUDA(cudaFree(d_mass));
  ds.Free();
  FreeLayer(l);
}

bool RunLength(int tokens, int iters, double tau, int sms, bool cuda_core, bool first) {
  Layer layer = MakeLayer(tokens, first);
  const PagedAttentionParams<__nv_bfloat16>& p = layer.p;
  __nv_bfloat16* out = layer.out;
  const PagedPrefillShape shape{1, kHq, kHkv, kD, tokens};
  const PagedPrefillPlan wg = Plan(shape, sms, PagedPrefillKernel::kWgmma);
  const PagedPrefillPlan mma = Plan(shape, sms, PagedPrefillKernel::kMmaSync);
  const int slow_iters = tokens > 32768 ? std::min(iters, 3) : iters;
  const double dense_wg = MedianMs(slow_iters, [&] { CHECK_CUDA(PagedPrefillRun(p, wg, nullptr, nullptr)); });
  const double dense_mma = MedianMs(slow_iters, [&] { CHECK_CUDA(PagedPrefillRun(p, mma, nullptr, nullptr)); });

  XAttentionGpuParams xp = EstimatorParams(layer, tokens);
  const int blocks = tokens / kBlock;
  float* d_mass;
  const size_t n_mass = static_cast<size_t>(kHq) * blocks * blocks;
  CHECK_CUDA(cudaMalloc(&d_mass, n_mass * 4));
  std::vector<float> mass(n_mass), mass_cuda;
  double est_cuda = -1;
  if (cuda_core) {
    xp.tensor_cores = false;
    est_cuda = MedianMs(std::min(iters, 3), [&] { CHECK_CUDA(XAttentionBlockMassGpu(xp, d_mass, nullptr)); });
    mass_cuda.resize(n_mass);
    CHECK_CUDA(cudaMemcpy(mass_cuda.data(), d_mass, n_mass * 4, cudaMemcpyDeviceToHost));
  }
  xp.tensor_cores = true;
  xp.tile_keys = 128;
  const double est_n128 = MedianMs(iters, [&] { CHECK_CUDA(XAttentionBlockMassGpu(xp, d_mass, nullptr)); });
  std::vector<float> mass_n128(n_mass);
  CHECK_CUDA(cudaMemcpy(mass_n128.data(), d_mass, n_mass * 4, cudaMemcpyDeviceToHost));
  xp.tile_keys = 64;
  CHECK_CUDA(cudaMemset(d_mass, 0xff, n_mass * 4));  // NaN: the kernel must write every entry
  const double estimate = MedianMs(iters, [&] { CHECK_CUDA(XAttentionBlockMassGpu(xp, d_mass, nullptr)); });
  CHECK_CUDA(cudaMemcpy(mass.data(), d_mass, n_mass * 4, cudaMemcpyDeviceToHost));
  // One sweep (its masses checked against the two sweeps' below; `mass` keeps the latter).
  float* d_ws = nullptr;
  CHECK_CUDA(cudaMalloc(&d_ws, XAttentionGpuWorkspaceBytes(xp)));
  xp.workspace = d_ws;
  CHECK_CUDA(cudaMemset(d_mass, 0xff, n_mass * 4));
  const double est_1sw = MedianMs(iters, [&] { CHECK_CUDA(XAttentionBlockMassGpu(xp, d_mass, nullptr)); });
  std::vector<float> mass_1sw(n_mass);
  CHECK_CUDA(cudaMemcpy(mass_1sw.data(), d_mass, n_mass * 4, cudaMemcpyDeviceToHost));
  xp.wgmma = true;
  CHECK_CUDA(cudaMemset(d_mass, 0xff, n_mass * 4));
  const double est_wg = MedianMs(iters, [&] { CHECK_CUDA(XAttentionBlockMassGpu(xp, d_mass, nullptr)); });
  std::vector<float> mass_wg(n_mass);
  CHECK_CUDA(cudaMemcpy(mass_wg.data(), d_mass, n_mass * 4, cudaMemcpyDeviceToHost));
  xp.independent_tiles = true;  // one (row tile, key tile) per block, banded; row sums after
  std::vector<float> mass_it(n_mass);
  CHECK_CUDA(cudaMemset(d_mass, 0xff, n_mass * 4));
  const double est_it = MedianMs(iters, [&] { CHECK_CUDA(XAttentionBlockMassGpu(xp, d_mass, nullptr)); });
  CHECK_CUDA(cudaMemcpy(mass_it.data(), d_mass, n_mass * 4, cudaMemcpyDeviceToHost));
  xp.independent_tiles = false;
  xp.wgmma = false;
  xp.workspace = nullptr;
  CHECK_CUDA(cudaFree(d_ws));
  CHECK_CUDA(cudaMemcpy(d_mass, mass.data(), n_mass * 4, cudaMemcpyHostToDevice));

  // Host selection and plan assembly (as XAttentionPolicy does), timed on the host.
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> row_start = {0}, key_blocks, sel, order;
  std::vector<double> row;
  for (int m = 0; m < blocks; ++m) {
    for (int h = 0; h < kHq; ++h) {
      const float* r = mass.data() + (static_cast<size_t>(h) * blocks + m) * blocks;
      row.assign(r, r + m + 1);
      XAttentionSelectBlocks(row.data(), m, tau, sel, order);
      key_blocks.insert(key_blocks.end(), sel.begin(), sel.end());
      row_start.push_back(static_cast<int32_t>(key_blocks.size()));
    }
  }
  const double select_host =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const double causal_tiles = static_cast<double>(kHq) * blocks * (blocks + 1) / 2;
  const double density = key_blocks.size() / causal_tiles;

  // Device selection and index.
  const DeviceSelection ds = SelectOnDevice(d_mass, blocks, tau, iters);
  const double select_ms = ds.ms;
  std::vector<int32_t> dev_rs(row_start.size()), dev_kb;
  CHECK_CUDA(cudaMemcpy(dev_rs.data(), ds.rs, dev_rs.size() * 4, cudaMemcpyDeviceToHost));
  bool ok = true;
  if (dev_rs == row_start) {
    dev_kb.resize(key_blocks.size());
    CHECK_CUDA(cudaMemcpy(dev_kb.data(), ds.kb, dev_kb.size() * 4, cudaMemcpyDeviceToHost));
  }
  const bool select_ok = dev_rs == row_start && dev_kb == key_blocks;
  std::printf("check %6d: device selection == host selection (%zu rows, %zu blocks): %s\n",
              tokens, row_start.size() - 1, key_blocks.size(), select_ok ? "PASS" : "FAIL");
  ok = ok && select_ok;
  {
    double worst = 0;
    for (size_t i = 0; i < n_mass; ++i) worst = std::max(worst, std::fabs(double{mass[i]} - mass_n128[i]));
    const bool agree = worst <= 1e-3 * (kBlock / kStride);
    std::printf("check %6d: 64- vs 128-group tiles, max |diff| %.3g (limit %.3g): %s\n", tokens,
                worst, 1e-3 * (kBlock / kStride), agree ? "PASS" : "FAIL");
    ok = ok && agree;
  }
  for (const auto& [name, got] : {std::pair<const char*, const std::vector<float>*>{"one sweep", &mass_1sw},
                                   {"one sweep (wgmma)", &mass_wg},
                                   {"independent tiles (wgmma)", &mass_it}}) {
    double worst = 0;
    bool finite = true;  // an unwritten entry stays NaN
    for (size_t i = 0; i < n_mass; ++i) {
      finite = finite && std::isfinite((*got)[i]);
      worst = std::max(worst, std::fabs(double{mass[i]} - (*got)[i]));
    }
    const bool agree = finite && worst <= 1e-3 * (kBlock / kStride);
    std::printf("check %6d: %s vs two sweeps, max |diff| %.3g (limit %.3g): %s\n", tokens, name,
                worst, 1e-3 * (kBlock / kStride), agree ? "PASS" : "FAIL");
    ok = ok && agree;
  }
  if (cuda_core) {
    // Tensor cores vs CUDA cores: both are fp32 estimates of the same masses (the GPU test bounds
    // each against the fp64 reference); a query block's total is its R = 8 query groups.
    double worst = 0;
    for (size_t i = 0; i < n_mass; ++i) worst = std::max(worst, std::fabs(double{mass[i]} - mass_cuda[i]));
    const bool agree = worst <= 1e-3 * (kBlock / kStride);
    std::printf("check %6d: tensor-core vs CUDA-core masses, max |diff| %.3g (limit %.3g): %s\n",
                tokens, worst, 1e-3 * (kBlock / kStride), agree ? "PASS" : "FAIL");
    ok = ok && agree;
  }

  const SparseAttentionIndex idx = ds.Index();
  PagedAttentionParams<__nv_bfloat16> ps = p;
  ps.sparse = &idx;
  const double sparse = MedianMs(iters, [&] { CHECK_CUDA(PagedPrefillRun(ps, mma, nullptr, nullptr)); });
  const double total = estimate + select_ms + sparse;
  // The same index on the wgmma kernel (128-key tiles): timed, and its output checked against the
  // mma.sync kernel's (both bf16 outputs of the same fp32-accumulated attention; the GPU test
  // bounds each against the fp64 reference at relative L2 1e-2).
  const size_t n_out = static_cast<size_t>(tokens) * kHq * kD;
  std::vector<__nv_bfloat16> out_mma(n_out), out_wg(n_out);
  CHECK_CUDA(cudaMemcpy(out_mma.data(), out, n_out * 2, cudaMemcpyDeviceToHost));
  const double sparse_wg = MedianMs(iters, [&] { CHECK_CUDA(PagedPrefillRun(ps, wg, nullptr, nullptr)); });
  CHECK_CUDA(cudaMemcpy(out_wg.data(), out, n_out * 2, cudaMemcpyDeviceToHost));
  {
    double e2 = 0, r2 = 0;
    bool finite = true;
    for (size_t i = 0; i < n_out; ++i) {
      const double a = __bfloat162float(out_mma[i]), b = __bfloat162float(out_wg[i]);
      finite = finite && std::isfinite(b);
      e2 += (a - b) * (a - b);
      r2 += a * a;
    }
    const double rel = std::sqrt(e2 / std::max(r2, 1e-30));
    const bool agree = finite && rel <= 1e-2;
    std::printf("check %6d: wgmma vs mma.sync block-sparse output, relative L2 %.3g (limit 1e-2): %s\n",
                tokens, rel, agree ? "PASS" : "FAIL");
    ok = ok && agree;
  }
  std::printf("est_it %6d: independent tiles %.3f ms vs row sweeps %.3f ms (%.2fx); end2end with "
              "it + select + wgmma sparse: %.2fx dense wgmma (%.3f ms)\n",
              tokens, est_it, est_wg, est_wg / est_it, dense_wg / (est_it + select_ms + sparse_wg),
              est_it + select_ms + sparse_wg);
  std::printf("wgmma sparse %6d: %.3f ms (mma.sync %.3f ms: %.2fx); per computed tile %.2f of dense "
              "wgmma; end2end with est_wg + select + wgmma sparse: %.2fx dense wgmma (%.3f ms)\n",
              tokens, sparse_wg, sparse, sparse / sparse_wg, dense_wg / (sparse_wg / density),
              dense_wg / (est_wg + select_ms + sparse_wg), est_wg + select_ms + sparse_wg);
  // The estimator's GEMM: per head, rows a = 0 .. n-1 score a + 1 key groups (S d products each),
  // twice (two sweeps).
  const double n = tokens / kStride;
  const double est_tflops = 2.0 * 2.0 * kHq * (n * (n + 1) / 2) * kStride * kD / (estimate * 1e9);
  std::printf("%6d %11.2f %9.2f %9.3f %9.3f %9.3f %9.3f %9.2f %8.3f %11.2f %8.2f %7.1f%% %8.2fx %8.2fx %8.2fx %10.2fx %11.2f %8.0f\n",
              tokens, dense_wg, dense_mma, estimate, est_n128, est_1sw, est_wg, est_cuda, select_ms,
              select_host, sparse, 100 * density, dense_wg / total,
              dense_wg / (est_1sw + select_ms + sparse), dense_wg / (est_wg + select_ms + sparse),
              dense_mma / sparse, dense_mma / (sparse / density), est_tflops);
  CHECK_CUDA(cudaFree(d_mass));
  ds.Free();
  FreeLayer(layer);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 10;
  double tau = 0.9;
  bool cuda_core = true, lean = false;
  std::vector<int> lengths = {16384, 32768};
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (!std::strcmp(argv[i], "--iters") && has_value) {
      iters = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--tau") && has_value) {
      tau = std::atof(argv[++i]);
    } else if (!std::strcmp(argv[i], "--tokens") && has_value) {
      lengths = sieve::bench::ParseInts(argv[++i]);
    } else if (!std::strcmp(argv[i], "--no-cuda-core")) {
      cuda_core = false;
    } else if (!std::strcmp(argv[i], "--lean")) {
      lean = true;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--iters N] [--tau T] [--tokens N[,N...]] [--no-cuda-core] [--lean]\n",
                   argv[0]);
      return 2;
    }
  }
  for (int t : lengths) {
    if (t < kBlock || t % kBlock != 0) {
      std::fprintf(stderr, "--tokens: %d is not a positive multiple of %d\n", t, kBlock);
      return 2;
    }
  }
  if (iters < 1) iters = 1;
  int dev = 0, sms = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %s, %d SMs; Llama-3.1-8B layer, XAttention S=%d B=%d tau=%.2f; ms "
              "(select_host: the host selection, once; est_TF: the estimate's TFLOP/s)\n",
              prop.name, sms, kStride, kBlock, tau);
  if (lean) {
    for (size_t i = 0; i < lengths.size(); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      RunLean(lengths[i], iters, tau, sms, i == 0);
      std::printf("wall %6d: %.1f s\n", lengths[i],
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return 0;
  }
  std::printf("%6s %11s %9s %9s %9s %9s %9s %9s %8s %11s %8s %8s %9s %9s %9s %10s %11s %8s\n",
              "tokens", "dense_wgmma", "dense_mma", "estimate", "est_n128", "est_1sw", "est_wg",
              "est_cuda", "select", "select_host", "sparse", "density", "end2end", "e2e_1sw",
              "e2e_wg", "sparse/mma", "tile_parity", "est_TF");
  bool ok = true;
  for (size_t i = 0; i < lengths.size(); ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    ok = RunLength(lengths[i], iters, tau, sms, cuda_core && lengths[i] <= 32768, i == 0) && ok;
    std::printf("wall %6d: %.1f s\n", lengths[i],
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("checks: %s\n", ok ? "all PASS" : "FAIL (see the check lines)");
  return ok ? 0 : 1;
}
