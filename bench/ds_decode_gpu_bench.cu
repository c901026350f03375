// DoubleSparsity decode attention on the GPU against the dense decode kernel, measured in the
// same run.
//
// Shapes: one Llama-3.1-8B attention layer (32 query heads, 8 KV heads, head dim 128, bf16), page
// size 16, contexts 32K and 128K, batch 1 and 8; 16 of 128 outlier channels, token budget L / 16
// (the paper's "1/16 token and channel sparsity"). Inputs are seeded random bf16 on shuffled page
// ids; the labels are written by DsWriteLabelsGpu for every token once before timing. Timed
// (median of --iters samples, each a burst of 10 back-to-back runs timed with events, / 10):
//   dense     PagedDecodeRun over the whole context
//   select    DsSelectGpu alone (scores + top-k + slots), fp16 labels per query head
//   ds        DsSelectGpu + PagedDecodeTokenRun, fp16 labels and selection per query head (the
//             reference semantics: each query head reads its own tokens)
//   ds_kv     labels per KV head and one token set per KV head (shared_selection): the group
//             reads its tokens once
//   ds_kv4    ds_kv with 4-bit labels
// and the speedups dense / ds, dense / ds_kv and dense / ds_kv4. Random keys carry no structure,
// so the selection is arbitrary; its cost does not depend on which tokens win.
//
//   usage: ds_decode_gpu_bench [--iters N] [--seed N] [--contexts N,N] [--batches N,N]
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
#include "kernels/sparse/double_sparsity.h"
#include "kernels/sparse/double_sparsity_cuda.h"

namespace {

using namespace sieve::kernels;  // NOLINT: a benchmark's one translation unit
using sieve::bench::FillRandom;

constexpr int kHq = 32, kHkv = 8, kD = 128, kPage = 16, kChannels = 16, kBurst = 10;

// Bursts of kBurst calls after 3 warm-up calls (bench/bench_cuda.cuh).
template <typename Fn>
double MedianMs(int iters, Fn run) {
  return sieve::bench::MedianMs(iters, run, kBurst, 3);
}

// The device state of one run of one DoubleSparsity variant: labels, channels, selection
// outputs and workspaces; times select + token decode (and select alone when asked).
struct Variant {
  DoubleSparsityShape shape;
  double ds_ms = 0, select_ms = 0;
};

void RunVariant(Variant& var, const PagedAttentionParams<__nv_bfloat16>& p, int64_t* d_slots,
                int64_t num_tokens, int num_pages, int pages_per_seq, int budget, int iters,
                uint64_t seed, int num_sms, bool time_select) {
  const DoubleSparsityShape& s = var.shape;
  const int label_heads = DsLabelHeads(s);
  std::vector<int32_t> channels;
  std::mt19937_64 rng(seed);
  for (int lh = 0; lh < label_heads; ++lh) {
    std::vector<int32_t> perm(kD);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    channels.insert(channels.end(), perm.begin(), perm.begin() + kChannels);
  }
  int32_t* d_channels;
  uint8_t* labels;
  const size_t label_bytes = static_cast<size_t>(num_pages) * DsLabelPageBytes(s);
  CHECK_CUDA(cudaMalloc(&d_channels, channels.size() * 4));
  CHECK_CUDA(cudaMemcpy(d_channels, channels.data(), channels.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMalloc(&labels, label_bytes));
  DsLabelsUpdateGpu u;
  u.shape = s;
  u.k_cache = p.k_cache;
  u.labels = labels;
  u.channels = d_channels;
  // In chunks of at most 2^30 tokens (num_tokens is an int32).
  for (int64_t first = 0; first < num_tokens; first += int64_t{1} << 30) {
    u.slots = d_slots + first;
    u.num_tokens = static_cast<int32_t>(std::min<int64_t>(num_tokens - first, int64_t{1} << 30));
    CHECK_CUDA(DsWriteLabelsGpu(u, nullptr));
  }
  DsSelectGpuParams sp;
  sp.shape = s;
  sp.q = p.q;
  sp.labels = labels;
  sp.channels = d_channels;
  sp.page_table = p.page_table;
  sp.kv_lens = p.kv_lens;
  sp.page_table_stride = pages_per_seq;
  sp.num_seqs = p.num_seqs;
  sp.token_budget = budget;
  const size_t rows = static_cast<size_t>(p.num_seqs) * DsSelectRowsPerSeq(sp);
  const size_t ws_bytes = DsSelectWorkspaceBytes(sp);
  int32_t *positions, *slots, *counts;
  void* ws;
  CHECK_CUDA(cudaMalloc(&positions, rows * budget * 4));
  CHECK_CUDA(cudaMalloc(&slots, rows * budget * 4));
  CHECK_CUDA(cudaMalloc(&counts, rows * 4));
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
  const DsSelectGpuOutput o{positions, slots, counts};
  const int heads_per_block = s.shared_selection ? kHq / kHkv : 1;
  PagedDecodeShape ss{p.num_seqs, kHq, kHkv, kD, budget, heads_per_block};
  const PagedDecodePlan plan = Plan(ss, num_sms);
  void* dws = nullptr;
  if (plan.workspace_bytes) CHECK_CUDA(cudaMalloc(&dws, plan.workspace_bytes));
  const PagedDecodeTokenLists lists{slots, counts, budget, heads_per_block};
  if (time_select) {
    var.select_ms = MedianMs(iters, [&] { CHECK_CUDA(DsSelectGpu(sp, o, ws, ws_bytes, nullptr)); });
  }
  var.ds_ms = MedianMs(iters, [&] {
    CHECK_CUDA(DsSelectGpu(sp, o, ws, ws_bytes, nullptr));
    CHECK_CUDA(PagedDecodeTokenRun(p, plan, lists, dws, nullptr));
  });
  CHECK_CUDA(cudaDeviceSynchronize());
  for (void* ptr : {static_cast<void*>(d_channels), static_cast<void*>(labels),
                    static_cast<void*>(positions), static_cast<void*>(slots),
                    static_cast<void*>(counts), ws, dws}) {
    if (ptr) CHECK_CUDA(cudaFree(ptr));
  }
}

void RunShape(int context, int batch, int iters, uint64_t seed, int num_sms) {
  const int pages_per_seq = context / kPage;
  const int num_pages = pages_per_seq * batch;
  const int budget = context / 16;
  const size_t kv_elems = static_cast<size_t>(num_pages) * kPage * kHkv * kD;
  __nv_bfloat16 *k, *v, *q, *out;
  CHECK_CUDA(cudaMalloc(&k, kv_elems * 2));
  CHECK_CUDA(cudaMalloc(&v, kv_elems * 2));
  CHECK_CUDA(cudaMalloc(&q, static_cast<size_t>(batch) * kHq * kD * 2));
  CHECK_CUDA(cudaMalloc(&out, static_cast<size_t>(batch) * kHq * kD * 2));
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

  Variant per_q, per_kv, per_kv4;
  per_q.shape = DoubleSparsityShape{kHq, kHkv, kD, kPage, kChannels, DsLabelFormat::kF16, false,
                                    false};
  per_kv.shape = DoubleSparsityShape{kHq, kHkv, kD, kPage, kChannels, DsLabelFormat::kF16, true,
                                     true};
  per_kv4.shape = per_kv.shape;
  per_kv4.shape.format = DsLabelFormat::kInt4;
  const int64_t tokens = static_cast<int64_t>(slots.size());
  RunVariant(per_q, p, d_slots, tokens, num_pages, pages_per_seq, budget, iters, seed + 3, num_sms,
             true);
  RunVariant(per_kv, p, d_slots, tokens, num_pages, pages_per_seq, budget, iters, seed + 4,
             num_sms, false);
  RunVariant(per_kv4, p, d_slots, tokens, num_pages, pages_per_seq, budget, iters, seed + 5,
             num_sms, false);
  const double kv_gb = 2.0 * kv_elems * 2 / 1e9;
  std::printf("%7d %5d %6d %10.1f %9.1f %9.1f %9.1f %9.1f %7.2fx %7.2fx %7.2fx %9.2f\n", context,
              batch, budget, dense_ms * 1e3, per_q.select_ms * 1e3, per_q.ds_ms * 1e3,
              per_kv.ds_ms * 1e3, per_kv4.ds_ms * 1e3, dense_ms / per_q.ds_ms,
              dense_ms / per_kv.ds_ms, dense_ms / per_kv4.ds_ms,
              kv_gb / (dense_ms * 1e-3) / 1e3);
  for (void* ptr : {static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(q),
                    static_cast<void*>(out), static_cast<void*>(d_table),
                    static_cast<void*>(d_lens), static_cast<void*>(d_slots), dense_ws}) {
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
              "DoubleSparsity %d of %d channels, budget L/16\n", prop.name, sms, kChannels, kD);
  std::printf("%7s %5s %6s %10s %9s %9s %9s %9s %8s %8s %8s %9s\n", "context", "batch", "budget",
              "dense_us", "select_us", "ds_us", "ds_kv_us", "ds_kv4_us", "spd", "spd_kv",
              "spd_kv4", "dense_TB/s");
  for (int context : contexts) {
    for (int batch : batches) RunShape(context, batch, iters, seed, sms);
  }
  return 0;
}
