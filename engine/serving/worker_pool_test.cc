// WorkerPool with fake step functions: jobs run on the worker they name, results and errors come
// back through the callback, and the destructor waits for a running job.
#include "engine/serving/worker_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

// Collects finished jobs for the test thread.
class Inbox {
 public:
  void Put(std::unique_ptr<WorkerJob> job) {
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.push_back(std::move(job));
    cv_.notify_all();
  }
  std::unique_ptr<WorkerJob> Take() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return !jobs_.empty(); });
    auto job = std::move(jobs_.front());
    jobs_.erase(jobs_.begin());
    return job;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<WorkerJob>> jobs_;
};

std::unique_ptr<WorkerJob> JobFor(int32_t worker, int32_t tokens) {
  auto job = std::make_unique<WorkerJob>();
  job->batch.pool = Pool::kDecode;
  job->batch.worker = worker;
  job->batch.num_tokens = tokens;
  job->steps.resize(tokens);
  for (int32_t i = 0; i < tokens; ++i) job->steps[i].uniform = i / 8.0;
  return job;
}

TEST(WorkerPoolTest, RunsJobsOnTheirWorkersAndReturnsResults) {
  Inbox inbox;
  std::atomic<int> calls[2] = {0, 0};
  std::vector<StepFunction> steps;
  for (int w = 0; w < 2; ++w) {
    // One token per step, whose id tells the worker and the step's draw apart; the third
    // step of a batch is a row error (as a NaN row would be), which fails only that row.
    steps.push_back([&calls, w](absl::Span<const SequenceStep> batch,
                                std::vector<absl::StatusOr<SampledToken>>& out) {
      ++calls[w];
      if (batch.size() == 3) return absl::InvalidArgumentError("three is not allowed");
      for (size_t i = 0; i < batch.size(); ++i) {
        if (i == 2) {
          out.push_back(absl::InternalError("row 2"));
          continue;
        }
        SampledToken t;
        t.id = w * 1000 + static_cast<int32_t>(batch[i].uniform * 8.0);
        out.push_back(t);
      }
      return absl::OkStatus();
    });
  }
  WorkerPool pool(Pool::kDecode, std::move(steps),
                  [&inbox](std::unique_ptr<WorkerJob> job) { inbox.Put(std::move(job)); });
  EXPECT_EQ(pool.size(), 2);
  pool.Run(JobFor(0, 2));
  pool.Run(JobFor(1, 5));
  // Three jobs come back: worker 0's second job may overtake worker 1's first, so the order is
  // not fixed. The 3-token job fails; the others carry one token per step from their worker.
  int seen = 0;
  int failures = 0;
  for (int i = 0; i < 3; ++i) {
    std::unique_ptr<WorkerJob> job = inbox.Take();
    if (job->batch.num_tokens == 3) {
      EXPECT_EQ(job->status.code(), absl::StatusCode::kInvalidArgument) << job->status;
      EXPECT_EQ(job->batch.worker, 0);
      ++failures;
      continue;
    }
    ASSERT_TRUE(job->status.ok()) << job->status;
    ASSERT_EQ(job->sampled.size(), static_cast<size_t>(job->batch.num_tokens));
    for (int32_t i = 0; i < job->batch.num_tokens; ++i) {
      if (i == 2) {
        EXPECT_EQ(job->sampled[i].status().code(), absl::StatusCode::kInternal);
        continue;
      }
      ASSERT_TRUE(job->sampled[i].ok()) << job->sampled[i].status();
      EXPECT_EQ(job->sampled[i]->id, job->batch.worker * 1000 + i);
    }
    EXPECT_GE(job->seconds, 0);
    seen |= 1 << job->batch.worker;
    // The worker is idle again once its job is back: the next one can go at once.
    if (job->batch.worker == 0) pool.Run(JobFor(0, 3));
  }
  EXPECT_EQ(seen, 3);
  EXPECT_EQ(failures, 1);
  EXPECT_EQ(calls[0], 2);
  EXPECT_EQ(calls[1], 1);
}

TEST(WorkerPoolTest, DestructorWaitsForTheRunningJob) {
  std::atomic<bool> started{false}, finished{false};
  std::atomic<int> callbacks{0};
  {
    std::vector<StepFunction> steps;
    steps.push_back([&](absl::Span<const SequenceStep>, std::vector<absl::StatusOr<SampledToken>>&) {
      started = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      finished = true;
      return absl::OkStatus();
    });
    WorkerPool pool(Pool::kPrefill, std::move(steps),
                    [&callbacks](std::unique_ptr<WorkerJob>) { ++callbacks; });
    pool.Run(JobFor(0, 1));
    while (!started) std::this_thread::yield();
  }
  EXPECT_TRUE(finished);
  EXPECT_EQ(callbacks, 1);
}

TEST(WorkerPoolDeathTest, HandingABusyWorkerASecondJobAborts) {
  EXPECT_DEATH(
      {
        std::vector<StepFunction> steps;
        steps.push_back([](absl::Span<const SequenceStep>, std::vector<absl::StatusOr<SampledToken>>&) {
          std::this_thread::sleep_for(std::chrono::seconds(5));
          return absl::OkStatus();
        });
        WorkerPool pool(Pool::kDecode, std::move(steps), [](std::unique_ptr<WorkerJob>) {});
        pool.Run(JobFor(0, 1));
        pool.Run(JobFor(0, 1));
      },
      "is busy");
  EXPECT_DEATH(
      {
        WorkerPool pool(Pool::kDecode, {}, [](std::unique_ptr<WorkerJob>) {});
        pool.Run(JobFor(0, 1));
      },
      "no worker 0");
}

}  // namespace
}  // namespace sieve::engine
