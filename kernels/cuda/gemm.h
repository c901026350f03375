// The linear layers' matrix product on the GPU through cuBLASLt: bf16 operands, fp32
// accumulation and scaling, bf16 output with an optional bias fused into the epilogue, or fp32
// output (the logits, which then skip the rounding to bf16).
//
//   y[m, n] = x[m, k] * w[n, k]^T (+ bias[n])
//
// with every matrix row-major and dense (rows `cols` elements apart), w in PyTorch's
// [out_features, in_features] layout. In cuBLAS's column-major terms this is
// y^T (n x m) = op_T(w as k x n) * (x^T as k x m), so no operand is copied or transposed.
//
// cuBLASLt's heuristic picks an algorithm once per (m, n, k, output type, bias, pointer
// alignment, workspace size); the choice and its descriptors are cached, so a repeated shape costs only the launch.
// Run never allocates and never synchronizes: the caller passes the workspace.
#ifndef SIEVE_KERNELS_CUDA_GEMM_H_
#define SIEVE_KERNELS_CUDA_GEMM_H_

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace sieve::kernels {

// One call's operands. Pointers are device pointers.
struct GemmArgs {
  const __nv_bfloat16* x = nullptr;     // [m, k]
  const __nv_bfloat16* w = nullptr;     // [n, k]
  const __nv_bfloat16* bias = nullptr;  // [n] or null; only with a bf16 output
  // The output, [m, n]: exactly one of the two is set. It must not overlap x, w or bias.
  __nv_bfloat16* y = nullptr;           // bf16 output (rounded once from the fp32 sum)
  float* y_f32 = nullptr;               // fp32 output (the fp32 sum itself)
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
};

// A cuBLASLt handle and its per-shape cache. Not thread-safe: give each stream (worker thread)
// its own. Move-only.
class BlasLtGemm {
 public:
  BlasLtGemm();
  ~BlasLtGemm();
  BlasLtGemm(BlasLtGemm&&) noexcept;
  BlasLtGemm& operator=(BlasLtGemm&&) noexcept;

  // Creates the cuBLASLt handle on the current device. Call once before Run.
  cublasStatus_t Init();

  // Enqueues y = x w^T (+ bias) on `stream`, using `workspace` (workspace_bytes, 256-byte aligned
  // or null with 0 bytes) as cuBLASLt's scratch. Returns CUBLAS_STATUS_INVALID_VALUE for bad
  // shapes, null pointers, both or neither output set, or a bias with the fp32 output, CUBLAS_STATUS_NOT_INITIALIZED before Init, CUBLAS_STATUS_NOT_SUPPORTED
  // if the heuristic finds no algorithm, else cuBLASLt's status. m == 0 launches nothing.
  cublasStatus_t Run(const GemmArgs& args, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream);

  // Shapes whose algorithm has been chosen so far (for tests).
  size_t cached_shapes() const;

 private:
  struct Cache;
  cublasLtHandle_t handle_ = nullptr;
  std::unique_ptr<Cache> cache_;
};

// A short name for a cuBLAS status ("CUBLAS_STATUS_NOT_SUPPORTED").
const char* CublasStatusName(cublasStatus_t status);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_CUDA_GEMM_H_
