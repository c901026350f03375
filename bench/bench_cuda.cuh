// What the CUDA benchmark programs share: a fatal check of CUDA calls and a seeded random fill.
// Header-only; each benchmark is one translation unit.
#ifndef SIEVE_BENCH_BENCH_CUDA_CUH_
#define SIEVE_BENCH_BENCH_CUDA_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

// Exits with the failing call and CUDA's message.
#define CHECK_CUDA(expr)                                                                   \
  do {                                                                                     \
    cudaError_t e_ = (expr);                                                               \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,                   \
                   cudaGetErrorString(e_));                                                \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

namespace sieve::bench {

// "32768,131072" -> {32768, 131072} (a benchmark's list argument).
inline std::vector<int> ParseInts(const std::string& list) {
  std::vector<int> out;
  for (size_t at = 0; at < list.size();) {
    const size_t comma = std::min(list.find(',', at), list.size());
    out.push_back(std::atoi(list.substr(at, comma - at).c_str()));
    at = comma + 1;
  }
  return out;
}

// Fills n bf16 values with a seeded hash of their index: uniform in [-scale, scale] (the default
// scale, sqrt(3), gives unit variance).
__global__ void FillRandom(__nv_bfloat16* x, size_t n, uint64_t seed, float scale = 1.7320508f) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t h = seed * 0x100000001b3ull + i + 0x9e3779b97f4a7c15ull;
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    h ^= h >> 31;
    const float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);
    x[i] = __float2bfloat16((2.0f * u - 1.0f) * scale);
  }
}

// Milliseconds per call of run(): the median over `iters` samples, each `burst` back-to-back calls
// between two CUDA events on the default stream divided by `burst`, after `warmup` calls.
template <typename Fn>
double MedianMs(int iters, Fn run, int burst = 1, int warmup = 1) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < warmup; ++i) run();
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    for (int j = 0; j < burst; ++j) run();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t / burst);
  }
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace sieve::bench

#endif  // SIEVE_BENCH_BENCH_CUDA_CUH_
