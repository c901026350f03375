// XAttention's estimator (../shared SPARSE_ATTENTION.md section 2): antidiagonal scoring of one
// sequence's queries against its paged keys, softmax over strided keys, block masses, and the
// threshold selection of key blocks. Planning only: the selected blocks feed the block-sparse
// attention kernel (kernels/attention/paged_attention_cpu.h).
//
// Geometry, in absolute positions (so that chunked prefill and prefix-cache hits need no special
// case). The sequence has kv_len keys at positions [0, kv_len) and its q_len queries are the last
// ones, at positions [P0, kv_len) with P0 = kv_len - q_len (queries right-aligned to the keys).
//   - Strided groups: positions [aS, aS + S) form query group a and key group b (S = stride).
//     A position outside [P0, kv_len) contributes a zero query, one >= kv_len a zero key.
//   - Antidiagonal score: X[a, b] = sum_t q_{aS + S-1-t} . k_{bS + t}, for groups a with a query
//     and b <= a (the diagonal group is kept whole, as the reference does; b > a is masked).
//     Computed as a GEMM of "reshaped" queries (a group's S queries concatenated in reverse
//     order, width S*d) and keys (forward order).
//   - z = X / (sqrt(d) * S); P[a, :] = softmax over b <= a.
//   - Blocks: positions [mB, mB + B) (B = block_size, a multiple of S). The block mass
//     A[m, n] = sum of P[a, b] over the groups a of query block m and b of key block n; a query
//     block's total is the number of its query groups.
// With P0 a multiple of B this is the spec's estimator with offset o_b = P0 / B exactly; with
// chunks aligned to B, each query block's masses (and so its selection) are the same whether the
// prompt is prefilled in chunks or at once. A chunk that starts inside a block scores that
// block's groups before P0 as zero queries (they are not in the chunk).
//
// The mass output of one call: mass[(h * q_blocks + m - m0) * k_blocks + n] for query head h,
// query block m in [m0, m0 + q_blocks) (XAttentionQueryBlocks) and key block n < k_blocks;
// entries with n > m are 0.
#ifndef SIEVE_KERNELS_SPARSE_XATTENTION_H_
#define SIEVE_KERNELS_SPARSE_XATTENTION_H_

#include <cstdint>
#include <vector>

#include "kernels/attention/paged_attention.h"
#include "kernels/cpu/half.h"

namespace sieve::kernels {

struct XAttentionParams {
  // Query i (at position kv_len - q_len + i) of head h: q + i * q_row_stride + h * head_dim.
  const float* q = nullptr;
  int64_t q_row_stride = 0;            // floats between consecutive queries
  const void* k_cache = nullptr;       // pages as PagedAttentionParams' k_cache (kv_layout), of
  KvDtype k_dtype = KvDtype::kFloat32; // elements of this type (16-bit ones are widened exactly)
  const int32_t* page_table = nullptr; // this sequence's page ids (position p: page p/page_size)
  int32_t page_size = 0;
  KvLayout kv_layout = KvLayout::kTokenMajor;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;            // query head h reads KV head h / (num_q_heads / num_kv_heads)
  int32_t head_dim = 0;
  int32_t q_len = 0;                   // >= 1
  int32_t kv_len = 0;                  // >= q_len
  int32_t stride = 16;                 // S
  int32_t block_size = 128;            // B, a multiple of S
};

// The first query block m0 = (kv_len - q_len) / B.
inline int32_t XAttentionFirstQueryBlock(const XAttentionParams& p) {
  return (p.kv_len - p.q_len) / p.block_size;
}
// Query blocks the queries touch: (kv_len - 1) / B - m0 + 1.
inline int32_t XAttentionQueryBlocks(const XAttentionParams& p) {
  return (p.kv_len - 1) / p.block_size - XAttentionFirstQueryBlock(p) + 1;
}
// Key blocks: ceil(kv_len / B).
inline int32_t XAttentionKeyBlocks(const XAttentionParams& p) {
  return (p.kv_len + p.block_size - 1) / p.block_size;
}

// The reference: the direct definition of X, softmax and block sums in fp64, one group pair at
// a time. `mass` holds num_q_heads * q_blocks * k_blocks values (see the file comment).
void XAttentionBlockMassRef(const XAttentionParams& p, double* mass);

// The fast estimator: per KV head, keys packed once into GEMM panels; per (query head, query
// block) work item, an fp32 register-blocked GEMM of the reshaped queries against the panels
// (Highway, run-time dispatch), then the masked softmax and the block sums in fp32. Threads take
// items from a shared counter, largest first; `num_threads` 0 = all hardware threads.
void XAttentionBlockMassCpu(const XAttentionParams& p, float* mass, int num_threads = 0);

// Threshold selection for query block m from its masses mass[0..m] (key blocks 0..m; fp64,
// as the reference selects): the forced blocks 0 and m, then the other blocks by descending
// mass (ties: lower index first) while the selected mass is below threshold * sum(mass[0..m]).
// Writes the selected blocks to `selected`, increasing. `order` is scratch.
void XAttentionSelectBlocks(const double* mass, int32_t m, double threshold,
                            std::vector<int32_t>& selected, std::vector<int32_t>& order);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_XATTENTION_H_
