// Prefill attention benchmark: TFLOP/s of PagedPrefillRun (mma.sync, and wgmma with each
// consumer schedule: plain, overlap, ping-pong) on the Llama-3.1-8B attention shape, to compare
// with PyTorch SDPA (bench/prefill_attention_baseline.py) run right after it on the same device.
//
// Shapes: batch 1, 32 query heads, 8 KV heads, head dim 128, bf16, causal, full prefill
// (q_len == kv_len == N) for N = 8K, 32K, 128K; page size 64 (and 16 for one row) on shuffled
// page ids. FLOPs = 4 * N^2 * d * Hq / 2 (BENCHMARKS.md: the causal half only). Inputs are seeded
// random bf16 (never zeros). Each figure is the median of --iters timed runs (at least 10; 5 for
// runs over 100 ms) after a warm-up, timed with CUDA events around each run. The output is
// checked to be finite after timing.
//
//   usage: prefill_attention_bench [--csv FILE] [--seed N] [--iters N] [--max-n N]
//                                  [--only KERNEL] [--n N]
// --only (mma.sync, wgmma-pingpong, wgmma-overlap or wgmma-plain) and --n restrict the rows, e.g. for a profiler.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_cuda.cuh"
#include "kernels/attention/paged_prefill.h"

namespace {

using sieve::bench::FillRandom;
using sieve::kernels::PagedAttentionParams;
using sieve::kernels::PagedPrefillKernel;
using sieve::kernels::PagedPrefillPlan;
using sieve::kernels::PagedPrefillShape;

constexpr int kQHeads = 32, kKvHeads = 8, kDim = 128;

__global__ void CountNonFinite(const __nv_bfloat16* x, size_t n, unsigned long long* count) {
  unsigned long long local = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    local += isfinite(__bfloat162float(x[i])) ? 0 : 1;
  }
  if (local) atomicAdd(count, local);
}

const char* KernelName(PagedPrefillKernel kernel, int overlap) {
  if (kernel == PagedPrefillKernel::kMmaSync) return "mma.sync";
  return overlap == 2 ? "wgmma-pingpong" : overlap == 1 ? "wgmma-overlap" : "wgmma-plain";
}

struct Row {
  int n, page;
  const char* kernel;
  double median_ms, min_ms, tflops;
  int iters;
  unsigned long long non_finite;
};

// Times one shape and kernel; inputs are (re)generated from `seed`.
Row RunShape(int n, int page, PagedPrefillKernel kernel, int overlap, uint64_t seed,
             int min_iters, int num_sms) {
  const size_t q_elems = static_cast<size_t>(n) * kQHeads * kDim;
  const int pages = (n + page - 1) / page;
  const size_t kv_elems = static_cast<size_t>(pages) * page * kKvHeads * kDim;
  __nv_bfloat16 *q, *k, *v, *out;
  CHECK_CUDA(cudaMalloc(&q, q_elems * 2));
  CHECK_CUDA(cudaMalloc(&out, q_elems * 2));
  CHECK_CUDA(cudaMalloc(&k, kv_elems * 2));
  CHECK_CUDA(cudaMalloc(&v, kv_elems * 2));
  FillRandom<<<1024, 256>>>(q, q_elems, seed + 1);
  FillRandom<<<1024, 256>>>(k, kv_elems, seed + 2);
  FillRandom<<<1024, 256>>>(v, kv_elems, seed + 3);
  CHECK_CUDA(cudaGetLastError());
  std::vector<int32_t> table(pages);
  std::iota(table.begin(), table.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(table.begin(), table.end(), rng);
  const int32_t kv_len = n, starts[2] = {0, n};
  int32_t *d_table, *d_kv, *d_starts;
  CHECK_CUDA(cudaMalloc(&d_table, pages * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_kv, sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_starts, 2 * sizeof(int32_t)));
  CHECK_CUDA(cudaMemcpy(d_table, table.data(), pages * sizeof(int32_t), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_kv, &kv_len, sizeof kv_len, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_starts, starts, sizeof starts, cudaMemcpyHostToDevice));

  PagedPrefillPlan plan = Plan(PagedPrefillShape{1, kQHeads, kKvHeads, kDim, n}, num_sms, kernel);
  if (kernel == PagedPrefillKernel::kWgmma) plan.overlap = overlap;
  if (plan.kernel != kernel) {
    std::fprintf(stderr, "plan refused N=%d\n", n);
    std::exit(1);
  }
  PagedAttentionParams<__nv_bfloat16> p;
  p.q = q;
  p.k_cache = k;
  p.v_cache = v;
  p.out = out;
  p.page_table = d_table;
  p.kv_lens = d_kv;
  p.query_start = d_starts;
  p.page_table_stride = pages;
  p.num_seqs = 1;
  p.num_q_heads = kQHeads;
  p.num_kv_heads = kKvHeads;
  p.head_dim = kDim;
  p.page_size = page;
  p.scale = 0.08838834764831845f;

  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  CHECK_CUDA(PagedPrefillRun(p, plan, nullptr, 0));  // warm-up
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> times;
  float total = 0.0f;
  for (;;) {  // at least min_iters runs, or 5 when a run takes over 100 ms
    CHECK_CUDA(cudaEventRecord(start));
    CHECK_CUDA(PagedPrefillRun(p, plan, nullptr, 0));
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
    total += ms;
    const int done = static_cast<int>(times.size());
    if (done >= min_iters || (done >= 5 && total / done > 100.0f)) break;
  }
  std::sort(times.begin(), times.end());
  unsigned long long* d_count;
  unsigned long long count = 0;
  CHECK_CUDA(cudaMalloc(&d_count, sizeof count));
  CHECK_CUDA(cudaMemset(d_count, 0, sizeof count));
  CountNonFinite<<<1024, 256>>>(out, q_elems, d_count);
  CHECK_CUDA(cudaMemcpy(&count, d_count, sizeof count, cudaMemcpyDeviceToHost));

  Row row;
  row.n = n;
  row.page = page;
  row.kernel = KernelName(kernel, overlap);
  row.iters = static_cast<int>(times.size());
  row.median_ms = times[times.size() / 2];
  row.min_ms = times.front();
  const double flops = 4.0 * n * static_cast<double>(n) * kDim * kQHeads / 2.0;
  row.tflops = flops / (row.median_ms * 1e-3) / 1e12;
  row.non_finite = count;
  for (void* ptr : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v),
                    static_cast<void*>(out), static_cast<void*>(d_table), static_cast<void*>(d_kv),
                    static_cast<void*>(d_starts), static_cast<void*>(d_count)}) {
    cudaFree(ptr);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  const char* csv_path = nullptr;
  uint64_t seed = 20261123;
  int iters = 10, max_n = 131072, only_n = 0;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 < argc && arg == "--csv") {
      csv_path = argv[++i];
    } else if (i + 1 < argc && arg == "--seed") {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else if (i + 1 < argc && arg == "--iters") {
      iters = std::max(1, std::atoi(argv[++i]));
    } else if (i + 1 < argc && arg == "--max-n") {
      max_n = std::atoi(argv[++i]);
    } else if (i + 1 < argc && arg == "--only") {
      only = argv[++i];
    } else if (i + 1 < argc && arg == "--n") {
      only_n = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr,
                   "usage: %s [--csv FILE] [--seed N] [--iters N] [--max-n N] [--only KERNEL] "
                   "[--n N]\n",
                   argv[0]);
      return 2;
    }
  }
  int dev = 0, sms = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %s, %d SMs; seed %llu; batch 1, %d/%d heads, d %d, causal, bf16\n", prop.name,
              sms, static_cast<unsigned long long>(seed), kQHeads, kKvHeads, kDim);
  std::printf("%-8s %-5s %-14s %6s %11s %11s %9s %10s\n", "N", "page", "kernel", "iters",
              "median_ms", "min_ms", "TFLOP/s", "nonfinite");
  FILE* csv = csv_path ? std::fopen(csv_path, "w") : nullptr;
  if (csv) std::fprintf(csv, "n,page,kernel,iters,median_ms,min_ms,tflops,non_finite\n");
  struct Job {
    int n, page;
    PagedPrefillKernel kernel;
    int overlap;
  };
  // mma.sync rows first: a fault in the newer kernel then still leaves them measured.
  std::vector<Job> jobs;
  for (int n : {8192, 32768, 131072}) {
    if (n <= max_n) jobs.push_back({n, 64, PagedPrefillKernel::kMmaSync, 0});
  }
  for (int n : {8192, 32768, 131072}) {
    if (n > max_n) continue;
    for (int overlap : {2, 1, 0}) jobs.push_back({n, 64, PagedPrefillKernel::kWgmma, overlap});
    if (n == 32768) jobs.push_back({n, 16, PagedPrefillKernel::kWgmma, 2});
  }
  int bad = 0;
  for (const Job& j : jobs) {
    const char* name = KernelName(j.kernel, j.overlap);
    if ((!only.empty() && only != name) || (only_n > 0 && only_n != j.n)) continue;
    const Row r = RunShape(j.n, j.page, j.kernel, j.overlap, seed + j.n, iters, sms);
    std::printf("%-8d %-5d %-14s %6d %11.3f %11.3f %9.1f %10llu\n", r.n, r.page, r.kernel, r.iters,
                r.median_ms, r.min_ms, r.tflops, r.non_finite);
    std::fflush(stdout);
    if (csv) {
      std::fprintf(csv, "%d,%d,%s,%d,%.4f,%.4f,%.2f,%llu\n", r.n, r.page, r.kernel, r.iters,
                   r.median_ms, r.min_ms, r.tflops, r.non_finite);
    }
    bad += r.non_finite != 0;
  }
  if (csv) std::fclose(csv);
  return bad == 0 ? 0 : 1;
}
