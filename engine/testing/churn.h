// Churn: many requests with random cancellations and deadlines landing in every phase of a
// request's life, against one Engine, then a check that nothing is left behind. Shared by the CI
// test (churn_test.cc, a thousand requests) and the benchmark program (bench/churn_bench.cc, ten
// thousand).
//
// Each request draws one fate: run to the end; cancel right after Submit (it is still queued
// when admission is the bottleneck); cancel after a random delay (often while its chunked
// prefill runs); cancel from its sink at its first token, at a random later token, or at its
// second-to-last token (racing the last step); or a deadline a few milliseconds to a second
// away. A small KV pool makes running requests preempt each other, so some of these land on
// preempted requests. Where each one really ended is read from its RequestOutcome (never
// scheduled, prefilling, after its first token, decoding, one token before the end, after a
// preemption).
//
// Thread-safety: RunChurn drives the engine from the calling thread and one canceller thread.
#ifndef SIEVE_ENGINE_TESTING_CHURN_H_
#define SIEVE_ENGINE_TESTING_CHURN_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "engine/serving/engine.h"

namespace sieve::engine::testing {

struct ChurnOptions {
  int64_t requests = 1000;
  uint64_t seed = 1;
  int32_t max_in_flight = 32;        // the submitter waits while this many requests are live
  int32_t min_prompt_tokens = 8;
  int32_t max_prompt_tokens = 160;
  int32_t min_max_tokens = 2;
  int32_t max_max_tokens = 40;
  double max_cancel_delay_s = 0.05;  // "cancel after a delay": uniform in [0, this]
  double max_deadline_s = 0.5;       // deadlines: uniform in [0, this] from Submit
};

// The settings an engine for churn should have: the embedded model in `model_dir`, a KV pool
// small enough that the requests in flight preempt each other, chunked prefill.
EngineConfig ChurnEngineConfig(const std::string& model_dir, int32_t output_workers = 1);

struct ChurnResult {
  int64_t submitted = 0;
  int64_t rejected = 0;  // Submit refused (queue full); none expected with max_in_flight below
                         // the queue limit
  // Outcomes.
  int64_t completed = 0;   // length (or EOS)
  int64_t cancelled = 0;   // Cancel or deadline
  int64_t errors = 0;      // kError: none expected
  int64_t deadlines = 0;   // requests that had a deadline (ended cancelled or completed)
  // Where the cancelled ones ended (from their outcomes).
  int64_t ended_queued = 0;       // never scheduled
  int64_t ended_prefilling = 0;   // scheduled, no token yet
  int64_t ended_first_token = 0;  // exactly one token
  int64_t ended_decoding = 0;     // more than one, more than one short of max_tokens
  int64_t ended_last_step = 0;    // one token short of max_tokens (cancelled in the last step)
  int64_t ended_preempted = 0;    // after at least one preemption
  int64_t preemptions = 0;        // over all requests
  int64_t tokens = 0;             // streamed
  // The sink contract: calls after OnFinish, empty deltas, requests without OnFinish, sinks the
  // engine still references after it went idle.
  int64_t contract_breaches = 0;
  int64_t missing_finishes = 0;
  int64_t sinks_still_referenced = 0;
  // Baseline before and after (after the engine went idle).
  EngineLoad load_before, load_after;
  int64_t threads_before = 0, threads_after = 0;  // of this process (/proc/self/task)
  int64_t fds_before = 0, fds_after = 0;          // open file descriptors (/proc/self/fd)
  double seconds = 0;

  // The pages requests hold beyond the prefix cache, running and waiting requests, open
  // streams, threads and descriptors are all as before.
  bool AtBaseline() const;
  // A Markdown table of the figures.
  std::string ToMarkdown() const;
};

// Runs `options.requests` requests through `engine` (created with ChurnEngineConfig or
// similar), waits for it to go idle, and measures. Errors only when the engine does not go idle
// within a minute of the last submission.
absl::StatusOr<ChurnResult> RunChurn(Engine& engine, const ChurnOptions& options);

// Threads of this process and its open file descriptors (Linux /proc; -1 elsewhere).
int64_t CountThreads();
int64_t CountOpenFds();

}  // namespace sieve::engine::testing

#endif  // SIEVE_ENGINE_TESTING_CHURN_H_
