// A simple, shape-general causal paged attention kernel for the GPU: bf16 in and out, fp32
// scores, softmax and accumulation. It is the CUDA backend's fallback for shapes the fast kernels
// (paged_decode.h, paged_prefill.h) do not take: any head_dim up to 256, any page size, any
// group size, prefill and decode rows mixed in one call. It is correct first and not fast: one
// block of four warps per (query token, query head), each warp streaming a quarter of the keys
// with an online softmax, the four partial results merged through shared memory.
//
// Layout and semantics are those of kernels/attention/paged_attention.h.
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_SIMPLE_H_
#define SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_SIMPLE_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/attention/paged_attention.h"

namespace sieve::kernels {

// Largest head_dim the simple kernel takes.
inline constexpr int kSimpleAttentionMaxHeadDim = 256;

// Runs attention for the `num_tokens` query rows of p (query_start[num_seqs] == num_tokens) on
// `stream`. Requirements (else cudaErrorInvalidValue, nothing launched): 1 <= head_dim <= 256,
// num_q_heads a positive multiple of num_kv_heads, page_size >= 1, non-null pointers when
// num_tokens > 0. A query whose position is negative (kv_lens[s] < q_len) gets a zero row.
// Never allocates or synchronizes.
cudaError_t PagedAttentionSimpleRun(const PagedAttentionParams<__nv_bfloat16>& p,
                                    int32_t num_tokens, cudaStream_t stream);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_SIMPLE_H_
