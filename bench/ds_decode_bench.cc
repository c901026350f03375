// DoubleSparsity decode attention against the dense decode kernel, one Llama-3.1-8B-shaped layer
// (32 query heads, 8 KV heads, head_dim 128; --shape embedded: the embedded model's 4 query
// heads, 2 KV heads, head_dim 64; fp32 KV or, --kv bf16, bfloat16 KV; page size 16), in one
// run:
//   dense      : PagedAttentionCpu over every key;
//   ds_perhead : labels and selection per query head (the reference semantics), DsSelectCpu +
//                PagedAttentionCpu over the selected columns;
//   ds_shared  : labels per KV head and one selection per KV head shared by its query heads,
//                attended as one work item per group (each selected K/V row read once);
//   ds_shared_per_row : the same selection attended as one item per query head (the kernel
//                without group sharing, PagedAttentionCpuOptions::group_shared_rows off);
// each at `channels` of 128 channels (fp16 labels) and a token budget of L / `fraction`, and the
// host's memory read bandwidth (a threaded XOR over the KV cache) measured in the same run.
// Median of --reps runs per variant, variants interleaved. Random data (speed only).
//   ds_decode_bench [--contexts 32768,131072] [--batches 1,8] [--channels 16] [--fraction 16]
//                   [--reps 5] [--threads N] [--share-kv-above-gib G] [--shape llama8b|embedded]
//                   [--kv-layout head|token] [--huge-pages 1|0] [--kv f32|bf16]
// --kv-layout orders each KV page's rows (paged_attention.h KvLayout): head-major (default, the
// cpu backend's with a sparse decode method) or token-major (its layout with dense decode).
// K, V and the label cache are held as the cpu backend holds its pools (LazyZeroAllocator:
// huge-page advised); --huge-pages 0 leaves out the advice (4 KiB pages: a TLB miss per row).
// With --share-kv-above-gib G, a batch whose KV would exceed G GiB gives all its sequences the
// same pages (same bytes moved per step, less memory; each sequence keeps its own queries).
// --kv bf16 holds K and V as bfloat16 (kv_cache.dtype bfloat16: half the bytes; every variant,
// dense included, reads them, and the labels are written from them, as the cpu backend does).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/cpu/lazy_zero_allocator.h"
#include "kernels/cpu/parallel_for.h"
#include "kernels/sparse/double_sparsity.h"

namespace sieve::kernels {
namespace {

constexpr int kPage = bench::kPageSize;

struct Flags {
  std::vector<int> contexts{32768, 131072}, batches{1, 8};
  int channels = 16, fraction = 16, reps = 5, threads = 0;
  double share_kv_above_gib = 1e9;
  bench::LayerShape shape = bench::kLlama31_8B;
  KvLayout layout = KvLayout::kHeadMajor;  // the cpu backend's with a sparse decode method
  bool huge_pages = true;                  // the cpu backend's pools are huge-page advised
  bool bf16 = false;                       // K and V as bfloat16
};

// A pool buffer as the cpu backend allocates one.
template <typename T>
using PoolVector = std::vector<T, LazyZeroAllocator<T>>;

using bench::CpuNow;
using bench::Median;
using bench::Now;

// Fills x with uniform values in [-1, 1) from a per-thread xorshift (fast for GiB buffers).
template <typename Vec>
void Fill(Vec& x, uint64_t seed, int threads) {
  ParallelFor(static_cast<int64_t>(x.size()), threads, 1 << 20, [&](int64_t b, int64_t e) {
    uint64_t s = seed ^ (0x9e3779b97f4a7c15ull * (b + 1));
    for (int64_t i = b; i < e; ++i) {
      s ^= s << 13;
      s ^= s >> 7;
      s ^= s << 17;
      x[i] = static_cast<float>(static_cast<int64_t>(s >> 40) - (int64_t{1} << 23)) * (1.0f / (1 << 23));
    }
  });
}

// Reads every byte of the buffers once (XOR of 64-bit words on `threads` threads): GB/s.
// Buffers as (start, bytes).
double ReadBandwidth(const std::vector<std::pair<const void*, size_t>>& bufs, int threads,
                     int reps) {
  std::vector<double> t;
  uint64_t sink = 0;
  double bytes = 0;
  for (const auto& b : bufs) bytes += b.second;
  for (int r = 0; r < reps; ++r) {
    const double t0 = Now();
    for (const auto& b : bufs) {
      const uint64_t* w = static_cast<const uint64_t*>(b.first);
      const int64_t n = static_cast<int64_t>(b.second / 8);
      std::vector<uint64_t> part(std::max(1, threads <= 0 ? DefaultCpuThreads() : threads) * 8, 0);
      std::atomic<int> slot{0};
      ParallelFor(n, threads, 1 << 16, [&](int64_t lo, int64_t hi) {
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        int64_t i = lo;
        for (; i + 4 <= hi; i += 4) {
          a0 ^= w[i];
          a1 ^= w[i + 1];
          a2 ^= w[i + 2];
          a3 ^= w[i + 3];
        }
        for (; i < hi; ++i) a0 ^= w[i];
        part[slot.fetch_add(1) % part.size()] ^= a0 ^ a1 ^ a2 ^ a3;
      });
      for (uint64_t p : part) sink ^= p;
    }
    t.push_back(Now() - t0);
  }
  if (sink == 42) std::printf(" ");
  return bytes / Median(t) / 1e9;
}

struct Layer {
  bench::LayerShape sh;
  int batch, len, stride;
  PoolVector<float> k, v;          // fp32 K and V (freed with bf16, once k16 / v16 hold them)
  PoolVector<uint16_t> k16, v16;   // bfloat16 K and V (bf16 only)
  bool bf16;
  std::vector<float> q, out;
  std::vector<int32_t> page_table, kv_lens, query_start;
  bool shared_kv;
  KvLayout layout;

  Layer(bench::LayerShape sh_, int batch_, int len_, bool share, int threads, KvLayout layout_,
        bool huge, bool bf16_)
      : sh(sh_), batch(batch_), len(len_), stride((len_ + kPage - 1) / kPage),
        k(LazyZeroAllocator<float>(huge)), v(LazyZeroAllocator<float>(huge)),
        k16(LazyZeroAllocator<uint16_t>(huge)), v16(LazyZeroAllocator<uint16_t>(huge)),
        bf16(bf16_), shared_kv(share), layout(layout_) {
    const int distinct = share ? 1 : batch;
    const int64_t pages = int64_t{stride} * distinct;
    k.resize(pages * kPage * sh.kv_heads * sh.head_dim);
    v.resize(k.size());
    q.resize(static_cast<size_t>(batch) * sh.q_heads * sh.head_dim);
    out.resize(q.size());
    Fill(k, 1, threads);
    Fill(v, 2, threads);
    Fill(q, 3, threads);
    if (bf16) {
      k16.resize(k.size());
      v16.resize(v.size());
      ParallelFor(static_cast<int64_t>(k.size()), threads, 1 << 16, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          k16[i] = FloatToBf16(k[i]);
          v16[i] = FloatToBf16(v[i]);
        }
      });
      k = PoolVector<float>(LazyZeroAllocator<float>(huge));
      v = PoolVector<float>(LazyZeroAllocator<float>(huge));
    }
    std::vector<int32_t> ids(pages);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937(7));
    for (int s = 0; s < batch; ++s) {
      const int base = share ? 0 : s * stride;
      page_table.insert(page_table.end(), ids.begin() + base, ids.begin() + base + stride);
    }
    kv_lens.assign(batch, len);
    for (int s = 0; s <= batch; ++s) query_start.push_back(s);
  }

  PagedAttentionParams<float> Params(const SparseAttentionIndex* sparse) {
    PagedAttentionParams<float> p;
    p.q = q.data();
    p.k_cache = k.data();
    p.v_cache = v.data();
    p.out = out.data();
    p.page_table = page_table.data();
    p.kv_lens = kv_lens.data();
    p.query_start = query_start.data();
    p.page_table_stride = stride;
    p.num_seqs = batch;
    p.num_q_heads = sh.q_heads;
    p.num_kv_heads = sh.kv_heads;
    p.head_dim = sh.head_dim;
    p.page_size = kPage;
    p.scale = 1.0f / std::sqrt(static_cast<float>(sh.head_dim));
    p.sparse = sparse;
    p.kv_layout = layout;
    return p;
  }

  PagedKvCache Kv() const {
    if (bf16) return {k16.data(), v16.data(), KvDtype::kBfloat16};
    return {k.data(), v.data(), KvDtype::kFloat32};
  }
  int64_t KvElements() const { return static_cast<int64_t>(bf16 ? k16.size() : k.size()); }
};

// One DoubleSparsity variant's label cache and selection over a Layer.
struct DsVariant {
  const char* name;
  DoubleSparsityShape shape;
  std::vector<int32_t> channels;
  PoolVector<uint8_t> labels;
  DsSelection sel;

  DsVariant(const char* name_, Layer& layer, int r, bool per_kv, int threads, bool huge)
      : name(name_), labels(LazyZeroAllocator<uint8_t>(huge)) {
    const bench::LayerShape& sh = layer.sh;
    shape = {sh.q_heads, sh.kv_heads, sh.head_dim, kPage, r, DsLabelFormat::kF16, per_kv, per_kv};
    std::mt19937 rng(11);
    for (int h = 0; h < DsLabelHeads(shape); ++h) {
      std::vector<int32_t> perm(sh.head_dim);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      channels.insert(channels.end(), perm.begin(), perm.begin() + r);
    }
    const int64_t pages = layer.KvElements() / (kPage * sh.kv_heads * sh.head_dim);
    labels.resize(pages * DsLabelPageBytes(shape));
    // Every cached token's labels, read from the cache (as a prefill's appends would write them).
    const int distinct = layer.shared_kv ? 1 : layer.batch;
    std::vector<int32_t> qs(distinct + 1);
    for (int s = 0; s <= distinct; ++s) qs[s] = s * layer.len;
    DsAppendParams a;
    a.k_cache = layer.bf16 ? nullptr : layer.k.data();
    a.k_cache_bf16 = layer.bf16 ? layer.k16.data() : nullptr;
    a.kv_layout = layer.layout;
    a.page_table = layer.page_table.data();
    a.page_table_stride = layer.stride;
    a.kv_lens = layer.kv_lens.data();
    a.query_start = qs.data();
    a.num_seqs = distinct;
    a.channels = channels.data();
    a.labels = labels.data();
    DsWriteLabels(shape, a, threads);
  }

  DsSelectParams Select(Layer& layer, int budget) const {
    DsSelectParams p;
    p.q = layer.q.data();
    p.page_table = layer.page_table.data();
    p.page_table_stride = layer.stride;
    p.kv_lens = layer.kv_lens.data();
    p.num_seqs = layer.batch;
    p.channels = channels.data();
    p.labels = labels.data();
    p.token_budget = budget;
    return p;
  }
};

void Run(const Flags& f, int len, int batch) {
  const bench::LayerShape& sh = f.shape;
  const int elem = f.bf16 ? 2 : 4;
  const double kv_gib = 2.0 * batch * len * sh.kv_heads * sh.head_dim * elem / (1 << 30);
  const bool share = kv_gib > f.share_kv_above_gib;
  Layer layer(sh, batch, len, share, f.threads, f.layout, f.huge_pages, f.bf16);
  DsVariant perhead("ds_perhead", layer, f.channels, false, f.threads, f.huge_pages);
  DsVariant shared("ds_shared", layer, f.channels, true, f.threads, f.huge_pages);
  const int budget = len / f.fraction;
  const size_t kv_half_bytes = layer.KvElements() * elem;  // K (or V) bytes
  const PagedKvCache kv = layer.Kv();
  const double bw = ReadBandwidth({{kv.k, kv_half_bytes}, {kv.v, kv_half_bytes}}, f.threads, 3);
  std::vector<double> dense_t, dense_c, row_att_t, row_att_c, grp_att_c;
  std::vector<std::vector<double>> sel_t(2), att_t(2), tot_c(2);
  DsVariant* vars[2] = {&perhead, &shared};
  for (int r = 0; r < f.reps + 1; ++r) {  // the first round warms up
    double t0 = Now(), c0 = CpuNow();
    PagedAttentionCpu(layer.Params(nullptr), layer.Kv(), f.threads);
    if (r > 0) {
      dense_t.push_back(Now() - t0);
      dense_c.push_back(CpuNow() - c0);
    }
    for (int i = 0; i < 2; ++i) {
      t0 = Now();
      c0 = CpuNow();
      DsSelectCpu(vars[i]->shape, vars[i]->Select(layer, budget), vars[i]->sel, f.threads);
      const double t1 = Now();
      const double c1 = CpuNow();
      const SparseAttentionIndex index = vars[i]->sel.Index(kPage);
      PagedAttentionCpu(layer.Params(&index), layer.Kv(), f.threads);
      const double t2 = Now(), c2 = CpuNow();
      if (r > 0) {
        sel_t[i].push_back(t1 - t0);
        att_t[i].push_back(t2 - t1);
        tot_c[i].push_back(c2 - c0);
        if (i == 1) grp_att_c.push_back(c2 - c1);
      }
      if (i == 1) {  // the shared selection again, one work item per query head
        const double t3 = Now(), c3 = CpuNow();
        PagedAttentionCpu(layer.Params(&index), layer.Kv(), f.threads,
                          {.group_shared_rows = false});
        if (r > 0) {
          row_att_t.push_back(Now() - t3);
          row_att_c.push_back(CpuNow() - c3);
        }
      }
    }
  }
  const double dense_ms = Median(dense_t) * 1e3, dense_cpu = Median(dense_c) * 1e3;
  const double kv_bytes = 2.0 * batch * len * sh.kv_heads * sh.head_dim * elem;
  std::printf("| %dK | %d | %s | dense | %.2f | - | - | %.1f | %.1f GB/s (%.0f%% of read) | 1.00x | 1.00x |\n",
              len / 1024, batch, share ? "shared" : "own", dense_ms, dense_cpu,
              kv_bytes / (dense_ms * 1e-3) / 1e9, 100.0 * kv_bytes / (dense_ms * 1e-3) / 1e9 / bw);
  for (int i = 0; i < 2; ++i) {
    std::vector<double> sum(sel_t[i].size());
    for (size_t j = 0; j < sum.size(); ++j) sum[j] = sel_t[i][j] + att_t[i][j];
    const double total = Median(sum) * 1e3, cpu = Median(tot_c[i]) * 1e3;
    std::printf("| %dK | %d | %s | %s | %.2f | %.2f | %.2f | %.1f | labels read %.0f MB | %.2fx | %.2fx |\n",
                len / 1024, batch, share ? "shared" : "own", vars[i]->name, total,
                Median(sel_t[i]) * 1e3, Median(att_t[i]) * 1e3, cpu,
                static_cast<double>(vars[i]->labels.size()) * (share ? batch : 1) / 1e6,
                dense_ms / total, dense_cpu / cpu);
  }
  {  // ds_shared's selection attended per row: step = its selection + the per-row attention
    std::vector<double> sum(sel_t[1].size());
    for (size_t j = 0; j < sum.size(); ++j) sum[j] = sel_t[1][j] + row_att_t[j];
    const double total = Median(sum) * 1e3, att = Median(row_att_t) * 1e3;
    const double att_cpu = Median(row_att_c) * 1e3, grp_cpu = Median(grp_att_c) * 1e3;
    std::printf("| %dK | %d | %s | ds_shared_per_row | %.2f | %.2f | %.2f | attend %.1f | "
                "grouped attend %.2fx faster wall, %.2fx CPU | %.2fx | - |\n",
                len / 1024, batch, share ? "shared" : "own", total, Median(sel_t[1]) * 1e3, att,
                att_cpu, att / (Median(att_t[1]) * 1e3), att_cpu / grp_cpu, dense_ms / total);
  }
  std::printf("|  |  |  | read bandwidth (XOR over K and V) | %.1f GB/s |  |  |  |  |  |  |\n", bw);
  std::fflush(stdout);
}

}  // namespace
}  // namespace sieve::kernels

int main(int argc, char** argv) {
  using sieve::kernels::Flags;
  Flags f;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--contexts") f.contexts = sieve::bench::ParseIntList(argv[i + 1]);
    else if (a == "--batches") f.batches = sieve::bench::ParseIntList(argv[i + 1]);
    else if (a == "--channels") f.channels = std::atoi(argv[i + 1]);
    else if (a == "--fraction") f.fraction = std::atoi(argv[i + 1]);
    else if (a == "--reps") f.reps = std::atoi(argv[i + 1]);
    else if (a == "--threads") f.threads = std::atoi(argv[i + 1]);
    else if (a == "--share-kv-above-gib") f.share_kv_above_gib = std::atof(argv[i + 1]);
    else if (a == "--huge-pages") f.huge_pages = std::atoi(argv[i + 1]) != 0;
    else if (a == "--kv" && std::string(argv[i + 1]) == "f32") f.bf16 = false;
    else if (a == "--kv" && std::string(argv[i + 1]) == "bf16") f.bf16 = true;
    else if (a == "--kv-layout" && std::string(argv[i + 1]) == "head") f.layout = sieve::kernels::KvLayout::kHeadMajor;
    else if (a == "--kv-layout" && std::string(argv[i + 1]) == "token") f.layout = sieve::kernels::KvLayout::kTokenMajor;
    else if (a == "--shape" && std::string(argv[i + 1]) == "llama8b") f.shape = sieve::bench::kLlama31_8B;
    else if (a == "--shape" && std::string(argv[i + 1]) == "embedded") f.shape = sieve::bench::kEmbedded;
    else if (a == "--shape") {
      std::fprintf(stderr, "ds_decode_bench: --shape must be llama8b or embedded, got '%s'\n",
                   argv[i + 1]);
      return 2;
    } else {
      std::fprintf(stderr, "ds_decode_bench: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  std::printf("ds_decode_bench: %d q heads, %d KV heads, d %d, page %d, %s %s-major KV, %d of %d channels "
              "(fp16 labels), budget L/%d, %d threads, target %s, median of %d, pools %s\n\n",
              f.shape.q_heads, f.shape.kv_heads, f.shape.head_dim,
              sieve::kernels::kPage, f.bf16 ? "bfloat16" : "fp32",
              f.layout == sieve::kernels::KvLayout::kHeadMajor ? "head" : "token", f.channels, f.shape.head_dim, f.fraction,
              f.threads > 0 ? f.threads : sieve::kernels::DefaultCpuThreads(),
              sieve::kernels::PagedAttentionCpuTarget(), f.reps,
              f.huge_pages ? "huge-page advised" : "not huge-page advised");
  std::printf("| context | batch | KV pages | variant | step ms (wall) | select ms | attend ms | "
              "step CPU ms (all threads) | note | speed-up (wall) | speed-up (CPU) |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (int len : f.contexts) {
    for (int batch : f.batches) sieve::kernels::Run(f, len, batch);
  }
  return 0;
}
