#include "cli/calibrate.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/options.h"
#include "engine/attention/attention_policy.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine_config.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/tokenizer.h"
#include "kernels/sparse/minference_search.h"
#include "nlohmann/json.hpp"

namespace sieve::cli {
namespace {

namespace mi = kernels::minference;

constexpr char kUsage[] = R"(usage: sieve calibrate --method minference --model DIR --text FILE --output FILE

Runs MInference's offline, kernel-aware pattern search on the model in DIR: the model prefills
the text of FILE (its first --max-tokens tokens) on the cpu backend, and at every layer each
query head gets the first candidate pattern (A-shape (100, 800); vertical-slash (30, 800),
(100, 800), (100, 750), (500, 700), (3500, 100), (1000, 4096); block-sparse top-100) whose
attention output, through the real plan builder and kernel, has the fewest elements off dense
attention by more than --threshold. Writes the per-head pattern file that
attention.prefill.minference.pattern_file reads (format: engine/attention/minference_patterns.h).

options:
  --max-tokens N     calibration tokens at most (default 30000)
  --threshold T      error threshold per output element (default 0.005)
  --threads N        CPU threads (default: all)
  --page-size N      KV page size (default 16)
  --no-bos           do not add the tokenizer's special tokens (BOS)
)";

// Converts a one-sequence MInference plan into the engine's AttentionPlan.
void ToAttentionPlan(mi::MInferencePlan& m, engine::AttentionPlan& plan) {
  plan.dense = false;
  plan.query_block = mi::kBlock;
  plan.key_block = mi::kBlock;
  std::swap(plan.query_block_start, m.query_block_start);
  std::swap(plan.row_start, m.row_start);
  std::swap(plan.key_blocks, m.key_blocks);
  std::swap(plan.column_start, m.column_start);
  std::swap(plan.columns, m.columns);
}

// The calibration policy: at each layer, dense and every candidate through the backend's own
// estimator and attention kernel, errors counted per head; the forward pass itself stays dense.
class CalibrationPolicy final : public engine::AttentionPolicy {
 public:
  CalibrationPolicy(std::vector<mi::HeadPattern> candidates, int32_t num_layers, float threshold)
      : candidates_(std::move(candidates)), threshold_(threshold),
        errors_(num_layers) {}

  std::string_view method() const override { return "minference-calibration"; }

  absl::Status Plan(const engine::AttentionStep& step, engine::AttentionPlan& plan) override {
    engine::Backend& backend = *step.backend;
    const engine::AttentionShape& s = step.shape;
    const int64_t tokens = step.layout->num_tokens();
    const int64_t cols = int64_t{s.num_q_heads} * s.head_dim;
    if (step.layout->num_seqs() != 1) return absl::InternalError("calibration runs one sequence");
    if (out_.empty() || out_.rows < tokens) {
      SIEVE_ASSIGN_OR_RETURN(out_, backend.Allocate(tokens, cols));
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    const engine::Tensor out = out_.FirstRows(tokens);
    dense_.resize(tokens * cols);
    sparse_.resize(tokens * cols);
    plan.SetDense();
    SIEVE_RETURN_IF_ERROR(backend.Attention(*step.stream, step.layer, step.q, s, scale, plan, out));
    SIEVE_RETURN_IF_ERROR(backend.CopyToHost(*step.stream, out, absl::MakeSpan(dense_)));
    std::vector<std::vector<int64_t>>& errors = errors_.at(step.layer);
    errors.assign(s.num_q_heads, std::vector<int64_t>(candidates_.size(), 0));
    for (size_t c = 0; c < candidates_.size(); ++c) {
      const std::vector<mi::HeadPattern> pats(s.num_q_heads, candidates_[c]);
      engine::MInferenceEstimate e;
      e.seq = 0;
      e.patterns = pats;
      SIEVE_RETURN_IF_ERROR(
          backend.MInferenceIndex(*step.stream, step.layer, step.q, s, e, mplan_));
      ToAttentionPlan(mplan_, plan);
      SIEVE_RETURN_IF_ERROR(backend.Attention(*step.stream, step.layer, step.q, s, scale, plan, out));
      SIEVE_RETURN_IF_ERROR(backend.CopyToHost(*step.stream, out, absl::MakeSpan(sparse_)));
      std::vector<int64_t> per_head(s.num_q_heads, 0);
      mi::CountErrors(dense_.data(), sparse_.data(), tokens, s.num_q_heads, s.head_dim,
                      threshold_, per_head.data());
      for (int h = 0; h < s.num_q_heads; ++h) errors[h][c] = per_head[h];
    }
    plan.SetDense();
    return absl::OkStatus();
  }

  // [layer][head][candidate].
  const std::vector<std::vector<std::vector<int64_t>>>& errors() const { return errors_; }

 private:
  std::vector<mi::HeadPattern> candidates_;
  float threshold_;
  std::vector<std::vector<std::vector<int64_t>>> errors_;
  engine::Tensor out_;
  std::vector<float> dense_, sparse_;
  mi::MInferencePlan mplan_;
};

absl::StatusOr<std::string> ReadFile(const std::string& path, std::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(std::string(what), " ", path, ": cannot open"));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string CandidateName(const mi::HeadPattern& p) {
  return absl::StrCat(std::string(engine::MInferencePatternName(p.pattern)), "(", p.vertical_size,
                      ",", p.slash_size, ")");
}

}  // namespace

absl::StatusOr<CalibrationResult> CalibrateMInference(const CalibrateOptions& o) {
  if (o.method != "minference") {
    return absl::InvalidArgumentError(absl::StrCat("--method: unknown method '", o.method,
                                                   "' (calibrate knows: minference)"));
  }
  if (o.model_dir.empty()) return absl::InvalidArgumentError("--model DIR is required");
  if (o.text_path.empty()) return absl::InvalidArgumentError("--text FILE is required");
  if (o.max_tokens < 2) return absl::InvalidArgumentError("--max-tokens must be >= 2");
  if (o.page_size < 1) return absl::InvalidArgumentError("--page-size must be >= 1");
  if (!(o.threshold > 0)) return absl::InvalidArgumentError("--threshold must be > 0");
  SIEVE_ASSIGN_OR_RETURN(const std::string text, ReadFile(o.text_path, "--text"));
  SIEVE_ASSIGN_OR_RETURN(auto tokenizer, engine::Tokenizer::FromDirectory(o.model_dir));
  SIEVE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer->Encode(text, o.add_special_tokens));
  SIEVE_ASSIGN_OR_RETURN(const engine::ModelConfig config,
                         engine::ModelConfig::FromFile(o.model_dir + "/config.json"));
  const int64_t limit = std::min<int64_t>(o.max_tokens, config.max_position_embeddings);
  if (static_cast<int64_t>(ids.size()) > limit) ids.resize(limit);
  if (ids.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat("--text ", o.text_path, ": ", ids.size(),
                                                   " tokens; the search needs at least 2"));
  }
  const int32_t n = static_cast<int32_t>(ids.size());

  engine::ModelRunnerOptions ro = engine::RunnerOptionsFor(engine::EngineConfig());
  ro.backend = "cpu";
  ro.weights = "checkpoint";
  ro.num_threads = o.threads;
  ro.page_size = o.page_size;
  ro.num_pages = (n + o.page_size - 1) / o.page_size;
  ro.max_step_tokens = n;
  ro.max_step_logits = 1;
  ro.cuda_graphs = false;
  SIEVE_ASSIGN_OR_RETURN(auto runner, engine::ModelRunner::Load(o.model_dir, ro));
  const int32_t layers = static_cast<int32_t>(config.num_hidden_layers);
  const int32_t heads = static_cast<int32_t>(config.num_attention_heads);
  const std::vector<mi::HeadPattern> candidates = mi::DefaultSearchCandidates();
  auto owned = std::make_unique<CalibrationPolicy>(candidates, layers, o.threshold);
  CalibrationPolicy* policy = owned.get();
  SIEVE_ASSIGN_OR_RETURN(auto worker, runner->CreateWorker({}, std::move(owned)));
  std::vector<int32_t> pages(ro.num_pages);
  for (int32_t i = 0; i < ro.num_pages; ++i) pages[i] = i;
  engine::SequenceStep step;
  step.tokens = ids;
  step.num_cached = 0;
  step.pages = pages;
  step.want_logits = false;
  std::vector<float> logits;
  SIEVE_RETURN_IF_ERROR(worker->Forward({step}, logits));

  CalibrationResult r;
  r.tokens = n;
  r.patterns.assign(layers, std::vector<mi::HeadPattern>(heads));
  r.errors.assign(layers, std::vector<int64_t>(heads, 0));
  nlohmann::json per_layer = nlohmann::json::array();
  for (int32_t l = 0; l < layers; ++l) {
    const auto& e = policy->errors().at(l);
    if (static_cast<int32_t>(e.size()) != heads) {
      return absl::InternalError(absl::StrCat("layer ", l, " was not calibrated"));
    }
    nlohmann::json layer = nlohmann::json::array();
    for (int32_t h = 0; h < heads; ++h) {
      const int32_t best = mi::BestCandidate(e[h]);
      r.patterns[l][h] = candidates[best];
      r.errors[l][h] = e[h][best];
      layer.push_back(e[h]);
    }
    per_layer.push_back(std::move(layer));
  }
  nlohmann::json cand = nlohmann::json::array();
  for (const auto& c : candidates) cand.push_back(CandidateName(c));
  nlohmann::json calibration = {
      {"method", "minference"},
      {"objective", "output elements with |sparse - dense| > threshold (v2), first lowest"},
      {"threshold", o.threshold},
      {"model", o.model_dir},
      {"text", o.text_path},
      {"tokens", n},
      {"candidates", cand},
      {"errors", per_layer}};
  r.file_text = engine::MInferencePatternsToJson(r.patterns, r.errors, calibration.dump());
  if (!o.output_path.empty()) {
    std::ofstream out(o.output_path, std::ios::binary | std::ios::trunc);
    if (!out) return absl::NotFoundError(absl::StrCat("--output ", o.output_path, ": cannot write"));
    out << r.file_text;
    if (!out.good()) return absl::InternalError(absl::StrCat("--output ", o.output_path, ": write failed"));
  }
  return r;
}

int RunCalibrate(int argc, char** argv) {
  CalibrateOptions o;
  o.method.clear();
  Args args(argc, argv);
  auto fail = [](const absl::Status& s) {
    std::cerr << "sieve: " << s.message() << "\n" << kUsage;
    return 2;
  };
  while (args.more()) {
    const std::string_view a = args.Next();
    if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      return 0;
    }
    absl::Status st;
    auto str = [&](std::string& dst) {
      auto v = args.Value(a);
      if (v.ok()) dst = *v; else st = v.status();
    };
    if (a == "--method") str(o.method);
    else if (a == "--model") str(o.model_dir);
    else if (a == "--text") str(o.text_path);
    else if (a == "--output") str(o.output_path);
    else if (a == "--max-tokens") {
      auto v = args.Number<int32_t>(a);
      if (v.ok()) o.max_tokens = *v; else st = v.status();
    } else if (a == "--page-size") {
      auto v = args.Number<int32_t>(a);
      if (v.ok()) o.page_size = *v; else st = v.status();
    } else if (a == "--threads") {
      auto v = args.Number<int32_t>(a);
      if (v.ok()) o.threads = *v; else st = v.status();
    } else if (a == "--threshold") {
      auto v = args.Number<float>(a);
      if (v.ok()) o.threshold = *v; else st = v.status();
    } else if (a == "--no-bos") {
      o.add_special_tokens = false;
    } else {
      st = absl::InvalidArgumentError(absl::StrCat("unknown option '", std::string(a), "'"));
    }
    if (!st.ok()) return fail(st);
  }
  if (o.method.empty()) return fail(absl::InvalidArgumentError("--method is required (minference)"));
  if (o.output_path.empty()) return fail(absl::InvalidArgumentError("--output FILE is required"));
  auto r = CalibrateMInference(o);
  if (!r.ok()) {
    std::cerr << "sieve: calibrate: " << r.status() << "\n";
    return absl::IsInvalidArgument(r.status()) ? 2 : 1;
  }
  std::map<std::string, int> counts;
  for (const auto& layer : r->patterns) {
    for (const auto& p : layer) ++counts[CandidateName(p)];
  }
  std::vector<std::string> parts;
  for (const auto& [name, count] : counts) parts.push_back(absl::StrCat(name, " x", count));
  std::cerr << "[sieve] calibrated " << r->patterns.size() << " layers on " << r->tokens
            << " tokens: " << absl::StrJoin(parts, ", ") << "\n[sieve] wrote " << o.output_path
            << "\n";
  return 0;
}

}  // namespace sieve::cli
