// Work items, split-KV groups and per-thread scratch of the CPU attention kernel
// (paged_attention_cpu.cc; the kernel itself is described in paged_attention_cpu.h): what is
// compiled once, outside Highway's per-target code. BuildWorkItems is in
// paged_attention_cpu_items.cc; the per-target code (the decode row path and the driver in
// paged_attention_cpu.cc, the prefill tile path in paged_attention_cpu_tile-inl.h) includes this.
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_ITEMS_H_
#define SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_ITEMS_H_

#include <cstdint>
#include <vector>

#include "kernels/attention/paged_attention.h"

namespace sieve::kernels {
namespace cpu_attention {

// Key positions per tile: a tile's K and V rows (64 x head_dim fp32 each) stay in L1/L2 while
// every query row of the work item reads them.
constexpr int kKeyTile = 64;
// Keys per block of a decode item over every KV head (AttendRows): each block's rows are read for
// all heads before the next block's. 4, 8 and 16 measured alike (58-61 ms for the 8B layer at
// 128K on the 2-core VM, 2026-12-06), 64 (head by head over the tile) 88-105 ms.
constexpr int kDecodeKeyBlock = 4;
// Query rows (query x head) per dense work item: rows share every K/V tile they load.
// 128: each K/V tile (gathered, transposed, prefetched once per item) serves twice the rows of
// 64, 1.06-1.25x on the prefill shapes of bench/cpu_attention_bench (2026-12-05).
constexpr int kRowsPerItem = 128;
// From this many rows on, an item takes the prefill tile path (AttendRowsT: its rows transposed
// once, each tile's K and V packed, register-blocked scores and PV over vectors of rows); below
// it (decode) per-key dot products with horizontal sums. Counted per sequence step (its
// queries x the group's heads), not per work item: the two paths sum a dot product in different
// orders, and every item of a step must take the same one, so that a sparse plan listing every
// key gives dense attention's result bit for bit however the items cut the rows.
constexpr int kTransposeRows = 8;
// Split-KV: a work item of at most kSplitMaxRows query rows (decode, very short chunks) that reads
// more than kSplitKeys keys is cut along its key list into parts of kSplitKeys keys, each run by
// whichever thread takes it, and the parts' partial softmax states are merged afterwards
// (log-sum-exp). The cut depends only on the item, never on the thread count or the batch, so
// results stay bitwise reproducible. 512 keys: a part reads 512 K and V rows (256 KB at d=128),
// enough to amortise the item overhead, and a 128K-token sequence gives 256 parts per KV head.
// Rows, not queries: a full dense prefill item (kRowsPerItem rows, 32 queries of a group of 4)
// is never split; its parts would only add partial states to write and merge (256 MB of them
// for a 512-token chunk over 16K keys on the Llama-3.1-8B shape).
constexpr int kSplitMaxRows = 16;
constexpr int kSplitKeys = 512;
static_assert(kSplitKeys % kKeyTile == 0, "parts are whole tiles");

// One unit of work: the queries [q_begin, q_end) of sequence `seq` (indices within the
// sequence) with all heads of KV head `kv_head` (dense, or sparse over the row `sparse_row` that
// all of them share), or with query head `head` over sparse row `sparse_row`, or (kv_head -1,
// dense decode: one query, fewer than kTransposeRows heads per KV head) with every head: a
// key's K and V rows of all KV heads lie side by side in the pool (4 KiB at fp32, 8 heads x
// 128), and taking the heads in turn per tile reads them together (head by head, each
// 512-byte row sat on its own 4 KiB page and every head's sweep refetched the layer from
// memory).
struct WorkItem {
  int32_t seq = 0;
  int32_t kv_head = 0;
  int32_t head = -1;           // the query head, or -1: all heads of the group
  int32_t q_begin = 0, q_end = 0;
  int64_t sparse_row = -1;
  int64_t cost = 0;            // query rows x keys, for ordering largest first
  // Split-KV part: the item reads entries [key_begin, key_end) of its key list and leaves its
  // rows' partial state (unnormalised o, running max m, sum l) at partial rows [partial_row,
  // partial_row + rows) for MergeParts; key_end < 0: the whole list, written to out directly.
  int32_t key_begin = 0, key_end = -1;
  int64_t partial_row = -1;
};

// A split item: its parts are consecutive in the partial buffer, `rows` rows each.
struct SplitGroup {
  WorkItem item;  // the unsplit item (key_end < 0)
  int32_t parts = 0;
  int32_t rows = 0;
  int64_t partial_row = 0;  // the first part's first row
};

inline int QueryLen(const PagedAttentionParams<float>& p, int s) {
  return p.query_start[s + 1] - p.query_start[s];
}

// The last key position query j of sequence s may read.
inline int LastPos(const PagedAttentionParams<float>& p, int s, int j) {
  return p.kv_lens[s] - QueryLen(p, s) + j;
}

// Every work item of the call, largest first, with long short-query items cut into split-KV
// parts (described in `groups`; partial rows counted in *partial_rows). group_shared_rows:
// items over all query heads of a KV head whose sparse rows list the same keys, cut into
// dense items' 128 / group queries.
// (paged_attention_cpu_items.cc)
std::vector<WorkItem> BuildWorkItems(const PagedAttentionParams<float>& p, bool group_shared_rows,
                                     std::vector<SplitGroup>& groups, int64_t* partial_rows);

// Per-thread buffers, reused across the thread's work items; TKV is the KV cache's element type.
template <typename TKV>
struct Scratch {
  std::vector<const float*> q;   // [rows] query vectors
  std::vector<float*> out;       // [rows] output vectors
  std::vector<int> last;         // [rows] last key position each row may read
  std::vector<float> o;          // [rows, head_dim] unnormalised outputs
  std::vector<float> m, l;       // [rows] running max score and sum of exponentials
  std::vector<float> s;          // [rows, kKeyTile + lanes] scores, then probabilities
  std::vector<int> active;       // rows that read at least one key of the tile, by KV head
  std::vector<int> head_start;   // [heads + 1] each KV head's first entry of active
  std::vector<int> head_kept;    // [heads] the end of each head's rows kept by the softmax
  std::vector<int> keys;         // the item's key positions
  std::vector<const TKV*> k, v;  // [heads, kKeyTile] the tile's K and V rows per KV head
  std::vector<int64_t> offs;     // the item's keys' row offsets into the K and V caches
  bool transpose = false;        // the item's step takes the prefill tile path (AttendRowsT)
  bool prefetch = false;         // prefetch each next tile's K/V rows (see AttendRows)
  bool rowwise_pv = false;       // PV key by key (head-major pages, see AttendRows)
  // The prefill tile path, rows padded to rp (a multiple of the lane count):
  std::vector<float> qt, ot;     // [head_dim, rp] the queries and unnormalised outputs, transposed
  std::vector<float> st;         // [kKeyTile, rp] a tile's scores, then probabilities, transposed
  std::vector<float> kp, vp;     // [kKeyTile, head_dim] the tile's K and V rows, packed as fp32
  std::vector<float> corr;       // [rp] the tile's rescale of each row's output
  std::vector<int> lastp;        // [rp] last readable position per row (padding: the last row's)
  std::vector<int> vlo, vhi, jv; // per row vector: least and largest last position, keys to read
  std::vector<float*> dst;       // [rows] where the rows' results go
};

// Element offsets into the K and V caches of KV head kv_head's rows at positions pos[0, n):
// consecutive positions within a page step by a row, so only page changes divide.
inline void KeyOffsets(const PagedAttentionParams<float>& p, const int32_t* pages, int kv_head,
                       const int* pos, int n, int64_t* offs) {
  const int ps = p.page_size;
  const int64_t row = KvStrides(p.kv_layout, ps, p.num_kv_heads, p.head_dim).slot;
  int prev = -2, in_page = 0;
  int64_t off = 0;
  for (int j = 0; j < n; ++j) {
    const int t = pos[j];
    if (t == prev + 1 && in_page + 1 < ps) {
      ++in_page;
      off += row;
    } else {
      in_page = t % ps;
      off = KvRowOffset(p.kv_layout, pages[t / ps], in_page, kv_head, ps, p.num_kv_heads,
                        p.head_dim);
    }
    offs[j] = off;
    prev = t;
  }
}

// The partial softmax states of split-KV parts: per partial row, o [head_dim], m and l.
struct Partials {
  std::vector<float> o, m, l;
};

}  // namespace cpu_attention
}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_ITEMS_H_
