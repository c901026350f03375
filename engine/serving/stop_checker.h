// Decides, token by token, when one request stops generating and which text may be streamed to
// the client so far. It applies StopCriteria: EOS ids, stop token ids, max_tokens and stop strings.
//
// Stop strings are matched against the whole generated text, across the boundaries of the text
// deltas. Text that could still be the beginning of a stop string is held back until it either
// completes one (then it is dropped) or diverges (then it is released). The outcome equals feeding
// the text one byte at a time: the stop string that is completed first wins, and of those
// completed by the same byte the one that starts earliest. When inputs are valid UTF-8 (stop
// strings are validated as such, deltas come from a UTF-8-safe incremental decoder), every emitted
// piece is valid UTF-8, because a valid UTF-8 stop string can only start on a character boundary.
//
// Thread safety: one StopChecker belongs to one request; it is not thread-safe.
#ifndef SIEVE_ENGINE_SERVING_STOP_CHECKER_H_
#define SIEVE_ENGINE_SERVING_STOP_CHECKER_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/types/span.h"
#include "engine/sampling/sampling.h"

namespace sieve::engine {

// Applies one request's StopCriteria to its stream of sampled tokens and text deltas.
class StopChecker {
 public:
  // What to do after one token: text to stream now, and whether generation finished.
  struct Step {
    // Text the client may receive now (possibly empty).
    std::string emit;
    // kNone while generating; otherwise why generation ended (kEos, kStop or kLength).
    FinishReason finish = FinishReason::kNone;
  };

  // Starts checking with `criteria` (expected to pass Validate(); empty stop strings are ignored
  // rather than matching everywhere) and the model's EOS token ids `eos_ids`.
  StopChecker(StopCriteria criteria, absl::Span<const int32_t> eos_ids);

  // Accepts the next sampled token `id` and the text its detokenization added, `text_delta`.
  // Checks, in order: EOS ids (unless ignore_eos) -> kEos, then stop_token_ids -> kStop (the
  // token's text is dropped in both cases); stop strings -> kStop (the text before the string is
  // emitted); max_tokens -> kLength (this token's text is emitted). On any finish, text held back
  // and not part of a stop string is emitted in the same Step. Pushing after generation finished
  // is a caller error: it returns no text and the recorded finish reason.
  Step Push(int32_t id, std::string_view text_delta);

  // Returns the text still held back (a possible stop-string beginning) and forgets it; call it
  // when generation ends for a reason outside this class (e.g. cancellation). Returns "" after a
  // finish reported by Push(), which already flushed.
  std::string Flush();

  // Returns the number of tokens pushed so far, the finishing one included.
  int32_t num_tokens() const { return num_tokens_; }

  // Returns why generation finished, or kNone while it goes on.
  FinishReason finish_reason() const { return finish_; }

  // Returns the number of bytes currently held back.
  size_t held_bytes() const { return pending_.size(); }

 private:
  // Ends generation for `reason`, returning the held-back text as the Step's emit.
  Step Finish(FinishReason reason);

  // Returns the length of the longest suffix of pending_ that is a proper prefix of a stop string.
  size_t HoldBackLength() const;

  StopCriteria criteria_;
  std::vector<int32_t> eos_ids_;
  std::string pending_;  // Text not yet emitted; always shorter than the longest stop string.
  int32_t num_tokens_ = 0;
  FinishReason finish_ = FinishReason::kNone;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_STOP_CHECKER_H_
