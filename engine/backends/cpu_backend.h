// The fp32 CPU backend (its KV cache fp32 or bfloat16): plain host memory, the Highway
// flash-style attention kernel (kernels/attention/paged_attention_cpu.h), linear layers on
// oneDNN's sgemm (kernels/cpu/gemm_cpu.h) and the other operators of kernels/cpu. Always built;
// it serves the embedded default model and is what every other backend is checked against.
#ifndef SIEVE_ENGINE_BACKENDS_CPU_BACKEND_H_
#define SIEVE_ENGINE_BACKENDS_CPU_BACKEND_H_

#include <cstdlib>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "engine/backends/backend.h"
#include "engine/model/kv_budget.h"
#include "kernels/cpu/half.h"
#include "kernels/cpu/lazy_zero_allocator.h"
#include "kernels/sparse/quest.h"

namespace sieve::engine {

using kernels::LazyZeroAllocator;  // KV pools: lazily resident, huge-page advised

class CpuBackend final : public Backend {
 public:
  // `num_threads` host threads for the heavy operators (0 = all hardware threads). `kv_dtype`:
  // the KV cache's element type (EngineConfig kv_cache.dtype): fp32, or bfloat16 (keys and
  // values rounded as they are written, widened to fp32 as attention and the Quest and
  // DoubleSparsity side data and the MInference and XAttention estimators read them: half the
  // KV bytes; widening is exact, so every estimate equals that of an fp32 cache holding the
  // rounded keys).
  // Quest page bounds (AllocatePageBounds) are bfloat16 by default (quest.h bf16_bounds, the
  // GPU's too: half the side pool's bytes and half of what selection reads). On a bfloat16 cache
  // they are exact (the keys are bfloat16 values, so the pages selected are those of fp32
  // bounds); on an fp32 cache the max is rounded up and the min down, so each bound stays a
  // bound, at most 2^-8 of each channel's magnitude looser (SPARSE_ATTENTION.md 3: the reference
  // keeps 16-bit metadata too). `bf16_page_bounds` false keeps them fp32 (benchmarks compare the
  // two: bench/model_bench --quest-bounds; tests of the exact fp32 recomputation).
  // `kv_layout` orders the rows of each KV page (kernels/attention/paged_attention.h): token-major
  // (dense decode reads a token's heads together; the fastest dense decode on the 8B shape) or
  // head-major (a KV head's rows of a page in one run: sparse decode, which reads a few pages per
  // KV head, reads runs instead of scattered rows; model_runner picks it with a sparse decode
  // method). Transfers use the token-major wire layout either way.
  explicit CpuBackend(int num_threads = 0, kernels::KvDtype kv_dtype = kernels::KvDtype::kFloat32,
                      bool bf16_page_bounds = true,
                      kernels::KvLayout kv_layout = kernels::KvLayout::kTokenMajor);
  kernels::KvDtype kv_dtype() const { return kv_dtype_; }
  // Whether the Quest page bounds are bfloat16 (quest.h bf16_bounds).
  bool page_bounds_bf16() const { return page_bounds_bf16_; }

  std::string_view name() const override { return "cpu"; }
  absl::StatusOr<Tensor> UploadWeight(absl::Span<const TensorView> parts, int64_t cols) override;
  absl::StatusOr<Tensor> Allocate(int64_t rows, int64_t cols) override;
  absl::Status AllocateKvCache(int32_t num_layers, int32_t num_pages, int32_t page_size,
                               const AttentionShape& shape) override;
  int64_t KvPageBytes(int32_t num_layers, int32_t page_size,
                      const AttentionShape& shape) const override;
  // The host's available memory (HostAvailableMemoryBytes).
  absl::StatusOr<int64_t> AvailableMemoryBytes() const override {
    return HostAvailableMemoryBytes();
  }
  absl::StatusOr<std::unique_ptr<BackendStream>> CreateStream(
      const StreamOptions& options) override;
  // memcpy of each layer's K and V rows of the page (in the cache's dtype).
  absl::Status ReadKvPages(absl::Span<const int32_t> pages, absl::Span<uint8_t> out) override;
  absl::Status WriteKvPages(absl::Span<const int32_t> pages,
                            absl::Span<const uint8_t> data) override;
  absl::Status BeginStep(BackendStream& stream, const BatchLayout& layout) override;
  absl::Status Embed(BackendStream& stream, absl::Span<const int32_t> tokens, const Tensor& table, Tensor out) override;
  absl::Status RmsNorm(BackendStream& stream, const Tensor& x, const Tensor& weight, float eps, Tensor out) override;
  absl::Status AddRmsNorm(BackendStream& stream, const Tensor& x, Tensor residual, const Tensor& weight, float eps,
                          Tensor out) override;
  absl::Status Linear(BackendStream& stream, const Tensor& x, const Tensor& weight, const Tensor& bias,
                      Tensor out) override;
  absl::Status RopeAndCacheKv(BackendStream& stream, int32_t layer, const Tensor& qkv, const AttentionShape& shape,
                              const RopeTables& rope, Tensor q_out) override;
  // Dense and sparse plans alike, with kernels::PagedAttentionCpu (fp32, online softmax); the
  // fp64 kernels::PagedAttentionRef stays the reference it is tested against.
  absl::Status Attention(BackendStream& stream, int32_t layer, const Tensor& q,
                         const AttentionShape& shape, float scale, const AttentionPlan& plan,
                         Tensor out) override;
  // kernels::minference::BuildPlan over the layer's paged keys (fp32 or 16-bit, widened; threaded).
  absl::Status MInferenceIndex(BackendStream& stream, int32_t layer, const Tensor& q,
                               const AttentionShape& shape, const MInferenceEstimate& estimate,
                               kernels::minference::MInferencePlan& out) override;
  // kernels::XAttentionBlockMassCpu over the layer's paged keys (fp32 or 16-bit, widened;
  // threaded).
  absl::Status XAttentionBlockMass(BackendStream& stream, int32_t layer, const Tensor& q,
                                   const AttentionShape& shape, const XAttentionEstimate& estimate,
                                   std::vector<float>& mass) override;
  int64_t PageBoundsBytes(int32_t num_layers, const AttentionShape& shape) const override;
  absl::Status AllocatePageBounds(int32_t num_layers, const AttentionShape& shape) override;
  absl::Status UpdatePageBounds(BackendStream& stream, int32_t layer,
                                const AttentionShape& shape) override;
  absl::Status RebuildPageBounds(absl::Span<const int32_t> pages,
                                 const AttentionShape& shape) override;
  absl::Status PlanQuestPages(BackendStream& stream, int32_t layer, const Tensor& q,
                              const AttentionShape& shape, const QuestPlanOptions& options,
                              AttentionPlan& plan) override;
  int64_t DsLabelBytes(int32_t num_layers, const kernels::DoubleSparsityShape& shape) const override;
  absl::Status AllocateDsLabels(int32_t num_layers,
                                const kernels::DoubleSparsityShape& shape) override;
  absl::Status SetDsChannels(int32_t layer, absl::Span<const int32_t> channels) override;
  absl::Status UpdateDsLabels(BackendStream& stream, int32_t layer) override;
  absl::Status RebuildDsLabels(absl::Span<const int32_t> pages) override;
  absl::Status PlanDsTokens(BackendStream& stream, int32_t layer, const Tensor& q,
                            const DsPlanOptions& options, AttentionPlan& plan) override;
  absl::Status SiluMul(BackendStream& stream, const Tensor& gate_up, Tensor out) override;
  absl::Status GatherRows(BackendStream& stream, const Tensor& x, absl::Span<const int32_t> rows, Tensor out) override;
  absl::Status CopyToHost(BackendStream& stream, const Tensor& x, absl::Span<float> out) override;
  absl::Status Logits(BackendStream& stream, const Tensor& x, const Tensor& lm_head,
                      absl::Span<float> host_out) override;
  // The logits live in the stream's host buffer; Sample runs SampleTokenWithUniform on each row
  // in the calling thread (the reference implementation of Backend::Sample).
  absl::StatusOr<DeviceLogits> LogitsOnDevice(BackendStream& stream, const Tensor& x,
                                              const Tensor& lm_head) override;
  absl::Status CopyLogitsToHost(BackendStream& stream, const DeviceLogits& logits,
                                absl::Span<float> host_out) override;
  absl::Status Sample(BackendStream& stream, const DeviceLogits& logits,
                      absl::Span<const SampleRow> rows,
                      absl::Span<absl::StatusOr<SampledToken>> out) override;

  // For tests: layer `layer`'s K (V) pool (fp32 caches; empty for bfloat16) and Quest page bounds
  // (empty when not allocated; bfloat16 pairs when page_bounds_bf16(): read a region with
  // kernels::QuestPageBounds).
  absl::Span<const float> k_cache(int32_t layer) const {
    if (kv_dtype_ != kernels::KvDtype::kFloat32) return {};
    return {reinterpret_cast<const float*>(k_cache_.at(layer).data()),
            k_cache_.at(layer).size() / sizeof(float)};
  }
  absl::Span<const float> v_cache(int32_t layer) const {
    if (kv_dtype_ != kernels::KvDtype::kFloat32) return {};
    return {reinterpret_cast<const float*>(v_cache_.at(layer).data()),
            v_cache_.at(layer).size() / sizeof(float)};
  }
  // For tests: layer `layer`'s K pool widened to fp32, whatever the cache's dtype.
  std::vector<float> KeysAsFloat(int32_t layer) const;
  const DsLabelStore* ds_labels() const { return ds_labels_.get(); }
  // How the KV pools order a page's rows (KeysAsFloat returns them so).
  kernels::KvLayout kv_layout() const { return kv_layout_; }
  absl::Span<const float> page_bounds(int32_t layer) const {
    return layer < static_cast<int32_t>(page_bounds_.size()) ? absl::Span<const float>(page_bounds_[layer])
                                                             : absl::Span<const float>();
  }

 private:
  float* NewBuffer(int64_t elements);

  int num_threads_;
  kernels::KvDtype kv_dtype_;
  std::vector<std::unique_ptr<float[]>> buffers_;  // every weight and activation buffer
  // KV pools per layer: num_pages pages of page_size * num_kv_heads * head_dim elements of
  // kv_dtype_, rows ordered as kv_layout_ says (see the constructor). Transfers (ReadKvPages /
  // WriteKvPages) use the token-major wire layout of backend.h.
  const kernels::KvLayout kv_layout_;
  std::vector<std::vector<uint8_t, LazyZeroAllocator<uint8_t>>> k_cache_, v_cache_;
  // Quest page bounds per layer, [num_pages, num_kv_heads, 2, head_dim] (max, then min) of fp32,
  // or of bfloat16 when page_bounds_bf16_ (half the floats, kernels::QuestRegionFloats).
  // Lazily resident and huge-page advised like the KV pools: selection reads a page's bounds
  // wherever the page sits in the pool (a TLB miss per page with 4 KiB pages).
  std::vector<std::vector<float, LazyZeroAllocator<float>>> page_bounds_;
  bool page_bounds_bf16_;
  // DoubleSparsity labels of every layer (null unless allocated).
  std::unique_ptr<DsLabelStore> ds_labels_;
  int32_t num_pages_ = 0;
  int32_t page_size_ = 0;
  int64_t kv_page_layer_elems_ = 0;  // page_size * num_kv_heads * head_dim
  int32_t kv_heads_ = 0, kv_head_dim_ = 0;
  // The layout of ReadKvPages / WriteKvPages data (backend.h), whatever the pools' layout.
  static constexpr kernels::KvLayout kWireLayout = kernels::KvLayout::kTokenMajor;
  // Copies one page's K or V rows of one layer (KvBlockBytes) from `src` laid out as src_layout
  // to `dst` laid out as dst_layout.
  void CopyKvBlock(const uint8_t* src, kernels::KvLayout src_layout, uint8_t* dst,
                   kernels::KvLayout dst_layout) const;
  // Points u at layer `layer`'s keys (k_cache or k_cache_bf16 by the cache's dtype).
  void SetKeys(int32_t layer, kernels::QuestBoundsUpdate& u) const;
  // Bytes of one layer's K (or V) rows of one page.
  size_t KvBlockBytes() const { return kv_page_layer_elems_ * kernels::KvDtypeBytes(kv_dtype_); }
  // Bytes of `pages` whole pages, K and V of every layer.
  size_t KvTransferBytes(size_t pages) const {
    return pages * 2 * k_cache_.size() * KvBlockBytes();
  }
  // Checks a transfer of `pages` over `bytes` bytes; returns the error or OK.
  absl::Status CheckKvTransfer(absl::Span<const int32_t> pages, size_t bytes) const;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_BACKENDS_CPU_BACKEND_H_
