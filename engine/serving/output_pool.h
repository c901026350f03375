// OutputPool: the threads that turn a request's sampled token ids into what its sink receives,
// off the scheduler thread's critical path. Detokenization (IncrementalDecoder), stop strings
// (StopChecker), the TokenDelta and its logprobs, the sink's OnTokens / OnFinish (where the
// server builds its response messages and starts gRPC writes) and EngineObserver::OnFinished all
// run here. The scheduler thread only stages small events (a token id and a few numbers) and hands
// them over once per iteration, under one lock per output thread.
//
// Ordering: every request belongs to one output thread (id modulo the thread count), and its
// events are processed in the order they were posted, so OnTokens calls keep their order and
// OnFinish comes last. Stop strings: the scheduler thread ends a request on its own for EOS, stop
// token ids and max_tokens (cheap integer checks); a stop string is only found here, a step or two
// after the scheduler may have sampled more tokens. The output thread then drops the later tokens,
// reports the stop through `Callbacks::stop` (the engine ends the request as kStop) and, when the
// finish event arrives, corrects the outcome (finish reason, matched stop, generated tokens,
// decode time) to what was streamed. What a client receives is the same as when everything ran on
// the scheduler thread; only the compute of the overrun tokens is wasted (as in vLLM v1, whose
// detokenizer runs in another process).
//
// With 0 threads everything runs inline in Flush() on the caller (the scheduler thread): the
// behaviour before this class existed, kept to measure the difference in one run.
//
// Thread-safety: Stage*, Flush and the destructor are called by the owning (scheduler) thread
// only. The callbacks run on the output threads (or inline in Flush) and must not call back into
// the pool.
#ifndef SIEVE_ENGINE_SERVING_OUTPUT_POOL_H_
#define SIEVE_ENGINE_SERVING_OUTPUT_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/types/span.h"
#include "engine/serving/observer.h"
#include "engine/serving/request.h"
#include "engine/serving/stop_checker.h"
#include "engine/tokenizer/tokenizer.h"

namespace sieve::engine {

// The output side of one request: created when the request is submitted, then owned by the
// pool's events; touched only by its output thread once posted.
class RequestOutput {
 public:
  // `spec`'s sink, stop criteria and logprob settings are copied; `tokenizer` must outlive this.
  RequestOutput(const RequestSpec& spec, absl::Span<const int32_t> eos_ids,
                const Tokenizer& tokenizer);

  RequestId id = 0;  // set by the engine when the request is accepted

 private:
  friend class OutputPool;

  std::shared_ptr<RequestSink> sink_;
  StopCriteria criteria_;  // for naming the stop that matched
  StopChecker stop_;       // the full criteria: EOS, stop ids, stop strings, max_tokens
  IncrementalDecoder decoder_;
  bool logprobs_ = false;
  std::string text_;  // all streamed text, kept only when there are stop strings
  int32_t streamed_ = 0;           // tokens passed to OnTokens
  double streamed_decode_s_ = 0;   // decode seconds at the last of them
  std::string matched_stop_;
  std::optional<int32_t> matched_stop_token_;
};

class OutputPool {
 public:
  struct Callbacks {
    // A stop string ended request `id` after `tokens` tokens, before the scheduler ended it.
    std::function<void(RequestId id, int32_t tokens)> stop;
    // OnFinish (and the observer's OnFinished) of one request returned.
    std::function<void()> delivered;
  };

  // Starts `threads` output threads (0: inline). `observer` may be null.
  OutputPool(int32_t threads, EngineObserver* observer, Callbacks callbacks);
  // Processes everything flushed so far (nothing staged is lost: call Flush first), then joins.
  ~OutputPool();

  OutputPool(const OutputPool&) = delete;
  OutputPool& operator=(const OutputPool&) = delete;

  // Stages one sampled token of `out`'s request. `decode_s`: seconds since its first token.
  void StageToken(RequestOutput* out, int32_t token, float logprob,
                  std::vector<std::pair<int32_t, float>> top, double decode_s);
  // Stages the end of `out`'s request with the scheduler's view of its outcome; the pool owns
  // `out` from now on.
  void StageFinish(std::unique_ptr<RequestOutput> out, RequestOutcome outcome);
  // Hands the staged events to their threads (or processes them now, with 0 threads).
  void Flush();

  // The number of output threads (0: inline on the scheduler thread).
  int32_t threads() const { return static_cast<int32_t>(workers_.size()); }

  // Since when the longest-running batch of events has been in process on an output thread
  // (a sink that blocks keeps it there), in steady-clock nanoseconds since its epoch; 0 when
  // every output thread waits. Any thread may call it (the engine's watchdog does).
  int64_t BusySinceNs() const;

 private:
  struct Event {
    RequestOutput* out = nullptr;
    std::unique_ptr<RequestOutput> owned;     // set on the finish event
    std::unique_ptr<RequestOutcome> outcome;  // set on the finish event
    int32_t token = 0;
    float logprob = 0;
    std::vector<std::pair<int32_t, float>> top;
    double decode_s = 0;
  };
  struct Worker {
    std::vector<Event> staged;  // owner thread only
    std::mutex mu;
    std::condition_variable cv;
    std::vector<Event> queue;  // guarded by mu
    bool stop = false;         // guarded by mu
    std::atomic<int64_t> busy_since_ns{0};  // see BusySinceNs
    std::thread thread;
  };

  void Loop(Worker& w);
  void Process(Event& e);
  void ProcessToken(Event& e);
  void ProcessFinish(Event& e);
  std::vector<Event>& StagedFor(RequestId id);

  EngineObserver* const observer_;
  const Callbacks callbacks_;
  std::vector<Event> inline_staged_;  // with 0 threads
  std::vector<std::unique_ptr<Worker>> workers_;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_OUTPUT_POOL_H_
