// Engine: the serving core. It owns the model (ModelRunner), the KV page pool, the prefix cache,
// one scheduler thread and the prefill and decode pool workers. The server submits tokenized
// requests and receives output through each request's RequestSink. engine/README.md describes
// the threading model and invariants.
//
// Thread-safety: every public method may be called from any thread.
#ifndef SIEVE_ENGINE_SERVING_ENGINE_H_
#define SIEVE_ENGINE_SERVING_ENGINE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/serving/engine_config.h"
#include "engine/serving/kv_cache_manager.h"
#include "engine/model/model_config.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/observer.h"
#include "engine/serving/request.h"
#include "engine/tokenizer/tokenizer.h"

namespace sieve::engine {

// Static facts about the served model, for GetModelInfo.
struct ModelInfo {
  std::string name;
  std::string architecture;            // "llama", "mistral", "qwen2"
  std::string backend;                 // "cpu", "cuda"
  std::string dtype;                   // what the backend computes in: "float32", "bfloat16"
  int32_t context_tokens = 0;
  int32_t vocab_size = 0;
  int32_t num_layers = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  std::string attention_policy;        // AttentionConfig::Describe(): "prefill=dense decode=dense"
  // The token ids that end a request by EOS (unless it sets ignore_eos): config.json's
  // eos_token_id followed by the tokenizer's end-of-sequence tokens, without repeats.
  std::vector<int32_t> eos_token_ids;
  int32_t kv_pages = 0, page_size = 0;
  int64_t kv_page_bytes = 0;  // one KV page over all layers, K and V, as transfers carry it
};

// Where the engine's scheduler thread spent its time since the engine started, per part of its
// loop (engine/README.md, "One iteration"), for profiles (bench/engine_load_bench.cc). Each part
// has wall seconds (steady clock: on a loaded machine this includes time the thread was
// descheduled) and the thread's CPU seconds (CLOCK_THREAD_CPUTIME_ID; 0 where unavailable). The
// parts add up to the thread's lifetime so far, up to the iteration in progress.
struct SchedulerThreadProfile {
  struct Part {
    double wall_s = 0;
    double cpu_s = 0;
  };
  int64_t iterations = 0;
  int64_t tokens = 0;  // sampled tokens handled
  Part wait;           // waiting for something to happen (idle)
  Part completions;    // finished jobs: Scheduler::Complete, per-token stop checks, staging
  Part intake;         // KV ops, new requests, cancellations, stop strings, deadlines
  Part schedule;       // Scheduler::Schedule
  Part dispatch;       // building the worker jobs and handing them over
  Part publish;        // the load snapshot and EngineObserver::OnLoad
  Part output;         // handing output to the output threads (with pools.output_workers 0:
                       // detokenizing, stop strings and the sink calls themselves)
};

class Engine {
 public:
  // Validates `config` (EngineConfig::Validate), loads the model and tokenizer, allocates the KV
  // pool (sized from the free memory when kv_cache.num_pages is 0) and starts the threads.
  // `observer` may be null; it must outlive the engine.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineConfig& config,
                                                        EngineObserver* observer);
  // Stops the threads; requests still running finish with kCancelled.
  ~Engine();

  // Queues a request. Errors (the sink is then never called):
  //   InvalidArgument: empty prompt, token id outside the vocabulary, invalid sampling or stop
  //     settings, no sink;
  //   OutOfRange: prompt + max_tokens beyond the context limit or the whole KV pool;
  //   ResourceExhausted: the queue is full (requests or tokens);
  //   Unavailable: the engine is draining or stopped, or its device was lost (see health()).
  absl::StatusOr<RequestId> Submit(RequestSpec spec);

  // Cancels a request: within one scheduler step its pages are freed and its sink receives
  // OnFinish(kCancelled). Unknown or finished ids are ignored.
  void Cancel(RequestId id);

  // Stops accepting requests (Submit returns Unavailable); running and queued ones continue.
  void StartDraining();
  // Blocks until no request is queued or running, or `timeout` passes; true if idle.
  bool WaitIdle(absl::Duration timeout);

  // OK while the engine can serve; after the backend reported an unrecoverable failure
  // (IsDeviceLost), that status: every request then ended with it, Submit refuses new ones, and
  // the process should drain and restart (EngineObserver::OnDeviceLost was called once).
  absl::Status health() const;

  // ---- KV transfers between daemons (disaggregated serving) --------------------------------
  //
  // A decode daemon imports the KV a prefill daemon computed: BeginKvImport, WriteKvPages into
  // its pages_to_fill, CommitKvImport (or AbortKvImport), then Submit the request, which meets
  // the imported pages in the prefix cache. A prefill daemon exports: a request with
  // RequestSpec::export_prompt_kv ends with RequestOutcome::kv_export; ReadKvPages of its pages,
  // then EndKvExport. The page bookkeeping runs on the scheduler thread (KvCacheManager's
  // imports and exports); the page contents are copied by the caller's thread.

  // Starts an import of `tokens` (whole pages; see KvCacheManager::BeginImport). Waits for the
  // scheduler thread (one iteration; never for a model step). Unavailable once the engine
  // stops; else BeginImport's errors.
  absl::StatusOr<KvImport> BeginKvImport(std::vector<int32_t> tokens);
  // Ends import `id`: its pages go to the prefix cache (Commit) or back to the free list (Abort).
  // Queued for the scheduler thread, ahead of any Submit that follows; never waits, so a sink may
  // call them. Unavailable once the engine stops (it then drops every import itself).
  absl::Status CommitKvImport(int64_t id);
  absl::Status AbortKvImport(int64_t id);
  // Ends export `id` (RequestOutcome::kv_export): the pages stay cached, unheld. Queued; never
  // waits; Unavailable once the engine stops.
  absl::Status EndKvExport(int64_t id);
  // Copies the KV of `pages` (an export's pages) to `out`, or `data` into `pages` (an import's
  // pages_to_fill), model_info().kv_page_bytes bytes per page (Backend::ReadKvPages). The caller
  // must hold the pages through an import or export in progress. Thread-safe for disjoint pages.
  absl::Status ReadKvPages(absl::Span<const int32_t> pages, absl::Span<uint8_t> out) const;
  absl::Status WriteKvPages(absl::Span<const int32_t> pages, absl::Span<const uint8_t> data);

  const Tokenizer& tokenizer() const;
  const ModelConfig& model_config() const;
  ModelInfo model_info() const;
  // The latest load snapshot (also reported to the observer).
  EngineLoad load() const;
  // The scheduler thread's time so far, as of its last published iteration.
  SchedulerThreadProfile scheduler_profile() const;

 private:
  class Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_ENGINE_H_
