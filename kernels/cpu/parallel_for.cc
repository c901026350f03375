// The thread pool behind ParallelFor (parallel_for.h).
#include "kernels/cpu/parallel_for.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <mutex>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace sieve::kernels::parallel_for_internal {
namespace {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// How long a pool thread, and a caller waiting for its helpers, spins before it sleeps on a
// condition variable. A decode step makes dozens of ParallelFor calls a few microseconds apart;
// waking a sleeping thread through the kernel costs tens of microseconds on a VM, each call.
// SIEVE_CPU_SPIN_US overrides it (0: always sleep).
std::atomic<int64_t>& SpinMicros() {
  static std::atomic<int64_t> us = [] {
    const char* env = std::getenv("SIEVE_CPU_SPIN_US");
    long v = 100;
    if (env != nullptr && *env != '\0') v = std::max(0L, std::strtol(env, nullptr, 10));
    return static_cast<int64_t>(v);
  }();
  return us;
}

// Spins until done() or the spin time has passed; returns done().
template <typename Done>
bool SpinUntil(Done&& done) {
  const std::chrono::microseconds spin(SpinMicros().load(std::memory_order_relaxed));
  if (spin.count() == 0) return done();
  const auto deadline = std::chrono::steady_clock::now() + spin;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      CpuRelax();
    }
    if (std::chrono::steady_clock::now() >= deadline) return done();
  }
}

// One RunRanges call: its ranges are taken through `next` by the caller and by pool threads.
struct Job {
  const std::function<void(int)>* fn = nullptr;
  int ranges = 0;
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  // Pool threads inside Drain for this job; changed only under Pool::mu, read without it by the
  // spinning caller.
  std::atomic<int> helpers{0};
  bool Exhausted() const { return next.load(std::memory_order_relaxed) >= ranges; }
  bool Finished() const {
    return helpers.load(std::memory_order_acquire) == 0 &&
           done.load(std::memory_order_acquire) == ranges;
  }
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
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Enough threads for this call's helpers; more only when a call asks for more.
      const int want = std::min(ranges - 1, kMaxThreads);
      for (; threads_ < want; ++threads_) std::thread([this] { Worker(); }).detach();
      jobs_.push_back(&job);
      posted_.fetch_add(1, std::memory_order_release);
      wake = sleepers_ > 0;
    }
    if (wake) work_.notify_all();
    Drain(job);
    {
      std::lock_guard<std::mutex> lock(mu_);
      // No pool thread joins the job after this; those inside finish their range.
      jobs_.erase(std::remove(jobs_.begin(), jobs_.end(), &job), jobs_.end());
    }
    if (SpinUntil([&] { return job.Finished(); })) return;
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return job.Finished(); });
  }

 private:
  static constexpr int kMaxThreads = 1024;

  // Pops finished jobs off the front; true if one is left to help with. Needs mu_.
  bool HasWork() {
    while (!jobs_.empty() && jobs_.front()->Exhausted()) jobs_.pop_front();
    return !jobs_.empty();
  }

  void Worker() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (!HasWork()) {
        // Spin outside the lock for the next call before sleeping: posted_ moves on every call.
        const uint64_t seen = posted_.load(std::memory_order_acquire);
        lock.unlock();
        SpinUntil([&] { return posted_.load(std::memory_order_acquire) != seen; });
        lock.lock();
        if (!HasWork()) {
          ++sleepers_;
          work_.wait(lock, [&] { return HasWork(); });
          --sleepers_;
        }
      }
      Job& job = *jobs_.front();
      job.helpers.fetch_add(1, std::memory_order_relaxed);
      lock.unlock();
      Drain(job);
      lock.lock();
      // Last use of `job`: once helpers is 0 its caller may return and destroy it.
      if (job.helpers.fetch_sub(1, std::memory_order_acq_rel) == 1) done_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable work_, done_;
  std::deque<Job*> jobs_;  // calls that may have ranges left, oldest first
  std::atomic<uint64_t> posted_{0};  // calls posted so far (spinning threads watch it)
  int sleepers_ = 0;  // pool threads waiting on work_ (guarded by mu_)
  int threads_ = 0;
};

}  // namespace

void SetSpinMicrosForTesting(int64_t us) { SpinMicros().store(us); }

void RunRanges(int ranges, const std::function<void(int)>& fn) {
  static Pool* pool = new Pool;  // never destroyed: its threads block until the process exits
  pool->Run(ranges, fn);
}

}  // namespace sieve::kernels::parallel_for_internal
