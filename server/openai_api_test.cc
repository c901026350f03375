#include "server/openai_api.h"

#include <cstdlib>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/convert.h"

namespace sieve::server::openai {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

const engine::Tokenizer& EmbeddedTokenizer() {
  static const engine::Tokenizer* const tokenizer = [] {
    const char* root = std::getenv("SIEVE_SOURCE_DIR");
    const std::string dir = std::string(root ? root : ".") + "/models/embedded";
    auto loaded = engine::Tokenizer::FromDirectory(dir);
    if (!loaded.ok()) {
      ADD_FAILURE() << loaded.status();
      std::abort();
    }
    return loaded->release();
  }();
  return *tokenizer;
}

// Parses `body` for `endpoint`, expecting a 400 whose param is `param` and whose message holds
// `text`.
void ExpectBadField(const std::string& body, Endpoint endpoint, const std::string& param,
                    const std::string& text) {
  absl::StatusOr<ParsedRequest> parsed = ParseRequest(body, endpoint);
  ASSERT_FALSE(parsed.ok()) << body;
  const ApiError e = ToApiError(parsed.status(), endpoint);
  EXPECT_EQ(e.http_status, 400) << body;
  EXPECT_EQ(e.type, "invalid_request_error") << body;
  EXPECT_EQ(e.param, param) << body << ": " << e.message;
  EXPECT_THAT(e.message, HasSubstr(text)) << body;
}

TEST(OpenAiParse, CompletionFieldsBecomeTheGenerateRequest) {
  absl::StatusOr<ParsedRequest> p = ParseRequest(
      R"({"model": "m", "prompt": "hello", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
          "seed": 42, "stop": ["a", "b"], "logprobs": 3, "n": 1, "stream": true,
          "stream_options": {"include_usage": true}, "user": "u", "unknown_field": 1,
          "top_k": 5, "ignore_eos": true})",
      Endpoint::kCompletions);
  ASSERT_TRUE(p.ok()) << p.status();
  const v1::GenerateRequest& r = p->request;
  EXPECT_EQ(r.model(), "m");
  EXPECT_EQ(r.text(), "hello");
  EXPECT_EQ(r.stop().max_tokens(), 7u);
  EXPECT_FLOAT_EQ(r.sampling().temperature(), 0.5f);
  EXPECT_FLOAT_EQ(r.sampling().top_p(), 0.9f);
  EXPECT_EQ(r.sampling().seed(), 42u);
  EXPECT_EQ(r.sampling().top_k(), 5);
  ASSERT_EQ(r.stop().stop_strings_size(), 2);
  EXPECT_EQ(r.stop().stop_strings(1), "b");
  EXPECT_TRUE(r.stop().ignore_eos());
  EXPECT_TRUE(r.logprobs());
  EXPECT_EQ(r.top_logprobs(), 3u);
  EXPECT_TRUE(p->stream);
  EXPECT_TRUE(p->include_usage);
}

TEST(OpenAiParse, PromptForms) {
  auto ids = [](const std::string& body) {
    absl::StatusOr<ParsedRequest> p = ParseRequest(body, Endpoint::kCompletions);
    EXPECT_TRUE(p.ok()) << p.status();
    std::vector<int32_t> out;
    if (p.ok()) out.assign(p->request.token_ids().ids().begin(), p->request.token_ids().ids().end());
    return out;
  };
  EXPECT_EQ(ids(R"({"prompt": [5, 6, 7]})"), (std::vector<int32_t>{5, 6, 7}));
  EXPECT_EQ(ids(R"({"prompt": [[8, 9]]})"), (std::vector<int32_t>{8, 9}));
  absl::StatusOr<ParsedRequest> one = ParseRequest(R"({"prompt": ["x"]})", Endpoint::kCompletions);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->request.text(), "x");
  absl::StatusOr<ParsedRequest> plain = ParseRequest(R"({"prompt": "p"})", Endpoint::kCompletions);
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(plain->stream);
  EXPECT_FALSE(plain->request.logprobs());
  EXPECT_FALSE(plain->request.stop().has_max_tokens());
  EXPECT_FALSE(plain->request.sampling().has_seed());
}

TEST(OpenAiParse, ChatMessages) {
  absl::StatusOr<ParsedRequest> p = ParseRequest(
      R"({"messages": [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": [{"type": "text", "text": "hi "},
                                                    {"type": "text", "text": "there"}]}],
          "max_completion_tokens": 4, "logprobs": true, "top_logprobs": 2})",
      Endpoint::kChatCompletions);
  ASSERT_TRUE(p.ok()) << p.status();
  const v1::ChatMessages& m = p->request.messages();
  ASSERT_EQ(m.messages_size(), 2);
  EXPECT_EQ(m.messages(0).role(), "system");
  EXPECT_EQ(m.messages(1).content(), "hi there");
  EXPECT_EQ(p->request.stop().max_tokens(), 4u);
  EXPECT_TRUE(p->request.logprobs());
  EXPECT_EQ(p->request.top_logprobs(), 2u);
}

TEST(OpenAiParse, BadFieldsNameTheField) {
  const Endpoint c = Endpoint::kCompletions, chat = Endpoint::kChatCompletions;
  ExpectBadField("not json", c, "", "not valid JSON");
  ExpectBadField("[1]", c, "", "JSON object");
  ExpectBadField(R"({})", c, "prompt", "required");
  ExpectBadField(R"({"prompt": 3})", c, "prompt", "expected");
  ExpectBadField(R"({"prompt": ["a", "b"]})", c, "prompt", "one per request");
  ExpectBadField(R"({"prompt": [1, "x"]})", c, "prompt[1]", "token id");
  ExpectBadField(R"({"prompt": [-1]})", c, "prompt", "outside the vocabulary");
  ExpectBadField(R"({"prompt": "x", "n": 2})", c, "n", "only n = 1");
  ExpectBadField(R"({"prompt": "x", "max_tokens": 0})", c, "max_tokens", ">= 1");
  ExpectBadField(R"({"prompt": "x", "max_tokens": "3"})", c, "max_tokens", "an integer");
  ExpectBadField(R"({"prompt": "x", "temperature": "hot"})", c, "temperature", "a number");
  ExpectBadField(R"({"prompt": "x", "stop": 5})", c, "stop", "a string or a list");
  ExpectBadField(R"({"prompt": "x", "logprobs": 21})", c, "logprobs", "outside [0, 20]");
  ExpectBadField(R"({"prompt": "x", "stream_options": {"include_usage": true}})", c,
                 "stream_options", "stream: true");
  ExpectBadField(R"({"prompt": "x", "echo": true})", c, "echo", "not supported");
  ExpectBadField(R"({"prompt": "x", "logit_bias": {"5": 1}})", c, "logit_bias", "not supported");
  ExpectBadField(R"({"prompt": "x", "model": 1})", c, "model", "a string");
  ExpectBadField(R"({"messages": []})", chat, "messages", "empty");
  ExpectBadField(R"({"messages": [{"content": "x"}]})", chat, "messages", "role");
  ExpectBadField(R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", chat,
                 "messages", "text");
  ExpectBadField(R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})", chat,
                 "top_logprobs", "logprobs: true");
  ExpectBadField(R"({"messages": [{"role": "user", "content": "x"}], "logprobs": 1})", chat,
                 "logprobs", "a boolean");
  ExpectBadField(R"({"messages": [{"role": "user", "content": "x"}], "tools": [{}]})", chat,
                 "tools", "not supported");
}

// Range errors come from convert.h, in proto terms; the API names the JSON field.
TEST(OpenAiErrors, ConversionErrorsNameJsonFields) {
  RequestLimits limits;
  limits.vocab_size = EmbeddedTokenizer().vocab_size();
  limits.context_tokens = 64;
  auto error_of = [&](const std::string& body, Endpoint endpoint) {
    absl::StatusOr<ParsedRequest> p = ParseRequest(body, endpoint);
    EXPECT_TRUE(p.ok()) << p.status();
    absl::StatusOr<engine::RequestSpec> spec =
        ToRequestSpec(p->request, EmbeddedTokenizer(), limits);
    EXPECT_FALSE(spec.ok()) << body;
    return ToApiError(spec.status(), endpoint);
  };
  ApiError e = error_of(R"({"prompt": "x", "top_p": 1.5})", Endpoint::kCompletions);
  EXPECT_EQ(e.http_status, 400);
  EXPECT_EQ(e.param, "top_p");
  EXPECT_THAT(e.message, HasSubstr("top_p = 1.5"));
  EXPECT_THAT(e.message, ::testing::Not(HasSubstr("sampling.")));
  e = error_of(R"({"prompt": "x", "temperature": -1})", Endpoint::kCompletions);
  EXPECT_EQ(e.param, "temperature");
  e = error_of(R"({"prompt": "x", "max_tokens": 1000})", Endpoint::kCompletions);
  EXPECT_EQ(e.http_status, 400);
  EXPECT_EQ(e.code, "context_length_exceeded");
  EXPECT_EQ(e.param, "max_tokens");
  e = error_of(R"({"prompt": ""})", Endpoint::kCompletions);
  EXPECT_EQ(e.param, "prompt");
  e = error_of(R"({"prompt": [99999]})", Endpoint::kCompletions);
  EXPECT_EQ(e.param, "prompt");
  e = error_of(R"({"prompt": "x", "stop": ["a", ""]})", Endpoint::kCompletions);
  EXPECT_EQ(e.param, "stop");
}

TEST(OpenAiErrors, StatusCodesMapToHttp) {
  const Endpoint c = Endpoint::kCompletions;
  EXPECT_EQ(ToApiError(absl::NotFoundError("unknown model 'x'"), c).http_status, 404);
  EXPECT_EQ(ToApiError(absl::NotFoundError("unknown model 'x'"), c).param, "model");
  EXPECT_EQ(ToApiError(absl::ResourceExhaustedError("queue full"), c).http_status, 429);
  EXPECT_EQ(ToApiError(absl::UnavailableError("draining"), c).http_status, 503);
  EXPECT_EQ(ToApiError(absl::InternalError("boom"), c).http_status, 500);
  EXPECT_EQ(ToApiError(absl::UnimplementedError("no template"), c).http_status, 501);
  const Json body = Json::parse(ErrorBody(ToApiError(absl::UnavailableError("draining"), c)));
  EXPECT_EQ(body["error"]["message"], "draining");
  EXPECT_EQ(body["error"]["type"], "server_error");
  EXPECT_TRUE(body["error"]["param"].is_null());
  EXPECT_EQ(body["error"]["code"], "service_unavailable");
}

engine::TokenDelta Delta(const std::string& text, std::vector<int32_t> ids, bool logprobs) {
  engine::TokenDelta d;
  d.text = text;
  d.token_ids = ids;
  if (logprobs) {
    for (int32_t id : ids) d.logprobs.push_back({id, -0.5f, {{id, -0.5f}, {id + 1, -1.5f}}});
  }
  return d;
}

engine::RequestOutcome Outcome(engine::FinishReason finish, int prompt, int generated) {
  engine::RequestOutcome o;
  o.finish = finish;
  o.prompt_tokens = prompt;
  o.generated_tokens = generated;
  return o;
}

// The data lines of an SSE stream, parsed (the [DONE] marker as the string "[DONE]").
std::vector<Json> Events(const std::string& stream) {
  std::vector<Json> out;
  for (absl::string_view block : absl::StrSplit(stream, "\n\n", absl::SkipEmpty())) {
    EXPECT_TRUE(absl::StartsWith(block, "data: ")) << block;
    block.remove_prefix(6);
    out.push_back(block == "[DONE]" ? Json("[DONE]") : Json::parse(block));
  }
  return out;
}

TEST(OpenAiResponse, UnstreamedCompletion) {
  ParsedRequest request;
  request.request.set_logprobs(true);
  ResponseBuilder b(Endpoint::kCompletions, "cmpl-1", 100, "m", request, EmbeddedTokenizer());
  b.Append(Delta("Hel", {10, 11}, true));
  b.Append(Delta("lo", {12}, true));
  const Json r = Json::parse(b.Complete(Outcome(engine::FinishReason::kEos, 5, 3)));
  EXPECT_EQ(r["id"], "cmpl-1");
  EXPECT_EQ(r["object"], "text_completion");
  EXPECT_EQ(r["created"], 100);
  EXPECT_EQ(r["model"], "m");
  ASSERT_EQ(r["choices"].size(), 1u);
  EXPECT_EQ(r["choices"][0]["text"], "Hello");
  EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");
  const Json& lp = r["choices"][0]["logprobs"];
  ASSERT_EQ(lp["tokens"].size(), 3u);
  EXPECT_EQ(lp["tokens"][0], *EmbeddedTokenizer().TokenBytes(10));
  EXPECT_FLOAT_EQ(lp["token_logprobs"][2].get<float>(), -0.5f);
  EXPECT_EQ(lp["top_logprobs"][0].size(), 2u);
  EXPECT_EQ(lp["text_offset"][1], EmbeddedTokenizer().TokenBytes(10)->size());
  EXPECT_EQ(r["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(r["usage"]["completion_tokens"], 3);
  EXPECT_EQ(r["usage"]["total_tokens"], 8);
}

TEST(OpenAiResponse, StreamedChatWithUsage) {
  ParsedRequest request;
  request.stream = true;
  request.include_usage = true;
  ResponseBuilder b(Endpoint::kChatCompletions, "chatcmpl-2", 7, "m", request,
                    EmbeddedTokenizer());
  std::string stream = b.TakeEvents();  // the role chunk, before any token
  b.Append(Delta("Hi", {10}, false));
  stream += b.TakeEvents();
  EXPECT_EQ(b.TakeEvents(), "");  // nothing new
  b.Append(Delta(" you", {11}, false));
  stream += b.FinalEvents(Outcome(engine::FinishReason::kLength, 4, 2));
  const std::vector<Json> events = Events(stream);
  ASSERT_EQ(events.size(), 6u) << stream;
  EXPECT_EQ(events[0]["object"], "chat.completion.chunk");
  EXPECT_EQ(events[0]["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(events[1]["choices"][0]["delta"]["content"], "Hi");
  EXPECT_TRUE(events[1]["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(events[1]["usage"].is_null());
  EXPECT_EQ(events[2]["choices"][0]["delta"]["content"], " you");
  EXPECT_EQ(events[3]["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(events[3]["choices"][0]["delta"].empty());
  EXPECT_TRUE(events[4]["choices"].empty());
  EXPECT_EQ(events[4]["usage"]["completion_tokens"], 2);
  EXPECT_EQ(events[5], "[DONE]");
}

TEST(OpenAiResponse, StreamedCompletionWithoutUsage) {
  ParsedRequest request;
  request.stream = true;
  ResponseBuilder b(Endpoint::kCompletions, "cmpl-3", 7, "m", request, EmbeddedTokenizer());
  EXPECT_EQ(b.TakeEvents(), "");  // completions have no opening chunk
  b.Append(Delta("x", {10}, false));
  std::string stream = b.TakeEvents();
  stream += b.FinalEvents(Outcome(engine::FinishReason::kStop, 1, 1));
  const std::vector<Json> events = Events(stream);
  ASSERT_EQ(events.size(), 3u) << stream;
  EXPECT_EQ(events[0]["choices"][0]["text"], "x");
  EXPECT_FALSE(events[0].contains("usage"));
  EXPECT_EQ(events[1]["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(events[2], "[DONE]");
}

}  // namespace
}  // namespace sieve::server::openai
