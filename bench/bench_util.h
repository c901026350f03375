// What the CPU attention benchmarks share: wall and process-CPU clocks, medians of repeated
// runs, the `--flag 1,2,3` list parser, and the attention layer shapes they measure (Llama-3.1-8B,
// the embedded model).
#ifndef SIEVE_BENCH_BENCH_UTIL_H_
#define SIEVE_BENCH_BENCH_UTIL_H_

#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <vector>

namespace sieve::bench {

// One attention layer's heads: Llama-3.1-8B has 32 query heads over 8 KV heads of 128 channels.
struct LayerShape {
  int q_heads, kv_heads, head_dim;
};
inline constexpr LayerShape kLlama31_8B{32, 8, 128};
// The embedded test model (models/embedded/config.json): 4 query heads over 2 KV heads of 64.
inline constexpr LayerShape kEmbedded{4, 2, 64};
// Tokens per KV page in the benchmarks (the daemon's default kv_cache.page_size_tokens).
inline constexpr int kPageSize = 16;

// Wall-clock seconds (steady clock).
inline double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// CPU seconds of every thread of the process: on a machine shared with other tenants the wall
// time moves with their load, a memory-bound kernel's CPU time far less.
inline double CpuNow() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// The median (the upper one of an even count).
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median wall seconds of `reps` runs of fn, after one warm-up run.
template <typename Fn>
double MedianSeconds(int reps, Fn&& fn) {
  fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double a = Now();
    fn();
    t.push_back(Now() - a);
  }
  return Median(t);
}

// "1,2,3" -> {1, 2, 3} (atoi of each comma-separated item).
inline std::vector<int> ParseIntList(const char* s) {
  std::vector<int> out;
  for (const char* c = s; *c;) {
    out.push_back(std::atoi(c));
    while (*c && *c != ',') ++c;
    if (*c == ',') ++c;
  }
  return out;
}

}  // namespace sieve::bench

#endif  // SIEVE_BENCH_BENCH_UTIL_H_
