// AttentionPlan: which keys each query of a step's attention reads, for one layer. An
// AttentionPolicy (attention_policy.h) builds it; Backend::Attention executes it.
//
// Dense (the default) reads every causal key. Otherwise the plan is a block-sparse-row (BSR)
// index beside the step's page table, with exactly the meaning of kernels::SparseAttentionIndex
// (kernels/attention/paged_attention.h): per (query block, query head) row, a list of key blocks
// and a list of single key positions; decode steps use query blocks of one token and key blocks
// of one page, i.e. a list of pages per (sequence, head).
//
// A plan may also stay on the device (`on_device`): the backend that built it (the CUDA
// backend's Quest selection for decode steps, its MInference index for a prefill step of one
// sequence) keeps the rows in its own memory for the Attention call of the same layer that
// follows on the same stream, and the host plan carries only the block sizes,
// query_block_start and the pairs the rows read. Only that backend can run such a plan.
//
// Thread safety: a plain value, owned by the worker that builds and runs it.
#ifndef SIEVE_ENGINE_BACKENDS_ATTENTION_PLAN_H_
#define SIEVE_ENGINE_BACKENDS_ATTENTION_PLAN_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/attention/paged_attention.h"

namespace sieve::engine {

struct BatchLayout;

struct AttentionPlan {
  // True: every causal key (the fields below are unused).
  bool dense = true;
  int32_t query_block = 0;  // queries per query block (>= 1)
  int32_t key_block = 0;    // key positions per key block (>= 1)
  std::vector<int32_t> query_block_start;  // [num_seqs + 1] query blocks before each sequence
  std::vector<int32_t> row_start;          // [num_rows + 1], num_rows = blocks * num_q_heads
  std::vector<int32_t> key_blocks;         // [row_start.back()] increasing within a row
  std::vector<int32_t> column_start;       // [num_rows + 1], or empty: no single columns
  std::vector<int32_t> columns;            // [column_start.back()] increasing within a row
  // True: the rows live in the building backend's device memory (row_start, key_blocks and the
  // columns are empty here); on_device_pairs is what they read over every head.
  bool on_device = false;
  int64_t on_device_pairs = 0;
  // What ReadPairs returns for this plan as built, when whoever built it has counted it already
  // (a policy's max_density check); -1: not counted. SetDense resets it; a caller that reuses a
  // plan for another step sets it to -1 before the plan is rebuilt (ModelWorker does).
  int64_t counted_pairs = -1;

  // Makes the plan dense (keeping the vectors' capacity).
  void SetDense();

  // Checks the plan against the step it is for: array sizes, block counts per sequence, indices
  // inside each sequence's KV, increasing lists, columns outside listed blocks (an on_device
  // plan: its block sizes and query_block_start only). Internal naming the first problem: a
  // policy that breaks these is a bug.
  absl::Status Validate(const BatchLayout& layout, int32_t num_q_heads) const;

  // The kernels' view of the arrays (host pointers into this plan; valid until it changes; not
  // for on_device plans, whose arrays are empty).
  kernels::SparseAttentionIndex View() const;

  // (query, key) pairs read over every head, and the pairs dense attention would read: their
  // ratio is the plan's density (1 for dense).
  int64_t ReadPairs(const BatchLayout& layout, int32_t num_q_heads) const;
};

// The causal (query, key) pairs of `layout` over `num_q_heads` heads: what dense attention reads.
int64_t DensePairs(const BatchLayout& layout, int32_t num_q_heads);
// The same for sequence `seq` of `layout` alone.
int64_t SequenceDensePairs(const BatchLayout& layout, int32_t seq, int32_t num_q_heads);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_BACKENDS_ATTENTION_PLAN_H_
