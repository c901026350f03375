// The CUDA backend's MInference index (see cuda_backend.h): the vertical-slash scores of one
// sequence on the device (kernels/sparse/minference_cuda.h), then the selection, section 1.6
// conversion and plan assembly on the device too (MInferenceIndexCountGpu / FillGpu), only the
// plan copied back (CudaBackendOptions::minference_index_on_device), or, when the caller asks
// for it (MInferenceEstimate::device_plan) and the sequence is the step's only one, kept on the
// device as an on_device plan with its pair count; otherwise, or for more than
// kMInferenceIndexMaxHeads heads, the scores are copied back and the host builds the plan
// (kernels::minference::BuildPlanFromScores, threaded over heads). The plan then runs through
// the mma.sync prefill kernel's 64-query-row mode (cuda_sparse.cc, SparsePrefillAttention).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/backends/cuda/cuda_backend.h"
#include "engine/backends/cuda/cuda_stream.h"
#include "engine/status_macros.h"
#include "kernels/sparse/minference.h"
#include "kernels/sparse/minference_cuda.h"

namespace sieve::engine {

using bf16 = __nv_bfloat16;
using cuda_internal::Align256;
using cuda_internal::Cuda;
namespace mi = kernels::minference;

namespace {

// The index built on the device (minference_cuda.h, MInferenceIndexCountGpu / FillGpu): the
// scores stay there, the selection and the section 1.6 rows are made there (their two totals
// come back first, to size the arrays). Then either the plan comes back into `out`, or (`dp`
// non-null) it stays in index_dev as an on-device plan for the next Attention of `layer`: only
// the pairs it reads (MInferencePlanPairsGpu) come back, for the max_density check.
absl::Status IndexOnDevice(CudaStream& s, int32_t layer, const kernels::MInferenceVsGpuParams& p,
                           const MInferenceEstimate& e, mi::MInferencePlan& out,
                           AttentionPlan* dp) {
  kernels::MInferenceIndexGpuParams ip;
  ip.num_heads = p.num_q_heads;
  ip.q_len = p.q_len;
  ip.kv_len = p.kv_len;
  for (int32_t h = 0; h < p.num_q_heads; ++h) {
    ip.pattern[h] = e.patterns[h].pattern == mi::Pattern::kAShape ? 1 : 0;
    ip.vertical_size[h] = e.patterns[h].vertical_size;
    ip.slash_size[h] = e.patterns[h].slash_size;
  }
  const size_t n = static_cast<size_t>(p.num_q_heads) * p.kv_len;
  const int32_t qblocks = (p.q_len + mi::kBlock - 1) / mi::kBlock;
  const size_t rows = static_cast<size_t>(qblocks) * p.num_q_heads;
  // Device: vertical, slash | the estimator's workspace, then the index's | row starts | column
  // starts. Host (pinned): the two totals, the on-device plan's query_block_start, the pairs.
  const size_t scores = Align256(2 * n * sizeof(float));
  const size_t starts = Align256((rows + 1) * sizeof(int32_t));
  const size_t ws = std::max(kernels::MInferenceVsGpuWorkspaceBytes(p),
                             kernels::MInferenceIndexGpuWorkspaceBytes(ip));
  SIEVE_RETURN_IF_ERROR(
      cuda_internal::EnsureSparseBuffers(s, scores + Align256(ws) + 2 * starts, 256));
  float* dev = reinterpret_cast<float*>(s.sparse_dev);
  char* ws_dev = s.sparse_dev + scores;
  int32_t* row_start = reinterpret_cast<int32_t*>(ws_dev + Align256(ws));
  int32_t* column_start = reinterpret_cast<int32_t*>(ws_dev + Align256(ws) + starts);
  ip.vertical = dev;
  ip.slash = dev + n;
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::MInferenceVsScoresGpu(p, dev, dev + n, ws_dev, ws, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(
      kernels::MInferenceIndexCountGpu(ip, ws_dev, ws, row_start, column_start, s.stream));
  // The previous copy out of the pinned buffer (a sparse plan's upload) must be done first.
  SIEVE_RETURN_IF_CUDA_ERROR(cudaEventSynchronize(s.sparse_copied));
  int32_t* totals = reinterpret_cast<int32_t*>(s.sparse_host);
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(totals, row_start + rows, sizeof(int32_t),
                                             cudaMemcpyDeviceToHost, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(totals + 1, column_start + rows, sizeof(int32_t),
                                             cudaMemcpyDeviceToHost, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
  const size_t nb = static_cast<size_t>(totals[0]), nc = static_cast<size_t>(totals[1]);
  // index_dev: [query_block_start | row starts | column starts] (an on-device plan's) | key
  // blocks | columns | pairs.
  CudaStream::DevicePlan& d = s.device_plan;
  d.ready = false;
  const size_t off_rs = Align256(2 * sizeof(int32_t));
  const size_t off_kb = dp != nullptr ? off_rs + 2 * starts : 0;
  const size_t off_cl = off_kb + Align256(nb * sizeof(int32_t));
  const size_t off_pairs = off_cl + Align256(nc * sizeof(int32_t));
  const size_t need = off_pairs + sizeof(unsigned long long);
  if (need > s.index_dev_bytes) {  // the stream is idle: the copies above waited for it
    const size_t bytes = std::max(need, 2 * s.index_dev_bytes);
    SIEVE_RETURN_IF_CUDA_ERROR(cudaFree(s.index_dev));
    s.index_dev = nullptr;
    s.index_dev_bytes = 0;
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(&s.index_dev, bytes));
    s.index_dev_bytes = bytes;
  }
  int32_t* key_blocks = reinterpret_cast<int32_t*>(s.index_dev + off_kb);
  int32_t* columns = reinterpret_cast<int32_t*>(s.index_dev + off_cl);
  if (dp != nullptr) {  // the starts move beside the lists, out of the scratch others reuse
    d.index.query_block_start = 0;
    d.index.row_start = off_rs;
    d.index.column_start = off_rs + starts;
    d.index.key_blocks = off_kb;
    d.index.columns = off_cl;
    totals[2] = 0;
    totals[3] = qblocks;
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.index_dev, totals + 2, 2 * sizeof(int32_t),
                                               cudaMemcpyHostToDevice, s.stream));
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.index_dev + d.index.row_start, row_start,
                                               (rows + 1) * sizeof(int32_t),
                                               cudaMemcpyDeviceToDevice, s.stream));
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.index_dev + d.index.column_start, column_start,
                                               (rows + 1) * sizeof(int32_t),
                                               cudaMemcpyDeviceToDevice, s.stream));
    row_start = reinterpret_cast<int32_t*>(s.index_dev + d.index.row_start);
    column_start = reinterpret_cast<int32_t*>(s.index_dev + d.index.column_start);
  }
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::MInferenceIndexFillGpu(ip, ws_dev, row_start, column_start,
                                                             key_blocks, columns, s.stream));
  if (dp != nullptr) {
    auto* pairs = reinterpret_cast<unsigned long long*>(s.index_dev + off_pairs);
    SIEVE_RETURN_IF_CUDA_ERROR(kernels::MInferencePlanPairsGpu(ip, row_start, key_blocks,
                                                               column_start, columns, pairs,
                                                               s.stream));
    auto* host_pairs = reinterpret_cast<unsigned long long*>(s.sparse_host + 16);
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(host_pairs, pairs, sizeof(*host_pairs),
                                               cudaMemcpyDeviceToHost, s.stream));
    SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
    d.ready = true;
    d.prefill = true;
    d.layer = layer;
    dp->SetDense();
    dp->dense = false;
    dp->on_device = true;
    dp->on_device_pairs = static_cast<int64_t>(*host_pairs);
    dp->query_block = mi::kBlock;
    dp->key_block = mi::kBlock;
    dp->query_block_start.assign({0, qblocks});
    return absl::OkStatus();
  }
  out.query_block_start = {0, qblocks};
  out.row_start.resize(rows + 1);
  out.column_start.resize(rows + 1);
  out.key_blocks.resize(nb);
  out.columns.resize(nc);
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(out.row_start.data(), row_start,
                                             (rows + 1) * sizeof(int32_t),
                                             cudaMemcpyDeviceToHost, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(out.column_start.data(), column_start,
                                             (rows + 1) * sizeof(int32_t),
                                             cudaMemcpyDeviceToHost, s.stream));
  if (nb > 0) {
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(out.key_blocks.data(), key_blocks,
                                               nb * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                               s.stream));
  }
  if (nc > 0) {
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(out.columns.data(), columns, nc * sizeof(int32_t),
                                               cudaMemcpyDeviceToHost, s.stream));
  }
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
  return absl::OkStatus();
}

}  // namespace

absl::Status CudaBackend::MInferenceIndex(BackendStream& stream, int32_t layer, const Tensor& q,
                                          const AttentionShape& a, const MInferenceEstimate& e,
                                          mi::MInferencePlan& out) {
  CudaStream& s = Cuda(stream);
  if (s.layout == nullptr) return absl::InternalError("cuda backend: operator before BeginStep");
  const BatchLayout& l = *s.layout;
  if (e.seq < 0 || e.seq >= l.num_seqs() || layer < 0 || layer >= num_layers_ ||
      static_cast<int32_t>(e.patterns.size()) != a.num_q_heads) {
    return absl::InternalError(absl::StrCat("cuda backend: bad MInference estimate (sequence ",
                                            e.seq, ", layer ", layer, ", ", e.patterns.size(),
                                            " patterns for ", a.num_q_heads, " heads)"));
  }
  if (s.graph != nullptr) {
    return absl::FailedPreconditionError("cuda backend: MInference cannot run in a graph step");
  }
  SIEVE_RETURN_IF_ERROR(cuda_internal::CheckShape(q, l.num_tokens(),
                                                  int64_t{a.num_q_heads} * a.head_dim, "queries"));
  const int32_t q_len = l.query_start[e.seq + 1] - l.query_start[e.seq];
  const int32_t kv_len = l.kv_lens[e.seq];
  if (q_len < 1 || kv_len < q_len) {
    return absl::InternalError("cuda backend: MInference needs 1 <= q_len <= kv_len");
  }
  bool any_vs = false;
  for (const mi::HeadPattern& h : e.patterns) {
    if (h.pattern == mi::Pattern::kBlockSparse) {
      return absl::UnimplementedError(
          "cuda backend: MInference block-sparse heads (pattern block_sparse in "
          "attention.prefill.minference.pattern_file) have no GPU estimator; use "
          "vertical_and_slash or stream_llm heads, or the cpu backend");
    }
    any_vs = any_vs || h.pattern == mi::Pattern::kVerticalSlash;
  }
  const size_t n = static_cast<size_t>(a.num_q_heads) * kv_len;
  const float* vertical = nullptr;
  const float* slash = nullptr;
  if (any_vs) {
    kernels::MInferenceVsGpuParams p;
    p.q = static_cast<const bf16*>(q.data) + int64_t{l.query_start[e.seq]} * q.cols;
    p.q_row_stride = q.cols;
    p.k_cache = static_cast<const bf16*>(kv_) + 2 * layer * kv_layer_elems_;
    p.page_table = s.page_table + int64_t{e.seq} * l.page_table_stride;
    p.page_size = page_size_;
    p.num_q_heads = a.num_q_heads;
    p.num_kv_heads = a.num_kv_heads;
    p.head_dim = a.head_dim;
    p.q_len = q_len;
    p.kv_len = kv_len;
    p.last_q = e.last_q;
    p.scale = 1.0f / std::sqrt(static_cast<float>(a.head_dim));
    if (!kernels::MInferenceVsGpuSupports(p)) {
      return absl::UnimplementedError(absl::StrCat(
          "cuda backend: no MInference estimator for head_dim ", a.head_dim, " and last_q ",
          e.last_q, " (head_dim 64 or 128, last_q 1..64)"));
    }
    if (options_.minference_index_on_device &&
        a.num_q_heads <= kernels::kMInferenceIndexMaxHeads) {
      return IndexOnDevice(s, layer, p, e, out, l.num_seqs() == 1 ? e.device_plan : nullptr);
    }
    // Device: vertical, slash, then the estimator's workspace; host: vertical, slash.
    const size_t scores = 2 * n * sizeof(float);
    const size_t ws = kernels::MInferenceVsGpuWorkspaceBytes(p);
    SIEVE_RETURN_IF_ERROR(cuda_internal::EnsureSparseBuffers(s, Align256(scores) + ws, scores));
    float* dev = reinterpret_cast<float*>(s.sparse_dev);
    SIEVE_RETURN_IF_CUDA_ERROR(kernels::MInferenceVsScoresGpu(
        p, dev, dev + n, s.sparse_dev + Align256(scores), ws, s.stream));
    // The previous copy out of the pinned buffer (a sparse plan's upload) must be done first.
    SIEVE_RETURN_IF_CUDA_ERROR(cudaEventSynchronize(s.sparse_copied));
    SIEVE_RETURN_IF_CUDA_ERROR(
        cudaMemcpyAsync(s.sparse_host, dev, scores, cudaMemcpyDeviceToHost, s.stream));
    SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
    vertical = reinterpret_cast<const float*>(s.sparse_host);
    slash = vertical + n;
  }
  const int32_t query_start[2] = {0, q_len};
  kernels::PagedAttentionParams<float> lp;  // lengths and heads only
  lp.kv_lens = &kv_len;
  lp.query_start = query_start;
  lp.num_seqs = 1;
  lp.num_q_heads = a.num_q_heads;
  lp.num_kv_heads = a.num_kv_heads;
  lp.head_dim = a.head_dim;
  lp.page_size = page_size_;
  mi::Options o;
  o.last_q = e.last_q;
  if (!mi::BuildPlanFromScores(lp, e.patterns.data(), vertical, slash, o, &out)) {
    return absl::InternalError("cuda backend: MInference plan from scores refused");
  }
  return absl::OkStatus();
}

}  // namespace sieve::engine
