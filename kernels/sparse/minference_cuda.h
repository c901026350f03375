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
// kernel's plan: on the host (BuildPlanFromScores in minference.h) or on the device (the index
// kernels at the end of this file).
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

// ---- The index on the device (minference_index_cuda.cu) -----------------------------------------
// From the scores above (vertical and slash [num_heads, kv_len], device), the plan
// BuildPlanFromScores (minference.h) makes on the host, bit for bit: per vertical-slash head the
// top-k of section 1.4 (forced entries, ties to the lower index) by a radix select, one thread
// block per (head, list); then per row (query block b, head h; row b * num_heads + h) the
// section 1.6 conversion into 64-key blocks and single columns by one thread, counted, scanned
// into row_start / column_start, then written. A-shape heads as BuildPlan's; block-sparse heads
// are not taken (they pool q and K).
constexpr int kMInferenceIndexMaxHeads = 128;

struct MInferenceIndexGpuParams {
  const float* vertical = nullptr;  // [num_heads, kv_len]
  const float* slash = nullptr;     // [num_heads, kv_len]
  int32_t num_heads = 0;            // 1..kMInferenceIndexMaxHeads
  int32_t q_len = 0;                // the chunk's queries, 1 <= q_len <= kv_len
  int32_t kv_len = 0;
  // Per head, as HeadPattern (minference.h): 0 vertical-slash, 1 A-shape (n_init =
  // vertical_size, n_local = slash_size); the sizes as configured (the kernels apply section
  // 1.4's minimums).
  int8_t pattern[kMInferenceIndexMaxHeads] = {};
  int32_t vertical_size[kMInferenceIndexMaxHeads] = {};
  int32_t slash_size[kMInferenceIndexMaxHeads] = {};
};

// Device scratch of the selection and the row counts: num_heads * kv_len * 2 ints (the lists),
// then 4 * (rows + 1) ints (counts and starts), rows = ceil(q_len / 64) * num_heads.
size_t MInferenceIndexGpuWorkspaceBytes(const MInferenceIndexGpuParams& p);

// Step 1: selection, counts and starts. Afterwards row_start[rows] and column_start[rows] (device
// ints, at row_start / column_start, each rows + 1 long) hold the totals the caller allocates
// for. cudaErrorInvalidValue (nothing launched) for bad shapes or null pointers.
cudaError_t MInferenceIndexCountGpu(const MInferenceIndexGpuParams& p, void* workspace,
                                    size_t workspace_bytes, int32_t* row_start,
                                    int32_t* column_start, cudaStream_t stream);

// Step 2 (same params and workspace, after step 1 on the same stream): the key blocks and
// columns of every row at the starts step 1 wrote.
cudaError_t MInferenceIndexFillGpu(const MInferenceIndexGpuParams& p, const void* workspace,
                                   const int32_t* row_start, const int32_t* column_start,
                                   int32_t* key_blocks, int32_t* columns, cudaStream_t stream);

// Step 3 (optional; after step 2 on the same stream): the causal (query, key) pairs the plan's
// rows read over every head, as AttentionPlan::ReadPairs counts them (a key block: its keys at
// or before each query of the row's 64-query block; a column: the queries at or after it),
// written to *pairs (device). For the max_density check of a plan that stays on the device.
cudaError_t MInferencePlanPairsGpu(const MInferenceIndexGpuParams& p, const int32_t* row_start,
                                   const int32_t* key_blocks, const int32_t* column_start,
                                   const int32_t* columns, unsigned long long* pairs,
                                   cudaStream_t stream);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_MINFERENCE_CUDA_H_
