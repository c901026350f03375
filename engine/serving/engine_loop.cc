// The engine's scheduler thread: it takes submissions, cancellations and finished worker jobs
// from the mailbox, streams the tokens the workers sampled, asks the Scheduler for the next step and hands
// its batches to the pools. Every function here runs on that thread (engine/README.md).
#include <time.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/serving/engine_impl.h"
#include "engine/serving/thread_name.h"

namespace sieve::engine {
namespace {

double Seconds(EngineClock::duration d) { return std::chrono::duration<double>(d).count(); }

int PoolIndex(Pool p) { return p == Pool::kPrefill ? 0 : 1; }

// CPU seconds the calling thread has used (0 where the clock is unavailable).
double ThreadCpuSeconds() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) {
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  }
#endif
  return 0;
}

}  // namespace

void Engine::Impl::Loop() {
  NameThisThread("sieve-sched");
  bool progressed = true;  // publish the initial load once
  mark_ = EngineClock::now();
  mark_cpu_s_ = ThreadCpuSeconds();
  while (true) {
    std::optional<EngineClock::time_point> wake_at = next_deadline_;
    if (next_watchdog_.has_value() && (!wake_at.has_value() || *next_watchdog_ < *wake_at)) {
      wake_at = next_watchdog_;
    }
    TakeEvents(progressed, wake_at);
    iteration_since_ns_.store(EngineClock::now().time_since_epoch().count());
    Lap(profile_.wait);
    progressed = Step();
    if (progressed || delivered_ > 0) Publish();
    Lap(profile_.publish);
    // After Publish: a sink that sees OnFinish (and WaitIdle) finds the request's pages released
    // in load().
    output_->Flush();
    Lap(profile_.output);
    ++profile_.iterations;
    iteration_since_ns_.store(0);
    if (stopping_ && busy_[0] + busy_[1] == 0) break;
  }
  // Stopped with nothing in flight: whatever is left ends as cancelled.
  std::vector<ActiveRequest*> left;
  for (auto& [id, r] : active_) left.push_back(r.get());
  for (ActiveRequest* r : left) Finish(*r, FinishReason::kCancelled, absl::OkStatus());
  Publish();
  output_->Flush();
}

void Engine::Impl::Lap(SchedulerThreadProfile::Part& part) {
  const EngineClock::time_point now = EngineClock::now();
  const double cpu_s = ThreadCpuSeconds();
  part.wall_s += Seconds(now - mark_);
  part.cpu_s += cpu_s - mark_cpu_s_;
  mark_ = now;
  mark_cpu_s_ = cpu_s;
}

void Engine::Impl::TakeEvents(bool progressed, std::optional<EngineClock::time_point> wake_at) {
  std::unique_lock<std::mutex> lock(mu_);
  auto ready = [this] {
    if (!done_.empty() || !incoming_.empty() || !cancels_.empty() || !kv_ops_.empty() ||
        !output_stops_.empty()) {
      return true;
    }
    // The watchdog thread reported a stall this thread has not handled yet.
    if (!device_lost_.ok() && failure_.ok()) return true;
    // Once stopping, only the last jobs coming back matter.
    return stop_ && (!stopping_ || busy_[0] + busy_[1] == 0);
  };
  if (!progressed) {
    if (wake_at.has_value()) {
      wake_.wait_until(lock, *wake_at, ready);
    } else {
      wake_.wait(lock, ready);
    }
  }
  taken_.swap(incoming_);
  taken_cancels_.swap(cancels_);
  taken_output_stops_.swap(output_stops_);
  taken_kv_ops_.swap(kv_ops_);
  taken_done_.swap(done_);
  stopping_ = stop_;
  if (!device_lost_.ok() && failure_.ok()) watchdog_failure_ = device_lost_;  // a stall
}

bool Engine::Impl::Step() {
  bool progressed = !taken_done_.empty() || !taken_.empty() || !taken_cancels_.empty() ||
                    !taken_kv_ops_.empty() || !taken_output_stops_.empty();
  for (std::unique_ptr<WorkerJob>& job : taken_done_) HandleDone(std::move(job));
  taken_done_.clear();
  if (!watchdog_failure_.ok()) {
    // The watchdog reported a stall while this thread (or an output thread) hung: fail now.
    HandleDeviceLost(watchdog_failure_);
    watchdog_failure_ = absl::OkStatus();
    progressed = true;
  }
  Lap(profile_.completions);
  // KV imports and exports before new requests, so that an import committed before a Submit is
  // in the prefix cache when that request is admitted.
  for (KvOp& op : taken_kv_ops_) op(scheduler_->mutable_kv_cache());
  taken_kv_ops_.clear();
  for (std::unique_ptr<ActiveRequest>& r : taken_) AddIncoming(std::move(r));
  taken_.clear();
  for (RequestId id : taken_cancels_) {
    auto it = active_.find(id);
    if (it != active_.end()) Finish(*it->second, FinishReason::kCancelled, absl::OkStatus());
  }
  taken_cancels_.clear();
  for (RequestId id : taken_output_stops_) HandleOutputStop(id);
  taken_output_stops_.clear();
  // Deadlines before planning, so that an expired request gets no more work.
  next_deadline_ = ExpireDeadlines(EngineClock::now());
  Lap(profile_.intake);
  if (!stopping_ && failure_.ok()) {
    StepPlan plan = scheduler_->Schedule(busy_[0] == 0, busy_[1] == 0);
    Lap(profile_.schedule);
    if (!plan.empty()) {
      Dispatch(plan);
      progressed = true;
    }
    Lap(profile_.dispatch);
  }
  // The watchdog, after dispatching so that the new jobs count.
  next_watchdog_ = CheckStalledSteps(EngineClock::now());
  return progressed;
}

void Engine::Impl::HandleOutputStop(RequestId id) {
  auto it = active_.find(id);
  if (it == active_.end()) return;  // ended meanwhile
  // The output side corrects the outcome (tokens after the stop string were not streamed).
  Finish(*it->second, FinishReason::kStop, absl::OkStatus());
}

void Engine::Impl::AddIncoming(std::unique_ptr<ActiveRequest> r) {
  const RequestId id = r->id;
  const absl::Status added =
      scheduler_->Add(id, r->spec.priority, std::move(r->spec.prompt), r->spec.stop.max_tokens);
  ActiveRequest& ref = *r;
  if (r->deadline.has_value()) deadlines_.emplace(*r->deadline, id);
  active_.emplace(id, std::move(r));
  // Submit validated the request, so this is a broken assumption; fail only this request.
  if (!added.ok()) {
    Finish(ref, FinishReason::kError, added);
  } else if (!failure_.ok()) {
    Finish(ref, FinishReason::kError, failure_);  // accepted just before the device was lost
  }
}

void Engine::Impl::Dispatch(StepPlan& plan) {
  const EngineClock::time_point now = EngineClock::now();
  for (RequestId id : plan.admitted) {
    ActiveRequest& r = *active_.at(id);
    if (r.scheduled) continue;
    r.scheduled = true;
    r.first_scheduled = now;
    r.cached_tokens = scheduler_->Find(id)->cached_tokens;
  }
  for (RequestId id : plan.preempted) {
    ++active_.at(id)->preemptions;
    if (observer_ != nullptr) observer_->OnPreempted();
  }
  for (WorkerBatch& batch : plan.batches) {
    std::unique_ptr<WorkerJob> job;
    if (spare_jobs_.empty()) {
      job = std::make_unique<WorkerJob>();
    } else {
      job = std::move(spare_jobs_.back());
      spare_jobs_.pop_back();
    }
    job->batch = std::move(batch);
    job->steps.clear();
    job->status = absl::OkStatus();
    for (const WorkItem& item : job->batch.items) {
      const Sequence& seq = *scheduler_->Find(item.id);
      SequenceStep step;
      step.tokens = absl::MakeConstSpan(seq.tokens).subspan(item.start, item.num_tokens);
      step.num_cached = item.start;
      step.pages = seq.pages.pages();
      step.want_logits = item.want_logits;
      step.dense_prefill = active_.at(item.id)->spec.dense_prefill;
      step.dense_decode = active_.at(item.id)->spec.dense_decode;
      if (item.want_logits) {
        // The worker samples this row. The request's parameters and history stay unchanged
        // until the job comes back (HandleToken is the only writer of the history); the draw is
        // taken here, one per token, as SampleToken would take it.
        ActiveRequest& r = *active_.at(item.id);
        step.sampling = &r.spec.sampling;
        step.history = &r.history;
        step.uniform = r.rng.NextUniform();
      }
      job->steps.push_back(step);
    }
    const int pool = PoolIndex(job->batch.pool);
    ++busy_[pool];
    job->dispatched = now;
    in_flight_since_.insert(now);
    pools_[pool]->Run(std::move(job));
  }
}

void Engine::Impl::HandleDone(std::unique_ptr<WorkerJob> job) {
  const Pool pool = job->batch.pool;
  --busy_[PoolIndex(pool)];
  if (auto it = in_flight_since_.find(job->dispatched); it != in_flight_since_.end()) {
    in_flight_since_.erase(it);
  }
  if (observer_ != nullptr) observer_->OnStep(pool, job->seconds, job->batch.num_tokens);
  if (pool == Pool::kPrefill && observer_ != nullptr) {
    // The worker is idle until the next Run from this thread: its counters are ours to read.
    const PrefillAttentionStats stats = model_workers_[job->batch.worker]->TakePrefillStats();
    if (stats.dense_pairs > 0) {
      observer_->OnPrefillAttention(stats.density(), stats.plan_seconds);
    }
  }
  size_t rows = 0;
  for (const WorkItem& item : job->batch.items) rows += item.want_logits ? 1 : 0;
  if (job->status.ok() && job->sampled.size() != rows) {
    job->status = absl::InternalError(absl::StrCat("a ", std::string(PoolName(pool)),
                                                   " step returned ", job->sampled.size(),
                                                   " tokens for ", rows, " rows"));
  }
  const bool ok = job->status.ok();
  if (IsDeviceLost(job->status)) HandleDeviceLost(job->status);
  // Requests that ended while in flight are gone from the scheduler now.
  for (RequestId id : scheduler_->Complete(job->batch, ok)) {
    const ActiveRequest& r = *active_.at(id);
    Deliver(id, r.finishing, r.finishing_status);
  }
  size_t row = 0;
  for (const WorkItem& item : job->batch.items) {
    const size_t my_row = row;
    row += item.want_logits ? 1 : 0;
    auto it = active_.find(item.id);
    if (it == active_.end()) continue;
    if (!ok) {
      Finish(*it->second, FinishReason::kError, job->status);
    } else if (item.want_logits) {
      HandleToken(*it->second, job->sampled[my_row]);
    }
  }
  job->steps.clear();
  spare_jobs_.push_back(std::move(job));
}

void Engine::Impl::HandleDeviceLost(const absl::Status& status) {
  if (!failure_.ok()) return;
  failure_ = status;
  // The watchdog thread may have reported it already (a stall).
  if (MarkFailed(status) && observer_ != nullptr) observer_->OnDeviceLost(status);
  // Nothing can run any more: every request ends now (those in flight when their job is back).
  std::vector<ActiveRequest*> live;
  for (auto& [id, r] : active_) live.push_back(r.get());
  for (ActiveRequest* r : live) Finish(*r, FinishReason::kError, status);
}

std::optional<EngineClock::time_point> Engine::Impl::CheckStalledSteps(
    EngineClock::time_point now) {
  const double timeout_s = config_.pools.step_timeout_s;
  if (timeout_s <= 0 || !failure_.ok() || in_flight_since_.empty()) return std::nullopt;
  const auto timeout = std::chrono::duration_cast<EngineClock::duration>(
      std::chrono::duration<double>(timeout_s));
  const EngineClock::time_point stalls_at = *in_flight_since_.begin() + timeout;
  if (now < stalls_at) return stalls_at;
  HandleDeviceLost(DeviceLostError(absl::StrCat(
      "the engine stalled: a worker step has not finished for ", timeout_s,
      " s (pools.step_timeout_s); the device or a worker hangs")));
  return std::nullopt;
}

void Engine::Impl::HandleToken(ActiveRequest& r, absl::StatusOr<SampledToken>& sampled) {
  if (!sampled.ok()) {
    Finish(r, FinishReason::kError, sampled.status());
    return;
  }
  const int32_t token = sampled->id;
  const EngineClock::time_point now = EngineClock::now();
  ++profile_.tokens;
  r.history.AddGenerated(token);
  if (++r.generated == 1) {
    r.first_token = now;
    if (observer_ != nullptr) observer_->OnFirstToken(Timings(r, now));
  } else if (observer_ != nullptr) {
    observer_->OnInterTokenLatency(Seconds(now - r.last_token));
  }
  r.last_token = now;
  // EOS, stop token ids and max_tokens; the text (detokenizing, stop strings) is the output
  // pool's, off this thread.
  const FinishReason finish = r.stop.Push(token, std::string_view()).finish;
  output_->StageToken(r.output.get(), token, sampled->logprob, std::move(sampled->top),
                      Seconds(now - r.first_token));
  if (finish != FinishReason::kNone) {
    Finish(r, finish, absl::OkStatus());
    return;
  }
  if (absl::Status st = scheduler_->AppendToken(r.id, token); !st.ok()) {
    Finish(r, FinishReason::kError, st);
  }
}

void Engine::Impl::Finish(ActiveRequest& r, FinishReason reason, absl::Status status) {
  if (r.finishing != FinishReason::kNone) return;  // already ending
  r.finishing = reason;
  r.finishing_status = std::move(status);
  if (scheduler_->Remove(r.id)) Deliver(r.id, reason, r.finishing_status);
}

RequestTimings Engine::Impl::Timings(const ActiveRequest& r, EngineClock::time_point end) const {
  RequestTimings t;
  const double engine_s = Seconds(end - r.arrival);
  t.transfer_s = std::max(0.0, r.spec.kv_transfer_s);
  t.total_s = t.transfer_s + engine_s;
  t.queue_s = r.scheduled ? Seconds(r.first_scheduled - r.arrival) : engine_s;
  if (r.generated > 0) {
    t.prefill_s = Seconds(r.first_token - r.first_scheduled);
    t.time_to_first_token_s = t.transfer_s + Seconds(r.first_token - r.arrival);
    t.decode_s = Seconds(r.last_token - r.first_token);
  }
  return t;
}

void Engine::Impl::Deliver(RequestId id, FinishReason reason, absl::Status status) {
  auto node = active_.extract(id);
  const ActiveRequest& r = *node.mapped();
  if (r.deadline.has_value()) deadlines_.erase({*r.deadline, id});
  RequestOutcome outcome;
  outcome.finish = reason;
  outcome.status = std::move(status);
  outcome.prompt_tokens = r.prompt_tokens;
  outcome.cached_tokens = r.cached_tokens;
  outcome.generated_tokens = r.generated;
  outcome.preemptions = r.preemptions;
  outcome.timings = Timings(r, EngineClock::now());
  if (r.spec.export_prompt_kv && (reason == FinishReason::kLength ||
                                  reason == FinishReason::kStop || reason == FinishReason::kEos)) {
    // The request's pages were released to the prefix cache just now, on this thread: hold them
    // before anything can evict them.
    absl::StatusOr<KvExport> hold =
        scheduler_->mutable_kv_cache().BeginExport(r.export_tokens);
    if (hold.ok()) outcome.kv_export = *std::move(hold);
  }
  // OnFinish (after the request's OnTokens, on its output thread); `live_` drops there.
  output_->StageFinish(std::move(node.mapped()->output), std::move(outcome));
  ++delivered_;
}

std::optional<EngineClock::time_point> Engine::Impl::ExpireDeadlines(EngineClock::time_point now) {
  // Ordered by deadline: only the expired ones are visited (a scan of every live request each
  // iteration was the scheduler thread's top symbol at 1,000 streams with deadlines).
  std::vector<RequestId> expired;
  while (!deadlines_.empty() && deadlines_.begin()->first <= now) {
    expired.push_back(deadlines_.begin()->second);
    deadlines_.erase(deadlines_.begin());
  }
  for (RequestId id : expired) {
    auto it = active_.find(id);
    if (it != active_.end()) Finish(*it->second, FinishReason::kCancelled, absl::OkStatus());
  }
  if (deadlines_.empty()) return std::nullopt;
  return deadlines_.begin()->first;
}

void Engine::Impl::Publish() {
  EngineLoad l;
  l.running_prefill = scheduler_->num_in_phase(SequencePhase::kPrefill);
  l.running_decode = scheduler_->num_in_phase(SequencePhase::kDecode);
  l.waiting = scheduler_->num_waiting();
  l.waiting_tokens = scheduler_->waiting_tokens();
  l.kv_pages_used = scheduler_->allocator().num_used();
  l.kv_pages_free = scheduler_->allocator().num_free();
  l.kv_pages_cached = scheduler_->cached_only_pages();
  l.prefix_cache_query_tokens = scheduler_->stats().prefix_query_tokens;
  l.prefix_cache_hit_tokens = scheduler_->stats().prefix_hit_tokens;
  {
    std::lock_guard<std::mutex> lock(mu_);
    load_ = l;
    queued_requests_ = static_cast<int32_t>(incoming_.size()) + l.waiting;
    queued_tokens_ = l.waiting_tokens;
    for (const auto& r : incoming_) queued_tokens_ += r->prompt_tokens;
    delivered_ = 0;
    profile_shared_ = profile_;
  }
  if (observer_ != nullptr) observer_->OnLoad(l);
}

}  // namespace sieve::engine
