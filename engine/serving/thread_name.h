// Names the calling thread (at most 15 characters) so that profilers and debuggers show which
// engine thread is which: "sieve-sched" (the scheduler thread), "sieve-prefill" and
// "sieve-decode" (pool workers), "sieve-output" (output threads), "sieve-watchdog". `perf
// report --comm sieve-sched` then profiles the scheduler thread alone. No-op where unsupported.
#ifndef SIEVE_ENGINE_SERVING_THREAD_NAME_H_
#define SIEVE_ENGINE_SERVING_THREAD_NAME_H_

#if defined(__linux__)
#include <pthread.h>
#endif

namespace sieve::engine {

inline void NameThisThread(const char* name) {
#if defined(__linux__)
  pthread_setname_np(pthread_self(), name);
#else
  (void)name;
#endif
}

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_THREAD_NAME_H_
