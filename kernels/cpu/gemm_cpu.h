// fp32 matrix products on the CPU through oneDNN's sgemm (Debian's libdnnl), the CPU backend's
// linear layers. LinearRef in ops.h stays the loop reference they are tested against.
//
// Why oneDNN: it picks its JIT kernels from the CPU's feature flags (AVX-512 on any vendor or
// family), is safe to call from several threads at once, and carries 36 bytes of static TLS.
// Debian's threaded OpenBLAS carries 61 KB (it overflowed civetweb's worker stacks); its serial
// build has no locking around its buffer pool, so concurrent callers race; both OpenBLAS 0.3.21
// and BLIS 0.9 fall back to slow kernels on CPU families they do not know (they chose Haswell
// and generic on the Zen 5 development VM). bench/results/2026-12-05-cpu-gemm.md has the numbers.
//
// Threads: our own (ParallelFor), each running a single-threaded sgemm on a block of output
// columns; oneDNN's OpenMP runtime is held to one thread per caller, so it starts no threads.
#ifndef SIEVE_KERNELS_CPU_GEMM_CPU_H_
#define SIEVE_KERNELS_CPU_GEMM_CPU_H_

#include <cstdint>

namespace sieve::kernels {

// c[i, j] = sum_l a[i, l] * b[j, l] for i < m, j < n, l < k: A times B transposed, row-major
// with leading dimensions lda, ldb, ldc (elements; >= k, k and n). Threads split the n columns
// (0 = all hardware threads). m, n or k of 0 is a no-op (c untouched when m or n is 0; zeroed
// when only k is 0).
void SgemmNT(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc, int threads = 0);

// LinearRef's contract (ops.h) on SgemmNT: out[r, n] = sum_k x[r, k] * w[n, k] (+ bias[n]).
void LinearCpu(const float* x, const float* w, const float* bias, int64_t rows, int64_t k_in,
               int64_t n_out, float* out, int threads = 0);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_CPU_GEMM_CPU_H_
