// Chat over gRPC on the embedded model, in process: Generate and Tokenize with messages render
// the model's chat template (tokenizer_config.json, or model.chat_template_file), and the
// failures reach the client with the documented codes.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/daemon.h"
#include "sieve/v1/sieve.grpc.pb.h"

namespace sieve::server {
namespace {

using ::testing::HasSubstr;

std::string EmbeddedModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root ? root : ".") + "/models/embedded";
}

// The embedded model's template (models/embedded/tokenizer_config.json) spelled out.
std::string EmbeddedChat(const std::vector<std::pair<std::string, std::string>>& turns) {
  std::string out = "<|begin_of_text|>";
  for (const auto& [role, content] : turns) {
    out += "<|start_header_id|>" + role + "<|end_header_id|>\n\n" + content + "<|eot_id|>";
  }
  return out + "<|start_header_id|>assistant<|end_header_id|>\n\n";
}

ServerConfig LoopbackConfig() {
  ServerConfig c;
  c.server.listen_address = "127.0.0.1:0";
  c.server.drain_grace_period_s = 1;
  c.metrics.enabled = false;
  c.engine.model.directory = EmbeddedModelDir();
  c.engine.kv_cache.num_pages = 64;
  return c;
}

class ChatTest : public ::testing::Test {
 protected:
  void StartDaemon(const ServerConfig& config) {
    absl::StatusOr<std::unique_ptr<Daemon>> daemon = Daemon::Start(config);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    ASSERT_TRUE(daemon_->LoadModel().ok());
    stub_ = v1::Sieve::NewStub(
        grpc::CreateChannel(daemon_->grpc_address(), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    if (daemon_ != nullptr) daemon_->Drain();
  }

  static void AddMessage(v1::ChatMessages* messages, const std::string& role,
                         const std::string& content) {
    v1::ChatMessage* m = messages->add_messages();
    m->set_role(role);
    m->set_content(content);
  }

  grpc::Status Tokenize(const v1::TokenizeRequest& request, v1::TokenizeResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return stub_->Tokenize(&context, request, response);
  }

  // Runs Generate to the end; returns the status and fills the generated ids and usage.
  grpc::Status Generate(const v1::GenerateRequest& request, std::vector<int32_t>* ids,
                        v1::Usage* usage) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = stub_->Generate(&context, request);
    v1::GenerateResponse response;
    while (reader->Read(&response)) {
      for (int32_t id : response.token_ids()) ids->push_back(id);
      if (response.has_complete()) *usage = response.complete().usage();
    }
    return reader->Finish();
  }

  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<v1::Sieve::Stub> stub_;
};

TEST_F(ChatTest, TokenizeRendersTheTemplateAndGenerateUsesTheSamePrompt) {
  StartDaemon(LoopbackConfig());
  v1::TokenizeRequest tr;
  AddMessage(tr.mutable_messages(), "system", "You are terse.");
  AddMessage(tr.mutable_messages(), "user", "  What is a KV cache? \n");
  tr.set_return_pieces(true);
  v1::TokenizeResponse rendered;
  grpc::Status s = Tokenize(tr, &rendered);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(rendered.rendered_text(),
            EmbeddedChat({{"system", "You are terse."}, {"user", "What is a KV cache?"}}));
  ASSERT_GT(rendered.token_ids_size(), 8);
  EXPECT_EQ(rendered.pieces_size(), rendered.token_ids_size());
  // The template places BOS once (no second BOS from add_special_tokens), and the header and
  // turn tokens are the special tokens, not their text spelled in bytes.
  EXPECT_EQ(rendered.token_ids(0), 0);  // <|begin_of_text|>
  EXPECT_NE(rendered.token_ids(1), 0);
  EXPECT_EQ(rendered.token_ids(1), 3);  // <|start_header_id|>

  // Tokenizing the rendered text without special tokens gives the same ids.
  v1::TokenizeRequest plain;
  plain.set_text(rendered.rendered_text());
  plain.set_add_special_tokens(false);
  v1::TokenizeResponse plain_ids;
  ASSERT_TRUE(Tokenize(plain, &plain_ids).ok());
  EXPECT_THAT(plain_ids.token_ids(), ::testing::ElementsAreArray(rendered.token_ids()));

  // Generate from the messages equals Generate from those ids (greedy).
  v1::GenerateRequest chat;
  *chat.mutable_messages() = tr.messages();
  chat.mutable_sampling()->set_temperature(0);
  chat.mutable_stop()->set_max_tokens(12);
  chat.mutable_stop()->set_ignore_eos(true);
  std::vector<int32_t> chat_ids;
  v1::Usage chat_usage;
  s = Generate(chat, &chat_ids, &chat_usage);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(chat_usage.prompt_tokens(), static_cast<uint32_t>(rendered.token_ids_size()));
  EXPECT_EQ(chat_ids.size(), 12u);

  v1::GenerateRequest by_ids = chat;
  for (int32_t id : rendered.token_ids()) by_ids.mutable_token_ids()->add_ids(id);
  std::vector<int32_t> ids;
  v1::Usage usage;
  ASSERT_TRUE(Generate(by_ids, &ids, &usage).ok());
  EXPECT_EQ(ids, chat_ids);
}

TEST_F(ChatTest, BadMessageListsAreInvalidArgument) {
  StartDaemon(LoopbackConfig());
  struct Case {
    const char* name;
    std::vector<std::pair<std::string, std::string>> messages;
    const char* error;
  };
  const Case cases[] = {
      {"empty list", {}, "prompt: messages is empty"},
      {"empty role", {{"user", "hi"}, {"", "x"}}, "prompt: messages[1].role is empty"},
  };
  for (const Case& c : cases) {
    v1::GenerateRequest request;
    request.mutable_messages();
    for (const auto& [role, content] : c.messages) {
      AddMessage(request.mutable_messages(), role, content);
    }
    std::vector<int32_t> ids;
    v1::Usage usage;
    grpc::Status s = Generate(request, &ids, &usage);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name;
    EXPECT_THAT(s.error_message(), HasSubstr(c.error)) << c.name;
  }
  // A conversation longer than the context is OUT_OF_RANGE, as a long text is.
  v1::GenerateRequest long_chat;
  std::string long_text;
  for (int i = 0; i < 1000; ++i) long_text += "alpha beta gamma delta ";  // > 1024 tokens.
  AddMessage(long_chat.mutable_messages(), "user", long_text);
  std::vector<int32_t> ids;
  v1::Usage usage;
  EXPECT_EQ(Generate(long_chat, &ids, &usage).error_code(), grpc::StatusCode::OUT_OF_RANGE);
  // Tokenize refuses text and messages together.
  v1::TokenizeRequest both;
  both.set_text("x");
  AddMessage(both.mutable_messages(), "user", "y");
  v1::TokenizeResponse response;
  EXPECT_EQ(Tokenize(both, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(ChatTest, ATemplateFileReplacesTheModelsAndItsRaiseExceptionReachesTheClient) {
  const std::string path = ::testing::TempDir() + "/chat_test_template.jinja";
  {
    std::ofstream out(path);
    out << "{{ bos_token }}{% for m in messages %}"
           "{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
           "[{{ m.role | upper }}] {{ m.content }}\n{% endfor %}"
           "{% if add_generation_prompt %}[ASSISTANT]{% endif %}";
  }
  ServerConfig config = LoopbackConfig();
  config.engine.model.chat_template_file = path;
  StartDaemon(config);
  v1::TokenizeRequest tr;
  AddMessage(tr.mutable_messages(), "user", "hello");
  AddMessage(tr.mutable_messages(), "assistant", "hi");
  AddMessage(tr.mutable_messages(), "user", "bye");
  v1::TokenizeResponse response;
  ASSERT_TRUE(Tokenize(tr, &response).ok());
  EXPECT_EQ(response.rendered_text(),
            "<|begin_of_text|>[USER] hello\n[ASSISTANT] hi\n[USER] bye\n[ASSISTANT]");

  v1::GenerateRequest bad;
  AddMessage(bad.mutable_messages(), "assistant", "I go first");
  std::vector<int32_t> ids;
  v1::Usage usage;
  grpc::Status s = Generate(bad, &ids, &usage);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(),
            "prompt: messages: chat template: roles must alternate user/assistant");
  std::remove(path.c_str());
}

TEST_F(ChatTest, AModelWithoutATemplateIsFailedPreconditionNamingTheKey) {
  // A tokenizer folder whose tokenizer_config.json has no chat_template.
  const std::string dir = ::testing::TempDir() + "/chat_test_no_template";
  std::system(("mkdir -p " + dir).c_str());
  {
    std::ifstream in(EmbeddedModelDir() + "/tokenizer.json", std::ios::binary);
    std::ofstream out(dir + "/tokenizer.json", std::ios::binary);
    out << in.rdbuf();
    std::ofstream config(dir + "/tokenizer_config.json");
    config << R"({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})";
  }
  ServerConfig config = LoopbackConfig();
  config.engine.model.tokenizer_directory = dir;
  StartDaemon(config);
  v1::GenerateRequest request;
  AddMessage(request.mutable_messages(), "user", "hi");
  std::vector<int32_t> ids;
  v1::Usage usage;
  grpc::Status s = Generate(request, &ids, &usage);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("no chat_template"));
  EXPECT_THAT(s.error_message(), HasSubstr("model.chat_template_file"));
  v1::TokenizeRequest tr;
  *tr.mutable_messages() = request.messages();
  v1::TokenizeResponse response;
  EXPECT_EQ(Tokenize(tr, &response).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

TEST(ChatConfigTest, AMissingTemplateFileFailsTheLoadNamingTheKey) {
  ServerConfig config = LoopbackConfig();
  config.engine.model.chat_template_file = "/nonexistent/chat.jinja";
  absl::StatusOr<std::unique_ptr<Daemon>> daemon = Daemon::Start(config);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  absl::Status loaded = (*daemon)->LoadModel();
  EXPECT_FALSE(loaded.ok());
  EXPECT_THAT(std::string(loaded.message()), HasSubstr("model.chat_template_file"));
  EXPECT_THAT(std::string(loaded.message()), HasSubstr("/nonexistent/chat.jinja"));
  (*daemon)->Drain();
}

}  // namespace
}  // namespace sieve::server
