// Token sampling: per-request sampling parameters, a reproducible random stream, the token
// history that repetition penalties read, stop criteria, and SampleToken() /
// SampleTokenWithUniform(), which turn one row of logits into one token.
//
// Thread safety: SamplingParams, StopCriteria and SampledToken are plain values. A SamplerRng and a
// TokenHistory belong to one request: a SamplerRng must not be used from two threads at once, and
// a TokenHistory may be read by several threads only while none writes it. SampleToken() and
// SampleTokenWithUniform() are thread-safe across distinct arguments (their scratch buffers are
// thread-local).
#ifndef SIEVE_ENGINE_SAMPLING_SAMPLING_H_
#define SIEVE_ENGINE_SAMPLING_SAMPLING_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace sieve::engine {

// The largest number of alternatives a request may ask for per position (OpenAI's limit).
inline constexpr int32_t kMaxTopLogprobs = 20;

// How one request turns logits into tokens. Defaults sample from the model's distribution as is.
struct SamplingParams {
  // Softmax temperature, >= 0 and finite. 0 selects greedy decoding: the argmax of the penalized
  // logits, ties going to the lowest token id; top_k, top_p and min_p are then irrelevant.
  float temperature = 1.0f;
  // Keep only the top_k highest logits (ties to the lowest id); 0 turns the filter off. >= 0.
  int32_t top_k = 0;
  // Nucleus sampling: keep the smallest set of most probable tokens whose probability sums to at
  // least top_p (always at least one token). In (0, 1]; 1 turns the filter off.
  float top_p = 1.0f;
  // Drop tokens whose probability is below min_p times the largest probability. In [0, 1].
  float min_p = 0.0f;
  // When set, the request's random stream is SamplerRng(*seed), so the same request with the same
  // logits samples the same tokens. When unset the caller draws one with NondeterministicSeed().
  std::optional<uint64_t> seed;
  // Hugging Face repetition penalty, > 0 and finite; 1 turns it off. For every token that occurs in
  // the prompt or in the generated text, a positive logit is divided by it, a negative multiplied.
  float repetition_penalty = 1.0f;
  // OpenAI presence penalty in [-2, 2]: subtracted once from the logit of every token that occurs
  // in the generated text (the prompt does not count).
  float presence_penalty = 0.0f;
  // OpenAI frequency penalty in [-2, 2]: subtracted from a token's logit once per occurrence of
  // that token in the generated text (the prompt does not count).
  float frequency_penalty = 0.0f;
  // How many most likely alternatives to report with each token, in [0, kMaxTopLogprobs].
  int32_t top_logprobs = 0;
  // Whether to report the chosen token's log probability.
  bool return_logprob = false;

  // Returns InvalidArgument naming the first field that is NaN, infinite or out of range, and its
  // value; OK otherwise.
  absl::Status Validate() const;
};

// A reproducible stream of uniform doubles: xoshiro256** seeded through SplitMix64. The stream is a
// pure function of the seed, identical on every compiler and standard library, and copying a
// SamplerRng copies its position. Not thread-safe.
class SamplerRng {
 public:
  // Starts the stream for `seed`; every 64-bit seed, 0 included, gives a valid stream.
  explicit SamplerRng(uint64_t seed);

  // Returns the next 64 uniformly distributed bits.
  uint64_t NextU64();

  // Returns a uniform double in [0, 1): the top 53 bits of NextU64() times 2^-53.
  double NextUniform();

 private:
  uint64_t s_[4];
};

// Returns a seed from a nondeterministic source (the operating system's entropy), for requests
// that did not set SamplingParams::seed. Thread-safe.
uint64_t NondeterministicSeed();

// The tokens one request has seen, as per-token counts, for the penalties in SamplingParams.
// Memory is proportional to the number of distinct tokens, not to the vocabulary or the prompt
// length (a 128K-token prompt typically holds a few tens of thousands of distinct ids).
class TokenHistory {
 public:
  // Occurrence counts of one token id.
  struct Counts {
    int32_t prompt = 0;     // Occurrences in the prompt.
    int32_t generated = 0;  // Occurrences in the generated text.
  };

  // Records the prompt's tokens; may be called more than once (e.g. once per prompt chunk).
  void AddPrompt(absl::Span<const int32_t> ids);

  // Records one generated token.
  void AddGenerated(int32_t id);

  // Returns how often `id` occurred in the prompt.
  int32_t PromptCount(int32_t id) const;

  // Returns how often `id` occurred in the generated text.
  int32_t GeneratedCount(int32_t id) const;

  // Returns the number of distinct token ids recorded.
  size_t num_distinct() const { return counts_.size(); }

  // Returns the number of generated tokens recorded.
  int64_t num_generated() const { return num_generated_; }

  // Returns the counts keyed by token id, in unspecified order.
  const absl::flat_hash_map<int32_t, Counts>& counts() const { return counts_; }

 private:
  absl::flat_hash_map<int32_t, Counts> counts_;
  int64_t num_generated_ = 0;
};

// One sampled token and, where asked for, its log probabilities.
struct SampledToken {
  // The chosen token id, in [0, vocab_size).
  int32_t id = -1;
  // log_softmax of the penalized logits at `id` (natural log), before temperature and filters.
  // Set when return_logprob or top_logprobs > 0; 0 otherwise.
  float logprob = 0.0f;
  // Up to top_logprobs (token id, logprob) pairs with the highest penalized logits, best first,
  // ties to the lowest id; same log_softmax as `logprob`. Tokens whose logit is -inf are left out.
  std::vector<std::pair<int32_t, float>> top;
};

// Applies the repetition, presence and frequency penalties of `params` to `logits` in place
// (`logits` has one float per vocabulary entry). Repetition applies first, then presence and
// frequency: logit -= presence * (generated > 0) + frequency * generated.
// Returns InvalidArgument if a penalized token id of `history` lies outside the vocabulary (the
// row may then be partly penalized). Cost: one hash-map walk over the distinct history ids.
absl::Status ApplyPenalties(absl::Span<float> logits, const SamplingParams& params,
                            const TokenHistory& history);

// Samples one token from `logits`, one row of vocab_size floats that is used as scratch: on
// return it holds the penalized logits. `uniform`, in [0, 1), is the one random draw the sample
// uses (the request's SamplerRng gives it; see SampleToken). The steps, in order:
//   1. penalties (ApplyPenalties);
//   2. log probabilities, when asked for, from log_softmax of the penalized logits;
//   3. greedy (argmax, ties to the lowest id) when temperature == 0 (`uniform` is unused);
//      otherwise
//   4. temperature, 5. top-k, 6. top-p, 7. min-p, each on the probabilities softmax(logits / T);
//   8. inverse-CDF sampling over the kept tokens in ascending id order, renormalized: the first
//      kept token whose cumulative probability exceeds uniform * (kept mass).
// Cost for a 150K vocabulary: a few passes over the row (one exp per token for the softmax);
// top-k selects with a bounded heap (k <= 256) or nth_element, top-p with a quickselect on
// probability mass over the tokens that can still matter; the vocabulary is never fully sorted.
// The top-p sum allows 1e-6 of rounding, so that probabilities 0.5 and 0.3 meet top_p = 0.8.
// This is the reference every backend's device sampler (Backend::Sample) is checked against.
// Errors: InvalidArgument for invalid params, an empty row or a history id outside the row;
// Internal when the penalized logits contain NaN or +inf or are all -inf.
absl::StatusOr<SampledToken> SampleTokenWithUniform(absl::Span<float> logits,
                                                    const SamplingParams& params,
                                                    const TokenHistory& history, double uniform);

// SampleTokenWithUniform with the next draw of `rng`. Exactly one rng.NextUniform() draw is
// consumed per call, greedy and failed calls included, so the stream position equals the number
// of tokens asked for (the engine draws the same way when it builds a step).
absl::StatusOr<SampledToken> SampleToken(absl::Span<float> logits, const SamplingParams& params,
                                         const TokenHistory& history, SamplerRng& rng);

// The most stop strings one request may set.
inline constexpr int32_t kMaxStopStrings = 16;
// The longest stop string, in bytes.
inline constexpr int32_t kMaxStopStringBytes = 256;

// When generation of one request ends (besides cancellation and errors).
struct StopCriteria {
  // The most tokens to generate, >= 1. The token that reaches it is emitted.
  int32_t max_tokens = 256;
  // Token ids that end generation with FinishReason::kStop, besides the model's EOS ids. Their
  // text is not emitted. Each in [0, vocab_size).
  std::vector<int32_t> stop_token_ids;
  // Strings that end generation with FinishReason::kStop when they appear in the generated text;
  // the text before the string is emitted, the string itself is not. At most kMaxStopStrings,
  // each 1..kMaxStopStringBytes bytes of valid UTF-8.
  std::vector<std::string> stop_strings;
  // Whether to keep generating past the model's EOS ids (they are then ordinary tokens).
  bool ignore_eos = false;

  // Returns InvalidArgument naming the first invalid field (and its index and value); OK
  // otherwise. `vocab_size` is the model's vocabulary size in tokens.
  absl::Status Validate(int32_t vocab_size) const;
};

// Why a request stopped generating.
enum class FinishReason {
  kNone,       // Still generating.
  kLength,     // Reached StopCriteria::max_tokens.
  kStop,       // Produced a stop token id or a stop string.
  kEos,        // Produced one of the model's EOS ids.
  kCancelled,  // The client cancelled or its deadline passed.
  kError,      // Failed (the request's status says why).
};

// Returns the lower-case name of `reason`: "none", "length", "stop", "eos", "cancelled", "error".
absl::string_view FinishReasonToString(FinishReason reason);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SAMPLING_SAMPLING_H_
