// Decode attention of one Llama-3.1-8B-shaped layer (32 query heads, 8 KV heads, head_dim 128,
// page size 16, fp32 KV on the CPU) at long contexts: the dense split-KV kernel against the
// machine's memory read bandwidth measured in the same run, and Quest (budget 4096 tokens,
// selection included) against dense, per query head and per KV head.
//   quest_decode_bench [--threads N] [--contexts 32768,131072] [--batches 1,8] [--budget 4096]
//                      [--reps 5] [--max_kv_gb 10]
// A configuration whose KV would exceed --max_kv_gb lets its sequences share one sequence's
// pages (page tables alias; the shared KV still far exceeds the last-level cache) and says so.
// Random data: timings only (Quest's accuracy is tested in kernels/sparse/quest_test.cc).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/cpu/parallel_for.h"
#include "kernels/sparse/quest.h"

namespace sieve::kernels {
namespace {

constexpr int kHq = bench::kLlama31_8B.q_heads, kHkv = bench::kLlama31_8B.kv_heads,
              kD = bench::kLlama31_8B.head_dim, kPage = bench::kPageSize;

using bench::MedianSeconds;
using bench::Now;

// Read bandwidth: `threads` threads each summing their share of a buffer far larger than the
// last-level cache (8 accumulators, so the adds never limit it). Best of `reps`, bytes/s.
double ReadBandwidth(int threads, size_t bytes, int reps) {
  const size_t n = bytes / sizeof(float);
  std::vector<float> buf(n);
  ParallelFor(static_cast<int64_t>(n), threads, 1 << 20, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) buf[i] = static_cast<float>(i & 7) * 0.5f;
  });
  double best = 0;
  volatile float sink = 0;
  for (int r = 0; r < reps; ++r) {
    std::vector<float> partial(threads, 0.0f);
    const double a = Now();
    ParallelFor(threads, threads, 1, [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t) {
        const size_t chunk = n / threads;
        const float* p = buf.data() + t * chunk;
        float acc[16] = {0};
        for (size_t i = 0; i + 16 <= chunk; i += 16) {
          for (int j = 0; j < 16; ++j) acc[j] += p[i + j];
        }
        float s = 0;
        for (float x : acc) s += x;
        partial[t] = s;
      }
    });
    const double sec = Now() - a;
    for (float x : partial) sink = sink + x;
    best = std::max(best, static_cast<double>(n / threads * threads) * sizeof(float) / sec);
  }
  return best;
}

struct Problem {
  int seqs, ctx, pages_per_seq;
  bool aliased;
  std::vector<float> q, k, v, out, bounds;
  std::vector<int32_t> page_table, kv_lens, query_start;

  Problem(int batch, int context, double max_kv_gb) : seqs(batch), ctx(context) {
    pages_per_seq = (context + kPage - 1) / kPage;
    const double kv_gb = 2.0 * batch * pages_per_seq * kPage * kHkv * kD * 4 / 1e9;
    aliased = kv_gb > max_kv_gb;
    const int distinct = aliased ? 1 : batch;
    const size_t pages = static_cast<size_t>(distinct) * pages_per_seq;
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    k.resize(pages * kPage * kHkv * kD);
    v.resize(k.size());
    ParallelFor(static_cast<int64_t>(k.size()), 0, 1 << 22, [&](int64_t b, int64_t e) {
      std::mt19937 r(static_cast<uint32_t>(b));
      std::uniform_real_distribution<float> uu(-1.0f, 1.0f);
      for (int64_t i = b; i < e; ++i) {
        k[i] = uu(r);
        v[i] = uu(r);
      }
    });
    std::vector<int32_t> ids(pages);
    for (size_t i = 0; i < pages; ++i) ids[i] = static_cast<int32_t>(i);
    std::shuffle(ids.begin(), ids.end(), rng);
    for (int s = 0; s < batch; ++s) {
      const int base = aliased ? 0 : s * pages_per_seq;
      page_table.insert(page_table.end(), ids.begin() + base, ids.begin() + base + pages_per_seq);
      kv_lens.push_back(context);
      query_start.push_back(s);
    }
    query_start.push_back(batch);
    q.resize(static_cast<size_t>(batch) * kHq * kD);
    for (float& x : q) x = u(rng);
    out.resize(q.size());
    // Page bounds as the append rule builds them, one sequence of pages at a time.
    bounds.assign(pages * kHkv * 2 * kD, 0.0f);
    for (int s = 0; s < distinct; ++s) {
      std::vector<int64_t> slots;
      for (int t = 0; t < context; ++t) {
        slots.push_back(int64_t{page_table[s * pages_per_seq + t / kPage]} * kPage + t % kPage);
      }
      QuestBoundsUpdate up;
      up.k_cache = k.data();
      up.bounds = bounds.data();
      up.slots = slots.data();
      up.num_tokens = context;
      up.num_kv_heads = kHkv;
      up.head_dim = kD;
      up.page_size = kPage;
      QuestUpdateBounds(up);
    }
  }

  PagedAttentionParams<float> Attn(const SparseAttentionIndex* x) {
    PagedAttentionParams<float> p;
    p.q = q.data();
    p.k_cache = k.data();
    p.v_cache = v.data();
    p.out = out.data();
    p.page_table = page_table.data();
    p.kv_lens = kv_lens.data();
    p.query_start = query_start.data();
    p.page_table_stride = pages_per_seq;
    p.num_seqs = seqs;
    p.num_q_heads = kHq;
    p.num_kv_heads = kHkv;
    p.head_dim = kD;
    p.page_size = kPage;
    p.scale = 1.0f / std::sqrt(static_cast<float>(kD));
    p.sparse = x;
    return p;
  }

  QuestSelectParams Select(int budget_pages, bool per_kv_head) {
    QuestSelectParams p;
    p.q = q.data();
    p.bounds = bounds.data();
    p.page_table = page_table.data();
    p.kv_lens = kv_lens.data();
    p.page_table_stride = pages_per_seq;
    p.num_seqs = seqs;
    p.num_q_heads = kHq;
    p.num_kv_heads = kHkv;
    p.head_dim = kD;
    p.page_size = kPage;
    p.page_budget = budget_pages;
    p.per_kv_head = per_kv_head;
    return p;
  }
};

int Main(int argc, char** argv) {
  int threads = DefaultCpuThreads(), budget = 4096, reps = 5;
  double max_kv_gb = 10;
  std::vector<int> contexts = {32768, 131072}, batches = {1, 8};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--threads") threads = std::atoi(argv[i + 1]);
    else if (a == "--contexts") contexts = bench::ParseIntList(argv[i + 1]);
    else if (a == "--batches") batches = bench::ParseIntList(argv[i + 1]);
    else if (a == "--budget") budget = std::atoi(argv[i + 1]);
    else if (a == "--reps") reps = std::atoi(argv[i + 1]);
    else if (a == "--max_kv_gb") max_kv_gb = std::atof(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    }
  }
  std::printf("threads %d, simd %s, layer 32q/8kv x 128, page %d, fp32 KV, budget %d\n", threads,
              PagedAttentionCpuTarget(), kPage, budget);
  const double bw = ReadBandwidth(threads, size_t{1} << 30, 5);
  std::printf("memory read bandwidth (1 GiB, %d threads, best of 5): %.2f GB/s\n\n", threads,
              bw / 1e9);
  std::printf("| context | batch | KV | dense ms | dense GB/s | %% of read bw | quest/q-head ms "
              "(select ms) | speed-up | quest/kv-head ms (select ms) | speed-up |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (int ctx : contexts) {
    for (int batch : batches) {
      Problem pr(batch, ctx, max_kv_gb);
      const double kv_bytes = 2.0 * batch * ctx * kHkv * kD * sizeof(float);
      const double dense = MedianSeconds(reps, [&] { PagedAttentionCpu(pr.Attn(nullptr), threads); });
      double quest[2], select[2];
      for (int per_kv = 0; per_kv < 2; ++per_kv) {
        QuestSelection sel;
        std::vector<int32_t> qbs(batch + 1);
        for (int s = 0; s <= batch; ++s) qbs[s] = s;
        const QuestSelectParams sp = pr.Select(budget / kPage, per_kv != 0);
        select[per_kv] = MedianSeconds(reps, [&] { QuestSelectCpu(sp, sel, threads); });
        quest[per_kv] = MedianSeconds(reps, [&] {
          QuestSelectCpu(sp, sel, threads);
          SparseAttentionIndex x;
          x.query_block = 1;
          x.key_block = kPage;
          x.query_block_start = qbs.data();
          x.row_start = sel.row_start.data();
          x.key_blocks = sel.key_blocks.data();
          PagedAttentionCpu(pr.Attn(&x), threads);
        });
      }
      std::printf("| %d | %d | %.2f GB%s | %.2f | %.2f | %.0f%% | %.3f (%.3f) | %.1fx | %.3f (%.3f) | "
                  "%.1fx |\n",
                  ctx, batch, kv_bytes / 1e9, pr.aliased ? " (aliased)" : "", dense * 1e3,
                  kv_bytes / dense / 1e9, 100 * kv_bytes / dense / bw, quest[0] * 1e3,
                  select[0] * 1e3, dense / quest[0], quest[1] * 1e3, select[1] * 1e3,
                  dense / quest[1]);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace
}  // namespace sieve::kernels

int main(int argc, char** argv) { return sieve::kernels::Main(argc, argv); }
