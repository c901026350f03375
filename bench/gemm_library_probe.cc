// Which BLAS for the CPU backend's linear layers: one probe program, built once per library
// (not part of the CMake build: each build links a different library's cblas_sgemm). It times
// y[M, N] = x[M, K] * W[N, K]^T at the embedded model's shapes on 2 threads that split N (what
// kernels/cpu/gemm_cpu.cc does), checks 50 random elements against fp64, and prints GFLOP/s.
// Results and the choice: bench/results/2026-12-05-cpu-gemm.md.
//
//   g++ -O2 -std=c++17 -DLIB_REF -I. bench/gemm_library_probe.cc kernels/cpu/ops.cc -o p_ref
//   g++ -O2 -std=c++17 -I. -I/usr/include/x86_64-linux-gnu/openblas-serial bench/gemm_library_probe.cc \
//       -o p_obs /usr/lib/x86_64-linux-gnu/openblas-serial/libopenblas.so.0     # libopenblas-serial-dev
//   g++ -O2 -std=c++17 -I. -I/usr/include/x86_64-linux-gnu/blis-serial bench/gemm_library_probe.cc \
//       -o p_blis /usr/lib/x86_64-linux-gnu/blis-serial/libblis.so.4            # libblis-serial-dev
//   g++ -O2 -std=c++17 -I. -DLIB_DNNL bench/gemm_library_probe.cc -o p_dnnl -ldnnl -lgomp  # libdnnl-dev
//   ./p_ref; OPENBLAS_CORETYPE=SkylakeX ./p_obs; BLIS_ARCH_TYPE=0 ./p_blis; ./p_dnnl
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <thread>
#include <vector>
#include <algorithm>
#include "kernels/cpu/ops.h"
#if defined(LIB_DNNL)
#include <oneapi/dnnl/dnnl.h>
extern "C" void omp_set_num_threads(int);
#elif defined(LIB_REF)
#else
#include <cblas.h>
#endif
using Clock = std::chrono::steady_clock;
static void Gemm(int m, int n, int k, const float* x, const float* w, float* y, int ldy) {
#if defined(LIB_DNNL)
  omp_set_num_threads(1);
  dnnl_sgemm('N', 'T', m, n, k, 1.0f, x, k, w, k, 0.0f, y, ldy);
#elif defined(LIB_REF)
#else
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, k, w, k, 0.0f, y, ldy);
#endif
}
int main(int argc, char** argv) {
  struct S { int m, k, n; } shapes[] = {{2048,256,512},{2048,256,256},{2048,256,1536},{2048,768,256},{64,256,4096},{1,256,1536},{1,768,256},{1,256,4096}};
  double tot = 0;
  for (auto s : shapes) {
    std::vector<float> x((size_t)s.m*s.k), w((size_t)s.n*s.k), y((size_t)s.m*s.n);
    for (auto& v : x) v = (rand() % 1000) / 1000.0f - 0.5f;
    for (auto& v : w) v = (rand() % 1000) / 1000.0f - 0.5f;
    std::vector<double> ts;
    for (int rep = 0; rep < (s.m <= 64 ? 300 : 9); ++rep) {
      auto t0 = Clock::now();
#if defined(LIB_REF)
      sieve::kernels::LinearRef(x.data(), w.data(), nullptr, s.m, s.k, s.n, y.data(), 2);
#else
      int half = (s.n / 2 + 63) / 64 * 64;
      std::thread t([&] { Gemm(s.m, s.n - half, s.k, x.data(), w.data() + (size_t)half * s.k, y.data() + half, s.n); });
      Gemm(s.m, half, s.k, x.data(), w.data(), y.data(), s.n);
      t.join();
#endif
      ts.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    double err = 0;
    for (int i = 0; i < 50; ++i) {
      int r = rand() % s.m, c = rand() % s.n; double acc = 0;
      for (int kk = 0; kk < s.k; ++kk) acc += (double)x[(size_t)r*s.k+kk] * w[(size_t)c*s.k+kk];
      err = std::max(err, std::fabs(acc - y[(size_t)r*s.n+c]));
    }
    std::sort(ts.begin(), ts.end());
    double med = ts[ts.size() / 2];
    tot += med;
    printf("M%5d K%4d N%5d: %8.3f ms %6.1f GFLOP/s err %.1e\n", s.m, s.k, s.n, med * 1e3, 2.0 * s.m * s.k * s.n / med * 1e-9, err);
  }
}
