// The OpenAI-compatible HTTP API's wire format: JSON request bodies of POST /v1/completions and
// POST /v1/chat/completions turned into sieve.v1 GenerateRequests (which then take the same
// validation and conversion as gRPC: server/convert.h through server/request_gate.h), and the
// engine's output turned into OpenAI-shaped JSON responses and server-sent-event chunks.
// docs/http.md lists the fields supported and the errors.
//
// Errors are absl statuses until the edge: ParseRequest() attaches the JSON field at fault as
// the status payload kParamPayload, and ToApiError() maps any status of the engine path to an
// HTTP status and OpenAI's error object, naming the JSON field (never the proto path) where the
// message says which.
//
// Thread-safety: every function is pure apart from reading the (immutable) tokenizer; a
// ResponseBuilder belongs to one request.
#ifndef SIEVE_SERVER_OPENAI_API_H_
#define SIEVE_SERVER_OPENAI_API_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/serving/request.h"
#include "engine/tokenizer/tokenizer.h"
#include "sieve/v1/sieve.pb.h"

namespace sieve::server::openai {

// Which OpenAI endpoint a request came to.
enum class Endpoint { kCompletions, kChatCompletions };

// Type URL of the status payload that names the JSON field an error is about.
inline constexpr char kParamPayload[] = "sieve.openai/param";

// Returns InvalidArgument with `message` and `param` attached as kParamPayload.
absl::Status FieldError(std::string_view param, std::string_view message);

// A parsed request body: the engine request plus what shapes the response.
struct ParsedRequest {
  // The model, prompt (text, token ids or messages), sampling, stop and logprob fields.
  v1::GenerateRequest request;
  // Respond with server-sent events instead of one JSON object.
  bool stream = false;
  // With `stream`: send a last chunk with the usage (stream_options.include_usage).
  bool include_usage = false;
};

// Parses the body of a request to `endpoint`. Fields supported (docs/http.md): model, prompt
// (completions: a string, a list of token ids, or a list holding one of those), messages
// (chat: role and content, content a string or a list of text parts), max_tokens
// (chat also max_completion_tokens), temperature, top_p, seed, stop (a string or a list),
// logprobs (completions: an integer, the alternatives per token; chat: a boolean, with
// top_logprobs), n (1 only), stream, stream_options.include_usage, presence_penalty,
// frequency_penalty, user (ignored), and the extensions top_k, min_p, repetition_penalty,
// ignore_eos. Fields OpenAI defines that change the result but are not supported (n > 1,
// best_of > 1, echo, suffix, logit_bias, tools, response_format other than text) are
// InvalidArgument; unknown fields are ignored. Range checks are left to convert.h.
absl::StatusOr<ParsedRequest> ParseRequest(std::string_view body, Endpoint endpoint);

// An error as the API answers it: the HTTP status and OpenAI's error object.
struct ApiError {
  int http_status = 500;
  std::string message;
  std::string type;   // "invalid_request_error", "not_found_error", "rate_limit_error", ...
  std::string param;  // the JSON field at fault; empty for null
  std::string code;   // a machine-readable code; empty for null
};

// Maps a status of the engine path to the API's error: InvalidArgument and FailedPrecondition
// 400, OutOfRange 400 (code context_length_exceeded), NotFound 404 (code model_not_found),
// ResourceExhausted 429, Unimplemented 501, Unavailable 503, DeadlineExceeded 504,
// Unauthenticated 401, PermissionDenied 403, anything else 500. The proto field names of
// convert.h's messages ("sampling.top_p", "stop.max_tokens") become the JSON ones.
ApiError ToApiError(const absl::Status& status, Endpoint endpoint);

// {"error": {"message", "type", "param", "code"}}.
std::string ErrorBody(const ApiError& error);

// OpenAI's finish_reason for an engine outcome: "stop" (stop string, stop token, EOS),
// "length", or "cancelled" (the server cancelled it, e.g. at the end of a drain).
std::string_view FinishReasonName(engine::FinishReason reason);

// Builds one request's responses: the unstreamed JSON object, or the stream's SSE events.
class ResponseBuilder {
 public:
  // `id` is the response id ("cmpl-..." / "chatcmpl-..."), `created` Unix seconds, `model` the
  // served model's name; `request` says whether logprobs were asked for and the usage chunk.
  // `tokenizer` supplies token pieces for logprobs and must outlive the builder.
  ResponseBuilder(Endpoint endpoint, std::string id, int64_t created, std::string model,
                  const ParsedRequest& request, const engine::Tokenizer& tokenizer);

  // Adds engine output (unstreamed responses accumulate it for Complete()).
  void Append(const engine::TokenDelta& delta);

  // The SSE events for output added since the last call ("data: {...}\n\n" each; the chat
  // stream's first event carries the assistant role); empty when there is nothing new.
  std::string TakeEvents();

  // The stream's last events: the chunk with the finish reason, the usage chunk when asked
  // for, and "data: [DONE]".
  std::string FinalEvents(const engine::RequestOutcome& outcome);

  // The unstreamed response object for everything appended.
  std::string Complete(const engine::RequestOutcome& outcome) const;

 private:
  struct Logprob {
    int32_t id = 0;
    float logprob = 0;
    std::vector<std::pair<int32_t, float>> top;
  };
  std::string Chunk(std::string_view text, const std::vector<Logprob>& logprobs,
                    std::string_view finish_reason, bool first) const;
  std::string LogprobsJson(const std::vector<Logprob>& logprobs, size_t text_offset) const;
  std::string UsageJson(const engine::RequestOutcome& outcome) const;

  const Endpoint endpoint_;
  const std::string id_;
  const int64_t created_;
  const std::string model_;
  const bool logprobs_;
  const bool include_usage_;
  const engine::Tokenizer& tokenizer_;

  std::string text_;                 // all text so far (unstreamed) or not yet sent (streamed)
  std::vector<Logprob> logprobs_so_far_;
  size_t sent_bytes_ = 0;            // completion bytes already streamed (text_offset)
  bool sent_first_ = false;
};

}  // namespace sieve::server::openai

#endif  // SIEVE_SERVER_OPENAI_API_H_
