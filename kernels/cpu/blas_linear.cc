#include "kernels/cpu/blas_linear.h"

#include <cblas.h>

namespace sieve::kernels {

void LinearBlas(const float* x, const float* w, const float* bias, int64_t rows, int64_t k_in,
                int64_t n_out, float* out, int threads) {
  if (rows <= 0 || n_out <= 0) return;
  if (threads > 0 && openblas_get_num_threads() != threads) openblas_set_num_threads(threads);
  float beta = 0.0f;
  if (bias != nullptr) {  // out = bias broadcast over rows, then out += x * w^T
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t n = 0; n < n_out; ++n) out[r * n_out + n] = bias[n];
    }
    beta = 1.0f;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(rows),
              static_cast<blasint>(n_out), static_cast<blasint>(k_in), 1.0f, x,
              static_cast<blasint>(k_in), w, static_cast<blasint>(k_in), beta, out,
              static_cast<blasint>(n_out));
}

}  // namespace sieve::kernels
