// Linear layers of the CPU backend as one OpenBLAS SGEMM (the plain loops of ops.h stay as the
// reference).
#ifndef SIEVE_KERNELS_CPU_BLAS_LINEAR_H_
#define SIEVE_KERNELS_CPU_BLAS_LINEAR_H_

#include <cstdint>

namespace sieve::kernels {

// out[rows, n_out] = x[rows, k_in] * w[n_out, k_in]^T (+ bias[n_out] if non-null), all fp32
// row-major (w in PyTorch's [out, in] layout): cblas_sgemm(RowMajor, NoTrans, Trans).
// `threads` > 0 sets OpenBLAS's thread count (process-wide) before the call; 0 leaves it as is
// (OPENBLAS_NUM_THREADS or all cores). OpenBLAS keeps its own thread pool, whose idle threads
// spin (yielding) for a while after each call: on a few oversubscribed cores that can slow the
// next operator; a pool shared with kernels/cpu/parallel_for.h would remove it (not done yet).
// Thread-safe for distinct outputs.
void LinearBlas(const float* x, const float* w, const float* bias, int64_t rows, int64_t k_in,
                int64_t n_out, float* out, int threads);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_CPU_BLAS_LINEAR_H_
