// AttentionConfig: the attention settings of both pools (`attention.*` keys; EngineConfig holds
// one, and the daemon's key table binds the keys to these members), and what the attention
// policies are made from (MakeAttentionPolicy, attention_policy.h). It lives here, below the
// serving room, so that the policies can take their own settings.
//
// Thread-safety: plain values.
#ifndef SIEVE_ENGINE_ATTENTION_ATTENTION_CONFIG_H_
#define SIEVE_ENGINE_ATTENTION_ATTENTION_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

namespace sieve::engine {

// XAttention settings (`attention.prefill.xattention.*`); ../shared SPARSE_ATTENTION.md section 2.
struct XAttentionConfig {
  // Antidiagonal stride S: queries and keys are scored in groups of S tokens (4, 8 or 16).
  int32_t stride = 16;
  // Cumulative block-mass threshold tau: each (head, query block) keeps the fewest key blocks
  // whose estimated mass, with the forced first and diagonal blocks, reaches tau of the row's.
  // > 1 keeps every causal block (dense); <= 0 only the forced ones.
  double threshold = 0.9;
  // Query and key block size B in tokens (a multiple of stride); the reference uses 128.
  int32_t block_size = 128;
  // Optional per-(layer, head) thresholds replacing `threshold` (engine/attention/README.md
  // gives the format); empty: `threshold` everywhere.
  std::string threshold_file;

  bool operator==(const XAttentionConfig&) const = default;
};

// MInference settings (`attention.prefill.minference.*`); ../shared SPARSE_ATTENTION.md section 1.
struct MInferenceConfig {
  // Optional per-(layer, head) pattern file (minference_patterns.h gives the format; `sieve
  // calibrate --method minference` writes one); empty: every head vertical-slash with the sizes
  // below. Heads the file omits use them too.
  std::string pattern_file;
  // Vertical-slash budgets: key columns and diagonals kept per head (at least 30 and 50 are
  // kept whatever is set; the first 30 columns and 100 diagonals always).
  int32_t vertical_size = 1000;
  int32_t slash_size = 6096;
  // Queries (the last of each chunk) the vertical-slash estimate scores against the keys.
  int32_t last_q = 64;

  bool operator==(const MInferenceConfig&) const = default;
};

// Prefill attention (`attention.prefill.*`).
struct PrefillAttentionConfig {
  // One of kPrefillAttentionMethods (attention_methods.h).
  std::string method = "dense";
  // A sequence's prefill chunk runs sparse only when its KV length (cached + new tokens) is
  // above this many tokens; shorter ones attend densely (sparse would not pay). Tokens.
  int32_t sparse_min_tokens = 8192;
  // The first this many layers always attend densely.
  int32_t dense_layers = 0;
  // A step whose sparse sequences' plan reads more than this fraction of their causal pairs runs
  // dense instead (the estimate is spent, but the block-sparse kernel would cost more than the
  // dense one it saves). In [0, 1]; 1: never; 0: the backend's break-even
  // (AutoPrefillMaxDensity: cpu 0.9; cuda 0.8 for XAttention, 0.4 for MInference), resolved when
  // the engine starts.
  double max_density = 0;
  XAttentionConfig xattention;
  MInferenceConfig minference;

  // Appends one line per invalid setting, naming its key, to `errors`.
  void Validate(std::vector<std::string>& errors) const;

  bool operator==(const PrefillAttentionConfig&) const = default;
};

// Quest's own decode settings (`attention.decode.quest.*`); SPARSE_ATTENTION.md section 3.
struct QuestDecodeConfig {
  // Select one page set per KV head (the largest bound over its query heads) instead of one per
  // query head (the reference semantics, the default): reads each selected page once per group.
  bool per_kv_head = false;

  bool operator==(const QuestDecodeConfig&) const = default;
};

// DoubleSparsity's own decode settings (`attention.decode.double_sparsity.*`).
struct DoubleSparsityDecodeConfig {
  // The calibration file `sieve calibrate --method double-sparsity` wrote for this model. Empty:
  // calibrate at start-up on the model directory's calibration.txt (the embedded model ships
  // one), or refuse to start when there is none.
  std::string calibration_file;
  // Outlier channels kept per label head (r; 16 of 128 is the paper's headline setting).
  int32_t channels = 16;
  // Label precision: 16 (fp16) or 4 (4-bit min-max codes per token and head).
  int32_t label_bits = 16;
  // One channel list, label row and token set per KV head (ranked by the summed scores of its
  // query heads) instead of per query head (the reference semantics, the default); reads each
  // selected token once per group.
  bool per_kv_head = false;
  // The statistic a start-up calibration ranks channels by: qk, q or k (section 4.2).
  std::string statistic = "qk";

  bool operator==(const DoubleSparsityDecodeConfig&) const = default;
};

// Decode attention (`attention.decode.*`).
struct DecodeAttentionConfig {
  // One of kDecodeAttentionMethods.
  std::string method = "dense";
  // Sparse methods read every key of a sequence whose context is this long or shorter. Tokens.
  int32_t sparse_min_tokens = 4096;
  // Keys each query head of a sequence reads under a sparse method (Quest: whole pages, the
  // last page included; at least two pages, which EngineConfig checks against the page size).
  int32_t token_budget = 4096;
  // The first layers always read every key (Quest's paper keeps two dense).
  int32_t dense_layers = 2;
  QuestDecodeConfig quest;
  DoubleSparsityDecodeConfig double_sparsity;

  // Appends one line per invalid setting, naming its key, to `errors`.
  void Validate(std::vector<std::string>& errors) const;

  bool operator==(const DecodeAttentionConfig&) const = default;
};

// The attention policy per phase (`attention.*`), from which the engine builds its attention
// policies.
struct AttentionConfig {
  PrefillAttentionConfig prefill;
  DecodeAttentionConfig decode;
  // Which attention kernels execute the plans, one of kAttentionKernels (engine_config.h):
  // "auto" (the fastest kernel that applies to each step) or "simple" (cuda: the simple kernel
  // for every step, a cross-check of the fast ones). The cpu backend has one kernel: auto only.
  std::string kernel = "auto";

  // The policy in words, as ModelInfo::attention_policy reports it: "prefill=dense
  // decode=dense", with a sparse method's settings after its name in parentheses, e.g.
  // "prefill=xattention(stride=16,threshold=0.9,block=128,min_tokens=8192,dense_layers=0)" or
  // "decode=quest(budget=4096,min_tokens=4096,dense_layers=2,per_kv_head=0)".
  std::string Describe() const;

  bool operator==(const AttentionConfig&) const = default;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_ATTENTION_ATTENTION_CONFIG_H_
