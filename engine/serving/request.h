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
// "Arrival" is Submit(), preceded by RequestSpec::kv_transfer_s when the caller had the prompt's
// KV computed elsewhere first: that phase counts in time_to_first_token_s and total_s too.
struct RequestTimings {
  double queue_s = 0;                // arrival -> first scheduled (first prefill chunk)
  double prefill_s = 0;              // first prefill chunk -> first token sampled
  double time_to_first_token_s = 0;  // transfer + arrival -> first token sampled
  double decode_s = 0;               // first token -> last token
  double total_s = 0;                // transfer + arrival -> finish
  double transfer_s = 0;             // RequestSpec::kv_transfer_s: before arrival
};

// A hold on cached KV pages whose contents are being read for another process (disaggregated
// serving: a prefill daemon exports a prompt's KV to a decode daemon). The holder ends it with
// Engine::EndKvExport; until then the pages are neither evicted nor reused.
struct KvExport {
  int64_t id = 0;              // names the export in EndKvExport
  int32_t num_tokens = 0;      // leading prompt tokens covered, a whole number of pages
  std::vector<int32_t> pages;  // the held pages, in token order
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
  // For a request with export_prompt_kv that ended with a token (length, stop, eos): the hold on
  // its prompt's cached full pages, which the sink must end with Engine::EndKvExport. Empty when
  // no page of the prompt was cached (a prompt shorter than a page, or prefix caching off).
  std::optional<KvExport> kv_export;
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
  // Disaggregated serving (a prefill daemon): when the request ends with a token, hold the KV of
  // its prompt's full pages for export (RequestOutcome::kv_export) instead of leaving them only
  // to the prefix cache, where eviction could take them before they are read.
  bool export_prompt_kv = false;
  // Prefill attention of this request: false follows attention.prefill (sparse where the
  // method and length say so); true attends every causal key (a client asking for dense).
  bool dense_prefill = false;
  // Decode with dense attention whatever attention.decode.method says (GenerateRequest
  // decode_attention DENSE), e.g. for a client that wants exact attention.
  bool dense_decode = false;
  // Seconds the caller spent before Submit having the prompt's KV computed elsewhere and imported
  // here (disaggregated serving: a decode daemon's remote prefill, with its wait for a transfer
  // thread and its retries). Not run by the engine; added to the request's time to first token
  // and total, and reported as RequestTimings::transfer_s. >= 0.
  double kv_transfer_s = 0;
  std::shared_ptr<RequestSink> sink;     // required
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_REQUEST_H_
