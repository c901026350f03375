// Quest decode attention on the GPU against the dense decode kernel, measured in the same run.
//
// Shapes: one Llama-3.1-8B attention layer (32 query heads, 8 KV heads, head dim 128, bf16), page
// size 16, contexts 32K and 128K, batch 1 and 8, Quest budget 4096 tokens (256 pages including
// the last). Inputs are seeded random bf16 on shuffled page ids; the page bounds are built by
// QuestUpdateBoundsGpu over every token once before timing. Timed (median of --iters samples,
// each a burst of 10 back-to-back runs timed with events, divided by 10):
//   dense        PagedDecodeRun over the whole context
//   select       QuestSelectGpu alone (scores + top-k + compacted tables), per query head
//   quest        QuestSelectGpu + PagedDecodeSparseRun, per query head (the default)
//   quest_kv     the same with one page set per KV head (per_kv_head)
// and the speedup dense / quest. Random keys carry no structure, so the selection is arbitrary;
// its cost does not depend on which pages win.
//
//   usage: quest_decode_gpu_bench [--iters N] [--seed N] [--contexts N,N] [--batches N,N]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "bench/bench_cuda.cuh"
#include "kernels/attention/paged_decode.h"
#include "kernels/sparse/quest_cuda.h"

namespace {

using namespace sieve::kernels;  // NOLINT: a benchmark's one translation unit
using sieve::bench::FillRandom;

constexpr int kHq = 32, kHkv = 8, kD = 128, kPage = 16, kBudget = 4096, kBurst = 10;

// Bursts of kBurst calls after 3 warm-up calls (bench/bench_cuda.cuh).
template <typename Fn>
double MedianMs(int iters, Fn run) {
  return sieve::bench::MedianMs(iters, run, kBurst, 3);
}

void RunShape(int context, int batch, int iters, uint64_t seed, int num_sms) {
  const int pages_per_seq = context / kPage;
  const int num_pages = pages_per_seq * batch;
  const size_t kv_elems = static_cast<size_t>(num_pages) * kPage * kHkv * kD;
  __nv_bfloat16 *k, *v, *q, *out, *bounds;
  CHECK_CUDA(cudaMalloc(&k, kv_elems * 2));
  CHECK_CUDA(cudaMalloc(&v, kv_elems * 2));
  CHECK_CUDA(cudaMalloc(&q, static_cast<size_t>(batch) * kHq * kD * 2));
  CHECK_CUDA(cudaMalloc(&out, static_cast<size_t>(batch) * kHq * kD * 2));
  CHECK_CUDA(cudaMalloc(&bounds, static_cast<size_t>(num_pages) * kHkv * 2 * kD * 2));
  FillRandom<<<1024, 256>>>(k, kv_elems, seed);
  FillRandom<<<1024, 256>>>(v, kv_elems, seed + 1);
  FillRandom<<<64, 256>>>(q, static_cast<size_t>(batch) * kHq * kD, seed + 2);
  std::vector<int32_t> ids(num_pages);
  std::iota(ids.begin(), ids.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> lens(batch, context);
  std::vector<int64_t> slots(static_cast<size_t>(num_pages) * kPage);
  for (int s = 0; s < batch; ++s) {
    for (int t = 0; t < context; ++t) {
      slots[static_cast<size_t>(s) * context + t] =
          int64_t{ids[s * pages_per_seq + t / kPage]} * kPage + t % kPage;
    }
  }
  int32_t *d_table, *d_lens;
  int64_t* d_slots;
  CHECK_CUDA(cudaMalloc(&d_table, ids.size() * 4));
  CHECK_CUDA(cudaMalloc(&d_lens, lens.size() * 4));
  CHECK_CUDA(cudaMalloc(&d_slots, slots.size() * 8));
  CHECK_CUDA(cudaMemcpy(d_table, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_lens, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_slots, slots.data(), slots.size() * 8, cudaMemcpyHostToDevice));
  QuestBoundsUpdateGpu u;
  u.k_cache = k;
  u.bounds = bounds;
  u.slots = d_slots;
  u.num_tokens = static_cast<int32_t>(slots.size());
  u.num_kv_heads = kHkv;
  u.head_dim = kD;
  u.page_size = kPage;
  CHECK_CUDA(QuestUpdateBoundsGpu(u, nullptr));

  PagedAttentionParams<__nv_bfloat16> p;
  p.q = q;
  p.k_cache = k;
  p.v_cache = v;
  p.out = out;
  p.page_table = d_table;
  p.kv_lens = d_lens;
  p.page_table_stride = pages_per_seq;
  p.num_seqs = batch;
  p.num_q_heads = kHq;
  p.num_kv_heads = kHkv;
  p.head_dim = kD;
  p.page_size = kPage;
  p.scale = 0.08838834764f;
  PagedDecodeShape ds{batch, kHq, kHkv, kD, context, 0};
  const PagedDecodePlan dense_plan = Plan(ds, num_sms);
  void* dense_ws = nullptr;
  if (dense_plan.workspace_bytes) CHECK_CUDA(cudaMalloc(&dense_ws, dense_plan.workspace_bytes));
  const double dense_ms = MedianMs(iters, [&] {
    CHECK_CUDA(PagedDecodeRun(p, dense_plan, dense_ws, nullptr));
  });

  double quest_ms[2] = {0, 0}, select_ms = 0;
  for (int per_kv = 0; per_kv < 2; ++per_kv) {
    QuestSelectGpuParams qs;
    qs.q = q;
    qs.bounds = bounds;
    qs.page_table = d_table;
    qs.kv_lens = d_lens;
    qs.page_table_stride = pages_per_seq;
    qs.num_seqs = batch;
    qs.num_q_heads = kHq;
    qs.num_kv_heads = kHkv;
    qs.head_dim = kD;
    qs.page_size = kPage;
    qs.page_budget = kBudget / kPage;
    qs.per_kv_head = per_kv != 0;
    const size_t rows = static_cast<size_t>(batch) * QuestSelectRowsPerSeq(qs);
    const size_t ws_bytes = QuestSelectWorkspaceBytes(qs);
    int32_t *sel, *tables, *sel_lens;
    void* ws;
    CHECK_CUDA(cudaMalloc(&sel, rows * qs.page_budget * 4));
    CHECK_CUDA(cudaMalloc(&tables, rows * qs.page_budget * 4));
    CHECK_CUDA(cudaMalloc(&sel_lens, rows * 4));
    CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
    const QuestSelectGpuOutput o{sel, nullptr, tables, sel_lens};
    PagedDecodeShape ss{batch, kHq, kHkv, kD, kBudget, per_kv ? kHq / kHkv : 1};
    const PagedDecodePlan sparse_plan = Plan(ss, num_sms);
    void* sparse_ws = nullptr;
    if (sparse_plan.workspace_bytes) CHECK_CUDA(cudaMalloc(&sparse_ws, sparse_plan.workspace_bytes));
    PagedDecodeTables t{tables, sel_lens, qs.page_budget, ss.heads_per_block};
    if (!per_kv) {
      select_ms = MedianMs(iters, [&] { CHECK_CUDA(QuestSelectGpu(qs, o, ws, ws_bytes, nullptr)); });
    }
    quest_ms[per_kv] = MedianMs(iters, [&] {
      CHECK_CUDA(QuestSelectGpu(qs, o, ws, ws_bytes, nullptr));
      CHECK_CUDA(PagedDecodeSparseRun(p, sparse_plan, t, sparse_ws, nullptr));
    });
    CHECK_CUDA(cudaFree(sel));
    CHECK_CUDA(cudaFree(tables));
    CHECK_CUDA(cudaFree(sel_lens));
    CHECK_CUDA(cudaFree(ws));
    if (sparse_ws) CHECK_CUDA(cudaFree(sparse_ws));
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  const double kv_gb = 2.0 * kv_elems * 2 / 1e9;
  std::printf("%7d %5d %10.1f %9.1f %10.1f %10.1f %8.2fx %8.2fx %9.2f\n", context, batch,
              dense_ms * 1e3, select_ms * 1e3, quest_ms[0] * 1e3, quest_ms[1] * 1e3,
              dense_ms / quest_ms[0], dense_ms / quest_ms[1], kv_gb / (dense_ms * 1e-3) / 1e3);
  for (void* ptr : {static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(q),
                    static_cast<void*>(out), static_cast<void*>(bounds),
                    static_cast<void*>(d_table), static_cast<void*>(d_lens),
                    static_cast<void*>(d_slots), dense_ws}) {
    if (ptr) CHECK_CUDA(cudaFree(ptr));
  }
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 20;
  uint64_t seed = 20261205;
  std::vector<int> contexts = {32768, 131072}, batches = {1, 8};
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--iters")) iters = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--seed")) seed = std::strtoull(argv[i + 1], nullptr, 10);
    if (!std::strcmp(argv[i], "--contexts")) contexts = sieve::bench::ParseInts(argv[i + 1]);
    if (!std::strcmp(argv[i], "--batches")) batches = sieve::bench::ParseInts(argv[i + 1]);
  }
  int dev = 0, sms = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %s, %d SMs; Llama-3.1-8B layer (32 q / 8 kv heads, d 128), page 16, "
              "Quest budget %d\n", prop.name, sms, kBudget);
  std::printf("%7s %5s %10s %9s %10s %10s %9s %9s %9s\n", "context", "batch", "dense_us",
              "select_us", "quest_us", "quest_kv_us", "speedup", "spd_kv", "dense_TB/s");
  for (int context : contexts) {
    for (int batch : batches) RunShape(context, batch, iters, seed, sms);
  }
  return 0;
}
