// DoubleSparsity label cache layout, label writes and the fp64 reference selection
// (double_sparsity.h). The fast selection is in double_sparsity_cpu.cc.
#include "kernels/sparse/double_sparsity.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "kernels/cpu/half.h"
#include "kernels/cpu/parallel_for.h"
#include "kernels/sparse/double_sparsity_internal.h"

namespace sieve::kernels {

namespace ds_internal {

uint16_t FloatToF16(float f) { return kernels::FloatToF16(f); }

}  // namespace ds_internal

using ds_internal::HalfOf;

std::string DsValidateShape(const DoubleSparsityShape& s) {
  if (s.num_q_heads <= 0) return "num_q_heads must be positive";
  if (s.num_kv_heads <= 0 || s.num_q_heads % s.num_kv_heads != 0) {
    return "num_kv_heads must be positive and divide num_q_heads";
  }
  if (s.head_dim <= 0) return "head_dim must be positive";
  if (s.page_size <= 0) return "page_size must be positive";
  if (s.channels < 1 || s.channels > s.head_dim) return "channels must be in [1, head_dim]";
  if (s.format != DsLabelFormat::kF16 && s.format != DsLabelFormat::kBf16 &&
      s.format != DsLabelFormat::kInt4) {
    return "format must be fp16, bf16 or 4-bit";
  }
  return "";
}

int32_t DsLabelHeads(const DoubleSparsityShape& s) {
  return s.per_kv_head_labels ? s.num_kv_heads : s.num_q_heads;
}

int64_t DsLabelHeadBytes(const DoubleSparsityShape& s) {
  int64_t bytes;
  if (s.format == DsLabelFormat::kInt4) {
    bytes = int64_t{s.page_size} * 8 + int64_t{s.channels} * HalfOf(s.page_size);
  } else {
    bytes = int64_t{s.channels} * s.page_size * 2;
  }
  return (bytes + 3) / 4 * 4;
}

int64_t DsLabelPageBytes(const DoubleSparsityShape& s) {
  return DsLabelHeads(s) * DsLabelHeadBytes(s);
}

std::string DsValidateChannels(const DoubleSparsityShape& s, const int32_t* channels) {
  if (channels == nullptr) return "no channel list";
  std::vector<char> seen(s.head_dim);
  for (int h = 0; h < DsLabelHeads(s); ++h) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int c = 0; c < s.channels; ++c) {
      const int32_t ch = channels[h * s.channels + c];
      if (ch < 0 || ch >= s.head_dim) {
        return "label head " + std::to_string(h) + ": channel " + std::to_string(ch) +
               " outside [0, " + std::to_string(s.head_dim) + ")";
      }
      if (seen[ch]++) {
        return "label head " + std::to_string(h) + ": channel " + std::to_string(ch) +
               " listed twice";
      }
    }
  }
  return "";
}

namespace {

// Writes one token's label row for one label head into its page block.
void WriteRow(const DoubleSparsityShape& s, const float* key, const int32_t* ch, uint8_t* block,
              int slot) {
  const int r = s.channels;
  if (s.format == DsLabelFormat::kInt4) {
    float lo = key[ch[0]], hi = key[ch[0]];
    for (int c = 1; c < r; ++c) {
      lo = std::min(lo, key[ch[c]]);
      hi = std::max(hi, key[ch[c]]);
    }
    constexpr float kLevels = 15.0f;
    const float scale = hi > lo ? kLevels / (hi - lo) : kLevels;
    float* mins = reinterpret_cast<float*>(block);
    float* steps = mins + s.page_size;
    mins[slot] = lo;
    steps[slot] = 1.0f / scale;
    uint8_t* codes = block + int64_t{s.page_size} * 8;
    const int half = HalfOf(s.page_size);
    const int byte = slot % half;
    const int shift = slot < half ? 0 : 4;
    for (int c = 0; c < r; ++c) {
      const float x = std::nearbyint((key[ch[c]] - lo) * scale);
      const int code = static_cast<int>(std::clamp(x, 0.0f, kLevels));
      uint8_t& b = codes[int64_t{c} * half + byte];
      b = static_cast<uint8_t>((b & ~(0xf << shift)) | (code << shift));
    }
    return;
  }
  uint16_t* out = reinterpret_cast<uint16_t*>(block);
  const bool f16 = s.format == DsLabelFormat::kF16;
  for (int c = 0; c < r; ++c) {
    const float x = key[ch[c]];
    out[int64_t{c} * s.page_size + slot] = f16 ? ds_internal::FloatToF16(x) : FloatToBf16(x);
  }
}

}  // namespace

void DsWriteLabels(const DoubleSparsityShape& s, const DsAppendParams& p, int num_threads) {
  const int group = s.num_q_heads / s.num_kv_heads;
  const int label_heads = DsLabelHeads(s);
  const int64_t head_bytes = DsLabelHeadBytes(s);
  const int64_t page_bytes = DsLabelPageBytes(s);
  ParallelFor(p.num_seqs, num_threads, 1, [&](int64_t s0, int64_t s1) {
    std::vector<float> row;  // a token's bfloat16 keys widened
    for (int64_t seq = s0; seq < s1; ++seq) {
      const int q_len = p.query_start[seq + 1] - p.query_start[seq];
      const int first = p.kv_lens[seq] - q_len;
      const int32_t* pages = p.page_table + seq * int64_t{p.page_table_stride};
      for (int j = 0; j < q_len; ++j) {
        const int pos = first + j;
        const int64_t page = pages[pos / s.page_size];
        const int slot = pos % s.page_size;
        const int64_t row_elems = int64_t{s.num_kv_heads} * s.head_dim;
        const int64_t at =
            KvRowOffset(p.kv_layout, page, slot, 0, s.page_size, s.num_kv_heads, s.head_dim);
        const float* keys =  // [num_kv_heads, head_dim] of this token
            p.k != nullptr ? p.k + (p.query_start[seq] + j) * row_elems : p.k_cache + at;
        if (p.k == nullptr && (p.k_cache == nullptr || p.kv_layout != KvLayout::kTokenMajor)) {
          // Gathered: a bfloat16 cache widened, or a head-major page's rows of this slot.
          const int64_t head_stride =
              KvStrides(p.kv_layout, s.page_size, s.num_kv_heads, s.head_dim).head;
          row.resize(row_elems);
          for (int h = 0; h < s.num_kv_heads; ++h) {
            const int64_t src = at + h * head_stride;
            float* dst = row.data() + int64_t{h} * s.head_dim;
            for (int i = 0; i < s.head_dim; ++i) {
              dst[i] = p.k_cache != nullptr ? p.k_cache[src + i]
                                            : Bf16ToFloat(p.k_cache_bf16[src + i]);
            }
          }
          keys = row.data();
        }
        for (int lh = 0; lh < label_heads; ++lh) {
          const int kvh = s.per_kv_head_labels ? lh : lh / group;
          WriteRow(s, keys + int64_t{kvh} * s.head_dim, p.channels + lh * s.channels,
                   p.labels + page * page_bytes + lh * head_bytes, slot);
        }
      }
    }
  });
}

float DsReadLabel(const DoubleSparsityShape& s, const uint8_t* page, int label_head,
                  int channel_index, int slot) {
  const uint8_t* block = page + label_head * DsLabelHeadBytes(s);
  if (s.format == DsLabelFormat::kInt4) {
    const float* mins = reinterpret_cast<const float*>(block);
    const float* steps = mins + s.page_size;
    const int half = HalfOf(s.page_size);
    const uint8_t b = block[int64_t{s.page_size} * 8 + int64_t{channel_index} * half + slot % half];
    const int code = slot < half ? (b & 0xf) : (b >> 4);
    return static_cast<float>(code) * steps[slot] + mins[slot];
  }
  const uint16_t bits =
      reinterpret_cast<const uint16_t*>(block)[int64_t{channel_index} * s.page_size + slot];
  return s.format == DsLabelFormat::kF16 ? F16ToFloat(bits) : Bf16ToFloat(bits);
}

SparseAttentionIndex DsSelection::Index(int32_t page_size) const {
  SparseAttentionIndex x;
  x.query_block = 1;
  x.key_block = page_size;
  x.query_block_start = query_block_start.data();
  x.row_start = row_start.data();
  x.key_blocks = nullptr;
  x.column_start = column_start.data();
  x.columns = columns.data();
  return x;
}

namespace ds_internal {

void LayOutSelection(const DoubleSparsityShape& s, const DsSelectParams& p, DsSelection& out) {
  const int64_t rows = int64_t{p.num_seqs} * s.num_q_heads;
  out.query_block_start.resize(p.num_seqs + 1);
  std::iota(out.query_block_start.begin(), out.query_block_start.end(), 0);
  out.row_start.assign(rows + 1, 0);
  out.column_start.resize(rows + 1);
  out.column_start[0] = 0;
  for (int seq = 0; seq < p.num_seqs; ++seq) {
    const int n = std::min(p.token_budget, std::max(0, p.kv_lens[seq]));
    for (int h = 0; h < s.num_q_heads; ++h) {
      const int64_t row = int64_t{seq} * s.num_q_heads + h;
      out.column_start[row + 1] = out.column_start[row] + n;
    }
  }
  out.columns.resize(out.column_start[rows]);
}

}  // namespace ds_internal

std::vector<double> DsReferenceScores(const DoubleSparsityShape& s, const DsSelectParams& p,
                                      int seq, int sel_head) {
  const int group = s.num_q_heads / s.num_kv_heads;
  const int len = p.kv_lens[seq];
  const int64_t page_bytes = DsLabelPageBytes(s);
  const int32_t* pages = p.page_table + int64_t{seq} * p.page_table_stride;
  const int h_begin = s.shared_selection ? sel_head * group : sel_head;
  const int h_end = s.shared_selection ? h_begin + group : sel_head + 1;
  std::vector<double> scores(len, 0.0);
  for (int h = h_begin; h < h_end; ++h) {
    const int lh = s.per_kv_head_labels ? h / group : h;
    const int32_t* ch = p.channels + lh * s.channels;
    const float* q = p.q + (int64_t{seq} * s.num_q_heads + h) * s.head_dim;
    for (int t = 0; t < len; ++t) {
      const uint8_t* page = p.labels + pages[t / s.page_size] * page_bytes;
      double dot = 0.0;
      for (int c = 0; c < s.channels; ++c) {
        dot += double{q[ch[c]]} * DsReadLabel(s, page, lh, c, t % s.page_size);
      }
      scores[t] += dot;
    }
  }
  return scores;
}

void DsSelectRef(const DoubleSparsityShape& s, const DsSelectParams& p, DsSelection& out) {
  ds_internal::LayOutSelection(s, p, out);
  const int group = s.num_q_heads / s.num_kv_heads;
  const int sel_heads = s.shared_selection ? s.num_kv_heads : s.num_q_heads;
  for (int seq = 0; seq < p.num_seqs; ++seq) {
    const int len = std::max(0, p.kv_lens[seq]);
    const int k = std::min(p.token_budget, len);
    for (int sh = 0; sh < sel_heads; ++sh) {
      std::vector<int32_t> chosen(len);
      std::iota(chosen.begin(), chosen.end(), 0);
      if (k < len) {
        const std::vector<double> sc = DsReferenceScores(s, p, seq, sh);
        std::stable_sort(chosen.begin(), chosen.end(),
                         [&](int32_t a, int32_t b) { return sc[a] > sc[b]; });
        chosen.resize(k);
        std::sort(chosen.begin(), chosen.end());
      }
      const int h_begin = s.shared_selection ? sh * group : sh;
      const int h_end = s.shared_selection ? h_begin + group : sh + 1;
      for (int h = h_begin; h < h_end; ++h) {
        const int64_t row = int64_t{seq} * s.num_q_heads + h;
        std::copy(chosen.begin(), chosen.end(), out.columns.begin() + out.column_start[row]);
      }
    }
  }
}

}  // namespace sieve::kernels
