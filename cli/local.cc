#include "cli/local.h"

#include <cstdio>
#include <iostream>
#include <string>

#include "engine/generator.h"
#include "engine/model_runner.h"
#include "engine/tokenizer.h"

namespace sieve::cli {
namespace {

int Fail(const absl::Status& status) {
  std::cerr << "sieve: " << status << "\n";
  return 1;
}

}  // namespace

int RunLocalGenerate(const GenerateOptions& o) {
  engine::GenerationRequest req;
  req.stop.max_tokens = o.max_tokens;
  req.stop.stop_strings = o.stop;
  req.stop.ignore_eos = o.ignore_eos;
  req.sampling.temperature = o.temperature;
  if (o.top_k) req.sampling.top_k = *o.top_k;
  if (o.top_p) req.sampling.top_p = *o.top_p;
  if (o.min_p) req.sampling.min_p = *o.min_p;
  if (o.repetition_penalty) req.sampling.repetition_penalty = *o.repetition_penalty;
  req.sampling.seed = o.seed ? *o.seed : engine::NondeterministicSeed();

  auto tokenizer = engine::Tokenizer::FromDirectory(o.model_dir);
  if (!tokenizer.ok()) return Fail(tokenizer.status());
  auto ids = (*tokenizer)->Encode(o.prompt, o.add_special_tokens);
  if (!ids.ok()) return Fail(ids.status());
  req.prompt = *ids;
  engine::ModelRunnerOptions options = engine::RunnerOptionsFor(engine::EngineConfig());
  options.num_threads = o.threads;
  options.page_size = o.page_size;
  // Enough KV for this request, in whole pages.
  const int64_t tokens = static_cast<int64_t>(req.prompt.size()) + req.stop.max_tokens;
  options.num_pages = static_cast<int32_t>((tokens + options.page_size - 1) / options.page_size);
  options.max_step_tokens = 512;
  options.max_step_logits = 1;
  auto runner = engine::ModelRunner::Load(o.model_dir, options);
  if (!runner.ok()) return Fail(runner.status());
  engine::Generator generator(**runner, **tokenizer);

  std::cout << o.prompt << std::flush;
  auto results = generator.Generate({req}, [](size_t, std::string_view delta) {
    std::cout << delta << std::flush;
  });
  std::cout << "\n";
  if (!results.ok()) return Fail(results.status());
  const engine::GenerationResult& r = (*results)[0];
  const double decode_s = r.total_s - r.time_to_first_token_s;
  const size_t n = r.tokens.size();
  std::fprintf(stderr,
               "[sieve] finish: %s | prompt %zu tokens, generated %zu | time to first token "
               "%.1f ms (prefill %.0f tok/s) | decode %.1f ms/token | total %.2f s\n",
               std::string(engine::FinishReasonToString(r.finish)).c_str(), req.prompt.size(), n,
               r.time_to_first_token_s * 1e3, req.prompt.size() / r.time_to_first_token_s,
               n > 1 ? decode_s * 1e3 / (n - 1) : 0.0, r.total_s);
  return 0;
}

}  // namespace sieve::cli
