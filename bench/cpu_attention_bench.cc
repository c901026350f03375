// The CPU attention kernel (PagedAttentionCpu) against the fp64 reference (PagedAttentionRef)
// at the embedded model's shape (4 query / 2 KV heads, head_dim 64) and one Llama-like shape
// (32 / 8 heads, head_dim 128), prefill and decode, page size 16, random data; GFLOP/s counts
// 4 * head_dim flops per (query, head, causal key) (QK^T and PV). Both kernels run on the same
// number of threads (--threads, default all hardware threads).
//   cpu_attention_bench [--threads N] [Google Benchmark flags]
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu.h"
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
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      g_threads = std::atoi(argv[++i]);
    } else {
      args.push_back(argv[i]);
    }
  }
  if (g_threads <= 0) g_threads = DefaultCpuThreads();
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
