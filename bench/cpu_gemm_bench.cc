// The CPU backend's linear layers: LinearCpu (oneDNN sgemm on our threads) against the loop
// reference LinearRef, at the embedded model's shapes (hidden 256, MLP 768, vocab 4096; a
// 512-token prefill chunk, the daemon's default, and a 1-token decode step) and Llama-3.1-8B's
// (hidden 4096, MLP 14336), random data; GFLOP/s counts 2 * rows * k * n. Both run on the same
// number of threads (--threads, default all hardware threads).
//   cpu_gemm_bench [--threads N] [Google Benchmark flags]
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/cpu/gemm_cpu.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel_for.h"

namespace sieve::kernels {
namespace {

int g_threads = 0;

struct Shape {
  const char* name;
  int64_t rows, k, n;
};

using LinearFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t,
                          float*, int);

void Run(benchmark::State& state, const Shape& s, LinearFn fn) {
  std::mt19937 rng(42);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(s.rows * s.k), w(s.n * s.k), out(s.rows * s.n);
  for (float& v : x) v = u(rng);
  for (float& v : w) v = u(rng);
  for (auto _ : state) {
    fn(x.data(), w.data(), nullptr, s.rows, s.k, s.n, out.data(), g_threads);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * s.rows * s.k * s.n / 1e9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

const Shape kShapes[] = {
    {"embedded/qkv_m512", 512, 256, 512},
    {"embedded/o_m512", 512, 256, 256},
    {"embedded/gate_up_m512", 512, 256, 1536},
    {"embedded/down_m512", 512, 768, 256},
    {"embedded/qkv_m2048", 2048, 256, 512},
    {"embedded/gate_up_m2048", 2048, 256, 1536},
    {"embedded/lm_head_m64", 64, 256, 4096},
    {"embedded/gate_up_m1", 1, 256, 1536},
    {"embedded/down_m1", 1, 768, 256},
    {"embedded/lm_head_m1", 1, 256, 4096},
    {"llama8b/qkv_m512", 512, 4096, 6144},
    {"llama8b/down_m512", 512, 14336, 4096},
    {"llama8b/qkv_m1", 1, 4096, 6144},
};

}  // namespace
}  // namespace sieve::kernels

int main(int argc, char** argv) {
  using namespace sieve::kernels;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      g_threads = std::atoi(argv[++i]);
    } else {
      args.push_back(argv[i]);
    }
  }
  if (g_threads <= 0) g_threads = DefaultCpuThreads();
  for (const Shape& s : kShapes) {
    const bool big = s.rows * s.k * s.n > (int64_t{1} << 30);
    benchmark::RegisterBenchmark((std::string("onednn/") + s.name).c_str(),
                                 [s](benchmark::State& st) { Run(st, s, LinearCpu); })
        ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.5);
    auto* ref = benchmark::RegisterBenchmark((std::string("ref/") + s.name).c_str(),
                                             [s](benchmark::State& st) { Run(st, s, LinearRef); });
    ref->Unit(benchmark::kMillisecond)->UseRealTime();
    if (big) ref->Iterations(1); else ref->MinTime(0.5);
  }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  benchmark::AddCustomContext("threads", std::to_string(g_threads));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
