// KvTransferService: the prefill side of disaggregated serving, sieve.kv.v1.KvTransfer on gRPC's
// callback API (proto/sieve/kv/v1/kv_transfer.proto).
//
// One reactor per Prefill call: it checks the caller's model identity and KV layout against this
// daemon's (FAILED_PRECONDITION naming the fields that differ), submits the prompt to the engine
// as a one-token greedy request that exports its prompt's KV (RequestSpec::export_prompt_kv),
// and, when the engine delivers the outcome with the export's hold on the pages, streams a
// header, the pages in chunks of disaggregation.chunk_bytes (each with its CRC32C), and a
// trailer with the sampled token. The next chunk is read from the KV pool and written only when
// the previous write completed (gRPC's flow control paces the transfer).
//
// Faults: the caller cancelling, its deadline passing or the stream breaking cancels the engine
// request if it still runs, and the export's hold ends when the call is done, so no page stays
// held on this side. Threads: the engine's output thread only starts the header write; page
// chunks are read and written from gRPC's callback threads (a memcpy on the cpu backend, a
// staged device copy on cuda).
//
// Thread-safety: all public methods may be called from any thread.
#ifndef SIEVE_SERVER_KV_TRANSFER_SERVICE_H_
#define SIEVE_SERVER_KV_TRANSFER_SERVICE_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>

#include <grpcpp/grpcpp.h>

#include "server/auth.h"

#include "absl/time/time.h"
#include "engine/serving/engine.h"
#include "server/kv_transport.h"
#include "sieve/kv/v1/kv_transfer.grpc.pb.h"

namespace sieve::server {

// KvLayoutInfo <-> its wire form.
void KvLayoutToProto(const KvLayoutInfo& layout, kv::v1::KvLayout* out);
KvLayoutInfo KvLayoutFromProto(const kv::v1::KvLayout& layout);

// Testing only (sieved --testing-kv-chunk-delay-ms): every page chunk waits this long before it
// is written, so that tests can catch transfers in flight. Process-wide; zero by default.
void SetKvChunkDelayForTesting(absl::Duration delay);

struct KvTransferServiceOptions {
  std::string model_name;        // model.name, part of the identity checked
  int64_t chunk_bytes = 1 << 20;  // page bytes per chunk (whole pages, at least one)
  // Called once per finished transfer with whether its pages went over UCX, its page bytes (0
  // unless it completed), seconds (from the call's start) and whether it completed; may be
  // empty. Called on gRPC threads.
  std::function<void(bool ucx, int64_t bytes, double seconds, bool ok)> on_transfer;
  // Called with +1 when a transfer starts and -1 when it ends (and whether it is over UCX); may
  // be empty.
  std::function<void(bool ucx, int delta)> on_in_flight;
  // As ServiceOptions::on_rpc_done.
  std::function<void(std::string_view method, grpc::StatusCode code)> on_rpc_done;
  // As ServiceOptions::authenticator: null, or the bearer tokens every call must carry.
  const Authenticator* authenticator = nullptr;
};

class KvTransferService final : public kv::v1::KvTransfer::CallbackService {
 public:
  explicit KvTransferService(KvTransferServiceOptions options);
  ~KvTransferService() override;

  // Starts serving `engine` (which must outlive every call); until then calls fail UNAVAILABLE.
  void SetEngine(engine::Engine* engine);
  // New calls fail UNAVAILABLE from now on; calls in flight continue.
  void StartDraining();
  // Blocks until no call is in flight or `timeout` passes; true if none is.
  bool WaitForNoCalls(absl::Duration timeout);
  int active_calls() const;

  grpc::ServerWriteReactor<kv::v1::PrefillChunk>* Prefill(
      grpc::CallbackServerContext* context, const kv::v1::PrefillRequest* request) override;

 private:
  class PrefillReactor;
  friend class PrefillReactor;
  void CallDone(std::string_view method, grpc::StatusCode code);

  const KvTransferServiceOptions options_;
  std::atomic<engine::Engine*> engine_{nullptr};
  std::atomic<bool> draining_{false};
  KvLayoutInfo layout_;  // set with the engine
  // std::mutex rather than absl::Mutex: ThreadSanitizer sees its ordering (Debian's Abseil is
  // not instrumented; scripts/sanitize.sh).
  mutable std::mutex mu_;
  std::condition_variable calls_changed_;
  int calls_ = 0;  // mu_
};

}  // namespace sieve::server

#endif  // SIEVE_SERVER_KV_TRANSFER_SERVICE_H_
