#include "server/convert.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::server {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// The embedded model's tokenizer (vocabulary 4096), loaded once.
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

RequestLimits Limits() {
  RequestLimits limits;
  limits.vocab_size = EmbeddedTokenizer().vocab_size();
  limits.context_tokens = 64;
  limits.default_max_tokens = 16;
  limits.max_stop_strings = 4;
  return limits;
}

v1::GenerateRequest TokenRequest(std::initializer_list<int32_t> ids) {
  v1::GenerateRequest request;
  for (int32_t id : ids) request.mutable_token_ids()->add_ids(id);
  return request;
}

// Expects ToRequestSpec(request) to fail with `code` and a message containing `text`.
void ExpectRejected(const v1::GenerateRequest& request, absl::StatusCode code,
                    const std::string& text, const RequestLimits& limits = Limits()) {
  absl::StatusOr<engine::RequestSpec> spec =
      ToRequestSpec(request, EmbeddedTokenizer(), limits);
  ASSERT_FALSE(spec.ok()) << request.DebugString();
  EXPECT_EQ(spec.status().code(), code) << spec.status();
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr(text));
}

TEST(StatusMapping, EveryAbslCodeMapsToTheSameGrpcCode) {
  for (int code = 0; code <= 16; ++code) {
    EXPECT_EQ(static_cast<int>(ToGrpcCode(static_cast<absl::StatusCode>(code))), code) << code;
  }
  EXPECT_EQ(ToGrpcCode(static_cast<absl::StatusCode>(99)), grpc::StatusCode::UNKNOWN);
}

TEST(StatusMapping, KeepsTheMessage) {
  grpc::Status s = ToGrpcStatus(absl::OutOfRangeError("prompt too long"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::OUT_OF_RANGE);
  EXPECT_EQ(s.error_message(), "prompt too long");
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
}

TEST(ToRequestSpec, TokenizesTextWithDefaults) {
  v1::GenerateRequest request;
  request.set_text("The scheduler admits");
  request.set_priority(3);
  request.set_request_id("client-7");
  absl::StatusOr<engine::RequestSpec> spec = ToRequestSpec(request, EmbeddedTokenizer(), Limits());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->prompt, *EmbeddedTokenizer().Encode("The scheduler admits", true));
  EXPECT_EQ(spec->stop.max_tokens, 16);
  EXPECT_FLOAT_EQ(spec->sampling.temperature, 1.0f);
  EXPECT_TRUE(spec->sampling.seed.has_value());
  EXPECT_FALSE(spec->sampling.return_logprob);
  EXPECT_EQ(spec->priority, 3);
  EXPECT_EQ(spec->client_request_id, "client-7");
  EXPECT_EQ(spec->sink, nullptr);
  EXPECT_FALSE(spec->deadline.has_value());
}

TEST(ToRequestSpec, PrefillAttentionModeBecomesTheDenseOverride) {
  v1::GenerateRequest request = TokenRequest({5, 6, 7});
  absl::StatusOr<engine::RequestSpec> spec = ToRequestSpec(request, EmbeddedTokenizer(), Limits());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_FALSE(spec->dense_prefill);  // unspecified: the server's policy
  request.set_prefill_attention(v1::ATTENTION_MODE_DENSE);
  spec = ToRequestSpec(request, EmbeddedTokenizer(), Limits());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->dense_prefill);
  request.set_prefill_attention(static_cast<v1::AttentionMode>(7));
  ExpectRejected(request, absl::StatusCode::kInvalidArgument, "prefill_attention: unknown mode 7");
}

TEST(ToRequestSpec, DecodeAttentionDenseOverridesTheMethod) {
  v1::GenerateRequest request;
  request.set_text("hello");
  absl::StatusOr<engine::RequestSpec> spec = ToRequestSpec(request, EmbeddedTokenizer(), Limits());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_FALSE(spec->dense_decode);
  request.set_decode_attention(v1::ATTENTION_MODE_DENSE);
  spec = ToRequestSpec(request, EmbeddedTokenizer(), Limits());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->dense_decode);
  request.set_decode_attention(static_cast<v1::AttentionMode>(9));
  spec = ToRequestSpec(request, EmbeddedTokenizer(), Limits());
  ASSERT_FALSE(spec.ok());
  EXPECT_NE(spec.status().message().find("decode_attention"), std::string::npos);
}

TEST(ToRequestSpec, AddSpecialTokensFalseLeavesTheTextAlone) {
  v1::GenerateRequest request;
  request.set_text("hello world");
  request.set_add_special_tokens(false);
  absl::StatusOr<engine::RequestSpec> spec = ToRequestSpec(request, EmbeddedTokenizer(), Limits());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->prompt, *EmbeddedTokenizer().Encode("hello world", false));
}

TEST(ToRequestSpec, CopiesEverySetField) {
  v1::GenerateRequest request = TokenRequest({5, 6, 7});
  v1::SamplingParams* s = request.mutable_sampling();
  s->set_temperature(0.5f);
  s->set_top_k(40);
  s->set_top_p(0.9f);
  s->set_min_p(0.05f);
  s->set_seed(1234);
  s->set_repetition_penalty(1.1f);
  s->set_presence_penalty(-0.5f);
  s->set_frequency_penalty(0.25f);
  v1::StopCriteria* stop = request.mutable_stop();
  stop->set_max_tokens(10);
  stop->add_stop_strings("\n\n");
  stop->add_stop_token_ids(3);
  stop->set_ignore_eos(true);
  request.set_logprobs(true);
  request.set_top_logprobs(5);
  absl::StatusOr<engine::RequestSpec> spec = ToRequestSpec(request, EmbeddedTokenizer(), Limits());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_THAT(spec->prompt, ElementsAre(5, 6, 7));
  EXPECT_FLOAT_EQ(spec->sampling.temperature, 0.5f);
  EXPECT_EQ(spec->sampling.top_k, 40);
  EXPECT_FLOAT_EQ(spec->sampling.top_p, 0.9f);
  EXPECT_FLOAT_EQ(spec->sampling.min_p, 0.05f);
  EXPECT_EQ(spec->sampling.seed, 1234u);
  EXPECT_FLOAT_EQ(spec->sampling.repetition_penalty, 1.1f);
  EXPECT_FLOAT_EQ(spec->sampling.presence_penalty, -0.5f);
  EXPECT_FLOAT_EQ(spec->sampling.frequency_penalty, 0.25f);
  EXPECT_TRUE(spec->sampling.return_logprob);
  EXPECT_EQ(spec->sampling.top_logprobs, 5);
  EXPECT_EQ(spec->stop.max_tokens, 10);
  EXPECT_THAT(spec->stop.stop_strings, ElementsAre("\n\n"));
  EXPECT_THAT(spec->stop.stop_token_ids, ElementsAre(3));
  EXPECT_TRUE(spec->stop.ignore_eos);
}

TEST(ToRequestSpec, TopLogprobsIgnoredWithoutLogprobs) {
  v1::GenerateRequest request = TokenRequest({5});
  request.set_top_logprobs(50);
  absl::StatusOr<engine::RequestSpec> spec = ToRequestSpec(request, EmbeddedTokenizer(), Limits());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->sampling.top_logprobs, 0);
}

TEST(ToRequestSpec, DefaultMaxTokensIsCappedToTheContextLeft) {
  RequestLimits limits = Limits();
  limits.context_tokens = 8;
  absl::StatusOr<engine::RequestSpec> spec =
      ToRequestSpec(TokenRequest({1, 2, 3}), EmbeddedTokenizer(), limits);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->stop.max_tokens, 5);
}

TEST(ToRequestSpec, PromptPlusMaxTokensMayFillTheContextExactly) {
  v1::GenerateRequest request = TokenRequest({1, 2, 3, 4});
  request.mutable_stop()->set_max_tokens(60);
  EXPECT_TRUE(ToRequestSpec(request, EmbeddedTokenizer(), Limits()).ok());
}

// Valid prompt ids are the model's vocabulary, which may be larger than the tokenizer's (padding
// rows; a shape directory that borrows a smaller tokenizer, as configs/llama-3.1-8b-h100.yaml does).
TEST(ToRequestSpec, PromptIdsAreCheckedAgainstTheModelVocabulary) {
  RequestLimits limits = Limits();
  limits.vocab_size = 128256;
  absl::StatusOr<engine::RequestSpec> spec =
      ToRequestSpec(TokenRequest({1, 4096, 128255}), EmbeddedTokenizer(), limits);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->prompt, (std::vector<int32_t>{1, 4096, 128255}));
  spec = ToRequestSpec(TokenRequest({128256}), EmbeddedTokenizer(), limits);
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(spec.status().message(), HasSubstr("outside the vocabulary [0, 128256)"));
}

TEST(ToRequestSpec, RejectsPromptProblems) {
  ExpectRejected(v1::GenerateRequest(), absl::StatusCode::kInvalidArgument,
                 "set one of text, token_ids or messages");
  v1::GenerateRequest empty_text;
  empty_text.set_text("");
  ExpectRejected(empty_text, absl::StatusCode::kInvalidArgument, "text is empty");
  v1::GenerateRequest empty_ids;
  empty_ids.mutable_token_ids();
  ExpectRejected(empty_ids, absl::StatusCode::kInvalidArgument, "token_ids is empty");
  ExpectRejected(TokenRequest({1, 4096}), absl::StatusCode::kInvalidArgument,
                 "token_ids[1] = 4096 is outside the vocabulary [0, 4096)");
  ExpectRejected(TokenRequest({-1}), absl::StatusCode::kInvalidArgument, "token_ids[0] = -1");
  v1::GenerateRequest bad_utf8;
  bad_utf8.set_text("abc\xff\xfe");
  ExpectRejected(bad_utf8, absl::StatusCode::kInvalidArgument, "prompt: text");
}

TEST(ToRequestSpec, MessagesAreRenderedByTheChatTemplateWithoutExtraSpecialTokens) {
  v1::GenerateRequest request;
  v1::ChatMessage* m = request.mutable_messages()->add_messages();
  m->set_role("user");
  m->set_content(" Hello ");
  absl::StatusOr<engine::RequestSpec> spec = ToRequestSpec(request, EmbeddedTokenizer(), Limits());
  ASSERT_TRUE(spec.ok()) << spec.status();
  const std::string rendered =
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n";
  EXPECT_EQ(spec->prompt, *EmbeddedTokenizer().Encode(rendered, /*add_special_tokens=*/false));
  absl::StatusOr<RenderedChat> chat =
      RenderChat(request.messages(), EmbeddedTokenizer(), "messages");
  ASSERT_TRUE(chat.ok()) << chat.status();
  EXPECT_EQ(chat->text, rendered);
  EXPECT_EQ(chat->ids, spec->prompt);
}

TEST(ToRequestSpec, RejectsBadMessageLists) {
  v1::GenerateRequest empty;
  empty.mutable_messages();
  ExpectRejected(empty, absl::StatusCode::kInvalidArgument, "prompt: messages is empty");
  v1::GenerateRequest no_role;
  no_role.mutable_messages()->add_messages()->set_content("x");
  ExpectRejected(no_role, absl::StatusCode::kInvalidArgument, "prompt: messages[0].role is empty");
  v1::GenerateRequest bad_utf8;
  v1::ChatMessage* m = bad_utf8.mutable_messages()->add_messages();
  m->set_role("user");
  m->set_content("abc\xff");
  ExpectRejected(bad_utf8, absl::StatusCode::kInvalidArgument,
                 "prompt: messages[0].content is not valid UTF-8");
}

TEST(ToRequestSpec, RejectsOutOfRangeAndNanSamplingValues) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    void (*set)(v1::SamplingParams*, float);
    float value;
    const char* field;
  };
  const Case cases[] = {
      {[](v1::SamplingParams* s, float v) { s->set_temperature(v); }, nan, "sampling.temperature"},
      {[](v1::SamplingParams* s, float v) { s->set_temperature(v); }, -0.1f, "sampling.temperature"},
      {[](v1::SamplingParams* s, float v) { s->set_temperature(v); }, 101, "sampling.temperature"},
      {[](v1::SamplingParams* s, float v) { s->set_temperature(v); }, inf, "sampling.temperature"},
      {[](v1::SamplingParams* s, float v) { s->set_top_p(v); }, 0, "sampling.top_p"},
      {[](v1::SamplingParams* s, float v) { s->set_top_p(v); }, 1.5f, "sampling.top_p"},
      {[](v1::SamplingParams* s, float v) { s->set_top_p(v); }, nan, "sampling.top_p"},
      {[](v1::SamplingParams* s, float v) { s->set_min_p(v); }, -0.1f, "sampling.min_p"},
      {[](v1::SamplingParams* s, float v) { s->set_min_p(v); }, nan, "sampling.min_p"},
      {[](v1::SamplingParams* s, float v) { s->set_repetition_penalty(v); }, 0,
       "sampling.repetition_penalty"},
      {[](v1::SamplingParams* s, float v) { s->set_repetition_penalty(v); }, 11,
       "sampling.repetition_penalty"},
      {[](v1::SamplingParams* s, float v) { s->set_presence_penalty(v); }, 3,
       "sampling.presence_penalty"},
      {[](v1::SamplingParams* s, float v) { s->set_frequency_penalty(v); }, nan,
       "sampling.frequency_penalty"},
  };
  for (const Case& c : cases) {
    v1::GenerateRequest request = TokenRequest({1});
    c.set(request.mutable_sampling(), c.value);
    ExpectRejected(request, absl::StatusCode::kInvalidArgument, c.field);
  }
  v1::GenerateRequest top_k = TokenRequest({1});
  top_k.mutable_sampling()->set_top_k(-1);
  ExpectRejected(top_k, absl::StatusCode::kInvalidArgument, "sampling.top_k");
  v1::GenerateRequest top_logprobs = TokenRequest({1});
  top_logprobs.set_logprobs(true);
  top_logprobs.set_top_logprobs(21);
  ExpectRejected(top_logprobs, absl::StatusCode::kInvalidArgument, "top_logprobs = 21");
}

TEST(ToRequestSpec, RejectsStopProblems) {
  v1::GenerateRequest too_many = TokenRequest({1});
  for (int i = 0; i < 5; ++i) too_many.mutable_stop()->add_stop_strings("x");
  ExpectRejected(too_many, absl::StatusCode::kInvalidArgument,
                 "stop.stop_strings holds 5 strings; at most 4");
  // The engine's own bound applies even when the config allows more.
  RequestLimits generous = Limits();
  generous.max_stop_strings = 1000;
  v1::GenerateRequest beyond_engine = TokenRequest({1});
  for (int i = 0; i <= engine::kMaxStopStrings; ++i) {
    beyond_engine.mutable_stop()->add_stop_strings("x");
  }
  ExpectRejected(beyond_engine, absl::StatusCode::kInvalidArgument, "stop.stop_strings", generous);
  v1::GenerateRequest empty_stop = TokenRequest({1});
  empty_stop.mutable_stop()->add_stop_strings("");
  ExpectRejected(empty_stop, absl::StatusCode::kInvalidArgument, "stop.stop_strings[0]");
  v1::GenerateRequest bad_token = TokenRequest({1});
  bad_token.mutable_stop()->add_stop_token_ids(5000);
  ExpectRejected(bad_token, absl::StatusCode::kInvalidArgument, "stop.stop_token_ids[0] = 5000");
  v1::GenerateRequest zero = TokenRequest({1});
  zero.mutable_stop()->set_max_tokens(0);
  ExpectRejected(zero, absl::StatusCode::kInvalidArgument, "stop.max_tokens must be >= 1");
}

TEST(ToRequestSpec, RejectsRequestsBeyondTheContextWithOutOfRange) {
  v1::GenerateRequest request = TokenRequest({1, 2, 3, 4});
  request.mutable_stop()->set_max_tokens(61);
  ExpectRejected(request, absl::StatusCode::kOutOfRange,
                 "prompt (4 tokens) + stop.max_tokens (61) = 65 tokens exceeds the context "
                 "length of 64 tokens");
  RequestLimits tiny = Limits();
  tiny.context_tokens = 3;
  ExpectRejected(TokenRequest({1, 2, 3}), absl::StatusCode::kOutOfRange,
                 "leaves no room to generate", tiny);
}

TEST(ToRequestSpec, RejectsLongRequestIds) {
  v1::GenerateRequest request = TokenRequest({1});
  request.set_request_id(std::string(kMaxRequestIdBytes + 1, 'a'));
  ExpectRejected(request, absl::StatusCode::kInvalidArgument, "request_id is 129 bytes");
  request.set_request_id(std::string(kMaxRequestIdBytes, 'a'));
  EXPECT_TRUE(ToRequestSpec(request, EmbeddedTokenizer(), Limits()).ok());
}

TEST(AppendDelta, CoalescesDeltasIntoOneMessage) {
  const engine::Tokenizer& tokenizer = EmbeddedTokenizer();
  v1::GenerateResponse response;
  engine::TokenDelta first;
  first.token_ids = {100};
  first.text = "ab";
  first.logprobs.push_back({100, -0.5f, {{100, -0.5f}, {7, -1.5f}}});
  engine::TokenDelta second;
  second.token_ids = {101, 102};
  second.text = "cd";
  second.logprobs.push_back({101, -0.25f, {}});
  second.logprobs.push_back({102, -2.0f, {}});
  AppendDelta(first, tokenizer, &response);
  AppendDelta(second, tokenizer, &response);
  EXPECT_EQ(response.text(), "abcd");
  EXPECT_THAT(response.token_ids(), ElementsAre(100, 101, 102));
  ASSERT_EQ(response.logprobs_size(), 3);
  EXPECT_EQ(response.logprobs(0).chosen().token_id(), 100);
  EXPECT_FLOAT_EQ(response.logprobs(0).chosen().logprob(), -0.5f);
  EXPECT_EQ(response.logprobs(0).chosen().piece(), *tokenizer.TokenBytes(100));
  ASSERT_EQ(response.logprobs(0).top_size(), 2);
  EXPECT_EQ(response.logprobs(0).top(1).token_id(), 7);
  EXPECT_EQ(response.logprobs(0).top(1).piece(), *tokenizer.TokenBytes(7));
  EXPECT_EQ(response.logprobs(2).chosen().token_id(), 102);
  EXPECT_FALSE(response.has_complete());
}

TEST(ToCompletion, CarriesReasonUsageTimingsAndMatchedStop) {
  engine::RequestOutcome outcome;
  outcome.finish = engine::FinishReason::kStop;
  outcome.prompt_tokens = 12;
  outcome.cached_tokens = 8;
  outcome.generated_tokens = 5;
  outcome.preemptions = 1;
  outcome.matched_stop = "\n\n";
  outcome.timings = {0.5, 0.25, 0.75, 1.0, 1.75};
  v1::Completion completion;
  ToCompletion(outcome, &completion);
  EXPECT_EQ(completion.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(completion.usage().prompt_tokens(), 12u);
  EXPECT_EQ(completion.usage().cached_prompt_tokens(), 8u);
  EXPECT_EQ(completion.usage().generated_tokens(), 5u);
  EXPECT_EQ(completion.usage().preemptions(), 1u);
  EXPECT_EQ(completion.stop_string(), "\n\n");
  EXPECT_DOUBLE_EQ(completion.timings().queue_seconds(), 0.5);
  EXPECT_DOUBLE_EQ(completion.timings().prefill_seconds(), 0.25);
  EXPECT_DOUBLE_EQ(completion.timings().time_to_first_token_seconds(), 0.75);
  EXPECT_DOUBLE_EQ(completion.timings().decode_seconds(), 1.0);
  EXPECT_DOUBLE_EQ(completion.timings().total_seconds(), 1.75);

  outcome.matched_stop.clear();
  outcome.matched_stop_token = 42;
  v1::Completion by_token;
  ToCompletion(outcome, &by_token);
  EXPECT_EQ(by_token.matched_stop_case(), v1::Completion::kStopTokenId);
  EXPECT_EQ(by_token.stop_token_id(), 42);

  outcome.finish = engine::FinishReason::kLength;
  v1::Completion length;
  ToCompletion(outcome, &length);
  EXPECT_EQ(length.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(length.matched_stop_case(), v1::Completion::MATCHED_STOP_NOT_SET);
}

TEST(ToProtoFinishReason, MapsEveryReason) {
  EXPECT_EQ(ToProtoFinishReason(engine::FinishReason::kLength), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(ToProtoFinishReason(engine::FinishReason::kStop), v1::FINISH_REASON_STOP);
  EXPECT_EQ(ToProtoFinishReason(engine::FinishReason::kEos), v1::FINISH_REASON_EOS);
  EXPECT_EQ(ToProtoFinishReason(engine::FinishReason::kCancelled), v1::FINISH_REASON_CANCELLED);
  EXPECT_EQ(ToProtoFinishReason(engine::FinishReason::kError), v1::FINISH_REASON_UNSPECIFIED);
  EXPECT_EQ(ToProtoFinishReason(engine::FinishReason::kNone), v1::FINISH_REASON_UNSPECIFIED);
}

TEST(ToProtoModelInfo, DescribesTheModel) {
  engine::ModelInfo info;
  info.name = "m";
  info.architecture = "llama";
  info.backend = "cpu";
  info.dtype = "float32";
  info.eos_token_ids = {2, 7};
  info.context_tokens = 131072;
  info.vocab_size = 4096;
  info.num_layers = 4;
  info.num_q_heads = 4;
  info.num_kv_heads = 2;
  info.head_dim = 64;
  info.attention_policy = "prefill=dense decode=quest budget=2048";
  info.kv_pages = 100;
  info.page_size = 16;
  engine::ModelConfig model;
  model.hidden_size = 256;
  model.eos_token_ids = {2};
  v1::ModelInfo out;
  ToProtoModelInfo(info, model, EmbeddedTokenizer(), 1600, &out);
  EXPECT_EQ(out.name(), "m");
  EXPECT_EQ(out.architecture(), "llama");
  EXPECT_EQ(out.context_length(), 1600u);
  EXPECT_EQ(out.vocab_size(), 4096u);
  EXPECT_EQ(out.num_layers(), 4u);
  EXPECT_EQ(out.num_attention_heads(), 4u);
  EXPECT_EQ(out.num_kv_heads(), 2u);
  EXPECT_EQ(out.head_dim(), 64u);
  EXPECT_EQ(out.hidden_size(), 256u);
  EXPECT_EQ(out.backend(), "cpu");
  EXPECT_EQ(out.dtype(), "float32");
  EXPECT_EQ(out.attention().prefill(), "dense");
  EXPECT_EQ(out.attention().decode(), "quest");
  EXPECT_EQ(out.attention().description(), "prefill=dense decode=quest budget=2048");
  EXPECT_EQ(out.kv_page_size_tokens(), 16u);
  EXPECT_EQ(out.kv_num_pages(), 100u);
  EXPECT_THAT(out.eos_token_ids(), ::testing::ElementsAre(2, 7));  // what the engine stops on

  // A sparse prefill method's settings stay in the description, not in the method's name.
  info.attention_policy =
      "prefill=xattention(stride=16,threshold=0.9,block=128,min_tokens=8192,dense_layers=0) "
      "decode=dense";
  v1::ModelInfo sparse;
  ToProtoModelInfo(info, model, EmbeddedTokenizer(), 1600, &sparse);
  EXPECT_EQ(sparse.attention().prefill(), "xattention");
  EXPECT_EQ(sparse.attention().decode(), "dense");
  EXPECT_EQ(sparse.attention().description(), info.attention_policy);
  // A sparse decode method's too.
  info.attention_policy =
      "prefill=dense decode=quest(budget=4096,min_tokens=4096,dense_layers=2,per_kv_head=0)";
  v1::ModelInfo sparse_decode;
  ToProtoModelInfo(info, model, EmbeddedTokenizer(), 1600, &sparse_decode);
  EXPECT_EQ(sparse_decode.attention().decode(), "quest");
  EXPECT_EQ(sparse_decode.attention().description(), info.attention_policy);
}

}  // namespace
}  // namespace sieve::server
