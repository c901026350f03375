#include "server/convert.h"

#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/unicode.h"

namespace sieve::server {
namespace {

// Prefixes a status message with the proto path of the part that produced it ("stop.").
absl::Status WithFieldPrefix(const absl::Status& status, absl::string_view prefix) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

// InvalidArgument unless `value` is finite and in [lo, hi] (or (lo, hi] when lo_open).
absl::Status CheckRange(absl::string_view field, float value, float lo, float hi,
                        bool lo_open = false) {
  const bool ok = std::isfinite(value) && (lo_open ? value > lo : value >= lo) && value <= hi;
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(field, " = ", value, " is outside ",
                                                 lo_open ? "(" : "[", lo, ", ", hi, "]"));
}

// The prompt's token ids: the given ids, or the tokenized text.
absl::StatusOr<std::vector<int32_t>> PromptTokens(const v1::GenerateRequest& request,
                                                  const engine::Tokenizer& tokenizer,
                                                  int32_t vocab_size) {
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText: {
      if (request.text().empty()) {
        return absl::InvalidArgumentError("prompt: text is empty");
      }
      const bool add_special = !request.has_add_special_tokens() || request.add_special_tokens();
      absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(request.text(), add_special);
      if (!ids.ok()) return WithFieldPrefix(ids.status(), "prompt: text: ");
      if (ids->empty()) return absl::InvalidArgumentError("prompt: text encodes to no tokens");
      return ids;
    }
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = request.token_ids().ids();
      if (ids.empty()) return absl::InvalidArgumentError("prompt: token_ids is empty");
      SIEVE_RETURN_IF_ERROR(CheckTokenIds(ids, vocab_size, "prompt: token_ids"));
      return std::vector<int32_t>(ids.begin(), ids.end());
    }
    case v1::GenerateRequest::kMessages: {
      SIEVE_ASSIGN_OR_RETURN(RenderedChat chat,
                             RenderChat(request.messages(), tokenizer, "prompt: messages"));
      if (chat.ids.empty()) {
        return absl::InvalidArgumentError("prompt: messages render to no tokens");
      }
      return std::move(chat.ids);
    }
    case v1::GenerateRequest::PROMPT_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError("prompt: set one of text, token_ids or messages");
}

// " (limited by ...)" when the KV cache, not the model, sets the context length.
std::string ContextSource(const RequestLimits& limits) {
  if (limits.context_limited_by.empty()) return std::string();
  return absl::StrCat(" (limited by ", limits.context_limited_by, ")");
}

// Converts and validates the stop criteria; `prompt_tokens` decides max_tokens' default and
// the context check.
absl::StatusOr<engine::StopCriteria> ToStopCriteria(const v1::StopCriteria& stop,
                                                    int64_t prompt_tokens,
                                                    const RequestLimits& limits) {
  engine::StopCriteria out;
  const int64_t context = limits.context_tokens;
  if (prompt_tokens >= context) {
    return absl::OutOfRangeError(absl::StrCat("prompt of ", prompt_tokens,
                                              " tokens leaves no room to generate in the context "
                                              "length of ",
                                              context, " tokens", ContextSource(limits)));
  }
  if (stop.has_max_tokens()) {
    if (stop.max_tokens() == 0) {
      return absl::InvalidArgumentError("stop.max_tokens must be >= 1, got 0");
    }
    const int64_t total = prompt_tokens + int64_t{stop.max_tokens()};
    if (total > context) {
      return absl::OutOfRangeError(absl::StrCat(
          "prompt (", prompt_tokens, " tokens) + stop.max_tokens (", stop.max_tokens(), ") = ",
          total, " tokens exceeds the context length of ", context, " tokens",
          ContextSource(limits)));
    }
    out.max_tokens = static_cast<int32_t>(stop.max_tokens());
  } else {
    out.max_tokens = static_cast<int32_t>(
        std::min<int64_t>(limits.default_max_tokens, context - prompt_tokens));
  }
  const int max_stops = std::min<int>(limits.max_stop_strings, engine::kMaxStopStrings);
  if (stop.stop_strings_size() > max_stops) {
    return absl::InvalidArgumentError(absl::StrCat("stop.stop_strings holds ",
                                                   stop.stop_strings_size(),
                                                   " strings; at most ", max_stops, " allowed"));
  }
  out.stop_strings.assign(stop.stop_strings().begin(), stop.stop_strings().end());
  out.stop_token_ids.assign(stop.stop_token_ids().begin(), stop.stop_token_ids().end());
  out.ignore_eos = stop.ignore_eos();
  SIEVE_RETURN_IF_ERROR(WithFieldPrefix(out.Validate(limits.vocab_size), "stop."));
  return out;
}

}  // namespace

absl::StatusOr<RenderedChat> RenderChat(const v1::ChatMessages& messages,
                                        const engine::Tokenizer& tokenizer,
                                        std::string_view field) {
  const absl::string_view prefix(field.data(), field.size());
  if (messages.messages().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, " is empty"));
  }
  std::vector<engine::ChatMessage> chat;
  chat.reserve(messages.messages_size());
  for (int i = 0; i < messages.messages_size(); ++i) {
    const v1::ChatMessage& m = messages.messages(i);
    if (m.role().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "[", i, "].role is empty"));
    }
    for (const auto& [name, text] : {std::pair<const char*, const std::string*>{"role", &m.role()},
                                     {"content", &m.content()}}) {
      if (engine::unicode::FindInvalidUtf8(*text).has_value()) {
        return absl::InvalidArgumentError(
            absl::StrCat(prefix, "[", i, "].", name, " is not valid UTF-8"));
      }
    }
    chat.push_back({m.role(), m.content()});
  }
  const engine::ChatTemplate* tmpl = tokenizer.chat_template();
  if (tmpl == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        prefix, ": the model has no usable chat template (",
        tokenizer.chat_template_status().message(),
        "); give one with the config key model.chat_template_file (a Jinja file), or send a "
        "text or token_ids prompt"));
  }
  RenderedChat out;
  absl::StatusOr<std::string> text = tmpl->Apply(chat, /*add_generation_prompt=*/true);
  if (!text.ok()) return WithFieldPrefix(text.status(), absl::StrCat(prefix, ": "));
  out.text = *std::move(text);
  absl::StatusOr<std::vector<int32_t>> ids =
      tokenizer.Encode(out.text, /*add_special_tokens=*/false);
  if (!ids.ok()) return WithFieldPrefix(ids.status(), absl::StrCat(prefix, ": "));
  out.ids = *std::move(ids);
  return out;
}

grpc::StatusCode ToGrpcCode(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
      return grpc::StatusCode::OK;
    case absl::StatusCode::kCancelled:
      return grpc::StatusCode::CANCELLED;
    case absl::StatusCode::kUnknown:
      return grpc::StatusCode::UNKNOWN;
    case absl::StatusCode::kInvalidArgument:
      return grpc::StatusCode::INVALID_ARGUMENT;
    case absl::StatusCode::kDeadlineExceeded:
      return grpc::StatusCode::DEADLINE_EXCEEDED;
    case absl::StatusCode::kNotFound:
      return grpc::StatusCode::NOT_FOUND;
    case absl::StatusCode::kAlreadyExists:
      return grpc::StatusCode::ALREADY_EXISTS;
    case absl::StatusCode::kPermissionDenied:
      return grpc::StatusCode::PERMISSION_DENIED;
    case absl::StatusCode::kResourceExhausted:
      return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case absl::StatusCode::kFailedPrecondition:
      return grpc::StatusCode::FAILED_PRECONDITION;
    case absl::StatusCode::kAborted:
      return grpc::StatusCode::ABORTED;
    case absl::StatusCode::kOutOfRange:
      return grpc::StatusCode::OUT_OF_RANGE;
    case absl::StatusCode::kUnimplemented:
      return grpc::StatusCode::UNIMPLEMENTED;
    case absl::StatusCode::kInternal:
      return grpc::StatusCode::INTERNAL;
    case absl::StatusCode::kUnavailable:
      return grpc::StatusCode::UNAVAILABLE;
    case absl::StatusCode::kDataLoss:
      return grpc::StatusCode::DATA_LOSS;
    case absl::StatusCode::kUnauthenticated:
      return grpc::StatusCode::UNAUTHENTICATED;
    default:
      return grpc::StatusCode::UNKNOWN;
  }
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(ToGrpcCode(status.code()), std::string(status.message()));
}

absl::Status CheckTokenIds(absl::Span<const int32_t> ids, int32_t vocab_size,
                           std::string_view field) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(absl::string_view(field.data(), field.size()), "[", i, "] = ", ids[i],
                       " is outside the vocabulary [0, ", vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<engine::SamplingParams> ToSamplingParams(const v1::SamplingParams& sampling,
                                                        bool logprobs, uint32_t top_logprobs) {
  engine::SamplingParams out;
  if (sampling.has_temperature()) {
    SIEVE_RETURN_IF_ERROR(CheckRange("sampling.temperature", sampling.temperature(), 0, 100));
    out.temperature = sampling.temperature();
  }
  if (sampling.has_top_k()) {
    if (sampling.top_k() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("sampling.top_k = ", sampling.top_k(), " must be >= 0"));
    }
    out.top_k = sampling.top_k();
  }
  if (sampling.has_top_p()) {
    SIEVE_RETURN_IF_ERROR(CheckRange("sampling.top_p", sampling.top_p(), 0, 1, true));
    out.top_p = sampling.top_p();
  }
  if (sampling.has_min_p()) {
    SIEVE_RETURN_IF_ERROR(CheckRange("sampling.min_p", sampling.min_p(), 0, 1));
    out.min_p = sampling.min_p();
  }
  if (sampling.has_repetition_penalty()) {
    SIEVE_RETURN_IF_ERROR(
        CheckRange("sampling.repetition_penalty", sampling.repetition_penalty(), 0, 10, true));
    out.repetition_penalty = sampling.repetition_penalty();
  }
  if (sampling.has_presence_penalty()) {
    SIEVE_RETURN_IF_ERROR(
        CheckRange("sampling.presence_penalty", sampling.presence_penalty(), -2, 2));
    out.presence_penalty = sampling.presence_penalty();
  }
  if (sampling.has_frequency_penalty()) {
    SIEVE_RETURN_IF_ERROR(
        CheckRange("sampling.frequency_penalty", sampling.frequency_penalty(), -2, 2));
    out.frequency_penalty = sampling.frequency_penalty();
  }
  out.seed = sampling.has_seed() ? sampling.seed() : engine::NondeterministicSeed();
  if (logprobs) {
    if (top_logprobs > static_cast<uint32_t>(engine::kMaxTopLogprobs)) {
      return absl::InvalidArgumentError(absl::StrCat("top_logprobs = ", top_logprobs,
                                                     " is outside [0, ", engine::kMaxTopLogprobs,
                                                     "]"));
    }
    out.return_logprob = true;
    out.top_logprobs = static_cast<int32_t>(top_logprobs);
  }
  SIEVE_RETURN_IF_ERROR(WithFieldPrefix(out.Validate(), "sampling: "));
  return out;
}

absl::StatusOr<engine::RequestSpec> ToRequestSpec(const v1::GenerateRequest& request,
                                                  const engine::Tokenizer& tokenizer,
                                                  const RequestLimits& limits) {
  if (request.has_request_id() && request.request_id().size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("request_id is ", request.request_id().size(),
                                                   " bytes; at most ", kMaxRequestIdBytes));
  }
  engine::RequestSpec spec;
  SIEVE_ASSIGN_OR_RETURN(spec.sampling, ToSamplingParams(request.sampling(), request.logprobs(),
                                                         request.top_logprobs()));
  SIEVE_ASSIGN_OR_RETURN(spec.prompt, PromptTokens(request, tokenizer, limits.vocab_size));
  SIEVE_ASSIGN_OR_RETURN(spec.stop,
                         ToStopCriteria(request.stop(), static_cast<int64_t>(spec.prompt.size()),
                                        limits));
  spec.priority = request.priority();
  switch (request.prefill_attention()) {
    case v1::ATTENTION_MODE_UNSPECIFIED:
      break;
    case v1::ATTENTION_MODE_DENSE:
      spec.dense_prefill = true;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("prefill_attention: unknown mode ",
                                                     static_cast<int>(request.prefill_attention())));
  }
  switch (request.decode_attention()) {
    case v1::ATTENTION_MODE_UNSPECIFIED:
      break;
    case v1::ATTENTION_MODE_DENSE:
      spec.dense_decode = true;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("decode_attention: unknown mode ",
                                                     static_cast<int>(request.decode_attention())));
  }
  if (request.has_request_id()) spec.client_request_id = request.request_id();
  return spec;
}

void AppendDelta(const engine::TokenDelta& delta, const engine::Tokenizer& tokenizer,
                 v1::GenerateResponse* response) {
  response->mutable_text()->append(delta.text);
  for (int32_t id : delta.token_ids) response->add_token_ids(id);
  auto fill = [&tokenizer](int32_t id, float logprob, v1::TokenLogprob* out) {
    out->set_token_id(id);
    out->set_logprob(logprob);
    absl::StatusOr<std::string> piece = tokenizer.TokenBytes(id);
    if (piece.ok()) out->set_piece(*std::move(piece));
  };
  for (const engine::TokenLogprob& lp : delta.logprobs) {
    v1::PositionLogprobs* position = response->add_logprobs();
    fill(lp.id, lp.logprob, position->mutable_chosen());
    for (const auto& [id, logprob] : lp.top) fill(id, logprob, position->add_top());
  }
}

v1::FinishReason ToProtoFinishReason(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case engine::FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case engine::FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case engine::FinishReason::kNone:
    case engine::FinishReason::kError:
      break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

void ToCompletion(const engine::RequestOutcome& outcome, v1::Completion* completion) {
  completion->set_finish_reason(ToProtoFinishReason(outcome.finish));
  v1::Usage* usage = completion->mutable_usage();
  usage->set_prompt_tokens(static_cast<uint32_t>(std::max(0, outcome.prompt_tokens)));
  usage->set_cached_prompt_tokens(static_cast<uint32_t>(std::max(0, outcome.cached_tokens)));
  usage->set_generated_tokens(static_cast<uint32_t>(std::max(0, outcome.generated_tokens)));
  usage->set_preemptions(static_cast<uint32_t>(std::max(0, outcome.preemptions)));
  v1::Timings* timings = completion->mutable_timings();
  timings->set_queue_seconds(outcome.timings.queue_s);
  timings->set_prefill_seconds(outcome.timings.prefill_s);
  timings->set_time_to_first_token_seconds(outcome.timings.time_to_first_token_s);
  timings->set_decode_seconds(outcome.timings.decode_s);
  timings->set_total_seconds(outcome.timings.total_s);
  timings->set_kv_transfer_seconds(outcome.timings.transfer_s);
  if (outcome.finish == engine::FinishReason::kStop) {
    if (!outcome.matched_stop.empty()) {
      completion->set_stop_string(outcome.matched_stop);
    } else if (outcome.matched_stop_token.has_value()) {
      completion->set_stop_token_id(*outcome.matched_stop_token);
    }
  }
}

void ToProtoModelInfo(const engine::ModelInfo& info, const engine::ModelConfig& model,
                      const engine::Tokenizer& tokenizer, int32_t context_tokens,
                      v1::ModelInfo* out) {
  out->set_name(info.name);
  out->set_architecture(info.architecture);
  out->set_context_length(static_cast<uint32_t>(std::max(0, context_tokens)));
  out->set_vocab_size(static_cast<uint32_t>(std::max(0, info.vocab_size)));
  out->set_num_layers(static_cast<uint32_t>(std::max(0, info.num_layers)));
  out->set_num_attention_heads(static_cast<uint32_t>(std::max(0, info.num_q_heads)));
  out->set_num_kv_heads(static_cast<uint32_t>(std::max(0, info.num_kv_heads)));
  out->set_head_dim(static_cast<uint32_t>(std::max(0, info.head_dim)));
  out->set_hidden_size(static_cast<uint32_t>(std::max<int64_t>(0, model.hidden_size)));
  for (int32_t id : info.eos_token_ids) out->add_eos_token_ids(id);
  if (tokenizer.bos_id().has_value()) {
    out->set_bos_token_id(*tokenizer.bos_id());
  } else if (model.bos_token_id.has_value()) {
    out->set_bos_token_id(static_cast<int32_t>(*model.bos_token_id));
  }
  out->set_backend(info.backend);
  out->set_dtype(info.dtype);
  // The engine describes its policy as "prefill=<name> decode=<name> ..."; anything it does
  // not name is dense.
  v1::AttentionPolicy* attention = out->mutable_attention();
  attention->set_prefill("dense");
  attention->set_decode("dense");
  for (absl::string_view part : absl::StrSplit(info.attention_policy, ' ', absl::SkipEmpty())) {
    if (absl::ConsumePrefix(&part, "prefill=")) {
      // The method's name, without its settings in parentheses (decode alike).
      attention->set_prefill(std::string(part.substr(0, part.find('('))));
    }
    if (absl::ConsumePrefix(&part, "decode=")) {
      attention->set_decode(std::string(part.substr(0, part.find('('))));
    }
  }
  attention->set_description(info.attention_policy.empty()
                                 ? absl::StrCat("prefill=", attention->prefill(),
                                                " decode=", attention->decode())
                                 : info.attention_policy);
  out->set_kv_page_size_tokens(static_cast<uint32_t>(std::max(0, info.page_size)));
  out->set_kv_num_pages(static_cast<uint32_t>(std::max(0, info.kv_pages)));
}

}  // namespace sieve::server
