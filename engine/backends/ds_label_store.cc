#include "engine/backends/ds_label_store.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/backends/backend.h"

namespace sieve::engine {
namespace {

// Points p at a KV cache's keys by their element type (fp32 or bfloat16).
void SetKeys(const void* k_cache, kernels::KvDtype dtype, kernels::KvLayout kv_layout,
             kernels::DsAppendParams& p) {
  p.kv_layout = kv_layout;
  if (dtype == kernels::KvDtype::kBfloat16) {
    p.k_cache_bf16 = static_cast<const uint16_t*>(k_cache);
  } else {
    p.k_cache = static_cast<const float*>(k_cache);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<DsLabelStore>> DsLabelStore::Create(
    const kernels::DoubleSparsityShape& shape, int32_t num_layers, int32_t num_pages) {
  const std::string problem = kernels::DsValidateShape(shape);
  if (!problem.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("DoubleSparsity labels: ", problem));
  }
  if (num_layers < 1 || num_pages < 1) {
    return absl::InvalidArgumentError("DoubleSparsity labels: no layers or no pages");
  }
  return std::unique_ptr<DsLabelStore>(new DsLabelStore(shape, num_layers, num_pages));
}

int64_t DsLabelStore::BytesPerPage(const kernels::DoubleSparsityShape& shape, int32_t num_layers) {
  return kernels::DsLabelPageBytes(shape) * num_layers;
}

DsLabelStore::DsLabelStore(const kernels::DoubleSparsityShape& shape, int32_t num_layers,
                           int32_t num_pages)
    : shape_(shape),
      page_bytes_(kernels::DsLabelPageBytes(shape)),
      labels_(num_layers),
      channels_(num_layers),
      mu_(std::make_unique<std::mutex>()) {
  // Each layer's buffer resized in place: lazily resident (kernels/cpu/lazy_zero_allocator.h).
  for (auto& layer_labels : labels_) {
    layer_labels.resize(static_cast<size_t>(num_pages) * page_bytes_);
  }
}

absl::Status DsLabelStore::SetChannels(int32_t layer, absl::Span<const int32_t> channels) {
  if (layer < 0 || layer >= static_cast<int32_t>(channels_.size())) {
    return absl::InvalidArgumentError(absl::StrCat("DoubleSparsity labels: no layer ", layer));
  }
  const size_t want = static_cast<size_t>(kernels::DsLabelHeads(shape_)) * shape_.channels;
  if (channels.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("DoubleSparsity labels: layer ", layer, " has ",
                                                   channels.size(), " channels, wants ", want));
  }
  const std::string problem = kernels::DsValidateChannels(shape_, channels.data());
  if (!problem.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("DoubleSparsity labels: layer ", layer, ": ", problem));
  }
  channels_[layer].assign(channels.begin(), channels.end());
  return absl::OkStatus();
}

bool DsLabelStore::ready() const {
  for (const auto& c : channels_) {
    if (c.empty()) return false;
  }
  return true;
}

void DsLabelStore::Append(int32_t layer, const BatchLayout& layout, const void* k_cache,
                          kernels::KvDtype dtype, int num_threads,
                          kernels::KvLayout kv_layout) {
  kernels::DsAppendParams p;
  SetKeys(k_cache, dtype, kv_layout, p);
  p.page_table = layout.page_table.data();
  p.page_table_stride = layout.page_table_stride;
  p.kv_lens = layout.kv_lens.data();
  p.query_start = layout.query_start.data();
  p.num_seqs = layout.num_seqs();
  p.channels = channels_[layer].data();
  p.labels = labels_[layer].data();
  kernels::DsWriteLabels(shape_, p, num_threads);
}

void DsLabelStore::AppendPages(int32_t layer, absl::Span<const int32_t> pages,
                               const void* k_cache, kernels::KvDtype dtype,
                               int num_threads, kernels::KvLayout kv_layout) {
  if (pages.empty()) return;
  // Each page as a sequence of one full page whose tokens are all new.
  const int32_t n = static_cast<int32_t>(pages.size()), ps = shape_.page_size;
  std::vector<int32_t> kv_lens(n, ps), query_start(n + 1);
  for (int32_t i = 0; i <= n; ++i) query_start[i] = i * ps;
  kernels::DsAppendParams p;
  SetKeys(k_cache, dtype, kv_layout, p);
  p.page_table = pages.data();
  p.page_table_stride = 1;
  p.kv_lens = kv_lens.data();
  p.query_start = query_start.data();
  p.num_seqs = n;
  p.channels = channels_[layer].data();
  p.labels = labels_[layer].data();
  kernels::DsWriteLabels(shape_, p, num_threads);
}

std::unique_ptr<DsLabelStore::Scratch> DsLabelStore::TakeScratch() {
  std::lock_guard<std::mutex> lock(*mu_);
  if (scratch_pool_.empty()) return std::make_unique<Scratch>();
  std::unique_ptr<Scratch> s = std::move(scratch_pool_.back());
  scratch_pool_.pop_back();
  return s;
}

void DsLabelStore::ReturnScratch(std::unique_ptr<Scratch> s) {
  std::lock_guard<std::mutex> lock(*mu_);
  scratch_pool_.push_back(std::move(s));
}

void DsLabelStore::Plan(int32_t layer, const BatchLayout& layout, const float* q,
                        const DsPlanOptions& options, AttentionPlan& plan, int num_threads) {
  const int32_t seqs = layout.num_seqs(), hq = shape_.num_q_heads, d = shape_.head_dim;
  const int32_t ps = shape_.page_size, stride = layout.page_table_stride;
  std::unique_ptr<Scratch> sc = TakeScratch();
  // The sparse sequences, compacted: their query rows, page-table rows and lengths.
  sc->seqs.clear();
  sc->page_table.clear();
  sc->kv_lens.clear();
  sc->q.clear();
  for (int32_t s = 0; s < seqs; ++s) {
    const bool one_query = layout.query_start[s + 1] - layout.query_start[s] == 1;
    const bool dense = !options.dense_sequences.empty() && options.dense_sequences[s] != 0;
    if (!one_query || dense) continue;
    sc->seqs.push_back(s);
    sc->kv_lens.push_back(layout.kv_lens[s]);
    sc->page_table.insert(sc->page_table.end(), layout.page_table.begin() + int64_t{s} * stride,
                          layout.page_table.begin() + int64_t{s + 1} * stride);
    const float* qs = q + int64_t{layout.query_start[s]} * hq * d;
    sc->q.insert(sc->q.end(), qs, qs + int64_t{hq} * d);
  }
  kernels::DsSelectParams p;
  p.q = sc->q.data();
  p.page_table = sc->page_table.data();
  p.page_table_stride = stride;
  p.kv_lens = sc->kv_lens.data();
  p.num_seqs = static_cast<int32_t>(sc->seqs.size());
  p.channels = channels_[layer].data();
  p.labels = labels_[layer].data();
  p.token_budget = options.token_budget;
  kernels::DsSelectCpu(shape_, p, sc->selection, num_threads);

  plan.dense = false;
  plan.query_block = 1;
  plan.key_block = ps;
  plan.query_block_start.assign(1, 0);
  plan.row_start.assign(1, 0);
  plan.column_start.assign(1, 0);
  plan.key_blocks.clear();
  plan.columns.clear();
  size_t next_sparse = 0;
  for (int32_t s = 0; s < seqs; ++s) {
    const int32_t q_len = layout.query_start[s + 1] - layout.query_start[s];
    plan.query_block_start.push_back(plan.query_block_start.back() + q_len);
    const bool sparse = next_sparse < sc->seqs.size() && sc->seqs[next_sparse] == s;
    const int32_t pages = (layout.kv_lens[s] + ps - 1) / ps;
    for (int32_t row = 0; row < q_len * hq; ++row) {
      if (sparse) {
        const kernels::DsSelection& x = sc->selection;
        const int64_t r = static_cast<int64_t>(next_sparse) * hq + row;
        plan.columns.insert(plan.columns.end(), x.columns.begin() + x.column_start[r],
                            x.columns.begin() + x.column_start[r + 1]);
      } else {
        for (int32_t pg = 0; pg < pages; ++pg) plan.key_blocks.push_back(pg);
      }
      plan.row_start.push_back(static_cast<int32_t>(plan.key_blocks.size()));
      plan.column_start.push_back(static_cast<int32_t>(plan.columns.size()));
    }
    if (sparse) ++next_sparse;
  }
  ReturnScratch(std::move(sc));
}

}  // namespace sieve::engine
