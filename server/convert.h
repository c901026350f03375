// The one place where wire types (sieve.v1 protos, gRPC statuses) and engine types meet.
//
// Request direction: ToRequestSpec() validates a GenerateRequest against the served model's
// limits and turns it into an engine::RequestSpec (prompt tokenized, defaults filled in). Every
// problem is an absl::Status whose message names the offending field, e.g.
// "sampling.top_p = 1.5 is outside (0, 1]"; ToGrpcStatus() turns it into the gRPC status the
// client sees (INVALID_ARGUMENT, OUT_OF_RANGE, ...).
//
// Response direction: AppendDelta() folds engine output into a pending stream message (several
// deltas coalesce into one message while a write is in flight), ToCompletion() fills the last
// message, ToProtoModelInfo() describes the model.
//
// Thread-safety: every function is pure apart from reading the (immutable) tokenizer; all may be
// called from any thread.
#ifndef SIEVE_SERVER_CONVERT_H_
#define SIEVE_SERVER_CONVERT_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/serving/engine.h"
#include "engine/model/model_config.h"
#include "engine/serving/request.h"
#include "engine/sampling/sampling.h"
#include "engine/tokenizer/tokenizer.h"
#include "sieve/v1/sieve.pb.h"

namespace sieve::server {

// Longest client-chosen request id, in bytes.
inline constexpr size_t kMaxRequestIdBytes = 128;

// What a request is validated against: the served model and the configured limits.
struct RequestLimits {
  // Valid token ids are [0, vocab_size): the model's vocabulary (rows of its embedding), which
  // ModelInfo reports. Ids the tokenizer does not know (padding rows, or a shape directory that
  // borrows a smaller tokenizer) are valid and decode to no text.
  int32_t vocab_size = 0;
  // Most prompt plus generated tokens of one request, in tokens.
  int32_t context_tokens = 0;
  // Where context_tokens comes from when the KV cache is what limits it (kv_cache.num_pages x
  // kv_cache.page_size_tokens below the model's context), e.g. "the KV cache (kv_cache.num_pages
  // 4096 x kv_cache.page_size_tokens 16)"; empty when the model's context is the limit.
  std::string context_limited_by;
  // max_tokens of a request that does not set it (then capped to the context left), in tokens.
  int32_t default_max_tokens = 256;
  // Most stop strings one request may carry (at most engine::kMaxStopStrings).
  int32_t max_stop_strings = engine::kMaxStopStrings;
};

// Maps an absl status code to the gRPC code with the same meaning. This is the only mapping
// between the two code spaces.
grpc::StatusCode ToGrpcCode(absl::StatusCode code);

// Returns `status` as a gRPC status: code mapped by ToGrpcCode(), message kept.
grpc::Status ToGrpcStatus(const absl::Status& status);

// Validates `request` and converts it into an engine request, without sink and deadline (the
// caller adds those). Text prompts are tokenized with `tokenizer`; chat messages are rendered
// by its chat template (RenderChat). Errors:
//   InvalidArgument: no or empty prompt, a bad message list (see RenderChat), token ids outside the vocabulary, NaN or out-of-range
//     sampling values, too many or malformed stop strings, stop token ids outside the
//     vocabulary, max_tokens = 0, top_logprobs > 20, request_id longer than 128 bytes, text
//     that is not valid UTF-8;
//   OutOfRange: prompt plus max_tokens beyond limits.context_tokens (or a prompt that fills
//     the context by itself);
//   FailedPrecondition: messages for a model without a chat template.
// The model name is not checked here (the service resolves it first).
absl::StatusOr<engine::RequestSpec> ToRequestSpec(const v1::GenerateRequest& request,
                                                  const engine::Tokenizer& tokenizer,
                                                  const RequestLimits& limits);

// A conversation as the model's chat template rendered it, and its tokens.
struct RenderedChat {
  std::string text;          // The rendered prompt (UTF-8).
  std::vector<int32_t> ids;  // `text` tokenized without adding special tokens.
};

// Renders `messages` with the tokenizer's chat template (generation prompt added, as
// engine/tokenizer/chat_template.h describes) and tokenizes the result with
// add_special_tokens = false (the template places BOS). Both protocols (gRPC Generate and
// Tokenize, the HTTP chat endpoint through GenerateRequest.messages) come through here.
// `field` prefixes error messages (e.g. "prompt: messages"). Errors:
//   InvalidArgument: no messages, a message with an empty role, text that is not valid UTF-8,
//     the template's raise_exception (e.g. roles that do not alternate) or another render error;
//   FailedPrecondition: the model has no usable chat template (the message says how to give
//     one: model.chat_template_file).
absl::StatusOr<RenderedChat> RenderChat(const v1::ChatMessages& messages,
                                        const engine::Tokenizer& tokenizer,
                                        std::string_view field);

// Converts the sampling fields of a request (absent fields take the documented defaults).
// `logprobs` and `top_logprobs` are GenerateRequest's fields of those names. An absent seed is
// drawn with engine::NondeterministicSeed(). InvalidArgument names the first bad field.
absl::StatusOr<engine::SamplingParams> ToSamplingParams(const v1::SamplingParams& sampling,
                                                        bool logprobs, uint32_t top_logprobs);

// Checks that every id lies in [0, vocab_size); InvalidArgument names `field`, the index and
// the value of the first that does not.
absl::Status CheckTokenIds(absl::Span<const int32_t> ids, int32_t vocab_size,
                           std::string_view field);

// Appends `delta` (text, token ids and, when present, logprobs with each token's raw piece) to
// `response`, so that several deltas coalesce into one stream message.
void AppendDelta(const engine::TokenDelta& delta, const engine::Tokenizer& tokenizer,
                 v1::GenerateResponse* response);

// Returns the wire finish reason of `reason`; kNone and kError map to UNSPECIFIED (an errored
// request ends its stream with an error status instead of a Completion).
v1::FinishReason ToProtoFinishReason(engine::FinishReason reason);

// Fills `completion` (finish reason, usage, timings, matched stop) from `outcome`.
void ToCompletion(const engine::RequestOutcome& outcome, v1::Completion* completion);

// Describes the served model: EOS ids, dtype and attention as the engine reports them (`info`),
// `context_tokens` the effective per-request limit (see RequestLimits); `model` and `tokenizer`
// supply what engine::ModelInfo does not carry (hidden size, BOS id).
void ToProtoModelInfo(const engine::ModelInfo& info, const engine::ModelConfig& model,
                      const engine::Tokenizer& tokenizer, int32_t context_tokens,
                      v1::ModelInfo* out);

}  // namespace sieve::server

#endif  // SIEVE_SERVER_CONVERT_H_
