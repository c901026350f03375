// DoubleSparsity sparse decode (SPARSE_ATTENTION.md section 4) as an AttentionPolicy: for each
// layer past the first `dense_layers`, each single-query sequence longer than
// `sparse_min_tokens` and than the token budget reads, per query head (or per KV head with
// attention.decode.double_sparsity.per_kv_head), the top token_budget tokens by the approximate
// score of the query's outlier channels over the label cache; the rest read every key. The label
// cache is the backend's (Backend::UpdateDsLabels keeps it current on every append; the runner
// enqueues it when the decode method is double_sparsity), and the selection runs as
// Backend::PlanDsTokens. The channels come from a calibration file or from a calibration run at
// start-up (engine.cc).
#ifndef SIEVE_ENGINE_ATTENTION_DOUBLE_SPARSITY_POLICY_H_
#define SIEVE_ENGINE_ATTENTION_DOUBLE_SPARSITY_POLICY_H_

#include <memory>

#include "absl/status/statusor.h"
#include "engine/attention/attention_policy.h"

namespace sieve::engine {

// The DoubleSparsity decode policy with `settings`. InvalidArgument naming the key when a
// setting is out of range.
absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeDoubleSparsityPolicy(
    const DecodePolicySettings& settings);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_ATTENTION_DOUBLE_SPARSITY_POLICY_H_
