#include "engine/attention/minference_patterns.h"

#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using json = nlohmann::json;
using kernels::minference::Pattern;

absl::Status Bad(std::string_view source, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("MInference pattern file ", std::string(source), ": ", std::string(what)));
}

bool ParsePatternName(const std::string& name, Pattern* p) {
  if (name == "vertical_and_slash") *p = Pattern::kVerticalSlash;
  else if (name == "stream_llm") *p = Pattern::kAShape;
  else if (name == "block_sparse") *p = Pattern::kBlockSparse;
  else return false;
  return true;
}

}  // namespace

std::string_view MInferencePatternName(Pattern p) {
  switch (p) {
    case Pattern::kVerticalSlash: return "vertical_and_slash";
    case Pattern::kAShape: return "stream_llm";
    case Pattern::kBlockSparse: return "block_sparse";
  }
  return "?";
}

absl::StatusOr<MInferencePatterns> ParseMInferencePatterns(
    std::string_view text, std::string_view source, int32_t num_layers, int32_t num_q_heads,
    const MInferenceHeadPattern& default_pattern) {
  json doc = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return Bad(source, "not valid JSON");
  const json* layers = &doc;
  if (doc.is_object()) {
    if (doc.contains("format") && doc["format"] != "sieve-minference-patterns") {
      return Bad(source, "\"format\" is not \"sieve-minference-patterns\"");
    }
    if (doc.contains("version") && doc["version"] != 1) {
      return Bad(source, absl::StrCat("unsupported \"version\" ", doc["version"].dump(),
                                      " (this build reads version 1)"));
    }
    if (doc.contains("num_q_heads") && doc["num_q_heads"] != num_q_heads) {
      return Bad(source, absl::StrCat("written for ", doc["num_q_heads"].dump(),
                                      " query heads; the model has ", num_q_heads));
    }
    if (!doc.contains("layers")) return Bad(source, "the object has no \"layers\" list");
    layers = &doc["layers"];
  }
  if (!layers->is_array()) {
    return Bad(source, "expected a list of layers (or an object with a \"layers\" list)");
  }
  if (static_cast<int64_t>(layers->size()) != num_layers) {
    return Bad(source, absl::StrCat("has ", layers->size(), " layers; the model has ", num_layers));
  }
  MInferencePatterns out(num_layers, std::vector<MInferenceHeadPattern>(num_q_heads, default_pattern));
  for (int32_t l = 0; l < num_layers; ++l) {
    const json& layer = (*layers)[l];
    if (!layer.is_object()) {
      return Bad(source, absl::StrCat("layer ", l, " is not an object of head id -> pattern"));
    }
    for (const auto& [key, entry] : layer.items()) {
      const std::string where = absl::StrCat("layer ", l, " head \"", key, "\"");
      int32_t head = -1;
      if (!absl::SimpleAtoi(key, &head) || head < 0 || head >= num_q_heads) {
        return Bad(source, absl::StrCat(where, ": not a query head id in [0, ", num_q_heads, ")"));
      }
      if (!entry.is_array() || entry.size() < 3 || entry.size() > 4 || !entry[0].is_string()) {
        return Bad(source, absl::StrCat(where, ": expected [pattern, size, size] or [pattern, "
                                               "size, size, score]"));
      }
      MInferenceHeadPattern p;
      if (!ParsePatternName(entry[0].get<std::string>(), &p.pattern)) {
        return Bad(source, absl::StrCat(where, ": unknown pattern ", entry[0].dump(),
                                        " (vertical_and_slash, stream_llm, block_sparse)"));
      }
      const int64_t min_b = p.pattern == Pattern::kBlockSparse ? 0 : 1;
      for (int i : {1, 2}) {
        if (!entry[i].is_number_integer() || entry[i].get<int64_t>() < (i == 1 ? 1 : min_b) ||
            entry[i].get<int64_t>() > (int64_t{1} << 30)) {
          return Bad(source, absl::StrCat(where, ": size ", entry[i].dump(), " must be an integer >= ",
                                          i == 1 ? 1 : min_b));
        }
      }
      if (entry.size() == 4 && !entry[3].is_number()) {
        return Bad(source, absl::StrCat(where, ": score ", entry[3].dump(), " is not a number"));
      }
      p.vertical_size = static_cast<int32_t>(entry[1].get<int64_t>());
      p.slash_size = static_cast<int32_t>(entry[2].get<int64_t>());
      out[l][head] = p;
    }
  }
  return out;
}

absl::StatusOr<MInferencePatterns> LoadMInferencePatterns(
    const std::string& path, int32_t num_layers, int32_t num_q_heads,
    const MInferenceHeadPattern& default_pattern) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("MInference pattern file ", path, ": cannot open"));
  std::stringstream text;
  text << in.rdbuf();
  return ParseMInferencePatterns(text.str(), path, num_layers, num_q_heads, default_pattern);
}

std::string MInferencePatternsToJson(const MInferencePatterns& patterns,
                                     const std::vector<std::vector<int64_t>>& scores,
                                     std::string_view calibration_json) {
  json doc = json::object();
  doc["format"] = "sieve-minference-patterns";
  doc["version"] = 1;
  doc["num_layers"] = patterns.size();
  doc["num_q_heads"] = patterns.empty() ? 0 : patterns[0].size();
  if (!calibration_json.empty()) {
    doc["calibration"] = json::parse(calibration_json.begin(), calibration_json.end(), nullptr, false);
  }
  json layers = json::array();
  for (size_t l = 0; l < patterns.size(); ++l) {
    json layer = json::object();
    for (size_t h = 0; h < patterns[l].size(); ++h) {
      const MInferenceHeadPattern& p = patterns[l][h];
      const int64_t score = l < scores.size() && h < scores[l].size() ? scores[l][h] : 0;
      layer[std::to_string(h)] = json::array(
          {std::string(MInferencePatternName(p.pattern)), p.vertical_size, p.slash_size, score});
    }
    layers.push_back(std::move(layer));
  }
  doc["layers"] = std::move(layers);
  return doc.dump(1) + "\n";
}

}  // namespace sieve::engine
