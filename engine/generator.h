// Generator: runs a set of requests to completion on one ModelRunner, all batched together:
// chunked prefill mixed with decode steps, sampling, stop criteria and streaming text. It is the
// offline path (the `sieve generate --model` CLI and the golden tests); the daemon's scheduler
// adds admission, priorities, preemption and prefix caching on top of the same pieces.
//
// Not thread-safe; one Generate call at a time.
#ifndef SIEVE_ENGINE_GENERATOR_H_
#define SIEVE_ENGINE_GENERATOR_H_

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/model_runner.h"
#include "engine/sampling.h"
#include "engine/tokenizer.h"

namespace sieve::engine {

struct GenerationRequest {
  std::vector<int32_t> prompt;  // token ids, >= 1
  SamplingParams sampling;
  StopCriteria stop;
};

struct GenerationResult {
  std::vector<int32_t> tokens;  // generated ids, stop/EOS token included when one ended it
  std::string text;             // the emitted text (stop strings and EOS text excluded)
  FinishReason finish = FinishReason::kNone;
  std::vector<float> logprobs;  // chosen-token logprobs when sampling.return_logprob
  double time_to_first_token_s = 0;  // from the Generate call to this request's first token
  double total_s = 0;                // from the Generate call to this request's last token
};

// Receives text as it becomes final: (request index, delta). Called on the Generate thread.
using TextCallback = std::function<void(size_t index, std::string_view delta)>;

class Generator {
 public:
  // `runner` and `tokenizer` must outlive the Generator.
  Generator(ModelRunner& runner, const Tokenizer& tokenizer);

  // Generates for every request; results are in request order. The KV pages every request used
  // are free again on return, also on error. Errors: InvalidArgument for a bad request (empty
  // prompt, invalid sampling or stop settings, prompt + max_tokens beyond the KV capacity).
  absl::StatusOr<std::vector<GenerationResult>> Generate(absl::Span<const GenerationRequest> requests,
                                                         const TextCallback& on_text = nullptr);

  // Pages in use right now (0 between calls: nothing leaks).
  int32_t pages_in_use() const;

 private:
  ModelRunner& runner_;
  const Tokenizer& tokenizer_;
  std::vector<int32_t> eos_ids_;
  int32_t pages_in_use_ = 0;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_GENERATOR_H_
