// The fp32 CPU operators of a Llama-family forward pass. They are the CPU backend's compute and
// the references the CUDA operators are checked against. Row-major throughout; `rows` is tokens.
#ifndef SIEVE_KERNELS_CPU_OPS_H_
#define SIEVE_KERNELS_CPU_OPS_H_

#include <cstdint>

namespace sieve::kernels {

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight, for r < rows; x, out: [rows, dim].
// out may alias x.
void RmsNormRef(const float* x, const float* weight, int64_t rows, int64_t dim, float eps,
                float* out);

// residual += x, then out = RmsNorm(residual): the fused add + norm between sublayers.
void AddRmsNormRef(const float* x, float* residual, const float* weight, int64_t rows,
                   int64_t dim, float eps, float* out);

// out[r, n] = sum_k x[r, k] * w[n, k] (+ bias[n]): a linear layer with PyTorch's weight layout
// w: [n_out, k_in]. bias may be null. Parallel over output columns on `threads` host threads
// (0 = all hardware threads).
void LinearRef(const float* x, const float* w, const float* bias, int64_t rows, int64_t k_in,
               int64_t n_out, float* out, int threads = 0);

// Rotary position embedding, the "rotate half" form of Hugging Face Llama: for each head, the
// pair (i, i + rot/2) is rotated by angle positions[r] * inv_freq[i], with cos and sin scaled by
// `attention_scaling` (YaRN; 1 otherwise). x: [rows, heads, head_dim], in place; the first
// rot = 2 * half_rot dims rotate (rot = head_dim for Llama). inv_freq: [half_rot].
void RopeRef(float* x, const int32_t* positions, int64_t rows, int64_t heads, int64_t head_dim,
             const float* inv_freq, int64_t half_rot, float attention_scaling);

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i], gate_up: [rows, 2 * inter].
void SiluMulRef(const float* gate_up, int64_t rows, int64_t inter, float* out);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_CPU_OPS_H_
