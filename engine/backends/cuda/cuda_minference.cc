// The CUDA backend's MInference index (see cuda_backend.h): the vertical-slash scores of one
// sequence on the device (kernels/sparse/minference_cuda.h), copied back through the stream's
// pinned sparse buffer, then the host's selection, section 1.6 conversion and plan assembly
// (kernels::minference::BuildPlanFromScores, threaded over heads). The plan then runs through
// the mma.sync prefill kernel's 64-query-row mode (cuda_sparse.cc, SparsePrefillAttention).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

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
