// KvTransport: how a decode daemon gets a prompt prefilled elsewhere and its KV pages delivered,
// behind an interface so that the transport can change without touching the engine or the
// decode-side logic (server/remote_prefill.h). The first one is gRPC streaming
// (MakeGrpcKvTransport, proto/sieve/kv/v1/kv_transfer.proto), which runs everywhere; with
// disaggregation.transport ucx the same gRPC call carries only the control messages and the page
// bytes travel over UCX (server/kv_data_plane.h), delivered to the same sink.
//
// Also here: the model identity and KV layout both sides check (KvLayoutInfo), and the
// cancellation handle a transfer thread shares with the gRPC reactor of the client's call.
#ifndef SIEVE_SERVER_KV_TRANSPORT_H_
#define SIEVE_SERVER_KV_TRANSPORT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "engine/serving/engine.h"
#include "server/config.h"
#include "server/prefill_balancer.h"

namespace sieve::server {

// The model identity and KV page layout of a daemon; KV moves only between equal ones.
struct KvLayoutInfo {
  std::string model;         // model.name
  std::string architecture;  // "llama", ...
  std::string dtype;         // KV element type: "float32" (cpu), "bfloat16" (cuda)
  int32_t vocab_size = 0;
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t page_size = 0;     // tokens per page
  int64_t page_bytes = 0;    // one page over all layers, K and V

  bool operator==(const KvLayoutInfo&) const = default;
};

// The layout of `engine`'s model, served under `model_name`.
KvLayoutInfo LocalKvLayout(const engine::Engine& engine, const std::string& model_name);

// OK when `theirs` equals `mine`, else FailedPrecondition naming every field that differs and
// both values, e.g. "KV layout mismatch with the prefill daemon: page_size 16 here, 32 there".
absl::Status CheckKvLayout(const KvLayoutInfo& mine, const KvLayoutInfo& theirs,
                           const std::string& other_side);

// Lets one thread cancel what another runs (a transfer, a remote prefill). Thread-safe.
class TransferCancellation {
 public:
  // Cancels: runs the hook (if one is set) once, and cancelled() turns true.
  void Cancel();
  bool cancelled() const;
  // Sets what Cancel() runs (e.g. ClientContext::TryCancel); runs it now if already cancelled.
  // ClearHook() must be called before whatever the hook refers to goes away.
  void SetHook(std::function<void()> hook);
  void ClearHook();

 private:
  mutable std::mutex mu_;
  bool cancelled_ = false;
  std::function<void()> hook_;
};

// What a decode daemon asks a prefill daemon for.
struct RemotePrefillRequest {
  std::vector<int32_t> tokens;  // the prompt's leading full pages (>= 1 page)
  int32_t first_page = 0;       // pages before it are cached here: not to be sent
  KvLayoutInfo layout;          // this side's
  absl::Time deadline = absl::InfiniteFuture();
};

// Receives the pages of a transfer in order, on the transfer's thread.
class KvPageSink {
 public:
  virtual ~KvPageSink() = default;
  // `data` holds pages [first_page, first_page + num_pages) of the prompt, page_bytes each. An
  // error aborts the transfer with it.
  virtual absl::Status OnPages(int32_t first_page, int32_t num_pages,
                               absl::Span<const uint8_t> data) = 0;
};

// How a remote prefill went.
struct RemotePrefillResult {
  int32_t first_token = -1;   // the token the prefill side sampled greedily after the prompt
  int64_t bytes = 0;          // page bytes received
  int32_t pages = 0;          // pages received
  std::string peer;           // the prefill daemon that served it, for logs
  int32_t peer_waiting_requests = 0;  // its queue when the prefill ended
  int64_t peer_waiting_tokens = 0;
};

class KvTransport {
 public:
  virtual ~KvTransport() = default;

  // Runs the prefill of request.tokens on a prefill daemon and delivers the KV of pages
  // [first_page, tokens / page_size) to `sink`; blocks until done. Thread-safe. Errors:
  // FailedPrecondition (model or layout mismatch: retrying elsewhere will not help),
  // Cancelled (`cancel` fired), DeadlineExceeded, DataLoss (a checksum or framing error),
  // Unavailable (no daemon reachable, the connection broke, or nothing arrived for the stall
  // timeout), or what the prefill daemon answered.
  virtual absl::StatusOr<RemotePrefillResult> Prefill(const RemotePrefillRequest& request,
                                                      KvPageSink& sink,
                                                      TransferCancellation& cancel) = 0;

  // True when at least one prefill daemon is connected (or connecting succeeds now).
  virtual bool Reachable() = 0;

  // The load estimate of every prefill daemon it chooses between (server/prefill_balancer.h);
  // empty when the transport does not choose.
  virtual std::vector<PrefillBalancer::PeerLoad> Loads() const { return {}; }
};

// The gRPC streaming transport to config.prefill_target (a gRPC target string): each attempt
// goes to the least-loaded of the prefill daemons the target resolves to (ties round-robin;
// server/prefill_balancer.h, server/prefill_target.h), presenting the bearer token of
// config.token_file and, with config.tls.*, over TLS (certificate files re-read every
// `tls_reload_interval_s` seconds; the token file every `token_reload_interval_s` seconds, 0:
// only at start; a file that cannot be used keeps the last good token). A transfer with no message for config.stall_timeout_s is
// cancelled and reported Unavailable. Errors name the key at fault: a malformed target, an
// unreadable or empty token file, an unreadable or non-PEM certificate file, or
// config.transport ucx in a build without UCX (or UCX failing to start).
absl::StatusOr<std::unique_ptr<KvTransport>> MakeGrpcKvTransport(
    const DisaggregationConfig& config, int tls_reload_interval_s,
    int token_reload_interval_s = 0);

}  // namespace sieve::server

#endif  // SIEVE_SERVER_KV_TRANSPORT_H_
