// RemotePrefill: the decode side of disaggregated serving (server.role: decode).
//
// For a Generate request whose prompt has at least disaggregation.local_prefill_below_tokens
// tokens, the service (sieve_service.h) hands the prompt here before submitting it. On one of
// disaggregation.transfer_threads threads, RemotePrefill
//   1. starts a KV import of the prompt's leading full pages, (len - 1) / page_size of them: the
//      most a prefix-cache match can use, since the engine computes at least the last token
//      itself (Engine::BeginKvImport; pages already cached here are reused and not fetched; when
//      all are cached, nothing is fetched);
//   2. asks a prefill daemon through its KvTransport to prefill the prompt and stream those
//      pages, writing each chunk into the import's pages as it arrives;
//   3. commits the import (the pages enter the prefix cache under the prompt's chained hashes)
//      and calls `done` with OK, after which the service submits the request as usual: it is a
//      prefix-cache hit, so the engine computes only the last partial page and samples the first
//      token itself, with the request's own sampling parameters and random stream. That is why
//      a decode daemon's output is token-for-token what a `both` daemon gives: the token the
//      prefill side sampled (greedily, for its own check) is not streamed.
// A failed attempt (connection lost, stall, checksum, credentials refused) is retried up to
// disaggregation.max_attempts; the transport picks the least-loaded prefill daemon for each
// attempt and ranks one that just failed behind the others (server/prefill_balancer.h). A model
// or layout mismatch is not retried. When every attempt failed, disaggregation.fallback decides: "local" calls `done`
// with OK and the engine prefills the whole prompt here; "fail" calls it with the error. Every
// failure path aborts the import, so no page stays held; cancellation (the client's) reaches the
// transfer at once through the returned handle.
//
// Thread-safety: Start and the accessors may be called from any thread; `done` runs on a
// transfer thread.
#ifndef SIEVE_SERVER_REMOTE_PREFILL_H_
#define SIEVE_SERVER_REMOTE_PREFILL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "engine/serving/engine.h"
#include "server/config.h"
#include "server/kv_transport.h"

namespace sieve::server {

// What RemotePrefill reports, for the metrics (server/metrics.h); every member may be empty.
struct RemotePrefillEvents {
  // A request's prefill was placed: remote (true) or local (false).
  std::function<void(bool remote)> on_placed;
  // A finished transfer attempt: page bytes received, seconds, success.
  std::function<void(int64_t bytes, double seconds, bool ok)> on_transfer;
  // +1 when a transfer attempt starts, -1 when it ends.
  std::function<void(int delta)> on_in_flight;
  // A failed attempt that is retried.
  std::function<void()> on_retry;
  // Whether a prefill daemon is reachable, sampled every second.
  std::function<void(bool reachable)> on_reachable;
};

class RemotePrefill {
 public:
  // Starts the transfer threads; `transport` talks to the prefill daemons.
  RemotePrefill(const DisaggregationConfig& config, std::string model_name,
                std::unique_ptr<KvTransport> transport, RemotePrefillEvents events);
  // Cancels what runs, lets every queued request finish (each gets its `done`), joins.
  ~RemotePrefill();

  RemotePrefill(const RemotePrefill&) = delete;
  RemotePrefill& operator=(const RemotePrefill&) = delete;

  // Starts using `engine` (which must outlive this object).
  void SetEngine(engine::Engine* engine);

  // True when a prompt of `prompt_tokens` tokens should be prefilled remotely.
  bool Wants(size_t prompt_tokens) const;

  // Counts a request whose prompt is prefilled locally because Wants() said no.
  void CountLocal() {
    if (events_.on_placed) events_.on_placed(false);
  }

  // Runs the remote prefill of `prompt` (see the file comment) and calls `done` once, on a
  // transfer thread, with OK (submit the request now) or the error to fail it with, and the
  // seconds of the transfer phase: from this call to `done`, when a remote prefill was tried
  // (the request's RequestSpec::kv_transfer_s), else 0. Cancel the returned handle to stop it (`done` then gets
  // Cancelled).
  std::shared_ptr<TransferCancellation> Start(
      std::vector<int32_t> prompt, absl::Time deadline,
      std::function<void(absl::Status, double transfer_s)> done);

  // Cancels every transfer in progress or queued (at drain).
  void CancelAll();

  // Blocks until no request is queued or transferring (each got its `done`), or `timeout`
  // passes; true if none is. A draining daemon waits for this before it stops its engine taking
  // requests, so that a request whose KV is on its way is still submitted.
  bool WaitIdle(absl::Duration timeout);

  // Whether a prefill daemon was reachable at the last check (every second).
  bool reachable() const { return reachable_.load(); }

 private:
  struct Job {
    std::vector<int32_t> prompt;
    absl::Time deadline;
    std::function<void(absl::Status, double)> done;
    std::shared_ptr<TransferCancellation> cancel;
    absl::Time queued;  // when Start() queued it
  };

  void Work();
  void Monitor();
  // Runs one job; returns what `done` gets.
  absl::Status Run(const Job& job, double& transfer_s);

  const DisaggregationConfig config_;
  const std::string model_name_;
  const std::unique_ptr<KvTransport> transport_;
  const RemotePrefillEvents events_;
  std::atomic<engine::Engine*> engine_{nullptr};
  std::atomic<bool> reachable_{false};

  std::mutex mu_;
  std::condition_variable cv_;          // the transfer threads wait here
  std::condition_variable monitor_cv_;  // the reachability monitor waits here
  std::deque<Job> queue_;                                     // guarded by mu_
  std::vector<std::weak_ptr<TransferCancellation>> running_;  // guarded by mu_
  bool stop_ = false;                                         // guarded by mu_
  int pending_ = 0;  // jobs queued or running, until their `done` returned; guarded by mu_
  std::condition_variable idle_cv_;  // WaitIdle waits here
  std::vector<std::thread> threads_;
  std::thread monitor_;
};

}  // namespace sieve::server

#endif  // SIEVE_SERVER_REMOTE_PREFILL_H_
