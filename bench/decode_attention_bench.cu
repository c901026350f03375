// Decode attention benchmark: achieved K+V bytes per second of PagedDecodeRun against a
// device-to-device copy measured in the same run.
//
// Shapes: Llama-3.1-8B attention (32 query heads, 8 KV heads, head dim 128, bf16), page size 16,
// contexts 32K and 128K, batch 1, 8 and 32. Inputs are seeded random bf16 (never zeros) on
// shuffled page ids; when one input set is smaller than 512 MB several sets are made and the
// timed runs rotate among them so that L2 (50 MB) does not serve repeats. Each sample is one
// launch of a CUDA graph holding a burst of runs (so host launch gaps stay out); the figure is
// the median sample divided by the burst length.
//
//   usage: decode_attention_bench [--csv FILE] [--seed N] [--iters N]
// Prints one table row per shape; --csv also writes them as comma-separated lines.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_cuda.cuh"
#include "kernels/attention/paged_decode.h"

namespace {

using sieve::bench::FillRandom;
using sieve::kernels::PagedAttentionParams;
using sieve::kernels::PagedDecodePlan;
using sieve::kernels::PagedDecodeShape;

__global__ void CountNonFinite(const __nv_bfloat16* x, size_t n, unsigned long long* count) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    if (!isfinite(__bfloat162float(x[i]))) atomicAdd(count, 1ull);
  }
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Median milliseconds of a device-to-device copy of `bytes`, timed with events.
double CopyMs(size_t bytes, int iters) {
  void *a = nullptr, *b = nullptr;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  CHECK_CUDA(cudaMemset(a, 1, bytes));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    CHECK_CUDA(cudaEventRecord(start));
    CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));
  return Median(ms);
}

struct Result {
  int batch, context, splits, chunk, sets, reps;
  double kv_bytes, ms, ms_min, ms_max;
};

// Times one shape. `force_splits` > 0 replaces the planner's split by that many equal chunks
// (to see how the split count moves the figure); 0 keeps the planner's decision.
Result RunShape(int batch, int context, int num_sms, uint64_t seed, int iters,
                int force_splits = 0) {
  constexpr int kQHeads = 32, kKvHeads = 8, kDim = 128, kPage = 16;
  const double kv_bytes = 2.0 * batch * static_cast<double>(context) * kKvHeads * kDim * 2;
  const int sets = std::max(1, static_cast<int>(std::ceil(512e6 / kv_bytes)));
  const int pages_per_seq = (context + kPage - 1) / kPage;
  const size_t pages_per_set = static_cast<size_t>(batch) * pages_per_seq;
  const size_t num_pages = pages_per_set * sets;
  const size_t page_elems = static_cast<size_t>(kPage) * kKvHeads * kDim;
  __nv_bfloat16 *k = nullptr, *v = nullptr, *q = nullptr, *out = nullptr;
  CHECK_CUDA(cudaMalloc(&k, num_pages * page_elems * 2));
  CHECK_CUDA(cudaMalloc(&v, num_pages * page_elems * 2));
  const size_t q_elems = static_cast<size_t>(batch) * kQHeads * kDim;
  CHECK_CUDA(cudaMalloc(&q, q_elems * 2 * sets));
  CHECK_CUDA(cudaMalloc(&out, q_elems * 2));
  FillRandom<<<4096, 256>>>(k, num_pages * page_elems, seed + 1);
  FillRandom<<<4096, 256>>>(v, num_pages * page_elems, seed + 2);
  FillRandom<<<256, 256>>>(q, q_elems * sets, seed + 3);
  CHECK_CUDA(cudaGetLastError());

  // One page table per input set, each a shuffle of its own page range.
  std::mt19937_64 rng(seed);
  std::vector<int32_t> table(pages_per_set * sets);
  for (int s = 0; s < sets; ++s) {
    std::vector<int32_t> ids(pages_per_set);
    std::iota(ids.begin(), ids.end(), static_cast<int32_t>(s * pages_per_set));
    std::shuffle(ids.begin(), ids.end(), rng);
    std::copy(ids.begin(), ids.end(), table.begin() + s * pages_per_set);
  }
  int32_t *d_table = nullptr, *d_lens = nullptr, *d_qstart = nullptr;
  CHECK_CUDA(cudaMalloc(&d_table, table.size() * 4));
  CHECK_CUDA(cudaMemcpy(d_table, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  std::vector<int32_t> lens(batch, context), qstart(batch + 1);
  std::iota(qstart.begin(), qstart.end(), 0);
  CHECK_CUDA(cudaMalloc(&d_lens, batch * 4));
  CHECK_CUDA(cudaMalloc(&d_qstart, (batch + 1) * 4));
  CHECK_CUDA(cudaMemcpy(d_lens, lens.data(), batch * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_qstart, qstart.data(), (batch + 1) * 4, cudaMemcpyHostToDevice));

  PagedDecodeShape shape{batch, kQHeads, kKvHeads, kDim, context};
  PagedDecodePlan plan = sieve::kernels::Plan(shape, num_sms);
  if (force_splits > 0) {
    plan.chunk_tokens = ((context + force_splits - 1) / force_splits + 63) / 64 * 64;
    plan.num_splits = (context + plan.chunk_tokens - 1) / plan.chunk_tokens;
    plan.workspace_bytes = plan.num_splits == 1 ? 0
                                                : static_cast<size_t>(batch) * kQHeads *
                                                      plan.num_splits * (kDim + 2) * 4;
  }
  void* ws = nullptr;
  if (plan.workspace_bytes) CHECK_CUDA(cudaMalloc(&ws, plan.workspace_bytes));
  auto params = [&](int set) {
    PagedAttentionParams<__nv_bfloat16> p;
    p.q = q + set * q_elems;
    p.k_cache = k;
    p.v_cache = v;
    p.out = out;
    p.page_table = d_table + set * pages_per_set;
    p.kv_lens = d_lens;
    p.query_start = d_qstart;
    p.page_table_stride = pages_per_seq;
    p.num_seqs = batch;
    p.num_q_heads = kQHeads;
    p.num_kv_heads = kKvHeads;
    p.head_dim = kDim;
    p.page_size = kPage;
    p.scale = 1.0f / std::sqrt(static_cast<float>(kDim));
    return p;
  };
  for (int i = 0; i < 3; ++i) CHECK_CUDA(PagedDecodeRun(params(i % sets), plan, ws, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  // A burst of `reps` runs (rotating input sets) captured in one CUDA graph, so that host launch
  // gaps stay out of the figure; each sample is one graph launch, divided by reps.
  const double floor_guess_s = kv_bytes / 3.0e12;
  const int reps = std::clamp(static_cast<int>(2e-3 / floor_guess_s), 1, 20);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < reps; ++i) CHECK_CUDA(PagedDecodeRun(params(i % sets), plan, ws, stream));
  CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  CHECK_CUDA(cudaGraphLaunch(exec, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    CHECK_CUDA(cudaGraphLaunch(exec, stream));
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t / reps);
  }
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  CHECK_CUDA(cudaStreamDestroy(stream));
  unsigned long long* d_bad = nullptr;
  unsigned long long bad = 0;
  CHECK_CUDA(cudaMalloc(&d_bad, sizeof bad));
  CHECK_CUDA(cudaMemset(d_bad, 0, sizeof bad));
  CountNonFinite<<<64, 256>>>(out, q_elems, d_bad);
  CHECK_CUDA(cudaMemcpy(&bad, d_bad, sizeof bad, cudaMemcpyDeviceToHost));
  if (bad) std::fprintf(stderr, "WARNING: %llu non-finite outputs\n", bad);
  Result r{batch, context, plan.num_splits, plan.chunk_tokens, sets, reps, kv_bytes, Median(ms),
           *std::min_element(ms.begin(), ms.end()), *std::max_element(ms.begin(), ms.end())};
  for (void* ptr : {static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(q),
                    static_cast<void*>(out), static_cast<void*>(d_table),
                    static_cast<void*>(d_lens),
                    static_cast<void*>(d_qstart), ws, static_cast<void*>(d_bad)}) {
    if (ptr) CHECK_CUDA(cudaFree(ptr));
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const char* csv_path = nullptr;
  uint64_t seed = 20261123;
  int iters = 30;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--csv")) csv_path = argv[i + 1];
    if (!std::strcmp(argv[i], "--seed")) seed = std::strtoull(argv[i + 1], nullptr, 10);
    if (!std::strcmp(argv[i], "--iters")) iters = std::atoi(argv[i + 1]);
  }
  int dev = 0;
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %s, %d SMs, L2 %d MB; seed %llu, %d timed runs per shape (median)\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20,
              static_cast<unsigned long long>(seed), iters);
  const size_t copy_bytes = size_t{2} << 30;
  const double copy_ms = CopyMs(copy_bytes, 20);
  const double copy_bw = 2.0 * copy_bytes / (copy_ms * 1e-3);  // read + written
  std::printf("device-to-device copy: %.3f TB/s (2 GiB, read + written)\n", copy_bw / 1e12);

  FILE* csv = csv_path ? std::fopen(csv_path, "w") : nullptr;
  if (csv) {
    std::fprintf(csv, "batch,context,splits,chunk,sets,reps,kv_bytes,ms_median,ms_min,ms_max,"
                      "tb_per_s,copy_tb_per_s,fraction_of_copy,floor_ms\n");
  }
  std::printf("\n| batch | context | splits x chunk | K+V MB | floor us | median us | TB/s | "
              "of copy |\n|---|---|---|---|---|---|---|---|\n");
  for (int context : {32768, 131072}) {
    for (int batch : {1, 8, 32}) {
      const Result r = RunShape(batch, context, prop.multiProcessorCount, seed, iters);
      const double bw = r.kv_bytes / (r.ms * 1e-3);
      const double floor_ms = r.kv_bytes / copy_bw * 1e3;
      std::printf("| %d | %d | %d x %d | %.0f | %.1f | %.1f | %.3f | %.1f%% |\n", r.batch,
                  r.context, r.splits, r.chunk, r.kv_bytes / 1e6, floor_ms * 1e3, r.ms * 1e3,
                  bw / 1e12, 100.0 * bw / copy_bw);
      std::fflush(stdout);
      if (csv) {
        std::fprintf(csv, "%d,%d,%d,%d,%d,%d,%.0f,%.5f,%.5f,%.5f,%.4f,%.4f,%.4f,%.5f\n", r.batch,
                     r.context, r.splits, r.chunk, r.sets, r.reps, r.kv_bytes, r.ms, r.ms_min,
                     r.ms_max,
                     bw / 1e12, copy_bw / 1e12, bw / copy_bw, floor_ms);
      }
    }
  }
  // How the split count moves batch 1 (the planner's choice is in the table above).
  for (int context : {32768, 131072}) {
    std::printf("\nbatch 1, context %d, forced split counts:\n| splits x chunk | median us | "
                "TB/s | of copy |\n|---|---|---|---|\n", context);
    for (int splits : {8, 16, 24, 32, 48, 64, 96, 128}) {
      const Result r = RunShape(1, context, prop.multiProcessorCount, seed, iters, splits);
      const double bw = r.kv_bytes / (r.ms * 1e-3);
      std::printf("| %d x %d | %.1f | %.3f | %.1f%% |\n", r.splits, r.chunk, r.ms * 1e3,
                  bw / 1e12, 100.0 * bw / copy_bw);
      std::fflush(stdout);
    }
  }
  const double copy_ms2 = CopyMs(copy_bytes, 20);
  std::printf("\ndevice-to-device copy again at the end: %.3f TB/s\n",
              2.0 * copy_bytes / (copy_ms2 * 1e-3) / 1e12);
  if (csv) std::fclose(csv);
  return 0;
}
