// The engine's observability hook: events with bounded attributes, implemented by the server
// with Prometheus metrics (server/metrics.*) and by tests with plain counters. The engine never
// depends on a metrics library.
#ifndef SIEVE_ENGINE_SERVING_OBSERVER_H_
#define SIEVE_ENGINE_SERVING_OBSERVER_H_

#include <cstdint>

#include "absl/status/status.h"
#include <string_view>

#include "engine/runner/model_runner.h"
#include "engine/serving/request.h"

namespace sieve::engine {

// The two worker pools.
enum class Pool { kPrefill, kDecode };
inline std::string_view PoolName(Pool p) { return p == Pool::kPrefill ? "prefill" : "decode"; }

// Why a request was refused at submission.
enum class RejectReason { kQueueFull, kInvalid, kDraining };

// A snapshot of the engine's load, reported after every scheduler step.
struct EngineLoad {
  int32_t running_prefill = 0;  // requests in the prefill pool
  int32_t running_decode = 0;   // requests in the decode pool
  int32_t waiting = 0;          // queued (including preempted) requests
  int64_t waiting_tokens = 0;   // prompt tokens of the queued requests
  int32_t kv_pages_used = 0;
  int32_t kv_pages_free = 0;
  int32_t kv_pages_cached = 0;  // held only by the prefix cache (evictable)
  int64_t prefix_cache_query_tokens = 0;  // cumulative prompt tokens looked up
  int64_t prefix_cache_hit_tokens = 0;    // cumulative prompt tokens served from cache
};

// Callbacks come from the scheduler thread (and Submit's caller for OnRejected); they must be
// cheap and thread-safe with respect to the implementation's own readers.
class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  virtual void OnRejected(RejectReason reason) {}
  virtual void OnFirstToken(const RequestTimings& t) {}      // queue, prefill, TTFT are known
  virtual void OnInterTokenLatency(double seconds) {}        // gap between consecutive tokens
  virtual void OnFinished(const RequestOutcome& outcome) {}
  virtual void OnPreempted() {}
  virtual void OnStep(Pool pool, double seconds, int32_t tokens) {}  // one worker step
  // One prefill step under a sparse prefill method (attention.prefill.method not dense): the
  // fraction of causal (query, key) pairs its attention computed over all layers and heads (1
  // when every sequence ran dense), and the seconds spent building the sparse indices
  // (estimators and plans).
  virtual void OnPrefillAttention(double density, double index_seconds) {}
  // One decode worker step's attention under a sparse decode method: the fraction of the keys dense attention would read that
  // the plans read (over every layer, head and sequence; 1 for dense) and the host seconds spent
  // selecting them. Called from the decode worker's thread right after its step (not from the
  // scheduler thread): an implementation must be thread-safe.
  virtual void OnDecodeAttention(double kv_read_fraction, double selection_seconds) {}
  virtual void OnLoad(const EngineLoad& load) {}
  // The backend reported an unrecoverable failure (IsDeviceLost), or the watchdog found a
  // stalled step, scheduler iteration or output batch (pools.step_timeout_s): the engine fails
  // every request and accepts no more (Engine::health() returns `status` from now on). Called
  // once, from the scheduler thread or, for a stall, the engine's watchdog thread.
  virtual void OnDeviceLost(const absl::Status& status) {}
  // The model load's progress, from Engine::Create's thread after each weight tensor is on the
  // backend (before the engine exists). A non-OK status stops the load there and Create returns
  // it (the daemon returns CANCELLED on SIGTERM).
  virtual absl::Status OnLoadProgress(const WeightLoadProgress& progress) {
    return absl::OkStatus();
  }
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_OBSERVER_H_
