// What the sparse decode policies (Quest, DoubleSparsity) share: which sequences of a step read
// sparsely, the dense layers, the timing of the selection and the KV-read statistics. A method
// supplies only its selection (SelectKeys, one backend call).
#ifndef SIEVE_ENGINE_ATTENTION_SPARSE_DECODE_POLICY_H_
#define SIEVE_ENGINE_ATTENTION_SPARSE_DECODE_POLICY_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "engine/attention/attention_policy.h"

namespace sieve::engine {

class SparseDecodePolicy : public AttentionPolicy {
 public:
  explicit SparseDecodePolicy(const DecodePolicySettings& s) : s_(s) {}

  // Dense for the first dense_layers layers and for steps where no sequence reads sparsely;
  // otherwise SelectKeys with the per-sequence dense flags. Counts the pairs read and dense
  // attention's pairs, and the host time of the selection.
  absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) final;
  DecodeAttentionStats TakeDecodeStats() final;

 protected:
  // Builds the sparse plan of `step`; dense[i] != 0: sequence i reads every key.
  virtual absl::Status SelectKeys(const AttentionStep& step, absl::Span<const uint8_t> dense,
                                  AttentionPlan& plan) = 0;
  const DecodePolicySettings& settings() const { return s_; }

 private:
  DecodePolicySettings s_;
  DecodeAttentionStats stats_;
  std::vector<uint8_t> dense_;
};

// The range checks every sparse decode policy makes (dense_layers and sparse_min_tokens >= 0):
// InvalidArgument naming the keys.
absl::Status CheckSparseDecodeSettings(const DecodePolicySettings& settings);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_ATTENTION_SPARSE_DECODE_POLICY_H_
