#include "engine/attention/attention_config.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/attention/attention_methods.h"

namespace sieve::engine {

void PrefillAttentionConfig::Validate(std::vector<std::string>& errors) const {
  if (std::find(std::begin(kPrefillAttentionMethods), std::end(kPrefillAttentionMethods),
                method) == std::end(kPrefillAttentionMethods)) {
    std::vector<std::string> names(std::begin(kPrefillAttentionMethods),
                                   std::end(kPrefillAttentionMethods));
    errors.push_back(absl::StrCat("attention.prefill.method must be one of: ",
                                  absl::StrJoin(names, ", "), ", got '", method, "'"));
  }
  if (sparse_min_tokens < 0) {
    errors.push_back(absl::StrCat("attention.prefill.sparse_min_tokens must be at least 0, got ",
                                  sparse_min_tokens));
  }
  if (dense_layers < 0) {
    errors.push_back(
        absl::StrCat("attention.prefill.dense_layers must be at least 0, got ", dense_layers));
  }
  if (!(max_density >= 0 && max_density <= 1)) {
    errors.push_back(absl::StrCat(
        "attention.prefill.max_density must be in [0, 1] (0: the backend's), got ", max_density));
  }
  const XAttentionConfig& x = xattention;
  if (x.stride != 4 && x.stride != 8 && x.stride != 16) {
    errors.push_back(absl::StrCat("attention.prefill.xattention.stride must be 4, 8 or 16, got ",
                                  x.stride));
  }
  if (x.block_size < 16 || x.block_size > 1024 || (x.stride > 0 && x.block_size % x.stride != 0)) {
    errors.push_back(absl::StrCat(
        "attention.prefill.xattention.block_size must be in [16, 1024] and a multiple of "
        "attention.prefill.xattention.stride (",
        x.stride, "), got ", x.block_size));
  }
  if (!(x.threshold >= -1 && x.threshold <= 2)) {
    errors.push_back(absl::StrCat(
        "attention.prefill.xattention.threshold must be in [-1, 2] (> 1: dense), got ",
        x.threshold));
  }
  const MInferenceConfig& m = minference;
  if (m.vertical_size < 1 || m.vertical_size > (1 << 30)) {
    errors.push_back(absl::StrCat(
        "attention.prefill.minference.vertical_size must be in [1, 2^30], got ", m.vertical_size));
  }
  if (m.slash_size < 1 || m.slash_size > (1 << 30)) {
    errors.push_back(absl::StrCat(
        "attention.prefill.minference.slash_size must be in [1, 2^30], got ", m.slash_size));
  }
  if (m.last_q < 1 || m.last_q > 4096) {
    errors.push_back(
        absl::StrCat("attention.prefill.minference.last_q must be in [1, 4096], got ", m.last_q));
  }
}

void DecodeAttentionConfig::Validate(std::vector<std::string>& errors) const {
  if (std::find(std::begin(kDecodeAttentionMethods), std::end(kDecodeAttentionMethods),
                method) == std::end(kDecodeAttentionMethods)) {
    std::vector<std::string> names(std::begin(kDecodeAttentionMethods),
                                   std::end(kDecodeAttentionMethods));
    errors.push_back(absl::StrCat("attention.decode.method must be one of: ",
                                  absl::StrJoin(names, ", "), ", got '", method, "'"));
  }
  if (sparse_min_tokens < 0) {
    errors.push_back(absl::StrCat("attention.decode.sparse_min_tokens must be at least 0, got ",
                                  sparse_min_tokens));
  }
  if (token_budget < 1) {
    errors.push_back(
        absl::StrCat("attention.decode.token_budget must be at least 1, got ", token_budget));
  }
  if (dense_layers < 0) {
    errors.push_back(
        absl::StrCat("attention.decode.dense_layers must be at least 0, got ", dense_layers));
  }
  const DoubleSparsityDecodeConfig& ds = double_sparsity;
  if (ds.channels < 1) {
    errors.push_back(absl::StrCat(
        "attention.decode.double_sparsity.channels must be at least 1, got ", ds.channels));
  }
  if (ds.label_bits != 16 && ds.label_bits != 4) {
    errors.push_back(absl::StrCat(
        "attention.decode.double_sparsity.label_bits must be 16 or 4, got ", ds.label_bits));
  }
  if (ds.statistic != "qk" && ds.statistic != "q" && ds.statistic != "k") {
    errors.push_back(absl::StrCat(
        "attention.decode.double_sparsity.statistic must be qk, q or k, got \"", ds.statistic,
        "\""));
  }
}

std::string AttentionConfig::Describe() const {
  std::string prefill_text = prefill.method;
  if (prefill.method == "xattention") {
    const XAttentionConfig& x = prefill.xattention;
    absl::StrAppend(&prefill_text, "(stride=", x.stride, ",threshold=",
                    x.threshold_file.empty() ? absl::StrCat(x.threshold) : "file", ",block=",
                    x.block_size, ",min_tokens=", prefill.sparse_min_tokens,
                    ",dense_layers=", prefill.dense_layers, ",max_density=", prefill.max_density,
                    ")");
  }
  if (prefill.method == "minference") {
    const MInferenceConfig& m = prefill.minference;
    absl::StrAppend(&prefill_text, "(vertical=", m.vertical_size, ",slash=", m.slash_size,
                    ",last_q=", m.last_q, ",patterns=", m.pattern_file.empty() ? "none" : "file",
                    ",min_tokens=", prefill.sparse_min_tokens,
                    ",dense_layers=", prefill.dense_layers, ",max_density=", prefill.max_density,
                    ")");
  }
  std::string decode_text = decode.method;
  if (decode.method == "quest") {
    absl::StrAppend(&decode_text, "(budget=", decode.token_budget,
                    ",min_tokens=", decode.sparse_min_tokens, ",dense_layers=",
                    decode.dense_layers, ",per_kv_head=", decode.quest.per_kv_head ? 1 : 0, ")");
  }
  if (decode.method == "double_sparsity") {
    const DoubleSparsityDecodeConfig& ds = decode.double_sparsity;
    absl::StrAppend(&decode_text, "(budget=", decode.token_budget, ",channels=", ds.channels,
                    ",label_bits=", ds.label_bits, ",per_kv_head=", ds.per_kv_head ? 1 : 0,
                    ",calibration=", ds.calibration_file.empty() ? "startup" : "file",
                    ",min_tokens=", decode.sparse_min_tokens,
                    ",dense_layers=", decode.dense_layers, ")");
  }
  return absl::StrCat("prefill=", prefill_text, " decode=", decode_text);
}

}  // namespace sieve::engine
