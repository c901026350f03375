// The DoubleSparsity calibration file (double_sparsity_calibration.h).
#include "engine/attention/double_sparsity_calibration.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using Json = nlohmann::json;

absl::Status Bad(std::string_view what, std::string_view key, std::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(std::string(what),
                                                 ": DoubleSparsity calibration: ",
                                                 std::string(key), " ", std::string(problem)));
}

// A non-negative integer field.
absl::StatusOr<int64_t> Int(const Json& j, const char* key, std::string_view what, int64_t min) {
  if (!j.contains(key)) return Bad(what, key, "is missing");
  const Json& v = j.at(key);
  if (!v.is_number_integer()) return Bad(what, key, "must be an integer");
  const int64_t x = v.get<int64_t>();
  if (x < min || x > (int64_t{1} << 40)) {
    return Bad(what, key, absl::StrCat("is ", x, ", must be at least ", min));
  }
  return x;
}

}  // namespace

int DsCalibration::heads() const {
  return statistic == kernels::DsStatistic::kK ? num_kv_heads : num_q_heads;
}

std::vector<int32_t> DsCalibration::LabelChannels(int layer, int r, bool per_kv_head) const {
  const int group = num_q_heads / num_kv_heads;
  const bool rows_are_kv = statistic == kernels::DsStatistic::kK;
  const int label_heads = per_kv_head ? num_kv_heads : num_q_heads;
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(label_heads) * r);
  for (int lh = 0; lh < label_heads; ++lh) {
    std::vector<int32_t> rank;
    if (rows_are_kv) {
      rank = channels[layer][per_kv_head ? lh : lh / group];
    } else if (!per_kv_head) {
      rank = channels[layer][lh];
    } else {
      std::vector<double> sum(head_dim, 0.0);
      for (int h = lh * group; h < (lh + 1) * group; ++h) {
        for (int c = 0; c < head_dim; ++c) sum[c] += means[layer][h][c];
      }
      rank = kernels::DsRankChannels(sum);
    }
    out.insert(out.end(), rank.begin(), rank.begin() + r);
  }
  return out;
}

std::string_view DsStatisticName(kernels::DsStatistic s) {
  switch (s) {
    case kernels::DsStatistic::kQ: return "q";
    case kernels::DsStatistic::kK: return "k";
    case kernels::DsStatistic::kQK: return "qk";
  }
  return "?";
}

absl::StatusOr<kernels::DsStatistic> ParseDsStatistic(std::string_view name) {
  if (name == "q") return kernels::DsStatistic::kQ;
  if (name == "k") return kernels::DsStatistic::kK;
  if (name == "qk") return kernels::DsStatistic::kQK;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown DoubleSparsity statistic '", std::string(name),
                   "' (expected q, k or qk)"));
}

DsCalibration DsCalibrationFromStats(const std::vector<kernels::DsChannelStats>& layers,
                                     int num_q_heads, int num_kv_heads, std::string source) {
  DsCalibration c;
  c.statistic = layers.at(0).statistic();
  c.num_layers = static_cast<int32_t>(layers.size());
  c.num_q_heads = num_q_heads;
  c.num_kv_heads = num_kv_heads;
  c.head_dim = layers[0].head_dim();
  c.calibration_tokens = layers[0].tokens();
  c.source = std::move(source);
  for (const kernels::DsChannelStats& l : layers) {
    auto& ch = c.channels.emplace_back();
    auto& mu = c.means.emplace_back();
    for (int h = 0; h < l.heads(); ++h) {
      mu.push_back(l.Means(h));
      ch.push_back(kernels::DsRankChannels(mu.back()));
    }
  }
  return c;
}

absl::StatusOr<DsCalibration> ParseDsCalibration(std::string_view text, std::string_view what) {
  Json j = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad(what, "the file", "is not valid JSON");
  if (!j.is_object()) return Bad(what, "the file", "must hold one JSON object");
  if (!j.contains("format") || !j["format"].is_string() ||
      j["format"].get<std::string>() != kDsCalibrationFormat) {
    return Bad(what, "format", absl::StrCat("must be \"", std::string(kDsCalibrationFormat), "\""));
  }
  if (!j.contains("version") || j["version"] != 1) return Bad(what, "version", "must be 1");
  if (!j.contains("statistic") || !j["statistic"].is_string()) {
    return Bad(what, "statistic", "is missing or not a string (q, k or qk)");
  }
  DsCalibration c;
  absl::StatusOr<kernels::DsStatistic> stat = ParseDsStatistic(j["statistic"].get<std::string>());
  if (!stat.ok()) return Bad(what, "statistic", std::string(stat.status().message()));
  c.statistic = *stat;
  absl::StatusOr<int64_t> v;
  if (!(v = Int(j, "num_layers", what, 1)).ok()) return v.status();
  c.num_layers = static_cast<int32_t>(*v);
  if (!(v = Int(j, "num_q_heads", what, 1)).ok()) return v.status();
  c.num_q_heads = static_cast<int32_t>(*v);
  if (!(v = Int(j, "num_kv_heads", what, 1)).ok()) return v.status();
  c.num_kv_heads = static_cast<int32_t>(*v);
  if (c.num_q_heads % c.num_kv_heads != 0) {
    return Bad(what, "num_kv_heads", "must divide num_q_heads");
  }
  if (!(v = Int(j, "head_dim", what, 1)).ok()) return v.status();
  c.head_dim = static_cast<int32_t>(*v);
  if (!(v = Int(j, "calibration_tokens", what, 1)).ok()) return v.status();
  c.calibration_tokens = *v;
  if (j.contains("source")) {
    if (!j["source"].is_string()) return Bad(what, "source", "must be a string");
    c.source = j["source"].get<std::string>();
  }
  if (!j.contains("layers") || !j["layers"].is_array() ||
      j["layers"].size() != static_cast<size_t>(c.num_layers)) {
    return Bad(what, "layers", absl::StrCat("must be an array of num_layers (", c.num_layers,
                                            ") objects"));
  }
  const size_t heads = static_cast<size_t>(c.heads()), d = static_cast<size_t>(c.head_dim);
  for (int l = 0; l < c.num_layers; ++l) {
    const Json& layer = j["layers"][l];
    const std::string at = absl::StrCat("layers[", l, "]");
    for (const char* key : {"channels", "means"}) {
      if (!layer.is_object() || !layer.contains(key) || !layer[key].is_array() ||
          layer[key].size() != heads) {
        return Bad(what, absl::StrCat(at, ".", key),
                   absl::StrCat("must be an array of ", heads, " heads (",
                                c.statistic == kernels::DsStatistic::kK ? "num_kv_heads"
                                                                        : "num_q_heads",
                                ")"));
      }
    }
    auto& ch = c.channels.emplace_back(heads);
    auto& mu = c.means.emplace_back(heads);
    for (size_t h = 0; h < heads; ++h) {
      const Json& perm = layer["channels"][h];
      const Json& mean = layer["means"][h];
      const std::string key = absl::StrCat(at, ".channels[", h, "]");
      if (!perm.is_array() || perm.size() != d) {
        return Bad(what, key, absl::StrCat("must list head_dim (", d, ") channels"));
      }
      std::vector<char> seen(d, 0);
      for (const Json& x : perm) {
        if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() >= c.head_dim ||
            seen[x.get<int64_t>()]++) {
          return Bad(what, key, "must be a permutation of 0..head_dim-1");
        }
        ch[h].push_back(x.get<int32_t>());
      }
      if (!mean.is_array() || mean.size() != d) {
        return Bad(what, absl::StrCat(at, ".means[", h, "]"),
                   absl::StrCat("must hold head_dim (", d, ") numbers"));
      }
      for (const Json& x : mean) {
        if (!x.is_number()) return Bad(what, absl::StrCat(at, ".means[", h, "]"), "must be numbers");
        mu[h].push_back(x.get<double>());
      }
    }
  }
  return c;
}

absl::StatusOr<DsCalibration> LoadDsCalibration(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat(path, ": cannot read the DoubleSparsity calibration file"));
  }
  std::stringstream text;
  text << in.rdbuf();
  return ParseDsCalibration(text.str(), path);
}

std::string DsCalibrationToJson(const DsCalibration& c) {
  Json j;
  j["format"] = kDsCalibrationFormat;
  j["version"] = 1;
  j["statistic"] = DsStatisticName(c.statistic);
  j["num_layers"] = c.num_layers;
  j["num_q_heads"] = c.num_q_heads;
  j["num_kv_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["calibration_tokens"] = c.calibration_tokens;
  j["source"] = c.source;
  Json layers = Json::array();
  for (int l = 0; l < c.num_layers; ++l) {
    layers.push_back({{"channels", c.channels[l]}, {"means", c.means[l]}});
  }
  j["layers"] = std::move(layers);
  return j.dump() + "\n";
}

absl::Status WriteDsCalibration(const DsCalibration& c, const std::string& path) {
  std::ofstream out(path);
  out << DsCalibrationToJson(c);
  out.close();
  if (!out) return absl::InternalError(absl::StrCat(path, ": cannot write the calibration file"));
  return absl::OkStatus();
}

absl::Status CheckDsCalibrationFits(const DsCalibration& c, int num_layers, int num_q_heads,
                                    int num_kv_heads, int head_dim) {
  const std::pair<const char*, std::pair<int, int>> fields[] = {
      {"num_layers", {c.num_layers, num_layers}},
      {"num_q_heads", {c.num_q_heads, num_q_heads}},
      {"num_kv_heads", {c.num_kv_heads, num_kv_heads}},
      {"head_dim", {c.head_dim, head_dim}}};
  for (const auto& [key, v] : fields) {
    if (v.first != v.second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DoubleSparsity calibration: ", key, " is ", v.first, " but the model has ", v.second,
          " (calibrate this model: sieve calibrate --method double-sparsity)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace sieve::engine
