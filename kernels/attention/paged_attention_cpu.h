// The fast CPU attention kernel: tiled, online-softmax (flash-style) fp32 attention over the
// paged KV cache, the kernel CpuBackend::Attention serves with. Same parameter block, layout and
// semantics as PagedAttentionRef (paged_attention.h): causal, grouped-query, any number of
// queries per sequence, dense or block-sparse (key blocks + single columns; a query with no
// readable key gets zeros). paged_attention_cpu_test.cc checks it against the reference.
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_H_
#define SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_H_

#include "kernels/attention/paged_attention.h"
#include "kernels/cpu/half.h"

namespace sieve::kernels {

// Causal paged attention (dense, or restricted by p.sparse) in fp32 on `num_threads` host
// threads (0 = all). Work items are (sequence, KV head, query block); threads take them from a
// shared counter, largest causal ranges first (by powers of two, one KV head after another
// within each class, so that consecutive items read the same K/V rows from L3).
//   dense : one item holds a block of queries and all query heads of its KV head, so each K/V
//           row it reads is loaded once for the whole group; a sequence's decode step (one
//           query, fewer than 8 heads per KV head) is one item over every KV head, taking the
//           heads in turn per tile, so a key's rows of all heads (adjacent in the pool) are read
//           together;
//   sparse: one item is one sparse row (a query block of one query head) over its listed keys;
//           when every query head of a KV head lists the same keys in a query block (a
//           selection shared per KV head), one item holds them all, like a dense item.
// Split-KV: an item of at most 16 queries over more than 512 keys (decode, short chunks) is cut
// along its key list into parts of 512 keys that any thread may take, each leaving a partial
// (unnormalised output, max, sum) that a log-sum-exp merge combines, so one long sequence uses
// every core; the parts run by key range first, KV head second. The cut depends only on the
// item (not on threads or batch): results are bitwise reproducible and a sequence gets the same
// output alone or in a batch.
// Keys are processed in tiles of up to 64 positions with a running max and sum per query row;
// QK dot products, softmax exponentials and the PV accumulation are vectorised with Google
// Highway, dispatched at run time to the best instruction set of the host (AVX-512, AVX2, ...).
// Prefill and chunks (at least 8 query rows per sequence step) run with the rows transposed
// (vectors over 16 rows on AVX-512): K and V tiles packed once per item, register-blocked score
// and PV micro-kernels, the online softmax without horizontal sums; decode per row.
// Allocates per-thread scratch; reads only the listed pages; thread-safe for disjoint `out`.
void PagedAttentionCpu(const PagedAttentionParams<float>& p, int num_threads = 0);

// What PagedAttentionCpu may do beyond the parameter block; the defaults are what the backends run.
struct PagedAttentionCpuOptions {
  // Run the query heads of a KV head whose sparse rows list the same keys as one work item
  // (above). false: one item per sparse row, each reading the group's shared keys again; the
  // same result up to fp32 rounding, kept for A/B benchmarks (bench/quest_decode_bench.cc).
  bool group_shared_rows = true;
};
void PagedAttentionCpu(const PagedAttentionParams<float>& p, int num_threads,
                       const PagedAttentionCpuOptions& options);

// One layer's K and V pools in the layout of p.k_cache / p.v_cache, stored as `dtype` elements.
struct PagedKvCache {
  const void* k = nullptr;
  const void* v = nullptr;
  KvDtype dtype = KvDtype::kFloat32;
};

// PagedAttentionCpu over K/V caches of any KvDtype (p.k_cache and p.v_cache are ignored and may
// be null): the same kernel, instantiated per element type, widening each K and V vector to
// fp32 as it loads it (bfloat16: a shift; float16: F16C where the host has it), so scores,
// softmax and outputs are fp32 as above and a 16-bit cache reads half the bytes. The result
// equals the fp32 kernel run on the same caches widened to fp32, up to the order of the fp32
// sums (one code path: the same items, tiles and sums as the fp32 instantiation).
void PagedAttentionCpu(const PagedAttentionParams<float>& p, const PagedKvCache& kv,
                       int num_threads, const PagedAttentionCpuOptions& options = {});

// The instruction set PagedAttentionCpu runs with on this host (Highway's name: "AVX3", "AVX2",
// ...), for benchmark and log lines.
const char* PagedAttentionCpuTarget();

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_H_
