// MInferencePolicy: MInference 1.0 sparse prefill (../shared SPARSE_ATTENTION.md section 1) in
// the prefill pool, on SparsePrefillPolicy. For each sparse sequence of a step the backend
// estimates every query head's index from the chunk's last `last_q` queries against all of the
// sequence's cached keys (Backend::MInferenceIndex, kernels/sparse/minference.h): vertical-slash
// heads keep their top columns and diagonals (the first 30 columns and 100 diagonals forced) as
// 64-key tiles plus single columns, A-shape heads their sinks and local window, block-sparse
// heads their top key blocks. The plan's query and key blocks are 64 tokens. A step of one
// sequence may keep its plan on the backend's device (PlanOnDevice: the CUDA backend's).
//
// Patterns per (layer, query head) come from attention.prefill.minference.pattern_file (format:
// minference_patterns.h; `sieve calibrate --method minference` writes one), read once when the
// policy is made; without a file, or for heads the file omits, every head is vertical-slash with
// (vertical_size, slash_size), default (1000, 6096).
//
// Chunked prefill and prefix-cache hits: estimation uses the chunk's own last queries, with
// diagonals measured from absolute positions; query blocks start at the chunk's first query. The
// last chunk of a prompt selects exactly what an unchunked prefill selects (same queries, same
// keys); earlier chunks select from their own last queries (an engine extension, section 1.9).
#ifndef SIEVE_ENGINE_ATTENTION_MINFERENCE_POLICY_H_
#define SIEVE_ENGINE_ATTENTION_MINFERENCE_POLICY_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/attention/minference_patterns.h"
#include "engine/attention/sparse_prefill_policy.h"

namespace sieve::engine {

class MInferencePolicy final : public SparsePrefillPolicy {
 public:
  // `patterns` empty: every head VS (config.minference.vertical_size, slash_size).
  MInferencePolicy(const PrefillAttentionConfig& config, MInferencePatterns patterns);

  std::string_view method() const override { return "minference"; }

  // The pattern of (layer, query head).
  MInferenceHeadPattern Pattern(int32_t layer, int32_t head) const;

 protected:
  int32_t query_block() const override { return kernels::minference::kBlock; }
  int32_t key_block() const override { return kernels::minference::kBlock; }
  absl::Status PlanSequence(const AttentionStep& step, int32_t seq, PlanRowWriter& rows) override;
  // Asks the backend to keep the index on the device (MInferenceEstimate::device_plan); a
  // backend that builds it on the host instead leaves it for PlanSequence (not estimated twice).
  absl::StatusOr<bool> PlanOnDevice(const AttentionStep& step, AttentionPlan& plan) override;

 private:
  // The estimate of sequence `seq` of `step` (its patterns in layer_).
  MInferenceEstimate Estimate(const AttentionStep& step, int32_t seq);

  MInferencePatterns patterns_;
  // Scratch, reused across calls.
  std::vector<MInferenceHeadPattern> layer_;
  kernels::minference::MInferencePlan plan_;
  // PlanOnDevice's index came back in plan_ for sequence 0 of the step being planned.
  bool have_host_plan_ = false;
};

// Makes the policy, reading config.minference.pattern_file if set (errors name the key); the
// file needs the model's layer and head counts.
absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeMInferencePolicy(
    const PrefillAttentionConfig& config, const AttentionModelShape& model);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_ATTENTION_MINFERENCE_POLICY_H_
