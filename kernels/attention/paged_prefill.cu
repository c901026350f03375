// Plan and launch of the paged prefill kernels (see paged_prefill.h; the kernels live in
// paged_prefill_mma.cuh and paged_prefill_wgmma.cuh).
#include "kernels/attention/paged_prefill.h"

#include <cmath>

#include "kernels/attention/paged_prefill_mma.cuh"
#include "kernels/attention/paged_prefill_wgmma.cuh"
#include "kernels/cuda_check.h"

namespace sieve::kernels {
namespace {

using prefill_detail::MmaCfg;
using prefill_detail::PrefillArgs;
using prefill_detail::WgCfg;

constexpr int kMaxGridYZ = 65535;

template <int D>
const void* WgmmaKernel(int schedule) {
  switch (schedule) {
    case 0: return reinterpret_cast<const void*>(prefill_detail::PrefillWgmmaKernel<D, 0>);
    case 1: return reinterpret_cast<const void*>(prefill_detail::PrefillWgmmaKernel<D, 1>);
    case 2: return reinterpret_cast<const void*>(prefill_detail::PrefillWgmmaKernel<D, 2>);
    default: return nullptr;
  }
}

const void* KernelFor(PagedPrefillKernel kernel, int head_dim, int overlap) {
  if (kernel == PagedPrefillKernel::kWgmma) {
    if (head_dim == 128) return WgmmaKernel<128>(overlap);
    if (head_dim == 64) return WgmmaKernel<64>(overlap);
  } else if (kernel == PagedPrefillKernel::kMmaSync) {
    if (head_dim == 128) return reinterpret_cast<const void*>(prefill_detail::PrefillMmaKernel<128>);
    if (head_dim == 64) return reinterpret_cast<const void*>(prefill_detail::PrefillMmaKernel<64>);
  }
  return nullptr;
}

int SharedBytesFor(PagedPrefillKernel kernel, int head_dim) {
  if (kernel == PagedPrefillKernel::kWgmma) {
    return head_dim == 128 ? WgCfg<128>::kSmemBytes : WgCfg<64>::kSmemBytes;
  }
  return head_dim == 128 ? MmaCfg<128>::kSmemBytes : MmaCfg<64>::kSmemBytes;
}

bool IsPowerOfTwo(int x) { return x > 0 && (x & (x - 1)) == 0; }

}  // namespace

bool PagedPrefillSupports(const PagedPrefillShape& shape) {
  return (shape.head_dim == 64 || shape.head_dim == 128) && shape.num_kv_heads > 0 &&
         shape.num_q_heads > 0 && shape.num_q_heads % shape.num_kv_heads == 0 &&
         shape.num_q_heads <= kMaxGridYZ && shape.num_seqs >= 1 &&
         shape.num_seqs <= kMaxGridYZ && shape.max_q_len >= 1;
}

PagedPrefillPlan Plan(const PagedPrefillShape& shape, int num_sms, PagedPrefillKernel kernel) {
  PagedPrefillPlan plan;
  plan.shape = shape;
  if (!PagedPrefillSupports(shape) || num_sms < 1 || kernel == PagedPrefillKernel::kNone) {
    return plan;
  }
  if (kernel == PagedPrefillKernel::kAuto) kernel = PagedPrefillKernel::kWgmma;
  plan.kernel = kernel;
  if (kernel == PagedPrefillKernel::kWgmma) {
    plan.block_m = WgCfg<128>::kBlockM;
    plan.block_n = WgCfg<128>::kBlockN;
    plan.threads = WgCfg<128>::kThreads;
    plan.overlap = 1;
  } else {
    plan.block_m = MmaCfg<128>::kBlockM;
    plan.block_n = MmaCfg<128>::kBlockN;
    plan.threads = MmaCfg<128>::kThreads;
  }
  plan.grid_m = (shape.max_q_len + plan.block_m - 1) / plan.block_m;
  plan.shared_bytes = SharedBytesFor(kernel, shape.head_dim);
  plan.workspace_bytes = 0;
  return plan;
}

const void* PagedPrefillKernelForTesting(const PagedPrefillPlan& plan) {
  return KernelFor(plan.kernel, plan.shape.head_dim, plan.overlap);
}

cudaError_t PagedPrefillRun(const PagedAttentionParams<__nv_bfloat16>& p,
                            const PagedPrefillPlan& plan, void* workspace, cudaStream_t stream) {
  const void* kernel = KernelFor(plan.kernel, plan.shape.head_dim, plan.overlap);
  const bool ok = kernel != nullptr && p.num_q_heads == plan.shape.num_q_heads &&
                  p.num_kv_heads == plan.shape.num_kv_heads &&
                  p.head_dim == plan.shape.head_dim && p.num_seqs >= 0 &&
                  p.num_seqs <= plan.shape.num_seqs && IsPowerOfTwo(p.page_size) &&
                  std::isfinite(p.scale) && p.scale > 0.0f && plan.grid_m >= 1 &&
                  p.q != nullptr && p.k_cache != nullptr && p.v_cache != nullptr &&
                  p.out != nullptr && p.page_table != nullptr && p.kv_lens != nullptr &&
                  p.query_start != nullptr && p.page_table_stride >= 1;
  if (!ok) return cudaErrorInvalidValue;
  // Block-sparse: query blocks of the kernels' 128 rows with key blocks of whole tiles (64 keys
  // for mma.sync, 128 for wgmma) and no single columns, or (MInference plans, mma.sync only)
  // query and key blocks of 64 with single columns allowed.
  const SparseAttentionIndex* sp = p.sparse;
  const bool wgmma = plan.kernel == PagedPrefillKernel::kWgmma;
  const int key_tile = wgmma ? WgCfg<128>::kBlockN : MmaCfg<128>::kBlockN;
  const bool vs = sp != nullptr && !wgmma && sp->query_block == MmaCfg<128>::kBlockM / 2;
  if (sp != nullptr &&
      (!sp->query_block_start || !sp->row_start || !sp->key_blocks ||
       (vs ? sp->key_block != MmaCfg<128>::kBlockN ||
                 (sp->column_start != nullptr && sp->columns == nullptr)
           : sp->query_block != MmaCfg<128>::kBlockM || sp->key_block < key_tile ||
                 sp->key_block % key_tile != 0 || sp->column_start != nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (vs) {
    kernel = p.head_dim == 128
                 ? reinterpret_cast<const void*>(prefill_detail::PrefillMmaKernel<128, true>)
                 : reinterpret_cast<const void*>(prefill_detail::PrefillMmaKernel<64, true>);
  }
  if (p.num_seqs == 0) return cudaSuccess;
  (void)workspace;

  PrefillArgs args;
  args.q = p.q;
  args.k_cache = p.k_cache;
  args.v_cache = p.v_cache;
  args.out = p.out;
  args.page_table = p.page_table;
  args.kv_lens = p.kv_lens;
  args.query_start = p.query_start;
  args.page_table_stride = p.page_table_stride;
  args.num_q_heads = p.num_q_heads;
  args.num_kv_heads = p.num_kv_heads;
  args.group = p.num_q_heads / p.num_kv_heads;
  args.page_shift = 0;
  while ((1 << args.page_shift) < p.page_size) ++args.page_shift;
  args.scale_log2 = p.scale * 1.4426950408889634f;
  args.bsr_qblock_start = sp ? sp->query_block_start : nullptr;
  args.bsr_row_start = sp ? sp->row_start : nullptr;
  args.bsr_key_blocks = sp ? sp->key_blocks : nullptr;
  args.bsr_tiles_per_block = sp ? sp->key_block / key_tile : 0;
  args.bsr_column_start = vs ? sp->column_start : nullptr;
  args.bsr_columns = vs ? sp->columns : nullptr;

  const int shared_bytes = SharedBytesFor(plan.kernel, p.head_dim);
  SIEVE_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes));
  const dim3 grid(plan.grid_m, p.num_q_heads, p.num_seqs);
  const int threads = plan.kernel == PagedPrefillKernel::kWgmma ? WgCfg<128>::kThreads
                                                                 : MmaCfg<128>::kThreads;
  void* kernel_args[] = {&args};
  SIEVE_CUDA_RETURN_IF_ERROR(
      cudaLaunchKernel(kernel, grid, dim3(threads), kernel_args, shared_bytes, stream));
  return cudaSuccess;
}

}  // namespace sieve::kernels
