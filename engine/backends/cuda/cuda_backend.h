// The CUDA backend: the Llama-family layer operators in bf16 on one GPU, fp32 accumulation.
//
// Memory: weights, activations and the paged KV cache are device buffers of bf16 (UploadWeight
// converts F32 / F16 / BF16 checkpoints on the host). The KV cache of layer l is two pools, K and
// V, of [num_pages, page_size, num_kv_heads, head_dim] as kernels/attention/paged_attention.h
// lays them out.
//
// Streams: each BackendStream owns a cudaStream_t, a cuBLASLt handle with its GEMM workspace,
// pinned staging for the step's layout and the device copies of it, and the attention plan of
// the current step. BeginStep copies the layout to the device asynchronously and plans the
// attention kernels: the split-KV decode kernel when every sequence has one query token, the
// paged prefill kernel otherwise, the simple kernel for shapes neither takes. The operators only
// enqueue work: they never allocate and never synchronize, except CopyToHost and Logits, which
// wait for the stream (Logits: fp32 output of cuBLASLt, one copy to pinned memory).
//
// Graph steps (engine/backend.h): each stream keeps, per sequence count, one CUDA graph of a
// decode step and the buffers it reads (inputs in fixed device memory, the decode workspace,
// fp32 logits). BeginGraphStep uploads the step's inputs with one copy, plans decode attention
// (graph_kv_quantum_shift) and launches the recording when there is one for the step's key
// (sequences, page-table stride, attention plan); EndGraphStep copies the logits out, and
// EndGraphStepOnDevice leaves them in the slot's buffer for Sample, which runs after the graph on
// the same stream (its inputs change every step). Implemented in cuda_graph_step.cc.
//
// Sampling (Sample, cuda_sampling.cc): the sampling kernel (kernels/cuda/sampling.h) samples from
// the fp32 logits on the device, each row split over several thread blocks when the batch is
// small (a cooperative launch, by a plan each stream makes once for its device), one block per
// row otherwise; per step the host uploads the rows' parameters and penalty lists (rows without
// penalties upload none) and reads back ids and logprobs, never the logits.
//
// Errors: every CUDA and cuBLAS failure becomes an absl::Status (Internal) naming the failing
// expression, file and line (and, for kernel launchers, the call inside them that failed).
// Threading: as engine/backend.h says; one thread per stream.
#ifndef SIEVE_ENGINE_BACKENDS_CUDA_CUDA_BACKEND_H_
#define SIEVE_ENGINE_BACKENDS_CUDA_CUDA_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backends/backend.h"

namespace sieve::engine {

// A CudaBackend's stream state (defined in cuda_backend.cc).
struct CudaStream;
// A CudaBackend's DoubleSparsity label cache (defined in cuda_double_sparsity.cc).
struct CudaDsLabels;

struct CudaBackendOptions {
  // Which attention kernels steps use.
  enum class Attention {
    kAuto,    // decode / prefill kernels where they apply, the simple kernel elsewhere
    kSimple,  // always the simple kernel (a cross-check of the fast ones)
  };
  int device = 0;                               // CUDA device ordinal
  Attention attention = Attention::kAuto;
  size_t gemm_workspace_bytes = size_t{32} << 20;  // cuBLASLt scratch per stream (bytes)
  // How graph steps plan decode attention for the step's longest KV length L. Negative: for L
  // itself (rounded to the kernel's 64-token tile, which does not change the plan), so a growing
  // context is recorded anew whenever the plan changes (every 64 tokens while the sequence has
  // fewer tiles than splits, then every `splits` tiles). s >= 0: for L rounded up to a multiple
  // of max(64, 2^(floor(log2 L) - s)) tokens, at most 2^-s more than L (longer chunks, idle
  // splits), recorded anew each time the rounded length grows. Measured on an H100 (bench/
  // results/2026-11-23-model-llama8b-graphs.md): a recording costs 3 to 6 ms of host time.
  int graph_kv_quantum_shift = -1;
  // MInference's index built on the device (MInferenceIndexCountGpu / FillGpu) instead of from
  // scores copied to the host (436 ms per 128K layer there). Its GPU test
  // (minference_gpu_test.cc, DevicePlanEqualsTheHostPlanOnTheSameScores) checks the device plan
  // equals the host plan exactly; false keeps the host path (a cross-check).
  bool minference_index_on_device = true;
};

class CudaBackend final : public Backend {
 public:
  // Selects the device and reads its properties. FailedPrecondition if no CUDA device is there
  // (or the ordinal is out of range), with the runtime's message.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const CudaBackendOptions& options = {});
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string_view name() const override { return "cuda"; }
  absl::StatusOr<Tensor> UploadWeight(absl::Span<const TensorView> parts, int64_t cols) override;
  absl::StatusOr<Tensor> Allocate(int64_t rows, int64_t cols) override;
  absl::Status AllocateKvCache(int32_t num_layers, int32_t num_pages, int32_t page_size,
                               const AttentionShape& shape) override;
  // Stage through host memory: one copy per layer's K and V rows of each page on a private
  // non-blocking transfer stream, then a wait for that stream (bf16 pages, as the pools hold
  // them). Several callers take turns on the one transfer stream.
  absl::Status ReadKvPages(absl::Span<const int32_t> pages, absl::Span<uint8_t> out) override;
  absl::Status WriteKvPages(absl::Span<const int32_t> pages,
                            absl::Span<const uint8_t> data) override;
  int64_t KvPageBytes(int32_t num_layers, int32_t page_size,
                      const AttentionShape& shape) const override;
  // The device's free memory (cudaMemGetInfo).
  absl::StatusOr<int64_t> AvailableMemoryBytes() const override;
  absl::StatusOr<std::unique_ptr<BackendStream>> CreateStream(
      const StreamOptions& options) override;
  absl::Status BeginStep(BackendStream& stream, const BatchLayout& layout) override;
  absl::Status Embed(BackendStream& stream, absl::Span<const int32_t> tokens, const Tensor& table,
                     Tensor out) override;
  absl::Status RmsNorm(BackendStream& stream, const Tensor& x, const Tensor& weight, float eps,
                       Tensor out) override;
  absl::Status AddRmsNorm(BackendStream& stream, const Tensor& x, Tensor residual,
                          const Tensor& weight, float eps, Tensor out) override;
  absl::Status Linear(BackendStream& stream, const Tensor& x, const Tensor& weight,
                      const Tensor& bias, Tensor out) override;
  absl::Status RopeAndCacheKv(BackendStream& stream, int32_t layer, const Tensor& qkv,
                              const AttentionShape& shape, const RopeTables& rope,
                              Tensor q_out) override;
  // Dense plans; sparse decode plans of whole pages (Quest's; cuda_sparse.cc) through compacted
  // page tables and the split-KV decode kernel; sparse prefill plans of 128-query blocks and key
  // blocks of whole 64-key tiles (XAttention's), or of 64-query and 64-key blocks with single
  // columns (MInference's), through the mma.sync prefill kernel skipping unlisted blocks. Other
  // sparse plans are Unimplemented.
  absl::Status Attention(BackendStream& stream, int32_t layer, const Tensor& q,
                         const AttentionShape& shape, float scale, const AttentionPlan& plan,
                         Tensor out) override;
  // Quest (cuda_sparse.cc, kernels/sparse/quest_cuda.h): bf16 page bounds per layer, updated by
  // a kernel after RopeAndCacheKv; PlanQuestPages scores and selects on the device for the whole
  // batch, then copies the selected pages back (waiting for the stream) to fill the host plan.
  int64_t PageBoundsBytes(int32_t num_layers, const AttentionShape& shape) const override;
  // XAttention block masses on the device (kernels/sparse/xattention_cuda.h), copied back
  // (waits for the stream).
  absl::Status XAttentionBlockMass(BackendStream& stream, int32_t layer, const Tensor& q,
                                   const AttentionShape& shape, const XAttentionEstimate& estimate,
                                   std::vector<float>& mass) override;
  // The same estimate, then the threshold selection and the compact index on the device
  // (XAttentionSelectGpu, XAttentionBuildIndexGpu); only the row starts and the listed blocks are
  // copied back (waits for the stream).
  absl::Status XAttentionSelect(BackendStream& stream, int32_t layer, const Tensor& q,
                                const AttentionShape& shape, const XAttentionEstimate& estimate,
                                absl::Span<const double> thresholds,
                                std::vector<int32_t>& row_start,
                                std::vector<int32_t>& blocks) override;
  // MInference's index (cuda_minference.cc): the vertical-slash scores on the device
  // (kernels/sparse/minference_cuda.h), copied back (waits for the stream); selection and the
  // plan on the host (BuildPlanFromScores). Block-sparse heads are Unimplemented.
  absl::Status MInferenceIndex(BackendStream& stream, int32_t layer, const Tensor& q,
                               const AttentionShape& shape, const MInferenceEstimate& estimate,
                               kernels::minference::MInferencePlan& out) override;
  absl::Status AllocatePageBounds(int32_t num_layers, const AttentionShape& shape) override;
  absl::Status UpdatePageBounds(BackendStream& stream, int32_t layer,
                                const AttentionShape& shape) override;
  absl::Status PlanQuestPages(BackendStream& stream, int32_t layer, const Tensor& q,
                              const AttentionShape& shape, const QuestPlanOptions& options,
                              AttentionPlan& plan) override;
  // DoubleSparsity (cuda_double_sparsity.cc, kernels/sparse/double_sparsity_cuda.h): the label
  // cache of every layer on the device in the CPU's layout, written by a kernel after
  // RopeAndCacheKv; PlanDsTokens selects on the device for the whole batch, then copies the
  // chosen positions back (waiting for the stream) to fill the host plan, whose columns
  // Attention runs as token lists through the split-KV decode kernel.
  int64_t DsLabelBytes(int32_t num_layers, const kernels::DoubleSparsityShape& shape) const override;
  absl::Status AllocateDsLabels(int32_t num_layers,
                                const kernels::DoubleSparsityShape& shape) override;
  absl::Status SetDsChannels(int32_t layer, absl::Span<const int32_t> channels) override;
  absl::Status UpdateDsLabels(BackendStream& stream, int32_t layer) override;
  absl::Status RebuildDsLabels(absl::Span<const int32_t> pages) override;
  absl::Status PlanDsTokens(BackendStream& stream, int32_t layer, const Tensor& q,
                            const DsPlanOptions& options, AttentionPlan& plan) override;
  absl::Status SiluMul(BackendStream& stream, const Tensor& gate_up, Tensor out) override;
  absl::Status GatherRows(BackendStream& stream, const Tensor& x, absl::Span<const int32_t> rows,
                          Tensor out) override;
  absl::Status CopyToHost(BackendStream& stream, const Tensor& x, absl::Span<float> out) override;
  absl::Status Logits(BackendStream& stream, const Tensor& x, const Tensor& lm_head,
                      absl::Span<float> host_out) override;
  absl::StatusOr<DeviceLogits> LogitsOnDevice(BackendStream& stream, const Tensor& x,
                                              const Tensor& lm_head) override;
  absl::Status CopyLogitsToHost(BackendStream& stream, const DeviceLogits& logits,
                                absl::Span<float> host_out) override;
  // Validates each row's parameters and lists its penalized tokens on the host, uploads them
  // with one copy, runs kernels/cuda/sampling.h on the stream after the step's work, and copies
  // back only the per-row results (id, logprobs, error). Implemented in cuda_sampling.cc.
  absl::Status Sample(BackendStream& stream, const DeviceLogits& logits,
                      absl::Span<const SampleRow> rows,
                      absl::Span<absl::StatusOr<SampledToken>> out) override;

  // cudaStreamSynchronize of the stream; sticky errors come back as DeviceLostError.
  absl::Status Synchronize(BackendStream& stream) override;
  bool SupportsStepGraphs() const override { return true; }
  absl::StatusOr<StepGraphMode> BeginGraphStep(BackendStream& stream, const BatchLayout& layout,
                                               absl::Span<const int32_t> tokens) override;
  absl::Status GraphLogits(BackendStream& stream, const Tensor& x, const Tensor& lm_head) override;
  absl::Status EndGraphStep(BackendStream& stream, absl::Span<float> host_logits) override;
  absl::StatusOr<DeviceLogits> EndGraphStepOnDevice(BackendStream& stream) override;
  void AbortGraphStep(BackendStream& stream) override;
  StepGraphStats GraphStats(const BackendStream& stream) const override;

  // The KV length a graph step of longest KV length `max_kv_len` plans decode attention for
  // (see CudaBackendOptions::graph_kv_quantum_shift).
  int32_t GraphPlanKvLen(int32_t max_kv_len) const;

  // The attention kernel the last BeginStep on `stream` (a stream of a CudaBackend) planned:
  // "decode", "prefill", "simple", or "none" before any step. For tests and logs.
  static std::string_view PlannedAttention(const BackendStream& stream);

  // Multiprocessors of the device (for planning).
  int num_sms() const { return num_sms_; }

 private:
  explicit CudaBackend(const CudaBackendOptions& options) : options_(options) {}
  absl::StatusOr<void*> DeviceAlloc(size_t bytes);
  void PlanAttention(CudaStream& s, int32_t num_seqs, int32_t plan_kv_len);
  // XAttention's block masses of estimate.seq left on the device at s.sparse_dev (returns their
  // count n); the sparse buffers then hold `extra_dev` more bytes after the masses (256-aligned)
  // and at least max(host_bytes, n floats) of pinned memory.
  absl::StatusOr<int64_t> XAttentionMassOnDevice(CudaStream& s, int32_t layer, const Tensor& q,
                                                 const AttentionShape& a,
                                                 const XAttentionEstimate& e, size_t extra_dev,
                                                 size_t host_bytes);

  CudaBackendOptions options_;
  int num_sms_ = 0;
  int cc_major_ = 0;  // compute capability major (9: Hopper, whose wgmma kernels may run)
  std::vector<void*> buffers_;  // every weight and activation buffer (cudaMalloc)
  // KV cache: layer l's K pool at kv_ + 2 * l * layer_elems_, its V pool right after (bf16).
  void* kv_ = nullptr;
  int64_t kv_layer_elems_ = 0;  // num_pages * page_size * num_kv_heads * head_dim
  int32_t num_layers_ = 0;
  int32_t num_pages_ = 0;
  int32_t page_size_ = 0;
  AttentionShape kv_shape_;
  // Quest page bounds (AllocatePageBounds): layer l's at page_bounds_ + l * bounds_layer_elems_,
  // [num_pages, num_kv_heads, 2, head_dim] bf16.
  void* page_bounds_ = nullptr;
  int64_t bounds_layer_elems_ = 0;
  int32_t bounds_layers_ = 0;
  // DoubleSparsity labels (AllocateDsLabels); shared_ptr so that this header needs no definition.
  std::shared_ptr<CudaDsLabels> ds_;
  // KV page transfers (ReadKvPages, WriteKvPages): their stream (cudaStream_t, created on first
  // use) and the lock that serializes them.
  std::mutex transfer_mu_;
  void* transfer_stream_ = nullptr;
  // Copies pages between the pool and host memory: to the host when `to_host`.
  absl::Status CopyKvPages(absl::Span<const int32_t> pages, uint8_t* host, size_t bytes,
                           bool to_host);
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_BACKENDS_CUDA_CUDA_BACKEND_H_
