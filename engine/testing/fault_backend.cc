// FaultBackend: see fault_backend.h.
#include "engine/testing/fault_backend.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace sieve::engine::testing {

FaultBackend::FaultBackend(std::unique_ptr<Backend> inner,
                           std::shared_ptr<AsyncBackendControl> control)
    : inner_(std::move(inner)),
      control_(std::move(control)),
      name_(absl::StrCat("fault(", std::string(inner_->name()), ")")) {}

absl::Status FaultBackend::Operator() {
  absl::Status st = control_->OperatorFault(name_);
  control_->CountOperator();
  return st;
}

absl::Status FaultBackend::Lost() const {
  if (!control_->device_lost()) return absl::OkStatus();
  return DeviceLostError(absl::StrCat(name_, ": the device was lost (injected fatal fault)"));
}

// --- Calls without a stream: forwarded, failed once the device is lost -------------------------

absl::StatusOr<Tensor> FaultBackend::UploadWeight(absl::Span<const TensorView> parts,
                                                  int64_t cols) {
  SIEVE_RETURN_IF_ERROR(Lost());
  return inner_->UploadWeight(parts, cols);
}
absl::StatusOr<Tensor> FaultBackend::Allocate(int64_t rows, int64_t cols) {
  SIEVE_RETURN_IF_ERROR(Lost());
  return inner_->Allocate(rows, cols);
}
absl::Status FaultBackend::AllocateKvCache(int32_t num_layers, int32_t num_pages,
                                           int32_t page_size, const AttentionShape& shape) {
  SIEVE_RETURN_IF_ERROR(Lost());
  return inner_->AllocateKvCache(num_layers, num_pages, page_size, shape);
}
int64_t FaultBackend::KvPageBytes(int32_t num_layers, int32_t page_size,
                                  const AttentionShape& shape) const {
  return inner_->KvPageBytes(num_layers, page_size, shape);
}
absl::Status FaultBackend::ReadKvPages(absl::Span<const int32_t> pages, absl::Span<uint8_t> out) {
  SIEVE_RETURN_IF_ERROR(Lost());
  return inner_->ReadKvPages(pages, out);
}
absl::Status FaultBackend::WriteKvPages(absl::Span<const int32_t> pages,
                                        absl::Span<const uint8_t> data) {
  SIEVE_RETURN_IF_ERROR(Lost());
  return inner_->WriteKvPages(pages, data);
}
absl::StatusOr<int64_t> FaultBackend::AvailableMemoryBytes() const {
  SIEVE_RETURN_IF_ERROR(Lost());
  return inner_->AvailableMemoryBytes();
}
absl::StatusOr<std::unique_ptr<BackendStream>> FaultBackend::CreateStream(
    const StreamOptions& options) {
  SIEVE_RETURN_IF_ERROR(Lost());
  return inner_->CreateStream(options);
}
int64_t FaultBackend::PageBoundsBytes(int32_t num_layers, const AttentionShape& shape) const {
  return inner_->PageBoundsBytes(num_layers, shape);
}
absl::Status FaultBackend::AllocatePageBounds(int32_t num_layers, const AttentionShape& shape) {
  SIEVE_RETURN_IF_ERROR(Lost());
  return inner_->AllocatePageBounds(num_layers, shape);
}
absl::Status FaultBackend::RebuildPageBounds(absl::Span<const int32_t> pages,
                                             const AttentionShape& shape) {
  SIEVE_RETURN_IF_ERROR(Lost());
  return inner_->RebuildPageBounds(pages, shape);
}
int64_t FaultBackend::DsLabelBytes(int32_t num_layers,
                                   const kernels::DoubleSparsityShape& shape) const {
  return inner_->DsLabelBytes(num_layers, shape);
}
absl::Status FaultBackend::AllocateDsLabels(int32_t num_layers,
                                            const kernels::DoubleSparsityShape& shape) {
  SIEVE_RETURN_IF_ERROR(Lost());
  return inner_->AllocateDsLabels(num_layers, shape);
}
absl::Status FaultBackend::SetDsChannels(int32_t layer, absl::Span<const int32_t> channels) {
  SIEVE_RETURN_IF_ERROR(Lost());
  return inner_->SetDsChannels(layer, channels);
}
absl::Status FaultBackend::RebuildDsLabels(absl::Span<const int32_t> pages) {
  SIEVE_RETURN_IF_ERROR(Lost());
  return inner_->RebuildDsLabels(pages);
}
bool FaultBackend::SupportsStepGraphs() const { return inner_->SupportsStepGraphs(); }
void FaultBackend::AbortGraphStep(BackendStream& stream) { inner_->AbortGraphStep(stream); }
StepGraphStats FaultBackend::GraphStats(const BackendStream& stream) const {
  return inner_->GraphStats(stream);
}

// --- Operators: each may get the injected fault ------------------------------------------------

absl::Status FaultBackend::BeginStep(BackendStream& stream, const BatchLayout& layout) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->BeginStep(stream, layout);
}
absl::Status FaultBackend::Embed(BackendStream& stream, absl::Span<const int32_t> tokens,
                                 const Tensor& table, Tensor out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->Embed(stream, tokens, table, out);
}
absl::Status FaultBackend::RmsNorm(BackendStream& stream, const Tensor& x, const Tensor& weight,
                                   float eps, Tensor out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->RmsNorm(stream, x, weight, eps, out);
}
absl::Status FaultBackend::AddRmsNorm(BackendStream& stream, const Tensor& x, Tensor residual,
                                      const Tensor& weight, float eps, Tensor out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->AddRmsNorm(stream, x, residual, weight, eps, out);
}
absl::Status FaultBackend::Linear(BackendStream& stream, const Tensor& x, const Tensor& weight,
                                  const Tensor& bias, Tensor out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->Linear(stream, x, weight, bias, out);
}
absl::Status FaultBackend::RopeAndCacheKv(BackendStream& stream, int32_t layer, const Tensor& qkv,
                                          const AttentionShape& shape, const RopeTables& rope,
                                          Tensor q_out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->RopeAndCacheKv(stream, layer, qkv, shape, rope, q_out);
}
absl::Status FaultBackend::Attention(BackendStream& stream, int32_t layer, const Tensor& q,
                                     const AttentionShape& shape, float scale,
                                     const AttentionPlan& plan, Tensor out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->Attention(stream, layer, q, shape, scale, plan, out);
}
absl::Status FaultBackend::XAttentionBlockMass(BackendStream& stream, int32_t layer,
                                               const Tensor& q, const AttentionShape& shape,
                                               const XAttentionEstimate& estimate,
                                               std::vector<float>& mass) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->XAttentionBlockMass(stream, layer, q, shape, estimate, mass);
}
absl::Status FaultBackend::XAttentionSelect(BackendStream& stream, int32_t layer, const Tensor& q,
                                            const AttentionShape& shape,
                                            const XAttentionEstimate& estimate,
                                            absl::Span<const double> thresholds,
                                            std::vector<int32_t>& row_start,
                                            std::vector<int32_t>& blocks) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->XAttentionSelect(stream, layer, q, shape, estimate, thresholds, row_start,
                                  blocks);
}
absl::Status FaultBackend::MInferenceIndex(BackendStream& stream, int32_t layer, const Tensor& q,
                                           const AttentionShape& shape,
                                           const MInferenceEstimate& estimate,
                                           kernels::minference::MInferencePlan& out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->MInferenceIndex(stream, layer, q, shape, estimate, out);
}
absl::Status FaultBackend::UpdatePageBounds(BackendStream& stream, int32_t layer,
                                            const AttentionShape& shape) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->UpdatePageBounds(stream, layer, shape);
}
absl::Status FaultBackend::PlanQuestPages(BackendStream& stream, int32_t layer, const Tensor& q,
                                          const AttentionShape& shape,
                                          const QuestPlanOptions& options, AttentionPlan& plan) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->PlanQuestPages(stream, layer, q, shape, options, plan);
}
absl::Status FaultBackend::UpdateDsLabels(BackendStream& stream, int32_t layer) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->UpdateDsLabels(stream, layer);
}
absl::Status FaultBackend::PlanDsTokens(BackendStream& stream, int32_t layer, const Tensor& q,
                                        const DsPlanOptions& options, AttentionPlan& plan) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->PlanDsTokens(stream, layer, q, options, plan);
}
absl::Status FaultBackend::SiluMul(BackendStream& stream, const Tensor& gate_up, Tensor out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->SiluMul(stream, gate_up, out);
}
absl::Status FaultBackend::GatherRows(BackendStream& stream, const Tensor& x,
                                      absl::Span<const int32_t> rows, Tensor out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->GatherRows(stream, x, rows, out);
}
absl::Status FaultBackend::CopyToHost(BackendStream& stream, const Tensor& x,
                                      absl::Span<float> out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->CopyToHost(stream, x, out);
}
absl::Status FaultBackend::Logits(BackendStream& stream, const Tensor& x, const Tensor& lm_head,
                                  absl::Span<float> host_out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->Logits(stream, x, lm_head, host_out);
}
absl::StatusOr<DeviceLogits> FaultBackend::LogitsOnDevice(BackendStream& stream, const Tensor& x,
                                                          const Tensor& lm_head) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->LogitsOnDevice(stream, x, lm_head);
}
absl::Status FaultBackend::CopyLogitsToHost(BackendStream& stream, const DeviceLogits& logits,
                                            absl::Span<float> host_out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->CopyLogitsToHost(stream, logits, host_out);
}
absl::Status FaultBackend::Sample(BackendStream& stream, const DeviceLogits& logits,
                                  absl::Span<const SampleRow> rows,
                                  absl::Span<absl::StatusOr<SampledToken>> out) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->Sample(stream, logits, rows, out);
}
absl::Status FaultBackend::Synchronize(BackendStream& stream) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->Synchronize(stream);
}
absl::StatusOr<StepGraphMode> FaultBackend::BeginGraphStep(BackendStream& stream,
                                                           const BatchLayout& layout,
                                                           absl::Span<const int32_t> tokens) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->BeginGraphStep(stream, layout, tokens);
}
absl::Status FaultBackend::GraphLogits(BackendStream& stream, const Tensor& x,
                                       const Tensor& lm_head) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->GraphLogits(stream, x, lm_head);
}
absl::Status FaultBackend::EndGraphStep(BackendStream& stream, absl::Span<float> host_logits) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->EndGraphStep(stream, host_logits);
}
absl::StatusOr<DeviceLogits> FaultBackend::EndGraphStepOnDevice(BackendStream& stream) {
  SIEVE_RETURN_IF_ERROR(Operator());
  return inner_->EndGraphStepOnDevice(stream);
}

std::shared_ptr<AsyncBackendControl> RegisterFaultBackend(const std::string& name,
                                                          BackendFactory inner) {
  auto control = std::make_shared<AsyncBackendControl>();
  RegisterBackend(name, [inner = std::move(inner), control](
                            int num_threads) -> absl::StatusOr<std::unique_ptr<Backend>> {
    SIEVE_ASSIGN_OR_RETURN(std::unique_ptr<Backend> b, inner(num_threads));
    return std::unique_ptr<Backend>(new FaultBackend(std::move(b), control));
  });
  return control;
}

}  // namespace sieve::engine::testing
