// A minimal static-partition parallel loop over host threads, for the CPU kernels.
#ifndef SIEVE_KERNELS_CPU_PARALLEL_FOR_H_
#define SIEVE_KERNELS_CPU_PARALLEL_FOR_H_

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace sieve::kernels {

// Number of host threads the CPU kernels use when asked for "all" (0).
inline int DefaultCpuThreads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

// Calls fn(begin, end) on disjoint contiguous ranges covering [0, n), on up to `threads` threads
// (0 = DefaultCpuThreads()). Runs inline when one thread suffices or n is small.
template <typename Fn>
void ParallelFor(int64_t n, int threads, int64_t min_per_thread, Fn&& fn) {
  if (threads <= 0) threads = DefaultCpuThreads();
  int64_t max_useful = std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread));
  int t = static_cast<int>(std::min<int64_t>(threads, max_useful));
  if (t <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  int64_t chunk = (n + t - 1) / t;
  for (int i = 1; i < t; ++i) {
    int64_t b = i * chunk, e = std::min(n, b + chunk);
    if (b >= e) break;
    pool.emplace_back([&fn, b, e] { fn(b, e); });
  }
  fn(int64_t{0}, std::min(n, chunk));
  for (auto& th : pool) th.join();
}

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_CPU_PARALLEL_FOR_H_
