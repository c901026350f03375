#include "kernels/cpu/ops.h"

#include <cmath>

#include "kernels/cpu/parallel_for.h"

namespace sieve::kernels {
namespace {

// A dot product with eight independent partial sums, so that the compiler can keep them in
// vector registers without reassociating floating-point adds.
float Dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int j = 0; j < 8; ++j) part[j] += a[k + j] * b[k + j];
  }
  float s = 0.0f;
  for (; k < n; ++k) s += a[k] * b[k];
  for (int j = 0; j < 8; ++j) s += part[j];
  return s;
}

}  // namespace

void RmsNormRef(const float* x, const float* weight, int64_t rows, int64_t dim, float eps,
                float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = out + r * dim;
    // Hugging Face computes the mean square in fp32; accumulate in double for a tighter reference.
    double sum_sq = 0.0;
    for (int64_t i = 0; i < dim; ++i) sum_sq += static_cast<double>(xr[i]) * xr[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(sum_sq / dim) + eps);
    for (int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * inv);
  }
}

void AddRmsNormRef(const float* x, float* residual, const float* weight, int64_t rows,
                   int64_t dim, float eps, float* out) {
  for (int64_t i = 0; i < rows * dim; ++i) residual[i] += x[i];
  RmsNormRef(residual, weight, rows, dim, eps, out);
}

void LinearRef(const float* x, const float* w, const float* bias, int64_t rows, int64_t k_in,
               int64_t n_out, float* out, int threads) {
  // Each thread owns a block of output columns and streams its weight rows once per block of
  // 4 tokens, so that weights (the large operand in decoding) are read rows/4 times, not rows.
  ParallelFor(n_out, threads, 16, [&](int64_t n_begin, int64_t n_end) {
    constexpr int64_t kTok = 4;
    for (int64_t r0 = 0; r0 < rows; r0 += kTok) {
      const int64_t rn = std::min(kTok, rows - r0);
      for (int64_t n = n_begin; n < n_end; ++n) {
        const float* wn = w + n * k_in;
        float acc[kTok] = {0, 0, 0, 0};
        for (int64_t t = 0; t < rn; ++t) {
          const float* xr = x + (r0 + t) * k_in;
          acc[t] = Dot(xr, wn, k_in);
        }
        const float b = bias != nullptr ? bias[n] : 0.0f;
        for (int64_t t = 0; t < rn; ++t) out[(r0 + t) * n_out + n] = acc[t] + b;
      }
    }
  });
}

void RopeRef(float* x, const int32_t* positions, int64_t rows, int64_t heads, int64_t head_dim,
             const float* inv_freq, int64_t half_rot, float attention_scaling) {
  for (int64_t r = 0; r < rows; ++r) {
    const float pos = static_cast<float>(positions[r]);
    for (int64_t i = 0; i < half_rot; ++i) {
      // The angle is one fp32 product, as Hugging Face computes it, so that long positions
      // round the same way.
      const float angle = pos * inv_freq[i];
      const float c = std::cos(angle) * attention_scaling;
      const float s = std::sin(angle) * attention_scaling;
      for (int64_t h = 0; h < heads; ++h) {
        float* xh = x + (r * heads + h) * head_dim;
        const float a = xh[i], b = xh[i + half_rot];
        xh[i] = a * c - b * s;
        xh[i + half_rot] = b * c + a * s;
      }
    }
  }
}

void SiluMulRef(const float* gate_up, int64_t rows, int64_t inter, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * inter;
    const float* u = g + inter;
    float* o = out + r * inter;
    for (int64_t i = 0; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

}  // namespace sieve::kernels
