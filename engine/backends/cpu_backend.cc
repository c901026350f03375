#include "engine/backends/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/cpu/gemm_cpu.h"
#include "kernels/cpu/half.h"
#include "kernels/cpu/ops.h"
#include "kernels/sparse/xattention.h"
#include "kernels/sparse/quest.h"

namespace sieve::engine {
namespace {

float* F(const Tensor& t) { return static_cast<float*>(t.data); }

// The CPU's stream runs operators inline; it only remembers the step's batch.
struct CpuStream final : BackendStream {
  const BatchLayout* layout = nullptr;
  std::vector<float> logits;  // LogitsOnDevice's output, [rows, vocab]
};

absl::StatusOr<const BatchLayout*> LayoutOf(BackendStream& stream) {
  const BatchLayout* l = static_cast<CpuStream&>(stream).layout;
  if (l == nullptr) return absl::InternalError("cpu backend: operator before BeginStep");
  return l;
}

absl::Status CheckShape(const Tensor& t, int64_t rows, int64_t cols, absl::string_view what) {
  if (t.data == nullptr || t.rows < rows || t.cols != cols) {
    return absl::InternalError(absl::StrCat("cpu backend: ", what, " is [", t.rows, ", ", t.cols,
                                            "], need [", rows, ", ", cols, "]"));
  }
  return absl::OkStatus();
}

}  // namespace

CpuBackend::CpuBackend(int num_threads, kernels::KvDtype kv_dtype, bool bf16_page_bounds,
                       kernels::KvLayout kv_layout)
    : num_threads_(num_threads),
      kv_dtype_(kv_dtype),
      kv_layout_(kv_layout),
      page_bounds_bf16_(bf16_page_bounds) {}

float* CpuBackend::NewBuffer(int64_t elements) {
  buffers_.push_back(std::make_unique<float[]>(static_cast<size_t>(elements)));
  return buffers_.back().get();
}

absl::StatusOr<Tensor> CpuBackend::UploadWeight(absl::Span<const TensorView> parts, int64_t cols) {
  int64_t total = 0;
  for (const TensorView& p : parts) {
    const int64_t n = p.numel();
    const bool matrix_ok = p.shape.size() == 2 && p.shape[1] == cols;
    if (n < 0 || !(p.shape.size() <= 1 || matrix_ok)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", p.name, "' cannot be used as rows of ", cols, " columns"));
    }
    total += n;
  }
  if (cols <= 0 || total % cols != 0) {
    return absl::InvalidArgumentError(absl::StrCat("weights of ", total,
                                                   " elements do not form rows of ", cols));
  }
  const int64_t rows = total / cols;
  float* data = NewBuffer(rows * cols);
  int64_t offset = 0;
  for (const TensorView& p : parts) {
    const int64_t n = p.numel();
    SIEVE_RETURN_IF_ERROR(CopyToFloat32(p, absl::MakeSpan(data + offset, n)));
    offset += n;
  }
  return Tensor{data, rows, cols};
}

absl::StatusOr<Tensor> CpuBackend::Allocate(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("cpu backend: bad buffer [", rows, ", ", cols, "]"));
  }
  return Tensor{NewBuffer(rows * cols), rows, cols};
}

int64_t CpuBackend::KvPageBytes(int32_t num_layers, int32_t page_size,
                                const AttentionShape& shape) const {
  return int64_t{2} * num_layers * page_size * shape.num_kv_heads * shape.head_dim *
         kernels::KvDtypeBytes(kv_dtype_);
}

absl::Status CpuBackend::AllocateKvCache(int32_t num_layers, int32_t num_pages, int32_t page_size,
                                         const AttentionShape& shape) {
  if (num_layers <= 0 || num_pages <= 0 || page_size <= 0) {
    return absl::InvalidArgumentError("cpu backend: KV cache needs layers, pages and page size > 0");
  }
  if (kv_dtype_ == kernels::KvDtype::kFloat16) {
    return absl::InvalidArgumentError("cpu backend: KV cache dtype float16 is not supported "
                                      "(float32 or bfloat16)");
  }
  const size_t per_layer = static_cast<size_t>(num_pages) * page_size * shape.num_kv_heads *
                           shape.head_dim * kernels::KvDtypeBytes(kv_dtype_);
  // Zero pages from calloc: resident only once written (LazyZeroAllocator).
  k_cache_.clear();
  v_cache_.clear();
  for (int32_t l = 0; l < num_layers; ++l) {
    k_cache_.emplace_back(per_layer);
    v_cache_.emplace_back(per_layer);
  }
  num_pages_ = num_pages;
  page_size_ = page_size;
  kv_page_layer_elems_ = int64_t{page_size} * shape.num_kv_heads * shape.head_dim;
  kv_heads_ = shape.num_kv_heads;
  kv_head_dim_ = shape.head_dim;
  return absl::OkStatus();
}

std::vector<float> CpuBackend::KeysAsFloat(int32_t layer) const {
  const auto& pool = k_cache_.at(layer);
  std::vector<float> out(pool.size() / kernels::KvDtypeBytes(kv_dtype_));
  if (kv_dtype_ == kernels::KvDtype::kFloat32) {
    std::memcpy(out.data(), pool.data(), pool.size());
  } else {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(pool.data());
    for (size_t i = 0; i < out.size(); ++i) out[i] = kernels::Bf16ToFloat(bits[i]);
  }
  return out;
}

void CpuBackend::SetKeys(int32_t layer, kernels::QuestBoundsUpdate& u) const {
  if (kv_dtype_ == kernels::KvDtype::kBfloat16) {
    u.k_cache_bf16 = reinterpret_cast<const uint16_t*>(k_cache_[layer].data());
  } else {
    u.k_cache = reinterpret_cast<const float*>(k_cache_[layer].data());
  }
}

absl::Status CpuBackend::CheckKvTransfer(absl::Span<const int32_t> pages, size_t bytes) const {
  const size_t page_bytes = KvTransferBytes(1);
  if (page_bytes == 0) return absl::FailedPreconditionError("cpu backend: no KV cache");
  if (bytes != pages.size() * page_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("cpu backend: a transfer of ", pages.size(),
                                                   " KV pages needs ", pages.size() * page_bytes,
                                                   " bytes, got ", bytes));
  }
  for (const int32_t p : pages) {
    if (p < 0 || p >= num_pages_) {
      return absl::InvalidArgumentError(
          absl::StrCat("cpu backend: KV page ", p, " outside the pool of ", num_pages_));
    }
  }
  return absl::OkStatus();
}

void CpuBackend::CopyKvBlock(const uint8_t* src, kernels::KvLayout src_layout, uint8_t* dst,
                             kernels::KvLayout dst_layout) const {
  if (src_layout == dst_layout) {
    std::memcpy(dst, src, KvBlockBytes());
    return;
  }
  const size_t elem = kernels::KvDtypeBytes(kv_dtype_);
  for (int32_t h = 0; h < kv_heads_; ++h) {
    for (int32_t slot = 0; slot < page_size_; ++slot) {
      auto at = [&](kernels::KvLayout l) {
        return static_cast<size_t>(
                   kernels::KvRowOffset(l, 0, slot, h, page_size_, kv_heads_, kv_head_dim_)) *
               elem;
      };
      std::memcpy(dst + at(dst_layout), src + at(src_layout), kv_head_dim_ * elem);
    }
  }
}

absl::Status CpuBackend::ReadKvPages(absl::Span<const int32_t> pages, absl::Span<uint8_t> out) {
  if (absl::Status st = CheckKvTransfer(pages, out.size()); !st.ok()) return st;
  const size_t block = KvBlockBytes();
  uint8_t* dst = out.data();
  for (const int32_t p : pages) {
    for (size_t l = 0; l < k_cache_.size(); ++l) {
      CopyKvBlock(k_cache_[l].data() + p * block, kv_layout_, dst, kWireLayout);
      CopyKvBlock(v_cache_[l].data() + p * block, kv_layout_, dst + block, kWireLayout);
      dst += 2 * block;
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::WriteKvPages(absl::Span<const int32_t> pages,
                                      absl::Span<const uint8_t> data) {
  if (absl::Status st = CheckKvTransfer(pages, data.size()); !st.ok()) return st;
  const size_t block = KvBlockBytes();
  const uint8_t* src = data.data();
  for (const int32_t p : pages) {
    for (size_t l = 0; l < k_cache_.size(); ++l) {
      CopyKvBlock(src, kWireLayout, k_cache_[l].data() + p * block, kv_layout_);
      CopyKvBlock(src + block, kWireLayout, v_cache_[l].data() + p * block, kv_layout_);
      src += 2 * block;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<BackendStream>> CpuBackend::CreateStream(const StreamOptions&) {
  return std::unique_ptr<BackendStream>(new CpuStream());
}

absl::Status CpuBackend::BeginStep(BackendStream& stream, const BatchLayout& layout) {
  if (layout.query_start.size() != layout.kv_lens.size() + 1 ||
      layout.slots.size() != layout.positions.size() ||
      layout.query_start.back() != layout.num_tokens()) {
    return absl::InternalError("cpu backend: inconsistent batch layout");
  }
  for (int64_t slot : layout.slots) {
    if (slot < 0 || slot >= int64_t{num_pages_} * page_size_) {
      return absl::InternalError(absl::StrCat("cpu backend: KV slot ", slot, " out of range"));
    }
  }
  static_cast<CpuStream&>(stream).layout = &layout;
  return absl::OkStatus();
}

absl::Status CpuBackend::Embed(BackendStream& stream, absl::Span<const int32_t> tokens, const Tensor& table, Tensor out) {
  SIEVE_RETURN_IF_ERROR(CheckShape(out, tokens.size(), table.cols, "embedding output"));
  for (size_t t = 0; t < tokens.size(); ++t) {
    if (tokens[t] < 0 || tokens[t] >= table.rows) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", tokens[t], " out of range"));
    }
    std::memcpy(F(out) + t * table.cols, F(table) + tokens[t] * table.cols,
                sizeof(float) * table.cols);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::RmsNorm(BackendStream& stream, const Tensor& x, const Tensor& weight, float eps, Tensor out) {
  SIEVE_RETURN_IF_ERROR(CheckShape(out, x.rows, x.cols, "norm output"));
  kernels::RmsNormRef(F(x), F(weight), x.rows, x.cols, eps, F(out));
  return absl::OkStatus();
}

absl::Status CpuBackend::AddRmsNorm(BackendStream& stream, const Tensor& x, Tensor residual, const Tensor& weight,
                                    float eps, Tensor out) {
  SIEVE_RETURN_IF_ERROR(CheckShape(residual, x.rows, x.cols, "residual"));
  SIEVE_RETURN_IF_ERROR(CheckShape(out, x.rows, x.cols, "norm output"));
  kernels::AddRmsNormRef(F(x), F(residual), F(weight), x.rows, x.cols, eps, F(out));
  return absl::OkStatus();
}

absl::Status CpuBackend::Linear(BackendStream& stream, const Tensor& x, const Tensor& weight, const Tensor& bias,
                                Tensor out) {
  if (x.cols != weight.cols) {
    return absl::InternalError(absl::StrCat("cpu backend: linear input has ", x.cols,
                                            " columns, weight expects ", weight.cols));
  }
  SIEVE_RETURN_IF_ERROR(CheckShape(out, x.rows, weight.rows, "linear output"));
  kernels::LinearCpu(F(x), F(weight), bias.empty() ? nullptr : F(bias), x.rows, x.cols,
                     weight.rows, F(out), num_threads_);
  return absl::OkStatus();
}

absl::Status CpuBackend::RopeAndCacheKv(BackendStream& stream, int32_t layer, const Tensor& qkv,
                                        const AttentionShape& s, const RopeTables& rope,
                                        Tensor q_out) {
  SIEVE_ASSIGN_OR_RETURN(const BatchLayout* layout, LayoutOf(stream));
  const int64_t d = s.head_dim, q_cols = s.num_q_heads * d, kv_cols = s.num_kv_heads * d;
  const int64_t n = layout->num_tokens();
  if (qkv.cols != q_cols + 2 * kv_cols || qkv.rows < n) {
    return absl::InternalError("cpu backend: qkv has the wrong shape");
  }
  SIEVE_RETURN_IF_ERROR(CheckShape(q_out, n, q_cols, "query output"));
  std::vector<float> k(n * kv_cols);
  for (int64_t t = 0; t < n; ++t) {
    const float* row = F(qkv) + t * qkv.cols;
    std::memcpy(F(q_out) + t * q_cols, row, sizeof(float) * q_cols);
    std::memcpy(k.data() + t * kv_cols, row + q_cols, sizeof(float) * kv_cols);
  }
  const int64_t half = static_cast<int64_t>(rope.inv_freq.size());
  kernels::RopeRef(F(q_out), layout->positions.data(), n, s.num_q_heads, d, rope.inv_freq.data(),
                   half, rope.attention_scaling);
  kernels::RopeRef(k.data(), layout->positions.data(), n, s.num_kv_heads, d,
                   rope.inv_freq.data(), half, rope.attention_scaling);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = layout->slots[t];
    const float* kt = k.data() + t * kv_cols;
    const float* vt = F(qkv) + t * qkv.cols + q_cols + kv_cols;
    for (int32_t h = 0; h < s.num_kv_heads; ++h) {
      const int64_t at = kernels::KvRowOffset(kv_layout_, slot / page_size_,
                                              static_cast<int32_t>(slot % page_size_), h,
                                              page_size_, s.num_kv_heads, static_cast<int32_t>(d));
      const float* kh = kt + h * d;
      const float* vh = vt + h * d;
      if (kv_dtype_ == kernels::KvDtype::kBfloat16) {  // rounded to nearest even
        uint16_t* kc = reinterpret_cast<uint16_t*>(k_cache_[layer].data()) + at;
        uint16_t* vc = reinterpret_cast<uint16_t*>(v_cache_[layer].data()) + at;
        for (int64_t i = 0; i < d; ++i) {
          kc[i] = kernels::FloatToBf16(kh[i]);
          vc[i] = kernels::FloatToBf16(vh[i]);
        }
        continue;
      }
      std::memcpy(reinterpret_cast<float*>(k_cache_[layer].data()) + at, kh, sizeof(float) * d);
      std::memcpy(reinterpret_cast<float*>(v_cache_[layer].data()) + at, vh, sizeof(float) * d);
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Attention(BackendStream& stream, int32_t layer, const Tensor& q,
                                   const AttentionShape& s, float scale,
                                   const AttentionPlan& plan, Tensor out) {
  SIEVE_ASSIGN_OR_RETURN(const BatchLayout* layout, LayoutOf(stream));
  SIEVE_RETURN_IF_ERROR(plan.Validate(*layout, s.num_q_heads));
  const kernels::SparseAttentionIndex index = plan.View();
  SIEVE_RETURN_IF_ERROR(CheckShape(out, layout->num_tokens(), q.cols, "attention output"));
  kernels::PagedAttentionParams<float> p;
  p.kv_layout = kv_layout_;
  p.q = F(q);
  p.out = F(out);
  p.page_table = layout->page_table.data();
  p.page_table_stride = layout->page_table_stride;
  p.kv_lens = layout->kv_lens.data();
  p.query_start = layout->query_start.data();
  p.num_seqs = layout->num_seqs();
  p.num_q_heads = s.num_q_heads;
  p.num_kv_heads = s.num_kv_heads;
  p.head_dim = s.head_dim;
  p.page_size = page_size_;
  p.scale = scale;
  p.sparse = plan.dense ? nullptr : &index;
  kernels::PagedAttentionCpu(
      p, kernels::PagedKvCache{k_cache_[layer].data(), v_cache_[layer].data(), kv_dtype_},
      num_threads_);
  return absl::OkStatus();
}

absl::Status CpuBackend::MInferenceIndex(BackendStream& stream, int32_t layer, const Tensor& q,
                                         const AttentionShape& s, const MInferenceEstimate& e,
                                         kernels::minference::MInferencePlan& out) {
  SIEVE_ASSIGN_OR_RETURN(const BatchLayout* layout, LayoutOf(stream));
  if (e.seq < 0 || e.seq >= layout->num_seqs() || layer < 0 ||
      layer >= static_cast<int32_t>(k_cache_.size()) ||
      static_cast<int32_t>(e.patterns.size()) != s.num_q_heads) {
    return absl::InternalError(absl::StrCat("cpu backend: bad MInference estimate (sequence ",
                                            e.seq, ", layer ", layer, ", ", e.patterns.size(),
                                            " patterns for ", s.num_q_heads, " heads)"));
  }
  SIEVE_RETURN_IF_ERROR(
      CheckShape(q, layout->num_tokens(), int64_t{s.num_q_heads} * s.head_dim, "queries"));
  const int32_t q_len = layout->query_start[e.seq + 1] - layout->query_start[e.seq];
  const int32_t kv_len = layout->kv_lens[e.seq];
  if (q_len < 1 || kv_len < q_len) {
    return absl::InternalError("cpu backend: MInference needs 1 <= q_len <= kv_len");
  }
  const int32_t query_start[2] = {0, q_len};
  kernels::PagedAttentionParams<float> p;
  p.kv_layout = kv_layout_;
  p.q = F(q) + int64_t{layout->query_start[e.seq]} * q.cols;
  p.k_cache = reinterpret_cast<const float*>(k_cache_[layer].data());  // of o.k_dtype
  p.page_table = layout->page_table.data() + int64_t{e.seq} * layout->page_table_stride;
  p.page_table_stride = layout->page_table_stride;
  p.kv_lens = &kv_len;
  p.query_start = query_start;
  p.num_seqs = 1;
  p.num_q_heads = s.num_q_heads;
  p.num_kv_heads = s.num_kv_heads;
  p.head_dim = s.head_dim;
  p.page_size = page_size_;
  p.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  kernels::minference::Options o;
  o.last_q = e.last_q;
  o.num_threads = num_threads_;
  o.k_dtype = kv_dtype_;
  kernels::minference::BuildPlan(p, e.patterns.data(), o, &out);
  return absl::OkStatus();
}

absl::Status CpuBackend::XAttentionBlockMass(BackendStream& stream, int32_t layer,
                                             const Tensor& q, const AttentionShape& s,
                                             const XAttentionEstimate& e,
                                             std::vector<float>& mass) {
  SIEVE_ASSIGN_OR_RETURN(const BatchLayout* layout, LayoutOf(stream));
  if (e.seq < 0 || e.seq >= layout->num_seqs() || e.stride <= 0 || e.block_size <= 0 ||
      e.block_size % e.stride != 0 || layer < 0 || layer >= static_cast<int32_t>(k_cache_.size())) {
    return absl::InternalError(absl::StrCat("cpu backend: bad XAttention estimate (sequence ",
                                            e.seq, ", stride ", e.stride, ", block ",
                                            e.block_size, ", layer ", layer, ")"));
  }
  SIEVE_RETURN_IF_ERROR(
      CheckShape(q, layout->num_tokens(), int64_t{s.num_q_heads} * s.head_dim, "queries"));
  kernels::XAttentionParams p;
  p.kv_layout = kv_layout_;
  p.q = F(q) + int64_t{layout->query_start[e.seq]} * q.cols;
  p.q_row_stride = q.cols;
  p.k_cache = k_cache_[layer].data();
  p.k_dtype = kv_dtype_;
  p.page_table = layout->page_table.data() + int64_t{e.seq} * layout->page_table_stride;
  p.page_size = page_size_;
  p.num_q_heads = s.num_q_heads;
  p.num_kv_heads = s.num_kv_heads;
  p.head_dim = s.head_dim;
  p.q_len = layout->query_start[e.seq + 1] - layout->query_start[e.seq];
  p.kv_len = layout->kv_lens[e.seq];
  p.stride = e.stride;
  p.block_size = e.block_size;
  if (p.q_len < 1 || p.kv_len < p.q_len) {
    return absl::InternalError("cpu backend: XAttention needs 1 <= q_len <= kv_len");
  }
  mass.resize(static_cast<size_t>(int64_t{p.num_q_heads} * kernels::XAttentionQueryBlocks(p) *
                                  kernels::XAttentionKeyBlocks(p)));
  kernels::XAttentionBlockMassCpu(p, mass.data(), num_threads_);
  return absl::OkStatus();
}

int64_t CpuBackend::PageBoundsBytes(int32_t num_layers, const AttentionShape& shape) const {
  return int64_t{num_layers} * shape.num_kv_heads *
         kernels::QuestRegionFloats(shape.head_dim, page_bounds_bf16_) *
         static_cast<int64_t>(sizeof(float));
}

absl::Status CpuBackend::AllocatePageBounds(int32_t num_layers, const AttentionShape& shape) {
  if (num_pages_ <= 0 || num_layers != static_cast<int32_t>(k_cache_.size())) {
    return absl::FailedPreconditionError(
        "cpu backend: allocate the KV cache (with the same layers) before the page bounds");
  }
  // One buffer per layer, each resized in place: lazily resident (a copy of a zeroed vector
  // would write every page).
  const size_t floats = static_cast<size_t>(num_pages_) * shape.num_kv_heads *
                        kernels::QuestRegionFloats(shape.head_dim, page_bounds_bf16_);
  page_bounds_.clear();
  page_bounds_.resize(num_layers);
  for (auto& layer_bounds : page_bounds_) layer_bounds.resize(floats);
  return absl::OkStatus();
}

absl::Status CpuBackend::UpdatePageBounds(BackendStream& stream, int32_t layer,
                                          const AttentionShape& s) {
  SIEVE_ASSIGN_OR_RETURN(const BatchLayout* layout, LayoutOf(stream));
  if (layer < 0 || layer >= static_cast<int32_t>(page_bounds_.size())) {
    return absl::FailedPreconditionError(
        absl::StrCat("cpu backend: no page bounds for layer ", layer));
  }
  kernels::QuestBoundsUpdate u;
  u.kv_layout = kv_layout_;
  SetKeys(layer, u);
  u.bounds = page_bounds_[layer].data();
  u.bf16_bounds = page_bounds_bf16_;
  u.slots = layout->slots.data();
  u.num_tokens = layout->num_tokens();
  u.num_kv_heads = s.num_kv_heads;
  u.head_dim = s.head_dim;
  u.page_size = page_size_;
  kernels::QuestUpdateBounds(u);
  return absl::OkStatus();
}

absl::Status CpuBackend::RebuildPageBounds(absl::Span<const int32_t> pages,
                                           const AttentionShape& s) {
  if (page_bounds_.size() != k_cache_.size()) {
    return absl::FailedPreconditionError("cpu backend: no page bounds allocated");
  }
  if (absl::Status st = CheckKvTransfer(pages, KvTransferBytes(pages.size())); !st.ok()) {
    return st;
  }
  // Every slot of each page in order: offset 0 resets the page, the rest widen it.
  std::vector<int64_t> slots;
  slots.reserve(pages.size() * page_size_);
  for (const int32_t p : pages) {
    for (int32_t o = 0; o < page_size_; ++o) slots.push_back(int64_t{p} * page_size_ + o);
  }
  for (size_t l = 0; l < page_bounds_.size(); ++l) {
    kernels::QuestBoundsUpdate u;
    u.kv_layout = kv_layout_;
    SetKeys(static_cast<int32_t>(l), u);
    u.bounds = page_bounds_[l].data();
    u.bf16_bounds = page_bounds_bf16_;
    u.slots = slots.data();
    u.num_tokens = static_cast<int32_t>(slots.size());
    u.num_kv_heads = s.num_kv_heads;
    u.head_dim = s.head_dim;
    u.page_size = page_size_;
    kernels::QuestUpdateBounds(u);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::PlanQuestPages(BackendStream& stream, int32_t layer, const Tensor& q,
                                        const AttentionShape& s, const QuestPlanOptions& options,
                                        AttentionPlan& plan) {
  SIEVE_ASSIGN_OR_RETURN(const BatchLayout* layout, LayoutOf(stream));
  if (layer < 0 || layer >= static_cast<int32_t>(page_bounds_.size())) {
    return absl::FailedPreconditionError(
        absl::StrCat("cpu backend: no page bounds for layer ", layer));
  }
  if (options.page_budget < 2) {
    return absl::InvalidArgumentError("cpu backend: Quest needs a page budget of at least 2");
  }
  const int32_t seqs = layout->num_seqs();
  const int64_t d = s.head_dim, q_cols = int64_t{s.num_q_heads} * d;
  // The sequences that select: one query, no dense override; compact copies of their rows.
  std::vector<int32_t> pick, kv_lens, table;
  std::vector<float> queries;
  for (int32_t i = 0; i < seqs; ++i) {
    const bool dense = !options.dense_sequences.empty() && options.dense_sequences[i] != 0;
    if (dense || layout->query_start[i + 1] - layout->query_start[i] != 1) continue;
    pick.push_back(i);
    kv_lens.push_back(layout->kv_lens[i]);
    const int32_t* row = layout->page_table.data() + int64_t{i} * layout->page_table_stride;
    table.insert(table.end(), row, row + layout->page_table_stride);
    const float* qi = F(q) + int64_t{layout->query_start[i]} * q_cols;
    queries.insert(queries.end(), qi, qi + q_cols);
  }
  kernels::QuestSelection sel;
  if (!pick.empty()) {
    kernels::QuestSelectParams p;
    p.q = queries.data();
    p.bounds = page_bounds_[layer].data();
    p.bf16_bounds = page_bounds_bf16_;
    p.page_table = table.data();
    p.kv_lens = kv_lens.data();
    p.page_table_stride = layout->page_table_stride;
    p.num_seqs = static_cast<int32_t>(pick.size());
    p.num_q_heads = s.num_q_heads;
    p.num_kv_heads = s.num_kv_heads;
    p.head_dim = s.head_dim;
    p.page_size = page_size_;
    p.page_budget = options.page_budget;
    p.per_kv_head = options.per_kv_head;
    kernels::QuestSelectCpu(p, sel, num_threads_);
  }
  plan.dense = false;
  plan.query_block = 1;
  plan.key_block = page_size_;
  plan.query_block_start.assign(layout->query_start.begin(), layout->query_start.end());
  plan.row_start.assign(1, 0);
  plan.key_blocks.clear();
  plan.column_start.clear();
  plan.columns.clear();
  size_t next = 0;  // index into pick
  for (int32_t i = 0; i < seqs; ++i) {
    const int32_t q_len = layout->query_start[i + 1] - layout->query_start[i];
    const bool selected = next < pick.size() && pick[next] == i;
    const int32_t pages = (layout->kv_lens[i] + page_size_ - 1) / page_size_;
    for (int32_t j = 0; j < q_len; ++j) {
      for (int32_t h = 0; h < s.num_q_heads; ++h) {
        if (selected) {
          const size_t r = next * s.num_q_heads + h;
          plan.key_blocks.insert(plan.key_blocks.end(), sel.key_blocks.begin() + sel.row_start[r],
                                 sel.key_blocks.begin() + sel.row_start[r + 1]);
        } else {
          for (int32_t b = 0; b < pages; ++b) plan.key_blocks.push_back(b);
        }
        plan.row_start.push_back(static_cast<int32_t>(plan.key_blocks.size()));
      }
    }
    if (selected) ++next;
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::SiluMul(BackendStream& stream, const Tensor& gate_up, Tensor out) {
  SIEVE_RETURN_IF_ERROR(CheckShape(out, gate_up.rows, gate_up.cols / 2, "activation output"));
  kernels::SiluMulRef(F(gate_up), gate_up.rows, gate_up.cols / 2, F(out));
  return absl::OkStatus();
}

absl::Status CpuBackend::GatherRows(BackendStream& stream, const Tensor& x, absl::Span<const int32_t> rows, Tensor out) {
  SIEVE_RETURN_IF_ERROR(CheckShape(out, rows.size(), x.cols, "gather output"));
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] < 0 || rows[i] >= x.rows) return absl::InternalError("gather row out of range");
    std::memcpy(F(out) + i * x.cols, F(x) + rows[i] * x.cols, sizeof(float) * x.cols);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::CopyToHost(BackendStream& stream, const Tensor& x, absl::Span<float> out) {
  if (static_cast<int64_t>(out.size()) != x.rows * x.cols) {
    return absl::InternalError("cpu backend: host buffer size mismatch");
  }
  std::memcpy(out.data(), x.data, sizeof(float) * out.size());
  return absl::OkStatus();
}

absl::Status CpuBackend::Logits(BackendStream& stream, const Tensor& x, const Tensor& lm_head,
                                absl::Span<float> host_out) {
  if (x.data == nullptr || lm_head.data == nullptr || x.cols != lm_head.cols) {
    return absl::InternalError(absl::StrCat("cpu backend: logits input has ", x.cols,
                                            " columns, lm_head expects ", lm_head.cols));
  }
  if (static_cast<int64_t>(host_out.size()) != x.rows * lm_head.rows) {
    return absl::InternalError("cpu backend: logits buffer size mismatch");
  }
  kernels::LinearCpu(F(x), F(lm_head), nullptr, x.rows, x.cols, lm_head.rows, host_out.data(),
                     num_threads_);
  return absl::OkStatus();
}

absl::StatusOr<DeviceLogits> CpuBackend::LogitsOnDevice(BackendStream& stream, const Tensor& x,
                                                        const Tensor& lm_head) {
  std::vector<float>& buffer = static_cast<CpuStream&>(stream).logits;
  buffer.resize(static_cast<size_t>(x.rows * lm_head.rows));
  SIEVE_RETURN_IF_ERROR(Logits(stream, x, lm_head, absl::MakeSpan(buffer)));
  return DeviceLogits{buffer.data(), x.rows, lm_head.rows};
}

absl::Status CpuBackend::CopyLogitsToHost(BackendStream&, const DeviceLogits& logits,
                                          absl::Span<float> host_out) {
  if (logits.vocab <= 0 || host_out.size() % logits.vocab != 0 ||
      static_cast<int64_t>(host_out.size()) > logits.rows * logits.vocab) {
    return absl::InternalError(absl::StrCat("cpu backend: ", host_out.size(),
                                            " logits asked of ", logits.rows, " rows of ",
                                            logits.vocab));
  }
  std::copy_n(logits.data, host_out.size(), host_out.data());
  return absl::OkStatus();
}

absl::Status CpuBackend::Sample(BackendStream&, const DeviceLogits& logits,
                                absl::Span<const SampleRow> rows,
                                absl::Span<absl::StatusOr<SampledToken>> out) {
  if (rows.size() != out.size() || static_cast<int64_t>(rows.size()) > logits.rows ||
      (!rows.empty() && logits.data == nullptr)) {
    return absl::InternalError(absl::StrCat("cpu backend: ", rows.size(), " rows to sample into ",
                                            out.size(), " results from ", logits.rows,
                                            " rows of logits"));
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i].params == nullptr || rows[i].history == nullptr) {
      out[i] = absl::InternalError("cpu backend: a row to sample has no parameters or history");
      continue;
    }
    absl::Span<float> row(logits.data + static_cast<int64_t>(i) * logits.vocab,
                          static_cast<size_t>(logits.vocab));
    out[i] = SampleTokenWithUniform(row, *rows[i].params, *rows[i].history, rows[i].uniform);
  }
  return absl::OkStatus();
}

int64_t CpuBackend::DsLabelBytes(int32_t num_layers,
                                 const kernels::DoubleSparsityShape& shape) const {
  return DsLabelStore::BytesPerPage(shape, num_layers);
}

absl::Status CpuBackend::AllocateDsLabels(int32_t num_layers,
                                          const kernels::DoubleSparsityShape& shape) {
  if (num_pages_ <= 0 || num_layers != static_cast<int32_t>(k_cache_.size())) {
    return absl::FailedPreconditionError(
        "cpu backend: allocate the KV cache (with the same layers) before the labels");
  }
  kernels::DoubleSparsityShape s = shape;
  s.page_size = page_size_;
  SIEVE_ASSIGN_OR_RETURN(ds_labels_, DsLabelStore::Create(s, num_layers, num_pages_));
  return absl::OkStatus();
}

absl::Status CpuBackend::SetDsChannels(int32_t layer, absl::Span<const int32_t> channels) {
  if (ds_labels_ == nullptr) {
    return absl::FailedPreconditionError("cpu backend: no DoubleSparsity labels allocated");
  }
  return ds_labels_->SetChannels(layer, channels);
}

absl::Status CpuBackend::UpdateDsLabels(BackendStream& stream, int32_t layer) {
  SIEVE_ASSIGN_OR_RETURN(const BatchLayout* layout, LayoutOf(stream));
  if (ds_labels_ == nullptr || layer < 0 || layer >= static_cast<int32_t>(k_cache_.size())) {
    return absl::FailedPreconditionError(
        absl::StrCat("cpu backend: no DoubleSparsity labels for layer ", layer));
  }
  if (ds_labels_->ready()) ds_labels_->Append(layer, *layout, k_cache_[layer].data(), kv_dtype_, 1, kv_layout_);
  return absl::OkStatus();
}

absl::Status CpuBackend::RebuildDsLabels(absl::Span<const int32_t> pages) {
  if (ds_labels_ == nullptr) {
    return absl::FailedPreconditionError("cpu backend: no DoubleSparsity labels allocated");
  }
  if (absl::Status st = CheckKvTransfer(pages, KvTransferBytes(pages.size())); !st.ok()) {
    return st;
  }
  if (!ds_labels_->ready()) return absl::OkStatus();
  for (size_t l = 0; l < k_cache_.size(); ++l) {
    ds_labels_->AppendPages(static_cast<int32_t>(l), pages, k_cache_[l].data(), kv_dtype_,
                            num_threads_, kv_layout_);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::PlanDsTokens(BackendStream& stream, int32_t layer, const Tensor& q,
                                      const DsPlanOptions& options, AttentionPlan& plan) {
  SIEVE_ASSIGN_OR_RETURN(const BatchLayout* layout, LayoutOf(stream));
  if (ds_labels_ == nullptr || !ds_labels_->ready() || layer < 0 ||
      layer >= static_cast<int32_t>(k_cache_.size())) {
    return absl::FailedPreconditionError(
        absl::StrCat("cpu backend: no calibrated DoubleSparsity labels for layer ", layer));
  }
  if (options.token_budget < 1) {
    return absl::InvalidArgumentError("cpu backend: DoubleSparsity needs a token budget >= 1");
  }
  ds_labels_->Plan(layer, *layout, F(q), options, plan, num_threads_);
  return absl::OkStatus();
}

}  // namespace sieve::engine
