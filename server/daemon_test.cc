#include "server/daemon.h"

#include <cstdlib>
#include <memory>
#include <string>

#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"

namespace sieve::server {
namespace {

using ::grpc::health::v1::HealthCheckResponse;
using ::testing::HasSubstr;

std::string EmbeddedModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root ? root : ".") + "/models/embedded";
}

TEST(ToEngineConfig, MapsEverySetting) {
  ServerConfig c;
  c.model.name = "m";
  c.model.directory = "/models/x";
  c.model.max_context_tokens = 4096;
  c.kv_cache.page_size_tokens = 32;
  c.kv_cache.num_pages = 777;
  c.scheduler.max_batch_tokens = 3000;
  c.scheduler.prefill_chunk_tokens = 300;
  c.scheduler.max_running_requests = 48;
  c.scheduler.max_queued_requests = 99;
  c.scheduler.max_queued_tokens = 123456;
  c.scheduler.enable_prefix_caching = false;
  c.pools.prefill_workers = 2;
  c.pools.decode_workers = 3;
  absl::StatusOr<engine::EngineConfig> e = ToEngineConfig(c);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->model_dir, "/models/x");
  EXPECT_EQ(e->model_name, "m");
  EXPECT_EQ(e->max_context_tokens, 4096);
  EXPECT_EQ(e->runner.backend, "cpu");
  EXPECT_EQ(e->runner.page_size, 32);
  EXPECT_EQ(e->runner.num_pages, 777);
  EXPECT_EQ(e->runner.max_step_tokens, 3000);
  EXPECT_EQ(e->runner.max_step_logits, 48);
  EXPECT_EQ(e->scheduler.max_batch_tokens, 3000);
  EXPECT_EQ(e->scheduler.prefill_chunk_tokens, 300);
  EXPECT_EQ(e->scheduler.max_running_requests, 48);
  EXPECT_EQ(e->scheduler.max_queued_requests, 99);
  EXPECT_EQ(e->scheduler.max_queued_tokens, 123456);
  EXPECT_FALSE(e->scheduler.enable_prefix_caching);
  EXPECT_EQ(e->scheduler.prefill_workers, 2);
  EXPECT_EQ(e->scheduler.decode_workers, 3);
  EXPECT_EQ(e->decode_stream_priority, engine::StreamPriority::kHigh);

  c.pools.decode_priority = "normal";
  e = ToEngineConfig(c);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->decode_stream_priority, engine::StreamPriority::kNormal);
}

TEST(ToEngineConfig, RejectsWhatThisBuildCannotHonour) {
  ServerConfig several;
  several.model.backend = "cuda";
  several.model.devices = {0, 1};
  EXPECT_EQ(ToEngineConfig(several).status().code(), absl::StatusCode::kUnimplemented);
  ServerConfig other_device;
  other_device.model.backend = "cuda";
  other_device.model.devices = {1};
  EXPECT_EQ(ToEngineConfig(other_device).status().code(), absl::StatusCode::kUnimplemented);
  ServerConfig fp32_cuda;
  fp32_cuda.model.backend = "cuda";
  fp32_cuda.model.dtype = "float32";
  EXPECT_THAT(std::string(ToEngineConfig(fp32_cuda).status().message()),
              HasSubstr("model.dtype"));
  ServerConfig derive_cuda;
  derive_cuda.model.backend = "cuda";
  derive_cuda.kv_cache.num_pages = 0;
  absl::Status s = ToEngineConfig(derive_cuda).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("kv_cache.num_pages"));
}

TEST(ToEngineConfig, DerivesThePageCountOnCpu) {
  ServerConfig c;
  c.model.directory = EmbeddedModelDir();
  c.model.max_context_tokens = 1000;
  c.scheduler.max_running_requests = 4;
  c.kv_cache.num_pages = 0;
  c.kv_cache.page_size_tokens = 16;
  absl::StatusOr<engine::EngineConfig> e = ToEngineConfig(c);
  ASSERT_TRUE(e.ok()) << e.status();
  // Capped at what 4 full contexts use: 4 x ceil(1000 / 16) pages (the memory allows more).
  EXPECT_EQ(e->runner.num_pages, 4 * 63);

  c.model.directory = "/nonexistent/model";
  absl::Status missing = ToEngineConfig(c).status();
  EXPECT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.message()), HasSubstr("config.json"));
}

// A daemon on a kernel-picked loopback port, metrics off.
ServerConfig LoopbackConfig() {
  ServerConfig c;
  c.server.listen_address = "127.0.0.1:0";
  c.server.drain_grace_period_s = 1;
  c.metrics.enabled = false;
  c.model.directory = EmbeddedModelDir();
  c.kv_cache.num_pages = 64;
  return c;
}

HealthCheckResponse::ServingStatus Health(const std::string& target) {
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, grpc::health::v1::HealthCheckRequest(), &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return response.status();
}

TEST(Daemon, ServesOnlyOnceTheModelIsLoaded) {
  absl::StatusOr<std::unique_ptr<Daemon>> daemon = Daemon::Start(LoopbackConfig());
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const std::string target = (*daemon)->grpc_address();
  EXPECT_THAT(target, ::testing::StartsWith("127.0.0.1:"));
  EXPECT_NE(target, "127.0.0.1:0");
  EXPECT_EQ((*daemon)->metrics_port(), 0);
  EXPECT_EQ(Health(target), HealthCheckResponse::NOT_SERVING);

  auto stub = v1::Sieve::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
  {
    grpc::ClientContext context;
    v1::ListModelsResponse models;
    grpc::Status s = stub->ListModels(&context, v1::ListModelsRequest(), &models);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_THAT(s.error_message(), HasSubstr("loading"));
  }
  ASSERT_TRUE((*daemon)->LoadModel().ok());
  ASSERT_NE((*daemon)->engine(), nullptr);
  EXPECT_EQ(Health(target), HealthCheckResponse::SERVING);
  {
    grpc::ClientContext context;
    v1::ListModelsResponse models;
    ASSERT_TRUE(stub->ListModels(&context, v1::ListModelsRequest(), &models).ok());
    EXPECT_EQ(models.models(0).kv_num_pages(), 64u);
    EXPECT_EQ(models.models(0).context_length(), 64u * 16);
  }
  (*daemon)->Drain();
  EXPECT_EQ((*daemon)->engine(), nullptr);
}

TEST(Daemon, ABusyPortFailsTheStart) {
  absl::StatusOr<std::unique_ptr<Daemon>> first = Daemon::Start(LoopbackConfig());
  ASSERT_TRUE(first.ok()) << first.status();
  ServerConfig same = LoopbackConfig();
  same.server.listen_address = (*first)->grpc_address();
  absl::StatusOr<std::unique_ptr<Daemon>> second = Daemon::Start(same);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(second.status().message()), HasSubstr(same.server.listen_address));
}

}  // namespace
}  // namespace sieve::server
