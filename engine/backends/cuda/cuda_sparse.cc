// The CUDA backend's sparse decode: Quest page bounds and selection (kernels/sparse/quest_cuda.h)
// and sparse decode plans run through compacted page tables (PagedDecodeSparseRun,
// kernels/attention/paged_decode.h). See cuda_backend.h.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/backends/cuda/cuda_backend.h"
#include "engine/backends/cuda/cuda_stream.h"
#include "engine/status_macros.h"
#include "kernels/attention/paged_decode.h"
#include "kernels/attention/paged_prefill.h"
#include "kernels/sparse/quest_cuda.h"
#include "kernels/sparse/xattention_cuda.h"

namespace sieve::engine {

using bf16 = __nv_bfloat16;
using cuda_internal::Align256;
using cuda_internal::Cuda;
using cuda_internal::EnsureSparseBuffers;

namespace cuda_internal {

absl::Status EnsureSparseBuffers(CudaStream& s, size_t dev_bytes, size_t host_bytes) {
  if (s.sparse_copied == nullptr) {
    SIEVE_RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&s.sparse_copied, cudaEventDisableTiming));
  }
  if (dev_bytes > s.sparse_dev_bytes) {
    const size_t bytes = std::max(dev_bytes, 2 * s.sparse_dev_bytes);
    SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
    SIEVE_RETURN_IF_CUDA_ERROR(cudaFree(s.sparse_dev));
    s.sparse_dev = nullptr;
    s.sparse_dev_bytes = 0;
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(&s.sparse_dev, bytes));
    s.sparse_dev_bytes = bytes;
  }
  if (host_bytes > s.sparse_host_bytes) {
    const size_t bytes = std::max(host_bytes, 2 * s.sparse_host_bytes);
    SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
    SIEVE_RETURN_IF_CUDA_ERROR(cudaFreeHost(s.sparse_host));
    s.sparse_host = nullptr;
    s.sparse_host_bytes = 0;
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMallocHost(&s.sparse_host, bytes));
    s.sparse_host_bytes = bytes;
  }
  return absl::OkStatus();
}

absl::StatusOr<const int32_t*> UploadDecodeTables(CudaStream& s, size_t table_bytes,
                                                  const std::vector<int32_t>& lens) {
  const size_t lens_bytes = lens.size() * sizeof(int32_t);
  std::memcpy(s.sparse_host + table_bytes, lens.data(), lens_bytes);
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.sparse_dev, s.sparse_host, table_bytes,
                                             cudaMemcpyHostToDevice, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.sparse_dev + Align256(table_bytes),
                                             s.sparse_host + table_bytes, lens_bytes,
                                             cudaMemcpyHostToDevice, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaEventRecord(s.sparse_copied, s.stream));
  return reinterpret_cast<const int32_t*>(s.sparse_dev + Align256(table_bytes));
}

}  // namespace cuda_internal

// --- Quest page bounds ---------------------------------------------------------------------------

int64_t CudaBackend::PageBoundsBytes(int32_t num_layers, const AttentionShape& shape) const {
  return int64_t{2} * num_layers * shape.num_kv_heads * shape.head_dim *
         static_cast<int64_t>(sizeof(bf16));
}

absl::Status CudaBackend::AllocatePageBounds(int32_t num_layers, const AttentionShape& shape) {
  if (kv_ == nullptr || num_layers != num_layers_ ||
      shape.num_kv_heads != kv_shape_.num_kv_heads || shape.head_dim != kv_shape_.head_dim) {
    return absl::FailedPreconditionError(
        "cuda backend: allocate the KV cache (with the same layers and heads) before the page "
        "bounds");
  }
  if (page_bounds_ != nullptr) {
    return absl::FailedPreconditionError("cuda backend: page bounds already allocated");
  }
  if (shape.head_dim % 2 != 0) {
    return absl::InvalidArgumentError("cuda backend: Quest page bounds need an even head_dim");
  }
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  const int64_t layer_elems = int64_t{num_pages_} * shape.num_kv_heads * 2 * shape.head_dim;
  const size_t bytes = static_cast<size_t>(num_layers * layer_elems) * sizeof(bf16);
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(&page_bounds_, bytes));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemset(page_bounds_, 0, bytes));
  // As AllocateKvCache: the zeroing must be complete before a non-blocking stream writes bounds.
  SIEVE_RETURN_IF_CUDA_ERROR(cudaDeviceSynchronize());
  bounds_layer_elems_ = layer_elems;
  bounds_layers_ = num_layers;
  return absl::OkStatus();
}

absl::Status CudaBackend::UpdatePageBounds(BackendStream& stream, int32_t layer,
                                           const AttentionShape& a) {
  CudaStream& s = Cuda(stream);
  if (s.layout == nullptr) return absl::InternalError("cuda backend: operator before BeginStep");
  if (layer < 0 || layer >= bounds_layers_) {
    return absl::FailedPreconditionError(
        absl::StrCat("cuda backend: no page bounds for layer ", layer));
  }
  kernels::QuestBoundsUpdateGpu u;
  u.k_cache = static_cast<const bf16*>(kv_) + 2 * layer * kv_layer_elems_;
  u.bounds = static_cast<bf16*>(page_bounds_) + layer * bounds_layer_elems_;
  u.slots = s.slots;
  u.num_tokens = s.layout->num_tokens();
  u.num_kv_heads = a.num_kv_heads;
  u.head_dim = a.head_dim;
  u.page_size = page_size_;
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::QuestUpdateBoundsGpu(u, s.stream));
  return absl::OkStatus();
}

// --- Quest selection -----------------------------------------------------------------------------

namespace {

// The sparse decode kernel's shape for the rows of an on-device Quest plan.
kernels::PagedDecodeShape DevicePlanShape(const CudaStream& s, const AttentionShape& a) {
  kernels::PagedDecodeShape shape;
  shape.num_seqs = s.layout->num_seqs();
  shape.num_q_heads = a.num_q_heads;
  shape.num_kv_heads = a.num_kv_heads;
  shape.head_dim = a.head_dim;
  shape.heads_per_block = s.device_plan.heads_per_block;
  shape.max_kv_len = s.device_plan.max_kv_len;
  return shape;
}

// The selection of a decode step kept on the device: the selection kernel writes each row's page
// ids and token count (its `tables` and `lens` outputs) straight into the layout the sparse
// decode kernel reads, so nothing comes back to the host and nothing waits. Taken when every
// sequence decodes one query and every sequence asked to be dense fits the budget (its
// selection is then all of its pages, exactly dense); false (nothing enqueued) otherwise, and
// the caller builds the rows on the host. `ws`: the selection's workspace bytes; num_sms: the
// device's, for the decode plan.
absl::StatusOr<bool> QuestPlanOnDevice(CudaStream& s, int32_t layer, const AttentionShape& a,
                                       const Backend::QuestPlanOptions& options,
                                       const kernels::QuestSelectGpuParams& p, size_t ws,
                                       int num_sms, AttentionPlan& plan) {
  const BatchLayout& l = *s.layout;
  const int32_t seqs = l.num_seqs(), ps = p.page_size, k = options.page_budget;
  if (s.max_q_len != 1) return false;
  int32_t max_len = 0;
  int64_t pairs = 0;
  for (int32_t i = 0; i < seqs; ++i) {
    const int32_t kv = l.kv_lens[i], n = (kv + ps - 1) / ps;
    const bool dense = !options.dense_sequences.empty() && options.dense_sequences[i] != 0;
    if (dense && n > k) return false;
    // A row holds every token when the pages fit, else k - 1 whole pages and the last one.
    const int32_t tokens = n <= k ? kv : (k - 1) * ps + (kv - (n - 1) * ps);
    max_len = std::max(max_len, tokens);
    pairs += int64_t{tokens} * a.num_q_heads;
  }
  const int32_t per_seq = kernels::QuestSelectRowsPerSeq(p);
  const size_t rows = static_cast<size_t>(seqs) * per_seq;
  CudaStream::DevicePlan& d = s.device_plan;
  d.ready = false;
  d.prefill = false;
  d.layer = layer;
  d.stride = k;
  d.heads_per_block = a.num_q_heads / per_seq;
  d.max_kv_len = max_len;
  const kernels::PagedDecodeShape shape = DevicePlanShape(s, a);
  if (!kernels::PagedDecodeSupports(shape)) return false;  // the host path says why
  const kernels::PagedDecodePlan dplan = kernels::Plan(shape, num_sms);
  if (dplan.num_splits <= 0) return false;
  const size_t table_bytes = Align256(rows * k * sizeof(int32_t));
  const size_t selected = ws;
  d.tables = selected + table_bytes;
  d.lens = d.tables + table_bytes;
  d.workspace = d.lens + Align256(rows * sizeof(int32_t));
  SIEVE_RETURN_IF_ERROR(EnsureSparseBuffers(s, d.workspace + dplan.workspace_bytes, 0));
  kernels::QuestSelectGpuOutput out;
  out.selected = reinterpret_cast<int32_t*>(s.sparse_dev + selected);
  out.tables = reinterpret_cast<int32_t*>(s.sparse_dev + d.tables);
  out.lens = reinterpret_cast<int32_t*>(s.sparse_dev + d.lens);
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::QuestSelectGpu(p, out, s.sparse_dev, ws, s.stream));
  d.ready = true;
  plan.SetDense();
  plan.dense = false;
  plan.on_device = true;
  plan.on_device_pairs = pairs;
  plan.query_block = 1;
  plan.key_block = ps;
  plan.query_block_start.assign(l.query_start.begin(), l.query_start.end());
  return true;
}

}  // namespace

absl::Status CudaBackend::PlanQuestPages(BackendStream& stream, int32_t layer, const Tensor& q,
                                         const AttentionShape& a, const QuestPlanOptions& options,
                                         AttentionPlan& plan) {
  CudaStream& s = Cuda(stream);
  if (s.layout == nullptr) return absl::InternalError("cuda backend: operator before BeginStep");
  const BatchLayout& l = *s.layout;
  if (layer < 0 || layer >= bounds_layers_) {
    return absl::FailedPreconditionError(
        absl::StrCat("cuda backend: no page bounds for layer ", layer));
  }
  if (options.page_budget < 2) {
    return absl::InvalidArgumentError("cuda backend: Quest needs a page budget of at least 2");
  }
  if (s.graph != nullptr) {
    return absl::FailedPreconditionError(
        "cuda backend: Quest selection waits for the stream and cannot run in a graph step");
  }
  const int32_t seqs = l.num_seqs();
  kernels::QuestSelectGpuParams p;
  p.q = static_cast<const bf16*>(q.data);
  p.q_rows = s.query_start;  // each sequence's first (for decode: only) query
  p.bounds = static_cast<const bf16*>(page_bounds_) + layer * bounds_layer_elems_;
  p.page_table = s.page_table;
  p.kv_lens = s.kv_lens;
  p.page_table_stride = l.page_table_stride;
  p.num_seqs = seqs;
  p.num_q_heads = a.num_q_heads;
  p.num_kv_heads = a.num_kv_heads;
  p.head_dim = a.head_dim;
  p.page_size = page_size_;
  p.page_budget = options.page_budget;
  p.per_kv_head = options.per_kv_head;
  if ((a.head_dim != 64 && a.head_dim != 128) || a.num_q_heads / a.num_kv_heads > 32) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: Quest selection supports head_dim 64 or 128 and groups up to 32, got "
        "head_dim ", a.head_dim));
  }
  const int32_t per_seq = kernels::QuestSelectRowsPerSeq(p);
  const size_t rows = static_cast<size_t>(seqs) * per_seq;
  const size_t ws = kernels::QuestSelectWorkspaceBytes(p);
  if (!options.rows_on_host) {
    SIEVE_ASSIGN_OR_RETURN(const bool kept, QuestPlanOnDevice(s, layer, a, options, p, ws, num_sms_, plan));
    if (kept) return absl::OkStatus();
  }
  const size_t out_ints = rows * options.page_budget + rows;  // selected, then counts
  SIEVE_RETURN_IF_ERROR(
      EnsureSparseBuffers(s, ws + Align256(out_ints * sizeof(int32_t)), out_ints * sizeof(int32_t)));
  kernels::QuestSelectGpuOutput out;
  out.selected = reinterpret_cast<int32_t*>(s.sparse_dev + ws);
  out.counts = out.selected + rows * options.page_budget;
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::QuestSelectGpu(p, out, s.sparse_dev, ws, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.sparse_host, out.selected,
                                             out_ints * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                             s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
  const int32_t* selected = reinterpret_cast<const int32_t*>(s.sparse_host);
  const int32_t* counts = selected + rows * options.page_budget;
  const int32_t group = a.num_q_heads / a.num_kv_heads;
  plan.dense = false;
  plan.query_block = 1;
  plan.key_block = page_size_;
  plan.query_block_start.assign(l.query_start.begin(), l.query_start.end());
  plan.row_start.assign(1, 0);
  plan.key_blocks.clear();
  plan.column_start.clear();
  plan.columns.clear();
  for (int32_t i = 0; i < seqs; ++i) {
    const int32_t q_len = l.query_start[i + 1] - l.query_start[i];
    const bool dense = (!options.dense_sequences.empty() && options.dense_sequences[i] != 0) ||
                       q_len != 1;
    const int32_t pages = (l.kv_lens[i] + page_size_ - 1) / page_size_;
    for (int32_t j = 0; j < q_len; ++j) {
      for (int32_t h = 0; h < a.num_q_heads; ++h) {
        if (dense) {
          for (int32_t b = 0; b < pages; ++b) plan.key_blocks.push_back(b);
        } else {
          const size_t r = static_cast<size_t>(i) * per_seq + (options.per_kv_head ? h / group : h);
          const int32_t* row = selected + r * options.page_budget;
          plan.key_blocks.insert(plan.key_blocks.end(), row, row + counts[r]);
        }
        plan.row_start.push_back(static_cast<int32_t>(plan.key_blocks.size()));
      }
    }
  }
  return absl::OkStatus();
}

// --- XAttention estimator -----------------------------------------------------------------------

namespace {
// Where the bytes after XAttentionMassOnDevice's n masses start in sparse_dev.
size_t XAttentionExtraOffset(int64_t n) { return Align256(n * sizeof(float)); }
}  // namespace

absl::StatusOr<int64_t> CudaBackend::XAttentionMassOnDevice(CudaStream& s, int32_t layer,
                                                            const Tensor& q,
                                                            const AttentionShape& a,
                                                            const XAttentionEstimate& e,
                                                            size_t extra_dev, size_t host_bytes) {
  if (s.layout == nullptr) return absl::InternalError("cuda backend: operator before BeginStep");
  const BatchLayout& l = *s.layout;
  if (e.seq < 0 || e.seq >= l.num_seqs() || layer < 0 || layer >= num_layers_) {
    return absl::InternalError(absl::StrCat("cuda backend: bad XAttention estimate (sequence ",
                                            e.seq, ", layer ", layer, ")"));
  }
  if (s.graph != nullptr) {
    return absl::FailedPreconditionError("cuda backend: XAttention cannot run in a graph step");
  }
  kernels::XAttentionGpuParams p;
  p.q = static_cast<const bf16*>(q.data) + int64_t{l.query_start[e.seq]} * q.cols;
  p.q_row_stride = q.cols;
  p.k_cache = static_cast<const bf16*>(kv_) + 2 * layer * kv_layer_elems_;
  p.page_table = s.page_table + int64_t{e.seq} * l.page_table_stride;
  p.page_size = page_size_;
  p.num_q_heads = a.num_q_heads;
  p.num_kv_heads = a.num_kv_heads;
  p.head_dim = a.head_dim;
  p.q_len = l.query_start[e.seq + 1] - l.query_start[e.seq];
  p.kv_len = l.kv_lens[e.seq];
  p.stride = e.stride;
  p.block_size = e.block_size;
  if (!kernels::XAttentionGpuSupports(p)) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: no XAttention estimator for head_dim ", a.head_dim, ", stride ", e.stride,
        ", block_size ", e.block_size, " (head_dim 64 or 128, block_size / stride in {4, 8, 16, "
        "32})"));
  }
  const int64_t m0 = (p.kv_len - p.q_len) / p.block_size;
  const int64_t q_blocks = (p.kv_len - 1) / p.block_size - m0 + 1;
  const int64_t k_blocks = (p.kv_len + p.block_size - 1) / p.block_size;
  const int64_t n = a.num_q_heads * q_blocks * k_blocks;
  // The one-sweep estimate (each GEMM tile once) when its workspace (num_q_heads x query groups
  // x (key blocks + 1) floats: 67 MB for 32 heads at 32K tokens, 1 GB at 128K unchunked) stays
  // under kOneSweepWorkspaceCap; otherwise the two-sweep kernel, which needs none.
  // The one-sweep kernels passed kernels_xattention_gpu_test and agreed with the two-sweep
  // estimate to 1.5e-5 in xattention_prefill_gpu_bench on an H100 (2026-12-06), where the wgmma
  // one sweep took 30 ms at 128K against the two sweeps' 74 ms (bench/results/
  // 2026-12-06-sparse-gpu-h100.md): on Hopper the wgmma kernel, elsewhere the mma.sync one.
  constexpr size_t kOneSweepWorkspaceCap = size_t{256} << 20;
  const size_t ws = kernels::XAttentionGpuWorkspaceBytes(p);
  const bool one_sweep = ws > 0 && ws <= kOneSweepWorkspaceCap;
  // The masses, then one region that holds the workspace during the estimate and the caller's
  // `extra_dev` bytes after it (the same stream orders the two uses).
  const size_t region = std::max(one_sweep ? ws : 0, extra_dev);
  SIEVE_RETURN_IF_ERROR(EnsureSparseBuffers(s, XAttentionExtraOffset(n) + region,
                                            std::max(host_bytes, n * sizeof(float))));
  if (one_sweep) {
    p.workspace = reinterpret_cast<float*>(s.sparse_dev + XAttentionExtraOffset(n));
    p.wgmma = cc_major_ == 9;
    // Independent, banded GEMM tiles (xattention_cuda.h): 1.59x the row sweeps at 128K on an
    // H100, masses checked against the fp64 reference (chunks aligned and not) and the two-sweep
    // kernel (bench/results/2026-12-06-gpu-run-3-h100.md).
    p.independent_tiles = p.wgmma;
  }
  SIEVE_RETURN_IF_CUDA_ERROR(
      kernels::XAttentionBlockMassGpu(p, reinterpret_cast<float*>(s.sparse_dev), s.stream));
  return n;
}

absl::Status CudaBackend::XAttentionBlockMass(BackendStream& stream, int32_t layer,
                                              const Tensor& q, const AttentionShape& a,
                                              const XAttentionEstimate& e,
                                              std::vector<float>& mass) {
  CudaStream& s = Cuda(stream);
  // The masses copied back into the pinned buffer (which XAttentionMassOnDevice sized for them).
  SIEVE_ASSIGN_OR_RETURN(const int64_t n, XAttentionMassOnDevice(s, layer, q, a, e, 0, 0));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.sparse_host, s.sparse_dev, n * sizeof(float),
                                             cudaMemcpyDeviceToHost, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
  mass.resize(n);
  std::memcpy(mass.data(), s.sparse_host, n * sizeof(float));
  return absl::OkStatus();
}

absl::Status CudaBackend::XAttentionSelect(BackendStream& stream, int32_t layer, const Tensor& q,
                                           const AttentionShape& a, const XAttentionEstimate& e,
                                           absl::Span<const double> thresholds,
                                           std::vector<int32_t>& row_start,
                                           std::vector<int32_t>& blocks) {
  CudaStream& s = Cuda(stream);
  if (s.layout == nullptr) return absl::InternalError("cuda backend: operator before BeginStep");
  if (thresholds.size() != 1 && static_cast<int32_t>(thresholds.size()) != a.num_q_heads) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: XAttentionSelect takes 1 or ",
                                                   a.num_q_heads, " thresholds, got ",
                                                   thresholds.size()));
  }
  const BatchLayout& l = *s.layout;
  if (e.seq < 0 || e.seq >= l.num_seqs() || e.block_size <= 0) {
    return absl::InternalError("cuda backend: bad XAttention selection");
  }
  const int32_t kv_len = l.kv_lens[e.seq];
  const int32_t q_len = l.query_start[e.seq + 1] - l.query_start[e.seq];
  kernels::XAttentionSelectGpuParams sp;
  sp.num_q_heads = a.num_q_heads;
  sp.first_query_block = (kv_len - q_len) / e.block_size;
  sp.q_blocks = (kv_len - 1) / e.block_size - sp.first_query_block + 1;
  sp.k_blocks = (kv_len + e.block_size - 1) / e.block_size;
  sp.threshold = thresholds[0];
  if (sp.k_blocks > kernels::kXAttentionMaxSelectKeyBlocks) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: the device XAttention selection takes up to ",
        kernels::kXAttentionMaxSelectKeyBlocks, " key blocks, got ", sp.k_blocks));
  }
  const bool per_head = thresholds.size() > 1 &&
                        std::any_of(thresholds.begin(), thresholds.end(),
                                    [&](double t) { return t != thresholds[0]; });
  // After the masses: count [rows], blocks [n], row_start [rows + 1], key_blocks [n], then the
  // per-head thresholds.
  const int64_t rows = int64_t{sp.q_blocks} * sp.num_q_heads;
  const int64_t n = rows * sp.k_blocks;
  const size_t off_blocks = Align256(rows * sizeof(int32_t));
  const size_t off_rs = off_blocks + Align256(n * sizeof(int32_t));
  const size_t off_kb = off_rs + Align256((rows + 1) * sizeof(int32_t));
  const size_t off_thr = off_kb + Align256(n * sizeof(int32_t));
  const size_t extra = off_thr + a.num_q_heads * sizeof(double);
  const size_t host = std::max((rows + 1) * sizeof(int32_t), n * sizeof(int32_t));
  SIEVE_ASSIGN_OR_RETURN(const int64_t mass_n,
                         XAttentionMassOnDevice(s, layer, q, a, e, extra, host));
  if (mass_n != n) {
    return absl::InternalError(absl::StrCat("cuda backend: XAttention estimate of ", mass_n,
                                            " masses, selection of ", n));
  }
  char* base = s.sparse_dev + XAttentionExtraOffset(n);
  auto* count = reinterpret_cast<int32_t*>(base);
  auto* selected = reinterpret_cast<int32_t*>(base + off_blocks);
  auto* dev_rs = reinterpret_cast<int32_t*>(base + off_rs);
  auto* dev_kb = reinterpret_cast<int32_t*>(base + off_kb);
  if (per_head) {
    auto* dev_thr = reinterpret_cast<double*>(base + off_thr);
    // From pageable memory: returns once `thresholds` has been staged.
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(dev_thr, thresholds.data(),
                                               a.num_q_heads * sizeof(double),
                                               cudaMemcpyHostToDevice, s.stream));
    sp.head_thresholds = dev_thr;
  }
  const auto* mass = reinterpret_cast<const float*>(s.sparse_dev);
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::XAttentionSelectGpu(sp, mass, count, selected, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(
      kernels::XAttentionBuildIndexGpu(sp, count, selected, dev_rs, dev_kb, s.stream));
  // Two copies back: the row starts (whose last entry sizes the blocks), then the listed blocks.
  auto* host_ints = reinterpret_cast<int32_t*>(s.sparse_host);
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(host_ints, dev_rs, (rows + 1) * sizeof(int32_t),
                                             cudaMemcpyDeviceToHost, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
  row_start.assign(host_ints, host_ints + rows + 1);
  const int32_t total = row_start.back();
  if (total < 0 || total > n) {
    return absl::InternalError(absl::StrCat("cuda backend: XAttention index of ", total,
                                            " blocks for ", n, " candidates"));
  }
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(host_ints, dev_kb, total * sizeof(int32_t),
                                             cudaMemcpyDeviceToHost, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
  blocks.assign(host_ints, host_ints + total);
  return absl::OkStatus();
}

// --- Sparse decode attention ---------------------------------------------------------------------

namespace cuda_internal {
namespace {

// Block-sparse prefill: the plan's arrays to the device (an on-device plan's are there), then a
// prefill kernel sweeping only the listed key blocks (kernels/attention/paged_prefill.h): the
// wgmma kernel for key blocks of whole 128-key tiles (XAttention's 128 x 128 blocks), else the
// mma.sync kernel; MInference's plans (64-query blocks, 64-key blocks, single columns) through
// the latter's 64-query-row mode.
absl::Status SparsePrefillAttention(CudaStream& s, const AttentionPlan& plan,
                                    const kernels::PagedAttentionParams<bf16>& p, int num_sms) {
  const BatchLayout& l = *s.layout;
  // An on-device plan is MInference's (cuda_minference.cc), which may list single columns.
  const bool columns = plan.on_device ||
                       (!plan.column_start.empty() && plan.column_start.back() != 0);
  constexpr int32_t kQueryTile = 128, kKeyTile = 64;
  const bool vs = plan.query_block == kKeyTile && plan.key_block == kKeyTile;
  if ((!vs && (plan.query_block != kQueryTile || plan.key_block % kKeyTile != 0 || columns)) ||
      (p.page_size & (p.page_size - 1)) != 0) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: sparse prefill runs plans of 128-query blocks and key blocks of whole "
        "64-key tiles without single columns (XAttention with block_size 128), or of 64-query "
        "and 64-key blocks with single columns (MInference); this plan has "
        "query blocks of ", plan.query_block, ", key blocks of ", plan.key_block,
        columns ? " and single columns" : ""));
  }
  kernels::PagedPrefillShape shape;
  shape.num_seqs = l.num_seqs();
  shape.num_q_heads = p.num_q_heads;
  shape.num_kv_heads = p.num_kv_heads;
  shape.head_dim = p.head_dim;
  shape.max_q_len = s.max_q_len;
  if (!kernels::PagedPrefillSupports(shape)) {
    return absl::UnimplementedError(
        absl::StrCat("cuda backend: no sparse prefill kernel for head_dim ", p.head_dim));
  }
  const kernels::PagedPrefillPlan pplan =
      kernels::Plan(shape, num_sms,
                    !vs && plan.key_block % 128 == 0 ? kernels::PagedPrefillKernel::kWgmma
                                                     : kernels::PagedPrefillKernel::kMmaSync);
  kernels::SparseAttentionIndex idx;
  idx.query_block = plan.query_block;
  idx.key_block = plan.key_block;
  kernels::PagedAttentionParams<bf16> sp = p;
  sp.sparse = &idx;
  if (plan.on_device) {
    const auto& o = s.device_plan.index;
    const auto at = [&](size_t off) { return reinterpret_cast<const int32_t*>(s.index_dev + off); };
    idx.query_block_start = at(o.query_block_start);
    idx.row_start = at(o.row_start);
    idx.key_blocks = at(o.key_blocks);
    idx.column_start = at(o.column_start);
    idx.columns = at(o.columns);
    SIEVE_RETURN_IF_CUDA_ERROR(kernels::PagedPrefillRun(sp, pplan, nullptr, s.stream));
    return absl::OkStatus();
  }
  const size_t qbs = plan.query_block_start.size() * sizeof(int32_t);
  const size_t rs = plan.row_start.size() * sizeof(int32_t);
  const size_t kb = plan.key_blocks.size() * sizeof(int32_t);
  const size_t cs = columns ? plan.column_start.size() * sizeof(int32_t) : 0;
  const size_t cl = columns ? plan.columns.size() * sizeof(int32_t) : 0;
  const size_t off_rs = Align256(qbs), off_kb = off_rs + Align256(rs);
  const size_t off_cs = off_kb + Align256(kb), off_cl = off_cs + Align256(cs);
  const size_t bytes = columns ? off_cl + cl : off_kb + kb;
  SIEVE_RETURN_IF_ERROR(EnsureSparseBuffers(s, Align256(bytes), bytes));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaEventSynchronize(s.sparse_copied));
  std::memcpy(s.sparse_host, plan.query_block_start.data(), qbs);
  std::memcpy(s.sparse_host + off_rs, plan.row_start.data(), rs);
  if (kb > 0) std::memcpy(s.sparse_host + off_kb, plan.key_blocks.data(), kb);
  if (columns) {
    std::memcpy(s.sparse_host + off_cs, plan.column_start.data(), cs);
    std::memcpy(s.sparse_host + off_cl, plan.columns.data(), cl);
  }
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.sparse_dev, s.sparse_host, bytes,
                                             cudaMemcpyHostToDevice, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaEventRecord(s.sparse_copied, s.stream));
  idx.query_block_start = reinterpret_cast<const int32_t*>(s.sparse_dev);
  idx.row_start = reinterpret_cast<const int32_t*>(s.sparse_dev + off_rs);
  idx.key_blocks = reinterpret_cast<const int32_t*>(s.sparse_dev + off_kb);
  if (columns) {
    idx.column_start = reinterpret_cast<const int32_t*>(s.sparse_dev + off_cs);
    idx.columns = reinterpret_cast<const int32_t*>(s.sparse_dev + off_cl);
  }
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::PagedPrefillRun(sp, pplan, nullptr, s.stream));
  return absl::OkStatus();
}

}  // namespace

absl::Status SparseDecodeAttention(CudaStream& s, int32_t layer, const AttentionPlan& plan,
                                   const kernels::PagedAttentionParams<bf16>& p, int num_sms) {
  const BatchLayout& l = *s.layout;
  SIEVE_RETURN_IF_ERROR(plan.Validate(l, p.num_q_heads));
  if (plan.on_device) {
    CudaStream::DevicePlan& d = s.device_plan;
    if (!d.ready || d.layer != layer || d.prefill != (s.max_q_len > 1)) {
      return absl::InternalError(absl::StrCat(
          "cuda backend: an on-device plan runs in the Attention call of the layer whose "
          "PlanQuestPages or MInferenceIndex made it, in the same step (layer ", layer,
          ", plan of layer ", d.layer, d.ready ? "" : ", already run or none",
          d.prefill ? ", a prefill plan" : ", a decode plan", ")"));
    }
    d.ready = false;
    if (d.prefill) return SparsePrefillAttention(s, plan, p, num_sms);
    const kernels::PagedDecodeShape shape =
        DevicePlanShape(s, AttentionShape{p.num_q_heads, p.num_kv_heads, p.head_dim});
    const kernels::PagedDecodePlan dplan = kernels::Plan(shape, num_sms);
    if (dplan.num_splits <= 0 || d.workspace + dplan.workspace_bytes > s.sparse_dev_bytes) {
      return absl::InternalError("cuda backend: on-device plan's decode workspace changed");
    }
    kernels::PagedDecodeTables t;
    t.pages = reinterpret_cast<const int32_t*>(s.sparse_dev + d.tables);
    t.lens = reinterpret_cast<const int32_t*>(s.sparse_dev + d.lens);
    t.stride = d.stride;
    t.heads_per_block = d.heads_per_block;
    void* ws = dplan.workspace_bytes > 0 ? s.sparse_dev + d.workspace : nullptr;
    SIEVE_RETURN_IF_CUDA_ERROR(kernels::PagedDecodeSparseRun(p, dplan, t, ws, s.stream));
    return absl::OkStatus();
  }
  if (s.max_q_len > 1) return SparsePrefillAttention(s, plan, p, num_sms);
  const bool columns = !plan.column_start.empty() && plan.column_start.back() != 0;
  if (columns) return TokenDecodeAttention(s, plan, p, num_sms);  // cuda_double_sparsity.cc
  if (plan.query_block != 1 || plan.key_block != p.page_size) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: sparse decode runs plans of whole KV pages (Quest) or single columns "
        "(DoubleSparsity) only; this plan has query blocks of ", plan.query_block,
        ", key blocks of ", plan.key_block, " (pages of ", p.page_size, ")"));
  }
  const int32_t seqs = l.num_seqs(), hq = p.num_q_heads, group = hq / p.num_kv_heads;
  // One table per KV head when every group's heads list the same pages, else per query head.
  bool shared = group > 1;
  for (int32_t i = 0; shared && i < seqs * hq; i += group) {
    const auto first = plan.key_blocks.begin() + plan.row_start[i];
    const int32_t len = plan.row_start[i + 1] - plan.row_start[i];
    for (int32_t h = 1; shared && h < group; ++h) {
      shared = plan.row_start[i + h + 1] - plan.row_start[i + h] == len &&
               std::equal(first, first + len, plan.key_blocks.begin() + plan.row_start[i + h]);
    }
  }
  const int32_t per_block = shared ? group : 1, runs = hq / per_block;
  const size_t rows = static_cast<size_t>(seqs) * runs;
  int32_t stride = 1;
  for (size_t r = 0; r < rows; ++r) {
    const size_t pr = r * per_block;  // the plan row of its first head (row = seq * hq + head)
    stride = std::max(stride, plan.row_start[pr + 1] - plan.row_start[pr]);
  }
  // Host tables and lengths, then the same on the device with the decode workspace after them.
  std::vector<int32_t> lens(rows, 0);
  int32_t max_len = 0;
  const size_t table_bytes = rows * stride * sizeof(int32_t), lens_bytes = rows * sizeof(int32_t);
  kernels::PagedDecodeShape shape;
  shape.num_seqs = seqs;
  shape.num_q_heads = hq;
  shape.num_kv_heads = p.num_kv_heads;
  shape.head_dim = p.head_dim;
  shape.heads_per_block = per_block;
  for (size_t r = 0; r < rows; ++r) {
    const int32_t seq = static_cast<int32_t>(r / runs), kv = l.kv_lens[seq];
    const size_t pr = r * per_block;
    for (int32_t i = plan.row_start[pr]; i < plan.row_start[pr + 1]; ++i) {
      lens[r] += std::min(p.page_size, kv - plan.key_blocks[i] * p.page_size);
    }
    max_len = std::max(max_len, lens[r]);
  }
  shape.max_kv_len = max_len;
  if (!kernels::PagedDecodeSupports(shape)) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: no sparse decode kernel for head_dim ", p.head_dim, " and group ", group));
  }
  const kernels::PagedDecodePlan dplan = kernels::Plan(shape, num_sms);
  if (dplan.num_splits <= 0) return absl::InternalError("cuda backend: no sparse decode plan");
  const size_t ws_off = Align256(table_bytes) + Align256(lens_bytes);
  SIEVE_RETURN_IF_ERROR(
      EnsureSparseBuffers(s, ws_off + dplan.workspace_bytes, table_bytes + lens_bytes));
  // The previous layer's copy out of the pinned buffer must be done before it is overwritten.
  SIEVE_RETURN_IF_CUDA_ERROR(cudaEventSynchronize(s.sparse_copied));
  int32_t* host_tables = reinterpret_cast<int32_t*>(s.sparse_host);
  for (size_t r = 0; r < rows; ++r) {
    const int32_t seq = static_cast<int32_t>(r / runs);
    const int32_t* table = l.page_table.data() + static_cast<size_t>(seq) * l.page_table_stride;
    const size_t pr = r * per_block;
    int32_t* out = host_tables + r * stride;
    for (int32_t i = plan.row_start[pr]; i < plan.row_start[pr + 1]; ++i) {
      *out++ = table[plan.key_blocks[i]];
    }
    // Unused entries: any valid id (the kernel reads them clamped, never uses them).
    for (int32_t i = plan.row_start[pr + 1] - plan.row_start[pr]; i < stride; ++i) *out++ = 0;
  }
  SIEVE_ASSIGN_OR_RETURN(const int32_t* dev_lens, UploadDecodeTables(s, table_bytes, lens));
  kernels::PagedDecodeTables t;
  t.pages = reinterpret_cast<const int32_t*>(s.sparse_dev);
  t.lens = dev_lens;
  t.stride = stride;
  t.heads_per_block = per_block;
  void* ws = dplan.workspace_bytes > 0 ? s.sparse_dev + ws_off : nullptr;
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::PagedDecodeSparseRun(p, dplan, t, ws, s.stream));
  return absl::OkStatus();
}

}  // namespace cuda_internal
}  // namespace sieve::engine
