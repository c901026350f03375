// A minimal static-partition parallel loop over host threads, for the CPU kernels.
#ifndef SIEVE_KERNELS_CPU_PARALLEL_FOR_H_
#define SIEVE_KERNELS_CPU_PARALLEL_FOR_H_

#include <algorithm>
#include <cstdint>
#include <functional>
#include <thread>

namespace sieve::kernels {

// Number of host threads the CPU kernels use when asked for "all" (0).
inline int DefaultCpuThreads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

namespace parallel_for_internal {
// Calls fn(i) once for every i in [0, ranges), on the calling thread and on up to ranges - 1
// threads of a process-wide pool that lives until the process exits (threads are started once,
// not per call: a decode step makes dozens of calls). Returns when every call has returned. The
// caller takes ranges too, so a call always completes, also from inside a pool thread (nested
// calls), from many threads at once, and in a forked child whose pool threads did not survive.
void RunRanges(int ranges, const std::function<void(int)>& fn);
// How long idle pool threads and waiting callers spin before sleeping (microseconds; 0: never
// spin). The default is 100, or SIEVE_CPU_SPIN_US. For tests of both paths.
void SetSpinMicrosForTesting(int64_t us);
}  // namespace parallel_for_internal

// Calls fn(begin, end) on disjoint contiguous ranges covering [0, n), on up to `threads` threads
// (0 = DefaultCpuThreads()). Runs inline when one thread suffices or n is small. The ranges
// depend only on n, threads and min_per_thread; which thread runs a range does not matter (a
// range may run after another on the same thread), so fn must not wait for another range.
template <typename Fn>
void ParallelFor(int64_t n, int threads, int64_t min_per_thread, Fn&& fn) {
  if (threads <= 0) threads = DefaultCpuThreads();
  int64_t max_useful = std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread));
  int t = static_cast<int>(std::min<int64_t>(threads, max_useful));
  if (t <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t chunk = (n + t - 1) / t;
  const int ranges = static_cast<int>((n + chunk - 1) / chunk);
  parallel_for_internal::RunRanges(ranges, [&fn, chunk, n](int i) {
    const int64_t b = i * chunk;
    fn(b, std::min(n, b + chunk));
  });
}

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_CPU_PARALLEL_FOR_H_
