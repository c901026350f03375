// XAttentionPolicy: XAttention block selection (../shared SPARSE_ATTENTION.md section 2) in the
// prefill pool, on SparsePrefillPolicy. For each sparse sequence of a step it has the backend
// score the chunk's queries against all of the sequence's cached keys
// (Backend::XAttentionBlockMass: antidiagonal scoring with stride S, softmax, block masses), then
// selects per (query head, query block) the forced first and diagonal key blocks plus the
// heaviest others until their mass reaches the threshold (kernels::XAttentionSelectBlocks). The
// plan's blocks are block_size tokens, query and key alike.
//
// Chunked prefill and prefix-cache hits: query blocks are absolute (positions [mB, mB + B)); a
// chunk that starts at a multiple of B selects exactly what an unchunked prefill selects for its
// blocks. A chunk that starts inside a block (e.g. after a prefix-cache hit of a page that is not
// a multiple of B) has plan rows that straddle two absolute blocks: such a row reads the union of
// both blocks' selections.
//
// Thresholds: attention.prefill.xattention.threshold, or per (layer, query head) from
// threshold_file (README.md gives the format), read once when the policy is made.
#ifndef SIEVE_ENGINE_ATTENTION_XATTENTION_POLICY_H_
#define SIEVE_ENGINE_ATTENTION_XATTENTION_POLICY_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/attention/sparse_prefill_policy.h"

namespace sieve::engine {

// Per-(layer, head) thresholds: thresholds[layer][head].
using XAttentionThresholds = std::vector<std::vector<double>>;

// Parses a threshold file's text (`what` names it in errors): a JSON object
// {"thresholds": [[t, ...], ...]} with one list per layer, each of one threshold per query head
// or of a single threshold for all of the layer's heads; each in [-1, 2]. When `model` gives
// layers and heads, the table must have exactly that many layers and lists of 1 or num_q_heads.
absl::StatusOr<XAttentionThresholds> ParseXAttentionThresholds(const std::string& text,
                                                               const std::string& what,
                                                               const AttentionModelShape& model);

class XAttentionPolicy final : public SparsePrefillPolicy {
 public:
  // `thresholds` empty: config.xattention.threshold everywhere.
  XAttentionPolicy(const PrefillAttentionConfig& config, XAttentionThresholds thresholds);

  std::string_view method() const override { return "xattention"; }

  // The threshold of (layer, query head).
  double Threshold(int32_t layer, int32_t head) const;

 protected:
  int32_t query_block() const override { return config().xattention.block_size; }
  int32_t key_block() const override { return config().xattention.block_size; }
  absl::Status PlanSequence(const AttentionStep& step, int32_t seq, PlanRowWriter& rows) override;

 private:
  XAttentionThresholds thresholds_;
  // Scratch, reused across calls.
  std::vector<float> mass_;
  std::vector<double> row_;
  std::vector<int32_t> selected_, order_, merged_;
  // The device selection (Backend::XAttentionSelect): per-head thresholds, row starts, blocks.
  std::vector<double> thresholds_row_;
  std::vector<int32_t> device_rows_, device_blocks_;
};

// Makes the policy, reading config.xattention.threshold_file if set (errors name the key).
absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeXAttentionPolicy(
    const PrefillAttentionConfig& config, const AttentionModelShape& model);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_ATTENTION_XATTENTION_POLICY_H_
