#include "engine/backends/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/backends/cuda/cuda_stream.h"
#include "engine/status_macros.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_simple.h"
#include "kernels/attention/paged_decode.h"
#include "kernels/attention/paged_prefill.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemv.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda_check.h"

namespace sieve::engine {

using bf16 = __nv_bfloat16;
using cuda_internal::Align256;
using cuda_internal::CheckShape;
using cuda_internal::Cuda;

namespace cuda_internal {

absl::Status CudaErrorStatus(cudaError_t e, const char* expr, const char* file, int line) {
  std::string msg = absl::StrCat("CUDA error ", cudaGetErrorName(e), " (", cudaGetErrorString(e),
                                 ") from `", expr, "` at ", file, ":", line);
  kernels::CudaErrorSite& site = kernels::LastCudaErrorSite();
  if (site.error == e && site.expr != nullptr) {
    absl::StrAppend(&msg, "; raised by `", site.expr, "` at ", site.file, ":", site.line);
  }
  site = kernels::CudaErrorSite{};
  // Clear the runtime's last-error state, so that a failure that does not poison the context
  // (an allocation too large, say) is not reported again by the next launch check.
  cudaGetLastError();
  if (IsStickyError(e)) return DeviceLostError(msg);
  return absl::InternalError(msg);
}

bool IsStickyError(cudaError_t e) {
  // The errors after which the CUDA context is unusable and every later call fails: the process
  // must restart to use the device again (CUDA runtime API, "sticky" errors).
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchTimeout:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorNvlinkUncorrectable:
    case cudaErrorContextIsDestroyed:
    case cudaErrorDevicesUnavailable:
    case cudaErrorNoDevice:
    case cudaErrorUnknown:
      return true;
    default:
      return false;
  }
}

absl::Status CudaErrorStatus(cublasStatus_t e, const char* expr, const char* file, int line) {
  return absl::InternalError(absl::StrCat("cuBLAS error ", kernels::CublasStatusName(e), " from `",
                                          expr, "` at ", file, ":", line));
}

absl::Status CheckShape(const Tensor& t, int64_t rows, int64_t cols, absl::string_view what) {
  if (t.data == nullptr || t.rows < rows || t.cols != cols) {
    return absl::InternalError(absl::StrCat("cuda backend: ", what, " is [", t.rows, ", ", t.cols,
                                            "], need [", rows, ", ", cols, "]"));
  }
  return absl::OkStatus();
}

absl::Status EnsureHostFloats(CudaStream& s, int64_t elems) {
  if (elems <= s.f32_host_elems) return absl::OkStatus();
  const int64_t size = std::max<int64_t>(elems, 2 * s.f32_host_elems);
  SIEVE_RETURN_IF_CUDA_ERROR(cudaFreeHost(s.f32_host));
  s.f32_host = nullptr;
  s.f32_host_elems = 0;
  SIEVE_RETURN_IF_CUDA_ERROR(
      cudaMallocHost(reinterpret_cast<void**>(&s.f32_host), size * sizeof(float)));
  s.f32_host_elems = size;
  return absl::OkStatus();
}

}  // namespace cuda_internal

CudaStream::~CudaStream() {
  cudaSetDevice(device);
  if (stream != nullptr) cudaStreamSynchronize(stream);
  graph_slots.clear();  // recordings and their buffers
  cudaFree(gemm_workspace);
  cudaFree(dev_staging);
  cudaFreeHost(host_staging);
  cudaFree(attn_workspace);
  cudaFree(f32_dev);
  cudaFreeHost(f32_host);
  cudaFree(sample_dev);
  cudaFreeHost(sample_host);
  cudaFree(sparse_dev);
  cudaFree(index_dev);
  cudaFreeHost(sparse_host);
  if (sparse_copied != nullptr) cudaEventDestroy(sparse_copied);
  for (cudaEvent_t e : copy_events) cudaEventDestroy(e);
  if (staging_copied != nullptr) cudaEventDestroy(staging_copied);
  gemm = kernels::BlasLtGemm();  // destroy the cuBLASLt handle before the stream
  if (stream != nullptr) cudaStreamDestroy(stream);
}

namespace {

bf16* B(const Tensor& t) { return static_cast<bf16*>(t.data); }

absl::StatusOr<const BatchLayout*> LayoutOf(const CudaStream& s) {
  if (s.layout == nullptr) return absl::InternalError("cuda backend: operator before BeginStep");
  return s.layout;
}

// FailedPrecondition for the operators a graph step cannot record.
absl::Status NotInGraphStep(const CudaStream& s, absl::string_view op) {
  if (s.graph == nullptr) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("cuda backend: ", op, " is not available inside a graph step"));
}

// Copies `bytes` from `src` through the stream's staging area to the device, after what is
// already staged this step, and returns the device address. The staging area must be large
// enough (BeginStep sizes it for the step's index arrays).
absl::StatusOr<void*> Stage(CudaStream& s, const void* src, size_t bytes) {
  if (s.staging_used + Align256(bytes) > s.staging_bytes) {
    return absl::InternalError(absl::StrCat("cuda backend: staging area of ", s.staging_bytes,
                                            " bytes is full (", s.staging_used, " used, ", bytes,
                                            " more asked)"));
  }
  char* host = s.host_staging + s.staging_used;
  char* dev = s.dev_staging + s.staging_used;
  if (bytes > 0) {
    std::memcpy(host, src, bytes);
    SIEVE_RETURN_IF_CUDA_ERROR(
        cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, s.stream));
    SIEVE_RETURN_IF_CUDA_ERROR(cudaEventRecord(s.staging_copied, s.stream));
  }
  s.staging_used += Align256(bytes);
  return static_cast<void*>(dev);
}

// Grows the staging area to at least `bytes` (waiting for the stream first: its copies may
// still read the old buffers).
absl::Status EnsureStaging(CudaStream& s, size_t bytes) {
  if (bytes <= s.staging_bytes) return absl::OkStatus();
  const size_t size = std::max<size_t>(Align256(bytes), std::max<size_t>(2 * s.staging_bytes, 1 << 16));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaFreeHost(s.host_staging));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaFree(s.dev_staging));
  s.host_staging = nullptr;
  s.dev_staging = nullptr;
  s.staging_bytes = 0;
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMallocHost(reinterpret_cast<void**>(&s.host_staging), size));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&s.dev_staging), size));
  s.staging_bytes = size;
  return absl::OkStatus();
}

// Makes the stream's fp32 device buffer hold at least `elems` floats (waiting for the stream
// before freeing the old one).
absl::Status EnsureDeviceFloats(CudaStream& s, int64_t elems) {
  if (elems <= s.f32_dev_elems) return absl::OkStatus();
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaFree(s.f32_dev));
  s.f32_dev = nullptr;
  s.f32_dev_elems = 0;
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&s.f32_dev), elems * sizeof(float)));
  s.f32_dev_elems = elems;
  return absl::OkStatus();
}

}  // namespace

absl::Status cuda_internal::CopyFloatsToHost(CudaStream& s, const float* src,
                                             absl::Span<float> out) {
  if (out.empty()) return absl::OkStatus();
  // The stream has no copy into the pinned buffer in flight: every use waits for its copy.
  SIEVE_RETURN_IF_ERROR(cuda_internal::EnsureHostFloats(s, static_cast<int64_t>(out.size())));
  constexpr size_t kChunk = size_t{1} << 19;  // floats (2 MiB) per chunk of the pipeline
  const size_t chunks = (out.size() + kChunk - 1) / kChunk;
  if (chunks == 1) {
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.f32_host, src, out.size() * sizeof(float),
                                               cudaMemcpyDeviceToHost, s.stream));
    SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
    std::memcpy(out.data(), s.f32_host, out.size() * sizeof(float));
    return absl::OkStatus();
  }
  while (s.copy_events.size() < chunks) {
    cudaEvent_t e = nullptr;
    SIEVE_RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    s.copy_events.push_back(e);
  }
  for (size_t c = 0; c < chunks; ++c) {
    const size_t begin = c * kChunk, n = std::min(kChunk, out.size() - begin);
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.f32_host + begin, src + begin, n * sizeof(float),
                                               cudaMemcpyDeviceToHost, s.stream));
    SIEVE_RETURN_IF_CUDA_ERROR(cudaEventRecord(s.copy_events[c], s.stream));
  }
  for (size_t c = 0; c < chunks; ++c) {
    const size_t begin = c * kChunk, n = std::min(kChunk, out.size() - begin);
    SIEVE_RETURN_IF_CUDA_ERROR(cudaEventSynchronize(s.copy_events[c]));
    std::memcpy(out.data() + begin, s.f32_host + begin, n * sizeof(float));
  }
  return absl::OkStatus();
}

absl::Status cuda_internal::ValidateLayout(const BatchLayout& l, int32_t num_pages,
                                          int32_t page_size, int32_t& max_q_len,
                                          int32_t& max_kv_len) {
  const int32_t n = l.num_tokens(), seqs = l.num_seqs();
  if (seqs < 1 || l.query_start.size() != static_cast<size_t>(seqs) + 1 ||
      l.slots.size() != l.positions.size() || l.query_start.front() != 0 ||
      l.query_start.back() != n || l.page_table_stride < 1 ||
      l.page_table.size() != static_cast<size_t>(seqs) * l.page_table_stride) {
    return absl::InternalError("cuda backend: inconsistent batch layout");
  }
  max_q_len = 0;
  max_kv_len = 0;
  for (int32_t s = 0; s < seqs; ++s) {
    const int32_t q_len = l.query_start[s + 1] - l.query_start[s];
    if (q_len < 0 || l.kv_lens[s] < q_len ||
        int64_t{l.kv_lens[s]} > int64_t{l.page_table_stride} * page_size) {
      return absl::InternalError(absl::StrCat("cuda backend: sequence ", s, " has ", q_len,
                                              " queries and ", l.kv_lens[s], " KV tokens"));
    }
    max_q_len = std::max(max_q_len, q_len);
    max_kv_len = std::max(max_kv_len, l.kv_lens[s]);
  }
  for (int64_t slot : l.slots) {
    if (slot < 0 || slot >= int64_t{num_pages} * page_size) {
      return absl::InternalError(absl::StrCat("cuda backend: KV slot ", slot, " out of range"));
    }
  }
  for (int32_t page : l.page_table) {
    if (page < 0 || page >= num_pages) {
      return absl::InternalError(absl::StrCat("cuda backend: page id ", page, " out of range"));
    }
  }
  return absl::OkStatus();
}

namespace {

bool IsPowerOfTwo(int32_t x) { return x > 0 && (x & (x - 1)) == 0; }

}  // namespace

// --- Memory --------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(const CudaBackendOptions& options) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || options.device < 0 || options.device >= count) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda backend: no CUDA device ", options.device, " (", count, " found",
        e != cudaSuccess ? absl::StrCat("; ", cudaGetErrorString(e)) : std::string(), ")"));
  }
  std::unique_ptr<CudaBackend> b(new CudaBackend(options));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options.device));
  SIEVE_RETURN_IF_CUDA_ERROR(
      cudaDeviceGetAttribute(&b->num_sms_, cudaDevAttrMultiProcessorCount, options.device));
  SIEVE_RETURN_IF_CUDA_ERROR(
      cudaDeviceGetAttribute(&b->cc_major_, cudaDevAttrComputeCapabilityMajor, options.device));
  return b;
}

CudaBackend::~CudaBackend() {
  cudaSetDevice(options_.device);
  cudaDeviceSynchronize();
  for (void* p : buffers_) cudaFree(p);
  cudaFree(kv_);
  cudaFree(page_bounds_);
  if (transfer_stream_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(transfer_stream_));
}

absl::Status CudaBackend::CopyKvPages(absl::Span<const int32_t> pages, uint8_t* host,
                                      size_t bytes, bool to_host) {
  if (kv_ == nullptr) return absl::FailedPreconditionError("cuda backend: no KV cache");
  const int64_t block_elems = int64_t{page_size_} * kv_shape_.num_kv_heads * kv_shape_.head_dim;
  const size_t block = static_cast<size_t>(block_elems) * sizeof(bf16);
  const size_t page_bytes = 2 * static_cast<size_t>(num_layers_) * block;
  if (bytes != pages.size() * page_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: a transfer of ", pages.size(),
                                                   " KV pages needs ", pages.size() * page_bytes,
                                                   " bytes, got ", bytes));
  }
  for (const int32_t p : pages) {
    if (p < 0 || p >= num_pages_) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda backend: KV page ", p, " outside the pool of ", num_pages_));
    }
  }
  std::lock_guard<std::mutex> lock(transfer_mu_);
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  if (transfer_stream_ == nullptr) {
    cudaStream_t stream = nullptr;
    SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    transfer_stream_ = stream;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(transfer_stream_);
  bf16* pool = static_cast<bf16*>(kv_);
  uint8_t* cursor = host;
  for (const int32_t p : pages) {
    for (int32_t l = 0; l < num_layers_; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        bf16* device = pool + (2 * int64_t{l} + kv) * kv_layer_elems_ + int64_t{p} * block_elems;
        if (to_host) {
          SIEVE_RETURN_IF_CUDA_ERROR(
              cudaMemcpyAsync(cursor, device, block, cudaMemcpyDeviceToHost, stream));
        } else {
          SIEVE_RETURN_IF_CUDA_ERROR(
              cudaMemcpyAsync(device, cursor, block, cudaMemcpyHostToDevice, stream));
        }
        cursor += block;
      }
    }
  }
  // Pageable host memory: the copies are complete (and visible to every stream) only after this.
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::ReadKvPages(absl::Span<const int32_t> pages, absl::Span<uint8_t> out) {
  return CopyKvPages(pages, out.data(), out.size(), /*to_host=*/true);
}

absl::Status CudaBackend::WriteKvPages(absl::Span<const int32_t> pages,
                                       absl::Span<const uint8_t> data) {
  return CopyKvPages(pages, const_cast<uint8_t*>(data.data()), data.size(), /*to_host=*/false);
}

absl::StatusOr<void*> CudaBackend::DeviceAlloc(size_t bytes) {
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  void* p = nullptr;
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(&p, std::max<size_t>(bytes, 256)));
  buffers_.push_back(p);
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemset(p, 0, bytes));
  // cudaMemset of device memory may return before it completes, and it runs on the legacy
  // default stream, which the backend's non-blocking streams do not wait for: without this a
  // step's kernels (or a KV transfer) can run before the zeros land and have their writes wiped.
  SIEVE_RETURN_IF_CUDA_ERROR(cudaDeviceSynchronize());
  return p;
}

absl::StatusOr<Tensor> CudaBackend::UploadWeight(absl::Span<const TensorView> parts, int64_t cols) {
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
  if (cols <= 0 || total % cols != 0 || total == 0) {
    return absl::InvalidArgumentError(absl::StrCat("weights of ", total,
                                                   " elements do not form rows of ", cols));
  }
  std::vector<uint16_t> host(static_cast<size_t>(total));
  int64_t offset = 0;
  for (const TensorView& p : parts) {
    const int64_t n = p.numel();
    SIEVE_RETURN_IF_ERROR(CopyToBf16(p, absl::MakeSpan(host.data() + offset, n)));
    offset += n;
  }
  SIEVE_ASSIGN_OR_RETURN(void* dev, DeviceAlloc(host.size() * sizeof(uint16_t)));
  SIEVE_RETURN_IF_CUDA_ERROR(
      cudaMemcpy(dev, host.data(), host.size() * sizeof(uint16_t), cudaMemcpyHostToDevice));
  // From pageable memory cudaMemcpy may return once the data is staged, before it reaches the
  // device, and the non-blocking streams that read the weight do not order after it.
  SIEVE_RETURN_IF_CUDA_ERROR(cudaDeviceSynchronize());
  return Tensor{dev, total / cols, cols};
}

absl::StatusOr<Tensor> CudaBackend::Allocate(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: bad buffer [", rows, ", ", cols, "]"));
  }
  SIEVE_ASSIGN_OR_RETURN(void* dev, DeviceAlloc(static_cast<size_t>(rows * cols) * sizeof(bf16)));
  return Tensor{dev, rows, cols};
}

int64_t CudaBackend::KvPageBytes(int32_t num_layers, int32_t page_size,
                                 const AttentionShape& shape) const {
  return int64_t{2} * num_layers * page_size * shape.num_kv_heads * shape.head_dim *
         static_cast<int64_t>(sizeof(bf16));
}

absl::StatusOr<int64_t> CudaBackend::AvailableMemoryBytes() const {
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  size_t free_bytes = 0, total_bytes = 0;
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  return static_cast<int64_t>(free_bytes);
}

absl::Status CudaBackend::AllocateKvCache(int32_t num_layers, int32_t num_pages, int32_t page_size,
                                          const AttentionShape& shape) {
  if (num_layers <= 0 || num_pages <= 0 || page_size <= 0 || shape.num_kv_heads <= 0 ||
      shape.head_dim <= 0 || shape.num_q_heads <= 0 ||
      shape.num_q_heads % shape.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        "cuda backend: KV cache needs layers, pages, page size and heads > 0");
  }
  if (kv_ != nullptr) return absl::FailedPreconditionError("cuda backend: KV cache already allocated");
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  const int64_t layer_elems = int64_t{num_pages} * page_size * shape.num_kv_heads * shape.head_dim;
  const size_t bytes = static_cast<size_t>(2 * num_layers * layer_elems) * sizeof(bf16);
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(&kv_, bytes));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemset(kv_, 0, bytes));
  // As in DeviceAlloc: the zeroing must be complete before any non-blocking stream writes KV.
  SIEVE_RETURN_IF_CUDA_ERROR(cudaDeviceSynchronize());
  kv_layer_elems_ = layer_elems;
  num_layers_ = num_layers;
  num_pages_ = num_pages;
  page_size_ = page_size;
  kv_shape_ = shape;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<BackendStream>> CudaBackend::CreateStream(
    const StreamOptions& stream_options) {
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  auto s = std::make_unique<CudaStream>();
  s->device = options_.device;
  // Lower numbers are more urgent: `greatest` is the most urgent priority, `least` the default.
  int least = 0, greatest = 0;
  SIEVE_RETURN_IF_CUDA_ERROR(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  const int priority = stream_options.priority == StreamPriority::kHigh ? greatest : least;
  SIEVE_RETURN_IF_CUDA_ERROR(
      cudaStreamCreateWithPriority(&s->stream, cudaStreamNonBlocking, priority));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&s->staging_copied, cudaEventDisableTiming));
  SIEVE_RETURN_IF_CUDA_ERROR(s->gemm.Init());
  if (options_.gemm_workspace_bytes > 0) {
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(&s->gemm_workspace, options_.gemm_workspace_bytes));
    s->gemm_workspace_bytes = options_.gemm_workspace_bytes;
  }
  SIEVE_RETURN_IF_ERROR(EnsureStaging(*s, 1 << 16));
  return std::unique_ptr<BackendStream>(std::move(s));
}

// --- Steps ---------------------------------------------------------------------------------------

absl::Status CudaBackend::BeginStep(BackendStream& stream, const BatchLayout& l) {
  CudaStream& s = Cuda(stream);
  if (kv_ == nullptr) return absl::FailedPreconditionError("cuda backend: no KV cache allocated");
  if (s.graph != nullptr) {
    return absl::FailedPreconditionError("cuda backend: BeginStep inside a graph step");
  }
  s.layout = nullptr;
  s.path = CudaAttentionPath::kNone;
  s.device_plan.ready = false;
  SIEVE_RETURN_IF_ERROR(
      cuda_internal::ValidateLayout(l, num_pages_, page_size_, s.max_q_len, s.max_kv_len));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  const size_t n = l.positions.size(), seqs = l.kv_lens.size();
  const size_t sizes[5] = {n * sizeof(int64_t), n * sizeof(int32_t), (seqs + 1) * sizeof(int32_t),
                           seqs * sizeof(int32_t), l.page_table.size() * sizeof(int32_t)};
  size_t layout_bytes = 0;
  for (size_t b : sizes) layout_bytes += Align256(b);
  // Room for the operators' index arrays: one embedding and one gather of up to n rows each.
  const size_t op_bytes = 4 * Align256(n * sizeof(int32_t));
  // The previous step's copies out of the pinned buffer must be done before it is overwritten.
  SIEVE_RETURN_IF_CUDA_ERROR(cudaEventSynchronize(s.staging_copied));
  SIEVE_RETURN_IF_ERROR(EnsureStaging(s, layout_bytes + op_bytes));
  size_t offset = 0;
  const void* srcs[5] = {l.slots.data(), l.positions.data(), l.query_start.data(),
                         l.kv_lens.data(), l.page_table.data()};
  char* dev[5];
  for (int i = 0; i < 5; ++i) {
    if (sizes[i] > 0) std::memcpy(s.host_staging + offset, srcs[i], sizes[i]);
    dev[i] = s.dev_staging + offset;
    offset += Align256(sizes[i]);
  }
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.dev_staging, s.host_staging, offset,
                                             cudaMemcpyHostToDevice, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaEventRecord(s.staging_copied, s.stream));
  s.staging_used = offset;
  s.slots = reinterpret_cast<const int64_t*>(dev[0]);
  s.positions = reinterpret_cast<const int32_t*>(dev[1]);
  s.query_start = reinterpret_cast<const int32_t*>(dev[2]);
  s.kv_lens = reinterpret_cast<const int32_t*>(dev[3]);
  s.page_table = reinterpret_cast<const int32_t*>(dev[4]);
  PlanAttention(s, l.num_seqs(), s.max_kv_len);
  if (s.path == CudaAttentionPath::kDecode &&
      s.decode_plan.workspace_bytes > s.attn_workspace_bytes) {
    // The only allocation a step can make, before any operator runs.
    const size_t bytes = std::max(s.decode_plan.workspace_bytes, 2 * s.attn_workspace_bytes);
    SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
    SIEVE_RETURN_IF_CUDA_ERROR(cudaFree(s.attn_workspace));
    s.attn_workspace = nullptr;
    s.attn_workspace_bytes = 0;
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMalloc(&s.attn_workspace, bytes));
    s.attn_workspace_bytes = bytes;
  }
  s.step_workspace = s.attn_workspace;
  s.layout = &l;
  return absl::OkStatus();
}

// Picks the step's attention kernel from its shape: the decode kernel when every sequence has
// one query (planned for KV lengths up to `plan_kv_len`), the prefill kernel otherwise, the
// simple kernel where neither applies. Sets s.path and the plan; allocates nothing.
void CudaBackend::PlanAttention(CudaStream& s, int32_t num_seqs, int32_t plan_kv_len) {
  const AttentionShape& a = kv_shape_;
  s.path = CudaAttentionPath::kSimple;
  if (options_.attention == CudaBackendOptions::Attention::kSimple) return;
  if (s.max_q_len == 1) {
    kernels::PagedDecodeShape shape;
    shape.num_seqs = num_seqs;
    shape.num_q_heads = a.num_q_heads;
    shape.num_kv_heads = a.num_kv_heads;
    shape.head_dim = a.head_dim;
    shape.max_kv_len = plan_kv_len;
    if (!kernels::PagedDecodeSupports(shape)) return;
    s.decode_plan = kernels::Plan(shape, num_sms_);
    if (s.decode_plan.num_splits <= 0) return;
    s.path = CudaAttentionPath::kDecode;
    return;
  }
  kernels::PagedPrefillShape shape;
  shape.num_seqs = num_seqs;
  shape.num_q_heads = a.num_q_heads;
  shape.num_kv_heads = a.num_kv_heads;
  shape.head_dim = a.head_dim;
  shape.max_q_len = s.max_q_len;
  if (!IsPowerOfTwo(page_size_) || !kernels::PagedPrefillSupports(shape)) return;
  s.prefill_plan = kernels::Plan(shape, num_sms_);
  if (s.prefill_plan.kernel == kernels::PagedPrefillKernel::kNone) return;
  s.path = CudaAttentionPath::kPrefill;
}

std::string_view CudaBackend::PlannedAttention(const BackendStream& stream) {
  switch (static_cast<const CudaStream&>(stream).path) {
    case CudaAttentionPath::kDecode: return "decode";
    case CudaAttentionPath::kPrefill: return "prefill";
    case CudaAttentionPath::kSimple: return "simple";
    case CudaAttentionPath::kNone: break;
  }
  return "none";
}

// --- Operators -----------------------------------------------------------------------------------

absl::Status CudaBackend::Embed(BackendStream& stream, absl::Span<const int32_t> tokens,
                                const Tensor& table, Tensor out) {
  CudaStream& s = Cuda(stream);
  SIEVE_RETURN_IF_ERROR(LayoutOf(s).status());
  SIEVE_RETURN_IF_ERROR(CheckShape(out, tokens.size(), table.cols, "embedding output"));
  for (int32_t t : tokens) {
    if (t < 0 || t >= table.rows) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", t, " out of range"));
    }
  }
  const int32_t* ids = nullptr;
  if (s.graph != nullptr) {
    // A graph step's tokens are already in the slot's fixed input buffer.
    if (tokens.data() != s.graph_tokens ||
        static_cast<int64_t>(tokens.size()) != s.graph->num_seqs) {
      return absl::InternalError("cuda backend: a graph step embeds the tokens it was begun with");
    }
    s.graph->embed_rows = table.rows;
    ids = reinterpret_cast<const int32_t*>(s.graph->dev_in + s.graph->off_tokens);
  } else {
    SIEVE_ASSIGN_OR_RETURN(void* staged, Stage(s, tokens.data(), tokens.size() * sizeof(int32_t)));
    ids = static_cast<const int32_t*>(staged);
  }
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::GatherRowsBf16(B(table), table.rows, table.cols, ids,
                                                     tokens.size(), B(out), s.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::RmsNorm(BackendStream& stream, const Tensor& x, const Tensor& weight,
                                  float eps, Tensor out) {
  CudaStream& s = Cuda(stream);
  SIEVE_RETURN_IF_ERROR(CheckShape(out, x.rows, x.cols, "norm output"));
  SIEVE_RETURN_IF_ERROR(CheckShape(weight, 1, x.cols, "norm weight"));
  SIEVE_RETURN_IF_CUDA_ERROR(
      kernels::RmsNormBf16(B(x), B(weight), x.rows, x.cols, eps, B(out), s.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::AddRmsNorm(BackendStream& stream, const Tensor& x, Tensor residual,
                                     const Tensor& weight, float eps, Tensor out) {
  CudaStream& s = Cuda(stream);
  SIEVE_RETURN_IF_ERROR(CheckShape(residual, x.rows, x.cols, "residual"));
  SIEVE_RETURN_IF_ERROR(CheckShape(out, x.rows, x.cols, "norm output"));
  SIEVE_RETURN_IF_ERROR(CheckShape(weight, 1, x.cols, "norm weight"));
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::AddRmsNormBf16(B(x), B(residual), B(weight), x.rows, x.cols,
                                                     eps, B(out), s.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::Linear(BackendStream& stream, const Tensor& x, const Tensor& weight,
                                 const Tensor& bias, Tensor out) {
  CudaStream& s = Cuda(stream);
  if (x.cols != weight.cols) {
    return absl::InternalError(absl::StrCat("cuda backend: linear input has ", x.cols,
                                            " columns, weight expects ", weight.cols));
  }
  SIEVE_RETURN_IF_ERROR(CheckShape(out, x.rows, weight.rows, "linear output"));
  if (!bias.empty()) SIEVE_RETURN_IF_ERROR(CheckShape(bias, 1, weight.rows, "linear bias"));
  kernels::GemmArgs g;
  g.x = B(x);
  g.w = B(weight);
  g.bias = bias.empty() ? nullptr : B(bias);
  g.y = B(out);
  g.m = x.rows;
  g.n = weight.rows;
  g.k = x.cols;
  // One row (a batch-1 decode step): our GEMV streams the narrow layers' weights faster than
  // cuBLASLt's small-m kernels and needs no split-K reduction (kernels/cuda/gemv.h). From two
  // rows on cuBLASLt is as fast or faster (bench/gemv_bench.cu; H200 2026-12-04: at 4 rows the
  // GEMV took 2x as long), so it keeps those.
  if (g.m == 1 && kernels::GemvSupported(g)) {
    SIEVE_RETURN_IF_CUDA_ERROR(kernels::GemvBf16(g, s.stream));
    return absl::OkStatus();
  }
  SIEVE_RETURN_IF_CUDA_ERROR(s.gemm.Run(g, s.gemm_workspace, s.gemm_workspace_bytes, s.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::RopeAndCacheKv(BackendStream& stream, int32_t layer, const Tensor& qkv,
                                         const AttentionShape& a, const RopeTables& rope,
                                         Tensor q_out) {
  CudaStream& s = Cuda(stream);
  SIEVE_ASSIGN_OR_RETURN(const BatchLayout* l, LayoutOf(s));
  if (layer < 0 || layer >= num_layers_ || a.num_kv_heads != kv_shape_.num_kv_heads ||
      a.head_dim != kv_shape_.head_dim || a.num_q_heads != kv_shape_.num_q_heads) {
    return absl::InternalError("cuda backend: layer or attention shape does not match the KV cache");
  }
  const int64_t d = a.head_dim, q_cols = a.num_q_heads * d, kv_cols = a.num_kv_heads * d;
  const int64_t n = l->num_tokens();
  if (qkv.cols != q_cols + 2 * kv_cols || qkv.rows < n) {
    return absl::InternalError("cuda backend: qkv has the wrong shape");
  }
  SIEVE_RETURN_IF_ERROR(CheckShape(q_out, n, q_cols, "query output"));
  const int64_t half = static_cast<int64_t>(rope.inv_freq.size());
  if (half > kernels::kMaxRopePairs || 2 * half > d) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: ", half,
                                                   " rotary pairs do not fit head_dim ", d));
  }
  kernels::RopeQkvParams p;
  p.qkv = B(qkv);
  p.qkv_stride = qkv.cols;
  p.q_out = B(q_out);
  p.k_cache = static_cast<bf16*>(kv_) + 2 * layer * kv_layer_elems_;
  p.v_cache = p.k_cache + kv_layer_elems_;
  p.positions = s.positions;
  p.slots = s.slots;
  p.num_slots = int64_t{num_pages_} * page_size_;
  p.num_tokens = static_cast<int32_t>(n);
  p.num_q_heads = a.num_q_heads;
  p.num_kv_heads = a.num_kv_heads;
  p.head_dim = a.head_dim;
  p.half_rot = static_cast<int32_t>(half);
  p.attention_scaling = rope.attention_scaling;
  std::copy(rope.inv_freq.begin(), rope.inv_freq.end(), p.inv_freq);
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::RopeQkvAndCacheKvBf16(p, s.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::Attention(BackendStream& stream, int32_t layer, const Tensor& q,
                                    const AttentionShape& a, float scale,
                                    const AttentionPlan& plan, Tensor out) {
  CudaStream& s = Cuda(stream);
  SIEVE_ASSIGN_OR_RETURN(const BatchLayout* l, LayoutOf(s));
  if (layer < 0 || layer >= num_layers_ || a.num_kv_heads != kv_shape_.num_kv_heads ||
      a.head_dim != kv_shape_.head_dim || a.num_q_heads != kv_shape_.num_q_heads) {
    return absl::InternalError("cuda backend: layer or attention shape does not match the KV cache");
  }
  const int64_t q_cols = int64_t{a.num_q_heads} * a.head_dim;
  SIEVE_RETURN_IF_ERROR(CheckShape(q, l->num_tokens(), q_cols, "attention query"));
  SIEVE_RETURN_IF_ERROR(CheckShape(out, l->num_tokens(), q_cols, "attention output"));
  kernels::PagedAttentionParams<bf16> p;
  p.q = B(q);
  p.k_cache = static_cast<const bf16*>(kv_) + 2 * layer * kv_layer_elems_;
  p.v_cache = p.k_cache + kv_layer_elems_;
  p.out = B(out);
  p.page_table = s.page_table;
  p.page_table_stride = l->page_table_stride;
  p.kv_lens = s.kv_lens;
  p.query_start = s.query_start;
  p.num_seqs = l->num_seqs();
  p.num_q_heads = a.num_q_heads;
  p.num_kv_heads = a.num_kv_heads;
  p.head_dim = a.head_dim;
  p.page_size = page_size_;
  p.scale = scale;
  if (!plan.dense) return cuda_internal::SparseDecodeAttention(s, layer, plan, p, num_sms_);
  switch (s.path) {
    case CudaAttentionPath::kDecode:
      SIEVE_RETURN_IF_CUDA_ERROR(
          kernels::PagedDecodeRun(p, s.decode_plan, s.step_workspace, s.stream));
      return absl::OkStatus();
    case CudaAttentionPath::kPrefill:
      SIEVE_RETURN_IF_CUDA_ERROR(kernels::PagedPrefillRun(p, s.prefill_plan, nullptr, s.stream));
      return absl::OkStatus();
    case CudaAttentionPath::kSimple:
      if (a.head_dim > kernels::kSimpleAttentionMaxHeadDim) {
        return absl::UnimplementedError(absl::StrCat("cuda backend: head_dim ", a.head_dim,
                                                     " is not supported"));
      }
      SIEVE_RETURN_IF_CUDA_ERROR(
          kernels::PagedAttentionSimpleRun(p, l->num_tokens(), s.stream));
      return absl::OkStatus();
    case CudaAttentionPath::kNone:
      break;
  }
  return absl::InternalError("cuda backend: no attention plan for this step");
}

absl::Status CudaBackend::SiluMul(BackendStream& stream, const Tensor& gate_up, Tensor out) {
  CudaStream& s = Cuda(stream);
  if (gate_up.cols % 2 != 0) return absl::InternalError("cuda backend: gate_up has odd width");
  SIEVE_RETURN_IF_ERROR(CheckShape(out, gate_up.rows, gate_up.cols / 2, "activation output"));
  SIEVE_RETURN_IF_CUDA_ERROR(
      kernels::SiluMulBf16(B(gate_up), gate_up.rows, gate_up.cols / 2, B(out), s.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::GatherRows(BackendStream& stream, const Tensor& x,
                                     absl::Span<const int32_t> rows, Tensor out) {
  CudaStream& s = Cuda(stream);
  SIEVE_RETURN_IF_ERROR(LayoutOf(s).status());
  SIEVE_RETURN_IF_ERROR(NotInGraphStep(s, "GatherRows"));
  SIEVE_RETURN_IF_ERROR(CheckShape(out, rows.size(), x.cols, "gather output"));
  for (int32_t r : rows) {
    if (r < 0 || r >= x.rows) return absl::InternalError("gather row out of range");
  }
  SIEVE_ASSIGN_OR_RETURN(void* ids, Stage(s, rows.data(), rows.size() * sizeof(int32_t)));
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::GatherRowsBf16(B(x), x.rows, x.cols,
                                                     static_cast<const int32_t*>(ids),
                                                     rows.size(), B(out), s.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyToHost(BackendStream& stream, const Tensor& x,
                                     absl::Span<float> out) {
  CudaStream& s = Cuda(stream);
  SIEVE_RETURN_IF_ERROR(NotInGraphStep(s, "CopyToHost"));
  const int64_t n = x.rows * x.cols;
  if (static_cast<int64_t>(out.size()) != n) {
    return absl::InternalError("cuda backend: host buffer size mismatch");
  }
  if (n == 0) return absl::OkStatus();
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  SIEVE_RETURN_IF_ERROR(EnsureDeviceFloats(s, n));
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::Bf16ToFloat(B(x), n, s.f32_dev, s.stream));
  return cuda_internal::CopyFloatsToHost(s, s.f32_dev, out);
}

absl::Status CudaBackend::Synchronize(BackendStream& stream) {
  CudaStream& s = Cuda(stream);
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamIsCapturing(s.stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    // Synchronizing would invalidate the recording; a graph step ends with EndGraphStep*.
    return absl::FailedPreconditionError("cuda backend: Synchronize inside a graph recording");
  }
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
  return absl::OkStatus();
}

absl::StatusOr<DeviceLogits> CudaBackend::LogitsOnDevice(BackendStream& stream, const Tensor& x,
                                                         const Tensor& lm_head) {
  CudaStream& s = Cuda(stream);
  SIEVE_RETURN_IF_ERROR(NotInGraphStep(s, "LogitsOnDevice"));
  if (x.data == nullptr || x.cols != lm_head.cols || lm_head.data == nullptr) {
    return absl::InternalError(absl::StrCat("cuda backend: logits input has ", x.cols,
                                            " columns, lm_head expects ", lm_head.cols));
  }
  const int64_t n = x.rows * lm_head.rows;
  if (n == 0) return DeviceLogits{};
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  SIEVE_RETURN_IF_ERROR(EnsureDeviceFloats(s, n));
  kernels::GemmArgs g;
  g.x = B(x);
  g.w = B(lm_head);
  g.y_f32 = s.f32_dev;
  g.m = x.rows;
  g.n = lm_head.rows;
  g.k = x.cols;
  SIEVE_RETURN_IF_CUDA_ERROR(s.gemm.Run(g, s.gemm_workspace, s.gemm_workspace_bytes, s.stream));
  return DeviceLogits{s.f32_dev, x.rows, lm_head.rows};
}

absl::Status CudaBackend::CopyLogitsToHost(BackendStream& stream, const DeviceLogits& logits,
                                           absl::Span<float> host_out) {
  CudaStream& s = Cuda(stream);
  const int64_t size = static_cast<int64_t>(host_out.size());
  if (logits.vocab <= 0 || size % logits.vocab != 0 || size > logits.rows * logits.vocab) {
    return absl::InternalError(absl::StrCat("cuda backend: ", size, " logits asked of ",
                                            logits.rows, " rows of ", logits.vocab));
  }
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  return cuda_internal::CopyFloatsToHost(s, logits.data, host_out);
}

absl::Status CudaBackend::Logits(BackendStream& stream, const Tensor& x, const Tensor& lm_head,
                                 absl::Span<float> host_out) {
  if (static_cast<int64_t>(host_out.size()) != x.rows * lm_head.rows) {
    return absl::InternalError("cuda backend: logits buffer size mismatch");
  }
  SIEVE_ASSIGN_OR_RETURN(const DeviceLogits logits, LogitsOnDevice(stream, x, lm_head));
  if (logits.empty()) return absl::OkStatus();
  return CopyLogitsToHost(stream, logits, host_out);
}

}  // namespace sieve::engine
