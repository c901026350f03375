// The thread pool behind ParallelFor (parallel_for.h).
#include "kernels/cpu/parallel_for.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>

namespace sieve::kernels::parallel_for_internal {
namespace {

// One RunRanges call: its ranges are taken through `next` by the caller and by pool threads.
struct Job {
  const std::function<void(int)>* fn = nullptr;
  int ranges = 0;
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  int helpers = 0;  // pool threads inside Drain for this job (guarded by Pool::mu)
  bool Exhausted() const { return next.load(std::memory_order_relaxed) >= ranges; }
};

void Drain(Job& j) {
  for (int i = j.next.fetch_add(1); i < j.ranges; i = j.next.fetch_add(1)) {
    (*j.fn)(i);
    j.done.fetch_add(1, std::memory_order_release);
  }
}

class Pool {
 public:
  void Run(int ranges, const std::function<void(int)>& fn) {
    Job job;
    job.fn = &fn;
    job.ranges = ranges;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Enough threads for this call's helpers; more only when a call asks for more.
      const int want = std::min(ranges - 1, kMaxThreads);
      for (; threads_ < want; ++threads_) std::thread([this] { Worker(); }).detach();
      jobs_.push_back(&job);
    }
    work_.notify_all();
    Drain(job);
    std::unique_lock<std::mutex> lock(mu_);
    jobs_.erase(std::remove(jobs_.begin(), jobs_.end(), &job), jobs_.end());
    done_.wait(lock, [&] {
      return job.helpers == 0 && job.done.load(std::memory_order_acquire) == job.ranges;
    });
  }

 private:
  static constexpr int kMaxThreads = 1024;

  void Worker() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      work_.wait(lock, [&] {
        while (!jobs_.empty() && jobs_.front()->Exhausted()) jobs_.pop_front();
        return !jobs_.empty();
      });
      Job& job = *jobs_.front();
      ++job.helpers;
      lock.unlock();
      Drain(job);
      lock.lock();
      --job.helpers;
      if (job.helpers == 0) done_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable work_, done_;
  std::deque<Job*> jobs_;  // calls that may have ranges left, oldest first
  int threads_ = 0;
};

}  // namespace

void RunRanges(int ranges, const std::function<void(int)>& fn) {
  static Pool* pool = new Pool;  // never destroyed: its threads block until the process exits
  pool->Run(ranges, fn);
}

}  // namespace sieve::kernels::parallel_for_internal
