// SparsePrefillPolicy: what every sparse prefill method (XAttention, MInference) shares. It
// decides per layer and per sequence whether a step's chunk runs sparse, and assembles the
// block-sparse-row plan (attention_plan.h) from the rows the method selects:
//   - the first `dense_layers` layers attend densely;
//   - a sequence runs sparse only when its KV length (cached + this chunk) is above
//     `sparse_min_tokens`, its chunk has more than one query, and its request did not ask for
//     dense attention (AttentionStep::dense_prefill); the other sequences of a step that has a
//     sparse one get rows that list every causal key block (the same keys as dense);
//   - with no sparse sequence the plan is dense;
//   - a step of one sparse sequence may keep its rows on the backend's device (PlanOnDevice);
//   - when the rows of the sparse sequences read more than `max_density` of their causal pairs,
//     the plan is made dense (the method's estimate is spent, but a block-sparse kernel over
//     nearly every block costs more than the dense one); dense_fallbacks() counts those.
// A method implements block sizes and PlanSequence; estimators it needs run as backend
// operators (Backend::XAttentionBlockMass, ...) on step.stream.
//
// Thread-safety: like every policy, owned by one worker; no locking.
#ifndef SIEVE_ENGINE_ATTENTION_SPARSE_PREFILL_POLICY_H_
#define SIEVE_ENGINE_ATTENTION_SPARSE_PREFILL_POLICY_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/attention/attention_config.h"
#include "engine/attention/attention_policy.h"

namespace sieve::engine {

// Appends the rows of one sequence to a plan under construction: exactly one AddRow per
// (query block, query head) of the sequence, query blocks in order and heads in order within a
// block (the plan's row order).
class PlanRowWriter {
 public:
  explicit PlanRowWriter(AttentionPlan& plan) : plan_(plan) {}
  // One row: key blocks (increasing) and single key positions (increasing, none inside a listed
  // block). The plan is checked as a whole afterwards (AttentionPlan::Validate).
  void AddRow(absl::Span<const int32_t> key_blocks, absl::Span<const int32_t> columns = {});
  // Rows added so far (over all sequences).
  int64_t rows() const { return static_cast<int64_t>(plan_.row_start.size()) - 1; }

 private:
  AttentionPlan& plan_;
};

class SparsePrefillPolicy : public AttentionPolicy {
 public:
  explicit SparsePrefillPolicy(const PrefillAttentionConfig& config) : config_(config) {}

  // Builds the plan as the file comment says; the method's PlanSequence fills the sparse rows.
  absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) final;

  // Whether sequence `seq` of `step` runs sparse in step.layer (see the file comment).
  bool SequenceIsSparse(const AttentionStep& step, int32_t seq) const;

  const PrefillAttentionConfig& config() const { return config_; }

  // Plans made dense because they were denser than config().max_density (0 counts as 1: never).
  int64_t dense_fallbacks() const { return dense_fallbacks_; }

 protected:
  // The plan's query block and key block sizes (tokens).
  virtual int32_t query_block() const = 0;
  virtual int32_t key_block() const = 0;

  // Appends the rows of sparse sequence `seq` of `step` (its ceil(q_len / query_block()) query
  // blocks times step.shape.num_q_heads rows) to `rows`.
  virtual absl::Status PlanSequence(const AttentionStep& step, int32_t seq,
                                    PlanRowWriter& rows) = 0;

  // A step whose only sequence runs sparse: the method may have the backend build `plan` as an
  // on_device plan (attention_plan.h) with its pairs counted, and return true; false: the rows
  // are built on the host (PlanSequence). The max_density check applies either way.
  virtual absl::StatusOr<bool> PlanOnDevice(const AttentionStep& step, AttentionPlan& plan) {
    return false;
  }

 private:
  // Builds `plan`'s rows on the host: PlanSequence for the sparse sequences, PlanDenseSequence
  // for the others.
  absl::Status PlanRows(const AttentionStep& step, AttentionPlan& plan);
  // Appends rows listing every causal key block of sequence `seq`.
  void PlanDenseSequence(const AttentionStep& step, int32_t seq, PlanRowWriter& rows);

  PrefillAttentionConfig config_;
  int64_t dense_fallbacks_ = 0;
  std::vector<int32_t> blocks_;  // scratch
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_ATTENTION_SPARSE_PREFILL_POLICY_H_
