#include "engine/attention/xattention_policy.h"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "kernels/sparse/xattention.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {

absl::StatusOr<XAttentionThresholds> ParseXAttentionThresholds(const std::string& text,
                                                               const std::string& what,
                                                               const AttentionModelShape& model) {
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto bad = [&what](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", why));
  };
  if (j.is_discarded()) return bad("not valid JSON");
  if (!j.is_object() || !j.contains("thresholds") || !j["thresholds"].is_array()) {
    return bad("expected an object with a \"thresholds\" array of per-layer lists");
  }
  const nlohmann::json& layers = j["thresholds"];
  if (model.num_layers > 0 && static_cast<int32_t>(layers.size()) != model.num_layers) {
    return bad(absl::StrCat("has ", layers.size(), " layers; the model has ", model.num_layers));
  }
  XAttentionThresholds out;
  for (size_t l = 0; l < layers.size(); ++l) {
    const nlohmann::json& row = layers[l];
    if (!row.is_array() || row.empty()) {
      return bad(absl::StrCat("layer ", l, " is not a non-empty list of numbers"));
    }
    if (model.num_q_heads > 0 && row.size() != 1 &&
        static_cast<int32_t>(row.size()) != model.num_q_heads) {
      return bad(absl::StrCat("layer ", l, " has ", row.size(), " thresholds; give 1 or ",
                              model.num_q_heads, " (one per query head)"));
    }
    std::vector<double> values;
    for (const nlohmann::json& v : row) {
      if (!v.is_number() || !(v.get<double>() >= -1 && v.get<double>() <= 2)) {
        return bad(absl::StrCat("layer ", l, " has a threshold that is not a number in [-1, 2]"));
      }
      values.push_back(v.get<double>());
    }
    out.push_back(std::move(values));
  }
  return out;
}

XAttentionPolicy::XAttentionPolicy(const PrefillAttentionConfig& config,
                                   XAttentionThresholds thresholds)
    : SparsePrefillPolicy(config), thresholds_(std::move(thresholds)) {}

double XAttentionPolicy::Threshold(int32_t layer, int32_t head) const {
  if (layer < 0 || layer >= static_cast<int32_t>(thresholds_.size())) {
    return config().xattention.threshold;
  }
  const std::vector<double>& row = thresholds_[layer];
  if (row.size() == 1) return row[0];
  return head < static_cast<int32_t>(row.size()) ? row[head] : config().xattention.threshold;
}

absl::Status XAttentionPolicy::PlanSequence(const AttentionStep& step, int32_t seq,
                                            PlanRowWriter& rows) {
  const XAttentionConfig& x = config().xattention;
  const BatchLayout& l = *step.layout;
  XAttentionEstimate estimate{.seq = seq, .stride = x.stride, .block_size = x.block_size};
  const int32_t B = x.block_size;
  const int32_t kv_len = l.kv_lens[seq];
  const int32_t q_len = l.query_start[seq + 1] - l.query_start[seq];
  const int32_t first = kv_len - q_len;
  const int32_t m0 = first / B, q_blocks = (kv_len - 1) / B - m0 + 1;
  const int32_t k_blocks = (kv_len + B - 1) / B;
  const int32_t heads = step.shape.num_q_heads;
  // The selection on the device where the backend has it (the same sets: the device applies
  // XAttentionSelectBlocks' rule to the same masses), else the masses and the host selection.
  thresholds_row_.resize(heads);
  for (int32_t h = 0; h < heads; ++h) thresholds_row_[h] = Threshold(step.layer, h);
  absl::Status device = step.backend->XAttentionSelect(*step.stream, step.layer, step.q,
                                                       step.shape, estimate, thresholds_row_,
                                                       device_rows_, device_blocks_);
  const bool on_device = device.ok();
  if (on_device) {
    if (static_cast<int64_t>(device_rows_.size()) != int64_t{q_blocks} * heads + 1) {
      return absl::InternalError(absl::StrCat("xattention: the device selection returned ",
                                              device_rows_.size() - 1, " rows, want ", heads,
                                              " x ", q_blocks));
    }
  } else if (device.code() != absl::StatusCode::kUnimplemented) {
    return device;
  } else {
    SIEVE_RETURN_IF_ERROR(step.backend->XAttentionBlockMass(*step.stream, step.layer, step.q,
                                                            step.shape, estimate, mass_));
    if (static_cast<int64_t>(mass_.size()) != int64_t{heads} * q_blocks * k_blocks) {
      return absl::InternalError(absl::StrCat("xattention: the estimator returned ",
                                              mass_.size(), " block masses, want ", heads, " x ",
                                              q_blocks, " x ", k_blocks));
    }
  }
  for (int32_t j = 0; j * B < q_len; ++j) {
    // The absolute query blocks plan row j's queries fall in.
    const int32_t lo = (first + j * B) / B;
    const int32_t hi = (first + std::min(q_len, (j + 1) * B) - 1) / B;
    for (int32_t h = 0; h < heads; ++h) {
      merged_.clear();
      for (int32_t m = lo; m <= hi; ++m) {
        if (on_device) {
          const int64_t r = int64_t{m - m0} * heads + h;
          merged_.insert(merged_.end(), device_blocks_.begin() + device_rows_[r],
                         device_blocks_.begin() + device_rows_[r + 1]);
          continue;
        }
        const float* mass = mass_.data() + (int64_t{h} * q_blocks + (m - m0)) * k_blocks;
        row_.assign(mass, mass + m + 1);
        kernels::XAttentionSelectBlocks(row_.data(), m, thresholds_row_[h], selected_, order_);
        merged_.insert(merged_.end(), selected_.begin(), selected_.end());
      }
      if (lo != hi) {
        std::sort(merged_.begin(), merged_.end());
        merged_.erase(std::unique(merged_.begin(), merged_.end()), merged_.end());
      }
      rows.AddRow(merged_);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeXAttentionPolicy(
    const PrefillAttentionConfig& config, const AttentionModelShape& model) {
  XAttentionThresholds thresholds;
  const std::string& path = config.xattention.threshold_file;
  if (!path.empty()) {
    const std::string what =
        absl::StrCat("attention.prefill.xattention.threshold_file '", path, "'");
    std::ifstream in(path);
    if (!in) return absl::InvalidArgumentError(absl::StrCat(what, ": cannot be read"));
    std::stringstream text;
    text << in.rdbuf();
    SIEVE_ASSIGN_OR_RETURN(thresholds, ParseXAttentionThresholds(text.str(), what, model));
  }
  return std::unique_ptr<AttentionPolicy>(new XAttentionPolicy(config, std::move(thresholds)));
}

}  // namespace sieve::engine
