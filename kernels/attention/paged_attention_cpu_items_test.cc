// The CPU attention kernel's work list (BuildWorkItems, paged_attention_cpu_items.h): which rows
// each item covers, independent of the arithmetic (paged_attention_cpu_test.cc checks results).
#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu_items.h"

namespace sieve::kernels::cpu_attention {
namespace {

// Metadata of a batch (no K, V or queries: the work list reads none) and a sparse index whose
// rows list every key block, so that every group of query heads shares its keys.
struct Batch {
  std::vector<int32_t> q_lens, kv_lens, query_start = {0};
  std::vector<int32_t> qb_start = {0}, row_start = {0}, key_blocks;
  SparseAttentionIndex index;
  PagedAttentionParams<float> p;

  Batch(const std::vector<std::pair<int, int>>& seqs, int kv_heads, int group, int query_block) {
    constexpr int kKeyBlock = 64;
    for (const auto& [kv, q] : seqs) {
      kv_lens.push_back(kv);
      q_lens.push_back(q);
      query_start.push_back(query_start.back() + q);
      const int blocks = (q + query_block - 1) / query_block;
      qb_start.push_back(qb_start.back() + blocks);
      for (int r = 0; r < blocks * kv_heads * group; ++r) {
        for (int j = 0; j < (kv + kKeyBlock - 1) / kKeyBlock; ++j) key_blocks.push_back(j);
        row_start.push_back(static_cast<int32_t>(key_blocks.size()));
      }
    }
    index.query_block = query_block;
    index.key_block = kKeyBlock;
    index.query_block_start = qb_start.data();
    index.row_start = row_start.data();
    index.key_blocks = key_blocks.data();
    p.kv_lens = kv_lens.data();
    p.query_start = query_start.data();
    p.num_seqs = static_cast<int>(seqs.size());
    p.num_q_heads = kv_heads * group;
    p.num_kv_heads = kv_heads;
    p.head_dim = 64;
    p.page_size = 16;
    p.sparse = &index;
  }
};

// Group-shared sparse items: every (sequence, query, head) row covered exactly once (split-KV
// parts counted once per item), at most kRowsPerItem rows per item, costs that give back each
// item's key count, dense items' boundaries where the query block is a multiple of a dense
// item's queries, and otherwise no sliver: no piece below half a dense item's queries unless its
// block is that short (group 7 cut at 18 queries left 2-query pieces, split-KV cut them again).
TEST(WorkItemsTest, GroupSharedItemsCoverEveryRowOnceInDenseSizedPieces) {
  const std::vector<std::pair<int, int>> seqs = {{300, 300}, {1000, 131}, {9000, 2}, {5000, 260},
                                                 {700, 700}};
  for (const int group : {2, 3, 4, 5, 6, 7, 8}) {
    for (const int query_block : {16, 64, 128, 256}) {
      const std::string what = "group " + std::to_string(group) + " query block " +
                               std::to_string(query_block);
      const Batch b(seqs, 2, group, query_block);
      std::vector<SplitGroup> split;
      int64_t partial_rows = 0;
      const std::vector<WorkItem> items = BuildWorkItems(b.p, true, split, &partial_rows);
      PagedAttentionParams<float> dense_p = b.p;
      dense_p.sparse = nullptr;
      std::vector<SplitGroup> dense_split;
      int64_t dense_rows = 0;
      std::set<std::tuple<int, int, int>> dense_ranges;  // (seq, q_begin, q_end)
      for (const WorkItem& w : BuildWorkItems(dense_p, true, dense_split, &dense_rows)) {
        dense_ranges.insert({w.seq, w.q_begin, w.q_end});
      }
      const int sub = std::max(1, kRowsPerItem / group);
      std::map<std::tuple<int, int, int>, int> covered;  // (seq, query, head) -> times
      for (const WorkItem& w : items) {
        ASSERT_EQ(w.head, -1) << what << ": every group shares its keys";
        if (w.key_begin > 0) continue;  // a later split-KV part of an item counted already
        const int queries = w.q_end - w.q_begin;
        EXPECT_LE(queries * group, kRowsPerItem) << what;
        for (int j = w.q_begin; j < w.q_end; ++j) {
          for (int h = w.kv_head * group; h < (w.kv_head + 1) * group; ++h) ++covered[{w.seq, j, h}];
        }
        const int block_begin = w.q_begin / query_block * query_block;
        const int block_len = std::min(query_block, b.q_lens[w.seq] - block_begin);
        EXPECT_LE(w.q_end, block_begin + block_len) << what << ": an item crosses a block";
        if (query_block % sub == 0) {
          EXPECT_TRUE(dense_ranges.count({w.seq, w.q_begin, w.q_end}))
              << what << ": item [" << w.q_begin << ", " << w.q_end << ") of sequence " << w.seq
              << " is not a dense item's range";
        } else {
          EXPECT_GE(queries, std::min(block_len, sub / 2))
              << what << ": a sliver [" << w.q_begin << ", " << w.q_end << ")";
        }
        if (w.key_end < 0) {  // unsplit: the cost gives back the item's key count
          const int64_t keys = std::min(b.kv_lens[w.seq], LastPos(b.p, w.seq, w.q_end - 1) + 1);
          EXPECT_EQ(w.cost, int64_t{queries} * group * std::max<int64_t>(1, keys)) << what;
        }
      }
      int64_t rows = 0;
      for (const int q : b.q_lens) rows += int64_t{q} * b.p.num_q_heads;
      EXPECT_EQ(static_cast<int64_t>(covered.size()), rows) << what << ": rows not covered";
      for (const auto& [row, times] : covered) {
        EXPECT_EQ(times, 1) << what << ": sequence " << std::get<0>(row) << " query "
                            << std::get<1>(row) << " head " << std::get<2>(row);
      }
    }
  }
}

}  // namespace
}  // namespace sieve::kernels::cpu_attention
