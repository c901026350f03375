// Engine::Impl: the state behind engine.h, shared by engine.cc (creation, the public methods
// called from any thread) and engine_loop.cc (the scheduler thread). engine/README.md describes
// who owns what; in short:
//   - fields under "Immutable after Create" are read by every thread;
//   - fields under "Guarded by mu_" are the mailbox between callers, workers and the scheduler
//     thread;
//   - fields under "Scheduler thread only" are touched by no other thread (workers read the
//     token and page spans of the sequences they run, and the sampling parameters and token
//     history of their requests, which stay unchanged while in flight).
#ifndef SIEVE_ENGINE_SERVING_ENGINE_IMPL_H_
#define SIEVE_ENGINE_SERVING_ENGINE_IMPL_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "engine/serving/engine.h"
#include "engine/serving/output_pool.h"
#include "engine/serving/scheduler.h"
#include "engine/serving/stop_checker.h"
#include "engine/serving/worker_pool.h"

namespace sieve::engine {

using EngineClock = std::chrono::steady_clock;

// The stop criteria the scheduler thread applies itself: every one but the stop strings, which
// need the text (OutputPool finds them).
inline StopCriteria TokenStopCriteria(StopCriteria criteria) {
  criteria.stop_strings.clear();
  return criteria;
}

// Everything the engine keeps about one accepted request besides the scheduler's Sequence.
struct ActiveRequest {
  ActiveRequest(RequestSpec s, absl::Span<const int32_t> eos_ids, const Tokenizer& tokenizer,
                uint64_t seed)
      : spec(std::move(s)),
        stop(TokenStopCriteria(spec.stop), eos_ids),
        output(std::make_unique<RequestOutput>(spec, eos_ids, tokenizer)),
        rng(seed) {}

  RequestId id = 0;
  RequestSpec spec;  // prompt moved out to the scheduler at Add
  int32_t prompt_tokens = 0;
  StopChecker stop;  // EOS, stop token ids, max_tokens: no text needed
  // The output side (detokenizer, stop strings, sink), handed to the OutputPool at Deliver.
  std::unique_ptr<RequestOutput> output;
  SamplerRng rng;
  TokenHistory history;
  std::optional<EngineClock::time_point> deadline;
  EngineClock::time_point arrival;
  EngineClock::time_point first_scheduled, first_token, last_token;
  bool scheduled = false;  // a first prefill chunk was dispatched
  int32_t generated = 0;
  int32_t preemptions = 0;
  int32_t cached_tokens = 0;
  // With spec.export_prompt_kv: the prompt, to export its pages when the request ends.
  std::vector<int32_t> export_tokens;
  // Set when the request ended while in flight: OnFinish waits for its batch to come back.
  FinishReason finishing = FinishReason::kNone;
  absl::Status finishing_status;
};

class Engine::Impl {
 public:
  Impl() = default;
  ~Impl();

  absl::Status Init(const EngineConfig& config, EngineObserver* observer);
  absl::StatusOr<RequestId> Submit(RequestSpec spec);
  void Cancel(RequestId id);
  void StartDraining();
  bool WaitIdle(absl::Duration timeout);
  EngineLoad load() const;
  SchedulerThreadProfile scheduler_profile() const;
  ModelInfo model_info() const;
  absl::Status health() const;
  // Queues `op` to run on the scheduler thread, on the scheduler's KvCacheManager, in its next
  // iteration (before new submissions); Unavailable once the engine stops (an op queued before
  // that always runs).
  using KvOp = std::function<void(KvCacheManager&)>;
  absl::Status RunOnSchedulerThread(KvOp op);

  // Immutable after Create.
  EngineConfig config_;
  EngineObserver* observer_ = nullptr;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ModelRunner> runner_;
  std::vector<int32_t> eos_ids_;
  int32_t vocab_size_ = 0;     // the model's, for validating token ids
  int64_t context_limit_ = 0;  // prompt + max_tokens, tokens
  SchedulerOptions scheduler_options_;

 private:
  absl::Status Validate(const RequestSpec& spec) const;
  void Reject(RejectReason reason) const;

  // The scheduler thread (engine_loop.cc).
  void Loop();
  // Waits for an event (or until `wake_at`) unless `progressed`, then takes the mailbox.
  void TakeEvents(bool progressed, std::optional<EngineClock::time_point> wake_at);
  // Runs one iteration on the events taken; returns whether anything happened. Adds the time of
  // its parts to profile_.
  bool Step();
  // Adds the time since mark_ to `part` (a field of profile_) and moves mark_ to now.
  void Lap(SchedulerThreadProfile::Part& part);
  RequestTimings Timings(const ActiveRequest& r, EngineClock::time_point end) const;
  void HandleDone(std::unique_ptr<WorkerJob> job);
  void HandleToken(ActiveRequest& r, absl::StatusOr<SampledToken>& sampled);
  // The output pool found a stop string: ends the request as kStop unless it is ending already.
  void HandleOutputStop(RequestId id);
  void AddIncoming(std::unique_ptr<ActiveRequest> r);
  // Ends `r` (removing it from the scheduler); OnFinish now, or when its batch comes back.
  void Finish(ActiveRequest& r, FinishReason reason, absl::Status status);
  // Delivers OnFinish and forgets `r`; its scheduler state must be gone.
  void Deliver(RequestId id, FinishReason reason, absl::Status status);
  // Cancels requests whose deadline passed (those ending already are left to end as they do);
  // returns the next deadline.
  std::optional<EngineClock::time_point> ExpireDeadlines(EngineClock::time_point now);
  void Dispatch(StepPlan& plan);
  void Publish();
  // After a job failed with a lost device: records it, tells the observer once and ends every
  // live request with `status`.
  void HandleDeviceLost(const absl::Status& status);
  // The step watchdog: when a job in flight was dispatched more than step_timeout ago, treats
  // the device as lost (HandleDeviceLost). Returns when to check again, if a job is in flight.
  std::optional<EngineClock::time_point> CheckStalledSteps(EngineClock::time_point now);
  // Records `status` as the engine's failure (health()); true for the first caller, who must
  // then call EngineObserver::OnDeviceLost. Any thread.
  bool MarkFailed(const absl::Status& status);
  // The watchdog thread: checks what the scheduler thread cannot check itself, that the
  // scheduler thread and the output threads make progress (pools.step_timeout_s).
  void WatchdogLoop();
  // The stall the watchdog sees now, or OK.
  absl::Status FindStall(int64_t now_ns) const;

  // Guarded by mu_.
  mutable std::mutex mu_;
  std::condition_variable wake_;  // the scheduler thread waits here
  std::condition_variable idle_;  // WaitIdle waits here
  std::vector<std::unique_ptr<ActiveRequest>> incoming_;
  std::vector<RequestId> cancels_;
  std::vector<RequestId> output_stops_;  // requests a stop string ended (OutputPool)
  std::vector<KvOp> kv_ops_;  // KV import/export bookkeeping to run
  std::vector<std::unique_ptr<WorkerJob>> done_;
  bool stop_ = false;
  bool draining_ = false;
  absl::Status device_lost_;  // OK until a job fails with IsDeviceLost (or the watchdog trips)
  std::condition_variable watchdog_wake_;  // the watchdog thread waits here (stop_)
  RequestId next_id_ = 1;
  int32_t live_ = 0;             // accepted requests whose OnFinish is not delivered yet
  int32_t queued_requests_ = 0;  // incoming_ + the scheduler's waiting queue
  int64_t queued_tokens_ = 0;
  EngineLoad load_;
  SchedulerThreadProfile profile_shared_;

  // Scheduler thread only.
  std::unique_ptr<Scheduler> scheduler_;
  absl::flat_hash_map<RequestId, std::unique_ptr<ActiveRequest>> active_;
  bool stopping_ = false;                                 // stop_ as last seen
  absl::Status failure_;  // the lost device's status (device_lost_'s copy); OK while serving
  absl::Status watchdog_failure_;  // a stall the watchdog thread reported, to handle
  std::optional<EngineClock::time_point> next_deadline_;  // earliest deadline of a live request
  // (deadline, id) of every live request with a deadline that has not passed yet.
  std::set<std::pair<EngineClock::time_point, RequestId>> deadlines_;
  std::optional<EngineClock::time_point> next_watchdog_;  // when the oldest job in flight stalls
  // Dispatch time of every job in flight (several jobs may share one).
  std::multiset<EngineClock::time_point> in_flight_since_;
  int32_t busy_[2] = {0, 0};                              // jobs out per pool (index: Pool)
  std::vector<std::unique_ptr<WorkerJob>> spare_jobs_;    // reused job buffers
  std::vector<std::unique_ptr<ActiveRequest>> taken_;     // incoming_ moved out
  std::vector<RequestId> taken_cancels_;
  std::vector<RequestId> taken_output_stops_;
  std::vector<KvOp> taken_kv_ops_;
  std::vector<std::unique_ptr<WorkerJob>> taken_done_;
  int32_t delivered_ = 0;  // requests handed to the output pool since the last Publish
  SchedulerThreadProfile profile_;  // this thread's running totals, copied to profile_shared_
  EngineClock::time_point mark_;    // where the part of the loop being timed began (wall)
  double mark_cpu_s_ = 0;           // and this thread's CPU time then

  // Workers; created in Init, stopped after the scheduler thread.
  std::unique_ptr<WorkerPool> pools_[2];
  std::vector<std::unique_ptr<ModelWorker>> model_workers_;
  // Output processing (detokenizing, stop strings, sinks); stopped after the scheduler thread.
  std::unique_ptr<OutputPool> output_;
  // Written by the scheduler thread, read by the watchdog: when its current iteration began
  // (steady-clock ns), 0 while it waits for events.
  std::atomic<int64_t> iteration_since_ns_{0};
  std::thread thread_;
  std::thread watchdog_;  // runs while pools.step_timeout_s > 0
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_ENGINE_IMPL_H_
