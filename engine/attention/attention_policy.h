// AttentionPolicy: decides, for each layer of each step of one pool, which keys attention reads,
// by building an AttentionPlan that Backend::Attention executes. Each ModelWorker owns one policy
// (the prefill pool's workers the prefill method's, the decode pool's the decode method's), so a
// policy needs no locking and may keep per-worker scratch.
//
// Methods: "dense" (every causal key; today's kernels at today's speed). The sparse prefill
// methods (MInference vertical-slash, XAttention) and sparse decode methods (Quest,
// DoubleSparsity) plug in here: their estimators run as backend operators on the step's stream
// from Plan, and their plans are block-sparse-row indices beside the page table.
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
  // The step's q, k and v projections before RoPE [num_tokens, (num_q_heads + 2 num_kv_heads) *
  // head_dim] on `backend` (what RopeAndCacheKv read), for policies and calibration that look at
  // the keys of the step's new tokens.
  Tensor qkv;
};

class AttentionPolicy {
 public:
  virtual ~AttentionPolicy() = default;

  // The method's name as configured ("dense").
  virtual std::string_view method() const = 0;

  // Builds `plan` for `step` (reusing its capacity). May enqueue estimator operators on
  // step.stream; must not wait for the device unless the method needs host-side decisions.
  virtual absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) = 0;
};

// Every causal key: plan.dense.
class DenseAttentionPolicy final : public AttentionPolicy {
 public:
  std::string_view method() const override { return "dense"; }
  absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) override;
};

// Makes the policy named `method` (one of kPrefillAttentionMethods / kDecodeAttentionMethods,
// attention_methods.h) for `phase`. InvalidArgument naming the methods there are otherwise.
absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeAttentionPolicy(std::string_view method,
                                                                      AttentionPhase phase);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_ATTENTION_ATTENTION_POLICY_H_
