// MInference's vertical-slash estimate on the GPU (SPARSE_ATTENTION.md section 1.4; the scores,
// selection and plan are specified in kernels/sparse/minference.h): per query head, the last
// min(last_q, q_len) queries of one sequence's chunk scored against all kv_len keys of the paged
// bf16 K cache, a causal fp32 softmax per row, and the probabilities summed per key column
// (vertical[j]) and per diagonal offset (slash[delta], delta = position - j): the values of
// VsScoresRef / VsScoresCpu on the same bf16 inputs, in fp32.
//
// How it runs (CUDA cores, fp32 FMAs, deterministic: no atomics):
//   1. one thread block per (64-key tile, query head): the <= 64 query rows and the tile's keys
//      transposed into shared memory as fp32, each thread a 4 x 4 block of logits; per row the
//      tile's max and sum of exp(z - max) written to the workspace;
//   2. one block per head combines a row's tile partials (fixed order) into its max M and sum L;
//   3. the tiles again: p = exp(z - M) * (1 / L) into shared memory, each of the tile's 64
//      columns summed over the rows (vertical, written directly: a tile owns its columns) and
//      each of its 127 local diagonals summed (a partial per tile in the workspace);
//   4. slash[delta] = the sum of the (at most two) tiles' partials that hold diagonal delta, in
//      tile order.
// Selection (top-k with forced entries, section 1.4 steps 1, 3-5) and the conversion into the
// kernel's plan stay on the host (BuildPlanFromScores in minference.h), like XAttention's
// engine path.
//
// Supported: head_dim 64 or 128, num_q_heads a multiple of num_kv_heads, 1 <= q_len <= kv_len.
// Never allocates, never synchronizes.
#ifndef SIEVE_KERNELS_SPARSE_MINFERENCE_CUDA_H_
#define SIEVE_KERNELS_SPARSE_MINFERENCE_CUDA_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace sieve::kernels {

// One sequence's estimate (device pointers).
struct MInferenceVsGpuParams {
  const __nv_bfloat16* q = nullptr;  // query j of the chunk, head h: q + j * q_row_stride + h * d
  int64_t q_row_stride = 0;
  const __nv_bfloat16* k_cache = nullptr;  // [num_pages, page_size, num_kv_heads, head_dim]
  const int32_t* page_table = nullptr;     // this sequence's page ids
  int32_t page_size = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t q_len = 0;   // the chunk's queries (its last positions: kv_len - q_len + j)
  int32_t kv_len = 0;  // >= q_len
  int32_t last_q = 64; // queries the estimate uses (1..64; the chunk's last min(last_q, q_len))
  float scale = 0.0f;  // softmax scale; 0: 1 / sqrt(head_dim)
};

// True when the kernels handle these shapes (see the file comment).
bool MInferenceVsGpuSupports(const MInferenceVsGpuParams& p);

// Device scratch the estimate needs: num_q_heads x (tiles x 64 x 2 + 64 x 2 + tiles x 128)
// floats, tiles = ceil(kv_len / 64) (67 MB for 32 heads at 128K tokens); 0 if unsupported.
size_t MInferenceVsGpuWorkspaceBytes(const MInferenceVsGpuParams& p);

// Writes vertical[h * kv_len + j] and slash[h * kv_len + delta] (fp32, device) for every query
// head h and j, delta in [0, kv_len). cudaErrorInvalidValue (nothing launched) when unsupported,
// pointers are null or the workspace is smaller than MInferenceVsGpuWorkspaceBytes.
cudaError_t MInferenceVsScoresGpu(const MInferenceVsGpuParams& p, float* vertical, float* slash,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_MINFERENCE_CUDA_H_
