// Integration tests: the real `sieved` binary on loopback, driven by a real gRPC client.
//
// Each daemon is a child process with a small config (the embedded model, a 2048-page KV cache,
// kernel-picked ports); see tests/sieved_harness.h. Most tests share one daemon; queue
// overflow, drain, start-up and command-line tests start their own.
#include <signal.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <latch>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/descriptor.pb.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/config.h"
#include "tests/sieved_harness.h"

namespace sieve::test {
namespace {

using ::testing::HasSubstr;

// ---------------------------------------------------------------------------------------------
// Tests on one shared daemon.
// ---------------------------------------------------------------------------------------------

class SharedDaemonTest : public testing::Test {
 protected:
  // The daemon starts with the first test rather than in SetUpTestSuite: a start-up failure then
  // fails that test (GoogleTest would report the whole suite as skipped).
  void SetUp() override {
    if (daemon_ == nullptr) daemon_ = Sieved::StartServing().release();
    ASSERT_FALSE(HasFailure()) << "the shared sieved did not start:\n" << daemon_->logs();
  }
  static void TearDownTestSuite() {
    if (daemon_ == nullptr) return;
    daemon_->Signal(SIGTERM);
    EXPECT_EQ(daemon_->WaitExit(absl::Seconds(30)), 0) << daemon_->logs();
    delete daemon_;
    daemon_ = nullptr;
  }
  void TearDown() override {
    if (HasFailure()) std::cerr << "--- sieved log ---\n" << daemon_->logs() << "---\n";
  }
  // Waits until the engine is idle, so that load readings are a baseline.
  Load IdleLoad() {
    Load l;
    EXPECT_TRUE(PollUntil([&] {
      l = ReadLoad(*daemon_);
      return l.running == 0 && l.waiting == 0;
    }));
    return l;
  }

  static Sieved* daemon_;
};

Sieved* SharedDaemonTest::daemon_ = nullptr;

TEST_F(SharedDaemonTest, StreamsAGreedyCompletion) {
  auto stub = daemon_->stub();
  v1::GenerateRequest request = GreedyText("The scheduler admits waiting requests when", 24);
  request.set_request_id("integration-1");
  StreamResult r = Generate(*stub, request);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_TRUE(r.completion.has_value());
  EXPECT_EQ(r.completion->finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.ids.size(), 24u);
  EXPECT_GE(r.messages, 1);
  EXPECT_EQ(r.request_ids, std::set<std::string>({"integration-1"}));

  // Usage and timings are consistent with the request.
  grpc::ClientContext tc;
  v1::TokenizeRequest tr;
  tr.set_text(request.text());
  v1::TokenizeResponse tokens;
  ASSERT_TRUE(stub->Tokenize(&tc, tr, &tokens).ok());
  const v1::Usage& u = r.completion->usage();
  EXPECT_EQ(u.prompt_tokens(), static_cast<uint32_t>(tokens.token_ids_size()));
  EXPECT_EQ(u.generated_tokens(), 24u);
  EXPECT_LE(u.cached_prompt_tokens(), u.prompt_tokens());
  const v1::Timings& t = r.completion->timings();
  EXPECT_GE(t.queue_seconds(), 0);
  EXPECT_GT(t.time_to_first_token_seconds(), 0);
  EXPECT_LE(t.time_to_first_token_seconds(), t.total_seconds());
  EXPECT_GE(t.decode_seconds(), 0);
  EXPECT_LE(t.decode_seconds(), t.total_seconds());
  EXPECT_LT(t.total_seconds(), 60);

  // The streamed text is the detokenized ids.
  grpc::ClientContext dc;
  v1::DetokenizeRequest dr;
  for (int32_t id : r.ids) dr.add_token_ids(id);
  v1::DetokenizeResponse text;
  ASSERT_TRUE(stub->Detokenize(&dc, dr, &text).ok());
  EXPECT_EQ(r.text, text.text());

  // Greedy decoding is deterministic, and a token-id prompt equals its text.
  std::vector<int32_t> prompt(tokens.token_ids().begin(), tokens.token_ids().end());
  StreamResult again = Generate(*stub, Greedy(prompt, 24));
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.ids, r.ids);
  EXPECT_THAT(*again.request_ids.begin(), HasSubstr("sieve-"));
}

TEST_F(SharedDaemonTest, StopStringEndsTheStreamAndIsReported) {
  auto stub = daemon_->stub();
  StreamResult free_run = Generate(*stub, GreedyText("The KV cache", 32));
  ASSERT_TRUE(free_run.status.ok());
  ASSERT_GE(free_run.text.size(), 4u);
  // Stop at a piece of text the model is known to produce.
  const std::string stop = free_run.text.substr(free_run.text.size() / 2, 3);
  v1::GenerateRequest request = GreedyText("The KV cache", 32);
  request.mutable_stop()->add_stop_strings(stop);
  StreamResult r = Generate(*stub, request);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_TRUE(r.completion.has_value());
  EXPECT_EQ(r.completion->finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(r.completion->stop_string(), stop);
  EXPECT_FALSE(absl::StrContains(r.text, stop));
  EXPECT_TRUE(absl::StartsWith(free_run.text, r.text));
}

TEST_F(SharedDaemonTest, SixtyFourConcurrentGreedyStreamsEqualSoloRuns) {
  constexpr int kStreams = 64;
  constexpr int kTokens = 12;
  std::vector<std::vector<int32_t>> prompts(kStreams);
  uint32_t state = 12345;
  for (int i = 0; i < kStreams; ++i) {
    const int length = 4 + (i * 7) % 61;  // 4..64 tokens, crossing page boundaries
    for (int j = 0; j < length; ++j) {
      state = state * 1664525u + 1013904223u;
      prompts[i].push_back(static_cast<int32_t>(10 + (state >> 8) % 4000));
    }
  }
  auto stub = daemon_->stub();
  std::vector<std::vector<int32_t>> solo(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    StreamResult r = Generate(*stub, Greedy(prompts[i], kTokens));
    ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.error_message();
    ASSERT_EQ(r.ids.size(), static_cast<size_t>(kTokens));
    solo[i] = r.ids;
  }
  std::vector<StreamResult> together(kStreams);
  std::latch start(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      auto own_stub = v1::Sieve::NewStub(daemon_->channel());
      start.arrive_and_wait();
      together[i] = Generate(*own_stub, Greedy(prompts[i], kTokens));
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(together[i].status.ok()) << i << ": " << together[i].status.error_message();
    EXPECT_EQ(together[i].ids, solo[i]) << "stream " << i;
  }
}

TEST_F(SharedDaemonTest, ClientCancellationFreesEverything) {
  const Load baseline = IdleLoad();
  const double cancelled_before =
      daemon_->Metrics().Sum("sieve_requests_total", {{"outcome", "cancelled"}});
  auto stub = daemon_->stub();
  OpenStream stream(*stub, GreedyText("Cancel me in the middle of", kLongGeneration));
  ASSERT_TRUE(stream.ReadFirst());
  stream.context.TryCancel();
  v1::GenerateResponse ignored;
  while (stream.reader->Read(&ignored)) {
  }
  EXPECT_EQ(stream.reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(PollUntil([&] { return AtBaseline(*daemon_, baseline); }))
      << "running/waiting/KV pages did not return to baseline";
  EXPECT_TRUE(PollUntil([&] {
    return daemon_->Metrics().Sum("sieve_requests_total", {{"outcome", "cancelled"}}) ==
           cancelled_before + 1;
  }));
}

TEST_F(SharedDaemonTest, DeadlineExpiryFreesEverything) {
  const Load baseline = IdleLoad();
  auto stub = daemon_->stub();
  const absl::Time start = absl::Now();
  StreamResult r = Generate(*stub, GreedyText("A deadline of a third of a second", kLongGeneration),
                            absl::Milliseconds(300));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_LT(r.ids.size(), static_cast<size_t>(kLongGeneration));
  EXPECT_TRUE(PollUntil([&] { return AtBaseline(*daemon_, baseline); }))
      << "running/waiting/KV pages did not return to baseline";
  EXPECT_TRUE(PollUntil([&] {
    return daemon_->Metrics().Sum("sieve_grpc_requests_total",
                                  {{"method", "Generate"}, {"code", "DEADLINE_EXCEEDED"}}) >= 1;
  }));
}

TEST_F(SharedDaemonTest, InvalidRequestsFailWithClearStatuses) {
  struct Case {
    std::string name;
    std::function<void(v1::GenerateRequest&)> edit;
    grpc::StatusCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"no prompt", [](auto& r) { r.clear_prompt(); }, grpc::StatusCode::INVALID_ARGUMENT,
       "prompt"},
      {"empty text", [](auto& r) { r.set_text(""); }, grpc::StatusCode::INVALID_ARGUMENT,
       "text is empty"},
      {"empty ids", [](auto& r) { r.mutable_token_ids()->clear_ids(); },
       grpc::StatusCode::INVALID_ARGUMENT, "token_ids is empty"},
      {"id outside vocabulary", [](auto& r) { r.mutable_token_ids()->add_ids(4096); },
       grpc::StatusCode::INVALID_ARGUMENT, "outside the vocabulary"},
      {"NaN temperature", [](auto& r) { r.mutable_sampling()->set_temperature(std::nanf("")); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.temperature"},
      {"top_p above 1", [](auto& r) { r.mutable_sampling()->set_top_p(1.5f); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.top_p"},
      {"negative top_k", [](auto& r) { r.mutable_sampling()->set_top_k(-3); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.top_k"},
      {"repetition penalty 0", [](auto& r) { r.mutable_sampling()->set_repetition_penalty(0); },
       grpc::StatusCode::INVALID_ARGUMENT, "sampling.repetition_penalty"},
      {"too many stop strings",
       [](auto& r) {
         for (int i = 0; i < 17; ++i) r.mutable_stop()->add_stop_strings(absl::StrCat("s", i));
       },
       grpc::StatusCode::INVALID_ARGUMENT, "stop.stop_strings"},
      {"stop token outside vocabulary", [](auto& r) { r.mutable_stop()->add_stop_token_ids(-1); },
       grpc::StatusCode::INVALID_ARGUMENT, "stop.stop_token_ids"},
      {"max_tokens 0", [](auto& r) { r.mutable_stop()->set_max_tokens(0); },
       grpc::StatusCode::INVALID_ARGUMENT, "stop.max_tokens"},
      {"beyond the context", [](auto& r) { r.mutable_stop()->set_max_tokens(kKvPages * 16); },
       grpc::StatusCode::OUT_OF_RANGE, "exceeds the context length"},
      {"unknown model", [](auto& r) { r.set_model("no-such-model"); },
       grpc::StatusCode::NOT_FOUND, "unknown model 'no-such-model'"},
  };
  auto stub = daemon_->stub();
  const double before = daemon_->Metrics().Sum("sieve_grpc_requests_total",
                                               {{"method", "Generate"},
                                                {"code", "INVALID_ARGUMENT"}});
  int invalid_argument = 0;
  for (const Case& c : cases) {
    v1::GenerateRequest request = Greedy({1, 2, 3}, 4);
    c.edit(request);
    StreamResult r = Generate(*stub, request);
    EXPECT_EQ(r.status.error_code(), c.code) << c.name << ": " << r.status.error_message();
    EXPECT_THAT(r.status.error_message(), HasSubstr(c.message)) << c.name;
    EXPECT_EQ(r.messages, 0) << c.name;
    invalid_argument += c.code == grpc::StatusCode::INVALID_ARGUMENT;
  }
  // The unary methods validate too.
  // (Text that is not UTF-8 never reaches the service: proto3 string fields fail to parse.)
  grpc::ClientContext c1;
  v1::TokenizeRequest other_model;
  other_model.set_model("nope");
  other_model.set_text("hello");
  v1::TokenizeResponse tokens;
  EXPECT_EQ(stub->Tokenize(&c1, other_model, &tokens).error_code(), grpc::StatusCode::NOT_FOUND);
  grpc::ClientContext c2;
  v1::DetokenizeRequest bad_ids;
  bad_ids.add_token_ids(99999);
  v1::DetokenizeResponse text;
  grpc::Status s2 = stub->Detokenize(&c2, bad_ids, &text);
  EXPECT_EQ(s2.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s2.error_message(), HasSubstr("token_ids[0] = 99999"));
  grpc::ClientContext c3;
  v1::GetModelInfoRequest unknown;
  unknown.set_model("nope");
  v1::ModelInfo info;
  EXPECT_EQ(stub->GetModelInfo(&c3, unknown, &info).error_code(), grpc::StatusCode::NOT_FOUND);
  // Every rejected Generate is counted by code.
  EXPECT_TRUE(PollUntil([&] {
    return daemon_->Metrics().Sum("sieve_grpc_requests_total",
                                  {{"method", "Generate"}, {"code", "INVALID_ARGUMENT"}}) ==
           before + invalid_argument;
  }));
  // The daemon is still serving.
  EXPECT_TRUE(Generate(*stub, Greedy({1, 2, 3}, 2)).status.ok());
}

TEST_F(SharedDaemonTest, TokenizerAndModelInfoRoundTrip) {
  auto stub = daemon_->stub();
  grpc::ClientContext c1;
  v1::TokenizeRequest tr;
  tr.set_text("Sieve serves long prompts.");
  tr.set_return_pieces(true);
  v1::TokenizeResponse tokens;
  ASSERT_TRUE(stub->Tokenize(&c1, tr, &tokens).ok());
  ASSERT_GT(tokens.token_ids_size(), 2);
  EXPECT_EQ(tokens.pieces_size(), tokens.token_ids_size());
  grpc::ClientContext c2;
  v1::DetokenizeRequest dr;
  dr.mutable_token_ids()->CopyFrom(tokens.token_ids());
  v1::DetokenizeResponse text;
  ASSERT_TRUE(stub->Detokenize(&c2, dr, &text).ok());
  EXPECT_EQ(text.text(), "Sieve serves long prompts.");

  grpc::ClientContext c3;
  v1::ListModelsResponse models;
  ASSERT_TRUE(stub->ListModels(&c3, v1::ListModelsRequest(), &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  const v1::ModelInfo& m = models.models(0);
  EXPECT_EQ(m.name(), "sieve-embedded");
  EXPECT_EQ(m.architecture(), "llama");
  EXPECT_EQ(m.vocab_size(), 4096u);
  EXPECT_EQ(m.num_layers(), 4u);
  EXPECT_EQ(m.num_attention_heads(), 4u);
  EXPECT_EQ(m.num_kv_heads(), 2u);
  EXPECT_EQ(m.head_dim(), 64u);
  EXPECT_EQ(m.hidden_size(), 256u);
  EXPECT_EQ(m.backend(), "cpu");
  EXPECT_EQ(m.kv_num_pages(), static_cast<uint32_t>(kKvPages));
  EXPECT_EQ(m.kv_page_size_tokens(), 16u);
  EXPECT_EQ(m.context_length(), static_cast<uint32_t>(kKvPages * 16));
  EXPECT_EQ(m.attention().prefill(), "dense");
  EXPECT_EQ(m.attention().decode(), "dense");
  grpc::ClientContext c4;
  v1::GetModelInfoRequest by_name;
  by_name.set_model("sieve-embedded");
  v1::ModelInfo info;
  ASSERT_TRUE(stub->GetModelInfo(&c4, by_name, &info).ok());
  EXPECT_EQ(info.SerializeAsString(), m.SerializeAsString());
}

TEST_F(SharedDaemonTest, HealthReportsServing) {
  EXPECT_EQ(daemon_->HealthStatus(""), HealthCheckResponse::SERVING);
  EXPECT_EQ(daemon_->HealthStatus("sieve.v1.Sieve"), HealthCheckResponse::SERVING);
  grpc::Status status;
  daemon_->HealthStatus("no.such.Service", &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(SharedDaemonTest, ReflectionListsAndDescribesTheServices) {
  grpc::Channel& channel = *daemon_->channel();
  const std::string list = Reflect(channel, std::string("\x3a\x00", 2));
  std::set<std::string> services;
  for (const std::string& l : Fields(list, 6)) {
    for (const std::string& s : Fields(l, 1)) {
      for (const std::string& name : Fields(s, 1)) services.insert(name);
    }
  }
  EXPECT_TRUE(services.count("sieve.v1.Sieve")) << list.size();
  EXPECT_TRUE(services.count("grpc.health.v1.Health"));
  EXPECT_TRUE(services.count("grpc.reflection.v1alpha.ServerReflection"));

  const std::string symbol = "sieve.v1.Sieve";
  const std::string file =
      Reflect(channel, absl::StrCat("\x22", std::string(1, static_cast<char>(symbol.size())),
                                    symbol));
  std::vector<std::string> protos;
  for (const std::string& r : Fields(file, 4)) {
    for (const std::string& p : Fields(r, 1)) protos.push_back(p);
  }
  ASSERT_FALSE(protos.empty());
  bool found = false;
  for (const std::string& bytes : protos) {
    google::protobuf::FileDescriptorProto fd;
    ASSERT_TRUE(fd.ParseFromString(bytes));
    if (fd.name() != "sieve/v1/sieve.proto") continue;
    found = true;
    ASSERT_EQ(fd.service_size(), 1);
    std::set<std::string> methods;
    for (const auto& m : fd.service(0).method()) methods.insert(m.name());
    EXPECT_EQ(methods, std::set<std::string>({"Generate", "Tokenize", "Detokenize",
                                              "ListModels", "GetModelInfo"}));
  }
  EXPECT_TRUE(found);
}

TEST_F(SharedDaemonTest, MetricsHaveTheDocumentedNamesAndSaneValues) {
  auto stub = daemon_->stub();
  StreamResult r = Generate(*stub, GreedyText("Metrics after a request", 8));
  ASSERT_TRUE(r.status.ok());
  IdleLoad();
  // The call is counted in sieve_grpc_requests_total when gRPC runs the reactor's OnDone, which
  // can come after the client has read the final status: wait for it.
  test_support::ParsedMetrics m;
  EXPECT_TRUE(PollUntil([&] {
    m = daemon_->Metrics();
    return m.Sum("sieve_grpc_requests_total", {{"method", "Generate"}}) >= 1;
  }));
  const auto documented = DocumentedMetrics();
  ASSERT_GE(documented.size(), 20u) << "cannot read the table in server/metrics.h";
  for (const auto& [name, type] : documented) {
    auto it = m.types.find(name);
    ASSERT_NE(it, m.types.end()) << name << " is documented but not exported";
    EXPECT_EQ(it->second, type) << name;
    const std::string series = type == "histogram" ? name + "_count" : name;
    EXPECT_FALSE(m.All(series).empty()) << series;
  }
  for (const test_support::MetricSample& s : m.samples) {
    // prometheus-cpp's exposer adds its own exposer_* series; everything else is ours.
    if (absl::StartsWith(s.name, "exposer_")) continue;
    EXPECT_TRUE(absl::StartsWith(s.name, "sieve_")) << s.name;
    EXPECT_TRUE(std::isfinite(s.value) || absl::EndsWith(s.name, "_bucket")) << s.name;
    EXPECT_GE(s.value, 0) << s.name;
    EXPECT_EQ(s.labels.count("request_id"), 0u) << s.name;
    if (s.labels.count("model")) {
      EXPECT_EQ(s.labels.at("model"), "sieve-embedded") << s.name;
    }
  }
  EXPECT_EQ(m.Sum("sieve_kv_pages_used") + m.Sum("sieve_kv_pages_free"), kKvPages);
  EXPECT_GE(m.Sum("sieve_requests_total", {{"outcome", "length"}}), 1);
  EXPECT_GE(m.Sum("sieve_generated_tokens_total"), 8);
  EXPECT_GE(m.Sum("sieve_prompt_tokens_total"), r.completion->usage().prompt_tokens());
  EXPECT_GE(m.Sum("sieve_request_time_to_first_token_seconds_count"), 1);
  EXPECT_GE(m.Sum("sieve_request_e2e_latency_seconds_count"), 1);
  EXPECT_GT(m.Sum("sieve_request_e2e_latency_seconds_sum"), 0);
  EXPECT_GE(m.Sum("sieve_request_inter_token_latency_seconds_count"), 7);
  EXPECT_GE(m.Sum("sieve_step_seconds_count", {{"pool", "decode"}}), 1);
  EXPECT_GE(m.Sum("sieve_step_seconds_count", {{"pool", "prefill"}}), 1);
  EXPECT_GE(m.Sum("sieve_grpc_requests_total", {{"method", "Generate"}, {"code", "OK"}}), 1);
  const double ratio = m.Sum("sieve_prefix_cache_hit_ratio");
  EXPECT_GE(ratio, 0);
  EXPECT_LE(ratio, 1);
}

TEST_F(SharedDaemonTest, CommandLineClientTalksToTheDaemon) {
  const std::string target = daemon_->target();
  auto [health_code, health] = RunTool(SIEVE_CLI_PATH, {"health", "--target", target});
  EXPECT_EQ(health_code, 0) << health;
  EXPECT_THAT(health, HasSubstr("SERVING"));

  auto [gen_code, gen] = RunTool(SIEVE_CLI_PATH, {"generate", "--target", target, "--temperature",
                                                  "0", "--max-tokens", "8", "Hello there"});
  EXPECT_EQ(gen_code, 0) << gen;
  EXPECT_THAT(gen, HasSubstr("Hello there"));
  EXPECT_THAT(gen, HasSubstr("[sieve] finish: length"));
  EXPECT_THAT(gen, HasSubstr("time to first token"));
  EXPECT_THAT(gen, HasSubstr("generated 8"));

  // --prompt-file reads the prompt from a file; --no-echo prints only the continuation.
  const std::string prompt_file = ::testing::TempDir() + "/cli_prompt.txt";
  std::ofstream(prompt_file) << "Hello there";
  auto [file_code, file_out] =
      RunTool(SIEVE_CLI_PATH, {"generate", "--target", target, "--temperature", "0",
                               "--max-tokens", "8", "--no-echo", "--prompt-file", prompt_file});
  EXPECT_EQ(file_code, 0) << file_out;
  const std::string echoed = gen.substr(0, gen.find("[sieve]"));
  ASSERT_THAT(echoed, ::testing::StartsWith("Hello there"));
  EXPECT_EQ(file_out.substr(0, file_out.find("[sieve]")), echoed.substr(11));
  auto [missing_code, missing] = RunTool(
      SIEVE_CLI_PATH, {"generate", "--target", target, "--prompt-file", prompt_file + ".absent"});
  EXPECT_EQ(missing_code, 2) << missing;
  EXPECT_THAT(missing, HasSubstr("--prompt-file: cannot read"));

  auto [models_code, models] = RunTool(SIEVE_CLI_PATH, {"models", "--target", target});
  EXPECT_EQ(models_code, 0) << models;
  EXPECT_THAT(models, HasSubstr("sieve-embedded"));
  EXPECT_THAT(models, HasSubstr("vocabulary 4096"));

  auto [tok_code, tok] = RunTool(SIEVE_CLI_PATH, {"tokenize", "--target", target, "hello"});
  EXPECT_EQ(tok_code, 0) << tok;
  EXPECT_THAT(tok, HasSubstr("tokens"));

  auto [bad_code, bad] = RunTool(SIEVE_CLI_PATH, {"generate", "--target", target,
                                                  "--temperature", "-1", "x"});
  EXPECT_EQ(bad_code, 1) << bad;
  EXPECT_THAT(bad, HasSubstr("INVALID_ARGUMENT"));
}

// `sieve generate --model DIR` runs the daemon's engine in-process, configured by the daemon's
// loader: with the daemon's config file and the same seed it streams the same text.
TEST_F(SharedDaemonTest, InProcessCliGeneratesWhatTheDaemonDoes) {
  const std::vector<std::string> request = {"--temperature", "0.9", "--seed",    "11",
                                            "--max-tokens",  "12",  "--ignore-eos",
                                            "The scheduler admits"};
  auto text_of = [](const std::string& output) {  // stdout: the prompt and the continuation
    return output.substr(0, output.find("[sieve]"));
  };
  std::vector<std::string> remote = {"generate", "--target", daemon_->target()};
  remote.insert(remote.end(), request.begin(), request.end());
  auto [remote_code, remote_out] = RunTool(SIEVE_CLI_PATH, remote);
  ASSERT_EQ(remote_code, 0) << remote_out;

  std::vector<std::string> local = {"generate", "--model",
                                    std::string(SIEVE_SOURCE_DIR) + "/models/embedded",
                                    "--config", BaseConfigPath(), "--threads", "1"};
  local.insert(local.end(), request.begin(), request.end());
  auto [local_code, local_out] = RunTool(SIEVE_CLI_PATH, local);
  ASSERT_EQ(local_code, 0) << local_out;
  EXPECT_THAT(local_out, HasSubstr("[sieve] finish: length"));
  EXPECT_THAT(local_out, HasSubstr("generated 12"));
  EXPECT_EQ(text_of(local_out), text_of(remote_out));

  // Without --config: the defaults, the KV pool sized to the request; the same text.
  local = {"generate", "--model", std::string(SIEVE_SOURCE_DIR) + "/models/embedded"};
  local.insert(local.end(), request.begin(), request.end());
  auto [plain_code, plain_out] = RunTool(SIEVE_CLI_PATH, local);
  ASSERT_EQ(plain_code, 0) << plain_out;
  EXPECT_EQ(text_of(plain_out), text_of(remote_out));

  // Its configuration errors are the daemon's.
  auto [bad_code, bad] = RunTool(SIEVE_CLI_PATH, {"generate", "--model", "models/embedded",
                                                  "--set", "scheduler.preemption=recompute", "x"});
  EXPECT_EQ(bad_code, 2) << bad;
  EXPECT_THAT(bad, HasSubstr("unknown key 'scheduler.preemption': it was removed"));
}

// ---------------------------------------------------------------------------------------------
// Tests with their own daemon.
// ---------------------------------------------------------------------------------------------

TEST(QueueTest, AFullQueueIsRejectedAtOnce) {
  auto d = Sieved::StartServing({"--set", "scheduler.max_running_requests=1", "--set",
                                 "scheduler.max_queued_requests=1"});
  // Before any request the load gauges show an idle pool.
  const Load idle = ReadLoad(*d);
  EXPECT_EQ(idle.kv_free, kKvPages);
  EXPECT_EQ(idle.kv_used, 0);
  EXPECT_EQ(idle.running + idle.waiting, 0);
  auto stub = d->stub();
  OpenStream running(*stub, GreedyText("The first request runs", kLongGeneration));
  ASSERT_TRUE(running.ReadFirst()) << d->logs();
  OpenStream queued(*stub, GreedyText("The second request waits", kLongGeneration));
  ASSERT_TRUE(PollUntil([&] { return ReadLoad(*d).waiting == 1; })) << d->logs();
  const absl::Time start = absl::Now();
  StreamResult rejected = Generate(*stub, GreedyText("The third is one too many", 4));
  EXPECT_EQ(rejected.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << rejected.status.error_message();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  EXPECT_GE(d->Metrics().Sum("sieve_rejections_total", {{"reason", "queue_full"}}), 1);
  running.context.TryCancel();
  queued.context.TryCancel();
  EXPECT_EQ(Drain(*running.reader).status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(Drain(*queued.reader).status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(PollUntil([&] { return AtBaseline(*d, Load()); })) << d->logs();
  d->Signal(SIGTERM);
  EXPECT_EQ(d->WaitExit(absl::Seconds(20)), 0) << d->logs();
}

// The daemon decodes with each sparse method. Quest and DoubleSparsity (calibrated at start-up
// on the embedded model's bundled text) with a 32-token budget from any context length and one
// dense layer: every stream completes with its 16 tokens, one prompt at least decodes other
// tokens than a dense daemon (the selection ran: 32 of 300-1,100 keys is far from dense), the
// decode steps' mean KV read fraction is below 1 and their selection time is recorded, and no
// page stays held.
TEST(SparseDecodeTest, EachMethodStreamsAndReportsTheFractionOfKvRead) {
  auto dense = Sieved::StartServing();
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::vector<int32_t>> dense_ids;
  for (const auto& [n, seed] : {std::pair<size_t, uint32_t>{300, 31}, {700, 32}, {1100, 33}}) {
    prompts.push_back(RandomPrompt(n, seed));
    const StreamResult r = Generate(*dense->stub(), Greedy(prompts.back(), 16));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    dense_ids.push_back(r.ids);
  }
  for (const std::string method : {"quest", "double_sparsity"}) {
    SCOPED_TRACE(method);
    auto d = Sieved::StartServing({"--set", "attention.decode.method=" + method, "--set",
                                   "attention.decode.token_budget=32", "--set",
                                   "attention.decode.sparse_min_tokens=0", "--set",
                                   "attention.decode.dense_layers=1"});
    auto stub = d->stub();
    int differs_from_dense = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      const StreamResult r = Generate(*stub, Greedy(prompts[i], 16));
      ASSERT_TRUE(r.status.ok()) << r.status.error_message() << d->logs();
      EXPECT_EQ(r.ids.size(), 16u);
      differs_from_dense += r.ids != dense_ids[i] ? 1 : 0;
    }
    EXPECT_GT(differs_from_dense, 0) << "a 32-token budget never changed the tokens";
    const test_support::ParsedMetrics m = d->Metrics();
    const double steps = m.Sum("sieve_decode_kv_read_fraction_count");
    EXPECT_GT(steps, 0);
    EXPECT_GT(m.Sum("sieve_decode_kv_read_fraction_sum") / steps, 0.0);
    EXPECT_LT(m.Sum("sieve_decode_kv_read_fraction_sum") / steps, 1.0);
    EXPECT_EQ(m.Sum("sieve_decode_selection_seconds_count"), steps);
    EXPECT_TRUE(PollUntil([&] { return AtBaseline(*d, Load()); })) << d->logs();
    d->Signal(SIGTERM);
    EXPECT_EQ(d->WaitExit(absl::Seconds(20)), 0) << d->logs();
  }
}

TEST(LifecycleTest, HealthTransitionsAndSigtermDrainsInFlightStreams) {
  // The model load is held back for a second so that NOT_SERVING is observable.
  auto d = Sieved::Spawn({"--testing-load-delay-s", "1"});
  ASSERT_TRUE(d->WaitListening()) << d->logs();
  auto watch_owner = std::make_unique<HealthWatch>(d->channel());
  HealthWatch& watch = *watch_owner;
  ASSERT_TRUE(PollUntil([&] { return !watch.seen().empty(); })) << d->logs();
  auto stub = d->stub();
  EXPECT_EQ(Generate(*stub, Greedy({1, 2, 3}, 2)).status.error_code(),
            grpc::StatusCode::UNAVAILABLE);
  ASSERT_TRUE(PollUntil([&] { return watch.seen().back() == HealthCheckResponse::SERVING; }))
      << d->logs();
  EXPECT_EQ(watch.seen().front(), HealthCheckResponse::NOT_SERVING);

  // Requests in flight, then SIGTERM.
  constexpr int kStreams = 3;
  constexpr int kTokens = 400;
  std::vector<std::unique_ptr<OpenStream>> streams;
  for (int i = 0; i < kStreams; ++i) {
    streams.push_back(std::make_unique<OpenStream>(
        *stub, GreedyText(absl::StrCat("Drain stream ", i, " keeps going"), kTokens)));
  }
  for (auto& s : streams) ASSERT_TRUE(s->ReadFirst()) << d->logs();
  d->Signal(SIGTERM);
  ASSERT_TRUE(PollUntil([&] {
    return watch.seen().back() == HealthCheckResponse::NOT_SERVING;
  })) << d->logs();
  watch_owner.reset();  // an open Watch would hold the server's shutdown for its deadline
  // New calls are refused (by the draining service, or once stopped by the closed port).
  EXPECT_EQ(Generate(*stub, Greedy({1, 2, 3}, 2)).status.error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // In-flight streams complete in full.
  for (auto& s : streams) {
    StreamResult r = Drain(*s->reader);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message() << d->logs();
    ASSERT_TRUE(r.completion.has_value());
    EXPECT_EQ(r.completion->finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(r.ids.size() + s->first.token_ids_size(), static_cast<size_t>(kTokens));
  }
  EXPECT_EQ(d->WaitExit(absl::Seconds(20)), 0) << d->logs();
  EXPECT_THAT(d->logs(), HasSubstr("draining"));
}

// The backend fails for good (a fatal fault injected into the asynchronous test backend at its
// 400th operator, a few steps into the stream): the stream fails with UNAVAILABLE, health turns
// NOT_SERVING, and the daemon drains and exits 3 so that its supervisor restarts it.
TEST(LifecycleTest, LostDeviceTurnsHealthNotServingAndExitsNonZero) {
  auto d = Sieved::Spawn({"--testing-device-lost-after-ops", "400"});
  ASSERT_TRUE(d->WaitListening()) << d->logs();
  auto watch_owner = std::make_unique<HealthWatch>(d->channel());
  HealthWatch& watch = *watch_owner;
  ASSERT_TRUE(PollUntil([&] {
    return !watch.seen().empty() && watch.seen().back() == HealthCheckResponse::SERVING;
  })) << d->logs();
  auto stub = d->stub();
  StreamResult r = Generate(*stub, GreedyText("The device fails while this stream runs", 300));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
  EXPECT_THAT(r.status.error_message(), HasSubstr("device was lost"));
  EXPECT_GT(r.ids.size(), 0u) << "the fault should come a few steps into the stream";
  EXPECT_LT(r.ids.size(), 300u);
  EXPECT_TRUE(PollUntil([&] {
    return watch.seen().back() == HealthCheckResponse::NOT_SERVING;
  })) << d->logs();
  watch_owner.reset();
  EXPECT_EQ(d->WaitExit(absl::Seconds(30)), 3) << d->logs();
  EXPECT_THAT(d->logs(), HasSubstr("failed for good"));
  EXPECT_THAT(d->logs(), HasSubstr("drain: gRPC server stopped"));
}

// A worker step that never finishes (an operator of the asynchronous test backend hangs at its
// 400th call): after pools.step_timeout_s the watchdog turns health NOT_SERVING, the stream
// ends with an error, and the daemon drains what it can, leaves the hung engine behind and
// exits 3. The timeout is 1 s scaled (Scaled): in the ASan build on a loaded machine an ordinary
// step outlasted 1 s, so the watchdog fired before the hang and no step was left hung.
TEST(LifecycleTest, HungStepTripsTheWatchdogAndExitsNonZero) {
  auto d = Sieved::Spawn({"--testing-hang-after-ops", "400", "--set",
                          absl::StrCat("pools.step_timeout_s=",
                                       absl::ToInt64Seconds(Scaled(absl::Seconds(1))))});
  ASSERT_TRUE(d->WaitListening()) << d->logs();
  auto watch_owner = std::make_unique<HealthWatch>(d->channel());
  HealthWatch& watch = *watch_owner;
  ASSERT_TRUE(PollUntil([&] {
    return !watch.seen().empty() && watch.seen().back() == HealthCheckResponse::SERVING;
  })) << d->logs();
  auto stub = d->stub();
  StreamResult r = Generate(*stub, GreedyText("This stream's step hangs on the device", 300));
  EXPECT_FALSE(r.status.ok());
  EXPECT_LT(r.ids.size(), 300u);
  EXPECT_TRUE(PollUntil([&] {
    return watch.seen().back() == HealthCheckResponse::NOT_SERVING;
  })) << d->logs();
  watch_owner.reset();
  EXPECT_EQ(d->WaitExit(absl::Seconds(40)), 3) << d->logs();
  EXPECT_THAT(d->logs(), HasSubstr("stalled"));
  EXPECT_THAT(d->logs(), HasSubstr("never finished"));
}

TEST(LifecycleTest, GracePeriodEndCancelsWhatStillRuns) {
  auto d = Sieved::StartServing({"--set", "server.drain_grace_period_s=0.3"});
  auto stub = d->stub();
  std::vector<std::unique_ptr<OpenStream>> streams;
  for (int i = 0; i < 2; ++i) {
    streams.push_back(std::make_unique<OpenStream>(
        *stub, GreedyText(absl::StrCat("Stream ", i, " outlives the grace period"),
                          kLongGeneration)));
  }
  for (auto& s : streams) ASSERT_TRUE(s->ReadFirst()) << d->logs();
  const absl::Time start = absl::Now();
  d->Signal(SIGTERM);
  for (auto& s : streams) {
    StreamResult r = Drain(*s->reader);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    ASSERT_TRUE(r.completion.has_value());
    EXPECT_EQ(r.completion->finish_reason(), v1::FINISH_REASON_CANCELLED);
    EXPECT_LT(r.completion->usage().generated_tokens(), static_cast<uint32_t>(kLongGeneration));
  }
  EXPECT_EQ(d->WaitExit(absl::Seconds(20)), 0) << d->logs();
  // Scaled: the ASan build took 35 s from SIGTERM to exit on a machine at load 12 (2026-12-06).
  EXPECT_LT(absl::Now() - start, Scaled(absl::Seconds(15))) << d->logs();
}

TEST(CommandLineTest, HelpListsEveryConfigKey) {
  auto d = Sieved::Spawn({"--help"}, /*with_config=*/false);
  ASSERT_EQ(d->WaitExit(absl::Seconds(20)), 0);
  // The output reaches the harness through a pipe reader that may lag the exit; wait for all of
  // it (waiting for one key was not enough: the usage text names logging.level before the list).
  const auto keys = server::ListConfigKeys();
  PollUntil(
      [&] {
        const std::string text = d->logs();
        for (const server::ConfigKeyInfo& key : keys) {
          if (!absl::StrContains(text, key.path)) return false;
        }
        return true;
      },
      absl::Seconds(5));
  const std::string help = d->logs();
  for (const server::ConfigKeyInfo& key : server::ListConfigKeys()) {
    EXPECT_THAT(help, HasSubstr(key.path));
  }
  EXPECT_THAT(help, HasSubstr("--metrics-listen"));
}

TEST(CommandLineTest, BadConfigAndMissingModelFailClearly) {
  auto bad_key = Sieved::Spawn({"--set", "scheduler.max_batch_tokenz=4"});
  EXPECT_EQ(bad_key->WaitExit(absl::Seconds(20)), 2);
  EXPECT_TRUE(PollUntil([&] { return absl::StrContains(bad_key->logs(), "max_batch_tokenz"); },
                        absl::Seconds(5)));

  auto no_model = Sieved::Spawn({"--model-dir", "/nonexistent/model"});
  EXPECT_EQ(no_model->WaitExit(absl::Seconds(20)), 1);
  EXPECT_TRUE(PollUntil([&] { return absl::StrContains(no_model->logs(), "/nonexistent/model"); },
                        absl::Seconds(5)))
      << no_model->logs();
}

}  // namespace
}  // namespace sieve::test
