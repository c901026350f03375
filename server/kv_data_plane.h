// KvDataPlane: a path for KV page bytes beside the gRPC control stream of a transfer
// (disaggregation.transport: ucx; docs/disaggregation.md "Transports").
//
// The control path stays sieve.kv.v1.KvTransfer on gRPC: the request, the model identity and KV
// layout check, every chunk's page range and CRC32C, the trailer, cancellation and deadlines.
// With a data plane, a Pages message carries no bytes (`ucx` set): the chunk's bytes travel as
// one message tagged (transfer, first page) from the prefill daemon's sender to the decode
// daemon's receiver. The prefill side starts a chunk's send and the Pages message together and
// the next chunk only when both completed; a send completes only once the decode side posted
// its receive for it (a synchronous send), so at most one chunk per transfer waits unreceived:
// that is the flow control. Page bytes are copied into and out of the plane's own buffers, so a
// send or receive that outlives its transfer (a peer died) never touches a KV page; no page
// hold depends on the plane.
//
// The one implementation is UCX (server/ucx_data_plane.cc, SIEVE_UCX at build time).
//
// Thread-safety: every method may be called from any thread; callbacks run on the plane's own
// progress thread and must not block for long.
#ifndef SIEVE_SERVER_KV_DATA_PLANE_H_
#define SIEVE_SERVER_KV_DATA_PLANE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sieve::server {

class KvDataPlane {
 public:
  virtual ~KvDataPlane() = default;

  // --- Decode side (receiver) ---
  // This process's address on the plane, sent in the PrefillRequest (opaque bytes).
  virtual const std::string& address() const = 0;
  // A transfer id unique in this process (tags name it).
  virtual uint64_t NewTransfer() = 0;
  // Receives the message of `transfer` tagged `first_page`, which must be exactly `bytes` long.
  // While it waits, `check` is called every few milliseconds: a non-OK status abandons the
  // receive and is returned (cancellation, deadline, stall, the control stream's end).
  virtual absl::StatusOr<std::vector<uint8_t>> Receive(
      uint64_t transfer, int32_t first_page, size_t bytes,
      const std::function<absl::Status()>& check) = 0;
  // The transfer ended. When not `ok`, whatever of it arrives from now on (a chunk in flight
  // when it failed) is received and dropped for a while, so nothing stays queued.
  virtual void EndTransfer(uint64_t transfer, bool ok) = 0;

  // --- Prefill side (sender) ---
  // Connects to a receiver's address(); returns a handle for Send and Close.
  virtual absl::StatusOr<uint64_t> Open(const std::string& address) = 0;
  // Sends `data` as the message (transfer, first_page) on `endpoint`; `done` runs once on the
  // progress thread: OK when the receiver took it, else the error (endpoint closed or failed).
  virtual void Send(uint64_t endpoint, uint64_t transfer, int32_t first_page,
                    std::shared_ptr<const std::string> data,
                    std::function<void(absl::Status)> done) = 0;
  // Closes the endpoint: `force` aborts its sends in flight (they complete with an error).
  virtual void Close(uint64_t endpoint, bool force) = 0;
};

// The UCX data plane of this process, created on first use (one UCP context, worker and
// progress thread; UCX picks its transports, UCX_TLS narrows them). Unimplemented when sieved
// was built without UCX, Unavailable when UCX fails to start; the message completes a sentence
// ("... but <message>"). Later calls return the same plane (or the same error).
absl::StatusOr<std::shared_ptr<KvDataPlane>> SharedUcxDataPlane();

// Whether this build has the UCX data plane (SIEVE_UCX found libucx-dev).
bool UcxBuiltIn();

}  // namespace sieve::server

#endif  // SIEVE_SERVER_KV_DATA_PLANE_H_
