// RequestGate: the one engine path every front end of the daemon takes (the gRPC Sieve service
// and the OpenAI-compatible HTTP API): whether requests are served now (model loaded, not
// draining), the model name check, validation and conversion of a sieve.v1 GenerateRequest
// (server/convert.h), where the prompt is prefilled (on a decode daemon, long prompts go to a
// prefill daemon first: server/remote_prefill.h) and the submission to the engine.
//
// A front end turns its wire request into a v1::GenerateRequest, calls Available(),
// CheckModel() and Prepare(), adds its sink and deadline to the spec, and calls Submit(). It
// owns cancellation: Engine::Cancel(id) once the id is known, TransferCancellation::Cancel()
// while a remote prefill runs.
//
// Thread-safety: every method may be called from any thread.
#ifndef SIEVE_SERVER_REQUEST_GATE_H_
#define SIEVE_SERVER_REQUEST_GATE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/serving/engine.h"
#include "server/convert.h"
#include "server/remote_prefill.h"
#include "sieve/v1/sieve.pb.h"

namespace sieve::server {

// What the gate is configured with; everything but the engine is known before the model loads.
struct RequestGateOptions {
  // The served model's name; requests may also leave `model` empty.
  std::string model_name;
  // max_tokens of a request that does not set it, in tokens (config limits.default_max_tokens).
  int32_t default_max_tokens = 256;
  // Most stop strings per request (config limits.max_stop_strings).
  int32_t max_stop_strings = engine::kMaxStopStrings;
  // On a decode daemon (server.role decode): where long prompts are prefilled before they are
  // submitted; null elsewhere. Must outlive the gate's submissions.
  RemotePrefill* remote_prefill = nullptr;
};

class RequestGate {
 public:
  explicit RequestGate(RequestGateOptions options) : options_(std::move(options)) {}

  RequestGate(const RequestGate&) = delete;
  RequestGate& operator=(const RequestGate&) = delete;

  // Starts serving `engine`, which must outlive every request; until then Available() fails.
  // Called once.
  void SetEngine(engine::Engine* engine);

  // From now on Available() fails with UNAVAILABLE ("draining").
  void StartDraining() { draining_.store(true); }

  // The engine if requests may be served now, else UNAVAILABLE (loading or draining).
  absl::StatusOr<engine::Engine*> Available() const;

  // OK if `name` is empty or the served model, else NOT_FOUND naming both.
  absl::Status CheckModel(const std::string& name) const;

  // Validates `request` against the served model's limits and converts it (convert.h
  // ToRequestSpec); the caller adds the sink and deadline. Errors name the offending field.
  absl::StatusOr<engine::RequestSpec> Prepare(const v1::GenerateRequest& request,
                                              const engine::Engine& engine) const;

  // Called once a request is submitted (its engine id) or failed to be (the status: the
  // engine's Submit errors, or a remote prefill's failure), with the seconds a remote prefill
  // and its KV transfer took (0 when prefilled here).
  using Submitted = std::function<void(absl::StatusOr<engine::RequestId> id, double transfer_s)>;

  // Places and submits `spec` (which must carry its sink). When prefilled here, submits at once
  // and calls `done` before returning, and returns null. On a decode daemon with a long prompt,
  // starts the remote prefill (cut off at `deadline`) and returns its cancellation; `done` runs
  // on a transfer thread when the KV is here (or must not be), possibly before this returns.
  std::shared_ptr<TransferCancellation> Submit(engine::Engine& engine, engine::RequestSpec spec,
                                               absl::Time deadline, Submitted done);

  // The limits requests are validated against (set with the engine).
  const RequestLimits& limits() const { return limits_; }
  const std::string& model_name() const { return options_.model_name; }

 private:
  const RequestGateOptions options_;
  std::atomic<engine::Engine*> engine_{nullptr};
  std::atomic<bool> draining_{false};
  // Written once in SetEngine, before engine_ is published; read after Available() succeeds.
  RequestLimits limits_;
};

}  // namespace sieve::server

#endif  // SIEVE_SERVER_REQUEST_GATE_H_
