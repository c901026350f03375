// The device interface the model runs on: memory for weights, activations and the paged KV
// cache, and the operators of a Llama-family layer. CpuBackend (fp32, always built) and
// CudaBackend (bf16) implement it; ModelRunner drives it and owns no device code.
//
// Step graphs (optional, CUDA graphs on the GPU): a backend that SupportsStepGraphs() can record
// the operators of a decode step once per shape and replay the recording for later steps of that
// shape; see BeginGraphStep.
//
// Threading: memory calls (UploadWeight, Allocate, AllocateKvCache, CreateStream) are made by one
// thread at start-up. The operators run on a BackendStream; different streams may run at the same
// time on different threads (one per pool worker) as long as their steps write disjoint KV pages.
//
// Asynchrony: an operator may return before it has run (CUDA enqueues kernels on the stream).
// Only the calls documented as waiting (CopyToHost, Logits, CopyLogitsToHost, Sample,
// EndGraphStep, Synchronize) guarantee that everything enqueued before them on the stream has
// finished; a caller must reach one of them before anything that depends on the step's KV
// writes happens (freeing or reusing its pages, sharing them, the next chunk on another stream).
// ModelWorker does: a step returns only after its stream is synchronized.
//
// Errors: an error a backend reports as unrecoverable (IsDeviceLost) means the device can run
// nothing more (a sticky CUDA error such as an illegal address); the engine then fails its
// requests, reports the failure and stops serving. Any other error fails only the step.
#ifndef SIEVE_ENGINE_BACKENDS_BACKEND_H_
#define SIEVE_ENGINE_BACKENDS_BACKEND_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "engine/backends/attention_plan.h"
#include "kernels/sparse/minference.h"
#include "engine/backends/ds_label_store.h"
#include "engine/model/rope.h"
#include "engine/model/safetensors.h"
#include "engine/sampling/sampling.h"

namespace sieve::engine {

// A non-owning row-major matrix in backend memory: `rows` x `cols` elements of the backend's
// element type (fp32 on the CPU, bf16 on CUDA), rows `cols` elements apart. The backend that
// made it owns the memory for its whole lifetime.
struct Tensor {
  void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;

  // The first `n` rows of this tensor (n <= rows).
  Tensor FirstRows(int64_t n) const { return Tensor{data, n, cols}; }
  bool empty() const { return data == nullptr; }
};

// Where the tokens of one step sit: host arrays the backend copies to the device in BeginStep.
// See kernels/attention/paged_attention.h for the meaning of each array.
struct BatchLayout {
  std::vector<int32_t> positions;    // [num_tokens] position of each token in its sequence
  std::vector<int64_t> slots;        // [num_tokens] KV slot (page * page_size + offset)
  std::vector<int32_t> query_start;  // [num_seqs + 1] prefix sums of tokens per sequence
  std::vector<int32_t> kv_lens;      // [num_seqs] KV tokens per sequence after this step
  std::vector<int32_t> page_table;   // [num_seqs * page_table_stride] page ids
  int32_t page_table_stride = 0;     // pages per row of page_table

  int32_t num_tokens() const { return static_cast<int32_t>(positions.size()); }
  int32_t num_seqs() const { return static_cast<int32_t>(kv_lens.size()); }
};

// fp32 logits left in backend memory by LogitsOnDevice or EndGraphStepOnDevice: `rows` rows of
// `vocab` floats, `vocab` apart. The stream that produced them owns the memory; they stay valid
// until that stream's next step, and Sample may overwrite them (with the penalized logits).
struct DeviceLogits {
  float* data = nullptr;
  int64_t rows = 0;
  int64_t vocab = 0;

  bool empty() const { return data == nullptr || rows == 0; }
};

// What Backend::Sample needs to sample one row: SampleTokenWithUniform's arguments besides the
// logits. The pointers are borrowed for the call (the engine's request state, which the scheduler
// thread leaves unchanged while the request's step is in flight).
struct SampleRow {
  const SamplingParams* params = nullptr;
  const TokenHistory* history = nullptr;
  double uniform = 0.0;  // the request's draw for this token, in [0, 1)
};

// Shape of the attention part of a layer: what the KV cache and RoPE need.
struct AttentionShape {
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
};

// What Backend::XAttentionBlockMass scores: one sequence of the step.
struct XAttentionEstimate {
  int32_t seq = 0;           // sequence index in the step's BatchLayout
  int32_t stride = 16;       // antidiagonal stride S (tokens)
  int32_t block_size = 128;  // query and key block B (tokens, a multiple of S)
};

// What Backend::MInferenceIndex estimates: one sequence of the step.
struct MInferenceEstimate {
  int32_t seq = 0;  // sequence index in the step's BatchLayout
  // One pattern per query head (kernels/sparse/minference.h); borrowed for the call.
  absl::Span<const kernels::minference::HeadPattern> patterns;
  int32_t last_q = kernels::minference::kDefaultLastQ;  // queries the VS estimate uses
  // Non-null: the backend may keep the index in its device memory when seq is the step's only
  // sequence. It then makes *device_plan an on_device plan (attention_plan.h) of the sequence's
  // rows, with on_device_pairs counted on the device, for the Attention call of the same layer
  // and step, and leaves `out` untouched; device_plan->on_device (which the caller clears)
  // says whether it did.
  AttentionPlan* device_plan = nullptr;
};

// How a graph step runs (see Backend::BeginGraphStep).
enum class StepGraphMode {
  kEager,   // the caller enqueues the operators; they run as they are enqueued
  kRecord,  // the caller enqueues the operators; they are recorded, then run from the recording
  kReplay,  // the caller enqueues nothing: the recording of an earlier step runs again
};

// Counters of one stream's graph steps, for tests, logs and benchmarks.
struct StepGraphStats {
  int64_t eager_steps = 0;       // graph steps run eagerly (the first of each shape)
  int64_t recorded_steps = 0;    // graph steps recorded (the second of each shape)
  int64_t replayed_steps = 0;    // graph steps replayed from a recording
  double record_seconds = 0;     // host time spent recording and instantiating (seconds)
  int64_t live_recordings = 0;   // recordings held now
};

// How urgently a stream's work should run when streams compete for the device. On CUDA, kHigh is
// the device's greatest stream priority: the block scheduler starts a high-priority stream's
// waiting blocks before a normal stream's, so a short decode step is not queued behind the blocks
// of a long prefill chunk running at the same time. The CPU backend runs every stream alike.
enum class StreamPriority { kNormal, kHigh };

struct StreamOptions {
  StreamPriority priority = StreamPriority::kNormal;
};

// An ordered queue of operators with the state of its current step (the batch layout and, on a
// GPU, the CUDA stream and device copies of the layout). One per worker thread.
class BackendStream {
 public:
  virtual ~BackendStream() = default;
};

// Returns an Unavailable status that IsDeviceLost recognises: the device failed for good and
// nothing more can run on it. `message` says what failed.
absl::Status DeviceLostError(absl::string_view message);

// True when `status` reports an unrecoverable device failure (made by DeviceLostError).
bool IsDeviceLost(const absl::Status& status);

class Backend {
 public:
  virtual ~Backend() = default;

  // A short name for logs and model info: "cpu" or "cuda".
  virtual std::string_view name() const = 0;

  // Copies the given tensors, concatenated along their first dimension, into backend memory as
  // one [rows, cols] matrix, converting the element type (F32/F16/BF16 sources). 1-D parts
  // contribute their elements in order, so biases concatenate into one row. InvalidArgument if a
  // 2-D part's trailing size is not `cols` or the elements do not fill whole rows.
  virtual absl::StatusOr<Tensor> UploadWeight(absl::Span<const TensorView> parts, int64_t cols) = 0;

  // Allocates an uninitialised [rows, cols] activation buffer.
  virtual absl::StatusOr<Tensor> Allocate(int64_t rows, int64_t cols) = 0;

  // Allocates the paged KV cache: for each of `num_layers` layers, K and V pools of
  // [num_pages, page_size, num_kv_heads, head_dim] elements.
  virtual absl::Status AllocateKvCache(int32_t num_layers, int32_t num_pages, int32_t page_size,
                                       const AttentionShape& shape) = 0;

  // Bytes of one page across all layers, K and V (for sizing the pool from a memory budget).
  virtual int64_t KvPageBytes(int32_t num_layers, int32_t page_size,
                              const AttentionShape& shape) const = 0;

  // --- KV page transfer (disaggregated serving) ---------------------------------------------
  //
  // One page's KV over all layers, as ReadKvPages / WriteKvPages lay it out: for layer 0, 1, ...
  // its K block then its V block, each [page_size, num_kv_heads, head_dim] elements of the
  // backend's KV element type (KvPageBytes() bytes per page in all). The caller guarantees that no
  // step writes these pages meanwhile (an export holds cached, full pages; an import's pages are
  // listed by no sequence) and that a read follows the end of the step that wrote them (a step
  // ends when the device ends). Thread-safe between callers using disjoint pages.

  // Copies pages `pages` (in order) into `out` (pages.size() * KvPageBytes bytes); waits for the
  // copy. InvalidArgument for a page outside the pool or a wrong size; Unimplemented for a
  // backend that cannot.
  virtual absl::Status ReadKvPages(absl::Span<const int32_t> pages, absl::Span<uint8_t> out);

  // Copies `data` (pages.size() * KvPageBytes bytes, laid out as ReadKvPages writes it) into
  // pages `pages`; when it returns, a later step on any stream sees the data. Errors as
  // ReadKvPages. The pages' sparse decode side data is not written here: ModelRunner::
  // WriteKvPages follows it with RebuildPageBounds / RebuildDsLabels when its policy keeps any.
  virtual absl::Status WriteKvPages(absl::Span<const int32_t> pages,
                                    absl::Span<const uint8_t> data);

  // Bytes this backend could still allocate for the KV pool now (for sizing the pool from a
  // memory budget once the weights are in): the device's free memory on a GPU, the host's
  // available memory on the CPU. Unimplemented for a backend that cannot tell.
  virtual absl::StatusOr<int64_t> AvailableMemoryBytes() const;

  // Creates a stream for one worker thread.
  virtual absl::StatusOr<std::unique_ptr<BackendStream>> CreateStream(
      const StreamOptions& options) = 0;

  // Makes `layout` the batch of the operators that follow on `stream`, until its next BeginStep.
  // `layout` must stay alive and unchanged until then.
  virtual absl::Status BeginStep(BackendStream& stream, const BatchLayout& layout) = 0;

  // out[t, :] = table[tokens[t], :] for the step's tokens.
  virtual absl::Status Embed(BackendStream& stream, absl::Span<const int32_t> tokens, const Tensor& table, Tensor out) = 0;

  // out = RmsNorm(x) * weight (weight: one row).
  virtual absl::Status RmsNorm(BackendStream& stream, const Tensor& x, const Tensor& weight, float eps, Tensor out) = 0;

  // residual += x; out = RmsNorm(residual) * weight.
  virtual absl::Status AddRmsNorm(BackendStream& stream, const Tensor& x, Tensor residual, const Tensor& weight,
                                  float eps, Tensor out) = 0;

  // out = x * weight^T (+ bias): weight is [n_out, k_in] as PyTorch stores it; bias one row or
  // empty.
  virtual absl::Status Linear(BackendStream& stream, const Tensor& x, const Tensor& weight, const Tensor& bias,
                              Tensor out) = 0;

  // Takes the fused projection qkv [num_tokens, (Hq + 2 Hkv) * D], applies RoPE to its q and k
  // parts at the step's positions, writes k and v into layer `layer`'s KV pages at the step's
  // slots, and writes the rotated queries to q_out [num_tokens, Hq * D].
  virtual absl::Status RopeAndCacheKv(BackendStream& stream, int32_t layer, const Tensor& qkv, const AttentionShape& shape,
                                      const RopeTables& rope, Tensor q_out) = 0;

  // Causal attention of the step's queries q [num_tokens, Hq * D] over layer `layer`'s KV
  // cache, reading the keys `plan` lists (every causal key when plan.dense); out
  // [num_tokens, Hq * D]. The plan is the caller's, valid until the call returns (a backend that
  // runs the operator later copies what it needs). Unimplemented for a sparse plan on a backend
  // without a sparse kernel; InvalidArgument / Internal for a plan that does not fit the step.
  virtual absl::Status Attention(BackendStream& stream, int32_t layer, const Tensor& q,
                                 const AttentionShape& shape, float scale,
                                 const AttentionPlan& plan, Tensor out) = 0;

  // --- Prefill estimators (sparse prefill policies, engine/attention) -----------------------------
  //
  // Each scores the step's queries against layer `layer`'s cached keys (written by
  // RopeAndCacheKv before) and returns a compact result to the host, waiting for the stream. A
  // backend without the operator returns Unimplemented (the cuda backend, for now).

  // XAttention's antidiagonal block masses (kernels/sparse/xattention.h) of sequence
  // estimate.seq of the step, from its queries q (the step's rotated queries [num_tokens,
  // Hq * D]) against its keys [0, kv_len): mass[(h * q_blocks + m - m0) * k_blocks + n] for query
  // head h, absolute query block m in [m0, m0 + q_blocks) (the blocks its queries' positions
  // fall in) and key block n < k_blocks = ceil(kv_len / block_size). Resizes `mass`.
  virtual absl::Status XAttentionBlockMass(BackendStream& stream, int32_t layer, const Tensor& q,
                                           const AttentionShape& shape,
                                           const XAttentionEstimate& estimate,
                                           std::vector<float>& mass);

  // XAttention's block selection where the backend has it on the device: the estimate of
  // XAttentionBlockMass, then for every row (absolute query block m0 + mi, query head h) the key
  // blocks kernels::XAttentionSelectBlocks would select from those masses with threshold
  // thresholds[h] (one entry: every head), increasing. Rows in order mi * Hq + h: row_start
  // [q_blocks * Hq + 1] (prefix sums), blocks [row_start.back()]. Unimplemented where the
  // backend has no device selection (the caller selects on the host from XAttentionBlockMass).
  virtual absl::Status XAttentionSelect(BackendStream& stream, int32_t layer, const Tensor& q,
                                        const AttentionShape& shape,
                                        const XAttentionEstimate& estimate,
                                        absl::Span<const double> thresholds,
                                        std::vector<int32_t>& row_start,
                                        std::vector<int32_t>& blocks);

  // MInference's index (kernels/sparse/minference.h) of sequence estimate.seq of the step: its
  // queries q (the step's rotated queries [num_tokens, Hq * D]) scored against layer `layer`'s
  // cached keys [0, kv_len) with softmax scale 1/sqrt(D); `out` gets that sequence's rows (query
  // blocks and key blocks of 64; out.query_block_start = {0, blocks}), or an on_device plan
  // (estimate.device_plan). Waits for the stream. Unimplemented on a backend without the
  // estimator.
  virtual absl::Status MInferenceIndex(BackendStream& stream, int32_t layer, const Tensor& q,
                                       const AttentionShape& shape,
                                       const MInferenceEstimate& estimate,
                                       kernels::minference::MInferencePlan& out);
  // --- Sparse decode side data: Quest page bounds (SPARSE_ATTENTION.md section 3) ------------
  // Per (layer, KV page, KV head) the elementwise max and min of the page's post-RoPE keys, in
  // the KV element type, kept current on every append by UpdatePageBounds, which the runner
  // enqueues right after RopeAndCacheKv in every pool (prefill chunks and decode tokens alike).
  // A backend without them returns Unimplemented (and 0 bytes).

  // Bytes of one KV page's bounds across `num_layers` layers (added to KvPageBytes when sizing
  // the pool from a memory budget).
  virtual int64_t PageBoundsBytes(int32_t num_layers, const AttentionShape& shape) const {
    return 0;
  }

  // Allocates the bounds of every page AllocateKvCache allocated (call it after that).
  virtual absl::Status AllocatePageBounds(int32_t num_layers, const AttentionShape& shape);

  // Widens layer `layer`'s page bounds with the keys RopeAndCacheKv wrote at the step's slots;
  // a slot at page offset 0 resets its page first (so a recycled page never keeps stale
  // bounds, and a chunk that starts mid-page continues from the stored values).
  virtual absl::Status UpdatePageBounds(BackendStream& stream, int32_t layer,
                                        const AttentionShape& shape);

  // Recomputes the bounds of whole pages `pages`, every layer, from the keys now in them (all
  // page_size of them): the pages an import filled through WriteKvPages, whose keys no step
  // wrote. Like WriteKvPages, it runs on the caller's thread and returns once done; the caller
  // keeps steps away from the pages meanwhile.
  virtual absl::Status RebuildPageBounds(absl::Span<const int32_t> pages,
                                         const AttentionShape& shape);

  // Quest selection for layer `layer` of the current step, as a decode plan (query blocks of
  // one token, key blocks of one page): each sequence with one query and not in
  // options.dense_sequences gets per query head the top page_budget - 1 pages by upper bound
  // plus its last page (all pages when they fit the budget); every other sequence lists all
  // of its pages. q: the step's rotated queries [num_tokens, Hq * D]. A backend may keep the
  // rows on its device (AttentionPlan::on_device, for its next Attention call of this layer)
  // unless options.rows_on_host asks for them here.
  struct QuestPlanOptions {
    int32_t page_budget = 2;  // pages per row, including the last (>= 2)
    bool per_kv_head = false;  // one page set per KV head (max of the group's bounds)
    absl::Span<const uint8_t> dense_sequences;  // per sequence: 1 = read every page (or empty)
    bool rows_on_host = false;  // the plan's rows on the host (tests, tools)
  };
  virtual absl::Status PlanQuestPages(BackendStream& stream, int32_t layer, const Tensor& q,
                                      const AttentionShape& shape,
                                      const QuestPlanOptions& options, AttentionPlan& plan);

  // --- Sparse decode side data: DoubleSparsity labels (SPARSE_ATTENTION.md section 4) --------
  // Per (layer, KV page, token, label head) the token's outlier key channels (the label cache of
  // kernels/sparse/double_sparsity.h), written by UpdateDsLabels, which the runner enqueues right
  // after RopeAndCacheKv in every pool when the decode method is double_sparsity. Labels are per
  // token, so a recycled page needs no reset. A backend without them returns Unimplemented (and
  // 0 bytes).

  // Bytes of one KV page's labels across `num_layers` layers (added to KvPageBytes when sizing
  // the pool from a memory budget).
  virtual int64_t DsLabelBytes(int32_t num_layers, const kernels::DoubleSparsityShape& shape) const {
    return 0;
  }

  // Allocates the labels of every page AllocateKvCache allocated (call it after that).
  virtual absl::Status AllocateDsLabels(int32_t num_layers,
                                        const kernels::DoubleSparsityShape& shape);

  // Sets layer `layer`'s outlier channels ([label heads * channels], from the calibration).
  // Until every layer has them, UpdateDsLabels writes nothing (a start-up calibration run).
  virtual absl::Status SetDsChannels(int32_t layer, absl::Span<const int32_t> channels);

  // Writes the labels of the step's new tokens of layer `layer` from the keys RopeAndCacheKv
  // wrote.
  virtual absl::Status UpdateDsLabels(BackendStream& stream, int32_t layer);

  // Writes the labels of every token of whole pages `pages`, every layer, from the keys now in
  // them (the pages an import filled through WriteKvPages); nothing until every layer has its
  // channels, as UpdateDsLabels. Caller's thread, waits, as RebuildPageBounds.
  virtual absl::Status RebuildDsLabels(absl::Span<const int32_t> pages);

  // DoubleSparsity selection for layer `layer` of the current step, as a decode plan (query
  // blocks of one token, key blocks of one page): each sequence with one query and not in
  // options.dense_sequences gets per query head its top options.token_budget tokens as columns;
  // every other sequence lists all of its pages. q: the step's rotated queries.
  virtual absl::Status PlanDsTokens(BackendStream& stream, int32_t layer, const Tensor& q,
                                    const DsPlanOptions& options, AttentionPlan& plan);

  // out = silu(gate_up[:, :I]) * gate_up[:, I:], gate_up [num_tokens, 2I], out [num_tokens, I].
  virtual absl::Status SiluMul(BackendStream& stream, const Tensor& gate_up, Tensor out) = 0;

  // out[i, :] = x[rows[i], :].
  virtual absl::Status GatherRows(BackendStream& stream, const Tensor& x, absl::Span<const int32_t> rows, Tensor out) = 0;

  // Copies x to the host as fp32, waiting for the work before it to finish.
  virtual absl::Status CopyToHost(BackendStream& stream, const Tensor& x, absl::Span<float> out) = 0;

  // The final projection with fp32 output: host_out[r, v] = x[r, :] . lm_head[v, :] for
  // r < x.rows and v < lm_head.rows, accumulated and returned in fp32 (not rounded to the
  // activation type), written to host memory; waits for the work before it to finish.
  // host_out: x.rows * lm_head.rows floats.
  virtual absl::Status Logits(BackendStream& stream, const Tensor& x, const Tensor& lm_head,
                              absl::Span<float> host_out) = 0;

  // The final projection with fp32 output left on the backend: logits[r, v] = x[r, :] .
  // lm_head[v, :] for r < x.rows, v < lm_head.rows, accumulated in fp32. Does not wait.
  virtual absl::StatusOr<DeviceLogits> LogitsOnDevice(BackendStream& stream, const Tensor& x,
                                                      const Tensor& lm_head) = 0;

  // Copies the first host_out.size() / logits.vocab rows of `logits` to the host and waits.
  virtual absl::Status CopyLogitsToHost(BackendStream& stream, const DeviceLogits& logits,
                                        absl::Span<float> host_out) = 0;

  // Samples row i of `logits` for rows[i] (i < rows.size() <= logits.rows) exactly as
  // SampleTokenWithUniform(row i, *rows[i].params, *rows[i].history, rows[i].uniform) does, and
  // writes the token (id, and the logprobs asked for) or that row's error to out[i]; only these
  // come back to the host. A row's error (invalid params, a history id outside the vocabulary,
  // NaN / +inf / all -inf logits) fails only that row, with the reference's status code. Waits
  // for the result. The returned Status is for failures of the backend itself.
  virtual absl::Status Sample(BackendStream& stream, const DeviceLogits& logits,
                              absl::Span<const SampleRow> rows,
                              absl::Span<absl::StatusOr<SampledToken>> out) = 0;

  // Waits until everything enqueued on `stream` has finished and returns the first error of that
  // work that was not reported yet (an unrecoverable one as IsDeviceLost). After it returns, the
  // step's KV writes are complete. Synchronous backends return OkStatus at once.
  virtual absl::Status Synchronize(BackendStream& stream) { return absl::OkStatus(); }

  // --- Step graphs (optional) --------------------------------------------------------------------
  //
  // A graph step is a decode step (one token per sequence) run as:
  //   mode = BeginGraphStep(stream, layout, tokens);
  //   if (mode != kReplay) { Embed(stream, tokens, ...); ...operators...; GraphLogits(...); }
  //   EndGraphStep(stream, host_logits);   (or EndGraphStepOnDevice(stream), then Sample)
  // Its shape is the number of sequences, the page-table stride and whatever the backend derives
  // from them (its attention plan). The first step of a shape runs eagerly, the second is
  // recorded, later ones replay the recording with the new layout and tokens. A recording
  // replays the same operators on the same buffers: callers must enqueue the same operators on
  // the same tensors (weights, activations, rows) for every step of one shape, and a stream keeps
  // the recordings of the shapes it has seen (the most recent per number of sequences).
  // Within a graph step, GatherRows, CopyToHost, Logits and LogitsOnDevice are not available;
  // Sample runs after EndGraphStepOnDevice, outside the recording.

  // True when this backend implements the graph-step calls below.
  virtual bool SupportsStepGraphs() const { return false; }

  // Begins a graph step over `layout` (every sequence has one query token; `tokens` holds them,
  // one per sequence): validates the layout, uploads it with the tokens into buffers fixed for
  // the step's shape, and says whether the caller enqueues the operators (kEager, kRecord) or not
  // (kReplay). Embed must then be given these same `tokens`. After a successful call the caller
  // must call EndGraphStep, or AbortGraphStep if enqueuing failed.
  virtual absl::StatusOr<StepGraphMode> BeginGraphStep(BackendStream& stream,
                                                       const BatchLayout& layout,
                                                       absl::Span<const int32_t> tokens);

  // In a graph step that enqueues operators: the fp32 logits of every row of x (x.rows = the
  // step's sequences) into the step's logits buffer, from which EndGraphStep copies them.
  virtual absl::Status GraphLogits(BackendStream& stream, const Tensor& x, const Tensor& lm_head);

  // Ends a graph step: finishes a recording, runs the step (unless it ran eagerly) and copies the
  // logits of the first host_logits.size() / vocab sequences to `host_logits` (fp32), waiting
  // for the step to finish.
  virtual absl::Status EndGraphStep(BackendStream& stream, absl::Span<float> host_logits);

  // Ends a graph step like EndGraphStep but leaves the logits on the device: returns the step's
  // logits buffer (every row of the step, padding included; sequence i is row i) without
  // waiting; empty if the step enqueued no GraphLogits.
  virtual absl::StatusOr<DeviceLogits> EndGraphStepOnDevice(BackendStream& stream);

  // Ends a graph step whose operators could not all be enqueued: drops a recording in progress.
  virtual void AbortGraphStep(BackendStream& stream) {}

  // The graph-step counters of `stream`.
  virtual StepGraphStats GraphStats(const BackendStream& stream) const { return {}; }
};

inline absl::StatusOr<int64_t> Backend::AvailableMemoryBytes() const {
  return absl::UnimplementedError("this backend cannot report its free memory");
}

inline absl::Status Backend::ReadKvPages(absl::Span<const int32_t>, absl::Span<uint8_t>) {
  return absl::UnimplementedError("this backend cannot read KV pages for a transfer");
}

inline absl::Status Backend::WriteKvPages(absl::Span<const int32_t>, absl::Span<const uint8_t>) {
  return absl::UnimplementedError("this backend cannot write KV pages from a transfer");
}

inline absl::Status Backend::XAttentionBlockMass(BackendStream&, int32_t, const Tensor&,
                                                 const AttentionShape&,
                                                 const XAttentionEstimate&, std::vector<float>&) {
  return absl::UnimplementedError(
      absl::StrCat("the ", std::string(name()), " backend has no XAttention estimator"));
}

inline absl::Status Backend::XAttentionSelect(BackendStream&, int32_t, const Tensor&,
                                              const AttentionShape&, const XAttentionEstimate&,
                                              absl::Span<const double>, std::vector<int32_t>&,
                                              std::vector<int32_t>&) {
  return absl::UnimplementedError(
      absl::StrCat("the ", std::string(name()), " backend has no device XAttention selection"));
}

inline absl::Status Backend::MInferenceIndex(BackendStream&, int32_t, const Tensor&,
                                             const AttentionShape&, const MInferenceEstimate&,
                                             kernels::minference::MInferencePlan&) {
  return absl::UnimplementedError(
      absl::StrCat("the ", std::string(name()), " backend has no MInference estimator"));
}

inline absl::Status Backend::AllocatePageBounds(int32_t, const AttentionShape&) {
  return absl::UnimplementedError("this backend has no Quest page bounds");
}

inline absl::Status Backend::UpdatePageBounds(BackendStream&, int32_t, const AttentionShape&) {
  return absl::UnimplementedError("this backend has no Quest page bounds");
}

inline absl::Status Backend::RebuildPageBounds(absl::Span<const int32_t>, const AttentionShape&) {
  return absl::UnimplementedError(
      absl::StrCat("the ", std::string(name()), " backend cannot rebuild Quest page bounds"));
}

inline absl::Status Backend::RebuildDsLabels(absl::Span<const int32_t>) {
  return absl::UnimplementedError(
      absl::StrCat("the ", std::string(name()), " backend cannot rebuild DoubleSparsity labels"));
}

inline absl::Status Backend::AllocateDsLabels(int32_t, const kernels::DoubleSparsityShape&) {
  return absl::UnimplementedError("this backend has no DoubleSparsity labels");
}

inline absl::Status Backend::SetDsChannels(int32_t, absl::Span<const int32_t>) {
  return absl::UnimplementedError("this backend has no DoubleSparsity labels");
}

inline absl::Status Backend::UpdateDsLabels(BackendStream&, int32_t) {
  return absl::UnimplementedError("this backend has no DoubleSparsity labels");
}

inline absl::Status Backend::PlanDsTokens(BackendStream&, int32_t, const Tensor&,
                                          const DsPlanOptions&, AttentionPlan&) {
  return absl::UnimplementedError("this backend has no DoubleSparsity selection");
}

inline absl::Status Backend::PlanQuestPages(BackendStream&, int32_t, const Tensor&,
                                            const AttentionShape&, const QuestPlanOptions&,
                                            AttentionPlan&) {
  return absl::UnimplementedError("this backend has no Quest page selection");
}

inline absl::StatusOr<StepGraphMode> Backend::BeginGraphStep(BackendStream&, const BatchLayout&,
                                                             absl::Span<const int32_t>) {
  return absl::UnimplementedError("this backend has no step graphs");
}

inline absl::Status Backend::GraphLogits(BackendStream&, const Tensor&, const Tensor&) {
  return absl::UnimplementedError("this backend has no step graphs");
}

inline absl::Status Backend::EndGraphStep(BackendStream&, absl::Span<float>) {
  return absl::UnimplementedError("this backend has no step graphs");
}

inline absl::StatusOr<DeviceLogits> Backend::EndGraphStepOnDevice(BackendStream&) {
  return absl::UnimplementedError("this backend has no step graphs");
}

// Makes a backend for ModelRunner::Load (see RegisterBackend). `num_threads` is
// ModelRunnerOptions::num_threads.
using BackendFactory = std::function<absl::StatusOr<std::unique_ptr<Backend>>(int num_threads)>;

// Registers `factory` under `name`, so that ModelRunnerOptions::backend = `name` makes its
// backend (after the built-in "cpu" and "cuda", which cannot be replaced). For test backends
// (engine/testing/async_backend.h) and plug-ins; a later registration of a name replaces the
// earlier one. Thread-safe.
void RegisterBackend(std::string name, BackendFactory factory);

// The factory registered under `name`, or null. Thread-safe.
BackendFactory FindRegisteredBackend(std::string_view name);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_BACKENDS_BACKEND_H_
