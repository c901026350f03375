// AttentionPolicy: decides, for each layer of each step of one pool, which keys attention reads,
// by building an AttentionPlan that Backend::Attention executes. Each ModelWorker owns one policy
// (the prefill pool's workers the prefill method's, the decode pool's the decode method's), so a
// policy needs no locking and may keep per-worker scratch.
//
// Methods: "dense" (every causal key; today's kernels at today's speed); prefill "xattention"
// (xattention_policy.h, on SparsePrefillPolicy, sparse_prefill_policy.h, which every sparse
// prefill method shares). Sparse decode methods (Quest, DoubleSparsity) plug in here too: their
// estimators run as backend operators on the step's stream from Plan, and their plans are
// block-sparse-row indices beside the page table.
//
// Step graphs (CUDA graphs of decode steps) replay recorded operators; a policy whose plan
// changes between steps of one shape must make the plan part of the step's shape (the sparse
// decode issue does this; dense plans never change).
#ifndef SIEVE_ENGINE_ATTENTION_ATTENTION_POLICY_H_
#define SIEVE_ENGINE_ATTENTION_ATTENTION_POLICY_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/attention/attention_config.h"
#include "engine/attention/attention_methods.h"
#include "engine/backends/attention_plan.h"
#include "engine/backends/backend.h"

namespace sieve::engine {

// The phase a policy plans for: its pool.
enum class AttentionPhase { kPrefill, kDecode };

// What a policy sees of one layer of one step. Pointers are borrowed for the Plan call.
struct AttentionStep {
  int32_t layer = 0;
  const BatchLayout* layout = nullptr;  // the step's sequences, positions and page table
  AttentionShape shape;                 // heads and head size
  // The step's rotated queries [num_tokens, num_q_heads * head_dim] on `backend`, for
  // estimators that score keys against them (enqueued on `stream`, ordered before Attention).
  Backend* backend = nullptr;
  BackendStream* stream = nullptr;
  Tensor q;
  // Per sequence of `layout`: nonzero when its request asked for dense prefill attention
  // (GenerateRequest.prefill_attention); empty when none did.
  absl::Span<const uint8_t> dense_prefill;
  // The step's q, k and v projections before RoPE [num_tokens, (num_q_heads + 2 num_kv_heads) *
  // head_dim] on `backend` (what RopeAndCacheKv read), for policies and calibration that look at
  // the keys of the step's new tokens.
  Tensor qkv;
  // Per sequence of the layout, 1 where the request asked for dense attention (a client's
  // per-request override); empty: none did. Sparse decode policies read every key there.
  absl::Span<const uint8_t> dense_decode;
};

// The model facts a policy checks its settings against (0: unknown, not checked).
struct AttentionModelShape {
  int32_t num_layers = 0;
  int32_t num_q_heads = 0;
  // The KV cache's page size in tokens (kv_cache.page_size_tokens), which the decode policies
  // plan in (Quest selects whole pages); 0: DecodePolicySettings' default.
  int32_t page_size = 0;
};

// What a decode policy planned over the steps since its last TakeDecodeStats, for the metrics
// sieve_decode_kv_read_fraction (read_pairs / dense_pairs) and sieve_decode_selection_seconds.
struct DecodeAttentionStats {
  int64_t read_pairs = 0;   // (query, key) pairs the plans read, over every layer and head
  int64_t dense_pairs = 0;  // the pairs dense attention would have read
  double selection_seconds = 0;  // host time spent choosing the keys (estimators, top-k)
};

// The decode policy's settings: DecodeAttentionConfig's (`attention.decode.*`,
// attention_config.h) with the KV page size, as DecodePolicySettingsFor makes them.
struct DecodePolicySettings {
  int32_t sparse_min_tokens = 4096;  // a sequence this long or shorter reads every key
  int32_t token_budget = 4096;       // keys per query head and sequence (whole pages)
  int32_t dense_layers = 2;          // the first layers always read every key
  bool quest_per_kv_head = false;    // Quest: one page set per KV head instead of per q head
  int32_t page_size = 16;            // KV page size (Quest's budget is page_budget pages)
};

// `config`'s settings with the KV page size `page_size` (0: the default's).
DecodePolicySettings DecodePolicySettingsFor(const DecodeAttentionConfig& config,
                                             int32_t page_size);

class AttentionPolicy {
 public:
  virtual ~AttentionPolicy() = default;

  // The method's name as configured ("dense").
  virtual std::string_view method() const = 0;

  // Builds `plan` for `step` (reusing its capacity). May enqueue estimator operators on
  // step.stream; must not wait for the device unless the method needs host-side decisions.
  virtual absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) = 0;

  // Decode policies: the stats of the steps planned since the last call, then resets them.
  virtual DecodeAttentionStats TakeDecodeStats() { return {}; }
};

// Every causal key: plan.dense.
class DenseAttentionPolicy final : public AttentionPolicy {
 public:
  std::string_view method() const override { return "dense"; }
  absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) override;
};

// Makes the policy `config` names for `phase` (config.prefill.method, one of
// kPrefillAttentionMethods, or config.decode.method, one of kDecodeAttentionMethods) with that
// method's settings (a decode policy plans in model.page_size pages), checked against `model`
// where it is known (e.g. a threshold file's table shape). InvalidArgument naming the key at
// fault (an unknown method lists the known ones).
absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeAttentionPolicy(
    const AttentionConfig& config, AttentionPhase phase, const AttentionModelShape& model = {});

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_ATTENTION_ATTENTION_POLICY_H_
