#include "kernels/cpu/gemm_cpu.h"

#include <algorithm>
#include <cstring>

#include "kernels/cpu/parallel_for.h"
#include "oneapi/dnnl/dnnl.h"

// The OpenMP runtime that Debian's oneDNN is built on (libgomp, linked by kernels/CMakeLists.txt);
// declared here rather than through the compiler's omp.h, which may belong to another runtime.
extern "C" {
int omp_get_max_threads(void);
void omp_set_num_threads(int num_threads);
}

namespace sieve::kernels {
namespace {

// Columns per thread block: a multiple of the widest register tile of oneDNN's AVX-512 sgemm
// kernels (48 columns) and of a cache line of output (16 floats).
constexpr int64_t kColumnBlock = 48;
// Below this many multiply-adds per thread a helper costs more than it saves. Pool threads spin
// between the calls of a step (parallel_for.cc), so handing one a range costs about a
// microsecond; a decode GEMV is memory-bound, and two threads read its weights nearly twice as
// fast: the embedded model's decode GEMVs (256 x 512 ... 256 x 4096, 0.13-1 M) all split now
// (2^20 before: every one ran on one thread while the other spun; model_bench decode step at
// 32K, 2026-12-06: Quest 3.8-4.3 -> 2.5 ms, dense 8.2-9.1 -> 7.3-7.5 ms).
constexpr int64_t kMinMacsPerThread = int64_t{1} << 16;

// One thread's block: c[:, j0:j1] = a * b[j0:j1, :]^T on the calling thread.
void SgemmBlock(int64_t m, int64_t j0, int64_t j1, int64_t k, const float* a, int64_t lda,
                const float* b, int64_t ldb, float* c, int64_t ldc) {
  // oneDNN parallelises with OpenMP over omp_get_max_threads() of the calling thread; one
  // thread runs the product inline without starting an OpenMP team (ICVs are per thread).
  if (omp_get_max_threads() != 1) omp_set_num_threads(1);
  const dnnl_status_t status = dnnl_sgemm('N', 'T', m, j1 - j0, k, 1.0f, a, lda, b + j0 * ldb,
                                          ldb, 0.0f, c + j0, ldc);
  if (status == dnnl_success) return;
  // oneDNN rejects only malformed arguments, which the contract excludes; stay correct anyway.
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = j0; j < j1; ++j) {
      float s = 0.0f;
      for (int64_t l = 0; l < k; ++l) s += a[i * lda + l] * b[j * ldb + l];
      c[i * ldc + j] = s;
    }
  }
}

}  // namespace

void SgemmNT(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc, int threads) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, sizeof(float) * n);
    return;
  }
  if (threads <= 0) threads = DefaultCpuThreads();
  const int64_t blocks = (n + kColumnBlock - 1) / kColumnBlock;
  const int64_t by_work = std::max<int64_t>(1, m * n * k / kMinMacsPerThread);
  const int t = static_cast<int>(std::min<int64_t>({threads, blocks, by_work}));
  ParallelFor(blocks, t, 1, [&](int64_t b0, int64_t b1) {
    SgemmBlock(m, b0 * kColumnBlock, std::min(n, b1 * kColumnBlock), k, a, lda, b, ldb, c, ldc);
  });
}

void LinearCpu(const float* x, const float* w, const float* bias, int64_t rows, int64_t k_in,
               int64_t n_out, float* out, int threads) {
  SgemmNT(rows, n_out, k_in, x, k_in, w, k_in, out, n_out, threads);
  if (bias == nullptr) return;
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * n_out;
    for (int64_t j = 0; j < n_out; ++j) o[j] += bias[j];
  }
}

}  // namespace sieve::kernels
