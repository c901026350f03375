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

// A daemon on a kernel-picked loopback port, metrics off.
ServerConfig LoopbackConfig() {
  ServerConfig c;
  c.server.listen_address = "127.0.0.1:0";
  c.server.drain_grace_period_s = 1;
  c.metrics.enabled = false;
  c.engine.model.directory = EmbeddedModelDir();
  c.engine.kv_cache.num_pages = 64;
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
