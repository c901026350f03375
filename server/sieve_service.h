// SieveService: the sieve.v1.Sieve gRPC service on gRPC's callback API.
//
// Generate is served by one small reactor per call (a ServerWriteReactor). The reactor
// validates and converts the request (server/convert.h) on the gRPC thread that delivered it,
// submits it to the engine and returns; nothing on a gRPC thread ever waits for the engine.
// The engine's output thread (pools.output_workers) hands output to the request's sink, which only appends it to
// the stream's pending message under a mutex and, when no write is in flight, starts one. While
// a write is in flight further deltas coalesce into the next message. The last message carries
// the Completion (finish reason, usage, timings, matched stop).
//
// Cancellation: the client cancelling its call, a passed deadline or a broken stream reach the
// reactor as OnCancel / a failed write and become Engine::Cancel(id); the engine frees the
// request's KV pages within one scheduler step. The request also carries the call's deadline,
// so the engine stops it on time even between gRPC events.
//
// Lifecycle: calls fail with UNAVAILABLE until SetEngine() (the model is loading) and again
// after StartDraining(). The engine must outlive every call, so the owner shuts the gRPC server
// down before destroying the engine.
//
// Thread-safety: all public methods may be called from any thread.
#ifndef SIEVE_SERVER_SIEVE_SERVICE_H_
#define SIEVE_SERVER_SIEVE_SERVICE_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include <grpcpp/grpcpp.h>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "engine/serving/engine.h"
#include "server/auth.h"
#include "server/convert.h"
#include "server/remote_prefill.h"
#include "server/request_gate.h"
#include "sieve/v1/sieve.grpc.pb.h"

namespace sieve::server {

// How the service behaves; everything but the engine is known before the model loads.
struct ServiceOptions {
  // The served model's name; requests may also leave `model` empty.
  std::string model_name;
  // max_tokens of a request that does not set it, in tokens (config limits.default_max_tokens).
  int32_t default_max_tokens = 256;
  // Most stop strings per request (config limits.max_stop_strings).
  int32_t max_stop_strings = engine::kMaxStopStrings;
  // Called once per finished call with the method name ("Generate", "Tokenize", ...) and the
  // status code the call ended with; may be empty. Called on gRPC threads; must be cheap.
  std::function<void(std::string_view method, grpc::StatusCode code)> on_rpc_done;
  // On a decode daemon (server.role decode): where long prompts are prefilled before they are
  // submitted (remote_prefill.h); null elsewhere. Must outlive the service's calls.
  RemotePrefill* remote_prefill = nullptr;
  // Null: no authentication. Else every call must carry an accepted bearer token or fails with
  // UNAUTHENTICATED before any work (server/auth.h). Must outlive the service.
  const Authenticator* authenticator = nullptr;
  // Called once per call this service rejects as invalid (INVALID_ARGUMENT, OUT_OF_RANGE or
  // NOT_FOUND) before it reaches the engine (which counts its own); may be empty. Cheap, any
  // thread.
  std::function<void()> on_rejected_invalid;
};

class SieveService final : public v1::Sieve::CallbackService {
 public:
  explicit SieveService(ServiceOptions options);
  ~SieveService() override;

  SieveService(const SieveService&) = delete;
  SieveService& operator=(const SieveService&) = delete;

  // Starts serving `engine`, which must outlive every call (shut the gRPC server down before
  // destroying it). Until this is called every call fails with UNAVAILABLE.
  void SetEngine(engine::Engine* engine);

  // From now on new calls fail with UNAVAILABLE ("draining"); calls in flight continue.
  void StartDraining();

  // The engine path this service takes (availability, model check, validation, placement,
  // submission), which the daemon's other front ends (the HTTP API) share.
  RequestGate& gate() { return gate_; }

  // Cancels the engine requests of every Generate call in flight; each stream then ends with a
  // last message whose finish reason is FINISH_REASON_CANCELLED.
  void CancelAll();

  // Blocks until no Generate call is in flight or `timeout` passes; returns true if none is.
  bool WaitForNoActiveStreams(absl::Duration timeout);

  // Returns the number of Generate calls in flight.
  int active_streams() const;

  // The RPCs of sieve.v1.Sieve; see proto/sieve/v1/sieve.proto.
  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const v1::ListModelsRequest* request,
                                       v1::ListModelsResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;

 private:
  class GenerateReactor;
  class StreamSink;
  struct Stream;

  // Finishes a unary call with `status` and reports it.
  grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                        std::string_view method, const absl::Status& status);
  // Records the outcome of RequestGate::Submit for `stream`: its engine id, or the error that
  // fails the call. Any thread.
  void OnSubmitted(const std::shared_ptr<Stream>& stream, absl::StatusOr<engine::RequestId> id,
                   double transfer_s);
  // Fills `out` with the served model's description.
  void FillModelInfo(engine::Engine& engine, v1::ModelInfo* out) const;
  void ReportDone(std::string_view method, grpc::StatusCode code) const;
  // OK, or UNAUTHENTICATED when authentication is on and the call has no accepted token.
  absl::Status Authenticate(const grpc::CallbackServerContext& context) const;
  // Reports a rejection before the engine (on_rejected_invalid) when `code` says invalid.
  void CountRejected(grpc::StatusCode code) const;
  void Register(std::shared_ptr<Stream> stream);
  void Unregister(Stream* stream);

  const ServiceOptions options_;
  RequestGate gate_;
  std::atomic<uint64_t> next_request_number_{1};

  // std::mutex, not absl::Mutex, here and in Stream: ThreadSanitizer sees pthread locking but not
  // the locking inside Debian's uninstrumented Abseil (scripts/sanitize.sh).
  mutable std::mutex mu_;
  std::condition_variable streams_changed_;  // notified when streams_ shrinks
  // Generate calls in flight, from registration (before Submit) to OnDone. Guarded by mu_.
  absl::flat_hash_map<Stream*, std::shared_ptr<Stream>> streams_;
};

}  // namespace sieve::server

#endif  // SIEVE_SERVER_SIEVE_SERVICE_H_
