// Quest sparse decode (SPARSE_ATTENTION.md section 3) as an AttentionPolicy: for each layer past
// the first `dense_layers`, each single-query sequence longer than `sparse_min_tokens` (and
// longer than the budget) reads, per query head, the top token_budget / page_size - 1 pages by
// the upper bound U_p(q) plus its last page; the rest read every key. The page bounds are the
// backend's (Backend::UpdatePageBounds keeps them current; the runner enqueues it when the
// decode method is quest), and the selection runs as Backend::PlanQuestPages.
#ifndef SIEVE_ENGINE_ATTENTION_QUEST_POLICY_H_
#define SIEVE_ENGINE_ATTENTION_QUEST_POLICY_H_

#include <memory>

#include "absl/status/statusor.h"
#include "engine/attention/attention_policy.h"

namespace sieve::engine {

// The Quest decode policy with `settings`. InvalidArgument when the budget is below two pages
// (3.8) or a setting is out of range.
absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeQuestPolicy(
    const DecodePolicySettings& settings);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_ATTENTION_QUEST_POLICY_H_
