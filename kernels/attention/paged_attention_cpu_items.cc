// The work list of the CPU attention kernel (paged_attention_cpu_items.h): compiled once.
#include "kernels/attention/paged_attention_cpu_items.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sieve::kernels {
namespace cpu_attention {
namespace {

// Number of listed keys of sparse row r at positions <= last_pos.
int64_t SparseKeyCount(const SparseAttentionIndex& x, int64_t r, int last_pos) {
  int64_t n = 0;
  for (int32_t i = x.row_start[r]; i < x.row_start[r + 1]; ++i) {
    const int64_t first = int64_t{x.key_blocks[i]} * x.key_block;
    n += std::max<int64_t>(0, std::min<int64_t>(first + x.key_block, int64_t{last_pos} + 1) - first);
  }
  if (x.column_start != nullptr) {
    for (int32_t i = x.column_start[r]; i < x.column_start[r + 1]; ++i) n += x.columns[i] <= last_pos;
  }
  return n;
}

// True when sparse rows row .. row + group - 1 (the query heads of one KV head in one query
// block) list the same key blocks and columns, as a selection shared per KV head makes them.
bool GroupSharesKeys(const SparseAttentionIndex& x, int64_t row, int group) {
  auto same = [&](const int32_t* start, const int32_t* list) {
    const int32_t n = start[row + 1] - start[row];
    for (int g = 1; g < group; ++g) {
      if (start[row + g + 1] - start[row + g] != n ||
          !std::equal(list + start[row], list + start[row + 1], list + start[row + g])) {
        return false;
      }
    }
    return true;
  };
  return same(x.row_start, x.key_blocks) &&
         (x.column_start == nullptr || same(x.column_start, x.columns));
}

}  // namespace

std::vector<WorkItem> BuildWorkItems(const PagedAttentionParams<float>& p, bool group_shared_rows,
                                     std::vector<SplitGroup>& groups, int64_t* partial_rows) {
  std::vector<WorkItem> items;
  const int group = p.num_q_heads / p.num_kv_heads;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q_len = QueryLen(p, s);
    if (q_len <= 0) continue;
    if (p.sparse == nullptr) {
      if (q_len == 1 && group < kTransposeRows) {
        // Decode: one item over every KV head (kv_head -1), so that each key's K and V rows of
        // all heads, adjacent in the pool, are read together (AttendRows takes the heads in
        // turn per tile). Longer than 512 keys it splits into parts that every thread takes;
        // short chunks of a few queries keep one item per KV head (threads share them).
        const int64_t keys = std::max(0, LastPos(p, s, q_len - 1) + 1);
        items.push_back({s, -1, -1, 0, q_len, -1, int64_t{q_len} * p.num_q_heads * keys});
        continue;
      }
      const int block = std::max(1, kRowsPerItem / group);
      for (int b = 0; b < q_len; b += block) {
        const int e = std::min(q_len, b + block);
        for (int kvh = 0; kvh < p.num_kv_heads; ++kvh) {
          const int64_t keys = std::max(0, LastPos(p, s, e - 1) + 1);
          items.push_back({s, kvh, -1, b, e, -1, int64_t{e - b} * group * keys});
        }
      }
      continue;
    }
    const SparseAttentionIndex& x = *p.sparse;
    const int blocks = x.query_block_start[s + 1] - x.query_block_start[s];
    for (int b = 0; b < blocks; ++b) {
      const int qb = b * x.query_block, qe = std::min(q_len, qb + x.query_block);
      if (qb >= qe) continue;
      for (int h = 0; h < p.num_q_heads; ++h) {
        const int64_t row = (int64_t{x.query_block_start[s]} + b) * p.num_q_heads + h;
        const int64_t keys = SparseKeyCount(x, row, LastPos(p, s, qe - 1));
        if (group_shared_rows && group > 1 && h % group == 0 && GroupSharesKeys(x, row, group)) {
          // Items for the whole group (head -1), as dense items: each K/V row it reads is
          // loaded once for all of the group's query heads; at most kRowsPerItem rows each.
          // Where the block is a multiple of a dense item's queries (power-of-two groups), at
          // dense items' boundaries (so a plan listing every block splits as dense does and
          // equals it bit for bit); otherwise in equal pieces, so that no block leaves a sliver
          // of a few rows that split-KV would cut into parts (group 7: 18 + ... + 2 queries).
          const int sub = std::max(1, kRowsPerItem / group);
          const int pieces = (qe - qb + sub - 1) / sub;
          const bool aligned = x.query_block % sub == 0;
          for (int i = 0; i < pieces; ++i) {
            const int b0 = aligned ? qb + i * sub : qb + (qe - qb) * i / pieces;
            const int b1 = aligned ? std::min(qe, b0 + sub) : qb + (qe - qb) * (i + 1) / pieces;
            const int64_t sub_keys = SparseKeyCount(x, row, LastPos(p, s, b1 - 1));
            items.push_back({s, h / group, -1, b0, b1, row,
                             int64_t{b1 - b0} * group * std::max<int64_t>(1, sub_keys)});
          }
          h += group - 1;
          continue;
        }
        items.push_back({s, h / group, h, qb, qe, row, int64_t{qe - qb} * std::max<int64_t>(1, keys)});
      }
    }
  }
  // Split-KV: the item's key count is cost / queries / heads (cost counts query rows x keys).
  groups.clear();
  *partial_rows = 0;
  const size_t unsplit = items.size();
  for (size_t i = 0; i < unsplit; ++i) {
    WorkItem& w = items[i];
    const int queries = w.q_end - w.q_begin;
    const int heads = w.head >= 0 ? 1 : w.kv_head < 0 ? p.num_q_heads : group;
    const int64_t keys = w.cost / (int64_t{queries} * heads);
    // All-KV-head decode items split as their per-head share would.
    const int head_rows = queries * (w.head >= 0 ? 1 : group);
    if (head_rows > kSplitMaxRows || keys <= kSplitKeys) continue;
    SplitGroup g;
    g.item = w;
    g.parts = static_cast<int32_t>((keys + kSplitKeys - 1) / kSplitKeys);
    g.rows = queries * heads;
    g.partial_row = *partial_rows;
    *partial_rows += int64_t{g.parts} * g.rows;
    for (int32_t part = 0; part < g.parts; ++part) {
      WorkItem pw = g.item;
      pw.key_begin = part * kSplitKeys;
      pw.key_end = static_cast<int32_t>(std::min<int64_t>(keys, int64_t{part + 1} * kSplitKeys));
      pw.partial_row = g.partial_row + int64_t{part} * g.rows;
      pw.cost = int64_t{g.rows} * (pw.key_end - pw.key_begin);
      if (part == 0) {
        w = pw;
      } else {
        items.push_back(pw);
      }
    }
    groups.push_back(g);
  }
  // Largest first. Dense items in classes of a power of two, and within a class by KV head:
  // threads then walk one KV head's items together, whose K and V rows stay in L3 from one item
  // to the next, instead of cycling through every KV head's rows (all of a 16K-token layer's K and
  // V, 64 MB on the 8B shape, do not fit in L3). Sparse items, which read few keys each, keep
  // the build order among equal costs (the KV heads of one query block together: the same pages
  // and query rows). Split-KV parts, though, go by key range first and KV head second: a
  // token's K (and V) rows of all KV heads share its 4 KiB (fp32, 8 x 128) of the pool, and the
  // hardware prefetchers fetch lines of the other heads' rows along with a head's own, so the
  // KV heads of one key range run back to back while those lines are still in L2/L3 (1.28x on
  // dense decode at 128K before dense decode items took every KV head at once, which goes
  // further: bench/results/2026-12-06-cpu-decode-order.md). The order only decides which
  // thread runs what, never a result.
  auto size_class = [](int64_t c) { return c <= 0 ? 0 : 64 - __builtin_clzll(static_cast<uint64_t>(c)); };
  std::stable_sort(items.begin(), items.end(), [&](const WorkItem& a, const WorkItem& b) {
    if (a.sparse_row >= 0 || b.sparse_row >= 0) return a.cost > b.cost;
    const int ca = size_class(a.cost), cb = size_class(b.cost);
    if (ca != cb) return ca > cb;
    if (a.seq != b.seq) return a.seq < b.seq;
    const int32_t ka = a.key_end >= 0 ? a.key_begin : -1, kb = b.key_end >= 0 ? b.key_begin : -1;
    if (ka != kb) return ka < kb;
    if (a.kv_head != b.kv_head) return a.kv_head < b.kv_head;
    return a.cost > b.cost;
  });
  return items;
}

}  // namespace cpu_attention
}  // namespace sieve::kernels
