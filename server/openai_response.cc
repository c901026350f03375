// ResponseBuilder (server/openai_api.h): OpenAI-shaped response objects and stream chunks.
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "server/openai_api.h"

namespace sieve::server::openai {
namespace {

using OrderedJson = nlohmann::ordered_json;

std::string Dump(const OrderedJson& j) {
  return j.dump(-1, ' ', false, OrderedJson::error_handler_t::replace);
}

std::string Event(const OrderedJson& j) { return absl::StrCat("data: ", Dump(j), "\n\n"); }

}  // namespace

ResponseBuilder::ResponseBuilder(Endpoint endpoint, std::string id, int64_t created,
                                 std::string model, const ParsedRequest& request,
                                 const engine::Tokenizer& tokenizer)
    : endpoint_(endpoint),
      id_(std::move(id)),
      created_(created),
      model_(std::move(model)),
      logprobs_(request.request.logprobs()),
      include_usage_(request.stream && request.include_usage),
      tokenizer_(tokenizer) {}

void ResponseBuilder::Append(const engine::TokenDelta& delta) {
  text_ += delta.text;
  for (const engine::TokenLogprob& lp : delta.logprobs) {
    logprobs_so_far_.push_back(Logprob{lp.id, lp.logprob, lp.top});
  }
}

std::string ResponseBuilder::LogprobsJson(const std::vector<Logprob>& logprobs,
                                          size_t text_offset) const {
  auto piece = [this](int32_t id) {
    absl::StatusOr<std::string> p = tokenizer_.TokenBytes(id);
    return p.ok() ? *std::move(p) : std::string();
  };
  OrderedJson out;
  if (endpoint_ == Endpoint::kCompletions) {
    // The legacy shape: parallel lists; text_offset counts bytes of the completion's text
    // before each token, by its pieces.
    OrderedJson tokens = OrderedJson::array(), token_logprobs = OrderedJson::array(),
                top = OrderedJson::array(), offsets = OrderedJson::array();
    for (const Logprob& lp : logprobs) {
      const std::string p = piece(lp.id);
      tokens.push_back(p);
      token_logprobs.push_back(lp.logprob);
      OrderedJson alternatives = OrderedJson::object();
      for (const auto& [id, logprob] : lp.top) alternatives[piece(id)] = logprob;
      top.push_back(std::move(alternatives));
      offsets.push_back(text_offset);
      text_offset += p.size();
    }
    out["tokens"] = std::move(tokens);
    out["token_logprobs"] = std::move(token_logprobs);
    out["top_logprobs"] = std::move(top);
    out["text_offset"] = std::move(offsets);
    return Dump(out);
  }
  auto entry = [&piece](int32_t id, float logprob) {
    const std::string p = piece(id);
    OrderedJson e;
    e["token"] = p;
    e["logprob"] = logprob;
    OrderedJson bytes = OrderedJson::array();
    for (unsigned char c : p) bytes.push_back(static_cast<int>(c));
    e["bytes"] = std::move(bytes);
    return e;
  };
  OrderedJson content = OrderedJson::array();
  for (const Logprob& lp : logprobs) {
    OrderedJson e = entry(lp.id, lp.logprob);
    OrderedJson top = OrderedJson::array();
    for (const auto& [id, logprob] : lp.top) top.push_back(entry(id, logprob));
    e["top_logprobs"] = std::move(top);
    content.push_back(std::move(e));
  }
  out["content"] = std::move(content);
  return Dump(out);
}

std::string ResponseBuilder::UsageJson(const engine::RequestOutcome& outcome) const {
  OrderedJson usage;
  usage["prompt_tokens"] = outcome.prompt_tokens;
  usage["completion_tokens"] = outcome.generated_tokens;
  usage["total_tokens"] = outcome.prompt_tokens + outcome.generated_tokens;
  usage["prompt_tokens_details"] = {{"cached_tokens", outcome.cached_tokens}};
  return Dump(usage);
}

std::string ResponseBuilder::Chunk(std::string_view text, const std::vector<Logprob>& logprobs,
                                   std::string_view finish_reason, bool first) const {
  const bool chat = endpoint_ == Endpoint::kChatCompletions;
  OrderedJson chunk;
  chunk["id"] = id_;
  chunk["object"] = chat ? "chat.completion.chunk" : "text_completion";
  chunk["created"] = created_;
  chunk["model"] = model_;
  OrderedJson choice;
  choice["index"] = 0;
  if (chat) {
    OrderedJson delta = OrderedJson::object();
    if (first) delta["role"] = "assistant";
    if (!text.empty() || (first && finish_reason.empty())) delta["content"] = std::string(text);
    choice["delta"] = std::move(delta);
  } else {
    choice["text"] = std::string(text);
  }
  choice["logprobs"] = logprobs_ && !logprobs.empty()
                           ? OrderedJson::parse(LogprobsJson(logprobs, sent_bytes_))
                           : OrderedJson();
  choice["finish_reason"] =
      finish_reason.empty() ? OrderedJson() : OrderedJson(std::string(finish_reason));
  chunk["choices"] = OrderedJson::array({std::move(choice)});
  if (include_usage_) chunk["usage"] = OrderedJson();
  return Event(chunk);
}

std::string ResponseBuilder::TakeEvents() {
  const bool chat = endpoint_ == Endpoint::kChatCompletions;
  std::string events;
  if (chat && !sent_first_) {
    // OpenAI's chat streams open with the assistant's role and empty content.
    events = Chunk("", {}, "", /*first=*/true);
    sent_first_ = true;
  }
  if (text_.empty() && logprobs_so_far_.empty()) return events;
  absl::StrAppend(&events, Chunk(text_, logprobs_so_far_, "", /*first=*/false));
  sent_bytes_ += text_.size();
  text_.clear();
  logprobs_so_far_.clear();
  return events;
}

std::string ResponseBuilder::FinalEvents(const engine::RequestOutcome& outcome) {
  std::string events = TakeEvents();
  absl::StrAppend(&events, Chunk("", {}, FinishReasonName(outcome.finish), /*first=*/false));
  if (include_usage_) {
    const bool chat = endpoint_ == Endpoint::kChatCompletions;
    OrderedJson chunk;
    chunk["id"] = id_;
    chunk["object"] = chat ? "chat.completion.chunk" : "text_completion";
    chunk["created"] = created_;
    chunk["model"] = model_;
    chunk["choices"] = OrderedJson::array();
    chunk["usage"] = OrderedJson::parse(UsageJson(outcome));
    absl::StrAppend(&events, Event(chunk));
  }
  absl::StrAppend(&events, "data: [DONE]\n\n");
  return events;
}

std::string ResponseBuilder::Complete(const engine::RequestOutcome& outcome) const {
  const bool chat = endpoint_ == Endpoint::kChatCompletions;
  OrderedJson response;
  response["id"] = id_;
  response["object"] = chat ? "chat.completion" : "text_completion";
  response["created"] = created_;
  response["model"] = model_;
  OrderedJson choice;
  choice["index"] = 0;
  if (chat) {
    choice["message"] = {{"role", "assistant"}, {"content", text_}};
  } else {
    choice["text"] = text_;
  }
  choice["logprobs"] =
      logprobs_ ? OrderedJson::parse(LogprobsJson(logprobs_so_far_, 0)) : OrderedJson();
  choice["finish_reason"] = std::string(FinishReasonName(outcome.finish));
  response["choices"] = OrderedJson::array({std::move(choice)});
  response["usage"] = OrderedJson::parse(UsageJson(outcome));
  return Dump(response);
}

}  // namespace sieve::server::openai
