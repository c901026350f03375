// A generation request as the engine sees it, and what flows back to its submitter.
#ifndef SIEVE_ENGINE_SERVING_REQUEST_H_
#define SIEVE_ENGINE_SERVING_REQUEST_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "engine/sampling/sampling.h"

namespace sieve::engine {

// Engine-assigned request id, unique for the engine's lifetime.
using RequestId = uint64_t;

// Where a request is in its life. Transitions:
//   kQueued -> kPrefilling -> kDecoding -> kFinished
//   kPrefilling/kDecoding -> kPreempted (KV reclaimed) -> kQueued (recomputed later)
//   any non-final state -> kCancelled (client cancel or deadline) or kFailed.
enum class RequestState { kQueued, kPrefilling, kDecoding, kPreempted, kFinished, kCancelled, kFailed };

// The logprobs of one generated token.
struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0.0f;                         // natural log
  std::vector<std::pair<int32_t, float>> top;   // best alternatives, best first
};

// New output of one request: one or more tokens and the text that became final with them
// (text can lag tokens by a few bytes while a UTF-8 character or a possible stop string is
// incomplete).
struct TokenDelta {
  std::vector<int32_t> token_ids;
  std::string text;
  std::vector<TokenLogprob> logprobs;  // one per token id, when the request asked for them
};

// Seconds spent in each phase of a request, measured by the engine.
struct RequestTimings {
  double queue_s = 0;                // arrival -> first scheduled (first prefill chunk)
  double prefill_s = 0;              // first prefill chunk -> first token sampled
  double time_to_first_token_s = 0;  // arrival -> first token sampled
  double decode_s = 0;               // first token -> last token
  double total_s = 0;                // arrival -> finish
};

// How a request ended; delivered exactly once, after its last TokenDelta.
struct RequestOutcome {
  FinishReason finish = FinishReason::kNone;
  absl::Status status;               // OK unless finish == kError (then why)
  int32_t prompt_tokens = 0;
  int32_t cached_tokens = 0;         // prompt tokens served from the prefix cache
  int32_t generated_tokens = 0;
  int32_t preemptions = 0;
  std::string matched_stop;          // the stop string that ended it, if one did
  std::optional<int32_t> matched_stop_token;  // the stop token id that ended it, if one did
  RequestTimings timings;
};

// Receives a request's output. Called on the engine's scheduler thread: implementations must
// return quickly and never block (the gRPC layer copies into its reactor and returns).
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  virtual void OnTokens(const TokenDelta& delta) = 0;
  // Called exactly once per accepted request, last; no call follows it.
  virtual void OnFinish(const RequestOutcome& outcome) = 0;
};

// What a client asks for, already tokenized and validated for syntax by the caller.
struct RequestSpec {
  std::vector<int32_t> prompt;           // token ids, >= 1
  SamplingParams sampling;
  StopCriteria stop;
  int32_t priority = 0;                  // higher runs first; ties by arrival
  std::optional<absl::Time> deadline;    // cancelled with kCancelled when it passes
  std::string client_request_id;         // for logs only; never a metric label
  // Decode with dense attention whatever attention.decode.method says (GenerateRequest
  // decode_attention DENSE), e.g. for a client that wants exact attention.
  bool dense_decode = false;
  std::shared_ptr<RequestSink> sink;     // required
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_REQUEST_H_
