// The linear layers' product for decode batches of a few rows, where it is a matrix-vector
// product bound by reading the weights once:
//
//   y[m, n] = bf16(sum_k x[m, k] * w[n, k] + bias[n]),   m <= kGemvMaxRows
//
// (the same contract as BlasLtGemm with a bf16 output, gemm.h; CPU reference: LinearRef in
// kernels/cpu/ops.h). One warp per output column n
// streams row n of w with 16-byte loads, four in flight per lane, against all m rows of x (which
// stay in L1), and reduces in fp32 with shuffles. Unlike cuBLASLt's small-m kernels it needs no
// split-K reduction launch, and it keeps every SM streaming for the narrow layers (qkv, o_proj)
// that cuBLASLt's first heuristic runs at 64-75% of the copy rate. Measured on the H200
// (bench/gemv_bench.cu, bench/results/2026-12-04-gemv-h200.md): one row, qkv 81% and o_proj 73%
// of the copy rate (1.09x and 1.15x cuBLASLt), gate_up and down level with it; from two rows
// on every x element is re-read and converted per weight load and cuBLASLt is faster, so the
// CUDA backend uses this kernel for one row only. The kernel takes up to kGemvMaxRows so that
// the comparison stays measurable.
#ifndef SIEVE_KERNELS_CUDA_GEMV_H_
#define SIEVE_KERNELS_CUDA_GEMV_H_

#include <cuda_runtime.h>

#include "kernels/cuda/gemm.h"

namespace sieve::kernels {

// The most rows of x GemvBf16 takes.
inline constexpr int64_t kGemvMaxRows = 4;

// True when GemvBf16 can run `args`: 1 <= m <= kGemvMaxRows, a bf16 output (no y_f32), k a
// multiple of 8, and x, w, y (and bias, if any) 16-byte aligned.
bool GemvSupported(const GemmArgs& args);

// Enqueues y = x w^T (+ bias) on `stream`. cudaErrorInvalidValue without launching when
// !GemvSupported(args); else the launch error. Never allocates or synchronizes.
cudaError_t GemvBf16(const GemmArgs& args, cudaStream_t stream);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_CUDA_GEMV_H_
