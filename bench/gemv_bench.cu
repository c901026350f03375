// Small-batch linear layers: GemvBf16 (kernels/cuda/gemv.h) against cuBLASLt (BlasLtGemm, its
// first heuristic) on the Llama-3.1-8B decode shapes, as achieved weight bytes per second next to
// a device-to-device copy measured in the same run.
//
// Shapes: qkv 6144x4096, o_proj 4096x4096, gate_up 28672x4096, down 4096x14336, at m = 1, 2 and
// 4 rows of x. Weights are seeded random bf16; each shape gets enough weight copies (>= 512 MB in
// all) that the timed runs, rotating among them, never find their weights in L2 (50 MB). One
// sample is one launch of a CUDA graph holding a burst of runs (host launch gaps stay out); the
// figure is the median sample over the burst length. Both paths' outputs are compared (relative
// L2 of the bf16 results) so a fast wrong kernel shows.
//
//   usage: gemv_bench [--iters N]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "bench/bench_cuda.cuh"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemv.h"

namespace {

using sieve::bench::FillRandom;
using sieve::kernels::BlasLtGemm;
using sieve::kernels::GemmArgs;

// Median of `samples` graph launches, each a burst of `burst` enqueues of `body(i)`; seconds per
// enqueue.
template <typename Body>
double TimeBurst(cudaStream_t stream, int burst, int samples, Body body) {
  cudaGraph_t graph;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < burst; ++i) body(i);
  CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  CHECK_CUDA(cudaGraphLaunch(exec, stream));  // warm-up
  std::vector<float> ms;
  for (int s = 0; s < samples; ++s) {
    CHECK_CUDA(cudaEventRecord(a, stream));
    CHECK_CUDA(cudaGraphLaunch(exec, stream));
    CHECK_CUDA(cudaEventRecord(b, stream));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  return ms[ms.size() / 2] * 1e-3 / burst;
}

double RelL2(const std::vector<__nv_bfloat16>& got, const std::vector<__nv_bfloat16>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = __bfloat162float(got[i]), w = __bfloat162float(want[i]);
    num += (g - w) * (g - w);
    den += w * w;
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--iters") == 0) iters = std::max(3, std::atoi(argv[i + 1]));
  }
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));

  // Copy bandwidth: bytes read + written per second of a 4 GiB device-to-device copy.
  const size_t copy_bytes = size_t{4} << 30;
  void *src, *dst;
  CHECK_CUDA(cudaMalloc(&src, copy_bytes));
  CHECK_CUDA(cudaMalloc(&dst, copy_bytes));
  CHECK_CUDA(cudaMemset(src, 1, copy_bytes));
  // Timed directly with events (a copy captured into a graph ran at two thirds of this rate).
  cudaEvent_t ca, cb;
  CHECK_CUDA(cudaEventCreate(&ca));
  CHECK_CUDA(cudaEventCreate(&cb));
  std::vector<float> copy_ms;
  for (int i = 0; i < iters + 3; ++i) {
    CHECK_CUDA(cudaEventRecord(ca, stream));
    CHECK_CUDA(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice, stream));
    CHECK_CUDA(cudaEventRecord(cb, stream));
    CHECK_CUDA(cudaEventSynchronize(cb));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, ca, cb));
    if (i >= 3) copy_ms.push_back(t);
  }
  std::sort(copy_ms.begin(), copy_ms.end());
  const double copy_bw = 2.0 * copy_bytes / (copy_ms[copy_ms.size() / 2] * 1e-3);
  CHECK_CUDA(cudaEventDestroy(ca));
  CHECK_CUDA(cudaEventDestroy(cb));
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));
  std::printf("device: %s; device-to-device copy %.3f TB/s (read + written)\n\n", prop.name,
              copy_bw * 1e-12);

  BlasLtGemm gemm;
  if (gemm.Init() != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "cuBLASLt init failed\n");
    return 1;
  }
  const size_t ws_bytes = size_t{32} << 20;
  void* ws;
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes));

  struct Shape {
    const char* name;
    int64_t n, k;
  };
  const Shape shapes[] = {{"qkv", 6144, 4096},
                          {"o_proj", 4096, 4096},
                          {"gate_up", 28672, 4096},
                          {"down", 4096, 14336}};
  std::printf("| layer | m | n x k | weights | cuBLASLt | GemvBf16 | cuBLASLt / copy | Gemv / copy "
              "| speed-up | rel L2 (Gemv vs cuBLASLt) |\n|---|---|---|---|---|---|---|---|---|---|\n");
  int status = 0;
  for (const Shape& sh : shapes) {
    const size_t w_elems = static_cast<size_t>(sh.n) * sh.k;
    const size_t w_bytes = w_elems * sizeof(__nv_bfloat16);
    const int copies = static_cast<int>(std::max<size_t>(1, ((size_t{512} << 20) + w_bytes - 1) / w_bytes));
    __nv_bfloat16* w;
    CHECK_CUDA(cudaMalloc(&w, w_bytes * copies));
    FillRandom<<<1024, 256, 0, stream>>>(w, w_elems * copies, 11, 0.05f);
    for (int64_t m : {1, 2, 4}) {
      __nv_bfloat16 *x, *y_blas, *y_gemv;
      CHECK_CUDA(cudaMalloc(&x, sizeof(__nv_bfloat16) * m * sh.k));
      CHECK_CUDA(cudaMalloc(&y_blas, sizeof(__nv_bfloat16) * m * sh.n));
      CHECK_CUDA(cudaMalloc(&y_gemv, sizeof(__nv_bfloat16) * m * sh.n));
      FillRandom<<<64, 256, 0, stream>>>(x, m * sh.k, 12 + m, 1.0f);
      auto args = [&](int i, __nv_bfloat16* y) {
        GemmArgs g;
        g.x = x;
        g.w = w + static_cast<size_t>(i % copies) * w_elems;
        g.y = y;
        g.m = m;
        g.n = sh.n;
        g.k = sh.k;
        return g;
      };
      // Both once on copy 0, for the comparison (and cuBLASLt's plan, made outside capture).
      if (gemm.Run(args(0, y_blas), ws, ws_bytes, stream) != CUBLAS_STATUS_SUCCESS) status = 1;
      CHECK_CUDA(sieve::kernels::GemvBf16(args(0, y_gemv), stream));
      CHECK_CUDA(cudaStreamSynchronize(stream));
      std::vector<__nv_bfloat16> hb(m * sh.n), hg(m * sh.n);
      CHECK_CUDA(cudaMemcpy(hb.data(), y_blas, hb.size() * 2, cudaMemcpyDeviceToHost));
      CHECK_CUDA(cudaMemcpy(hg.data(), y_gemv, hg.size() * 2, cudaMemcpyDeviceToHost));
      const double err = RelL2(hg, hb);
      if (!(err < 1e-2)) status = 1;
      const int burst = 4 * copies;
      const double t_blas = TimeBurst(stream, burst, iters, [&](int i) {
        if (gemm.Run(args(i, y_blas), ws, ws_bytes, stream) != CUBLAS_STATUS_SUCCESS) status = 1;
      });
      const double t_gemv = TimeBurst(stream, burst, iters, [&](int i) {
        CHECK_CUDA(sieve::kernels::GemvBf16(args(i, y_gemv), stream));
      });
      std::printf("| %s | %lld | %lld x %lld | %.1f MB | %.1f us | %.1f us | %.0f%% | %.0f%% | "
                  "%.2fx | %.1e |\n",
                  sh.name, static_cast<long long>(m), static_cast<long long>(sh.n),
                  static_cast<long long>(sh.k), w_bytes * 1e-6, t_blas * 1e6, t_gemv * 1e6,
                  100.0 * w_bytes / t_blas / copy_bw, 100.0 * w_bytes / t_gemv / copy_bw,
                  t_blas / t_gemv, err);
      CHECK_CUDA(cudaFree(x));
      CHECK_CUDA(cudaFree(y_blas));
      CHECK_CUDA(cudaFree(y_gemv));
    }
    CHECK_CUDA(cudaFree(w));
  }
  CHECK_CUDA(cudaFree(ws));
  if (status != 0) std::printf("\nFAILED: a cuBLASLt call failed or the outputs differ\n");
  return status;
}
