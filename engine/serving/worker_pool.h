// WorkerPool: the threads of one pool (prefill or decode). Each worker thread owns one step
// function (in the engine, a ModelWorker's ForwardSample) and runs the jobs the scheduler thread hands
// it, one at a time; when a job is done, the pool passes it back through a callback.
//
// Threading: Run() and the destructor are called by the owning (scheduler) thread; the done
// callback runs on the worker thread that finished the job and must only enqueue it for the
// owner (it must not call back into the pool). A job's inputs (the SequenceSteps' spans) must
// stay valid and unchanged until its done callback has run.
#ifndef SIEVE_ENGINE_SERVING_WORKER_POOL_H_
#define SIEVE_ENGINE_SERVING_WORKER_POOL_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/observer.h"
#include "engine/sampling/sampling.h"
#include "engine/serving/scheduler.h"

namespace sieve::engine {

// One worker batch on its way to a worker and back.
struct WorkerJob {
  WorkerBatch batch;                // what the scheduler planned (pool, worker, items)
  std::vector<SequenceStep> steps;  // the model's view of batch.items, in the same order
  // out: one entry per item with want_logits, in order: its sampled token or that row's error
  std::vector<absl::StatusOr<SampledToken>> sampled;
  absl::Status status;              // out: the step's result
  double seconds = 0;               // out: wall time of the step (monotonic clock)
  // When the scheduler thread handed the job over (for the step watchdog).
  std::chrono::steady_clock::time_point dispatched;
};

// Runs one step: SequenceSteps in, one sampled token (or row error) per want_logits step appended
// to the vector (ModelWorker::ForwardSample).
using StepFunction = std::function<absl::Status(absl::Span<const SequenceStep> batch,
                                                std::vector<absl::StatusOr<SampledToken>>& sampled)>;

class WorkerPool {
 public:
  using DoneCallback = std::function<void(std::unique_ptr<WorkerJob> job)>;

  // Starts one thread per step function; `done` receives every finished job.
  WorkerPool(Pool pool, std::vector<StepFunction> workers, DoneCallback done);
  // Lets the running jobs finish (their done callbacks run), then joins the threads. Jobs
  // handed over but not started are dropped without a callback.
  ~WorkerPool();

  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Returns the number of workers.
  int32_t size() const { return static_cast<int32_t>(workers_.size()); }

  // Hands `job` to worker job->batch.worker, which must be idle (its previous job's callback
  // has run); aborts otherwise.
  void Run(std::unique_ptr<WorkerJob> job);

 private:
  struct Worker {
    StepFunction step;
    std::mutex mu;
    std::condition_variable cv;
    std::unique_ptr<WorkerJob> job;  // guarded by mu
    bool busy = false;               // guarded by mu: a job is queued or running
    bool stop = false;               // guarded by mu
    std::thread thread;
  };

  void Loop(Worker& w);

  Pool pool_;
  DoneCallback done_;
  std::vector<std::unique_ptr<Worker>> workers_;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_WORKER_POOL_H_
