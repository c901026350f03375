// Daemon: everything `sieved` runs, wired together: the metrics endpoint, the gRPC server (the
// Sieve service, the standard health service and server reflection), the OpenAI-compatible HTTP
// API when http.listen_address is set (it shares the Sieve service's RequestGate) and the
// engine.
//
// Start-up order, so that a load balancer or orchestrator can watch it:
//   1. Start(): the metrics listener and the gRPC listener come up; health reports NOT_SERVING
//      and every Sieve call fails with UNAVAILABLE ("the model is still loading").
//   2. LoadModel(): the engine loads the weights and tokenizer and allocates the KV pool; then
//      health reports SERVING.
// Shut-down (Drain): health NOT_SERVING, new calls UNAVAILABLE, in-flight requests run for up to
// server.drain_grace_period_s, whatever still runs is cancelled (its stream ends with
// FINISH_REASON_CANCELLED), then the gRPC server, the engine and the metrics stop, in that
// order (the engine must outlive every call, the metrics observer the engine).
//
// Thread-safety: Start, LoadModel and Drain are called by one controlling thread, in that
// order; the accessors may be called from any thread after Start.
#ifndef SIEVE_SERVER_DAEMON_H_
#define SIEVE_SERVER_DAEMON_H_

#include <memory>
#include <string>
#include <string_view>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "engine/serving/engine.h"
#include "server/auth.h"
#include "server/config.h"
#include "server/http_server.h"
#include "server/kv_transfer_service.h"
#include "server/metrics.h"
#include "server/reflection_v1.h"
#include "server/remote_prefill.h"
#include "server/sieve_service.h"

namespace sieve::server {

// Testing only: the model load sleeps this long after each weight tensor, so that tests can
// signal the daemon while it loads. Not a configuration key.
void SetLoadTensorDelayForTesting(absl::Duration delay);

class Daemon {
 public:
  // Starts the metrics listener (when metrics.enabled) and the gRPC server on the configured
  // addresses; health is NOT_SERVING until LoadModel(). Errors: Unavailable when a listener
  // cannot bind its address, InvalidArgument for a malformed address.
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const ServerConfig& config);

  // Shuts down at once (as Drain with no grace) if Drain() was not called.
  ~Daemon();

  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Creates the engine from the configuration's engine settings (loads the model, allocates
  // the KV pool, starts its threads) and turns health to SERVING. Logs the load's progress
  // (tensors, bytes, seconds) about once a second. `cancel`, when given and notified (SIGTERM),
  // stops the load at the next tensor: CANCELLED. Other errors are those of
  // engine::Engine::Create.
  absl::Status LoadModel(const absl::Notification* cancel = nullptr);

  // Drains and stops, as described in the file comment; returns when everything is stopped.
  // `cut_short`, when given and notified, ends the grace period early (a second signal).
  void Drain(absl::Notification* cut_short = nullptr);

  // The gRPC listen address with the bound port, e.g. "0.0.0.0:50051" (configured port 0 is
  // replaced by the port the kernel picked).
  const std::string& grpc_address() const { return grpc_address_; }

  // The HTTP API's listen address with the bound port; empty when it is off.
  std::string http_address() const { return http_ ? http_->address() : std::string(); }

  // The bound metrics port; 0 when metrics are disabled.
  int metrics_port() const { return metrics_ ? metrics_->port() : 0; }

  // The engine once LoadModel() succeeded, else null.
  engine::Engine* engine() const { return engine_.get(); }

  // True once the engine reported an unrecoverable backend failure: health is NOT_SERVING, every
  // request failed with UNAVAILABLE, and the process should Drain() and exit non-zero (sieved
  // exits with status 3) so that its supervisor restarts it. Thread-safe.
  bool device_lost() const { return events_.device_lost(); }

  // True after a Drain that had to leave a hung engine running (a worker step never returned
  // after the device was lost): the engine, service and metrics are leaked on purpose and the
  // process must end with std::_Exit, without destroying this Daemon.
  bool abandoned() const { return abandoned_; }

 private:
  // The engine's observer: forwards every event to the metrics (when enabled) and turns a lost
  // device into NOT_SERVING health, one log line and device_lost().
  class EngineEvents final : public engine::EngineObserver {
   public:
    explicit EngineEvents(Daemon& daemon) : daemon_(daemon) {}
    void OnRejected(engine::RejectReason reason) override;
    void OnFirstToken(const engine::RequestTimings& t) override;
    void OnInterTokenLatency(double seconds) override;
    void OnFinished(const engine::RequestOutcome& outcome) override;
    void OnPreempted() override;
    void OnStep(engine::Pool pool, double seconds, int32_t tokens) override;
    void OnPrefillAttention(double density, double index_seconds) override;
    void OnDecodeAttention(double kv_read_fraction, double selection_seconds) override;
    void OnLoad(const engine::EngineLoad& load) override;
    void OnDeviceLost(const absl::Status& status) override;
    absl::Status OnLoadProgress(const engine::WeightLoadProgress& progress) override;
    bool device_lost() const { return lost_.HasBeenNotified(); }

   private:
    Daemon& daemon_;
    absl::Notification lost_;
  };

  explicit Daemon(const ServerConfig& config) : config_(config), events_(*this) {}
  absl::Status StartGrpc();
  absl::Status StartHttp();
  void SetHealth(bool serving);

  const ServerConfig config_;
  EngineEvents events_;
  // Set while LoadModel runs: stops the load when notified.
  const absl::Notification* cancel_load_ = nullptr;
  double last_progress_log_s_ = -1;  // when the load last logged its progress
  // Bearer tokens (server.auth.tokens_file), or null; outlives the gRPC server.
  std::unique_ptr<Authenticator> authenticator_;
  // Destroyed bottom-up: the HTTP server, the gRPC server, the services, the remote prefills (their threads use
  // the engine), the engine, then the metrics (the engine's observer).
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<engine::Engine> engine_;
  std::unique_ptr<RemotePrefill> remote_prefill_;  // server.role decode only
  std::unique_ptr<KvTransferService> kv_service_;
  std::unique_ptr<SieveService> service_;
  std::unique_ptr<ReflectionV1Service> reflection_v1_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<HttpServer> http_;  // uses service_'s gate: stopped before it goes
  std::string grpc_address_;
  bool stopped_ = false;
  bool abandoned_ = false;  // see abandoned()
};

}  // namespace sieve::server

#endif  // SIEVE_SERVER_DAEMON_H_
