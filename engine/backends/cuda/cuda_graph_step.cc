// Graph steps of the CUDA backend (contract in engine/backend.h, design in cuda_backend.h): a
// decode step of each sequence count runs eagerly the first time its key is seen, is captured
// into a CUDA graph the second time (stream capture, thread-local mode), and is replayed after
// that. Per replayed step the host writes the inputs to pinned memory and enqueues one upload and
// the graph launch (BeginGraphStep), then copies the logits out (EndGraphStep).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "engine/backends/cuda/cuda_backend.h"
#include "engine/backends/cuda/cuda_stream.h"
#include "engine/status_macros.h"
#include "kernels/cuda/gemm.h"

namespace sieve::engine {

using cuda_internal::Align256;
using cuda_internal::Cuda;

GraphSlot::~GraphSlot() {
  DropRecording();
  if (in_copied != nullptr) {
    cudaEventSynchronize(in_copied);
    cudaEventDestroy(in_copied);
  }
  cudaFreeHost(host_in);
  cudaFree(dev_in);
  cudaFree(workspace);
  cudaFree(logits);
}

void GraphSlot::DropRecording() {
  if (exec != nullptr) cudaGraphExecDestroy(exec);
  exec = nullptr;
}

namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Sets the offsets of the slot's input block and returns its size in bytes for page-table
// stride `stride`. The page table comes last, so only the size depends on the stride.
size_t InputBytes(GraphSlot& g, int32_t stride) {
  const size_t n = static_cast<size_t>(g.num_seqs);
  size_t off = Align256(n * sizeof(int64_t));  // slots
  g.off_positions = off;
  off += Align256(n * sizeof(int32_t));
  g.off_query_start = off;
  off += Align256((n + 1) * sizeof(int32_t));
  g.off_kv_lens = off;
  off += Align256(n * sizeof(int32_t));
  g.off_tokens = off;
  off += Align256(n * sizeof(int32_t));
  g.off_page_table = off;
  return off + Align256(n * static_cast<size_t>(stride) * sizeof(int32_t));
}

// Makes the slot's input buffers hold a page table of `stride` pages per row.
absl::Status EnsureInputs(GraphSlot& g, int32_t stride) {
  if (g.in_copied == nullptr) {
    SIEVE_RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&g.in_copied, cudaEventDisableTiming));
  }
  if (stride <= g.stride_capacity) return absl::OkStatus();
  g.DropRecording();  // it reads the old buffers
  SIEVE_RETURN_IF_CUDA_ERROR(cudaEventSynchronize(g.in_copied));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaFreeHost(g.host_in));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaFree(g.dev_in));
  g.host_in = nullptr;
  g.dev_in = nullptr;
  g.stride_capacity = 0;
  const size_t bytes = InputBytes(g, stride);
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMallocHost(reinterpret_cast<void**>(&g.host_in), bytes));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&g.dev_in), bytes));
  g.stride_capacity = stride;
  return absl::OkStatus();
}

// Grows a device buffer of the slot to `bytes`, dropping the recording that reads the old one
// (after the stream's work, which may still use it, is done).
absl::Status GrowSlotBuffer(GraphSlot& g, cudaStream_t stream, void** buffer, size_t* capacity,
                            size_t bytes) {
  if (bytes <= *capacity) return absl::OkStatus();
  g.DropRecording();
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaFree(*buffer));
  *buffer = nullptr;
  *capacity = 0;
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(buffer, bytes));
  *capacity = bytes;
  return absl::OkStatus();
}

// Copies the layout and tokens into the slot's pinned block and enqueues one upload of it.
absl::Status UploadInputs(CudaStream& s, GraphSlot& g, const BatchLayout& l,
                          absl::Span<const int32_t> tokens) {
  const size_t n = static_cast<size_t>(g.num_seqs);
  const size_t stride = static_cast<size_t>(l.page_table_stride);
  // The previous step's upload out of the pinned block must be done before it is overwritten.
  SIEVE_RETURN_IF_CUDA_ERROR(cudaEventSynchronize(g.in_copied));
  std::memcpy(g.host_in, l.slots.data(), n * sizeof(int64_t));
  std::memcpy(g.host_in + g.off_positions, l.positions.data(), n * sizeof(int32_t));
  std::memcpy(g.host_in + g.off_query_start, l.query_start.data(), (n + 1) * sizeof(int32_t));
  std::memcpy(g.host_in + g.off_kv_lens, l.kv_lens.data(), n * sizeof(int32_t));
  std::memcpy(g.host_in + g.off_tokens, tokens.data(), n * sizeof(int32_t));
  std::memcpy(g.host_in + g.off_page_table, l.page_table.data(), n * stride * sizeof(int32_t));
  const size_t bytes = g.off_page_table + n * stride * sizeof(int32_t);
  SIEVE_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(g.dev_in, g.host_in, bytes, cudaMemcpyHostToDevice, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaEventRecord(g.in_copied, s.stream));
  s.slots = reinterpret_cast<const int64_t*>(g.dev_in);
  s.positions = reinterpret_cast<const int32_t*>(g.dev_in + g.off_positions);
  s.query_start = reinterpret_cast<const int32_t*>(g.dev_in + g.off_query_start);
  s.kv_lens = reinterpret_cast<const int32_t*>(g.dev_in + g.off_kv_lens);
  s.page_table = reinterpret_cast<const int32_t*>(g.dev_in + g.off_page_table);
  return absl::OkStatus();
}

// Turns a captured graph into the slot's executable recording: updates the old one in place
// when CUDA can (same topology), else instantiates a new one.
absl::Status InstallRecording(GraphSlot& g, cudaGraph_t graph) {
  if (g.exec != nullptr) {
    cudaGraphExecUpdateResultInfo info;
    if (cudaGraphExecUpdate(g.exec, graph, &info) == cudaSuccess) return absl::OkStatus();
    cudaGetLastError();  // an update refused is not an error of the step
    g.DropRecording();
  }
  SIEVE_RETURN_IF_CUDA_ERROR(cudaGraphInstantiate(&g.exec, graph, 0));
  return absl::OkStatus();
}

}  // namespace

int32_t CudaBackend::GraphPlanKvLen(int32_t max_kv_len) const {
  constexpr int64_t kMinQuantum = 64;  // one tile of the decode kernel
  if (max_kv_len <= kMinQuantum) return static_cast<int32_t>(kMinQuantum);
  if (options_.graph_kv_quantum_shift < 0) {  // the exact plan: tiles are all it depends on
    return static_cast<int32_t>(
        std::min<int64_t>((max_kv_len + kMinQuantum - 1) / kMinQuantum * kMinQuantum, INT32_MAX));
  }
  int log2 = 0;
  while ((int64_t{2} << log2) <= max_kv_len) ++log2;
  const int shift = std::max(0, log2 - options_.graph_kv_quantum_shift);
  const int64_t quantum = std::max<int64_t>(kMinQuantum, int64_t{1} << shift);
  const int64_t rounded = (max_kv_len + quantum - 1) / quantum * quantum;
  return static_cast<int32_t>(std::min<int64_t>(rounded, INT32_MAX));
}

absl::StatusOr<StepGraphMode> CudaBackend::BeginGraphStep(BackendStream& stream,
                                                          const BatchLayout& l,
                                                          absl::Span<const int32_t> tokens) {
  CudaStream& s = Cuda(stream);
  if (kv_ == nullptr) return absl::FailedPreconditionError("cuda backend: no KV cache allocated");
  if (s.graph != nullptr) {
    return absl::FailedPreconditionError("cuda backend: a graph step is already in progress");
  }
  s.layout = nullptr;
  s.path = CudaAttentionPath::kNone;
  SIEVE_RETURN_IF_ERROR(
      cuda_internal::ValidateLayout(l, num_pages_, page_size_, s.max_q_len, s.max_kv_len));
  const int32_t n = l.num_seqs();
  if (s.max_q_len != 1 || l.num_tokens() != n || static_cast<int32_t>(tokens.size()) != n) {
    return absl::InvalidArgumentError(
        "cuda backend: a graph step takes exactly one token per sequence");
  }
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  PlanAttention(s, n, GraphPlanKvLen(s.max_kv_len));
  GraphKey key;
  key.num_seqs = n;
  key.page_table_stride = l.page_table_stride;
  key.path = s.path;
  if (s.path == CudaAttentionPath::kDecode) {
    key.num_splits = s.decode_plan.num_splits;
    key.chunk_tokens = s.decode_plan.chunk_tokens;
  }
  std::unique_ptr<GraphSlot>& slot = s.graph_slots[n];
  if (slot == nullptr) {
    slot = std::make_unique<GraphSlot>();
    slot->num_seqs = n;
  }
  GraphSlot& g = *slot;
  for (int32_t t : tokens) {
    if (t < 0 || (g.embed_rows > 0 && t >= g.embed_rows)) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", t, " out of range"));
    }
  }
  SIEVE_RETURN_IF_ERROR(EnsureInputs(g, l.page_table_stride));
  if (s.path == CudaAttentionPath::kDecode) {
    SIEVE_RETURN_IF_ERROR(GrowSlotBuffer(g, s.stream, &g.workspace, &g.workspace_bytes,
                                         s.decode_plan.workspace_bytes));
  }
  SIEVE_RETURN_IF_ERROR(UploadInputs(s, g, l, tokens));
  StepGraphMode mode = StepGraphMode::kEager;
  if (g.exec != nullptr && g.key == key) {
    // Nothing is left to enqueue: launch now, so that the device runs while the caller prepares
    // for the logits.
    mode = StepGraphMode::kReplay;
    SIEVE_RETURN_IF_CUDA_ERROR(cudaGraphLaunch(g.exec, s.stream));
    ++s.graph_stats.replayed_steps;
  } else if (g.has_seen && g.seen == key) {
    mode = StepGraphMode::kRecord;
    s.graph_record_start_ns = NowNs();
    SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamBeginCapture(s.stream, cudaStreamCaptureModeThreadLocal));
  } else {
    g.seen = key;
    g.has_seen = true;
  }
  s.step_workspace = g.workspace;
  s.layout = &l;
  s.graph = &g;
  s.graph_mode = mode;
  s.graph_tokens = tokens.data();
  return mode;
}

absl::Status CudaBackend::GraphLogits(BackendStream& stream, const Tensor& x,
                                      const Tensor& lm_head) {
  CudaStream& s = Cuda(stream);
  if (s.graph == nullptr || s.graph_mode == StepGraphMode::kReplay) {
    return absl::FailedPreconditionError(
        "cuda backend: GraphLogits outside a graph step that enqueues operators");
  }
  GraphSlot& g = *s.graph;
  if (x.data == nullptr || lm_head.data == nullptr || x.cols != lm_head.cols ||
      x.rows != g.num_seqs) {
    return absl::InternalError(absl::StrCat("cuda backend: graph logits of [", x.rows, ", ",
                                            x.cols, "] for ", g.num_seqs, " sequences and ",
                                            lm_head.cols, " lm_head columns"));
  }
  const size_t bytes = static_cast<size_t>(x.rows * lm_head.rows) * sizeof(float);
  if (bytes > static_cast<size_t>(g.logits_elems) * sizeof(float)) {
    if (s.graph_mode == StepGraphMode::kRecord) {
      return absl::InternalError("cuda backend: a recording cannot allocate its logits buffer");
    }
    size_t capacity = static_cast<size_t>(g.logits_elems) * sizeof(float);
    void* buffer = g.logits;
    SIEVE_RETURN_IF_ERROR(GrowSlotBuffer(g, s.stream, &buffer, &capacity, bytes));
    g.logits = static_cast<float*>(buffer);
    g.logits_elems = static_cast<int64_t>(capacity / sizeof(float));
  }
  g.vocab = lm_head.rows;
  kernels::GemmArgs a;
  a.x = static_cast<const __nv_bfloat16*>(x.data);
  a.w = static_cast<const __nv_bfloat16*>(lm_head.data);
  a.y_f32 = g.logits;
  a.m = x.rows;
  a.n = lm_head.rows;
  a.k = x.cols;
  SIEVE_RETURN_IF_CUDA_ERROR(s.gemm.Run(a, s.gemm_workspace, s.gemm_workspace_bytes, s.stream));
  return absl::OkStatus();
}

absl::StatusOr<DeviceLogits> CudaBackend::EndGraphStepOnDevice(BackendStream& stream) {
  CudaStream& s = Cuda(stream);
  if (s.graph == nullptr) return absl::FailedPreconditionError("cuda backend: no graph step");
  GraphSlot& g = *s.graph;
  const StepGraphMode mode = s.graph_mode;
  s.graph = nullptr;
  s.graph_tokens = nullptr;
  s.layout = nullptr;
  if (mode == StepGraphMode::kRecord) {
    cudaGraph_t graph = nullptr;
    const cudaError_t e = cudaStreamEndCapture(s.stream, &graph);
    absl::Status st = e == cudaSuccess ? InstallRecording(g, graph)
                                       : cuda_internal::CudaErrorStatus(
                                             e, "cudaStreamEndCapture", __FILE__, __LINE__);
    if (graph != nullptr) cudaGraphDestroy(graph);
    if (!st.ok()) {
      g.has_seen = false;
      return st;
    }
    g.key = g.seen;
    ++s.graph_stats.recorded_steps;
    s.graph_stats.record_seconds += (NowNs() - s.graph_record_start_ns) * 1e-9;
  }
  if (mode == StepGraphMode::kEager) ++s.graph_stats.eager_steps;
  if (mode == StepGraphMode::kRecord) SIEVE_RETURN_IF_CUDA_ERROR(cudaGraphLaunch(g.exec, s.stream));
  if (g.vocab <= 0) return DeviceLogits{};  // no GraphLogits yet
  return DeviceLogits{g.logits, g.num_seqs, g.vocab};
}

absl::Status CudaBackend::EndGraphStep(BackendStream& stream, absl::Span<float> host_logits) {
  CudaStream& s = Cuda(stream);
  SIEVE_ASSIGN_OR_RETURN(const DeviceLogits logits, EndGraphStepOnDevice(stream));
  if (host_logits.empty()) return absl::OkStatus();
  const int64_t size = static_cast<int64_t>(host_logits.size());
  if (logits.empty() || size % logits.vocab != 0 || size / logits.vocab > logits.rows) {
    return absl::InternalError(absl::StrCat("cuda backend: ", size, " logits asked of a graph ",
                                            "step of ", logits.rows, " rows of ", logits.vocab));
  }
  return cuda_internal::CopyFloatsToHost(s, logits.data, host_logits);
}

void CudaBackend::AbortGraphStep(BackendStream& stream) {
  CudaStream& s = Cuda(stream);
  if (s.graph == nullptr) return;
  if (s.graph_mode == StepGraphMode::kRecord) {
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(s.stream, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
  }
  s.graph->has_seen = false;  // the next step of this key runs eagerly again
  cudaGetLastError();
  s.graph = nullptr;
  s.graph_tokens = nullptr;
  s.layout = nullptr;
}

StepGraphStats CudaBackend::GraphStats(const BackendStream& stream) const {
  const CudaStream& s = static_cast<const CudaStream&>(stream);
  StepGraphStats stats = s.graph_stats;
  stats.live_recordings = 0;
  for (const auto& [n, slot] : s.graph_slots) stats.live_recordings += slot->exec != nullptr;
  return stats;
}

}  // namespace sieve::engine
