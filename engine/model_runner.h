// ModelRunner: the forward pass of a Llama-family decoder (Llama, Mistral, Qwen2) over a
// Backend and a paged KV cache. It loads a Hugging Face checkpoint directory (config.json and
// *.safetensors) and runs steps that mix prefill chunks and decode tokens of many sequences.
//
// It owns no scheduling state: callers (the scheduler, or the offline Generator) decide which
// pages each sequence uses and pass them with every step. Weights and the KV cache are shared;
// each worker thread runs steps on its own ModelWorker.
#ifndef SIEVE_ENGINE_MODEL_RUNNER_H_
#define SIEVE_ENGINE_MODEL_RUNNER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/backend.h"
#include "engine/model_config.h"
#include "engine/rope.h"

namespace sieve::engine {

struct ModelRunnerOptions {
  std::string backend = "cpu";       // "cpu" (fp32); "cuda" where built
  int32_t page_size = 16;            // tokens per KV page
  int32_t num_pages = 1024;          // KV pages (all layers); capacity = num_pages * page_size tokens
  int32_t max_step_tokens = 2048;    // most tokens one step may carry (activation buffers)
  int32_t max_step_logits = 256;     // most sequences one step may ask logits for
  int num_threads = 0;               // CPU threads for the CPU backend (0 = all)
  // "checkpoint": load *.safetensors from the model directory; "random": seeded random weights
  // with the shapes config.json implies (for benchmarking real shapes without a checkpoint).
  std::string weights = "checkpoint";
  uint64_t random_seed = 0;
};

// One sequence's share of a step.
struct SequenceStep {
  absl::Span<const int32_t> tokens;  // the new tokens computed this step (>= 1)
  int32_t num_cached = 0;            // tokens already in the KV cache = position of tokens[0]
  absl::Span<const int32_t> pages;   // page ids holding positions [0, num_cached + tokens.size())
  bool want_logits = false;          // return the logits after the last new token
};

// RoPE settings of `config`, in the form ComputeRopeTables takes.
RopeParams RopeParamsFromConfig(const ModelConfig& config);

class ModelRunner;

// One worker's execution state over a ModelRunner's shared weights and KV cache: its backend
// stream, activation buffers and batch layout. Each pool worker thread owns one ModelWorker;
// workers of one runner may run Forward at the same time on sequences with disjoint pages.
class ModelWorker {
 public:
  // Runs one step over `batch`: computes the new tokens of every sequence, writes their keys and
  // values into the sequences' pages, and appends to `logits` one row of vocab_size fp32 values
  // for each sequence with want_logits, in batch order. InvalidArgument for a malformed batch
  // (too many tokens, pages too few for the positions, token ids outside the vocabulary).
  absl::Status Forward(absl::Span<const SequenceStep> batch, std::vector<float>& logits);

 private:
  friend class ModelRunner;
  explicit ModelWorker(const ModelRunner& runner) : runner_(runner) {}
  absl::Status Allocate();
  absl::StatusOr<std::vector<int32_t>> BuildLayout(absl::Span<const SequenceStep> batch,
                                                   std::vector<int32_t>& tokens);

  const ModelRunner& runner_;
  std::unique_ptr<BackendStream> stream_;
  // Activation buffers, [max_step_tokens, width] unless noted.
  Tensor hidden_, normed_, qkv_, q_, attn_, proj_, gate_up_, act_;
  Tensor last_normed_, logits_;  // [max_step_logits, hidden] and [max_step_logits, vocab]
  BatchLayout layout_;
};

// The model: configuration, weights and KV cache on one backend, shared by its workers.
class ModelRunner {
 public:
  // Loads config.json and the weights from `model_dir` onto the backend named in `options`, and
  // allocates the KV cache and one default worker. Errors name the file, tensor or setting.
  static absl::StatusOr<std::unique_ptr<ModelRunner>> Load(const std::string& model_dir,
                                                           const ModelRunnerOptions& options);

  // Creates another worker (activation buffers and a backend stream). Not thread-safe: create
  // workers before running them.
  absl::StatusOr<std::unique_ptr<ModelWorker>> CreateWorker();

  // Forward on the default worker; see ModelWorker::Forward. For single-threaded callers.
  absl::Status Forward(absl::Span<const SequenceStep> batch, std::vector<float>& logits) {
    return default_worker_->Forward(batch, logits);
  }

  const ModelConfig& config() const { return config_; }
  const ModelRunnerOptions& options() const { return options_; }
  std::string_view backend_name() const { return backend_->name(); }

 private:
  friend class ModelWorker;
  struct LayerWeights {
    Tensor input_norm, qkv, qkv_bias, o, o_bias, post_norm, gate_up, down;
  };

  ModelRunner(ModelConfig config, ModelRunnerOptions options, std::unique_ptr<Backend> backend);
  absl::Status LoadWeights(const std::string& model_dir);

  ModelConfig config_;
  ModelRunnerOptions options_;
  std::unique_ptr<Backend> backend_;
  AttentionShape shape_;
  RopeTables rope_;
  Tensor embed_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
  std::unique_ptr<ModelWorker> default_worker_;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_MODEL_RUNNER_H_
