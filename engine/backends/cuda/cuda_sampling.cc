// CudaBackend::Sample (contract in engine/backend.h): the host validates each row as the CPU
// reference does, lists the tokens its penalties touch, uploads the rows with one copy, runs the
// sampling kernel (kernels/cuda/sampling.h) on the stream after the step's work, and reads back
// only the per-row results. Small batches split each row over several blocks (the kernel's plan
// for the device, made on the stream's first Sample and kept); their workspace sits in front of
// the stream's device sampling buffer.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backends/cuda/cuda_backend.h"
#include "engine/backends/cuda/cuda_stream.h"
#include "engine/status_macros.h"
#include "kernels/cuda/sampling.h"

namespace sieve::engine {
namespace {

using cuda_internal::Align256;
using cuda_internal::Cuda;

// Appends the tokens of `history` that the penalties of `p` apply to (as ApplyPenalties picks
// them); InvalidArgument, with ApplyPenalties' message, for an id outside the vocabulary.
absl::Status AppendPenalties(const SamplingParams& p, const TokenHistory& history, int64_t vocab,
                             std::vector<kernels::PenaltyEntry>& out) {
  const bool repetition = p.repetition_penalty != 1.0f;
  const bool additive = p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
  if (!repetition && !additive) return absl::OkStatus();
  for (const auto& [id, counts] : history.counts()) {
    const bool generated = counts.generated > 0;
    if (!generated && !(repetition && counts.prompt > 0)) continue;
    if (id < 0 || id >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("token history holds id ", id, " outside the vocabulary of ", vocab));
    }
    out.push_back(kernels::PenaltyEntry{id, counts.prompt, counts.generated});
  }
  return absl::OkStatus();
}

// Makes the stream's sampling buffers hold `bytes`: pinned host bytes for the rows, penalty
// entries and results, and on the device the kernel's workspace (`workspace_bytes`, zero-filled
// when allocated, as SampleRun requires) followed by a mirror of the host bytes. The workspace
// size comes from the stream's plan (made once for its device) and so is the same on every call.
// Sample waits for its copies before returning, so nothing is in flight here.
absl::Status EnsureSampleBuffers(CudaStream& s, size_t bytes, size_t workspace_bytes) {
  if (bytes <= s.sample_bytes) return absl::OkStatus();
  const size_t size = std::max<size_t>(Align256(bytes), std::max<size_t>(2 * s.sample_bytes, 1 << 16));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaFreeHost(s.sample_host));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaFree(s.sample_dev));
  s.sample_host = nullptr;
  s.sample_dev = nullptr;
  s.sample_bytes = 0;
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMallocHost(reinterpret_cast<void**>(&s.sample_host), size));
  SIEVE_RETURN_IF_CUDA_ERROR(
      cudaMalloc(reinterpret_cast<void**>(&s.sample_dev), Align256(workspace_bytes) + size));
  if (workspace_bytes > 0) {
    SIEVE_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(s.sample_dev, 0, workspace_bytes, s.stream));
  }
  s.sample_bytes = size;
  return absl::OkStatus();
}

// The kernel's parameters for one validated row (row `logits_row` of the logits).
kernels::SampleRowParams RowParams(const SampleRow& row, int64_t logits_row, int32_t begin,
                                   int32_t count) {
  const SamplingParams& p = *row.params;
  kernels::SampleRowParams k;
  k.uniform = row.uniform;
  k.logits_row = logits_row;
  k.temperature = p.temperature;
  k.top_p = p.top_p;
  k.min_p = p.min_p;
  k.repetition_penalty = p.repetition_penalty;
  k.presence_penalty = p.presence_penalty;
  k.frequency_penalty = p.frequency_penalty;
  k.top_k = p.top_k;
  k.top_logprobs = p.top_logprobs;
  k.want_logprob = p.return_logprob ? 1 : 0;
  k.penalty_begin = begin;
  k.penalty_count = count;
  return k;
}

// The row's token, or its error with the reference's message (engine/sampling.cc ScanLogits).
absl::StatusOr<SampledToken> ToToken(const kernels::SampleRowResult& r, int64_t vocab,
                                     const SamplingParams& p) {
  switch (r.status) {
    case kernels::kSampleOk:
      break;
    case kernels::kSampleBadLogit:
      return absl::InternalError(absl::StrCat("logits hold ", r.error_value, " at token ",
                                              r.error_index, " of ", vocab,
                                              "; refusing to sample"));
    case kernels::kSampleAllNegInf:
      return absl::InternalError(
          absl::StrCat("all ", vocab, " logits are -inf; nothing to sample"));
    default:
      return absl::InternalError(absl::StrCat("cuda backend: sampling status ", r.status));
  }
  if (r.id < 0 || r.id >= vocab || r.num_top < 0 || r.num_top > kernels::kSampleMaxTop) {
    return absl::InternalError(absl::StrCat("cuda backend: sampled id ", r.id, " with ",
                                            r.num_top, " alternatives"));
  }
  SampledToken t;
  t.id = r.id;
  if (p.return_logprob || p.top_logprobs > 0) t.logprob = r.logprob;
  t.top.reserve(r.num_top);
  for (int32_t i = 0; i < r.num_top; ++i) t.top.emplace_back(r.top_ids[i], r.top_logprobs[i]);
  return t;
}

}  // namespace

absl::Status CudaBackend::Sample(BackendStream& stream, const DeviceLogits& logits,
                                 absl::Span<const SampleRow> rows,
                                 absl::Span<absl::StatusOr<SampledToken>> out) {
  CudaStream& s = Cuda(stream);
  if (rows.size() != out.size() || static_cast<int64_t>(rows.size()) > logits.rows ||
      (!rows.empty() && (logits.data == nullptr || logits.vocab <= 0))) {
    return absl::InternalError(absl::StrCat("cuda backend: ", rows.size(), " rows to sample into ",
                                            out.size(), " results from ", logits.rows,
                                            " rows of logits"));
  }
  if (rows.empty()) return absl::OkStatus();
  if (s.graph != nullptr) {
    return absl::FailedPreconditionError("cuda backend: Sample inside a graph step");
  }
  // Host side: validate, list penalties. Rows that fail here never reach the device.
  std::vector<kernels::SampleRowParams> params;
  std::vector<kernels::PenaltyEntry> penalties;
  std::vector<size_t> index;  // out index of each kernel row
  for (size_t i = 0; i < rows.size(); ++i) {
    const SampleRow& row = rows[i];
    if (row.params == nullptr || row.history == nullptr) {
      out[i] = absl::InternalError("cuda backend: a row to sample has no parameters or history");
      continue;
    }
    if (absl::Status st = row.params->Validate(); !st.ok()) {
      out[i] = st;
      continue;
    }
    const size_t begin = penalties.size();
    if (absl::Status st = AppendPenalties(*row.params, *row.history, logits.vocab, penalties);
        !st.ok()) {
      penalties.resize(begin);
      out[i] = st;
      continue;
    }
    params.push_back(RowParams(row, static_cast<int64_t>(i), static_cast<int32_t>(begin),
                               static_cast<int32_t>(penalties.size() - begin)));
    index.push_back(i);
  }
  const size_t n = params.size();
  if (n == 0) return absl::OkStatus();
  // One block: rows, penalty entries, then the results the kernel writes; on the device after
  // the kernel's workspace.
  const size_t off_penalties = Align256(n * sizeof(kernels::SampleRowParams));
  const size_t off_results =
      off_penalties + Align256(penalties.size() * sizeof(kernels::PenaltyEntry));
  const size_t result_bytes = n * sizeof(kernels::SampleRowResult);
  SIEVE_RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device));
  if (!s.sample_plan_ready) {  // the device's counts, queried once per stream
    SIEVE_RETURN_IF_CUDA_ERROR(kernels::SamplePlanForCurrentDevice({}, &s.sample_plan));
    s.sample_plan_ready = true;
  }
  const kernels::SamplePlan& plan = s.sample_plan;
  SIEVE_RETURN_IF_ERROR(EnsureSampleBuffers(s, off_results + result_bytes, plan.workspace_bytes));
  void* workspace = plan.workspace_bytes > 0 ? s.sample_dev : nullptr;
  char* dev = s.sample_dev + Align256(plan.workspace_bytes);
  std::memcpy(s.sample_host, params.data(), n * sizeof(kernels::SampleRowParams));
  if (!penalties.empty()) {
    std::memcpy(s.sample_host + off_penalties, penalties.data(),
                penalties.size() * sizeof(kernels::PenaltyEntry));
  }
  SIEVE_RETURN_IF_CUDA_ERROR(
      cudaMemcpyAsync(dev, s.sample_host, off_results, cudaMemcpyHostToDevice, s.stream));
  kernels::SampleParams k;
  k.logits = logits.data;
  k.vocab = logits.vocab;
  k.rows = reinterpret_cast<const kernels::SampleRowParams*>(dev);
  k.penalties = reinterpret_cast<const kernels::PenaltyEntry*>(dev + off_penalties);
  k.results = reinterpret_cast<kernels::SampleRowResult*>(dev + off_results);
  k.num_rows = static_cast<int32_t>(n);
  SIEVE_RETURN_IF_CUDA_ERROR(kernels::SampleRun(k, plan, workspace, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(s.sample_host + off_results, dev + off_results,
                                             result_bytes, cudaMemcpyDeviceToHost, s.stream));
  SIEVE_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s.stream));
  const auto* results = reinterpret_cast<const kernels::SampleRowResult*>(s.sample_host + off_results);
  for (size_t r = 0; r < n; ++r) {
    out[index[r]] = ToToken(results[r], logits.vocab, *rows[index[r]].params);
  }
  return absl::OkStatus();
}

}  // namespace sieve::engine
