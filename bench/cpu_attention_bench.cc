// The CPU attention kernel (PagedAttentionCpu) against the fp64 reference (PagedAttentionRef)
// at the embedded model's shape (4 query / 2 KV heads, head_dim 64) and one Llama-like shape
// (32 / 8 heads, head_dim 128), prefill and decode, page size 16, random data; GFLOP/s counts
// 4 * head_dim flops per (query, head, causal key) (QK^T and PV). Both kernels run on the same
// number of threads (--threads, default all hardware threads).
//   cpu_attention_bench [--threads N] [Google Benchmark flags]
//
// 16-bit KV caches (--kv bf16 or --kv f16): decode of one Llama-3.1-8B layer (batch 1, 32 query
// / 8 KV heads, head_dim 128) at --contexts keys (default 16384,65536,131072) with an fp32 and a
// 16-bit cache holding the same values (K and V rounded to the 16-bit type, the fp32 cache their
// exact widening, so both compute the same thing), interleaved: after a warm-up call of each,
// every one of --reps rounds (default 30) times one call of each, alternating which goes first;
// prints the medians of wall and process-CPU time, the KV bytes read per second and the ratio.
//   cpu_attention_bench --kv bf16 [--threads 2] [--reps 30] [--contexts 16384,65536]
//
// One long dense prefill (--prefill N: a single sequence of N tokens, the Llama-3.1-8B layer, random
// data, fp32 or --kv bf16 KV): --reps runs (default 3) after a warm-up, each printed with its wall
// and process-CPU time and GFLOP/s, then the median. The quick check of the tile path between
// runs of bench/run_cpu_gates.sh (whose section 1 is the gate, with sgemm in the same run).
//   cpu_attention_bench --prefill 16384 [--threads 2] [--reps 3] [--kv bf16]
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "bench/bench_util.h"
#include "benchmark/benchmark.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/cpu/half.h"
#include "kernels/cpu/parallel_for.h"

namespace sieve::kernels {
namespace {

int g_threads = 0;

struct Shape {
  const char* name;
  int seqs, q_len, kv_len, q_heads, kv_heads, head_dim;
};

constexpr int kPageSize = 16;

// Every sequence has the same (kv_len, q_len); pages in a shuffled order.
struct Problem {
  PagedAttentionParams<float> p;
  std::vector<float> q, k, v, out;
  std::vector<int32_t> page_table, kv_lens, query_start;
  double flops = 0;

  explicit Problem(const Shape& s) {
    std::mt19937 rng(42);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const int stride = (s.kv_len + kPageSize - 1) / kPageSize;
    const int pages = stride * s.seqs;
    page_table.resize(pages);
    for (int i = 0; i < pages; ++i) page_table[i] = i;
    std::shuffle(page_table.begin(), page_table.end(), rng);
    kv_lens.assign(s.seqs, s.kv_len);
    for (int i = 0; i <= s.seqs; ++i) query_start.push_back(i * s.q_len);
    k.resize(static_cast<size_t>(pages) * kPageSize * s.kv_heads * s.head_dim);
    v.resize(k.size());
    q.resize(static_cast<size_t>(s.seqs) * s.q_len * s.q_heads * s.head_dim);
    out.resize(q.size());
    for (auto* vec : {&q, &k, &v}) {
      for (float& x : *vec) x = u(rng);
    }
    p.q = q.data();
    p.k_cache = k.data();
    p.v_cache = v.data();
    p.out = out.data();
    p.page_table = page_table.data();
    p.kv_lens = kv_lens.data();
    p.query_start = query_start.data();
    p.page_table_stride = stride;
    p.num_seqs = s.seqs;
    p.num_q_heads = s.q_heads;
    p.num_kv_heads = s.kv_heads;
    p.head_dim = s.head_dim;
    p.page_size = kPageSize;
    p.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    double pairs = 0;  // (query, causal key) pairs of one sequence
    for (int j = 0; j < s.q_len; ++j) pairs += s.kv_len - s.q_len + j + 1;
    flops = 4.0 * s.head_dim * s.q_heads * pairs * s.seqs;
  }
};

template <void (*Kernel)(const PagedAttentionParams<float>&, int)>
void Run(benchmark::State& state, const Shape& shape) {
  Problem prob(shape);
  for (auto _ : state) {
    Kernel(prob.p, g_threads);
    benchmark::DoNotOptimize(prob.out.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(prob.flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// The --kv comparison (see the file comment): one 8B-shaped decode problem per context length.
int RunKvCompare(KvDtype t, int threads, int reps, const std::vector<int>& contexts) {
  const bench::LayerShape ls = bench::kLlama31_8B;
  std::printf("decode, Llama-3.1-8B layer (%d/%d heads, d %d), batch 1, page %d, %d threads, "
              "fp32 vs %s KV, %d interleaved rounds, target %s\n",
              ls.q_heads, ls.kv_heads, ls.head_dim, kPageSize, threads, KvDtypeName(t), reps,
              PagedAttentionCpuTarget());
  std::printf("%8s %10s %10s %10s %10s %9s %9s %8s %8s\n", "context", "fp32 ms", "16b ms",
              "fp32 cpu", "16b cpu", "fp32 GB/s", "16b GB/s", "ratio", "cpu ratio");
  for (const int ctx : contexts) {
    Problem prob({"kv", 1, 1, ctx, ls.q_heads, ls.kv_heads, ls.head_dim});
    const std::vector<uint16_t> k16 = RoundToKv16(prob.k, t), v16 = RoundToKv16(prob.v, t);
    const PagedKvCache c32{prob.k.data(), prob.v.data(), KvDtype::kFloat32};
    const PagedKvCache c16{k16.data(), v16.data(), t};
    std::vector<double> w32, w16, u32, u16;
    auto time = [&](const PagedKvCache& c, std::vector<double>& wall, std::vector<double>& cpu) {
      const double a = bench::Now(), b = bench::CpuNow();
      PagedAttentionCpu(prob.p, c, threads);
      wall.push_back(bench::Now() - a);
      cpu.push_back(bench::CpuNow() - b);
    };
    time(c32, w32, u32);  // warm-up: page faults, thread pool, caches
    time(c16, w16, u16);
    w32.clear(), w16.clear(), u32.clear(), u16.clear();
    for (int r = 0; r < reps; ++r) {
      if (r % 2 == 0) {
        time(c32, w32, u32);
        time(c16, w16, u16);
      } else {
        time(c16, w16, u16);
        time(c32, w32, u32);
      }
    }
    const double m32 = bench::Median(w32), m16 = bench::Median(w16);
    const double bytes32 = 2.0 * ctx * ls.kv_heads * ls.head_dim * sizeof(float);
    std::printf("%8d %10.3f %10.3f %10.3f %10.3f %9.2f %9.2f %7.2fx %7.2fx\n", ctx, m32 * 1e3,
                m16 * 1e3, bench::Median(u32) * 1e3, bench::Median(u16) * 1e3,
                bytes32 / m32 / 1e9, bytes32 / 2 / m16 / 1e9, m32 / m16,
                bench::Median(u32) / bench::Median(u16));
    std::fflush(stdout);
  }
  return 0;
}

// The --prefill run (see the file comment).
int RunPrefill(int tokens, const char* kv, int threads, int reps) {
  const bench::LayerShape ls = bench::kLlama31_8B;
  Problem prob({"prefill", 1, tokens, tokens, ls.q_heads, ls.kv_heads, ls.head_dim});
  std::vector<uint16_t> k16, v16;
  PagedKvCache c{prob.k.data(), prob.v.data(), KvDtype::kFloat32};
  if (kv != nullptr) {
    k16.resize(prob.k.size());
    v16.resize(prob.v.size());
    for (size_t i = 0; i < k16.size(); ++i) {
      k16[i] = FloatToBf16(prob.k[i]);
      v16[i] = FloatToBf16(prob.v[i]);
    }
    c = {k16.data(), v16.data(), KvDtype::kBfloat16};
  }
  std::printf("dense prefill, Llama-3.1-8B layer (%d/%d heads, d %d), %d tokens, page %d, %s KV, "
              "%d threads, target %s\n",
              ls.q_heads, ls.kv_heads, ls.head_dim, tokens, kPageSize,
              kv != nullptr ? "bf16" : "fp32", threads, PagedAttentionCpuTarget());
  std::vector<double> wall;
  for (int r = 0; r <= reps; ++r) {  // r == 0: warm-up
    const double a = bench::Now(), b = bench::CpuNow();
    PagedAttentionCpu(prob.p, c, threads);
    const double w = bench::Now() - a, u = bench::CpuNow() - b;
    if (r == 0) continue;
    wall.push_back(w);
    std::printf("  run %d: %.3f s wall, %.3f s CPU, %.1f GFLOP/s\n", r, w, u, prob.flops / w * 1e-9);
  }
  std::printf("median %.1f GFLOP/s\n", prob.flops / bench::Median(wall) * 1e-9);
  return 0;
}

const Shape kShapes[] = {
    {"embedded/prefill_q2048_kv2048", 1, 2048, 2048, 4, 2, 64},
    {"embedded/chunk_q512_kv8192", 1, 512, 8192, 4, 2, 64},
    {"embedded/decode_b8_kv8192", 8, 1, 8192, 4, 2, 64},
    {"llama/prefill_q512_kv512", 1, 512, 512, 32, 8, 128},
    {"llama/decode_b4_kv2048", 4, 1, 2048, 32, 8, 128},
    {"llama/prefill_q2048_kv2048", 1, 2048, 2048, 32, 8, 128},
    {"llama/chunk_q512_kv16384", 1, 512, 16384, 32, 8, 128},
};

}  // namespace
}  // namespace sieve::kernels

int main(int argc, char** argv) {
  using namespace sieve::kernels;
  std::vector<char*> args;
  const char* kv = nullptr;
  int reps = 30, prefill = 0;
  bool reps_set = false;
  std::vector<int> contexts = {16384, 65536, 131072};
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      g_threads = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--prefill") == 0 && i + 1 < argc) {
      prefill = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--kv") == 0 && i + 1 < argc) {
      kv = argv[++i];
    } else if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
      reps_set = true;
    } else if (std::strcmp(argv[i], "--contexts") == 0 && i + 1 < argc) {
      contexts = sieve::bench::ParseIntList(argv[++i]);
    } else {
      args.push_back(argv[i]);
    }
  }
  if (g_threads <= 0) g_threads = DefaultCpuThreads();
  if (prefill > 0) {
    if (kv != nullptr && std::strcmp(kv, "bf16") != 0) {
      std::fprintf(stderr, "--prefill --kv: expected bf16, got '%s'\n", kv);
      return 2;
    }
    return RunPrefill(prefill, kv, g_threads, reps_set ? reps : 3);
  }
  if (kv != nullptr) {
    if (std::strcmp(kv, "bf16") == 0 || std::strcmp(kv, "f16") == 0) {
      const KvDtype t = kv[0] == 'b' ? KvDtype::kBfloat16 : KvDtype::kFloat16;
      return RunKvCompare(t, g_threads, reps, contexts);
    }
    std::fprintf(stderr, "--kv: expected bf16 or f16, got '%s'\n", kv);
    return 2;
  }
  for (const Shape& s : kShapes) {
    const bool decode = s.q_len == 1;
    benchmark::RegisterBenchmark((std::string("cpu/") + s.name).c_str(),
                                 [s](benchmark::State& st) { Run<PagedAttentionCpu>(st, s); })
        ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(decode ? 0.5 : 1.0);
    benchmark::RegisterBenchmark((std::string("ref/") + s.name).c_str(),
                                 [s](benchmark::State& st) { Run<PagedAttentionRef>(st, s); })
        ->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(decode ? 5 : 1);
  }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  benchmark::AddCustomContext("threads", std::to_string(g_threads));
  benchmark::AddCustomContext("highway_target", PagedAttentionCpuTarget());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
