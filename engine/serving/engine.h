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

  const Tokenizer& tokenizer() const;
  const ModelConfig& model_config() const;
  ModelInfo model_info() const;
  // The latest load snapshot (also reported to the observer).
  EngineLoad load() const;

 private:
  class Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_ENGINE_H_
