// Retrieval fidelity of the attention policies: the engine answers long-context retrieval
// prompts (scripts/retrieval/make_prompt_set.py) with each configured policy, and this program
// reports exact-match accuracy beside time to first token, decode time per token and the
// attention the engine computed: prefill density (the fraction of causal query-key pairs, mean
// over the prefill steps that reported it) and decode KV read (the fraction of the keys dense
// decode would read, mean over decode steps under a sparse decode method). The gate of issue
// 17: a sparse method may be fast, but it must answer what dense attention answers.
//
//   retrieval_fidelity --model models/retrieval --prompts /tmp/prompts.jsonl
//       --policy dense --policy 'xattn-0.9:attention.prefill.method=xattention;...'
//       [--set key=value]... [--answer-in decode|prefill] [--max-prompts N] [--json FILE]
//       [--min-accuracy A] [--expect-same-tokens]
//
// --answer-in decode (the default): the prompt's last token (" is" of "... The code for falcon
// is") is left out; the model generates it from prefill and the answer in the decode step after
// it, so the answer comes from decode attention over the KV that prefill attention wrote: both
// phases' policies decide it. A prompt counts as retrieved when the generated tokens are the
// prompt's last token followed by the answer ids. (Cutting at the question instead and letting
// the model restate it measures the restatement: this model copies the template but not always
// the key, and a wrong key in its own restatement misleads it.) --answer-in prefill: the whole
// prompt is prefilled and the answer is its first generated token(s).
//
// Checks (exit status 1 when one fails, naming the policy and prompt): --min-accuracy A, every
// (policy, length) cell retrieves at least A; --expect-same-tokens, every policy generates the
// first policy's tokens for every prompt (settings that cover every key must equal dense).
//
// --policy NAME[:KEY=VALUE;KEY=VALUE...] adds one configuration (the daemon's config keys, as
// `sieved --set` takes them; ';' separates keys because list values use ','). Every policy
// runs every prompt, one request at a time (greedy, max_tokens = the answer's length), on a
// fresh engine whose KV pool holds the longest prompt. A prompt counts as retrieved when the
// generated ids equal its answer ids. --set applies to every policy first.
//
// Prompt file: JSON lines with "ids" (BOS first) and "answer_ids"; "length" and
// "needle_position" are reported when present.
#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/serving/engine.h"
#include "nlohmann/json.hpp"
#include "server/config.h"

namespace sieve {
namespace {

struct Prompt {
  std::vector<int32_t> ids;
  std::vector<int32_t> answer;
  int64_t length = 0;
  double needle_depth = -1;  // needle position / length, when known
};

struct Policy {
  std::string name;
  std::vector<std::string> overrides;
};

struct Args {
  std::string model;
  std::string prompts;
  std::vector<Policy> policies;
  std::vector<std::string> sets;
  int max_prompts = 0;  // 0: all
  std::string json;
  std::string answer_in = "decode";  // or "prefill"
  double min_accuracy = -1;           // < 0: no check
  bool expect_same_tokens = false;
};

// Means of the attention fractions the engine reports (prefill steps and decode steps arrive
// on different threads).
class AttentionObserver final : public engine::EngineObserver {
 public:
  void OnPrefillAttention(double density, double) override {
    std::lock_guard<std::mutex> l(mu_);
    prefill_sum_ += density;
    ++prefill_n_;
  }
  void OnDecodeAttention(double kv_read_fraction, double) override {
    std::lock_guard<std::mutex> l(mu_);
    decode_sum_ += kv_read_fraction;
    ++decode_n_;
  }
  // (prefill density sum, steps, decode KV fraction sum, steps) since the last call.
  std::array<double, 4> Take() {
    std::lock_guard<std::mutex> l(mu_);
    std::array<double, 4> out = {prefill_sum_, static_cast<double>(prefill_n_), decode_sum_,
                                 static_cast<double>(decode_n_)};
    prefill_sum_ = decode_sum_ = 0;
    prefill_n_ = decode_n_ = 0;
    return out;
  }

 private:
  std::mutex mu_;
  double prefill_sum_ = 0, decode_sum_ = 0;
  int64_t prefill_n_ = 0, decode_n_ = 0;
};



class CollectSink final : public engine::RequestSink {
 public:
  void OnTokens(const engine::TokenDelta& d) override {
    std::lock_guard<std::mutex> l(mu_);
    tokens_.insert(tokens_.end(), d.token_ids.begin(), d.token_ids.end());
  }
  void OnFinish(const engine::RequestOutcome& o) override {
    std::lock_guard<std::mutex> l(mu_);
    outcome_ = o;
    done_ = true;
    cv_.notify_all();
  }
  engine::RequestOutcome Wait(std::vector<int32_t>& tokens) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return done_; });
    tokens = tokens_;
    return outcome_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::vector<int32_t> tokens_;
  engine::RequestOutcome outcome_;
};

int Usage(const char* why) {
  std::fprintf(stderr,
               "retrieval_fidelity: %s\nusage: retrieval_fidelity --model DIR --prompts FILE "
               "[--policy NAME[:KEY=VALUE;...]]... [--set KEY=VALUE]... "
               "[--answer-in decode|prefill] [--max-prompts N] [--json FILE] "
               "[--min-accuracy A] [--expect-same-tokens]\n",
               why);
  return 2;
}

bool ParseArgs(int argc, char** argv, Args& a) {
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--expect-same-tokens") {
      a.expect_same_tokens = true;
      continue;
    }
    if (i + 1 >= argc) return false;
    const std::string v = argv[++i];
    if (flag == "--model") {
      a.model = v;
    } else if (flag == "--prompts") {
      a.prompts = v;
    } else if (flag == "--policy") {
      Policy p;
      const size_t colon = v.find(':');
      p.name = v.substr(0, colon);
      if (colon != std::string::npos) {
        for (absl::string_view kv : absl::StrSplit(v.substr(colon + 1), ';', absl::SkipEmpty())) {
          p.overrides.emplace_back(kv);
        }
      }
      a.policies.push_back(std::move(p));
    } else if (flag == "--set") {
      a.sets.push_back(v);
    } else if (flag == "--max-prompts") {
      if (!absl::SimpleAtoi(v, &a.max_prompts) || a.max_prompts < 0) return false;
    } else if (flag == "--json") {
      a.json = v;
    } else if (flag == "--min-accuracy") {
      if (!absl::SimpleAtod(v, &a.min_accuracy) || a.min_accuracy < 0 || a.min_accuracy > 1) {
        return false;
      }
    } else if (flag == "--answer-in") {
      if (v != "decode" && v != "prefill") return false;
      a.answer_in = v;
    } else {
      return false;
    }
  }
  if (a.policies.empty()) a.policies.push_back({"dense", {}});
  return !a.model.empty() && !a.prompts.empty();
}

absl::StatusOr<std::vector<Prompt>> ReadPrompts(const std::string& path, int max_prompts) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError("cannot read " + path);
  std::vector<Prompt> out;
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.contains("ids") || !j.contains("answer_ids")) {
      return absl::InvalidArgumentError(path + ":" + std::to_string(line_no) +
                                        ": expected a JSON object with ids and answer_ids");
    }
    Prompt p;
    p.ids = j["ids"].get<std::vector<int32_t>>();
    p.answer = j["answer_ids"].get<std::vector<int32_t>>();
    p.length = j.value("length", static_cast<int64_t>(p.ids.size()));
    if (j.contains("needle_position") && p.length > 0) {
      p.needle_depth = j["needle_position"].get<double>() / static_cast<double>(p.length);
    }
    if (p.ids.size() < 2 || p.answer.empty()) {
      return absl::InvalidArgumentError(path + ":" + std::to_string(line_no) + ": ids need BOS and at least one token, answer_ids one");
    }
    out.push_back(std::move(p));
    if (max_prompts > 0 && static_cast<int>(out.size()) >= max_prompts) break;
  }
  if (out.empty()) return absl::InvalidArgumentError(path + ": no prompts");
  return out;
}

struct Cell {  // one (policy, prompt length)
  int n = 0;
  int correct = 0;
  double ttft_s = 0;
  double decode_s_per_token = 0;
  std::array<double, 4> attention = {0, 0, 0, 0};  // AttentionObserver::Take() sums
};

nlohmann::json MeanOrNull(double sum, double n) {
  return n == 0 ? nlohmann::json() : nlohmann::json(sum / n);
}

std::string MeanOrDash(double sum, double n) {
  if (n == 0) return "-";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f", sum / n);
  return buf;
}

int Run(const Args& a) {
  auto prompts = ReadPrompts(a.prompts, a.max_prompts);
  if (!prompts.ok()) return Usage(std::string(prompts.status().message()).c_str());
  const bool decode = a.answer_in == "decode";
  // What each request must generate: in decode mode the prompt's last token, then the answer.
  auto expected = [&](const Prompt& p) {
    std::vector<int32_t> want;
    if (decode) want.push_back(p.ids.back());
    want.insert(want.end(), p.answer.begin(), p.answer.end());
    return want;
  };
  auto max_tokens = [&](const Prompt& p) -> size_t { return expected(p).size(); };
  size_t longest = 0, longest_answer = 0;
  for (const Prompt& p : *prompts) {
    longest = std::max(longest, p.ids.size());
    longest_answer = std::max(longest_answer, max_tokens(p));
  }
  nlohmann::json report = nlohmann::json::array();
  std::vector<std::vector<int32_t>> first_tokens;  // the first policy's output per prompt
  std::vector<std::string> failures;
  std::printf("answer in %s steps\n", decode ? "decode" : "prefill");
  std::printf("| policy | length | prompts | accuracy | prefill density | decode KV read | "
              "TTFT s (mean) | prefill tok/s | decode ms/token |\n");
  std::printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  for (const Policy& policy : a.policies) {
    std::vector<std::string> overrides = {"model.directory=" + a.model};
    overrides.insert(overrides.end(), a.sets.begin(), a.sets.end());
    overrides.insert(overrides.end(), policy.overrides.begin(), policy.overrides.end());
    auto config = server::LoadConfigString("", "<retrieval_fidelity>", overrides);
    if (!config.ok()) {
      std::fprintf(stderr, "policy %s: %s\n", policy.name.c_str(),
                   std::string(config.status().message()).c_str());
      return 2;
    }
    engine::EngineConfig ec = config->engine;
    const bool pages_set = std::any_of(overrides.begin(), overrides.end(), [](const std::string& s) {
      return s.rfind("kv_cache.num_pages=", 0) == 0;
    });
    if (!pages_set) {
      const int64_t page = ec.kv_cache.page_size_tokens;
      ec.kv_cache.num_pages =
          static_cast<int32_t>((longest + longest_answer + 2 * page - 1) / page);
    }
    AttentionObserver observer;
    auto engine = engine::Engine::Create(ec, &observer);
    if (!engine.ok()) {
      std::fprintf(stderr, "policy %s: %s\n", policy.name.c_str(),
                   std::string(engine.status().message()).c_str());
      return 1;
    }
    std::map<int64_t, Cell> cells;
    for (size_t pi = 0; pi < prompts->size(); ++pi) {
      const Prompt& p = (*prompts)[pi];
      engine::RequestSpec spec;
      spec.prompt = p.ids;
      if (decode) spec.prompt.pop_back();
      spec.sampling.temperature = 0;
      spec.stop.max_tokens = static_cast<int32_t>(max_tokens(p));
      spec.stop.ignore_eos = true;
      auto sink = std::make_shared<CollectSink>();
      spec.sink = sink;
      if (auto id = (*engine)->Submit(std::move(spec)); !id.ok()) {
        std::fprintf(stderr, "submit: %s\n", std::string(id.status().message()).c_str());
        return 1;
      }
      std::vector<int32_t> tokens;
      const engine::RequestOutcome o = sink->Wait(tokens);
      if (o.finish == engine::FinishReason::kError) {
        std::fprintf(stderr, "policy %s: request failed: %s\n", policy.name.c_str(),
                     std::string(o.status.message()).c_str());
        return 1;
      }
      Cell& c = cells[p.length];
      ++c.n;
      const bool ok = tokens == expected(p);
      if (&policy == &a.policies.front()) {
        first_tokens.push_back(tokens);
      } else if (a.expect_same_tokens && tokens != first_tokens[pi]) {
        failures.push_back(absl::StrCat("policy ", policy.name, ", prompt ", pi + 1,
                                        ": generated tokens differ from policy ",
                                        a.policies.front().name, "'s"));
      }
      c.correct += ok ? 1 : 0;
      const std::array<double, 4> att = observer.Take();
      for (int k = 0; k < 4; ++k) c.attention[k] += att[k];
      c.ttft_s += o.timings.time_to_first_token_s;
      if (o.generated_tokens > 1) {
        c.decode_s_per_token += o.timings.decode_s / (o.generated_tokens - 1);
      }
    }
    for (const auto& [length, c] : cells) {
      const double ttft = c.ttft_s / c.n;
      const double accuracy = static_cast<double>(c.correct) / c.n;
      if (a.min_accuracy >= 0 && accuracy < a.min_accuracy) {
        failures.push_back(absl::StrCat("policy ", policy.name, ", length ", length, ": accuracy ",
                                        accuracy, " below ", a.min_accuracy));
      }
      const std::string density = MeanOrDash(c.attention[0], c.attention[1]);
      const std::string kv_read = MeanOrDash(c.attention[2], c.attention[3]);
      std::printf("| %s | %lld | %d | %.3f | %s | %s | %.3f | %.0f | %.2f |\n",
                  policy.name.c_str(), static_cast<long long>(length), c.n,
                  accuracy, density.c_str(), kv_read.c_str(), ttft,
                  length / ttft, c.decode_s_per_token / c.n * 1e3);
      report.push_back({{"policy", policy.name}, {"overrides", policy.overrides},
                        {"length", length}, {"prompts", c.n}, {"correct", c.correct},
                        {"accuracy", accuracy},
                        {"ttft_s_mean", ttft}, {"answer_in", decode ? "decode" : "prefill"},
                        {"prefill_density", MeanOrNull(c.attention[0], c.attention[1])},
                        {"decode_kv_read", MeanOrNull(c.attention[2], c.attention[3])},
                        {"decode_ms_per_token", c.decode_s_per_token / c.n * 1e3}});
    }
    std::fflush(stdout);
  }
  if (!a.json.empty()) {
    std::ofstream out(a.json);
    out << report.dump(1) << "\n";
    if (!out) return Usage(("cannot write " + a.json).c_str());
  }
  for (const std::string& f : failures) std::fprintf(stderr, "FAILED: %s\n", f.c_str());
  return failures.empty() ? 0 : 1;
}

}  // namespace
}  // namespace sieve

int main(int argc, char** argv) {
  sieve::Args args;
  if (!sieve::ParseArgs(argc, argv, args)) return sieve::Usage("bad arguments");
  return sieve::Run(args);
}
