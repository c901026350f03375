// Device helpers shared by the paged prefill kernels (internal to paged_prefill.cu): the kernel
// argument block and per-tile bookkeeping. The PTX wrappers they use (cp.async, ldmatrix,
// mma.sync, mbarrier, wgmma) are in kernels/cuda/ptx.cuh.
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_DEVICE_CUH_
#define SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_DEVICE_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/ptx.cuh"


namespace sieve::kernels::prefill_detail {

using bf16 = __nv_bfloat16;
using namespace ::sieve::kernels::ptx;  // the PTX wrappers

// Everything a prefill kernel reads, by value (see PagedAttentionParams for the layout).
struct PrefillArgs {
  const bf16* q;
  const bf16* k_cache;
  const bf16* v_cache;
  bf16* out;
  const int32_t* page_table;
  const int32_t* kv_lens;
  const int32_t* query_start;
  int32_t page_table_stride;
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t group;        // num_q_heads / num_kv_heads
  int32_t page_shift;   // log2(page_size)
  float scale_log2;     // softmax scale * log2(e): scores live in the exp2 domain
  // Block-sparse attention (all null for dense): the BSR index of
  // kernels/attention/paged_attention.h with query blocks of the kernels' 128 rows: row
  // (bsr_qblock_start[s] + m0 / 128) * num_q_heads + h lists the key blocks of
  // bsr_tiles_per_block K/V tiles (64 keys for mma.sync, 128 for wgmma) that query tile m0 of
  // head h reads.
  const int32_t* bsr_qblock_start;
  const int32_t* bsr_row_start;
  const int32_t* bsr_key_blocks;
  int32_t bsr_tiles_per_block;
  // The kVs mode (MInference plans): rows are 64-query blocks, key blocks 64 keys, and row r
  // also reads the single key positions bsr_columns[bsr_column_start[r] ..
  // bsr_column_start[r + 1]) (increasing); bsr_column_start may be null (no columns).
  const int32_t* bsr_column_start;
  const int32_t* bsr_columns;
};

// One (sequence, query head) of a block and the tiles it owns.
struct SeqInfo {
  int32_t q_begin;   // first packed query row of the sequence
  int32_t q_len;     // query rows of the sequence
  int32_t kv_len;    // keys of the sequence
  int32_t q_off;     // position of query row 0: kv_len - q_len
  int32_t m_tiles;   // query tiles of block_m rows
  int32_t seq;       // the sequence's index in the batch
};

__device__ __forceinline__ SeqInfo LoadSeqInfo(const PrefillArgs& a, int s, int block_m) {
  SeqInfo si;
  si.q_begin = a.query_start[s];
  si.q_len = a.query_start[s + 1] - si.q_begin;
  si.kv_len = a.kv_lens[s];
  si.q_off = si.kv_len - si.q_len;
  si.m_tiles = si.q_len > 0 ? (si.q_len + block_m - 1) / block_m : 0;
  si.seq = s;
  return si;
}

// Element offset of key `token` of KV head `kv_head` in the cache (head_dim D).
template <int D>
__device__ __forceinline__ int64_t KvRowOffset(const PrefillArgs& a, const int32_t* pages,
                                               int token, int kv_head) {
  const int64_t page = pages[token >> a.page_shift];
  const int64_t slot = (page << a.page_shift) | (token & ((1 << a.page_shift) - 1));
  return (slot * a.num_kv_heads + kv_head) * D;
}

}  // namespace sieve::kernels::prefill_detail

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_DEVICE_CUH_
