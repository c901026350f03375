// The CUDA backend's DoubleSparsity decode (SPARSE_ATTENTION.md section 4): the label cache on
// the device in the CPU's layout (kernels/sparse/double_sparsity.h), written by a kernel after
// RopeAndCacheKv on every append; the selection of a whole decode batch on the device
// (kernels/sparse/double_sparsity_cuda.h), copied back into the host plan as Quest's is; and
// plans with single columns run as per-row token lists through the split-KV decode kernel
// (PagedDecodeTokenRun). See cuda_backend.h.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/backends/cuda/cuda_backend.h"
#include "engine/backends/cuda/cuda_stream.h"
#include "engine/status_macros.h"
#include "kernels/attention/paged_decode.h"
#include "kernels/sparse/double_sparsity.h"
#include "kernels/sparse/double_sparsity_cuda.h"

namespace sieve::engine {

using bf16 = __nv_bfloat16;
using cuda_internal::Align256;
using cuda_internal::Cuda;
using cuda_internal::EnsureSparseBuffers;

// The device label cache: layer l's labels at labels + l * layer_bytes ([num_pages,
// DsLabelPageBytes]), its channels at channels + l * label_heads * shape.channels.
struct CudaDsLabels {
  kernels::DoubleSparsityShape shape;
  int32_t layers = 0;
  int64_t layer_bytes = 0;
  int64_t layer_channels = 0;
  uint8_t* labels = nullptr;
  int32_t* channels = nullptr;
  std::vector<char> channels_set;  // per layer

  ~CudaDsLabels() {
    cudaFree(labels);
    cudaFree(channels);
  }
  bool ready() const {
    return std::all_of(channels_set.begin(), channels_set.end(), [](char c) { return c != 0; });
  }
  uint8_t* layer_labels(int32_t l) const { return labels + l * layer_bytes; }
  const int32_t* layer_channels_ptr(int32_t l) const { return channels + l * layer_channels; }
};

int64_t CudaBackend::DsLabelBytes(int32_t num_layers,
                                  const kernels::DoubleSparsityShape& shape) const {
  return kernels::DsLabelPageBytes(shape) * num_layers;
}

absl::Status CudaBackend::AllocateDsLabels(int32_t num_layers,
                                           const kernels::DoubleSparsityShape& shape) {
  if (kv_ == nullptr || num_layers != num_layers_ || shape.num_q_heads != kv_shape_.num_q_heads ||
      shape.num_kv_heads != kv_shape_.num_kv_heads || shape.head_dim != kv_shape_.head_dim) {
    return absl::FailedPreconditionError(
        "cuda backend: allocate the KV cache (with the same layers and heads) before the "
        "DoubleSparsity labels");
  }
  if (ds_ != nullptr) {
    return absl::FailedPreconditionError("cuda backend: DoubleSparsity labels already allocated");
  }
  kernels::DoubleSparsityShape s = shape;
  s.page_size = page_size_;
  if (const std::string problem = kernels::DsValidateShape(s); !problem.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("DoubleSparsity labels: ", problem));
  }
  if (s.head_dim > 256 || s.num_q_heads / s.num_kv_heads > 32) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: DoubleSparsity supports head_dim up to 256 and groups up to 32, got "
        "head_dim ", s.head_dim, " and group ", s.num_q_heads / s.num_kv_heads));
  }
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  auto ds = std::make_shared<CudaDsLabels>();
  ds->shape = s;
  ds->layers = num_layers;
  ds->layer_bytes = int64_t{num_pages_} * kernels::DsLabelPageBytes(s);
  ds->layer_channels = int64_t{kernels::DsLabelHeads(s)} * s.channels;
  ds->channels_set.assign(num_layers, 0);
  const size_t label_bytes = static_cast<size_t>(ds->layer_bytes) * num_layers;
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(&ds->labels, label_bytes));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemset(ds->labels, 0, label_bytes));
  SIEVE_RETURN_IF_CUDA_ERROR(
      cudaMalloc(&ds->channels, static_cast<size_t>(ds->layer_channels) * num_layers * 4));
  // As AllocateKvCache: the zeroing must be complete before a non-blocking stream writes labels.
  SIEVE_RETURN_IF_CUDA_ERROR(cudaDeviceSynchronize());
  ds_ = std::move(ds);
  return absl::OkStatus();
}

absl::Status CudaBackend::SetDsChannels(int32_t layer, absl::Span<const int32_t> channels) {
  if (ds_ == nullptr) {
    return absl::FailedPreconditionError("cuda backend: no DoubleSparsity labels allocated");
  }
  if (layer < 0 || layer >= ds_->layers) {
    return absl::InvalidArgumentError(absl::StrCat("DoubleSparsity labels: no layer ", layer));
  }
  if (static_cast<int64_t>(channels.size()) != ds_->layer_channels) {
    return absl::InvalidArgumentError(absl::StrCat("DoubleSparsity labels: layer ", layer, " has ",
                                                   channels.size(), " channels, wants ",
                                                   ds_->layer_channels));
  }
  if (const std::string problem = kernels::DsValidateChannels(ds_->shape, channels.data());
      !problem.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("DoubleSparsity labels: layer ", layer, ": ", problem));
  }
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  // Synchronous (pageable source): start-up only, before any step reads the channels.
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpy(ds_->channels + layer * ds_->layer_channels,
                                        channels.data(), channels.size() * sizeof(int32_t),
                                        cudaMemcpyHostToDevice));
  ds_->channels_set[layer] = 1;
  return absl::OkStatus();
}

absl::Status CudaBackend::UpdateDsLabels(BackendStream& stream, int32_t layer) {
  CudaStream& s = Cuda(stream);
  if (s.layout == nullptr) return absl::InternalError("cuda backend: operator before BeginStep");
  if (ds_ == nullptr || layer < 0 || layer >= ds_->layers) {
    return absl::FailedPreconditionError(
        absl::StrCat("cuda backend: no DoubleSparsity labels for layer ", layer));
  }
  if (!ds_->ready()) return absl::OkStatus();  // a start-up calibration run: nothing to write
  kernels::DsLabelsUpdateGpu u;
  u.shape = ds_->shape;
  u.k_cache = static_cast<const bf16*>(kv_) + 2 * layer * kv_layer_elems_;
  u.labels = ds_->layer_labels(layer);
  u.slots = s.slots;
  u.num_tokens = s.layout->num_tokens();
  u.channels = ds_->layer_channels_ptr(layer);
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::DsWriteLabelsGpu(u, s.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::RebuildDsLabels(absl::Span<const int32_t> pages) {
  if (ds_ == nullptr) {
    return absl::FailedPreconditionError("cuda backend: no DoubleSparsity labels allocated");
  }
  for (const int32_t page : pages) {
    if (page < 0 || page >= num_pages_) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda backend: page ", page, " outside the pool of ", num_pages_));
    }
  }
  if (!ds_->ready() || pages.empty()) return absl::OkStatus();
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  std::vector<int64_t> slots;
  slots.reserve(pages.size() * page_size_);
  for (const int32_t page : pages) {
    for (int32_t i = 0; i < page_size_; ++i) slots.push_back(int64_t{page} * page_size_ + i);
  }
  // The caller's thread, waiting (as WriteKvPages): a stream of its own for the one call.
  int64_t* dev_slots = nullptr;
  cudaStream_t stream = nullptr;
  absl::Status st = [&]() -> absl::Status {
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(&dev_slots, slots.size() * sizeof(int64_t)));
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpy(dev_slots, slots.data(), slots.size() * sizeof(int64_t),
                                          cudaMemcpyHostToDevice));
    SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    for (int32_t l = 0; l < ds_->layers; ++l) {
      kernels::DsLabelsUpdateGpu u;
      u.shape = ds_->shape;
      u.k_cache = static_cast<const bf16*>(kv_) + 2 * l * kv_layer_elems_;
      u.labels = ds_->layer_labels(l);
      u.slots = dev_slots;
      u.num_tokens = static_cast<int32_t>(slots.size());
      u.channels = ds_->layer_channels_ptr(l);
      SIEVE_RETURN_IF_CUDA_ERROR(kernels::DsWriteLabelsGpu(u, stream));
    }
    SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
    return absl::OkStatus();
  }();
  if (stream != nullptr) cudaStreamDestroy(stream);
  cudaFree(dev_slots);
  return st;
}

absl::Status CudaBackend::PlanDsTokens(BackendStream& stream, int32_t layer, const Tensor& q,
                                       const DsPlanOptions& options, AttentionPlan& plan) {
  CudaStream& s = Cuda(stream);
  if (s.layout == nullptr) return absl::InternalError("cuda backend: operator before BeginStep");
  const BatchLayout& l = *s.layout;
  if (ds_ == nullptr || !ds_->ready() || layer < 0 || layer >= ds_->layers) {
    return absl::FailedPreconditionError(
        absl::StrCat("cuda backend: no calibrated DoubleSparsity labels for layer ", layer));
  }
  if (options.token_budget < 1) {
    return absl::InvalidArgumentError("cuda backend: DoubleSparsity needs a token budget >= 1");
  }
  if (s.graph != nullptr) {
    return absl::FailedPreconditionError(
        "cuda backend: DoubleSparsity selection waits for the stream and cannot run in a graph "
        "step");
  }
  const kernels::DoubleSparsityShape& shape = ds_->shape;
  const int32_t seqs = l.num_seqs(), hq = shape.num_q_heads, ps = page_size_;
  const int32_t k = options.token_budget;
  kernels::DsSelectGpuParams p;
  p.shape = shape;
  p.q = static_cast<const bf16*>(q.data);
  p.q_rows = s.query_start;  // each sequence's first (for decode: only) query
  p.labels = ds_->layer_labels(layer);
  p.channels = ds_->layer_channels_ptr(layer);
  p.page_table = s.page_table;
  p.kv_lens = s.kv_lens;
  p.page_table_stride = l.page_table_stride;
  p.num_seqs = seqs;
  p.token_budget = k;
  const int32_t per_seq = kernels::DsSelectRowsPerSeq(p);
  const size_t rows = static_cast<size_t>(seqs) * per_seq;
  const size_t ws = kernels::DsSelectWorkspaceBytes(p);
  const size_t out_ints = rows * k + rows;  // positions, then counts
  SIEVE_RETURN_IF_ERROR(
      EnsureSparseBuffers(s, ws + Align256(out_ints * sizeof(int32_t)), out_ints * sizeof(int32_t)));
  kernels::DsSelectGpuOutput out;
  out.positions = reinterpret_cast<int32_t*>(s.sparse_dev + ws);
  out.counts = out.positions + rows * k;
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::DsSelectGpu(p, out, s.sparse_dev, ws, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.sparse_host, out.positions,
                                             out_ints * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                             s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
  const int32_t* positions = reinterpret_cast<const int32_t*>(s.sparse_host);
  const int32_t* counts = positions + rows * k;
  const int32_t group = hq / shape.num_kv_heads;
  // As DsLabelStore::Plan: one-query sequences not marked dense list their selected tokens as
  // columns; every other sequence lists all of its pages.
  plan.dense = false;
  plan.query_block = 1;
  plan.key_block = ps;
  plan.query_block_start.assign(1, 0);
  plan.row_start.assign(1, 0);
  plan.column_start.assign(1, 0);
  plan.key_blocks.clear();
  plan.columns.clear();
  for (int32_t i = 0; i < seqs; ++i) {
    const int32_t q_len = l.query_start[i + 1] - l.query_start[i];
    plan.query_block_start.push_back(plan.query_block_start.back() + q_len);
    const bool sparse = q_len == 1 && (options.dense_sequences.empty() ||
                                       options.dense_sequences[i] == 0);
    const int32_t pages = (l.kv_lens[i] + ps - 1) / ps;
    for (int32_t j = 0; j < q_len; ++j) {
      for (int32_t h = 0; h < hq; ++h) {
        if (sparse) {
          const size_t r = static_cast<size_t>(i) * per_seq + (shape.shared_selection ? h / group : h);
          const int32_t* row = positions + r * k;
          plan.columns.insert(plan.columns.end(), row, row + counts[r]);
        } else {
          for (int32_t b = 0; b < pages; ++b) plan.key_blocks.push_back(b);
        }
        plan.row_start.push_back(static_cast<int32_t>(plan.key_blocks.size()));
        plan.column_start.push_back(static_cast<int32_t>(plan.columns.size()));
      }
    }
  }
  return absl::OkStatus();
}

// --- Decode over token lists ---------------------------------------------------------------------

namespace cuda_internal {

absl::Status TokenDecodeAttention(CudaStream& s, const AttentionPlan& plan,
                                  const kernels::PagedAttentionParams<bf16>& p, int num_sms) {
  const BatchLayout& l = *s.layout;
  if (plan.query_block != 1 || plan.key_block != p.page_size || s.max_q_len > 1) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: plans with single columns run in decode steps with query blocks of one "
        "token and key blocks of one page (DoubleSparsity's); this one has query blocks of ",
        plan.query_block, " and key blocks of ", plan.key_block, " (pages of ", p.page_size,
        ") in a step of up to ", s.max_q_len, " queries per sequence"));
  }
  const int32_t seqs = l.num_seqs(), hq = p.num_q_heads, group = hq / p.num_kv_heads;
  const int32_t ps = p.page_size;
  auto same_row = [&](int32_t a, int32_t b) {
    const int32_t ka = plan.row_start[a + 1] - plan.row_start[a];
    const int32_t ca = plan.column_start[a + 1] - plan.column_start[a];
    return ka == plan.row_start[b + 1] - plan.row_start[b] &&
           ca == plan.column_start[b + 1] - plan.column_start[b] &&
           std::equal(plan.key_blocks.begin() + plan.row_start[a],
                      plan.key_blocks.begin() + plan.row_start[a + 1],
                      plan.key_blocks.begin() + plan.row_start[b]) &&
           std::equal(plan.columns.begin() + plan.column_start[a],
                      plan.columns.begin() + plan.column_start[a + 1],
                      plan.columns.begin() + plan.column_start[b]);
  };
  // One list per KV head when every group's heads list the same tokens, else per query head.
  bool shared = group > 1;
  for (int32_t i = 0; shared && i < seqs * hq; i += group) {
    for (int32_t h = 1; shared && h < group; ++h) shared = same_row(i, i + h);
  }
  const int32_t per_block = shared ? group : 1, runs = hq / per_block;
  const size_t rows = static_cast<size_t>(seqs) * runs;
  // Tokens of a plan row: its pages' tokens (inside the context), then its columns.
  std::vector<int32_t> lens(rows, 0);
  int32_t stride = 1;
  for (size_t r = 0; r < rows; ++r) {
    const int32_t seq = static_cast<int32_t>(r / runs), kv = l.kv_lens[seq];
    const size_t pr = r * per_block;
    for (int32_t i = plan.row_start[pr]; i < plan.row_start[pr + 1]; ++i) {
      lens[r] += std::min(ps, kv - plan.key_blocks[i] * ps);
    }
    lens[r] += plan.column_start[pr + 1] - plan.column_start[pr];
    stride = std::max(stride, lens[r]);
  }
  kernels::PagedDecodeShape shape;
  shape.num_seqs = seqs;
  shape.num_q_heads = hq;
  shape.num_kv_heads = p.num_kv_heads;
  shape.head_dim = p.head_dim;
  shape.heads_per_block = per_block;
  shape.max_kv_len = stride;
  if (!kernels::PagedDecodeSupports(shape)) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: no sparse decode kernel for head_dim ", p.head_dim, " and group ", group));
  }
  const kernels::PagedDecodePlan dplan = kernels::Plan(shape, num_sms);
  if (dplan.num_splits <= 0) return absl::InternalError("cuda backend: no sparse decode plan");
  const size_t table_bytes = rows * stride * sizeof(int32_t), lens_bytes = rows * sizeof(int32_t);
  const size_t ws_off = Align256(table_bytes) + Align256(lens_bytes);
  SIEVE_RETURN_IF_ERROR(
      EnsureSparseBuffers(s, ws_off + dplan.workspace_bytes, table_bytes + lens_bytes));
  // The previous layer's copy out of the pinned buffer must be done before it is overwritten.
  SIEVE_RETURN_IF_CUDA_ERROR(cudaEventSynchronize(s.sparse_copied));
  int32_t* host_slots = reinterpret_cast<int32_t*>(s.sparse_host);
  for (size_t r = 0; r < rows; ++r) {
    const int32_t seq = static_cast<int32_t>(r / runs), kv = l.kv_lens[seq];
    const int32_t* table = l.page_table.data() + static_cast<size_t>(seq) * l.page_table_stride;
    const size_t pr = r * per_block;
    int32_t* out = host_slots + r * stride;
    for (int32_t i = plan.row_start[pr]; i < plan.row_start[pr + 1]; ++i) {
      const int32_t b = plan.key_blocks[i], base = table[b] * ps;
      for (int32_t t = 0; t < std::min(ps, kv - b * ps); ++t) *out++ = base + t;
    }
    for (int32_t i = plan.column_start[pr]; i < plan.column_start[pr + 1]; ++i) {
      const int32_t c = plan.columns[i];
      *out++ = table[c / ps] * ps + c % ps;
    }
    // Unused entries: any valid slot (the kernel reads them clamped, never uses them).
    std::fill(out, host_slots + (r + 1) * stride, 0);
  }
  SIEVE_ASSIGN_OR_RETURN(const int32_t* dev_lens, UploadDecodeTables(s, table_bytes, lens));
  kernels::PagedDecodeTokenLists t;
  t.slots = reinterpret_cast<const int32_t*>(s.sparse_dev);
  t.lens = dev_lens;
  t.stride = stride;
  t.heads_per_block = per_block;
  void* ws = dplan.workspace_bytes > 0 ? s.sparse_dev + ws_off : nullptr;
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::PagedDecodeTokenRun(p, dplan, t, ws, s.stream));
  return absl::OkStatus();
}

}  // namespace cuda_internal
}  // namespace sieve::engine
