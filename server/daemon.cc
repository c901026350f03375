#include "server/daemon.h"

#include <algorithm>
#include <atomic>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "engine/status_macros.h"
#include "grpc/health/v1/health.pb.h"
#include "server/call_interceptor.h"
#include "server/log.h"

namespace sieve::server {
namespace {

// The service name health reports on besides the server as a whole ("").
constexpr char kServiceName[] = "sieve.v1.Sieve";

// `address` with its port replaced by `port` ("0.0.0.0:0" -> "0.0.0.0:43121").
std::string WithPort(const std::string& address, int port) {
  if (absl::StartsWith(address, "unix:")) return address;
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return address;
  return absl::StrCat(address.substr(0, colon + 1), port);
}

std::atomic<int64_t> g_load_tensor_delay_us{0};

// Reads a PEM file named by `key` (server.tls.*): a clear error before gRPC's watcher would
// only log one per handshake.
absl::Status CheckPemFile(absl::string_view key, const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat(key, ": cannot read '", path, "'"));
  }
  std::stringstream text;
  text << in.rdbuf();
  if (text.str().find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(key, ": '", path, "' is not a PEM file"));
  }
  return absl::OkStatus();
}

// The gRPC port's credentials: plaintext, TLS or mutual TLS (server.tls.*). The files are
// watched: gRPC re-reads them every reload_interval_s, so renewed certificates take effect on
// new connections without a restart.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeCredentials(const TlsConfig& tls) {
  if (tls.cert_file.empty()) return grpc::InsecureServerCredentials();
  SIEVE_RETURN_IF_ERROR(CheckPemFile("server.tls.cert_file", tls.cert_file));
  SIEVE_RETURN_IF_ERROR(CheckPemFile("server.tls.key_file", tls.key_file));
  const bool mutual = !tls.client_ca_file.empty();
  if (mutual) SIEVE_RETURN_IF_ERROR(CheckPemFile("server.tls.client_ca_file", tls.client_ca_file));
  auto provider =
      mutual ? std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
                   tls.key_file, tls.cert_file, tls.client_ca_file, tls.reload_interval_s)
             : std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
                   tls.key_file, tls.cert_file, tls.reload_interval_s);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (mutual) {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  std::shared_ptr<grpc::ServerCredentials> credentials =
      grpc::experimental::TlsServerCredentials(options);
  if (credentials == nullptr) {
    return absl::InvalidArgumentError("server.tls: gRPC refused the TLS settings");
  }
  return credentials;
}

}  // namespace

void SetLoadTensorDelayForTesting(absl::Duration delay) {
  g_load_tensor_delay_us.store(absl::ToInt64Microseconds(delay));
}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const ServerConfig& config) {
  std::unique_ptr<Daemon> daemon(new Daemon(config));
  if (!config.server.auth.tokens_file.empty()) {
    SIEVE_ASSIGN_OR_RETURN(daemon->authenticator_,
                           Authenticator::FromFile(config.server.auth.tokens_file));
    if (config.server.auth.reload_interval_s > 0) {
      daemon->authenticator_->StartReloading(
          absl::Seconds(config.server.auth.reload_interval_s));
    }
  }
  if (config.metrics.enabled) {
    std::function<bool(std::string_view)> accept_password;
    if (Authenticator* a = daemon->authenticator_.get(); a && !config.server.auth.exempt_metrics) {
      // The metrics listener stops (metrics_ is destroyed) before the authenticator does.
      accept_password = [a](std::string_view password) { return a->Accepts(password); };
    }
    SIEVE_ASSIGN_OR_RETURN(daemon->metrics_,
                           Metrics::Create(config.metrics.listen_address,
                                           config.engine.model.name, config.server.role,
                                           std::move(accept_password)));
  }
  SIEVE_RETURN_IF_ERROR(daemon->StartGrpc());
  SIEVE_RETURN_IF_ERROR(daemon->StartHttp());
  return daemon;
}

absl::Status Daemon::StartHttp() {
  if (config_.http.listen_address.empty()) return absl::OkStatus();
  HttpServerOptions options;
  options.listen_address = config_.http.listen_address;
  options.max_request_bytes = config_.http.max_request_bytes;
  options.threads = config_.http.threads;
  options.authenticator = authenticator_.get();
  if (Metrics* m = metrics_.get()) {
    options.on_request_done = [m](std::string_view route, int status, double seconds) {
      m->OnHttpRequest(route, status, seconds);
    };
  }
  SIEVE_ASSIGN_OR_RETURN(http_, HttpServer::Start(std::move(options), &service_->gate()));
  Log(LogLevel::kInfo, absl::StrCat("HTTP (OpenAI API) listening on ", http_->address()));
  return absl::OkStatus();
}

absl::Status Daemon::StartGrpc() {
  ServiceOptions options;
  options.model_name = config_.engine.model.name;
  options.default_max_tokens = config_.limits.default_max_tokens;
  options.max_stop_strings = config_.limits.max_stop_strings;
  options.authenticator = authenticator_.get();
  if (metrics_) {
    Metrics* m = metrics_.get();
    options.on_rpc_done = [m](std::string_view method, grpc::StatusCode code) {
      m->OnGrpcRequest(method, GrpcStatusCodeName(static_cast<int>(code)));
    };
    options.on_rejected_invalid = [m] { m->OnRejected(engine::RejectReason::kInvalid); };
  }
  Metrics* m = metrics_.get();
  if (config_.server.role == "decode") {
    RemotePrefillEvents events;
    const bool ucx = config_.disaggregation.transport == "ucx";
    if (m != nullptr) {
      events.on_placed = [m](bool remote) { m->OnPrefillPlaced(remote); };
      events.on_transfer = [m, ucx](int64_t bytes, double s, bool ok) {
        m->OnKvTransfer(/*sent=*/false, ucx, bytes, s, ok);
      };
      events.on_in_flight = [m, ucx](int d) {
        m->AddKvTransfersInFlight(/*sent=*/false, ucx, d);
      };
      events.on_retry = [m] { m->OnKvTransferRetry(); };
      events.on_reachable = [m](bool up) { m->SetPrefillDaemonsReachable(up); };
    }
    const DisaggregationConfig& d = config_.disaggregation;
    SIEVE_ASSIGN_OR_RETURN(std::unique_ptr<KvTransport> transport,
                           MakeGrpcKvTransport(d, config_.server.tls.reload_interval_s,
                                               config_.server.auth.reload_interval_s));
    remote_prefill_ = std::make_unique<RemotePrefill>(d, config_.engine.model.name,
                                                      std::move(transport), std::move(events));
    options.remote_prefill = remote_prefill_.get();
  }
  service_ = std::make_unique<SieveService>(std::move(options));
  KvTransferServiceOptions kv_options;
  kv_options.model_name = config_.engine.model.name;
  kv_options.chunk_bytes = config_.disaggregation.chunk_bytes;
  kv_options.authenticator = authenticator_.get();
  if (m != nullptr) {
    kv_options.on_transfer = [m](bool ucx, int64_t bytes, double s, bool ok) {
      m->OnKvTransfer(/*sent=*/true, ucx, bytes, s, ok);
    };
    kv_options.on_in_flight = [m](bool ucx, int d) {
      m->AddKvTransfersInFlight(/*sent=*/true, ucx, d);
    };
    kv_options.on_rpc_done = [m](std::string_view method, grpc::StatusCode code) {
      m->OnGrpcRequest(method, GrpcStatusCodeName(static_cast<int>(code)));
    };
  }
  kv_service_ = std::make_unique<KvTransferService>(std::move(kv_options));

  grpc::EnableDefaultHealthCheckService(true);
  // gRPC's health service is built on its own messages, not on generated protobuf code, so the
  // descriptor of grpc.health.v1.Health is only in the pool reflection reads when something
  // links the generated health.pb.cc: this use does (reflection clients can then describe it).
  (void)grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  InstallProtobufLogHandler();
  SIEVE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                         MakeCredentials(config_.server.tls));
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config_.server.listen_address, credentials, &port);
  CallInterceptorOptions interceptor;
  interceptor.access_log = config_.logging.access_log;
  interceptor.authenticator = authenticator_.get();
  interceptor.exempt_health = config_.server.auth.exempt_health;
  interceptor.exempt_reflection = config_.server.auth.exempt_reflection;
  if (m != nullptr) {
    interceptor.on_unparseable = [m](std::string_view method) {
      m->OnRejected(engine::RejectReason::kInvalid);
      m->OnGrpcRequest(method, "INVALID_ARGUMENT");
    };
  }
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
  creators.push_back(std::make_unique<CallInterceptorFactory>(std::move(interceptor)));
  builder.experimental().SetInterceptorCreators(std::move(creators));
  builder.RegisterService(service_.get());
  builder.RegisterService(kv_service_.get());
  // Reflection v1 beside the plugin's v1alpha (server/reflection_v1.h).
  reflection_v1_ = std::make_unique<ReflectionV1Service>(std::vector<std::string>{
      "sieve.v1.Sieve", "sieve.kv.v1.KvTransfer", "grpc.health.v1.Health",
      "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"});
  builder.RegisterService(reflection_v1_.get());
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
  const TlsConfig& tls = config_.server.tls;
  Log(LogLevel::kInfo,
      absl::StrCat("gRPC security: ",
                   tls.cert_file.empty()          ? "plaintext"
                   : tls.client_ca_file.empty()   ? "TLS"
                                                  : "mutual TLS",
                   tls.cert_file.empty()
                       ? std::string()
                       : absl::StrCat(" (certificates re-read every ", tls.reload_interval_s,
                                      " s)"),
                   authenticator_ ? absl::StrCat(", bearer tokens required (",
                                                 authenticator_->num_tokens(), " accepted",
                                                 config_.server.auth.exempt_health
                                                     ? "; health open" : "",
                                                 config_.server.auth.exempt_reflection
                                                     ? "; reflection open" : "",
                                                 metrics_ && !config_.server.auth.exempt_metrics
                                                     ? "; metrics need a token" : "",
                                                 config_.server.auth.reload_interval_s > 0
                                                     ? absl::StrCat("; tokens re-read every ",
                                                                    config_.server.auth
                                                                        .reload_interval_s,
                                                                    " s")
                                                     : "",
                                                 ")")
                                  : std::string(", no authentication")));
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

absl::Status Daemon::LoadModel(const absl::Notification* cancel) {
  const absl::Time start = absl::Now();
  cancel_load_ = cancel;
  absl::StatusOr<std::unique_ptr<engine::Engine>> created =
      engine::Engine::Create(config_.engine, &events_);
  cancel_load_ = nullptr;
  if (!created.ok()) return created.status();
  engine_ = *std::move(created);
  // The engine reports its load after each step; publish the idle pool (all pages free) now.
  if (metrics_) metrics_->OnLoad(engine_->load());
  service_->SetEngine(engine_.get());
  kv_service_->SetEngine(engine_.get());
  if (remote_prefill_) remote_prefill_->SetEngine(engine_.get());
  SetHealth(true);
  const engine::ModelInfo info = engine_->model_info();
  Log(LogLevel::kInfo,
      absl::StrCat("serving model '", info.name, "' (", info.architecture, ", ",
                   info.num_layers, " layers, vocabulary ", info.vocab_size, ") from ",
                   config_.engine.model.directory, " on backend ", info.backend, "; KV cache ",
                   info.kv_pages, " pages x ", info.page_size, " tokens = ",
                   int64_t{info.kv_pages} * info.page_size, " tokens; context ",
                   info.context_tokens, " tokens; attention ", info.attention_policy,
                   "; role ", config_.server.role,
                   config_.server.role == "decode"
                       ? absl::StrCat(" (prefill on ", config_.disaggregation.prefill_target, ")")
                       : std::string(),
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
void Daemon::EngineEvents::OnPrefillAttention(double density, double index_seconds) {
  if (daemon_.metrics_) daemon_.metrics_->OnPrefillAttention(density, index_seconds);
}
void Daemon::EngineEvents::OnDecodeAttention(double kv_read_fraction, double selection_seconds) {
  if (daemon_.metrics_) daemon_.metrics_->OnDecodeAttention(kv_read_fraction, selection_seconds);
}
void Daemon::EngineEvents::OnLoad(const engine::EngineLoad& load) {
  if (daemon_.metrics_) daemon_.metrics_->OnLoad(load);
}

absl::Status Daemon::EngineEvents::OnLoadProgress(const engine::WeightLoadProgress& p) {
  if (const int64_t us = g_load_tensor_delay_us.load(); us > 0) {
    absl::SleepFor(absl::Microseconds(us));
  }
  const bool last = p.tensors >= p.total_tensors;
  if (last || daemon_.last_progress_log_s_ < 0 || p.seconds - daemon_.last_progress_log_s_ >= 1) {
    daemon_.last_progress_log_s_ = p.seconds;
    Log(LogLevel::kInfo, absl::StrFormat("loading weights: %d/%d tensors, %.1f MiB, %.2f s%s",
                                         p.tensors, p.total_tensors, p.bytes / 1048576.0,
                                         p.seconds, last ? "; allocating the KV cache" : ""));
  }
  if (daemon_.cancel_load_ != nullptr && daemon_.cancel_load_->HasBeenNotified()) {
    return absl::CancelledError(absl::StrFormat(
        "the model load was stopped by a signal after %d of %d tensors", p.tensors,
        p.total_tensors));
  }
  return absl::OkStatus();
}

void Daemon::EngineEvents::OnDeviceLost(const absl::Status& status) {
  // Once, on the engine's scheduler thread (or its watchdog thread, for a stalled scheduler or
  // output thread). The health service is thread-safe and quick.
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
  // After a lost device every request not in a step has failed already, and those in a step end
  // when it returns: a short grace is enough, and a hung step must not hold the restart.
  const bool lost = events_.device_lost();
  absl::Duration grace = absl::Seconds(config_.server.drain_grace_period_s);
  if (lost) grace = std::min(grace, absl::Seconds(5));
  Log(LogLevel::kInfo, absl::StrCat("draining: health NOT_SERVING, new calls UNAVAILABLE, ",
                                    service_ ? service_->active_streams() : 0,
                                    " streams in flight",
                                    http_ ? absl::StrCat(" and ", http_->active_requests(),
                                                         " HTTP requests")
                                          : std::string(),
                                    ", grace period ",
                                    absl::FormatDuration(grace)));
  if (server_) SetHealth(false);
  if (service_) service_->StartDraining();
  if (kv_service_) kv_service_->StartDraining();
  const absl::Time deadline = absl::Now() + grace;
  // Requests whose KV is on its way from a prefill daemon are submitted when it lands: let them
  // in before the engine stops taking requests.
  if (remote_prefill_ && engine_ && !remote_prefill_->WaitIdle(deadline - absl::Now())) {
    remote_prefill_->CancelAll();
  }
  if (engine_) {
    engine_->StartDraining();
    bool idle = false;
    while (!idle) {
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration() || (cut_short && cut_short->HasBeenNotified())) break;
      idle = engine_->WaitIdle(std::min(left, absl::Milliseconds(100)));
    }
    if (!idle) {
      Log(LogLevel::kWarning,
          absl::StrCat("drain: cancelling ", service_->active_streams(), " streams",
                       http_ ? absl::StrCat(" and ", http_->active_requests(), " HTTP requests")
                             : std::string(),
                       " still running"));
      service_->CancelAll();
      if (http_) http_->CancelAll();
      if (remote_prefill_) remote_prefill_->CancelAll();
      idle = engine_->WaitIdle(absl::Seconds(5));
    }
    // A step that never returns (a hung device) keeps its requests and the engine's threads
    // alive: stopping them would wait forever.
    abandoned_ = lost && !idle;
  }
  // Let the last messages and statuses go out before the server stops.
  if (service_ && !service_->WaitForNoActiveStreams(absl::Seconds(5))) {
    Log(LogLevel::kWarning, "drain: streams still open after 5 s; closing them");
  }
  if (http_ && !abandoned_ && !http_->WaitForNoActiveRequests(absl::Seconds(5))) {
    Log(LogLevel::kWarning, "drain: HTTP requests still open after 5 s; closing them");
  }
  if (kv_service_ && !kv_service_->WaitForNoCalls(absl::Seconds(5))) {
    Log(LogLevel::kWarning, "drain: KV transfers still open after 5 s; closing them");
  }
  Log(LogLevel::kInfo, "drain: no request in flight; stopping the gRPC server");
  // Calls still open now are streams that never end by themselves (health Watch, reflection);
  // they are cancelled after one second.
  if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  Log(LogLevel::kInfo, "drain: gRPC server stopped");
  server_.reset();
  if (abandoned_) {
    Log(LogLevel::kError, "drain: a worker step never finished (the device hangs); leaving the "
                          "engine's threads behind for the process to exit");
    (void)http_.release();  // its handler threads may wait for the hung engine
    (void)engine_.release();
    (void)service_.release();
    (void)kv_service_.release();
    (void)remote_prefill_.release();
    (void)metrics_.release();
    return;
  }
  http_.reset();
  remote_prefill_.reset();
  engine_.reset();
  service_.reset();
  kv_service_.reset();
  metrics_.reset();
  Log(LogLevel::kInfo, "stopped");
}

Daemon::~Daemon() {
  if (!stopped_) {
    stopped_ = true;
    if (service_) service_->StartDraining();
    http_.reset();
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
    server_.reset();
    remote_prefill_.reset();
    engine_.reset();
  }
}

}  // namespace sieve::server
