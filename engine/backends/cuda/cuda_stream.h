// Internal to the CUDA backend (engine/cuda/*.cc): the state of one CudaBackend stream, its
// recorded decode-step graphs, and the error plumbing shared by cuda_backend.cc (memory, steps,
// operators) and cuda_graph_step.cc (graph steps). Nothing outside engine/cuda includes this.
#ifndef SIEVE_ENGINE_BACKENDS_CUDA_CUDA_STREAM_H_
#define SIEVE_ENGINE_BACKENDS_CUDA_CUDA_STREAM_H_

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "engine/backends/backend.h"
#include "kernels/attention/paged_decode.h"
#include "kernels/attention/paged_prefill.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/sampling.h"

namespace sieve::engine {
namespace cuda_internal {

// The Status of a failed CUDA runtime call: its error, the expression, file and line, and where
// inside a kernel launcher it failed when the launcher recorded that. Clears the runtime's
// last-error state.
// A Status naming the failed expression, file and line. Sticky errors (IsStickyError) come back
// as DeviceLostError: the context is unusable and the engine must stop serving.
absl::Status CudaErrorStatus(cudaError_t e, const char* expr, const char* file, int line);

// True for the CUDA errors that poison the context (illegal address, launch failure, ECC, ...).
bool IsStickyError(cudaError_t e);

// The Status of a failed cuBLAS call.
absl::Status CudaErrorStatus(cublasStatus_t e, const char* expr, const char* file, int line);

inline bool Failed(cudaError_t e) { return e != cudaSuccess; }
inline bool Failed(cublasStatus_t e) { return e != CUBLAS_STATUS_SUCCESS; }

}  // namespace cuda_internal

// Evaluates `expr` (a cudaError_t or cublasStatus_t); on failure returns an Internal status that
// names the expression, file and line from the enclosing function.
#define SIEVE_RETURN_IF_CUDA_ERROR(expr)                                                         \
  do {                                                                                           \
    const auto sieve_cuda_result_ = (expr);                                                      \
    if (::sieve::engine::cuda_internal::Failed(sieve_cuda_result_)) {                            \
      return ::sieve::engine::cuda_internal::CudaErrorStatus(sieve_cuda_result_, #expr, __FILE__, \
                                                             __LINE__);                          \
    }                                                                                            \
  } while (0)

// Which attention kernel a step runs.
enum class CudaAttentionPath { kNone, kDecode, kPrefill, kSimple };

// What a recorded graph was recorded for: the step's shape and the attention plan made from it.
// Two steps with equal keys run the same kernels with the same launch parameters.
struct GraphKey {
  int32_t num_seqs = 0;           // sequences (= tokens) of the step, padding included
  int32_t page_table_stride = 0;  // pages per row of the page table
  CudaAttentionPath path = CudaAttentionPath::kNone;
  int32_t num_splits = 0;         // decode plan (0 for the simple kernel)
  int32_t chunk_tokens = 0;

  bool operator==(const GraphKey& o) const {
    return num_seqs == o.num_seqs && page_table_stride == o.page_table_stride && path == o.path &&
           num_splits == o.num_splits && chunk_tokens == o.chunk_tokens;
  }
};

// The recording of graph steps of one sequence count, and every buffer it refers to that is not
// the backend's (weights, activations, KV cache) or the stream's fixed GEMM workspace. A buffer
// that grows is reallocated, which drops the recording (it holds the old address).
struct GraphSlot {
  ~GraphSlot();
  void DropRecording();

  int32_t num_seqs = 0;
  GraphKey key;                      // what `exec` was recorded for
  cudaGraphExec_t exec = nullptr;    // the recording, or null
  GraphKey seen;                     // the key of the last eager step of this slot
  bool has_seen = false;
  // Inputs: pinned host bytes and their device mirror, the same layout: slots (int64), positions,
  // query_start, kv_lens, tokens (int32), then the page table [num_seqs, stride_capacity].
  char* host_in = nullptr;
  char* dev_in = nullptr;
  int32_t stride_capacity = 0;       // page-table stride the buffers hold
  cudaEvent_t in_copied = nullptr;   // recorded after the last copy out of host_in
  size_t off_positions = 0, off_query_start = 0, off_kv_lens = 0, off_tokens = 0,
         off_page_table = 0;
  // The decode plan's workspace.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // fp32 logits [num_seqs, vocab] that GraphLogits writes.
  float* logits = nullptr;
  int64_t logits_elems = 0;
  int64_t vocab = 0;                 // lm_head rows of the last GraphLogits (0: none yet)
  int64_t embed_rows = 0;            // embedding rows of the last Embed (for token checks)
};

// A stream's state: its CUDA stream, GEMM handle and workspace, the step's layout on the device
// and its attention plan, and its graph slots. Owned by one worker thread.
struct CudaStream final : BackendStream {
  ~CudaStream() override;

  int device = 0;
  cudaStream_t stream = nullptr;
  kernels::BlasLtGemm gemm;
  void* gemm_workspace = nullptr;
  size_t gemm_workspace_bytes = 0;
  // Staging: pinned host bytes and a device mirror of the same size. BeginStep puts the layout at
  // the front; Embed and GatherRows append their index arrays after it (`staging_used`).
  char* host_staging = nullptr;
  char* dev_staging = nullptr;
  size_t staging_bytes = 0;
  size_t staging_used = 0;
  cudaEvent_t staging_copied = nullptr;  // recorded after the last copy out of host_staging
  // Device copies of the current layout (pointers into dev_staging or a graph slot's inputs).
  const int32_t* positions = nullptr;
  const int64_t* slots = nullptr;
  const int32_t* query_start = nullptr;
  const int32_t* kv_lens = nullptr;
  const int32_t* page_table = nullptr;
  const BatchLayout* layout = nullptr;
  int32_t max_q_len = 0;
  int32_t max_kv_len = 0;
  // Attention plan of the step, and the decode workspace it uses (attn_workspace for an eager
  // step, the graph slot's for a graph step).
  CudaAttentionPath path = CudaAttentionPath::kNone;
  kernels::PagedDecodePlan decode_plan;
  kernels::PagedPrefillPlan prefill_plan;
  void* attn_workspace = nullptr;
  size_t attn_workspace_bytes = 0;
  void* step_workspace = nullptr;
  // fp32 device buffer for CopyToHost and Logits, and pinned host staging for their copies.
  float* f32_dev = nullptr;
  int64_t f32_dev_elems = 0;
  float* f32_host = nullptr;
  int64_t f32_host_elems = 0;
  std::vector<cudaEvent_t> copy_events;  // one per chunk of a pipelined copy to the host
  // Sample: pinned host bytes (`sample_bytes`) holding the rows' parameters, their penalty
  // entries and the results (kernels/cuda/sampling.h), grown as needed. The device buffer holds
  // the sampling kernel's workspace first (sample_plan.workspace_bytes rounded up to 256 bytes,
  // zero-filled when allocated), then a mirror of the host bytes.
  char* sample_host = nullptr;
  char* sample_dev = nullptr;
  size_t sample_bytes = 0;
  // The sampling kernel's plan for the stream's device, made on the first Sample
  // (sample_plan_ready) so that a step makes no device queries.
  kernels::SamplePlan sample_plan;
  bool sample_plan_ready = false;
  // Sparse decode (cuda_sparse.cc): device scratch for the Quest selection (its scores, pages
  // and counts) and for the compacted page tables and lengths of a sparse decode plan, then the
  // sparse decode kernel's workspace; pinned host bytes for the copies both ways. Grown between
  // layers when a step needs more (after waiting for the stream).
  char* sparse_dev = nullptr;
  size_t sparse_dev_bytes = 0;
  char* sparse_host = nullptr;
  size_t sparse_host_bytes = 0;
  cudaEvent_t sparse_copied = nullptr;  // recorded after the last copy out of sparse_host
  // MInference's index built on the device (cuda_minference.cc): its row starts, key blocks and
  // columns, grown as a step needs (after waiting for the stream); copied into the host plan,
  // or kept there as an on-device prefill plan.
  char* index_dev = nullptr;
  size_t index_dev_bytes = 0;
  // A plan kept on the device (AttentionPlan::on_device); the next Attention of the same layer
  // runs it and clears `ready`. Quest (decode): PlanQuestPages wrote each row's page ids and
  // token count into sparse_dev at `tables` / `lens`, with room for the decode workspace after
  // them. MInference (`prefill`): the sparse index's arrays are in index_dev at `index`'s
  // offsets.
  struct DevicePlan {
    bool ready = false;
    bool prefill = false;  // MInference's rows in index_dev, not Quest's tables
    int32_t layer = -1;
    size_t tables = 0, lens = 0, workspace = 0;  // byte offsets into sparse_dev
    int32_t stride = 0;           // table entries per row (the page budget)
    int32_t heads_per_block = 1;  // query heads per row (the group with per-KV-head selection)
    int32_t max_kv_len = 0;       // the most tokens a row holds (for the decode plan)
    // Byte offsets into index_dev of the prefill plan's query_block_start, row_start,
    // key_blocks, column_start and columns.
    struct {
      size_t query_block_start = 0, row_start = 0, key_blocks = 0, column_start = 0, columns = 0;
    } index;
  } device_plan;
  // Graph steps: one slot per sequence count; `graph` is the slot of the step in progress.
  std::map<int32_t, std::unique_ptr<GraphSlot>> graph_slots;
  GraphSlot* graph = nullptr;
  StepGraphMode graph_mode = StepGraphMode::kEager;
  const int32_t* graph_tokens = nullptr;  // host tokens given to BeginGraphStep
  int64_t graph_record_start_ns = 0;      // steady clock when the recording began
  StepGraphStats graph_stats;
};

namespace cuda_internal {

inline CudaStream& Cuda(BackendStream& s) { return static_cast<CudaStream&>(s); }

inline size_t Align256(size_t n) { return (n + 255) / 256 * 256; }

// An Internal error unless t has at least `rows` rows of exactly `cols` columns.
absl::Status CheckShape(const Tensor& t, int64_t rows, int64_t cols, absl::string_view what);

// Host-side checks of a layout against the KV pool (the device kernels trust these); sets the
// longest query and KV lengths.
absl::Status ValidateLayout(const BatchLayout& l, int32_t num_pages, int32_t page_size,
                            int32_t& max_q_len, int32_t& max_kv_len);

// Makes the pinned host buffer of `s` hold at least `elems` floats. Only between steps: it may
// free the old buffer, so the stream must have no copy into it in flight.
absl::Status EnsureHostFloats(CudaStream& s, int64_t elems);

// Copies out.size() floats from device `src` to `out` through the stream's pinned buffer, after
// the work enqueued so far, and waits for it: one asynchronous copy, or for large copies (many
// rows of logits) a chunked pipeline in which the host copies chunk i out of pinned memory while
// the device sends chunk i + 1.
absl::Status CopyFloatsToHost(CudaStream& s, const float* src, absl::Span<float> out);

// Makes the stream's sparse scratch (sparse_dev, sparse_host) hold `dev_bytes` on the device
// and `host_bytes` of pinned memory, waiting for the stream before it frees a buffer that work
// in flight may use (cuda_sparse.cc).
absl::Status EnsureSparseBuffers(CudaStream& s, size_t dev_bytes, size_t host_bytes);

// Uploads a sparse decode step's per-row tables, already written to sparse_host[0, table_bytes),
// and its per-row lengths `lens` to sparse_dev (lengths at Align256(table_bytes)), then records
// sparse_copied. Returns the device lengths.
absl::StatusOr<const int32_t*> UploadDecodeTables(CudaStream& s, size_t table_bytes,
                                                  const std::vector<int32_t>& lens);

// Sparse attention (cuda_sparse.cc): runs `plan` for layer `layer` of the step of `s` with the
// dense parameters `p` (page table and lengths of the step). Decode steps: plans of whole pages
// (Quest) through compacted per-row page tables and PagedDecodeSparseRun (an on_device plan:
// the tables PlanQuestPages left in s.device_plan). Other steps: plans of 128-query
// blocks and 64-key-tile key blocks (XAttention), or of 64-query and 64-key blocks with single
// columns (MInference; an on_device plan: the index MInferenceIndex left in index_dev), through
// the block-sparse prefill kernels. Unimplemented for plans neither takes (other block sizes).
absl::Status SparseDecodeAttention(CudaStream& s, int32_t layer, const AttentionPlan& plan,
                                   const kernels::PagedAttentionParams<__nv_bfloat16>& p,
                                   int num_sms);

// Decode plans with single columns (DoubleSparsity's; cuda_double_sparsity.cc): each row's pages'
// tokens and columns as a list of KV slots, uploaded, then PagedDecodeTokenRun.
absl::Status TokenDecodeAttention(CudaStream& s, const AttentionPlan& plan,
                                  const kernels::PagedAttentionParams<__nv_bfloat16>& p,
                                  int num_sms);

}  // namespace cuda_internal
}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_BACKENDS_CUDA_CUDA_STREAM_H_
