// Token sampling on the GPU (contract and method in sampling.h). One templated body samples a row
// (sampling_row.cuh, on the device code of sampling_device.cuh); two kernels run it: one block per
// row (kMulti false), or several blocks per row that exchange partial results through a workspace
// (kMulti true, a cooperative launch). This file holds the kernels, the plan and the launch.
#include "kernels/cuda/sampling.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/sampling_device.cuh"
#include "kernels/cuda/sampling_row.cuh"
#include "kernels/cuda_check.h"

namespace sieve::kernels {
namespace {

using sampling_detail::Align256;
using sampling_detail::kBarrierStride;
using sampling_detail::kMaxVals;
using sampling_detail::kPerBlockBytes;
using sampling_detail::kThreads;
using sampling_detail::MultiLayout;
using sampling_detail::Row;
using sampling_detail::RowBytes;
using sampling_detail::RowWork;
using sampling_detail::SampleRowBody;
using sampling_detail::Shared;
using sampling_detail::u64;

__global__ void __launch_bounds__(kThreads, 1) SampleKernel(SampleParams p) {
  __shared__ Shared sm;
  Row rw;
  rw.end = p.vocab;
  SampleRowBody<false>(p, blockIdx.x, rw, sm);
}

__global__ void __launch_bounds__(kThreads, 1) SampleMultiKernel(SampleParams p, MultiLayout l) {
  __shared__ Shared sm;
  const int index = blockIdx.x / l.blocks;
  Row rw;
  rw.g = blockIdx.x % l.blocks;
  rw.blocks = l.blocks;
  const int64_t slice = (p.vocab + l.blocks - 1) / l.blocks;
  rw.begin = min(rw.g * slice, p.vocab);
  rw.end = min(rw.begin + slice, p.vocab);
  rw.bar = l.barriers + index * (kBarrierStride / sizeof(unsigned int));
  char* base = l.rows + index * l.row_bytes;
  rw.work = reinterpret_cast<RowWork*>(base);
  rw.parts = reinterpret_cast<u64*>(base + sizeof(RowWork));
  rw.bins = reinterpret_cast<unsigned int*>(base + sizeof(RowWork) +
                                            3 * l.blocks * kMaxVals * sizeof(u64));
  SampleRowBody<true>(p, index, rw, sm);
}

}  // namespace

SamplePlan MakeSamplePlan(int num_sms, int blocks_per_sm, bool cooperative,
                          const SamplePlanOptions& options) {
  SamplePlan plan;
  const int coresident = std::max(0, num_sms) * std::max(0, blocks_per_sm);
  int cap = options.max_blocks_per_row > 0 ? options.max_blocks_per_row : kSampleMaxBlocksPerRow;
  cap = std::min({cap, kSampleMaxBlocksPerRow, coresident});
  if (!cooperative || cap < 2) return plan;
  plan.max_rows = std::min(kSampleMaxMultiRows, coresident / 2);
  plan.max_blocks_per_row = cap;
  plan.coresident_blocks = coresident;
  // Barrier words, then per row RowBytes(g) with rows * g <= coresident.
  plan.workspace_bytes = Align256(plan.max_rows * kBarrierStride) +
                         plan.max_rows * (Align256(sizeof(RowWork)) + 256) +
                         Align256(coresident * kPerBlockBytes);
  return plan;
}

cudaError_t SamplePlanForCurrentDevice(const SamplePlanOptions& options, SamplePlan* plan) {
  if (plan == nullptr) return cudaErrorInvalidValue;
  int device = 0, sms = 0, coop = 0, per_sm = 0;
  SIEVE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  SIEVE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  SIEVE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  SIEVE_CUDA_RETURN_IF_ERROR(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, SampleMultiKernel, kThreads, 0));
  *plan = MakeSamplePlan(sms, per_sm, coop != 0, options);
  return cudaSuccess;
}

int32_t SampleBlocksPerRow(const SamplePlan& plan, int32_t num_rows, int64_t vocab) {
  if (plan.max_blocks_per_row < 2 || num_rows < 1 || num_rows > plan.max_rows) return 1;
  int64_t g = std::min<int64_t>(plan.max_blocks_per_row, plan.coresident_blocks / num_rows);
  g = std::min<int64_t>(g, (vocab + kThreads - 1) / kThreads);
  return g >= 2 ? static_cast<int32_t>(g) : 1;
}

cudaError_t SampleRun(const SampleParams& p, const SamplePlan& plan, void* workspace,
                      cudaStream_t stream) {
  if (p.num_rows < 0 || p.vocab < 1 || p.vocab >= INT32_MAX) return cudaErrorInvalidValue;
  if (p.num_rows == 0) return cudaSuccess;
  if (p.logits == nullptr || p.rows == nullptr || p.results == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int32_t blocks = SampleBlocksPerRow(plan, p.num_rows, p.vocab);
  if (blocks >= 2) {
    const size_t barrier_bytes = Align256(plan.max_rows * kBarrierStride);
    const size_t row_bytes = RowBytes(blocks);
    if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 256 != 0 ||
        barrier_bytes + p.num_rows * row_bytes > plan.workspace_bytes) {
      return cudaErrorInvalidValue;
    }
    MultiLayout l;
    l.barriers = static_cast<unsigned int*>(workspace);
    l.rows = static_cast<char*>(workspace) + barrier_bytes;
    l.row_bytes = row_bytes;
    l.blocks = blocks;
    SampleParams params = p;
    void* args[] = {&params, &l};
    const cudaError_t e = cudaLaunchCooperativeKernel(
        reinterpret_cast<const void*>(SampleMultiKernel), dim3(p.num_rows * blocks),
        dim3(kThreads), args, 0, stream);
    if (e != cudaErrorCooperativeLaunchTooLarge) {
      SIEVE_CUDA_RETURN_IF_ERROR(e);
      return cudaSuccess;
    }
    // Fewer blocks fit than the plan counted (e.g. the device is shared): one block per row.
    (void)cudaGetLastError();
  }
  SampleKernel<<<p.num_rows, kThreads, 0, stream>>>(p);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

cudaError_t SampleRun(const SampleParams& p, cudaStream_t stream) {
  return SampleRun(p, SamplePlan(), nullptr, stream);
}

}  // namespace sieve::kernels
