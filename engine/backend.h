// The device interface the model runs on: memory for weights, activations and the paged KV
// cache, and the operators of a Llama-family layer. CpuBackend (fp32, always built) and
// CudaBackend (bf16) implement it; ModelRunner drives it and owns no device code.
//
// Threading: memory calls (UploadWeight, Allocate, AllocateKvCache, CreateStream) are made by one
// thread at start-up. The operators run on a BackendStream; different streams may run at the same
// time on different threads (one per pool worker) as long as their steps write disjoint KV pages.
#ifndef SIEVE_ENGINE_BACKEND_H_
#define SIEVE_ENGINE_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/rope.h"
#include "engine/safetensors.h"

namespace sieve::engine {

// A non-owning row-major matrix in backend memory: `rows` x `cols` elements of the backend's
// element type (fp32 on the CPU, bf16 on CUDA), rows `cols` elements apart. The backend that
// made it owns the memory for its whole lifetime.
struct Tensor {
  void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;

  // The first `n` rows of this tensor (n <= rows).
  Tensor FirstRows(int64_t n) const { return Tensor{data, n, cols}; }
  bool empty() const { return data == nullptr; }
};

// Where the tokens of one step sit: host arrays the backend copies to the device in BeginStep.
// See kernels/attention/paged_attention.h for the meaning of each array.
struct BatchLayout {
  std::vector<int32_t> positions;    // [num_tokens] position of each token in its sequence
  std::vector<int64_t> slots;        // [num_tokens] KV slot (page * page_size + offset)
  std::vector<int32_t> query_start;  // [num_seqs + 1] prefix sums of tokens per sequence
  std::vector<int32_t> kv_lens;      // [num_seqs] KV tokens per sequence after this step
  std::vector<int32_t> page_table;   // [num_seqs * page_table_stride] page ids
  int32_t page_table_stride = 0;     // pages per row of page_table

  int32_t num_tokens() const { return static_cast<int32_t>(positions.size()); }
  int32_t num_seqs() const { return static_cast<int32_t>(kv_lens.size()); }
};

// Shape of the attention part of a layer: what the KV cache and RoPE need.
struct AttentionShape {
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
};

// An ordered queue of operators with the state of its current step (the batch layout and, on a
// GPU, the CUDA stream and device copies of the layout). One per worker thread.
class BackendStream {
 public:
  virtual ~BackendStream() = default;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // A short name for logs and model info: "cpu" or "cuda".
  virtual std::string_view name() const = 0;

  // Copies the given tensors, concatenated along their first dimension, into backend memory as
  // one [rows, cols] matrix, converting the element type (F32/F16/BF16 sources). 1-D parts
  // contribute their elements in order, so biases concatenate into one row. InvalidArgument if a
  // 2-D part's trailing size is not `cols` or the elements do not fill whole rows.
  virtual absl::StatusOr<Tensor> UploadWeight(absl::Span<const TensorView> parts, int64_t cols) = 0;

  // Allocates an uninitialised [rows, cols] activation buffer.
  virtual absl::StatusOr<Tensor> Allocate(int64_t rows, int64_t cols) = 0;

  // Allocates the paged KV cache: for each of `num_layers` layers, K and V pools of
  // [num_pages, page_size, num_kv_heads, head_dim] elements.
  virtual absl::Status AllocateKvCache(int32_t num_layers, int32_t num_pages, int32_t page_size,
                                       const AttentionShape& shape) = 0;

  // Bytes of one page across all layers, K and V (for sizing the pool from a memory budget).
  virtual int64_t KvPageBytes(int32_t num_layers, int32_t page_size,
                              const AttentionShape& shape) const = 0;

  // Creates a stream for one worker thread.
  virtual absl::StatusOr<std::unique_ptr<BackendStream>> CreateStream() = 0;

  // Makes `layout` the batch of the operators that follow on `stream`, until its next BeginStep.
  // `layout` must stay alive and unchanged until then.
  virtual absl::Status BeginStep(BackendStream& stream, const BatchLayout& layout) = 0;

  // out[t, :] = table[tokens[t], :] for the step's tokens.
  virtual absl::Status Embed(BackendStream& stream, absl::Span<const int32_t> tokens, const Tensor& table, Tensor out) = 0;

  // out = RmsNorm(x) * weight (weight: one row).
  virtual absl::Status RmsNorm(BackendStream& stream, const Tensor& x, const Tensor& weight, float eps, Tensor out) = 0;

  // residual += x; out = RmsNorm(residual) * weight.
  virtual absl::Status AddRmsNorm(BackendStream& stream, const Tensor& x, Tensor residual, const Tensor& weight,
                                  float eps, Tensor out) = 0;

  // out = x * weight^T (+ bias): weight is [n_out, k_in] as PyTorch stores it; bias one row or
  // empty.
  virtual absl::Status Linear(BackendStream& stream, const Tensor& x, const Tensor& weight, const Tensor& bias,
                              Tensor out) = 0;

  // Takes the fused projection qkv [num_tokens, (Hq + 2 Hkv) * D], applies RoPE to its q and k
  // parts at the step's positions, writes k and v into layer `layer`'s KV pages at the step's
  // slots, and writes the rotated queries to q_out [num_tokens, Hq * D].
  virtual absl::Status RopeAndCacheKv(BackendStream& stream, int32_t layer, const Tensor& qkv, const AttentionShape& shape,
                                      const RopeTables& rope, Tensor q_out) = 0;

  // Causal attention of the step's queries q [num_tokens, Hq * D] over layer `layer`'s KV
  // cache; out [num_tokens, Hq * D].
  virtual absl::Status Attention(BackendStream& stream, int32_t layer, const Tensor& q, const AttentionShape& shape,
                                 float scale, Tensor out) = 0;

  // out = silu(gate_up[:, :I]) * gate_up[:, I:], gate_up [num_tokens, 2I], out [num_tokens, I].
  virtual absl::Status SiluMul(BackendStream& stream, const Tensor& gate_up, Tensor out) = 0;

  // out[i, :] = x[rows[i], :].
  virtual absl::Status GatherRows(BackendStream& stream, const Tensor& x, absl::Span<const int32_t> rows, Tensor out) = 0;

  // Copies x to the host as fp32, waiting for the work before it to finish.
  virtual absl::Status CopyToHost(BackendStream& stream, const Tensor& x, absl::Span<float> out) = 0;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_BACKEND_H_
