#include "cli/local.h"

#include <algorithm>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/serving/engine.h"
#include "engine/tokenizer/tokenizer.h"
#include "server/config.h"

namespace sieve::cli {
namespace {

int Fail(const absl::Status& status) {
  std::cerr << "sieve: " << status << "\n";
  return 1;
}

// Writes the request's text to stdout as it becomes final and keeps its outcome.
class StdoutSink : public engine::RequestSink {
 public:
  void OnTokens(const engine::TokenDelta& delta) override {
    std::cout << delta.text << std::flush;
  }
  void OnFinish(const engine::RequestOutcome& outcome) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      outcome_ = outcome;
      finished_ = true;
    }
    cv_.notify_all();
  }
  // Blocks until OnFinish; returns the outcome.
  engine::RequestOutcome Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return finished_; });
    return outcome_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  engine::RequestOutcome outcome_;
  bool finished_ = false;
};

bool OverridesKey(const std::vector<std::string>& overrides, std::string_view key) {
  for (const std::string& o : overrides) {
    if (absl::StartsWith(o, absl::StrCat(std::string(key), "="))) return true;
  }
  return false;
}

// The configuration as sieved loads it: the file (if any), then the overrides.
absl::StatusOr<server::ServerConfig> LoadConfig(const GenerateOptions& o) {
  return o.config_path.empty() ? server::LoadConfigString("", "<defaults>", o.overrides)
                               : server::LoadConfigFile(o.config_path, o.overrides);
}

}  // namespace

int RunLocalGenerate(const GenerateOptions& o) {
  engine::RequestSpec spec;
  spec.stop.max_tokens = o.max_tokens;
  spec.stop.stop_strings = o.stop;
  spec.stop.ignore_eos = o.ignore_eos;
  spec.sampling.temperature = o.temperature;
  if (o.top_k) spec.sampling.top_k = *o.top_k;
  if (o.top_p) spec.sampling.top_p = *o.top_p;
  if (o.min_p) spec.sampling.min_p = *o.min_p;
  if (o.repetition_penalty) spec.sampling.repetition_penalty = *o.repetition_penalty;
  spec.sampling.seed = o.seed;  // unset: the engine draws one

  absl::StatusOr<server::ServerConfig> config = LoadConfig(o);
  if (!config.ok()) {
    std::cerr << "sieve: invalid configuration:\n" << config.status().message() << "\n";
    return 2;
  }
  engine::EngineConfig& engine_config = config->engine;
  engine_config.model.cpu_threads = o.threads;
  // The prompt's tokens size the KV pool before the engine exists, so the tokenizer is loaded
  // here too.
  const engine::ServedModelConfig& model = engine_config.model;
  auto tokenizer = engine::Tokenizer::FromDirectory(
      model.tokenizer_directory.empty() ? model.directory : model.tokenizer_directory);
  if (!tokenizer.ok()) return Fail(tokenizer.status());
  auto ids = (*tokenizer)->Encode(o.prompt, o.add_special_tokens);
  if (!ids.ok()) return Fail(ids.status());
  spec.prompt = *std::move(ids);
  if (o.config_path.empty() && !OverridesKey(o.overrides, "kv_cache.num_pages")) {
    // One request: a pool of just its tokens rather than the daemon's default pool.
    const int64_t tokens = static_cast<int64_t>(spec.prompt.size()) + o.max_tokens;
    const int64_t page = engine_config.kv_cache.page_size_tokens;
    engine_config.kv_cache.num_pages =
        static_cast<int32_t>(std::min<int64_t>((tokens + page - 1) / page, INT32_MAX));
  }

  auto engine = engine::Engine::Create(engine_config, /*observer=*/nullptr);
  if (!engine.ok()) return Fail(engine.status());
  auto sink = std::make_shared<StdoutSink>();
  spec.sink = sink;
  const size_t prompt_tokens = spec.prompt.size();
  if (o.echo) std::cout << o.prompt << std::flush;
  if (auto id = (*engine)->Submit(std::move(spec)); !id.ok()) {
    std::cout << "\n";
    return Fail(id.status());
  }
  const engine::RequestOutcome r = sink->Wait();
  std::cout << "\n" << std::flush;
  if (r.finish == engine::FinishReason::kError) return Fail(r.status);
  const engine::RequestTimings& t = r.timings;
  const int32_t n = r.generated_tokens;
  std::fprintf(stderr,
               "[sieve] finish: %s | prompt %zu tokens, generated %d | time to first token "
               "%.1f ms (prefill %.0f tok/s) | decode %.1f ms/token | total %.2f s\n",
               std::string(engine::FinishReasonToString(r.finish)).c_str(), prompt_tokens, n,
               t.time_to_first_token_s * 1e3, prompt_tokens / t.time_to_first_token_s,
               n > 1 ? t.decode_s * 1e3 / (n - 1) : 0.0, t.total_s);
  return 0;
}

}  // namespace sieve::cli
