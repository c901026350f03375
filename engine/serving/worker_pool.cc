#include "engine/serving/worker_pool.h"

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/serving/kv_cache.h"
#include "engine/serving/thread_name.h"

namespace sieve::engine {

WorkerPool::WorkerPool(Pool pool, std::vector<StepFunction> workers, DoneCallback done)
    : pool_(pool), done_(std::move(done)) {
  for (StepFunction& step : workers) {
    auto w = std::make_unique<Worker>();
    w->step = std::move(step);
    workers_.push_back(std::move(w));
  }
  for (auto& w : workers_) {
    Worker* raw = w.get();
    raw->thread = std::thread([this, raw] { Loop(*raw); });
  }
}

WorkerPool::~WorkerPool() {
  for (auto& w : workers_) {
    std::lock_guard<std::mutex> lock(w->mu);
    w->stop = true;
    w->cv.notify_all();
  }
  for (auto& w : workers_) w->thread.join();
}

void WorkerPool::Run(std::unique_ptr<WorkerJob> job) {
  const int32_t index = job->batch.worker;
  if (index < 0 || index >= size()) {
    internal::KvInvariantFailure(
        absl::StrCat("worker pool ", std::string(PoolName(pool_)), ": no worker ", index));
  }
  Worker& w = *workers_[index];
  std::lock_guard<std::mutex> lock(w.mu);
  if (w.busy) {
    internal::KvInvariantFailure(
        absl::StrCat("worker pool ", std::string(PoolName(pool_)), ": worker ", index, " is busy"));
  }
  w.busy = true;
  w.job = std::move(job);
  w.cv.notify_all();
}

void WorkerPool::Loop(Worker& w) {
  NameThisThread(pool_ == Pool::kPrefill ? "sieve-prefill" : "sieve-decode");
  while (true) {
    std::unique_ptr<WorkerJob> job;
    {
      std::unique_lock<std::mutex> lock(w.mu);
      w.cv.wait(lock, [&w] { return w.stop || w.job != nullptr; });
      if (w.stop) return;
      job = std::move(w.job);
    }
    const auto start = std::chrono::steady_clock::now();
    job->sampled.clear();
    job->status = w.step(job->steps, job->sampled);
    job->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    {
      // Idle again before the owner can see the job, so it may hand over the next one at once.
      std::lock_guard<std::mutex> lock(w.mu);
      w.busy = false;
    }
    done_(std::move(job));
  }
}

}  // namespace sieve::engine
