// FaultBackend: a test backend that wraps any registered backend (the CUDA backend on the GPU
// machine, the CPU backend here) and injects the faults of an AsyncBackendControl into its
// operators: the n-th operator call fails recoverably (Internal; nothing of it is enqueued, the
// stream stays usable), for good (DeviceLostError from then on, on every call that can fail), or
// hangs until ReleaseHangs. Unlike AsyncBackend it adds no asynchrony of its own: the wrapped
// backend's streams are used as they are, so a CUDA backend keeps its real asynchrony and CUDA
// graphs. The engine's fault handling is thus tested on the real device too (issue 11 item 3).
//
// Operators are the calls that take a stream (BeginStep, Embed, ..., Sample, Synchronize, the
// graph-step calls); AbortGraphStep is never failed (it cleans up after a failure). Register
// with RegisterFaultBackend(name, factory of the wrapped backend) and set the model's backend to
// `name`.
//
// Thread safety: as the wrapped backend's; the control may be used from any thread.
#ifndef SIEVE_ENGINE_TESTING_FAULT_BACKEND_H_
#define SIEVE_ENGINE_TESTING_FAULT_BACKEND_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/backends/backend.h"
#include "engine/testing/async_backend.h"

namespace sieve::engine::testing {

class FaultBackend final : public Backend {
 public:
  FaultBackend(std::unique_ptr<Backend> inner, std::shared_ptr<AsyncBackendControl> control);

  std::string_view name() const override { return name_; }
  Backend& inner() { return *inner_; }

  absl::StatusOr<Tensor> UploadWeight(absl::Span<const TensorView> parts, int64_t cols) override;
  absl::StatusOr<Tensor> Allocate(int64_t rows, int64_t cols) override;
  absl::Status AllocateKvCache(int32_t num_layers, int32_t num_pages, int32_t page_size,
                               const AttentionShape& shape) override;
  int64_t KvPageBytes(int32_t num_layers, int32_t page_size,
                      const AttentionShape& shape) const override;
  absl::Status ReadKvPages(absl::Span<const int32_t> pages, absl::Span<uint8_t> out) override;
  absl::Status WriteKvPages(absl::Span<const int32_t> pages,
                            absl::Span<const uint8_t> data) override;
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
  absl::Status Attention(BackendStream& stream, int32_t layer, const Tensor& q,
                         const AttentionShape& shape, float scale, const AttentionPlan& plan,
                         Tensor out) override;
  absl::Status XAttentionBlockMass(BackendStream& stream, int32_t layer, const Tensor& q,
                                   const AttentionShape& shape,
                                   const XAttentionEstimate& estimate,
                                   std::vector<float>& mass) override;
  absl::Status XAttentionSelect(BackendStream& stream, int32_t layer, const Tensor& q,
                                const AttentionShape& shape, const XAttentionEstimate& estimate,
                                absl::Span<const double> thresholds,
                                std::vector<int32_t>& row_start,
                                std::vector<int32_t>& blocks) override;
  absl::Status MInferenceIndex(BackendStream& stream, int32_t layer, const Tensor& q,
                               const AttentionShape& shape, const MInferenceEstimate& estimate,
                               kernels::minference::MInferencePlan& out) override;
  int64_t PageBoundsBytes(int32_t num_layers, const AttentionShape& shape) const override;
  absl::Status AllocatePageBounds(int32_t num_layers, const AttentionShape& shape) override;
  absl::Status UpdatePageBounds(BackendStream& stream, int32_t layer,
                                const AttentionShape& shape) override;
  absl::Status RebuildPageBounds(absl::Span<const int32_t> pages,
                                 const AttentionShape& shape) override;
  absl::Status PlanQuestPages(BackendStream& stream, int32_t layer, const Tensor& q,
                              const AttentionShape& shape, const QuestPlanOptions& options,
                              AttentionPlan& plan) override;
  int64_t DsLabelBytes(int32_t num_layers,
                       const kernels::DoubleSparsityShape& shape) const override;
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
  absl::Status Sample(BackendStream& stream, const DeviceLogits& logits,
                      absl::Span<const SampleRow> rows,
                      absl::Span<absl::StatusOr<SampledToken>> out) override;
  absl::Status Synchronize(BackendStream& stream) override;
  bool SupportsStepGraphs() const override;
  absl::StatusOr<StepGraphMode> BeginGraphStep(BackendStream& stream, const BatchLayout& layout,
                                               absl::Span<const int32_t> tokens) override;
  absl::Status GraphLogits(BackendStream& stream, const Tensor& x, const Tensor& lm_head) override;
  absl::Status EndGraphStep(BackendStream& stream, absl::Span<float> host_logits) override;
  absl::StatusOr<DeviceLogits> EndGraphStepOnDevice(BackendStream& stream) override;
  void AbortGraphStep(BackendStream& stream) override;
  StepGraphStats GraphStats(const BackendStream& stream) const override;

 private:
  // Before an operator: the injected fault, if any (and counts it).
  absl::Status Operator();
  // Before any other call that can fail: DeviceLostError once the device is lost.
  absl::Status Lost() const;

  std::unique_ptr<Backend> inner_;
  std::shared_ptr<AsyncBackendControl> control_;
  std::string name_;
};

// Registers backend `name`: a FaultBackend around a backend `inner` makes (e.g. a CudaBackend:
// the built-in backends are not in the registry), all sharing the returned control.
std::shared_ptr<AsyncBackendControl> RegisterFaultBackend(const std::string& name,
                                                          BackendFactory inner);

}  // namespace sieve::engine::testing

#endif  // SIEVE_ENGINE_TESTING_FAULT_BACKEND_H_
