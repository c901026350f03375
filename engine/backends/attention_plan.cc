#include "engine/backends/attention_plan.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/backends/backend.h"

namespace sieve::engine {
namespace {

// Sum over query positions p in [p0, p1] of the keys of [a, a + kb) at positions <= p.
int64_t CausalKeysInBlock(int64_t p0, int64_t p1, int64_t a, int64_t kb) {
  if (p1 < a) return 0;
  int64_t total = 0;
  // Positions inside the block: p - a + 1 keys each.
  const int64_t lo = std::max(p0, a), hi = std::min(p1, a + kb - 1);
  if (lo <= hi) total += (hi - lo + 1) * (lo - a + 1 + hi - a + 1) / 2;
  // Positions past the block: all kb keys each.
  const int64_t past = std::max(p0, a + kb);
  if (past <= p1) total += (p1 - past + 1) * kb;
  return total;
}

absl::Status Bad(const std::string& what) {
  return absl::InternalError(absl::StrCat("attention plan: ", what));
}

}  // namespace

void AttentionPlan::SetDense() {
  dense = true;
  on_device = false;
  on_device_pairs = 0;
  counted_pairs = -1;
  query_block = key_block = 0;
  query_block_start.clear();
  row_start.clear();
  key_blocks.clear();
  column_start.clear();
  columns.clear();
}

kernels::SparseAttentionIndex AttentionPlan::View() const {
  kernels::SparseAttentionIndex x;
  x.query_block = query_block;
  x.key_block = key_block;
  x.query_block_start = query_block_start.data();
  x.row_start = row_start.data();
  x.key_blocks = key_blocks.data();
  x.column_start = column_start.empty() ? nullptr : column_start.data();
  x.columns = columns.data();
  return x;
}

absl::Status AttentionPlan::Validate(const BatchLayout& layout, int32_t num_q_heads) const {
  if (dense) return absl::OkStatus();
  const int32_t seqs = layout.num_seqs();
  if (query_block < 1 || key_block < 1) return Bad("query_block and key_block must be >= 1");
  if (static_cast<int32_t>(query_block_start.size()) != seqs + 1 || query_block_start[0] != 0) {
    return Bad(absl::StrCat("query_block_start has ", query_block_start.size(), " entries for ",
                            seqs, " sequences"));
  }
  for (int32_t s = 0; s < seqs; ++s) {
    const int32_t q_len = layout.query_start[s + 1] - layout.query_start[s];
    const int32_t want = (q_len + query_block - 1) / query_block;
    if (query_block_start[s + 1] - query_block_start[s] != want) {
      return Bad(absl::StrCat("sequence ", s, " has ", q_len, " queries in blocks of ",
                              query_block, " but ", query_block_start[s + 1] - query_block_start[s],
                              " blocks"));
    }
  }
  if (on_device) {
    if (!row_start.empty() || !key_blocks.empty() || !column_start.empty() || !columns.empty()) {
      return Bad("an on_device plan keeps its rows on the device, but has rows on the host");
    }
    return absl::OkStatus();
  }
  const int64_t rows = int64_t{query_block_start[seqs]} * num_q_heads;
  if (static_cast<int64_t>(row_start.size()) != rows + 1 || row_start[0] != 0 ||
      row_start.back() != static_cast<int64_t>(key_blocks.size())) {
    return Bad(absl::StrCat("row_start has ", row_start.size(), " entries for ", rows, " rows"));
  }
  const bool has_columns = !column_start.empty();
  if (has_columns && (static_cast<int64_t>(column_start.size()) != rows + 1 ||
                      column_start[0] != 0 ||
                      column_start.back() != static_cast<int64_t>(columns.size()))) {
    return Bad(absl::StrCat("column_start has ", column_start.size(), " entries for ", rows,
                            " rows"));
  }
  for (int32_t s = 0; s < seqs; ++s) {
    const int32_t kv = layout.kv_lens[s];
    const int32_t key_blocks_of_seq = (kv + key_block - 1) / key_block;
    for (int64_t r = int64_t{query_block_start[s]} * num_q_heads;
         r < int64_t{query_block_start[s + 1]} * num_q_heads; ++r) {
      if (row_start[r + 1] < row_start[r]) return Bad(absl::StrCat("row ", r, " ends before it starts"));
      for (int32_t i = row_start[r]; i < row_start[r + 1]; ++i) {
        const int32_t j = key_blocks[i];
        if (j < 0 || j >= key_blocks_of_seq || (i > row_start[r] && j <= key_blocks[i - 1])) {
          return Bad(absl::StrCat("row ", r, " lists key block ", j, " (sequence ", s, " has ",
                                  key_blocks_of_seq, "; lists must increase)"));
        }
      }
      if (!has_columns) continue;
      if (column_start[r + 1] < column_start[r]) return Bad(absl::StrCat("row ", r, " columns end before they start"));
      for (int32_t i = column_start[r]; i < column_start[r + 1]; ++i) {
        const int32_t c = columns[i];
        if (c < 0 || c >= kv || (i > column_start[r] && c <= columns[i - 1])) {
          return Bad(absl::StrCat("row ", r, " lists column ", c, " (sequence ", s, " has ", kv,
                                  " keys; lists must increase)"));
        }
        if (std::binary_search(key_blocks.begin() + row_start[r],
                               key_blocks.begin() + row_start[r + 1], c / key_block)) {
          return Bad(absl::StrCat("row ", r, " lists column ", c, " inside a listed key block"));
        }
      }
    }
  }
  return absl::OkStatus();
}

int64_t SequenceDensePairs(const BatchLayout& layout, int32_t seq, int32_t num_q_heads) {
  const int64_t q_len = layout.query_start[seq + 1] - layout.query_start[seq];
  const int64_t first = layout.kv_lens[seq] - q_len;  // position of the first query
  // Query at position p reads p + 1 keys.
  return (q_len * (first + 1) + q_len * (q_len - 1) / 2) * num_q_heads;
}

int64_t DensePairs(const BatchLayout& layout, int32_t num_q_heads) {
  int64_t pairs = 0;
  for (int32_t s = 0; s < layout.num_seqs(); ++s) {
    pairs += SequenceDensePairs(layout, s, num_q_heads);
  }
  return pairs;
}

int64_t AttentionPlan::ReadPairs(const BatchLayout& layout, int32_t num_q_heads) const {
  if (dense) return DensePairs(layout, num_q_heads);
  if (on_device) return on_device_pairs;
  if (counted_pairs >= 0) return counted_pairs;
  int64_t pairs = 0;
  for (int32_t s = 0; s < layout.num_seqs(); ++s) {
    const int64_t q_len = layout.query_start[s + 1] - layout.query_start[s];
    const int64_t first = layout.kv_lens[s] - q_len;
    for (int32_t b = 0; b < query_block_start[s + 1] - query_block_start[s]; ++b) {
      const int64_t p0 = first + int64_t{b} * query_block;
      const int64_t p1 = std::min(first + q_len - 1, p0 + query_block - 1);
      for (int32_t h = 0; h < num_q_heads; ++h) {
        const int64_t r = (int64_t{query_block_start[s]} + b) * num_q_heads + h;
        for (int32_t i = row_start[r]; i < row_start[r + 1]; ++i) {
          pairs += CausalKeysInBlock(p0, p1, int64_t{key_blocks[i]} * key_block, key_block);
        }
        if (column_start.empty()) continue;
        for (int32_t i = column_start[r]; i < column_start[r + 1]; ++i) {
          pairs += std::max<int64_t>(0, p1 - std::max<int64_t>(columns[i], p0) + 1);
        }
      }
    }
  }
  return pairs;
}

}  // namespace sieve::engine
