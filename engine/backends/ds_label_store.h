// DsLabelStore: the DoubleSparsity label cache of every layer beside a host KV cache
// (SPARSE_ATTENTION.md section 4.3; layout and kernels in kernels/sparse/double_sparsity.h), and
// the decode plans it selects. A host backend owns one: it writes the labels of each step's new
// tokens right after their keys (prefill chunks and decode tokens alike, in every pool) and plans
// the decode steps of the double_sparsity policy.
//
// Labels are per token: an append writes exactly the new tokens' slots, so recycled pages need
// no reset, and pages shared through the prefix cache share their labels with their keys.
// Thread safety: Append and Plan of different workers may run at once when their sequences' pages
// are disjoint (the engine's invariant for KV); SetChannels before any step.
#ifndef SIEVE_ENGINE_BACKENDS_DS_LABEL_STORE_H_
#define SIEVE_ENGINE_BACKENDS_DS_LABEL_STORE_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/backends/attention_plan.h"
#include "kernels/cpu/half.h"
#include "kernels/cpu/lazy_zero_allocator.h"
#include "kernels/sparse/double_sparsity.h"

namespace sieve::engine {

struct BatchLayout;

// What selects the tokens of one decode step.
struct DsPlanOptions {
  int32_t token_budget = 0;  // k: tokens per selection head (>= 1)
  // Per sequence of the layout, 1 = read every key (a short context, a client override, or
  // more than one query); empty = every sequence with one query is selected sparsely.
  absl::Span<const uint8_t> dense_sequences;
};

class DsLabelStore {
 public:
  // Labels for `num_pages` KV pages of `num_layers` layers of `shape` (which must pass
  // kernels::DsValidateShape; InvalidArgument naming the field otherwise).
  static absl::StatusOr<std::unique_ptr<DsLabelStore>> Create(
      const kernels::DoubleSparsityShape& shape, int32_t num_layers, int32_t num_pages);

  // Bytes of one KV page's labels over all layers.
  static int64_t BytesPerPage(const kernels::DoubleSparsityShape& shape, int32_t num_layers);

  const kernels::DoubleSparsityShape& shape() const { return shape_; }
  // Layer `layer`'s labels [num_pages, DsLabelPageBytes] (for tests).
  const uint8_t* labels(int32_t layer) const { return labels_.at(layer).data(); }
  // Layer `layer`'s channels [label_heads * channels] (empty until SetChannels).
  const std::vector<int32_t>& channels(int32_t layer) const { return channels_.at(layer); }

  // The outlier channels of `layer`: [DsLabelHeads * channels], each label head's list
  // (kernels::DsValidateChannels). InvalidArgument naming the layer otherwise.
  absl::Status SetChannels(int32_t layer, absl::Span<const int32_t> channels);
  // True once every layer has its channels.
  bool ready() const;

  // Writes the labels of the step's new tokens of `layer` from their keys in `k_cache`
  // (pages of `kv_layout`, kernels/attention/paged_attention.h, elements of `dtype`, fp32 or
  // bfloat16, already written this step).
  void Append(int32_t layer, const BatchLayout& layout, const void* k_cache,
              kernels::KvDtype dtype, int num_threads,
              kernels::KvLayout kv_layout = kernels::KvLayout::kTokenMajor);

  // Writes the labels of every token of whole pages `pages` of `layer` from their keys in
  // `k_cache` (pages an import filled: no step wrote their keys).
  void AppendPages(int32_t layer, absl::Span<const int32_t> pages, const void* k_cache,
                   kernels::KvDtype dtype, int num_threads,
                   kernels::KvLayout kv_layout = kernels::KvLayout::kTokenMajor);

  // Builds `layer`'s decode plan (query blocks of one token, key blocks of one page): each
  // sequence not in options.dense_sequences gets per query head its top-k tokens by approximate
  // score as columns (all tokens when L <= k); every other sequence lists all of its pages.
  // q: the step's rotated queries [num_tokens, num_q_heads * head_dim] on the host.
  void Plan(int32_t layer, const BatchLayout& layout, const float* q, const DsPlanOptions& options,
            AttentionPlan& plan, int num_threads);

 private:
  DsLabelStore(const kernels::DoubleSparsityShape& shape, int32_t num_layers, int32_t num_pages);

  kernels::DoubleSparsityShape shape_;
  int64_t page_bytes_;                          // one page, one layer
  // [layer][num_pages * page_bytes_]: lazily resident and huge-page advised like the KV pools
  // (selection reads a page's labels wherever the page sits in the pool).
  std::vector<std::vector<uint8_t, kernels::LazyZeroAllocator<uint8_t>>> labels_;
  std::vector<std::vector<int32_t>> channels_;  // [layer][label_heads * channels]
  // Plan scratch (per store: Plan of one layer at a time per worker; see thread safety).
  struct Scratch {
    std::vector<int32_t> seqs, page_table, kv_lens;
    std::vector<float> q;
    kernels::DsSelection selection;
  };
  std::vector<std::unique_ptr<Scratch>> scratch_pool_;
  std::unique_ptr<Scratch> TakeScratch();
  void ReturnScratch(std::unique_ptr<Scratch> s);
  std::unique_ptr<std::mutex> mu_;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_BACKENDS_DS_LABEL_STORE_H_
