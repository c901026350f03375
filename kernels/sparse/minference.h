// MInference 1.0 sparse prefill (SPARSE_ATTENTION.md section 1): online index estimation per
// query head and its block-sparse-row (BSR) plan for the attention kernels of paged_attention.h.
//
// Per head, one of three patterns (section 1.2):
//   - vertical-slash (VS): the last `last_q` queries of the sequence (of the step's chunk in a
//     chunked prefill) are scored against every cached key; the `vertical_size` key columns and
//     the `slash_size` diagonals (offsets i - j) with the largest softmax mass are kept, the first
//     30 columns (sinks) and the 100 most local diagonals always (section 1.4); the two lists are
//     turned into 64-key tiles plus isolated columns exactly as section 1.6 specifies;
//   - A-shape (n_init = vertical_size, n_local = slash_size): sinks plus a local window;
//   - block-sparse (top_k = vertical_size): the best key blocks of 64 per query block by
//     mean-pooled Q.K (section 1.5).
//
// The plan (MInferencePlan) has query blocks and key blocks of 64: row (query block b, head h)
// lists aligned key blocks and single key positions. VS tiles start at any position (they follow
// the diagonals), so each tile range [rs, re) becomes the aligned blocks inside it plus its
// unaligned ends as single columns: the key set of every query is exactly the section 1.6 set
// S_i (no more, no less). A-shape rows read the sinks plus [start - n_local + 1, i] for a query
// block starting at `start`: a superset of the exact A-shape set by at most 63 window keys per
// query (the plan has one key list per 64-query block; see MINFERENCE.md).
//
// Chunked prefill (an engine extension, section 1.9): queries are right-aligned to the keys
// (query j of a q_len-query chunk sits at position kv_len - q_len + j); estimation uses the last
// min(last_q, q_len) queries of the chunk against all kv_len keys, diagonal offsets measured from
// absolute positions; query block b covers positions [kv_len - q_len + 64 b, + 64). The last chunk
// of a prompt therefore selects exactly what an unchunked prefill selects.
//
// Two implementations: *Ref accumulates in fp64, one head at a time (the reference); the others
// are fp32, vectorised with Highway and threaded over heads. Selection breaks ties by the smaller
// index. Neither reads V: plans depend on q and K only.
#ifndef SIEVE_KERNELS_SPARSE_MINFERENCE_H_
#define SIEVE_KERNELS_SPARSE_MINFERENCE_H_

#include <cstdint>
#include <vector>

#include "kernels/attention/paged_attention.h"
#include "kernels/cpu/half.h"

namespace sieve::kernels::minference {

constexpr int32_t kBlock = 64;            // query block, key block and tile size
constexpr int32_t kDefaultLastQ = 64;     // queries the VS estimate uses
constexpr int32_t kForcedColumns = 30;    // sink columns always in V
constexpr int32_t kForcedDiagonals = 100; // local diagonals always in D
constexpr int32_t kMinVertical = 30;      // |V| >= 30 whatever the configured size
constexpr int32_t kMinSlash = 50;         // |D| >= 50 whatever the configured size

enum class Pattern : int8_t { kVerticalSlash, kAShape, kBlockSparse };

// One head's pattern. VS: (vertical_size, slash_size); A-shape: (n_init, n_local);
// block-sparse: top_k = vertical_size (slash_size unused).
struct HeadPattern {
  Pattern pattern = Pattern::kVerticalSlash;
  int32_t vertical_size = 1000;
  int32_t slash_size = 6096;
};

// Section 1.4's scores of one (sequence, head), before forcing: vertical[j] (key column j) and
// slash[delta] (diagonal offset delta), j, delta in [0, kv_len). Each sums to the number of
// estimation queries.
struct VsScores {
  std::vector<double> vertical, slash;
};

// A VS head's selection: V ascending, D descending (section 1.4 step 5).
struct VsIndex {
  std::vector<int32_t> vertical, slash;
};

// The key set of one query block under section 1.6: disjoint increasing ranges [start, end)
// (multiples of 64 long; ends may pass kv_len) and isolated columns, all before the first range
// that follows them.
struct BlockKeys {
  std::vector<int32_t> range_start, range_end, columns;
};

// A BSR plan with the meaning of SparseAttentionIndex (query_block = key_block = 64).
struct MInferencePlan {
  std::vector<int32_t> query_block_start, row_start, key_blocks, column_start, columns;
  SparseAttentionIndex View() const;
};

struct Options {
  int32_t last_q = kDefaultLastQ;  // queries of each sequence's chunk the VS estimate uses
  int num_threads = 0;             // 0: all host threads (fast path only)
  // Element type of p.k_cache: with a 16-bit type p.k_cache points at uint16_t bit patterns (cast
  // to const float*), widened exactly as read; the estimates then equal those of an fp32 cache
  // holding the widened keys. The same holds for k_dtype of the functions below.
  KvDtype k_dtype = KvDtype::kFloat32;
};

// ---- section 1.4: VS estimation ------------------------------------------------------------
// Scores of (sequence `seq`, query head `head`) of p (q, k_cache, page table; v unused), fp64.
void VsScoresRef(const PagedAttentionParams<float>& p, int seq, int head, int last_q,
                 VsScores* out, KvDtype k_dtype = KvDtype::kFloat32);
// The same in fp32 (Highway), into vertical[kv_len] and slash[kv_len].
void VsScoresCpu(const PagedAttentionParams<float>& p, int seq, int head, int last_q,
                 float* vertical, float* slash, KvDtype k_dtype = KvDtype::kFloat32);
// Forcing and top-k (section 1.4 steps 1, 3-5) over scores of n keys; ties: smaller index.
VsIndex SelectVs(const double* vertical, const double* slash, int32_t n, int32_t vertical_size,
                 int32_t slash_size);
VsIndex SelectVs(const float* vertical, const float* slash, int32_t n, int32_t vertical_size,
                 int32_t slash_size);

// ---- section 1.6: VS conversion ------------------------------------------------------------
// The tile ranges and isolated columns of the query block whose first query is at position
// `start` (its end is start + 64, unclipped). Needs 0 in x.slash (always true of SelectVs).
void ConvertVs(const VsIndex& x, int32_t start, BlockKeys* out);

// ---- section 1.5: block-sparse estimation --------------------------------------------------
// The key blocks each query block of (seq, head) reads, increasing: every causal block when
// there are at most top_k, else the top_k by mean-pooled score (zero padding to 64: means divide
// by 64). Blocks are appended per query block to `blocks` with offsets in `offsets` [blocks+1].
void BlockSparseRef(const PagedAttentionParams<float>& p, int seq, int head, int32_t top_k,
                    std::vector<int32_t>* offsets, std::vector<int32_t>* blocks,
                    KvDtype k_dtype = KvDtype::kFloat32);
void BlockSparseCpu(const PagedAttentionParams<float>& p, int seq, int head, int32_t top_k,
                    std::vector<int32_t>* offsets, std::vector<int32_t>* blocks,
                    KvDtype k_dtype = KvDtype::kFloat32);

// ---- the whole step ------------------------------------------------------------------------
// The plan of every sequence of p (each a prefill chunk: q_len >= 1) and every query head, head
// h with patterns[h] (num_q_heads entries). fp32 estimation on options.num_threads threads.
void BuildPlan(const PagedAttentionParams<float>& p, const HeadPattern* patterns,
               const Options& options, MInferencePlan* plan);
// The same with the fp64 estimators, one thread.
void BuildPlanRef(const PagedAttentionParams<float>& p, const HeadPattern* patterns,
                  const Options& options, MInferencePlan* plan);

// The plan of one sequence (p.num_seqs == 1) from VS scores computed elsewhere (the GPU
// estimator, minference_cuda.h): head h's vertical and slash scores at vertical + h * kv_len and
// slash + h * kv_len (only VS heads' are read); then selection, conversion and assembly as
// BuildPlan, on options.num_threads threads. Reads only p's lengths and head counts (q and K may
// be null), so block-sparse heads, which pool q and K, are refused: returns false, plan unset.
bool BuildPlanFromScores(const PagedAttentionParams<float>& p, const HeadPattern* patterns,
                         const float* vertical, const float* slash, const Options& options,
                         MInferencePlan* plan);

// (query, key) pairs the plan reads over all heads (causal and within kv_len), for density.
int64_t PlanPairs(const PagedAttentionParams<float>& p, const MInferencePlan& plan);
// The causal pairs dense attention reads over all heads.
int64_t DensePairs(const PagedAttentionParams<float>& p);

}  // namespace sieve::kernels::minference

#endif  // SIEVE_KERNELS_SPARSE_MINFERENCE_H_
