// XAttention prefill on the GPU against dense prefill, measured in the same run.
//
// One Llama-3.1-8B attention layer (32 query heads, 8 KV heads, head dim 128, bf16, page 16), one
// fresh prompt of 16K and 32K tokens with the structure real attention has
// (bench/structured_attention.h, parameters printed). Timed on the device (median of --iters,
// events):
//   dense_wgmma  PagedPrefillRun, the Hopper wgmma kernel (the production dense path)
//   dense_mma    PagedPrefillRun, the mma.sync kernel (the inner loop the sparse run shares)
//   estimate     XAttentionBlockMassGpu (stride 16, block 128), the tensor-core kernel
//   est_cuda     the same on the CUDA-core kernel (the cross-check; not in the end-to-end sum)
//   sparse       PagedPrefillRun on the selected blocks (mma.sync, block-sparse)
// and on the host: the threshold selection (tau 0.9) and plan assembly, as the engine does it.
// Reported: density (computed causal 128x128 tiles / all causal tiles) and the speedups
// dense_wgmma / (estimate + select + sparse) and dense_mma / sparse (per computed tile parity).
//
//   usage: xattention_prefill_gpu_bench [--iters N] [--tau T]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

template <typename Fn>
double MedianMs(int iters, Fn run) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  run();  // warm-up
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    run();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

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

void RunLength(int tokens, int iters, double tau, int sms) {
  sieve::bench::StructuredAttentionParams sp;
  sp.tokens = tokens;
  const sieve::bench::StructuredAttention in = sieve::bench::MakeStructuredAttention(sp);
  if (tokens == 16384) std::printf("inputs: %s\n", sp.Describe().c_str());
  // Pages in order: page j holds positions [16 j, 16 j + 16); the generator's [tokens, heads, d]
  // rows are exactly the cache layout.
  const int pages = tokens / kPage;
  std::vector<int32_t> table(pages);
  for (int i = 0; i < pages; ++i) table[i] = i;
  __nv_bfloat16 *q = UploadBf16(in.q), *k = UploadBf16(in.k), *v = UploadBf16(in.v), *out;
  CHECK_CUDA(cudaMalloc(&out, in.q.size() * 2));
  int32_t* d_table = Upload(table);
  int32_t* d_kv = Upload(std::vector<int32_t>{tokens});
  int32_t* d_qs = Upload(std::vector<int32_t>{0, tokens});
  PagedAttentionParams<__nv_bfloat16> p;
  p.q = q;
  p.k_cache = k;
  p.v_cache = v;
  p.out = out;
  p.page_table = d_table;
  p.kv_lens = d_kv;
  p.query_start = d_qs;
  p.page_table_stride = pages;
  p.num_seqs = 1;
  p.num_q_heads = kHq;
  p.num_kv_heads = kHkv;
  p.head_dim = kD;
  p.page_size = kPage;
  p.scale = 0.08838834764f;
  const PagedPrefillShape shape{1, kHq, kHkv, kD, tokens};
  const PagedPrefillPlan wg = Plan(shape, sms, PagedPrefillKernel::kWgmma);
  const PagedPrefillPlan mma = Plan(shape, sms, PagedPrefillKernel::kMmaSync);
  const double dense_wg = MedianMs(iters, [&] { CHECK_CUDA(PagedPrefillRun(p, wg, nullptr, nullptr)); });
  const double dense_mma = MedianMs(iters, [&] { CHECK_CUDA(PagedPrefillRun(p, mma, nullptr, nullptr)); });

  XAttentionGpuParams xp;
  xp.q = q;
  xp.q_row_stride = kHq * kD;
  xp.k_cache = k;
  xp.page_table = d_table;
  xp.page_size = kPage;
  xp.num_q_heads = kHq;
  xp.num_kv_heads = kHkv;
  xp.head_dim = kD;
  xp.q_len = tokens;
  xp.kv_len = tokens;
  xp.stride = kStride;
  xp.block_size = kBlock;
  const int blocks = tokens / kBlock;
  float* d_mass;
  const size_t n_mass = static_cast<size_t>(kHq) * blocks * blocks;
  CHECK_CUDA(cudaMalloc(&d_mass, n_mass * 4));
  xp.tensor_cores = false;
  const double est_cuda = MedianMs(iters, [&] { CHECK_CUDA(XAttentionBlockMassGpu(xp, d_mass, nullptr)); });
  xp.tensor_cores = true;
  const double estimate = MedianMs(iters, [&] { CHECK_CUDA(XAttentionBlockMassGpu(xp, d_mass, nullptr)); });
  std::vector<float> mass(n_mass);
  CHECK_CUDA(cudaMemcpy(mass.data(), d_mass, n_mass * 4, cudaMemcpyDeviceToHost));

  // Host selection and plan assembly (as XAttentionPolicy does), timed on the host.
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> qbs = {0, blocks}, row_start = {0}, key_blocks, sel, order;
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
  const double select_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const double causal_tiles = static_cast<double>(kHq) * blocks * (blocks + 1) / 2;
  const double density = key_blocks.size() / causal_tiles;
  int32_t *d_qbs = Upload(qbs), *d_rs = Upload(row_start), *d_kb = Upload(key_blocks);
  SparseAttentionIndex idx;
  idx.query_block = kBlock;
  idx.key_block = kBlock;
  idx.query_block_start = d_qbs;
  idx.row_start = d_rs;
  idx.key_blocks = d_kb;
  PagedAttentionParams<__nv_bfloat16> ps = p;
  ps.sparse = &idx;
  const double sparse = MedianMs(iters, [&] { CHECK_CUDA(PagedPrefillRun(ps, mma, nullptr, nullptr)); });
  const double total = estimate + select_ms + sparse;
  std::printf("%6d %11.2f %9.2f %9.2f %9.2f %9.2f %8.2f %7.1f%% %10.2fx %10.2fx %11.2f\n", tokens,
              dense_wg, dense_mma, estimate, est_cuda, select_ms, sparse, 100 * density, dense_wg / total,
              dense_mma / sparse, dense_mma / (sparse / density));
  for (void* ptr : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v),
                    static_cast<void*>(out), static_cast<void*>(d_table), static_cast<void*>(d_kv),
                    static_cast<void*>(d_qs), static_cast<void*>(d_mass), static_cast<void*>(d_qbs),
                    static_cast<void*>(d_rs), static_cast<void*>(d_kb)}) {
    CHECK_CUDA(cudaFree(ptr));
  }
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 10;
  double tau = 0.9;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--iters")) iters = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--tau")) tau = std::atof(argv[i + 1]);
  }
  int dev = 0, sms = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %s, %d SMs; Llama-3.1-8B layer, XAttention S=%d B=%d tau=%.2f; ms\n",
              prop.name, sms, kStride, kBlock, tau);
  std::printf("%6s %11s %9s %9s %9s %9s %8s %8s %11s %11s %11s\n", "tokens", "dense_wgmma",
              "dense_mma", "estimate", "est_cuda", "select", "sparse", "density", "end2end",
              "sparse/mma", "tile_parity");
  for (int tokens : {16384, 32768}) RunLength(tokens, iters, tau, sms);
  return 0;
}
