#include "engine/attention/sparse_prefill_policy.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace sieve::engine {

void PlanRowWriter::AddRow(absl::Span<const int32_t> key_blocks,
                           absl::Span<const int32_t> columns) {
  plan_.key_blocks.insert(plan_.key_blocks.end(), key_blocks.begin(), key_blocks.end());
  plan_.row_start.push_back(static_cast<int32_t>(plan_.key_blocks.size()));
  plan_.columns.insert(plan_.columns.end(), columns.begin(), columns.end());
  plan_.column_start.push_back(static_cast<int32_t>(plan_.columns.size()));
}

bool SparsePrefillPolicy::SequenceIsSparse(const AttentionStep& step, int32_t seq) const {
  if (step.layer < config_.dense_layers) return false;
  const BatchLayout& l = *step.layout;
  const int32_t q_len = l.query_start[seq + 1] - l.query_start[seq];
  if (q_len <= 1 || l.kv_lens[seq] <= config_.sparse_min_tokens) return false;
  if (!step.dense_prefill.empty() && step.dense_prefill[seq] != 0) return false;
  return true;
}

void SparsePrefillPolicy::PlanDenseSequence(const AttentionStep& step, int32_t seq,
                                            PlanRowWriter& rows) {
  const BatchLayout& l = *step.layout;
  const int32_t q_len = l.query_start[seq + 1] - l.query_start[seq];
  const int32_t first = l.kv_lens[seq] - q_len;  // position of the chunk's first query
  const int32_t qb = query_block(), kb = key_block();
  for (int32_t b = 0; b * qb < q_len; ++b) {
    const int32_t last = first + std::min(q_len, (b + 1) * qb) - 1;  // last query's position
    blocks_.clear();
    for (int32_t j = 0; j <= last / kb; ++j) blocks_.push_back(j);
    for (int32_t h = 0; h < step.shape.num_q_heads; ++h) rows.AddRow(blocks_);
  }
}

absl::Status SparsePrefillPolicy::PlanRows(const AttentionStep& step, AttentionPlan& plan) {
  const BatchLayout& l = *step.layout;
  plan.SetDense();
  plan.dense = false;
  plan.query_block = query_block();
  plan.key_block = key_block();
  plan.query_block_start.assign(1, 0);
  plan.row_start.assign(1, 0);
  plan.column_start.assign(1, 0);
  PlanRowWriter rows(plan);
  for (int32_t s = 0; s < l.num_seqs(); ++s) {
    const int32_t q_len = l.query_start[s + 1] - l.query_start[s];
    const int32_t blocks = (q_len + plan.query_block - 1) / plan.query_block;
    plan.query_block_start.push_back(plan.query_block_start.back() + blocks);
    const int64_t before = rows.rows();
    if (SequenceIsSparse(step, s)) {
      SIEVE_RETURN_IF_ERROR(PlanSequence(step, s, rows));
    } else {
      PlanDenseSequence(step, s, rows);
    }
    if (rows.rows() - before != int64_t{blocks} * step.shape.num_q_heads) {
      return absl::InternalError(absl::StrCat(std::string(method()), " planned ", rows.rows() - before,
                                              " rows for sequence ", s, ", which has ", blocks,
                                              " query blocks of ", step.shape.num_q_heads,
                                              " heads"));
    }
  }
  if (plan.columns.empty()) plan.column_start.clear();
  return absl::OkStatus();
}

absl::Status SparsePrefillPolicy::Plan(const AttentionStep& step, AttentionPlan& plan) {
  const BatchLayout& l = *step.layout;
  if (!step.dense_prefill.empty() &&
      static_cast<int32_t>(step.dense_prefill.size()) != l.num_seqs()) {
    return absl::InternalError(absl::StrCat("attention step has ", step.dense_prefill.size(),
                                            " dense_prefill flags for ", l.num_seqs(),
                                            " sequences"));
  }
  bool any_sparse = false;
  for (int32_t s = 0; s < l.num_seqs() && !any_sparse; ++s) any_sparse = SequenceIsSparse(step, s);
  plan.SetDense();
  if (!any_sparse) return absl::OkStatus();
  bool on_device = false;
  if (l.num_seqs() == 1) {
    SIEVE_ASSIGN_OR_RETURN(on_device, PlanOnDevice(step, plan));
  }
  if (!on_device) SIEVE_RETURN_IF_ERROR(PlanRows(step, plan));
  const double max_density = config_.max_density > 0 ? config_.max_density : 1.0;
  if (max_density < 1.0) {
    // Pairs the sparse sequences' rows read: the plan's (an on-device plan's as counted where it
    // was built), less the dense sequences' (all theirs).
    int64_t sparse_dense_pairs = 0, other_pairs = 0;
    for (int32_t s = 0; s < l.num_seqs(); ++s) {
      (SequenceIsSparse(step, s) ? sparse_dense_pairs : other_pairs) +=
          SequenceDensePairs(l, s, step.shape.num_q_heads);
    }
    plan.counted_pairs = plan.ReadPairs(l, step.shape.num_q_heads);  // O(entries): counted once
    const int64_t read = plan.counted_pairs - other_pairs;
    if (sparse_dense_pairs > 0 &&
        static_cast<double>(read) > max_density * static_cast<double>(sparse_dense_pairs)) {
      plan.SetDense();
      ++dense_fallbacks_;
    }
  }
  return absl::OkStatus();
}

}  // namespace sieve::engine
