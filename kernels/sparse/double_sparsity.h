// DoubleSparsity decode selection (SPARSE_ATTENTION.md section 4): a label cache holding each
// cached token's outlier channels of its post-RoPE key, approximate scores of the decode query's
// same channels over it, and the top-k tokens per query head, emitted as the `columns` of a
// decode SparseAttentionIndex (paged_attention.h) that PagedAttentionCpu executes.
//
// Label heads. The calibrated channel list C_h (section 4.2) is per query head by default (label
// head = query head h, reading the key of KV head h / G; Hq label rows per token, the reference
// semantics); `per_kv_head_labels` keeps one list per KV head instead (Hkv rows per token,
// section 4.6's cheaper variant).
//
// Selection heads. Per query head by default: every query head ranks the tokens by its own
// approximate score q_h[C] . label(t). `shared_selection` makes one set per KV head, ranked by
// the sum of its query heads' approximate scores (the score of the group's summed query), so the
// heads of a group read the same K/V rows: an engine decision beyond the reference, which the
// spec leaves per query head.
//
// Label cache layout, beside the KV cache: one block of DsLabelPageBytes bytes per KV page and
// layer, indexed by the same page ids. Inside a page, label head after label head, each padded to
// 4 bytes:
//   16-bit (fp16, bf16): uint16 [channels][page_size], channel-major so that the scores of a
//                        page's tokens are whole-vector multiply-adds;
//   4-bit            : float min[page_size], float step[page_size], then the codes
//                      uint8 [channels][half], half = ceil(page_size / 2): byte j of channel c
//                      holds slot j in its low nibble and slot j + half in its high nibble.
//                      Per (token, label head) asymmetric min-max quantisation over the r values
//                      (section 4.3): levels = 15, s = levels / (max - min) (s = levels when
//                      max == min), code = clamp(round((x - min) s), 0, 15), x^ = code step + min
//                      with step = 1 / s.
// The decode query is not quantised (the reference's accuracy path quantises it too).
//
// Channel indices are in the layout the engine stores keys in (the engine's calibration runs on
// its own q and k, so no RoPE layout remap applies; a list made for the Hugging Face half-split
// layout needs section 4.2's remap only for interleaved storage, which Sieve does not use).
#ifndef SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_H_
#define SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/attention/paged_attention.h"

namespace sieve::kernels {

// How label values are stored.
enum class DsLabelFormat : int32_t { kF16, kBf16, kInt4 };

// The shape of one layer's label cache and selection.
struct DoubleSparsityShape {
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;   // divides num_q_heads
  int32_t head_dim = 0;
  int32_t page_size = 0;      // tokens per KV page
  int32_t channels = 0;       // r: outlier channels per label head, in [1, head_dim]
  DsLabelFormat format = DsLabelFormat::kF16;
  bool per_kv_head_labels = false;  // one channel list per KV head (else per query head)
  bool shared_selection = false;    // one token set per KV head (else per query head)
};

// An empty string when `shape` is usable, else what is wrong with it (naming the field).
std::string DsValidateShape(const DoubleSparsityShape& shape);

// Label heads: num_kv_heads with per_kv_head_labels, else num_q_heads.
int32_t DsLabelHeads(const DoubleSparsityShape& shape);

// Bytes of one label head's block inside a page (a multiple of 4).
int64_t DsLabelHeadBytes(const DoubleSparsityShape& shape);

// Bytes of the labels of one KV page in one layer: DsLabelHeads * DsLabelHeadBytes.
int64_t DsLabelPageBytes(const DoubleSparsityShape& shape);

// An empty string when `channels` ([DsLabelHeads, channels] int32) holds, for every label head,
// distinct channels in [0, head_dim); else the first problem found.
std::string DsValidateChannels(const DoubleSparsityShape& shape, const int32_t* channels);

// The KV positions whose labels to write: the new tokens of each sequence, laid out as the
// attention parameters lay out queries (paged_attention.h): sequence s's new tokens are its last
// query_start[s + 1] - query_start[s] positions of kv_lens[s].
struct DsAppendParams {
  // The new tokens' keys [num_tokens, num_kv_heads, head_dim], packed like queries; or null to
  // read them from k_cache (pages laid out as kv_layout says, paged_attention.h) at their
  // positions.
  const float* k = nullptr;
  const float* k_cache = nullptr;
  // Or (k and k_cache null) the cache's keys stored as bfloat16 (a 16-bit KV cache), widened.
  const uint16_t* k_cache_bf16 = nullptr;
  const int32_t* page_table = nullptr;  // [num_seqs, page_table_stride]
  int32_t page_table_stride = 0;
  const int32_t* kv_lens = nullptr;     // [num_seqs]
  const int32_t* query_start = nullptr; // [num_seqs + 1]
  int32_t num_seqs = 0;
  const int32_t* channels = nullptr;    // [DsLabelHeads, channels]
  uint8_t* labels = nullptr;            // [num_pages, DsLabelPageBytes] one layer's labels
  KvLayout kv_layout = KvLayout::kTokenMajor;  // of k_cache / k_cache_bf16
};

// Writes the label rows of the new tokens (every label head), on `num_threads` host threads
// (0 = all). Touches only those tokens' slots. Thread-safe for disjoint tokens.
void DsWriteLabels(const DoubleSparsityShape& shape, const DsAppendParams& p, int num_threads = 1);

// The stored (dequantised) label value of `channel_index` (an index into the head's channel
// list, not a head_dim channel) of the token in `slot` of one page's labels `page`.
float DsReadLabel(const DoubleSparsityShape& shape, const uint8_t* page, int label_head,
                  int channel_index, int slot);

// One decode step's selection inputs: one query per sequence.
struct DsSelectParams {
  const float* q = nullptr;             // [num_seqs, num_q_heads, head_dim] post-RoPE
  const int32_t* page_table = nullptr;  // [num_seqs, page_table_stride]
  int32_t page_table_stride = 0;
  const int32_t* kv_lens = nullptr;     // [num_seqs] context length L including this token
  int32_t num_seqs = 0;
  const int32_t* channels = nullptr;    // [DsLabelHeads, channels]
  const uint8_t* labels = nullptr;      // [num_pages, DsLabelPageBytes]
  int32_t token_budget = 0;             // k (>= 1): tokens per selection head; L <= k reads all
};

// One thread's buffers of DsSelectCpu, kept in DsSelection so that repeated calls neither
// allocate nor fault pages in.
struct DsThreadScratch {
  std::vector<float> scores;    // [pages * page_size + lanes] one selection head's scores
  std::vector<float> qsel;      // [channels] the query channels of a label head
  std::vector<float> samples;   // sampled scores that place the threshold
  std::vector<int32_t> cand;    // candidate positions, increasing
  std::vector<float> cand_val;  // their scores
  std::vector<float> work;      // a copy of cand_val for nth_element
};

// The selected tokens as the arrays of a decode SparseAttentionIndex: query_block 1, key_block
// page_size, no key blocks, one row per (sequence, query head) (row = seq * num_q_heads + head)
// listing min(k, L) increasing positions in [0, L). Reused across calls (capacity kept).
struct DsSelection {
  std::vector<int32_t> query_block_start;  // [num_seqs + 1]: 0, 1, ..., num_seqs
  std::vector<int32_t> row_start;          // [rows + 1] all zero
  std::vector<int32_t> column_start;       // [rows + 1]
  std::vector<int32_t> columns;            // [column_start[rows]]
  std::vector<DsThreadScratch> scratch;    // DsSelectCpu's per-thread workspace

  // The index over these arrays (valid while this object is unchanged).
  SparseAttentionIndex Index(int32_t page_size) const;
};

// The fp64 reference: scores from the dequantised labels in double (DsReferenceScores), exact
// top-k ranked by (score descending, position ascending).
void DsSelectRef(const DoubleSparsityShape& shape, const DsSelectParams& p, DsSelection& out);

// The approximate scores in double of every position [0, L) of sequence `seq` for selection
// head `sel_head` (a query head, or a KV head with shared_selection): q[C] . label(t), summed
// over the group's query heads with shared_selection.
std::vector<double> DsReferenceScores(const DoubleSparsityShape& shape, const DsSelectParams& p,
                                      int seq, int sel_head);

// The fast selection: fp32 scores vectorised with Google Highway (dynamic dispatch), a
// sampled-threshold top-k with no full sort, on `num_threads` host threads (0 = all). Same
// semantics as DsSelectRef up to fp32 rounding of the scores; ties at the boundary keep the
// lowest positions. Allocates per-thread scratch.
void DsSelectCpu(const DoubleSparsityShape& shape, const DsSelectParams& p, DsSelection& out,
                 int num_threads = 0);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_H_
