#include "server/daemon.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <system_error>
#include <utility>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/model_config.h"
#include "engine/status_macros.h"
#include "server/log.h"

namespace sieve::server {
namespace {

// The service name health reports on besides the server as a whole ("").
constexpr char kServiceName[] = "sieve.v1.Sieve";

// Bytes the weights take once loaded: the checkpoint's weight files, widened to float32 on the
// cpu backend when stored in 16 bits.
int64_t LoadedWeightBytes(const std::string& model_dir, const engine::ModelConfig& model) {
  int64_t bytes = 0;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(model_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (absl::StartsWith(name, "model") && absl::EndsWith(name, ".safetensors")) {
      bytes += static_cast<int64_t>(entry.file_size(ec));
    }
  }
  const bool half = model.torch_dtype == "bfloat16" || model.torch_dtype == "float16";
  return half ? 2 * bytes : bytes;
}

// kv_cache.num_pages = 0 on cpu: memory_fraction of the physical memory left after the weights,
// capped at what max_running_requests full contexts can use.
absl::StatusOr<int32_t> DerivePageCount(const ServerConfig& config,
                                        const engine::ModelConfig& model) {
  const int64_t page_size = config.kv_cache.page_size_tokens;
  // Keys and values of every layer, float32 on cpu.
  const int64_t page_bytes =
      2 * model.num_hidden_layers * model.num_key_value_heads * model.head_dim * page_size * 4;
  const int64_t physical = int64_t{sysconf(_SC_PHYS_PAGES)} * sysconf(_SC_PAGESIZE);
  const int64_t left = physical - LoadedWeightBytes(config.model.directory, model);
  const int64_t by_memory =
      static_cast<int64_t>(config.kv_cache.memory_fraction * static_cast<double>(left)) /
      std::max<int64_t>(1, page_bytes);
  int64_t context = model.max_position_embeddings;
  if (config.model.max_context_tokens > 0) {
    context = std::min<int64_t>(context, config.model.max_context_tokens);
  }
  const int64_t useful =
      int64_t{config.scheduler.max_running_requests} * ((context + page_size - 1) / page_size);
  const int64_t pages = std::min({by_memory, useful, int64_t{1} << 24});
  if (pages < 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "kv_cache.num_pages = 0: ", config.kv_cache.memory_fraction, " of the ", left,
        " bytes left after the weights holds no KV page of ", page_bytes, " bytes"));
  }
  return static_cast<int32_t>(pages);
}

// `address` with its port replaced by `port` ("0.0.0.0:0" -> "0.0.0.0:43121").
std::string WithPort(const std::string& address, int port) {
  if (absl::StartsWith(address, "unix:")) return address;
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return address;
  return absl::StrCat(address.substr(0, colon + 1), port);
}

}  // namespace

absl::StatusOr<engine::EngineConfig> ToEngineConfig(const ServerConfig& config) {
  engine::EngineConfig out;
  out.model_dir = config.model.directory;
  out.tokenizer_dir = config.model.tokenizer_directory;
  out.model_name = config.model.name;
  out.max_context_tokens = config.model.max_context_tokens;

  const std::vector<int>& devices = config.model.devices;
  if (devices.size() > 1 || (devices.size() == 1 && devices[0] != 0)) {
    return absl::UnimplementedError(
        "model.devices: this build serves on one device (CUDA device 0); set model.devices to "
        "[] or [0]");
  }
  if (config.model.backend == "cuda" && config.model.dtype == "float32") {
    return absl::UnimplementedError(
        "model.dtype float32 is not available on cuda (the cuda backend computes in bfloat16)");
  }
  engine::ModelRunnerOptions& runner = out.runner;
  runner.backend = config.model.backend;
  runner.weights = config.model.weights;
  runner.random_seed = static_cast<uint64_t>(config.model.random_seed);
  runner.page_size = config.kv_cache.page_size_tokens;
  runner.max_step_tokens = config.scheduler.max_batch_tokens;
  // One logits row per running request and step at most (decodes and finishing prefills).
  runner.max_step_logits = config.scheduler.max_running_requests;
  runner.num_threads = 0;
  if (config.kv_cache.num_pages > 0) {
    runner.num_pages = config.kv_cache.num_pages;
  } else if (config.model.backend == "cpu") {
    SIEVE_ASSIGN_OR_RETURN(
        engine::ModelConfig model,
        engine::ModelConfig::FromFile(config.model.directory + "/config.json"));
    SIEVE_ASSIGN_OR_RETURN(runner.num_pages, DerivePageCount(config, model));
  } else {
    return absl::FailedPreconditionError(
        "kv_cache.num_pages = 0 (derive from memory) is only implemented for the cpu backend; "
        "set kv_cache.num_pages for cuda");
  }

  engine::SchedulerConfig& s = out.scheduler;
  s.max_batch_tokens = config.scheduler.max_batch_tokens;
  s.prefill_chunk_tokens = config.scheduler.prefill_chunk_tokens;
  s.max_running_requests = config.scheduler.max_running_requests;
  s.max_queued_requests = config.scheduler.max_queued_requests;
  s.max_queued_tokens = config.scheduler.max_queued_tokens;
  s.enable_prefix_caching = config.scheduler.enable_prefix_caching;
  s.prefill_workers = config.pools.prefill_workers;
  s.decode_workers = config.pools.decode_workers;
  out.decode_stream_priority = config.pools.decode_priority == "normal"
                                   ? engine::StreamPriority::kNormal
                                   : engine::StreamPriority::kHigh;
  // scheduler.preemption and attention.* have one accepted value each ("recompute", "dense"),
  // which is what the engine does; they map to engine settings when alternatives land.
  return out;
}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const ServerConfig& config) {
  std::unique_ptr<Daemon> daemon(new Daemon(config));
  if (config.metrics.enabled) {
    SIEVE_ASSIGN_OR_RETURN(daemon->metrics_,
                           Metrics::Create(config.metrics.listen_address, config.model.name));
  }
  SIEVE_RETURN_IF_ERROR(daemon->StartGrpc());
  return daemon;
}

absl::Status Daemon::StartGrpc() {
  ServiceOptions options;
  options.model_name = config_.model.name;
  options.default_max_tokens = config_.limits.default_max_tokens;
  options.max_stop_strings = config_.limits.max_stop_strings;
  if (metrics_) {
    Metrics* m = metrics_.get();
    options.on_rpc_done = [m](std::string_view method, grpc::StatusCode code) {
      m->OnGrpcRequest(method, GrpcStatusCodeName(static_cast<int>(code)));
    };
  }
  service_ = std::make_unique<SieveService>(std::move(options));

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config_.server.listen_address, grpc::InsecureServerCredentials(),
                           &port);
  builder.RegisterService(service_.get());
  builder.SetMaxReceiveMessageSize(config_.server.max_message_bytes);
  builder.SetMaxSendMessageSize(config_.server.max_message_bytes);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                             static_cast<int>(config_.server.keepalive_time_s * 1000));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                             static_cast<int>(config_.server.keepalive_timeout_s * 1000));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // Accept clients' own keepalive pings down to every 10 s (gRPC's default answers pings more
  // frequent than every 5 minutes with GOAWAY "too_many_pings").
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  // A second daemon on the same port must fail to start, not share the port (SO_REUSEPORT).
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port == 0) {
    server_.reset();
    return absl::UnavailableError(absl::StrCat("cannot serve gRPC on server.listen_address '",
                                               config_.server.listen_address,
                                               "' (malformed, or the port is in use)"));
  }
  SetHealth(false);
  grpc_address_ = WithPort(config_.server.listen_address, port);
  Log(LogLevel::kInfo, absl::StrCat("gRPC listening on ", grpc_address_,
                                    metrics_ ? absl::StrCat(", metrics on port ", metrics_->port(),
                                                           " (GET /metrics)")
                                            : std::string(", metrics disabled"),
                                    "; loading the model"));
  return absl::OkStatus();
}

void Daemon::SetHealth(bool serving) {
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus("", serving);
  health->SetServingStatus(kServiceName, serving);
}

absl::Status Daemon::LoadModel() {
  const absl::Time start = absl::Now();
  SIEVE_ASSIGN_OR_RETURN(engine::EngineConfig engine_config, ToEngineConfig(config_));
  SIEVE_ASSIGN_OR_RETURN(engine_, engine::Engine::Create(engine_config, &events_));
  // The engine reports its load after each step; publish the idle pool (all pages free) now.
  if (metrics_) metrics_->OnLoad(engine_->load());
  service_->SetEngine(engine_.get());
  SetHealth(true);
  const engine::ModelInfo info = engine_->model_info();
  Log(LogLevel::kInfo,
      absl::StrCat("serving model '", info.name, "' (", info.architecture, ", ",
                   info.num_layers, " layers, vocabulary ", info.vocab_size, ") from ",
                   config_.model.directory, " on backend ", info.backend, "; KV cache ",
                   info.kv_pages, " pages x ", info.page_size, " tokens = ",
                   int64_t{info.kv_pages} * info.page_size, " tokens; context ",
                   info.context_tokens, " tokens; attention ", info.attention_policy,
                   "; loaded in ", absl::FormatDuration(absl::Now() - start),
                   "; health SERVING on ", grpc_address_));
  return absl::OkStatus();
}

void Daemon::EngineEvents::OnRejected(engine::RejectReason reason) {
  if (daemon_.metrics_) daemon_.metrics_->OnRejected(reason);
}
void Daemon::EngineEvents::OnFirstToken(const engine::RequestTimings& t) {
  if (daemon_.metrics_) daemon_.metrics_->OnFirstToken(t);
}
void Daemon::EngineEvents::OnInterTokenLatency(double seconds) {
  if (daemon_.metrics_) daemon_.metrics_->OnInterTokenLatency(seconds);
}
void Daemon::EngineEvents::OnFinished(const engine::RequestOutcome& outcome) {
  if (daemon_.metrics_) daemon_.metrics_->OnFinished(outcome);
}
void Daemon::EngineEvents::OnPreempted() {
  if (daemon_.metrics_) daemon_.metrics_->OnPreempted();
}
void Daemon::EngineEvents::OnStep(engine::Pool pool, double seconds, int32_t tokens) {
  if (daemon_.metrics_) daemon_.metrics_->OnStep(pool, seconds, tokens);
}
void Daemon::EngineEvents::OnLoad(const engine::EngineLoad& load) {
  if (daemon_.metrics_) daemon_.metrics_->OnLoad(load);
}

void Daemon::EngineEvents::OnDeviceLost(const absl::Status& status) {
  // On the engine's scheduler thread, once. The health service is thread-safe and quick.
  if (daemon_.metrics_) daemon_.metrics_->OnDeviceLost(status);
  if (daemon_.server_) daemon_.SetHealth(false);
  Log(LogLevel::kError, absl::StrCat("the backend failed for good (", status.ToString(),
                                     "): health NOT_SERVING, every request fails; draining and "
                                     "exiting so that the supervisor restarts the daemon"));
  lost_.Notify();
}

void Daemon::Drain(absl::Notification* cut_short) {
  if (stopped_) return;
  stopped_ = true;
  const absl::Duration grace = absl::Seconds(config_.server.drain_grace_period_s);
  Log(LogLevel::kInfo, absl::StrCat("draining: health NOT_SERVING, new calls UNAVAILABLE, ",
                                    service_ ? service_->active_streams() : 0,
                                    " streams in flight, grace period ",
                                    absl::FormatDuration(grace)));
  if (server_) SetHealth(false);
  if (service_) service_->StartDraining();
  if (engine_) {
    engine_->StartDraining();
    const absl::Time deadline = absl::Now() + grace;
    bool idle = false;
    while (!idle) {
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration() || (cut_short && cut_short->HasBeenNotified())) break;
      idle = engine_->WaitIdle(std::min(left, absl::Milliseconds(100)));
    }
    if (!idle) {
      Log(LogLevel::kWarning, absl::StrCat("drain: cancelling ", service_->active_streams(),
                                           " streams still running"));
      service_->CancelAll();
      engine_->WaitIdle(absl::Seconds(5));
    }
  }
  // Let the last messages and statuses go out before the server stops.
  if (service_ && !service_->WaitForNoActiveStreams(absl::Seconds(5))) {
    Log(LogLevel::kWarning, "drain: streams still open after 5 s; closing them");
  }
  Log(LogLevel::kInfo, "drain: no request in flight; stopping the gRPC server");
  // Calls still open now are streams that never end by themselves (health Watch, reflection);
  // they are cancelled after one second.
  if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  Log(LogLevel::kInfo, "drain: gRPC server stopped");
  server_.reset();
  engine_.reset();
  service_.reset();
  metrics_.reset();
  Log(LogLevel::kInfo, "stopped");
}

Daemon::~Daemon() {
  if (!stopped_) {
    stopped_ = true;
    if (service_) service_->StartDraining();
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
    server_.reset();
    engine_.reset();
  }
}

}  // namespace sieve::server
