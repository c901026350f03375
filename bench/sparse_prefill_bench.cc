// Sparse prefill attention on the CPU, one Llama-3.1-8B-shaped layer (32 query heads, 8 KV
// heads, head_dim 128, causal, page size 16) on structured inputs (bench/structured_attention.h):
//   - dense: kernels::PagedAttentionCpu over every causal key;
//   - xattention S=16 / S=8, tau 0.9, blocks of 128: the estimator (XAttentionBlockMassCpu), the
//     threshold selection and index building, then the same kernel on the block-sparse index;
//     the time includes all three; density = computed (query, key) pairs / causal pairs; the
//     output's error against dense (RMS of the difference / RMS of dense) beside it;
//   - minference vertical-slash (1000, 6096) and (100, 800) on every head: the index building
//     (kernels::minference::BuildPlan: last-64-query estimate, selection, 64x64 tiles plus
//     columns), then the same kernel on its index; timed and reported like xattention;
//   - the block-sparse kernel at fixed densities (1, 5, 10, 25% of causal 128x128 tiles: the
//     diagonal tile plus random others), its achieved GFLOP/s (4 * d flops per computed pair)
//     against the dense kernel's in the same run.
// Every figure is the median of --reps runs (1 by default: a 32K dense layer takes minutes on 2
// cores). Usage:
//   sparse_prefill_bench [--tokens 8192,16384,32768] [--threads N] [--reps R]
//                        [--fixed_tokens 16384] [--no_fixed] [--heads 32] [--sgemm]
//                        [--huge_pages 1] [--no_methods] [--densities 1,5,10,25]
//                        [--fixed_reps R] [--no_dense]
// --no_methods: dense and the fixed densities only; --densities: percents of causal tiles;
// --no_dense: the fixed densities only (their GFLOP/s, no ratios: for A/B runs of the kernel).
// --sgemm: after each dense row, the machine's sgemm GFLOP/s (LinearCpu, oneDNN) measured right
// then, and the dense kernel's rate as a share of it (issue 9's CPU target: at least 50%).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "bench/structured_attention.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/cpu/gemm_cpu.h"
#include "kernels/cpu/lazy_zero_allocator.h"
#include "kernels/sparse/minference.h"
#include "kernels/sparse/xattention.h"

namespace sieve {
namespace {

using kernels::PagedAttentionParams;
using kernels::SparseAttentionIndex;

constexpr int kD = 128, kPage = 16, kBlock = 128;
// Query and KV heads (--heads: a quarter layer, 8 / 2, keeps every per-head cost and so every
// ratio of a full layer, in a quarter of the time).
int kHq = 32, kHkv = 8;
// --huge_pages 0: Q, K, V and the output on 4 KiB pages (the default advises them for huge pages,
// as the cpu backend's KV pool and activations are).
bool kHugePages = true;
using Buffer = std::vector<float, kernels::LazyZeroAllocator<float>>;

using bench::CpuNow;
using bench::Median;
using bench::Now;

// A block-sparse index under construction.
struct Index {
  std::vector<int32_t> query_block_start, row_start, key_blocks;
  SparseAttentionIndex View() const {
    SparseAttentionIndex x;
    x.query_block = kBlock;
    x.key_block = kBlock;
    x.query_block_start = query_block_start.data();
    x.row_start = row_start.data();
    x.key_blocks = key_blocks.data();
    return x;
  }
  // Causal (query, key) pairs the index reads for a prefill of n tokens.
  int64_t Pairs(int n) const {
    int64_t pairs = 0;
    const int blocks = (n + kBlock - 1) / kBlock;
    for (int m = 0; m < blocks; ++m) {
      for (int h = 0; h < kHq; ++h) {
        const int64_t r = int64_t{m} * kHq + h;
        for (int i = row_start[r]; i < row_start[r + 1]; ++i) {
          const int j = key_blocks[i];
          if (j < m) {
            pairs += int64_t{kBlock} * std::min(kBlock, n - m * kBlock);
          } else {  // the diagonal tile: causal triangle
            const int q = std::min(kBlock, n - m * kBlock);
            pairs += int64_t{q} * (q + 1) / 2;
          }
        }
      }
    }
    return pairs;
  }
};

struct Layer {
  int n;
  Buffer q, k, v, out;
  std::vector<int32_t> pages, kv_lens, query_start;
  PagedAttentionParams<float> p;

  Layer(int tokens, const bench::StructuredAttentionParams& gp)
      : n(tokens), q(Buffer::allocator_type(kHugePages)), k(q.get_allocator()),
        v(q.get_allocator()), out(q.get_allocator()) {
    bench::StructuredAttentionParams g = gp;
    g.tokens = n;
    g.num_q_heads = kHq;
    g.num_kv_heads = kHkv;
    bench::StructuredAttention s = bench::MakeStructuredAttention(g);
    q.assign(s.q.begin(), s.q.end());
    const int num_pages = (n + kPage - 1) / kPage;
    pages.resize(num_pages);
    std::iota(pages.begin(), pages.end(), 0);
    std::shuffle(pages.begin(), pages.end(), std::mt19937(3));
    k.assign(static_cast<size_t>(num_pages) * kPage * kHkv * kD, 0.0f);
    v.assign(k.size(), 0.0f);
    const size_t row = static_cast<size_t>(kHkv) * kD;
    for (int t = 0; t < n; ++t) {
      const size_t slot = size_t(pages[t / kPage]) * kPage + t % kPage;
      std::memcpy(k.data() + slot * row, s.k.data() + t * row, row * sizeof(float));
      std::memcpy(v.data() + slot * row, s.v.data() + t * row, row * sizeof(float));
    }
    out.resize(q.size());
    kv_lens = {n};
    query_start = {0, n};
    p.q = q.data();
    p.k_cache = k.data();
    p.v_cache = v.data();
    p.out = out.data();
    p.page_table = pages.data();
    p.kv_lens = kv_lens.data();
    p.query_start = query_start.data();
    p.page_table_stride = num_pages;
    p.num_seqs = 1;
    p.num_q_heads = kHq;
    p.num_kv_heads = kHkv;
    p.head_dim = kD;
    p.page_size = kPage;
    p.scale = 1.0f / std::sqrt(float{kD});
  }

  kernels::XAttentionParams Estimate(int stride) const {
    kernels::XAttentionParams x;
    x.q = q.data();
    x.q_row_stride = int64_t{kHq} * kD;
    x.k_cache = k.data();
    x.page_table = pages.data();
    x.page_size = kPage;
    x.num_q_heads = kHq;
    x.num_kv_heads = kHkv;
    x.head_dim = kD;
    x.q_len = n;
    x.kv_len = n;
    x.stride = stride;
    x.block_size = kBlock;
    return x;
  }

  double DensePairs() const { return static_cast<double>(kHq) * n * (n + 1.0) / 2; }
};

// XAttention index for the whole prompt (one sequence), as XAttentionPolicy builds it.
void BuildXAttentionIndex(const Layer& l, int stride, double tau, int threads,
                          std::vector<float>& mass, Index& x) {
  const kernels::XAttentionParams e = l.Estimate(stride);
  const int qb = kernels::XAttentionQueryBlocks(e), kb = kernels::XAttentionKeyBlocks(e);
  mass.resize(static_cast<size_t>(kHq) * qb * kb);
  kernels::XAttentionBlockMassCpu(e, mass.data(), threads);
  x.query_block_start = {0, qb};
  x.row_start.assign(1, 0);
  x.key_blocks.clear();
  std::vector<double> row;
  std::vector<int32_t> sel, order;
  for (int m = 0; m < qb; ++m) {
    for (int h = 0; h < kHq; ++h) {
      const float* r = mass.data() + (static_cast<size_t>(h) * qb + m) * kb;
      row.assign(r, r + m + 1);
      kernels::XAttentionSelectBlocks(row.data(), m, tau, sel, order);
      x.key_blocks.insert(x.key_blocks.end(), sel.begin(), sel.end());
      x.row_start.push_back(static_cast<int32_t>(x.key_blocks.size()));
    }
  }
}

// Random index with `fraction` of the causal tiles: every diagonal tile plus random others.
Index FixedDensityIndex(int n, double fraction, unsigned seed) {
  const int blocks = (n + kBlock - 1) / kBlock;
  const int64_t causal = int64_t{blocks} * (blocks + 1) / 2;
  const int64_t want = std::max<int64_t>(blocks, std::llround(fraction * causal));
  std::mt19937 rng(seed);
  Index x;
  x.query_block_start = {0, blocks};
  x.row_start.assign(1, 0);
  // Extra off-diagonal tiles per row, proportional to the row's length.
  const double extra_share = double(want - blocks) / (causal - blocks);
  for (int m = 0; m < blocks; ++m) {
    for (int h = 0; h < kHq; ++h) {
      std::vector<int32_t> row;
      for (int j = 0; j < m; ++j) {
        if (std::uniform_real_distribution<double>(0, 1)(rng) < extra_share) row.push_back(j);
      }
      row.push_back(m);
      x.key_blocks.insert(x.key_blocks.end(), row.begin(), row.end());
      x.row_start.push_back(static_cast<int32_t>(x.key_blocks.size()));
    }
  }
  return x;
}

// RMS of (got - want) over RMS of want.
double RelError(const Buffer& got, const Buffer& want) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += double(got[i] - want[i]) * (got[i] - want[i]);
    scale += double(want[i]) * want[i];
  }
  return std::sqrt(diff / scale);
}

// The machine's sgemm rate in the same run: kernels::LinearCpu (oneDNN's sgemm on our threads,
// the CPU backend's linear layers) at 2048 x 4096 x 4096, random data, best of 3 after a warm-up.
double SgemmGflops(int threads) {
  constexpr int64_t m = 2048, k = 4096, n = 4096;
  std::vector<float> a(m * k), b(n * k), c(m * n);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (float& x : a) x = u(rng);
  for (float& x : b) x = u(rng);
  double best = 1e30;
  for (int r = 0; r < 4; ++r) {
    const double t0 = Now();
    kernels::LinearCpu(a.data(), b.data(), nullptr, m, k, n, c.data(), threads);
    if (r > 0) best = std::min(best, Now() - t0);
  }
  return 2.0 * m * n * k / best * 1e-9;
}

}  // namespace
}  // namespace sieve

int main(int argc, char** argv) {
  using namespace sieve;
  std::vector<int> tokens = {8192, 16384, 32768};
  int threads = 0, reps = 1, fixed_tokens = 16384;
  bool fixed = true, sgemm = false, methods = true, no_dense = false;
  int fixed_reps = 0;  // 0: --reps
  std::vector<int> densities = {1, 5, 10, 25};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--tokens") tokens = bench::ParseIntList(next());
    else if (a == "--threads") threads = std::atoi(next());
    else if (a == "--reps") reps = std::max(1, std::atoi(next()));
    else if (a == "--fixed_tokens") fixed_tokens = std::atoi(next());
    else if (a == "--no_fixed") fixed = false;
    else if (a == "--sgemm") sgemm = true;
    else if (a == "--huge_pages") kHugePages = std::atoi(next()) != 0;
    else if (a == "--no_methods") methods = false;
    else if (a == "--no_dense") no_dense = true;
    else if (a == "--densities") densities = bench::ParseIntList(next());
    else if (a == "--fixed_reps") fixed_reps = std::max(1, std::atoi(next()));
    else if (a == "--heads") {
      kHq = std::atoi(next());
      kHkv = std::max(1, kHq / 4);
    }
    else {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    }
  }
  const bench::StructuredAttentionParams gen;
  std::printf("# sparse_prefill_bench: %d q heads, %d KV heads, d %d, page %d, block %d, "
              "threads %d (0 = all), reps %d, kernel target %s, huge pages %s\n",
              kHq, kHkv, kD, kPage, kBlock, threads, reps, kernels::PagedAttentionCpuTarget(),
              kHugePages ? "advised" : "off");
  std::printf("# generator: %s\n", gen.Describe().c_str());
  std::printf("| tokens | method | wall (s) | CPU (s) | speed-up (wall) | speed-up (CPU) | "
              "density | index wall (s) | rms err / rms dense |\n"
              "|---|---|---|---|---|---|---|---|---|\n");
  std::fflush(stdout);
  for (int n : tokens) {
    Layer l(n, gen);
    std::vector<double> t, tc;
    for (int r = 0; r < (no_dense ? 0 : reps); ++r) {
      const double t0 = Now(), c0 = CpuNow();
      kernels::PagedAttentionCpu(l.p, threads);
      t.push_back(Now() - t0);
      tc.push_back(CpuNow() - c0);
    }
    if (no_dense) {  // an A/B of the fixed densities alone: no ratio to dense
      t = tc = {std::nan("")};
      methods = false;
    }
    const double dense_s = Median(t), dense_cpu = Median(tc);
    const Buffer dense_out = l.out;
    std::printf("| %d | dense | %.3f | %.3f | 1.00 | 1.00 | 1.000 | - | 0 |\n", n, dense_s,
                dense_cpu);
    if (sgemm) {
      const double gf = 4.0 * kD * l.DensePairs() / dense_s * 1e-9;
      const double sg = SgemmGflops(threads);
      std::printf("| %d | dense kernel %.1f GFLOP/s; sgemm %.1f GFLOP/s just after (2048 x 4096 x "
                  "4096, LinearCpu): %.0f%% |  |  |  |  |  |  |  |\n", n, gf, sg, 100 * gf / sg);
    }
    std::fflush(stdout);
    for (int stride : {16, 8}) {
      if (!methods) break;
      std::vector<float> mass;
      Index x;
      std::vector<double> total, index_t, cpu;
      for (int r = 0; r < reps; ++r) {
        const double t0 = Now(), c0 = CpuNow();
        BuildXAttentionIndex(l, stride, 0.9, threads, mass, x);
        const SparseAttentionIndex view = x.View();
        PagedAttentionParams<float> p = l.p;
        p.sparse = &view;
        const double t1 = Now();
        kernels::PagedAttentionCpu(p, threads);
        const double t2 = Now();
        cpu.push_back(CpuNow() - c0);
        total.push_back(t2 - t0);
        index_t.push_back(t1 - t0);
      }
      const double s = Median(total), c = Median(cpu);
      std::printf("| %d | xattention S=%d tau=0.9 | %.3f | %.3f | %.2f | %.2f | %.3f | %.3f | "
                  "%.2e |\n",
                  n, stride, s, c, dense_s / s, dense_cpu / c, x.Pairs(n) / l.DensePairs(),
                  Median(index_t), RelError(l.out, dense_out));
      std::fflush(stdout);
    }
    for (const auto& [vs, ss] : {std::pair{1000, 6096}, std::pair{100, 800}}) {
      if (!methods) break;
      const std::vector<kernels::minference::HeadPattern> pats(
          kHq, kernels::minference::HeadPattern{kernels::minference::Pattern::kVerticalSlash, vs, ss});
      kernels::minference::Options o;
      o.num_threads = threads;
      kernels::minference::MInferencePlan plan;
      std::vector<double> total, index_t, cpu;
      for (int r = 0; r < reps; ++r) {
        const double t0 = Now(), c0 = CpuNow();
        kernels::minference::BuildPlan(l.p, pats.data(), o, &plan);
        const SparseAttentionIndex view = plan.View();
        PagedAttentionParams<float> p = l.p;
        p.sparse = &view;
        const double t1 = Now();
        kernels::PagedAttentionCpu(p, threads);
        const double t2 = Now();
        cpu.push_back(CpuNow() - c0);
        total.push_back(t2 - t0);
        index_t.push_back(t1 - t0);
      }
      const double s = Median(total), c = Median(cpu);
      std::printf("| %d | minference VS (%d, %d) | %.3f | %.3f | %.2f | %.2f | %.3f | %.3f | "
                  "%.2e |\n",
                  n, vs, ss, s, c, dense_s / s, dense_cpu / c,
                  kernels::minference::PlanPairs(l.p, plan) / l.DensePairs(), Median(index_t),
                  RelError(l.out, dense_out));
      std::fflush(stdout);
    }
    if (!fixed || n != fixed_tokens) continue;
    const double dense_gflops = 4.0 * kD * l.DensePairs() / dense_s * 1e-9;
    const double dense_cpu_gflops = 4.0 * kD * l.DensePairs() / dense_cpu * 1e-9;
    std::printf("\n| tokens | tiles | wall (s) | GFLOP/s (wall) | dense GFLOP/s (wall) | ratio (wall) "
                "| GFLOP per CPU s | dense GFLOP per CPU s | ratio (CPU) |\n"
                "|---|---|---|---|---|---|---|---|---|\n");
    for (const int percent : densities) {
      const double f = percent / 100.0;
      const Index x = FixedDensityIndex(n, f, 17);
      const SparseAttentionIndex view = x.View();
      PagedAttentionParams<float> p = l.p;
      p.sparse = &view;
      std::vector<double> ts, tcs;
      for (int r = 0; r < (fixed_reps > 0 ? fixed_reps : reps); ++r) {
        const double t0 = Now(), c0 = CpuNow();
        kernels::PagedAttentionCpu(p, threads);
        ts.push_back(Now() - t0);
        tcs.push_back(CpuNow() - c0);
      }
      const double s = Median(ts), c = Median(tcs);
      const double gflops = 4.0 * kD * x.Pairs(n) / s * 1e-9;
      const double cpu_gflops = 4.0 * kD * x.Pairs(n) / c * 1e-9;
      std::printf("| %d | %.0f%% (%.3f of pairs) | %.3f | %.1f | %.1f | %.2f | %.1f | %.1f | %.2f |\n",
                  n, f * 100, x.Pairs(n) / l.DensePairs(), s, gflops, dense_gflops,
                  gflops / dense_gflops, cpu_gflops, dense_cpu_gflops,
                  cpu_gflops / dense_cpu_gflops);
      std::fflush(stdout);
    }
    std::printf("\n");
  }
  return 0;
}
