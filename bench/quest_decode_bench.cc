// Decode attention of one attention layer at long contexts (Llama-3.1-8B-shaped: 32 query heads,
// 8 KV heads, head_dim 128; or --shape embedded: the embedded model's 4 query heads, 2 KV heads,
// head_dim 64; page size 16, fp32 or (--kv-dtype bfloat16) 16-bit KV on the CPU): the dense
// split-KV kernel against the machine's memory read bandwidth measured in the same run, and
// Quest (budget 4096 tokens, selection included) against dense, per query head and per KV head.
// The per-KV-head selection is attended twice, interleaved in each repetition: as one work item
// per sparse row (`per-row`, the kernel before group sharing: each query head of a group reads
// the shared pages again) and as one item per group that reads each page once (`grouped`,
// PagedAttentionCpu's default).
//   quest_decode_bench [--threads N] [--contexts 32768,131072] [--batches 1,8] [--budget 4096]
//                      [--reps 5] [--max_kv_gb 10] [--shape llama8b|embedded]
//                      [--kv-dtype float32|bfloat16] [--bounds float32|bfloat16]
//                      [--huge-pages 1|0] [--kv-layout head|token]
// --kv-layout token lays each KV page out token-major ([page_size, kv_heads, head_dim], the CUDA
// kernels' layout) instead of head-major (the cpu backend's, paged_attention.h), for the comparison.
// --huge-pages 0 allocates K, V and the page bounds without the transparent-huge-page advice
// the cpu backend's pools get (kernels/cpu/lazy_zero_allocator.h), for the comparison.
// --kv-dtype bfloat16 stores K and V as bfloat16 (the cpu backend's kv_cache.dtype bfloat16):
// attention reads the 16-bit rows, the page bounds are those of the rounded keys.
// --bounds: Quest's page bounds as bfloat16 (the default, as the engine keeps them: quest.h
// bf16_bounds, half the bytes, rounded outward on an fp32 cache) or float32.
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
#include "kernels/cpu/half.h"
#include "kernels/cpu/lazy_zero_allocator.h"
#include "kernels/cpu/parallel_for.h"
#include "kernels/sparse/quest.h"

namespace sieve::kernels {
namespace {

constexpr int kPage = bench::kPageSize;

using bench::CpuNow;
using bench::Median;
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
  int hq, hkv, dim;  // the layer's shape
  bool aliased;
  bool bf16;  // K and V also as bfloat16 (k16, v16), which attention then reads
  bool bf16_bounds = false;
  KvLayout layout = KvLayout::kHeadMajor;
  // K and V as the cpu backend's KV pool holds them (LazyZeroAllocator: huge-page advised
  // unless --huge-pages 0).
  std::vector<float, kernels::LazyZeroAllocator<float>> k, v;
  std::vector<uint16_t, kernels::LazyZeroAllocator<uint16_t>> k16, v16;
  std::vector<float> q, out;
  // Quest's page bounds, held like the cpu backend's side pool (huge-page advised too).
  std::vector<float, kernels::LazyZeroAllocator<float>> bounds;
  std::vector<int32_t> page_table, kv_lens, query_start;

  Problem(bench::LayerShape shape, int batch, int context, double max_kv_gb, bool kv_bf16,
          bool bounds_bf16, bool huge_pages, KvLayout kv_layout)
      : seqs(batch), ctx(context), hq(shape.q_heads), hkv(shape.kv_heads), dim(shape.head_dim),
        bf16(kv_bf16), bf16_bounds(bounds_bf16), layout(kv_layout),
        k(kernels::LazyZeroAllocator<float>(huge_pages)),
        v(kernels::LazyZeroAllocator<float>(huge_pages)),
        k16(kernels::LazyZeroAllocator<uint16_t>(huge_pages)),
        v16(kernels::LazyZeroAllocator<uint16_t>(huge_pages)),
        bounds(kernels::LazyZeroAllocator<float>(huge_pages)) {
    pages_per_seq = (context + kPage - 1) / kPage;
    const double kv_gb = 2.0 * batch * pages_per_seq * kPage * hkv * dim * 4 / 1e9;
    aliased = kv_gb > max_kv_gb;
    const int distinct = aliased ? 1 : batch;
    const size_t pages = static_cast<size_t>(distinct) * pages_per_seq;
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    k.resize(pages * kPage * hkv * dim);
    v.resize(k.size());
    ParallelFor(static_cast<int64_t>(k.size()), 0, 1 << 22, [&](int64_t b, int64_t e) {
      std::mt19937 r(static_cast<uint32_t>(b));
      std::uniform_real_distribution<float> uu(-1.0f, 1.0f);
      for (int64_t i = b; i < e; ++i) {
        k[i] = uu(r);
        v[i] = uu(r);
      }
    });
    if (bf16) {
      k16.resize(k.size());
      v16.resize(v.size());
      ParallelFor(static_cast<int64_t>(k.size()), 0, 1 << 22, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          k16[i] = FloatToBf16(k[i]);
          v16[i] = FloatToBf16(v[i]);
        }
      });
      k.clear();
      v.clear();
      k.shrink_to_fit();
      v.shrink_to_fit();
    }
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
    q.resize(static_cast<size_t>(batch) * hq * dim);
    for (float& x : q) x = u(rng);
    out.resize(q.size());
    // Page bounds as the append rule builds them, one sequence of pages at a time.
    bounds.assign(pages * hkv * 2 * dim, 0.0f);
    for (int s = 0; s < distinct; ++s) {
      std::vector<int64_t> slots;
      for (int t = 0; t < context; ++t) {
        slots.push_back(int64_t{page_table[s * pages_per_seq + t / kPage]} * kPage + t % kPage);
      }
      QuestBoundsUpdate up;
      up.k_cache = bf16 ? nullptr : k.data();
      up.k_cache_bf16 = bf16 ? k16.data() : nullptr;
      up.bounds = bounds.data();
      up.bf16_bounds = bf16_bounds;
      up.slots = slots.data();
      up.num_tokens = context;
      up.num_kv_heads = hkv;
      up.head_dim = dim;
      up.page_size = kPage;
      up.kv_layout = layout;
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
    p.num_q_heads = hq;
    p.num_kv_heads = hkv;
    p.head_dim = dim;
    p.page_size = kPage;
    p.scale = 1.0f / std::sqrt(static_cast<float>(dim));
    p.sparse = x;
    p.kv_layout = layout;
    return p;
  }

  PagedKvCache Kv() const {
    if (bf16) return {k16.data(), v16.data(), KvDtype::kBfloat16};
    return {k.data(), v.data(), KvDtype::kFloat32};
  }

  QuestSelectParams Select(int budget_pages, bool per_kv_head) {
    QuestSelectParams p;
    p.q = q.data();
    p.bounds = bounds.data();
    p.page_table = page_table.data();
    p.kv_lens = kv_lens.data();
    p.page_table_stride = pages_per_seq;
    p.num_seqs = seqs;
    p.num_q_heads = hq;
    p.num_kv_heads = hkv;
    p.head_dim = dim;
    p.page_size = kPage;
    p.page_budget = budget_pages;
    p.per_kv_head = per_kv_head;
    p.bf16_bounds = bf16_bounds;
    return p;
  }
};

// Wall and process-CPU seconds of each repetition of one variant.
struct Times {
  std::vector<double> select, attend, attend_cpu;
  void Add(double sel, double att, double att_cpu) {
    select.push_back(sel);
    attend.push_back(att);
    attend_cpu.push_back(att_cpu);
  }
  double Total() const {  // median of select + attend over the repetitions
    std::vector<double> t(select.size());
    for (size_t i = 0; i < t.size(); ++i) t[i] = select[i] + attend[i];
    return Median(t);
  }
};

// One table row: dense, then Quest per query head, per KV head attended per row and grouped,
// interleaved in each of `reps` repetitions after a warm-up round. bw: read bandwidth, bytes/s.
void RunRow(bench::LayerShape shape, int ctx, int batch, int budget, int reps, int threads,
            double max_kv_gb, double bw, bool kv_bf16, bool bounds_bf16, bool huge_pages,
            KvLayout layout) {
  Problem pr(shape, batch, ctx, max_kv_gb, kv_bf16, bounds_bf16, huge_pages, layout);
  const double kv_bytes =
      2.0 * batch * ctx * shape.kv_heads * shape.head_dim * (kv_bf16 ? 2 : sizeof(float));
  std::vector<int32_t> qbs(batch + 1);
  for (int s = 0; s <= batch; ++s) qbs[s] = s;
  // Variants: 0 per query head, 1 per KV head attended per row, 2 per KV head grouped.
  const bool per_kv[3] = {false, true, true};
  const bool grouped[3] = {true, false, true};
  QuestSelection sel[3];
  Times t[3];
  std::vector<double> dense_t;
  for (int r = 0; r <= reps; ++r) {  // round 0 warms up
    double a = Now();
    PagedAttentionCpu(pr.Attn(nullptr), pr.Kv(), threads, {});
    if (r > 0) dense_t.push_back(Now() - a);
    for (int v = 0; v < 3; ++v) {
      a = Now();
      QuestSelectCpu(pr.Select(budget / kPage, per_kv[v]), sel[v], threads);
      const double b = Now(), c = CpuNow();
      SparseAttentionIndex x;
      x.query_block = 1;
      x.key_block = kPage;
      x.query_block_start = qbs.data();
      x.row_start = sel[v].row_start.data();
      x.key_blocks = sel[v].key_blocks.data();
      PagedAttentionCpu(pr.Attn(&x), pr.Kv(), threads, {.group_shared_rows = grouped[v]});
      if (r > 0) t[v].Add(b - a, Now() - b, CpuNow() - c);
    }
  }
  const double dense = Median(dense_t);
  double total[3], select[3];
  for (int v = 0; v < 3; ++v) {
    total[v] = t[v].Total();
    select[v] = Median(t[v].select);
  }
  const double att_row = Median(t[1].attend), att_grp = Median(t[2].attend);
  const double cpu_row = Median(t[1].attend_cpu), cpu_grp = Median(t[2].attend_cpu);
  std::printf("| %d | %d | %.2f GB%s | %.2f | %.2f | %.0f%% | %.3f (%.3f) | %.1fx | %.3f (%.3f) | "
              "%.1fx | %.3f (%.3f) | %.1fx | %.3f / %.3f | %.3f / %.3f | %.2fx (%.2fx) |\n",
              ctx, batch, kv_bytes / 1e9, pr.aliased ? " (aliased)" : "", dense * 1e3,
              kv_bytes / dense / 1e9, 100 * kv_bytes / dense / bw, total[0] * 1e3,
              select[0] * 1e3, dense / total[0], total[1] * 1e3, select[1] * 1e3,
              dense / total[1], total[2] * 1e3, select[2] * 1e3, dense / total[2],
              att_row * 1e3, att_grp * 1e3, cpu_row * 1e3, cpu_grp * 1e3, att_row / att_grp,
              cpu_row / cpu_grp);
  std::fflush(stdout);
}

int Main(int argc, char** argv) {
  int threads = DefaultCpuThreads(), budget = 4096, reps = 5;
  double max_kv_gb = 10;
  std::vector<int> contexts = {32768, 131072}, batches = {1, 8};
  bench::LayerShape shape = bench::kLlama31_8B;
  std::string shape_name = "llama8b", kv_dtype = "float32", bounds_dtype = "bfloat16";
  bool huge_pages = true;
  std::string layout_name = "head";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--threads") threads = std::atoi(argv[i + 1]);
    else if (a == "--contexts") contexts = bench::ParseIntList(argv[i + 1]);
    else if (a == "--batches") batches = bench::ParseIntList(argv[i + 1]);
    else if (a == "--budget") budget = std::atoi(argv[i + 1]);
    else if (a == "--reps") reps = std::atoi(argv[i + 1]);
    else if (a == "--max_kv_gb") max_kv_gb = std::atof(argv[i + 1]);
    else if (a == "--shape") shape_name = argv[i + 1];
    else if (a == "--kv-dtype") kv_dtype = argv[i + 1];
    else if (a == "--bounds") bounds_dtype = argv[i + 1];
    else if (a == "--huge-pages") huge_pages = std::atoi(argv[i + 1]) != 0;
    else if (a == "--kv-layout") layout_name = argv[i + 1];
    else {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    }
  }
  if (shape_name == "embedded") {
    shape = bench::kEmbedded;
  } else if (shape_name != "llama8b") {
    std::fprintf(stderr, "--shape must be llama8b or embedded, got '%s'\n", shape_name.c_str());
    return 2;
  }
  if (kv_dtype != "float32" && kv_dtype != "bfloat16") {
    std::fprintf(stderr, "--kv-dtype must be float32 or bfloat16, got '%s'\n", kv_dtype.c_str());
    return 2;
  }
  const bool kv_bf16 = kv_dtype == "bfloat16";
  if (bounds_dtype != "float32" && bounds_dtype != "bfloat16") {
    std::fprintf(stderr, "--bounds must be float32 or bfloat16, got '%s'\n", bounds_dtype.c_str());
    return 2;
  }
  const bool bounds_bf16 = bounds_dtype == "bfloat16";
  if (layout_name != "head" && layout_name != "token") {
    std::fprintf(stderr, "--kv-layout must be head or token, got '%s'\n", layout_name.c_str());
    return 2;
  }
  const KvLayout layout = layout_name == "head" ? KvLayout::kHeadMajor : KvLayout::kTokenMajor;
  if (reps < 1 || budget < 2 * kPage) {
    std::fprintf(stderr, "--reps must be >= 1 and --budget >= %d\n", 2 * kPage);
    return 2;
  }
  std::string thp = "unknown";
  if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r")) {
    char line[128] = {};
    if (std::fgets(line, sizeof(line), f) != nullptr) thp = line;
    std::fclose(f);
    while (!thp.empty() && thp.back() == '\n') thp.pop_back();
  }
  std::printf("threads %d, simd %s, layer %s %dq/%dkv x %d, page %d, %s-major %s KV, %s bounds, "
              "budget %d, median of %d after one warm-up, variants interleaved; K/V %s "
              "(transparent huge pages: %s)\n",
              threads, PagedAttentionCpuTarget(), shape_name.c_str(), shape.q_heads,
              shape.kv_heads, shape.head_dim, kPage, layout_name.c_str(), kv_dtype.c_str(),
              bounds_dtype.c_str(),
              budget, reps, huge_pages ? "huge-page advised" : "not advised", thp.c_str());
  const double bw = ReadBandwidth(threads, size_t{1} << 30, 5);
  std::printf("memory read bandwidth (1 GiB, %d threads, best of 5): %.2f GB/s\n\n", threads,
              bw / 1e9);
  std::printf("| context | batch | KV | dense ms | dense GB/s | %% of read bw | quest/q-head ms "
              "(select ms) | speed-up | quest/kv-head per-row ms (select ms) | speed-up | "
              "quest/kv-head grouped ms (select ms) | speed-up | kv-head attend ms per-row / "
              "grouped (wall) | same, CPU ms | grouped attend speed-up wall (CPU) |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (int ctx : contexts) {
    for (int batch : batches) {
      RunRow(shape, ctx, batch, budget, reps, threads, max_kv_gb, bw, kv_bf16, bounds_bf16,
             huge_pages, layout);
    }
  }
  return 0;
}

}  // namespace
}  // namespace sieve::kernels

int main(int argc, char** argv) { return sieve::kernels::Main(argc, argv); }
