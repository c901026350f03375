// The bf16 GPU operators of a Llama-family forward pass, other than the GEMMs (gemm.h) and
// attention (kernels/attention/): embedding and row gathers, RMSNorm with and without the fused
// residual add, RoPE fused with the KV page write, SiLU-and-multiply, and bf16 -> fp32 copies.
//
// Conventions: row-major matrices of __nv_bfloat16, fp32 arithmetic inside each kernel and one
// rounding to bf16 per output (the CPU references in kernels/cpu/ops.h are the same formulas in
// fp32). Every launcher enqueues on `stream`, never allocates and never synchronizes (so calls
// can be captured in a CUDA graph), and returns cudaErrorInvalidValue without launching on bad
// arguments, else the launch error. Pointers are device pointers unless stated.
#ifndef SIEVE_KERNELS_CUDA_OPS_H_
#define SIEVE_KERNELS_CUDA_OPS_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sieve::kernels {

// out[i, :] = x[rows[i], :] for i < n; x: [x_rows, cols], out: [n, cols], rows: [n] int32.
// A row id outside [0, x_rows) yields a zero row (callers validate ids on the host; this only
// keeps a bad id from reading out of bounds). Serves the embedding lookup and logit-row gathers.
cudaError_t GatherRowsBf16(const __nv_bfloat16* x, int64_t x_rows, int64_t cols,
                           const int32_t* rows, int64_t n, __nv_bfloat16* out,
                           cudaStream_t stream);

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight for r < rows; x, out: [rows, dim],
// weight: [dim]. The mean square is accumulated in fp32. out may alias x.
cudaError_t RmsNormBf16(const __nv_bfloat16* x, const __nv_bfloat16* weight, int64_t rows,
                        int64_t dim, float eps, __nv_bfloat16* out, cudaStream_t stream);

// residual = bf16(residual + x), then out = RmsNorm(residual) * weight (the norm reads the
// rounded residual, as a bf16 model does). x, residual, out: [rows, dim].
cudaError_t AddRmsNormBf16(const __nv_bfloat16* x, __nv_bfloat16* residual,
                           const __nv_bfloat16* weight, int64_t rows, int64_t dim, float eps,
                           __nv_bfloat16* out, cudaStream_t stream);

// Most rotary pairs (rotary_dim / 2) RopeQkvParams carries by value.
inline constexpr int kMaxRopePairs = 256;

// Arguments of RopeQkvAndCacheKvBf16. The fused projection row t of qkv holds q (num_q_heads
// heads), then k and v (num_kv_heads heads each), head_dim elements per head.
struct RopeQkvParams {
  const __nv_bfloat16* qkv = nullptr;  // [num_tokens, qkv_stride]; columns as above
  int64_t qkv_stride = 0;              // elements between rows of qkv (>= (Hq + 2 Hkv) * D)
  __nv_bfloat16* q_out = nullptr;      // [num_tokens, num_q_heads * head_dim], rotated queries
  __nv_bfloat16* k_cache = nullptr;    // [num_slots, num_kv_heads, head_dim], one layer's keys
  __nv_bfloat16* v_cache = nullptr;    // [num_slots, num_kv_heads, head_dim], one layer's values
  const int32_t* positions = nullptr;  // [num_tokens] position of each token
  const int64_t* slots = nullptr;      // [num_tokens] KV slot (page * page_size + offset)
  int64_t num_slots = 0;               // slots in the cache (pages * page_size); bound check
  int32_t num_tokens = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t half_rot = 0;                // rotary pairs per head (rotary_dim / 2 <= head_dim / 2)
  float attention_scaling = 1.0f;      // cos and sin are multiplied by this (YaRN; else 1)
  float inv_freq[kMaxRopePairs] = {};  // radians per token of pair i < half_rot
};

// Applies rotary embedding (Hugging Face "rotate half": pair (i, i + half_rot) of each head
// turns by angle = float(position) * inv_freq[i], computed in fp32, with cos and sin scaled by
// attention_scaling) to the q and k parts of qkv; writes the rotated q to q_out, and the rotated
// k and the unchanged v to the cache at each token's slot. Dims >= 2 * half_rot pass through. A
// slot outside [0, num_slots) is skipped (callers validate slots on the host).
cudaError_t RopeQkvAndCacheKvBf16(const RopeQkvParams& p, cudaStream_t stream);

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]; gate_up: [rows, 2 * inter],
// out: [rows, inter].
cudaError_t SiluMulBf16(const __nv_bfloat16* gate_up, int64_t rows, int64_t inter,
                        __nv_bfloat16* out, cudaStream_t stream);

// out[i] = float(x[i]) for i < n (exact).
cudaError_t Bf16ToFloat(const __nv_bfloat16* x, int64_t n, float* out, cudaStream_t stream);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_CUDA_OPS_H_
