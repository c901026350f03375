#include "server/openai_api.h"

#include <cmath>
#include <limits>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/cord.h"
#include "absl/types/optional.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/string_view.h"

namespace sieve::server::openai {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

// FieldError with Abseil's string_view (a type of its own in Debian's Abseil).
absl::Status Bad(absl::string_view param, absl::string_view message) {
  return FieldError(std::string_view(param.data(), param.size()),
                    std::string_view(message.data(), message.size()));
}

// Serializes `j`; bytes that are not UTF-8 (a token piece that splits a character) become U+FFFD
// instead of an exception.
template <typename J>
std::string Dump(const J& j) {
  return j.dump(-1, ' ', false, J::error_handler_t::replace);
}

absl::string_view TypeName(const Json& j) {
  if (j.is_string()) return "a string";
  if (j.is_boolean()) return "a boolean";
  if (j.is_number()) return "a number";
  if (j.is_array()) return "a list";
  if (j.is_object()) return "an object";
  return "null";
}

absl::Status WrongType(absl::string_view field, absl::string_view expected, const Json& got) {
  return Bad(field, absl::StrCat(field, ": expected ", expected, ", got ", TypeName(got)));
}

// The field `name` of `body` unless absent or null.
const Json* Field(const Json& body, const char* name) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::StatusOr<double> Number(const Json& v, absl::string_view field) {
  if (!v.is_number()) return WrongType(field, "a number", v);
  return v.get<double>();
}

absl::StatusOr<int64_t> Integer(const Json& v, absl::string_view field) {
  if (v.is_number_integer()) {
    if (v.is_number_unsigned() &&
        v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Bad(field, absl::StrCat(field, " is too large"));
    }
    return v.get<int64_t>();
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) {
      return static_cast<int64_t>(d);
    }
  }
  return WrongType(field, "an integer", v);
}

absl::StatusOr<bool> Boolean(const Json& v, absl::string_view field) {
  if (!v.is_boolean()) return WrongType(field, "a boolean", v);
  return v.get<bool>();
}

// A float sampling field: `set` receives it.
template <typename Set>
absl::Status FloatField(const Json& body, const char* name, Set set) {
  if (const Json* v = Field(body, name)) {
    absl::StatusOr<double> x = Number(*v, name);
    if (!x.ok()) return x.status();
    set(static_cast<float>(*x));
  }
  return absl::OkStatus();
}

// A list of token ids; each must fit an int32 (the vocabulary check comes later).
absl::Status TokenList(const Json& list, absl::string_view field, v1::TokenIds* out) {
  for (size_t i = 0; i < list.size(); ++i) {
    const Json& v = list[i];
    if (!v.is_number_integer()) {
      return WrongType(absl::StrCat(field, "[", i, "]"), "a token id (an integer)", v);
    }
    const int64_t id = v.get<int64_t>();
    if (id < 0 || id > std::numeric_limits<int32_t>::max()) {
      return Bad(field, absl::StrCat(field, "[", i, "] = ", id,
                                            " is outside the vocabulary"));
    }
    out->add_ids(static_cast<int32_t>(id));
  }
  return absl::OkStatus();
}

absl::Status ParsePrompt(const Json& body, v1::GenerateRequest* request) {
  const Json* prompt = Field(body, "prompt");
  if (prompt == nullptr) return Bad("prompt", "prompt is required");
  if (prompt->is_string()) {
    request->set_text(prompt->get<std::string>());
    return absl::OkStatus();
  }
  if (!prompt->is_array()) return WrongType("prompt", "a string or a list of token ids", *prompt);
  if (prompt->empty()) return Bad("prompt", "prompt is an empty list");
  const Json& first = (*prompt)[0];
  if (first.is_string() || first.is_array()) {
    // A batch of prompts; one is served per request.
    if (prompt->size() != 1) {
      return Bad("prompt", absl::StrCat("prompt holds ", prompt->size(),
                                               " prompts; this server takes one per request"));
    }
    if (first.is_string()) {
      request->set_text(first.get<std::string>());
      return absl::OkStatus();
    }
    if (first.empty()) return Bad("prompt", "prompt[0] is an empty list");
    return TokenList(first, "prompt[0]", request->mutable_token_ids());
  }
  return TokenList(*prompt, "prompt", request->mutable_token_ids());
}

absl::Status ParseMessages(const Json& body, v1::GenerateRequest* request) {
  const Json* messages = Field(body, "messages");
  if (messages == nullptr) return Bad("messages", "messages is required");
  if (!messages->is_array()) return WrongType("messages", "a list", *messages);
  if (messages->empty()) return Bad("messages", "messages is empty");
  v1::ChatMessages* out = request->mutable_messages();
  for (size_t i = 0; i < messages->size(); ++i) {
    const Json& m = (*messages)[i];
    const std::string where = absl::StrCat("messages[", i, "]");
    if (!m.is_object()) return WrongType(where, "an object", m);
    const Json* role = Field(m, "role");
    if (role == nullptr || !role->is_string() || role->get<std::string>().empty()) {
      return Bad("messages", absl::StrCat(where, ".role must be a non-empty string"));
    }
    std::string content;
    if (const Json* c = Field(m, "content")) {
      if (c->is_string()) {
        content = c->get<std::string>();
      } else if (c->is_array()) {
        // Content parts: text parts are joined; images, audio and files are not supported.
        for (size_t j = 0; j < c->size(); ++j) {
          const Json& part = (*c)[j];
          const Json* type = part.is_object() ? Field(part, "type") : nullptr;
          const Json* text = part.is_object() ? Field(part, "text") : nullptr;
          if (type == nullptr || *type != "text" || text == nullptr || !text->is_string()) {
            return Bad("messages",
                              absl::StrCat(where, ".content[", j,
                                           "]: only parts {\"type\": \"text\", \"text\": ...} "
                                           "are supported"));
          }
          content += text->get<std::string>();
        }
      } else {
        return WrongType(absl::StrCat(where, ".content"), "a string or a list of parts", *c);
      }
    }
    if (const Json* tools = Field(m, "tool_calls"); tools != nullptr && !tools->empty()) {
      return Bad("messages", absl::StrCat(where, ".tool_calls: tools are not supported"));
    }
    v1::ChatMessage* message = out->add_messages();
    message->set_role(role->get<std::string>());
    message->set_content(std::move(content));
  }
  return absl::OkStatus();
}

// Fields OpenAI defines that would change the result but this server does not implement.
absl::Status RejectUnsupported(const Json& body, Endpoint endpoint) {
  if (const Json* n = Field(body, "n")) {
    absl::StatusOr<int64_t> v = Integer(*n, "n");
    if (!v.ok()) return v.status();
    if (*v != 1) {
      return Bad("n", absl::StrCat("n = ", *v, ": only n = 1 (one choice) is supported"));
    }
  }
  if (const Json* best = Field(body, "best_of")) {
    absl::StatusOr<int64_t> v = Integer(*best, "best_of");
    if (!v.ok()) return v.status();
    if (*v != 1) return Bad("best_of", "best_of: only 1 is supported");
  }
  if (const Json* echo = Field(body, "echo"); echo != nullptr && *echo != false) {
    return Bad("echo", "echo is not supported");
  }
  if (const Json* suffix = Field(body, "suffix");
      suffix != nullptr && !(suffix->is_string() && suffix->get<std::string>().empty())) {
    return Bad("suffix", "suffix is not supported");
  }
  if (const Json* bias = Field(body, "logit_bias"); bias != nullptr && !bias->empty()) {
    return Bad("logit_bias", "logit_bias is not supported");
  }
  if (endpoint == Endpoint::kChatCompletions) {
    for (const char* name : {"tools", "functions"}) {
      if (const Json* t = Field(body, name); t != nullptr && !t->empty()) {
        return Bad(name, absl::StrCat(name, " are not supported"));
      }
    }
    if (const Json* format = Field(body, "response_format")) {
      const Json* type = format->is_object() ? Field(*format, "type") : nullptr;
      if (type == nullptr || *type != "text") {
        return Bad("response_format", "response_format: only {\"type\": \"text\"} is "
                                             "supported");
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ParseSampling(const Json& body, v1::SamplingParams* s) {
  absl::Status status;
  auto check = [&status](absl::Status st) {
    if (status.ok()) status = std::move(st);
  };
  check(FloatField(body, "temperature", [s](float v) { s->set_temperature(v); }));
  check(FloatField(body, "top_p", [s](float v) { s->set_top_p(v); }));
  check(FloatField(body, "min_p", [s](float v) { s->set_min_p(v); }));
  check(FloatField(body, "presence_penalty", [s](float v) { s->set_presence_penalty(v); }));
  check(FloatField(body, "frequency_penalty", [s](float v) { s->set_frequency_penalty(v); }));
  check(FloatField(body, "repetition_penalty", [s](float v) { s->set_repetition_penalty(v); }));
  if (!status.ok()) return status;
  if (const Json* k = Field(body, "top_k")) {
    absl::StatusOr<int64_t> v = Integer(*k, "top_k");
    if (!v.ok()) return v.status();
    // -1 is the common "off" spelling; the engine's off is 0.
    if (*v < -1 || *v > std::numeric_limits<int32_t>::max()) {
      return Bad("top_k", absl::StrCat("top_k = ", *v, " must be >= 0 (or -1 for off)"));
    }
    s->set_top_k(*v < 0 ? 0 : static_cast<int32_t>(*v));
  }
  if (const Json* seed = Field(body, "seed")) {
    if (!seed->is_number_integer()) return WrongType("seed", "an integer", *seed);
    // Any 64-bit integer; negative seeds wrap.
    s->set_seed(seed->is_number_unsigned() ? seed->get<uint64_t>()
                                           : static_cast<uint64_t>(seed->get<int64_t>()));
  }
  return absl::OkStatus();
}

absl::Status ParseStop(const Json& body, Endpoint endpoint, v1::StopCriteria* stop) {
  const char* max_name = "max_tokens";
  const Json* max = Field(body, "max_tokens");
  if (max == nullptr && endpoint == Endpoint::kChatCompletions) {
    max = Field(body, "max_completion_tokens");
    max_name = "max_completion_tokens";
  }
  if (max != nullptr) {
    absl::StatusOr<int64_t> v = Integer(*max, max_name);
    if (!v.ok()) return v.status();
    if (*v < 1) return Bad(max_name, absl::StrCat(max_name, " must be >= 1, got ", *v));
    stop->set_max_tokens(static_cast<uint32_t>(
        std::min<int64_t>(*v, std::numeric_limits<uint32_t>::max())));
  }
  if (const Json* s = Field(body, "stop")) {
    if (s->is_string()) {
      stop->add_stop_strings(s->get<std::string>());
    } else if (s->is_array()) {
      for (size_t i = 0; i < s->size(); ++i) {
        if (!(*s)[i].is_string()) return WrongType(absl::StrCat("stop[", i, "]"), "a string", (*s)[i]);
        stop->add_stop_strings((*s)[i].get<std::string>());
      }
    } else {
      return WrongType("stop", "a string or a list of strings", *s);
    }
  }
  if (const Json* ignore = Field(body, "ignore_eos")) {
    absl::StatusOr<bool> v = Boolean(*ignore, "ignore_eos");
    if (!v.ok()) return v.status();
    stop->set_ignore_eos(*v);
  }
  return absl::OkStatus();
}

absl::Status ParseLogprobs(const Json& body, Endpoint endpoint, v1::GenerateRequest* request) {
  const Json* logprobs = Field(body, "logprobs");
  if (endpoint == Endpoint::kCompletions) {
    // An integer: how many alternatives per token (0: only the chosen token's).
    if (logprobs == nullptr) return absl::OkStatus();
    absl::StatusOr<int64_t> n = Integer(*logprobs, "logprobs");
    if (!n.ok()) return n.status();
    if (*n < 0 || *n > engine::kMaxTopLogprobs) {
      return Bad("logprobs", absl::StrCat("logprobs = ", *n, " is outside [0, ",
                                                 engine::kMaxTopLogprobs, "]"));
    }
    request->set_logprobs(true);
    request->set_top_logprobs(static_cast<uint32_t>(*n));
    return absl::OkStatus();
  }
  bool on = false;
  if (logprobs != nullptr) {
    absl::StatusOr<bool> v = Boolean(*logprobs, "logprobs");
    if (!v.ok()) return v.status();
    on = *v;
  }
  if (const Json* top = Field(body, "top_logprobs")) {
    absl::StatusOr<int64_t> n = Integer(*top, "top_logprobs");
    if (!n.ok()) return n.status();
    if (!on) return Bad("top_logprobs", "top_logprobs needs logprobs: true");
    if (*n < 0 || *n > engine::kMaxTopLogprobs) {
      return Bad("top_logprobs", absl::StrCat("top_logprobs = ", *n, " is outside [0, ",
                                                     engine::kMaxTopLogprobs, "]"));
    }
    request->set_top_logprobs(static_cast<uint32_t>(*n));
  }
  request->set_logprobs(on);
  return absl::OkStatus();
}

absl::Status ParseStreaming(const Json& body, ParsedRequest* out) {
  if (const Json* stream = Field(body, "stream")) {
    absl::StatusOr<bool> v = Boolean(*stream, "stream");
    if (!v.ok()) return v.status();
    out->stream = *v;
  }
  if (const Json* options = Field(body, "stream_options")) {
    if (!out->stream) {
      return Bad("stream_options", "stream_options is only allowed with stream: true");
    }
    if (!options->is_object()) return WrongType("stream_options", "an object", *options);
    if (const Json* usage = Field(*options, "include_usage")) {
      absl::StatusOr<bool> v = Boolean(*usage, "stream_options.include_usage");
      if (!v.ok()) return v.status();
      out->include_usage = *v;
    }
  }
  return absl::OkStatus();
}

// The proto paths of convert.h's messages and the JSON fields they stand for, most specific
// first.
struct FieldName {
  absl::string_view proto;
  absl::string_view json;
};
constexpr FieldName kCompletionFields[] = {
    {"sampling.temperature", "temperature"},
    {"sampling.top_p", "top_p"},
    {"sampling.top_k", "top_k"},
    {"sampling.min_p", "min_p"},
    {"sampling.repetition_penalty", "repetition_penalty"},
    {"sampling.presence_penalty", "presence_penalty"},
    {"sampling.frequency_penalty", "frequency_penalty"},
    {"stop.max_tokens", "max_tokens"},
    {"stop.stop_strings", "stop"},
    {"prompt: token_ids", "prompt"},
    {"prompt: text", "prompt"},
    {"top_logprobs", "logprobs"},
};
constexpr FieldName kChatFields[] = {
    {"sampling.temperature", "temperature"},
    {"sampling.top_p", "top_p"},
    {"sampling.top_k", "top_k"},
    {"sampling.min_p", "min_p"},
    {"sampling.repetition_penalty", "repetition_penalty"},
    {"sampling.presence_penalty", "presence_penalty"},
    {"sampling.frequency_penalty", "frequency_penalty"},
    {"stop.max_tokens", "max_tokens"},
    {"stop.stop_strings", "stop"},
    {"prompt: messages", "messages"},
    {"prompt: text", "messages"},
    {"top_logprobs", "top_logprobs"},
};

}  // namespace

absl::Status FieldError(std::string_view param, std::string_view message) {
  absl::Status status =
      absl::InvalidArgumentError(absl::string_view(message.data(), message.size()));
  status.SetPayload(kParamPayload, absl::Cord(absl::string_view(param.data(), param.size())));
  return status;
}

absl::StatusOr<ParsedRequest> ParseRequest(std::string_view body, Endpoint endpoint) {
  Json j = Json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return Bad("", "the request body is not valid JSON");
  }
  if (!j.is_object()) return Bad("", "the request body must be a JSON object");
  ParsedRequest out;
  v1::GenerateRequest& request = out.request;
  if (const Json* model = Field(j, "model")) {
    if (!model->is_string()) return WrongType("model", "a string", *model);
    request.set_model(model->get<std::string>());
  }
  if (absl::Status s = RejectUnsupported(j, endpoint); !s.ok()) return s;
  if (absl::Status s = endpoint == Endpoint::kCompletions ? ParsePrompt(j, &request)
                                                          : ParseMessages(j, &request);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = ParseSampling(j, request.mutable_sampling()); !s.ok()) return s;
  if (absl::Status s = ParseStop(j, endpoint, request.mutable_stop()); !s.ok()) return s;
  if (absl::Status s = ParseLogprobs(j, endpoint, &request); !s.ok()) return s;
  if (absl::Status s = ParseStreaming(j, &out); !s.ok()) return s;
  if (const Json* user = Field(j, "user"); user != nullptr && !user->is_string()) {
    return WrongType("user", "a string", *user);
  }
  return out;
}

ApiError ToApiError(const absl::Status& status, Endpoint endpoint) {
  ApiError e;
  e.message = std::string(status.message());
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
      e.http_status = 400;
      e.type = "invalid_request_error";
      break;
    case absl::StatusCode::kOutOfRange:
      e.http_status = 400;
      e.type = "invalid_request_error";
      e.code = "context_length_exceeded";
      break;
    case absl::StatusCode::kNotFound:
      e.http_status = 404;
      e.type = "invalid_request_error";
      e.code = "model_not_found";
      e.param = "model";
      break;
    case absl::StatusCode::kResourceExhausted:
      e.http_status = 429;
      e.type = "rate_limit_error";
      e.code = "queue_full";
      break;
    case absl::StatusCode::kUnimplemented:
      e.http_status = 501;
      e.type = "invalid_request_error";
      e.code = "not_implemented";
      break;
    case absl::StatusCode::kUnavailable:
      e.http_status = 503;
      e.type = "server_error";
      e.code = "service_unavailable";
      break;
    case absl::StatusCode::kDeadlineExceeded:
      e.http_status = 504;
      e.type = "server_error";
      e.code = "timeout";
      break;
    case absl::StatusCode::kUnauthenticated:
      e.http_status = 401;
      e.type = "authentication_error";
      e.code = "invalid_api_key";
      break;
    case absl::StatusCode::kPermissionDenied:
      e.http_status = 403;
      e.type = "permission_error";
      break;
    default:
      e.http_status = 500;
      e.type = "server_error";
      break;
  }
  if (absl::optional<absl::Cord> param = status.GetPayload(kParamPayload)) {
    e.param = std::string(*param);
    return e;
  }
  // A message of the engine path: name the JSON field instead of the proto path.
  const absl::Span<const FieldName> fields =
      endpoint == Endpoint::kCompletions ? absl::MakeConstSpan(kCompletionFields)
                                         : absl::MakeConstSpan(kChatFields);
  const std::string prompt_field =
      endpoint == Endpoint::kCompletions ? "prompt" : "messages";
  for (const FieldName& f : fields) {
    if (absl::StrContains(e.message, f.proto)) {
      if (e.param.empty()) e.param = std::string(f.json);
      e.message = absl::StrReplaceAll(e.message, {{f.proto, f.json}});
    }
  }
  if (e.param.empty() && absl::StartsWith(e.message, "prompt")) {
    e.param = prompt_field;
  }
  if (e.param.empty() && absl::StartsWith(e.message, "stop.")) e.param = "stop";
  return e;
}

std::string ErrorBody(const ApiError& error) {
  OrderedJson body;
  OrderedJson& e = body["error"];
  e["message"] = error.message;
  e["type"] = error.type;
  e["param"] = error.param.empty() ? OrderedJson() : OrderedJson(error.param);
  e["code"] = error.code.empty() ? OrderedJson() : OrderedJson(error.code);
  return Dump(body);
}

std::string_view FinishReasonName(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kLength:
      return "length";
    case engine::FinishReason::kStop:
    case engine::FinishReason::kEos:
      return "stop";
    case engine::FinishReason::kCancelled:
      return "cancelled";
    case engine::FinishReason::kNone:
    case engine::FinishReason::kError:
      break;
  }
  return "error";
}

}  // namespace sieve::server::openai
