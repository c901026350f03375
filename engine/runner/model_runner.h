// ModelRunner: the forward pass of a Llama-family decoder (Llama, Mistral, Qwen2) over a
// Backend and a paged KV cache. It loads a Hugging Face checkpoint directory (config.json and
// *.safetensors) and runs steps that mix prefill chunks and decode tokens of many sequences.
//
// It owns no scheduling state: callers (the engine's scheduler, or a test) decide which
// pages each sequence uses and pass them with every step. Weights and the KV cache are shared;
// each worker thread runs steps on its own ModelWorker.
#ifndef SIEVE_ENGINE_RUNNER_MODEL_RUNNER_H_
#define SIEVE_ENGINE_RUNNER_MODEL_RUNNER_H_

#include <cstdint>
#include <map>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/attention/attention_policy.h"
#include "engine/attention/double_sparsity_calibration.h"
#include "engine/backends/backend.h"
#include "engine/model/model_config.h"
#include "engine/model/rope.h"
#include "engine/sampling/sampling.h"
#include "kernels/attention/paged_attention.h"

namespace sieve::engine {

// The runner's options. The engine derives them from its EngineConfig in one function,
// RunnerOptionsFor (engine/serving/engine_config.h); tests and benchmarks that drive a runner directly
// start from RunnerOptionsFor(EngineConfig()). The zero values here are not usable defaults: Load
// rejects an empty backend or weights source and non-positive sizes.
// How far a model load has got (ModelRunnerOptions::on_load_progress).
struct WeightLoadProgress {
  int64_t tensors = 0;        // checkpoint tensors on the backend so far
  int64_t total_tensors = 0;  // tensors the model's config.json implies
  int64_t bytes = 0;          // bytes of those tensors as stored (checkpoint dtype)
  double seconds = 0;         // since the weights began loading
};

struct ModelRunnerOptions {
  std::string backend;               // "cpu" (fp32); "cuda" where built
  int device = 0;                    // CUDA device ordinal (cuda only)
  std::string attention_kernel;      // "auto" or "simple" (cuda only; EngineConfig attention.kernel)
  int32_t page_size = 0;             // tokens per KV page
  // KV pages (all layers); capacity = num_pages * page_size tokens. 0: Load sizes the pool from
  // the backend's free memory once the weights are in (Backend::AvailableMemoryBytes and
  // KvPageBytes): kv_memory_fraction of it, at most enough pages for kv_max_sequences sequences
  // (0: no such cap) of kv_max_context_tokens tokens each (0: the model's
  // max_position_embeddings).
  int32_t num_pages = 0;
  double kv_memory_fraction = 0;
  int32_t kv_max_sequences = 0;
  int32_t kv_max_context_tokens = 0;
  int32_t max_step_tokens = 0;       // most tokens one step may carry (activation buffers)
  int32_t max_step_logits = 0;       // most sequences one step may ask logits for
  int num_threads = 0;               // CPU threads for the CPU backend (0 = all)
  // The KV cache's element type on the CPU backend: "float32" or "bfloat16" (EngineConfig
  // kv_cache.dtype resolved; empty: the backend's compute dtype). Other backends ignore it.
  std::string kv_dtype;
  // The order of a KV page's rows on the CPU backend (kernels/attention/paged_attention.h);
  // other backends ignore it. RunnerOptionsFor sets head-major with a sparse decode method (its
  // selected pages per KV head are runs to read). Unset: chosen for dense decode by the size of
  // a token's row of all KV heads, token-major from 4 KiB (the 8B shape in fp32: its dense decode
  // 49-52 ms token-major against 59-60 ms head-major at 128K), head-major below (the embedded
  // shape, 512 bytes: 9.0-9.2 against 11.1-12.1 ms); bench/results/2026-12-06-cpu-kv-layout.md.
  std::optional<kernels::KvLayout> kv_layout;
  // "checkpoint": load *.safetensors from the model directory; "random": seeded random weights
  // with the shapes config.json implies (for benchmarking real shapes without a checkpoint).
  std::string weights;
  uint64_t random_seed = 0;
  // Backends with step graphs (cuda): run decode-only steps whose sequences all want logits
  // from CUDA graphs, one per batch-size bucket (1, 2, 4, ... up to max_step_logits), padding the
  // batch to its bucket. One extra KV page beyond num_pages is reserved for the padding rows.
  // Off: every step runs its operators eagerly. Ignored by the cpu backend, and off with a sparse
  // decode method (quest_page_bounds, ds_label_channels), whose plans are made on the host.
  bool cuda_graphs = false;
  // Sparse decode side data (EngineConfig attention.decode.method quest): Load allocates the
  // backend's Quest page bounds (counted in the pool's page size) and every step of every worker
  // keeps them current after writing its KV (Backend::UpdatePageBounds).
  bool quest_page_bounds = false;
  // DoubleSparsity labels (EngineConfig attention.decode.method double_sparsity): outlier
  // channels per label head (0: no labels), label precision (16: fp16, 4: 4-bit codes), and one
  // label row and token set per KV head instead of per query head. Load allocates the backend's
  // label cache (counted in the pool's page size); once SetDsCalibration gave every layer its
  // channels, every step of every worker writes the new tokens' labels after their KV
  // (Backend::UpdateDsLabels).
  int32_t ds_label_channels = 0;
  int32_t ds_label_bits = 16;
  bool ds_per_kv_head = false;
  // Called on the loading thread after each weight tensor is on the backend; a non-OK status
  // stops the load there (Load returns it), e.g. CANCELLED when the daemon got SIGTERM. May be
  // empty.
  std::function<absl::Status(const WeightLoadProgress&)> on_load_progress;
};

// One sequence's share of a step.
struct SequenceStep {
  absl::Span<const int32_t> tokens;  // the new tokens computed this step (>= 1)
  int32_t num_cached = 0;            // tokens already in the KV cache = position of tokens[0]
  absl::Span<const int32_t> pages;   // page ids holding positions [0, num_cached + tokens.size())
  bool want_logits = false;          // return the logits after the last new token
  // The request asked for dense prefill attention: a sparse prefill policy attends every
  // causal key of this sequence (AttentionStep::dense_prefill).
  bool dense_prefill = false;
  // The request asked for dense decode attention: a sparse decode policy reads every key of this
  // sequence (AttentionStep::dense_decode).
  bool dense_decode = false;
  // For ForwardSample, with want_logits: how to sample this row (borrowed; see SampleRow). The
  // engine sets them from the request's state and draws `uniform` from its SamplerRng when it
  // builds the step. Forward ignores them.
  const SamplingParams* sampling = nullptr;
  const TokenHistory* history = nullptr;
  double uniform = 0.0;
};

// What a worker's attention policy did over the steps since the last TakePrefillStats, for the
// prefill metrics (sieve_prefill_attention_density, sieve_prefill_sparse_index_seconds). Counted
// only for workers whose policy is not "dense".
struct PrefillAttentionStats {
  int64_t read_pairs = 0;     // (query, key) pairs attention read, over layers and query heads
  int64_t dense_pairs = 0;    // the causal pairs dense attention would have read
  double plan_seconds = 0;    // wall time in the policy's Plan (estimators, index building)
  int32_t sparse_layers = 0;  // layer plans that were not dense

  // read_pairs / dense_pairs (1 when nothing was counted).
  double density() const {
    return dense_pairs > 0 ? static_cast<double>(read_pairs) / dense_pairs : 1.0;
  }
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
  // values into the sequences' pages (finished when it returns, also when it fails: the backend
  // stream is synchronized before any return), and appends to `logits` one row of vocab_size fp32 values
  // for each sequence with want_logits, in batch order. InvalidArgument for a malformed batch
  // (too many tokens, pages too few for the positions, token ids outside the vocabulary).
  absl::Status Forward(absl::Span<const SequenceStep> batch, std::vector<float>& logits);

  // Runs the step like Forward, then samples on the backend (Backend::Sample) and appends to
  // `out` one entry per sequence with want_logits, in batch order: the sampled token, or that
  // row's error (as SampleTokenWithUniform would fail it). Only the token ids and the logprobs
  // asked for reach the host. The returned Status fails the whole step (malformed batch, a
  // want_logits sequence without sampling or history, backend errors).
  absl::Status ForwardSample(absl::Span<const SequenceStep> batch,
                             std::vector<absl::StatusOr<SampledToken>>& out);

  // Counters of this worker's graph steps (all zero when the runner uses no step graphs).
  StepGraphStats graph_stats() const;

  // The decode-attention stats of the steps since the last call (AttentionPolicy::
  // TakeDecodeStats of this worker's policy), then resets them.
  DecodeAttentionStats TakeDecodeStats() { return policy_->TakeDecodeStats(); }

  // Turns graph steps of this worker off or back on (they are on by default when the runner
  // uses step graphs; turning them on does nothing otherwise). For benchmarks and tests that
  // compare the two paths on the same weights and KV cache.
  void SetStepGraphs(bool enabled) { step_graphs_ = enabled; }

  // Returns and resets the attention counters of the steps run since the last call. Call it
  // from the thread that runs the steps, or between steps (e.g. after the step's job came back).
  PrefillAttentionStats TakePrefillStats() {
    PrefillAttentionStats s = prefill_stats_;
    prefill_stats_ = {};
    return s;
  }

  // The method of this worker's attention policy ("dense", "xattention", ...).
  std::string_view attention_method() const { return policy_->method(); }

 private:
  friend class ModelRunner;
  explicit ModelWorker(const ModelRunner& runner) : runner_(runner) {}
  absl::Status Allocate(const StreamOptions& stream_options);
  absl::StatusOr<std::vector<int32_t>> BuildLayout(absl::Span<const SequenceStep> batch,
                                                   std::vector<int32_t>& tokens);
  // Whether `batch` runs as a graph step: step graphs on, one token and logits per sequence.
  bool IsGraphStep(absl::Span<const SequenceStep> batch) const;
  // Pads layout_ and `tokens` (built for `batch`) to the batch's bucket for a graph step.
  void PadForGraph(absl::Span<const SequenceStep> batch, std::vector<int32_t>& tokens);
  // Enqueues the embedding of the step's `n` tokens, every layer and the final norm (into
  // normed_).
  absl::Status EnqueueLayers(int64_t n, absl::Span<const int32_t> tokens);
  // Has the policy plan layer `layer`'s attention of the step's queries `q` (projections `qkv`)
  // into plan_, counting prefill_stats_ for a sparse prefill policy.
  absl::Status PlanAttention(int32_t layer, const Tensor& q, const Tensor& qkv);
  // Runs the step's operators and leaves the logits of the want_logits sequences on the backend,
  // row i for the i-th of them (empty when none wants logits).
  absl::StatusOr<DeviceLogits> Run(absl::Span<const SequenceStep> batch);
  absl::StatusOr<DeviceLogits> RunGraph(absl::Span<const SequenceStep> batch,
                                        std::vector<int32_t>& tokens);
  // Ends a step: waits for the stream (Backend::Synchronize), unless the step's last call was a
  // waiting one (`waited`) that succeeded, and returns `status`, or the wait's error when
  // `status` is OK or the wait reports a lost device.
  absl::Status EndStep(absl::Status status, bool waited = false);

  const ModelRunner& runner_;
  std::unique_ptr<BackendStream> stream_;
  std::unique_ptr<AttentionPolicy> policy_;  // plans each layer's attention
  AttentionPlan plan_;                       // the current layer's plan, reused
  std::vector<uint8_t> dense_prefill_;       // [num_seqs] SequenceStep::dense_prefill
  PrefillAttentionStats prefill_stats_;
  // Activation buffers, [max_step_tokens, width] unless noted.
  Tensor hidden_, normed_, qkv_, q_, attn_, proj_, gate_up_, act_;
  Tensor last_normed_;  // [max_step_logits, hidden]
  BatchLayout layout_;
  std::vector<uint8_t> dense_decode_;        // [num_seqs] SequenceStep::dense_decode
  // Page-table stride of each graph bucket: a power of two that only grows, so that a bucket's
  // recording survives until a sequence needs more pages than the stride holds.
  std::map<int32_t, int32_t> graph_stride_;
  bool step_graphs_ = true;
};

// The model: configuration, weights and KV cache on one backend, shared by its workers.
class ModelRunner {
 public:
  // Loads config.json and the weights from `model_dir` onto the backend named in `options`, and
  // allocates the KV cache (sizing it from the free memory when options.num_pages is 0; options()
  // then holds the count) and one default worker. Errors name the file, tensor or setting.
  static absl::StatusOr<std::unique_ptr<ModelRunner>> Load(const std::string& model_dir,
                                                           const ModelRunnerOptions& options);

  // Creates another worker (activation buffers and a backend stream made with `stream`) whose
  // steps attend as `policy` plans (null: dense). Not thread-safe: create workers before
  // running them.
  absl::StatusOr<std::unique_ptr<ModelWorker>> CreateWorker(
      const StreamOptions& stream = {}, std::unique_ptr<AttentionPolicy> policy = nullptr);

  // Forward on the default worker; see ModelWorker::Forward. For single-threaded callers.
  absl::Status Forward(absl::Span<const SequenceStep> batch, std::vector<float>& logits) {
    return default_worker_->Forward(batch, logits);
  }

  // The worker that Forward runs on.
  ModelWorker& default_worker() { return *default_worker_; }

  // Graph-step counters of the default worker; see ModelWorker::graph_stats.
  StepGraphStats graph_stats() const { return default_worker_->graph_stats(); }

  // True when decode steps run from step graphs (options().cuda_graphs on a backend that
  // supports them).
  bool uses_step_graphs() const { return scratch_page_ >= 0; }

  // KV page transfers over the runner's backend (Backend::ReadKvPages / WriteKvPages: one page's
  // K and V of every layer, kv_page_bytes() bytes per page). The caller keeps steps away from
  // the pages meanwhile. WriteKvPages (an import's whole pages) then rebuilds the pages' sparse
  // decode side data from the written keys, as a step would have written it (Quest page bounds,
  // DoubleSparsity labels; Backend::RebuildPageBounds / RebuildDsLabels), so a decode policy
  // selects from the imported KV and not from what the pages held before.
  absl::Status ReadKvPages(absl::Span<const int32_t> pages, absl::Span<uint8_t> out) const {
    return backend_->ReadKvPages(pages, out);
  }
  absl::Status WriteKvPages(absl::Span<const int32_t> pages,
                            absl::Span<const uint8_t> data) const;
  // Bytes of one KV page over all layers, K and V.
  int64_t kv_page_bytes() const {
    return backend_->KvPageBytes(static_cast<int32_t>(layers_.size()), options_.page_size, shape_);
  }

  const ModelConfig& config() const { return config_; }
  const ModelRunnerOptions& options() const { return options_; }
  std::string_view backend_name() const { return backend_->name(); }
  // The backend (for tests that inspect its memory).
  const Backend& backend() const { return *backend_; }
  // Bytes of one KV page's side data (Quest page bounds when options().quest_page_bounds) over
  // all layers: what the pool's sizing added per page beyond the K and V.
  int64_t side_data_bytes_per_page() const {
    const int32_t layers = static_cast<int32_t>(config_.num_hidden_layers);
    return (options_.quest_page_bounds ? backend_->PageBoundsBytes(layers, shape_) : 0) +
           (options_.ds_label_channels > 0 ? backend_->DsLabelBytes(layers, ds_shape()) : 0);
  }

  // The DoubleSparsity label geometry of options() (valid when ds_label_channels > 0).
  kernels::DoubleSparsityShape ds_shape() const;

  // Gives every layer its DoubleSparsity channels: the first ds_label_channels of each label
  // head's ranking in `calibration` (which must fit the model). InvalidArgument naming what does
  // not fit.
  absl::Status SetDsCalibration(const DsCalibration& calibration);

 private:
  friend class ModelWorker;
  struct LayerWeights {
    Tensor input_norm, qkv, qkv_bias, o, o_bias, post_norm, gate_up, down;
  };

  ModelRunner(ModelConfig config, ModelRunnerOptions options, std::unique_ptr<Backend> backend);
  absl::Status LoadWeights(const std::string& model_dir);
  // The KV page count for options_.num_pages 0 (see ModelRunnerOptions), once the weights are in.
  absl::StatusOr<int32_t> KvPagesForFreeMemory() const;
  // Bytes of one KV page across all layers with its side data (Quest bounds, DS labels).
  int64_t KvPoolPageBytes() const;

  ModelConfig config_;
  ModelRunnerOptions options_;
  std::unique_ptr<Backend> backend_;
  AttentionShape shape_;
  RopeTables rope_;
  Tensor embed_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
  // The KV page (id num_pages, beyond the callers' pool) that graph steps' padding rows write;
  // -1 without step graphs.
  int32_t scratch_page_ = -1;
  std::unique_ptr<ModelWorker> default_worker_;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_RUNNER_MODEL_RUNNER_H_
