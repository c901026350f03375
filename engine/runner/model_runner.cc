#include "engine/runner/model_runner.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/backends/cpu_backend.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engine/model/kv_budget.h"
#include "engine/model/random_weights.h"
#ifdef SIEVE_HAVE_CUDA
#include "engine/backends/cuda/cuda_backend.h"
#endif
#include "engine/status_macros.h"
#include "engine/model/weight_store.h"

namespace sieve::engine {
namespace {

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const ModelRunnerOptions& options,
                                                     const ModelConfig& config) {
  if (options.backend == "cpu") {
    const kernels::KvDtype kv = options.kv_dtype == "bfloat16" ? kernels::KvDtype::kBfloat16
                                                               : kernels::KvDtype::kFloat32;
    const int64_t row_bytes = config.num_key_value_heads * config.head_dim *
                              static_cast<int64_t>(kernels::KvDtypeBytes(kv));
    const kernels::KvLayout layout = options.kv_layout.value_or(
        row_bytes >= 4096 ? kernels::KvLayout::kTokenMajor : kernels::KvLayout::kHeadMajor);
    return std::unique_ptr<Backend>(
        new CpuBackend(options.num_threads, kv, /*bf16_page_bounds=*/true, layout));
  }
  if (options.backend != "cuda") {
    if (BackendFactory factory = FindRegisteredBackend(options.backend)) {
      return factory(options.num_threads);
    }
  }
#ifdef SIEVE_HAVE_CUDA
  if (options.backend == "cuda") {
    CudaBackendOptions cuda_options;
    cuda_options.device = options.device;
    if (options.attention_kernel == "simple") {
      cuda_options.attention = CudaBackendOptions::Attention::kSimple;
    }
    SIEVE_ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> cuda, CudaBackend::Create(cuda_options));
    return std::unique_ptr<Backend>(std::move(cuda));
  }
  constexpr absl::string_view kBuilt = "cpu, cuda";
#else
  constexpr absl::string_view kBuilt = "cpu";
#endif
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown backend '", options.backend, "' (this build has: ", kBuilt, ")"));
}

}  // namespace

RopeParams RopeParamsFromConfig(const ModelConfig& c) {
  RopeParams p;
  p.theta = c.rope_theta;
  p.rotary_dim = static_cast<int32_t>(c.head_dim);
  const RopeScaling& s = c.rope_scaling;
  p.factor = s.factor;
  p.low_freq_factor = s.low_freq_factor;
  p.high_freq_factor = s.high_freq_factor;
  p.original_max_position = s.original_max_position_embeddings > 0
                                ? s.original_max_position_embeddings
                                : c.max_position_embeddings;
  p.beta_fast = s.beta_fast;
  p.beta_slow = s.beta_slow;
  p.mscale = s.mscale.value_or(0.0f);
  p.mscale_all_dim = s.mscale_all_dim.value_or(0.0f);
  p.attention_factor = s.attention_factor.value_or(0.0f);
  p.truncate = s.truncate;
  switch (s.type) {
    case RopeScaling::Type::kNone: p.type = RopeParams::Type::kDefault; break;
    case RopeScaling::Type::kLinear: p.type = RopeParams::Type::kLinear; break;
    case RopeScaling::Type::kLlama3: p.type = RopeParams::Type::kLlama3; break;
    case RopeScaling::Type::kYarn: p.type = RopeParams::Type::kYarn; break;
  }
  return p;
}

ModelRunner::ModelRunner(ModelConfig config, ModelRunnerOptions options,
                         std::unique_ptr<Backend> backend)
    : config_(std::move(config)), options_(std::move(options)), backend_(std::move(backend)) {
  shape_.num_q_heads = static_cast<int32_t>(config_.num_attention_heads);
  shape_.num_kv_heads = static_cast<int32_t>(config_.num_key_value_heads);
  shape_.head_dim = static_cast<int32_t>(config_.head_dim);
}

absl::StatusOr<std::unique_ptr<ModelRunner>> ModelRunner::Load(const std::string& model_dir,
                                                               const ModelRunnerOptions& options) {
  if (options.page_size <= 0 || options.num_pages < 0 || options.max_step_tokens <= 0 ||
      options.max_step_logits <= 0) {
    return absl::InvalidArgumentError(
        "model runner: page_size, max_step_tokens and max_step_logits must be > 0, num_pages >= 0");
  }
  SIEVE_ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::FromFile(model_dir + "/config.json"));
  SIEVE_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, MakeBackend(options, config));
  std::unique_ptr<ModelRunner> runner(
      new ModelRunner(std::move(config), options, std::move(backend)));
  SIEVE_ASSIGN_OR_RETURN(runner->rope_, ComputeRopeTables(RopeParamsFromConfig(runner->config_)));
  SIEVE_RETURN_IF_ERROR(runner->LoadWeights(model_dir));
  if (options.num_pages == 0) {
    SIEVE_ASSIGN_OR_RETURN(runner->options_.num_pages, runner->KvPagesForFreeMemory());
  } else if (absl::StatusOr<int64_t> available = runner->backend_->AvailableMemoryBytes();
             available.ok()) {
    // Refuse a pool that cannot fit before allocating it (a backend that cannot report its
    // memory is trusted).
    SIEVE_RETURN_IF_ERROR(CheckKvPagesFitMemory(options.num_pages, runner->KvPoolPageBytes(),
                                                *available, runner->backend_->name()));
  }
  const int32_t num_pages = runner->options_.num_pages;
  // Step graphs pad batches with rows that write their KV into one page no caller can name.
  // Sparse decode plans are built on the host from each step's selection (Quest on cuda copies
  // its device selection back), which a replayed recording would skip: such runners step eagerly.
  const bool graphs = options.cuda_graphs && runner->backend_->SupportsStepGraphs() &&
                      !options.quest_page_bounds && options.ds_label_channels == 0;
  if (graphs && num_pages == INT32_MAX) {
    return absl::InvalidArgumentError("model runner: num_pages leaves no room for a scratch page");
  }
  if (graphs) runner->scratch_page_ = num_pages;
  SIEVE_RETURN_IF_ERROR(runner->backend_->AllocateKvCache(
      static_cast<int32_t>(runner->config_.num_hidden_layers), num_pages + (graphs ? 1 : 0),
      options.page_size, runner->shape_));
  if (options.quest_page_bounds) {
    SIEVE_RETURN_IF_ERROR(runner->backend_->AllocatePageBounds(
        static_cast<int32_t>(runner->config_.num_hidden_layers), runner->shape_));
  }
  if (options.ds_label_channels > 0) {
    if (options.ds_label_channels > runner->shape_.head_dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "attention.decode.double_sparsity.channels ", options.ds_label_channels,
          " exceeds the model's head_dim ", runner->shape_.head_dim));
    }
    SIEVE_RETURN_IF_ERROR(runner->backend_->AllocateDsLabels(
        static_cast<int32_t>(runner->config_.num_hidden_layers), runner->ds_shape()));
  }
  SIEVE_ASSIGN_OR_RETURN(runner->default_worker_, runner->CreateWorker());
  return runner;
}

absl::Status ModelRunner::WriteKvPages(absl::Span<const int32_t> pages,
                                       absl::Span<const uint8_t> data) const {
  SIEVE_RETURN_IF_ERROR(backend_->WriteKvPages(pages, data));
  if (options_.quest_page_bounds) SIEVE_RETURN_IF_ERROR(backend_->RebuildPageBounds(pages, shape_));
  if (options_.ds_label_channels > 0) SIEVE_RETURN_IF_ERROR(backend_->RebuildDsLabels(pages));
  return absl::OkStatus();
}

absl::StatusOr<int32_t> ModelRunner::KvPagesForFreeMemory() const {
  const int64_t context = options_.kv_max_context_tokens > 0 ? options_.kv_max_context_tokens
                                                             : config_.max_position_embeddings;
  const int64_t max_pages =
      int64_t{options_.kv_max_sequences} * ((context + options_.page_size - 1) / options_.page_size);
  SIEVE_ASSIGN_OR_RETURN(int64_t available, backend_->AvailableMemoryBytes());
  return KvPagesForMemory(available, options_.kv_memory_fraction, KvPoolPageBytes(), max_pages);
}

int64_t ModelRunner::KvPoolPageBytes() const {
  const int32_t layers = static_cast<int32_t>(config_.num_hidden_layers);
  return backend_->KvPageBytes(layers, options_.page_size, shape_) +
         (options_.quest_page_bounds ? backend_->PageBoundsBytes(layers, shape_) : 0) +
         (options_.ds_label_channels > 0 ? backend_->DsLabelBytes(layers, ds_shape()) : 0);
}

kernels::DoubleSparsityShape ModelRunner::ds_shape() const {
  kernels::DoubleSparsityShape s;
  s.num_q_heads = shape_.num_q_heads;
  s.num_kv_heads = shape_.num_kv_heads;
  s.head_dim = shape_.head_dim;
  s.page_size = options_.page_size;
  s.channels = options_.ds_label_channels;
  s.format = options_.ds_label_bits == 4 ? kernels::DsLabelFormat::kInt4 : kernels::DsLabelFormat::kF16;
  s.per_kv_head_labels = options_.ds_per_kv_head;
  s.shared_selection = options_.ds_per_kv_head;
  return s;
}

absl::Status ModelRunner::SetDsCalibration(const DsCalibration& c) {
  const int32_t layers = static_cast<int32_t>(config_.num_hidden_layers);
  SIEVE_RETURN_IF_ERROR(CheckDsCalibrationFits(c, layers, shape_.num_q_heads,
                                               shape_.num_kv_heads, shape_.head_dim));
  for (int32_t l = 0; l < layers; ++l) {
    SIEVE_RETURN_IF_ERROR(backend_->SetDsChannels(
        l, c.LabelChannels(l, options_.ds_label_channels, options_.ds_per_kv_head)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ModelWorker>> ModelRunner::CreateWorker(
    const StreamOptions& stream, std::unique_ptr<AttentionPolicy> policy) {
  std::unique_ptr<ModelWorker> worker(new ModelWorker(*this));
  worker->policy_ = policy != nullptr ? std::move(policy)
                                      : std::make_unique<DenseAttentionPolicy>();
  SIEVE_RETURN_IF_ERROR(worker->Allocate(stream));
  return worker;
}

absl::Status ModelRunner::LoadWeights(const std::string& model_dir) {
  // Either the checkpoint's tensors or seeded random ones of the same names and shapes.
  std::unique_ptr<WeightStore> store;
  std::unique_ptr<RandomWeightSource> random;
  if (options_.weights == "random") {
    random = std::make_unique<RandomWeightSource>(options_.random_seed);
  } else if (options_.weights == "checkpoint") {
    SIEVE_ASSIGN_OR_RETURN(store, WeightStore::Open(model_dir));
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "weights must be 'checkpoint' or 'random', got '", options_.weights, "'"));
  }
  const int64_t h = config_.hidden_size, inter = config_.intermediate_size;
  const int64_t d = config_.head_dim;
  const int64_t q_out = config_.num_attention_heads * d, kv_out = config_.num_key_value_heads * d;
  // Fetches a tensor with the expected shape.
  auto get = [&](const std::string& name,
                 std::vector<int64_t> shape) -> absl::StatusOr<TensorView> {
    if (random) return random->GetWithShape(name, shape);
    return store->GetWithShape(name, shape);
  };
  // Progress for on_load_progress: every checkpoint tensor counts once.
  const int64_t lm_head = config_.tie_word_embeddings && (random || !store->Has("lm_head.weight"))
                              ? 0 : 1;
  WeightLoadProgress progress;
  progress.total_tensors = 2 + lm_head + config_.num_hidden_layers *
                                              (9 + (config_.qkv_bias ? 3 : 0) +
                                               (config_.o_bias ? 1 : 0));
  const absl::Time start = absl::Now();
  // Uploads, then frees the host copies of random tensors, then reports the progress.
  auto upload = [&](std::vector<TensorView> parts, int64_t cols) -> absl::StatusOr<Tensor> {
    auto t = backend_->UploadWeight(parts, cols);
    for (const TensorView& part : parts) progress.bytes += static_cast<int64_t>(part.bytes.size());
    if (random) random->Clear();
    if (!t.ok()) return t;
    progress.tensors += static_cast<int64_t>(parts.size());
    progress.seconds = absl::ToDoubleSeconds(absl::Now() - start);
    if (options_.on_load_progress) SIEVE_RETURN_IF_ERROR(options_.on_load_progress(progress));
    return t;
  };
  SIEVE_ASSIGN_OR_RETURN(TensorView embed, get("model.embed_tokens.weight", {config_.vocab_size, h}));
  SIEVE_ASSIGN_OR_RETURN(embed_, upload({embed}, h));
  SIEVE_ASSIGN_OR_RETURN(TensorView norm, get("model.norm.weight", {h}));
  SIEVE_ASSIGN_OR_RETURN(final_norm_, upload({norm}, h));
  if (config_.tie_word_embeddings && (random || !store->Has("lm_head.weight"))) {
    lm_head_ = embed_;
  } else {
    SIEVE_ASSIGN_OR_RETURN(TensorView head, get("lm_head.weight", {config_.vocab_size, h}));
    SIEVE_ASSIGN_OR_RETURN(lm_head_, upload({head}, h));
  }
  layers_.resize(config_.num_hidden_layers);
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LayerWeights& w = layers_[i];
    SIEVE_ASSIGN_OR_RETURN(TensorView in_norm, get(p + "input_layernorm.weight", {h}));
    SIEVE_ASSIGN_OR_RETURN(w.input_norm, upload({in_norm}, h));
    SIEVE_ASSIGN_OR_RETURN(TensorView post_norm, get(p + "post_attention_layernorm.weight", {h}));
    SIEVE_ASSIGN_OR_RETURN(w.post_norm, upload({post_norm}, h));
    SIEVE_ASSIGN_OR_RETURN(TensorView wq, get(p + "self_attn.q_proj.weight", {q_out, h}));
    SIEVE_ASSIGN_OR_RETURN(TensorView wk, get(p + "self_attn.k_proj.weight", {kv_out, h}));
    SIEVE_ASSIGN_OR_RETURN(TensorView wv, get(p + "self_attn.v_proj.weight", {kv_out, h}));
    SIEVE_ASSIGN_OR_RETURN(w.qkv, upload({wq, wk, wv}, h));
    if (config_.qkv_bias) {
      SIEVE_ASSIGN_OR_RETURN(TensorView bq, get(p + "self_attn.q_proj.bias", {q_out}));
      SIEVE_ASSIGN_OR_RETURN(TensorView bk, get(p + "self_attn.k_proj.bias", {kv_out}));
      SIEVE_ASSIGN_OR_RETURN(TensorView bv, get(p + "self_attn.v_proj.bias", {kv_out}));
      SIEVE_ASSIGN_OR_RETURN(w.qkv_bias, upload({bq, bk, bv}, q_out + 2 * kv_out));
    }
    SIEVE_ASSIGN_OR_RETURN(TensorView wo, get(p + "self_attn.o_proj.weight", {h, q_out}));
    SIEVE_ASSIGN_OR_RETURN(w.o, upload({wo}, q_out));
    if (config_.o_bias) {
      SIEVE_ASSIGN_OR_RETURN(TensorView bo, get(p + "self_attn.o_proj.bias", {h}));
      SIEVE_ASSIGN_OR_RETURN(w.o_bias, upload({bo}, h));
    }
    if (config_.mlp_bias) {
      return absl::UnimplementedError("mlp_bias=true is not supported yet");
    }
    SIEVE_ASSIGN_OR_RETURN(TensorView wg, get(p + "mlp.gate_proj.weight", {inter, h}));
    SIEVE_ASSIGN_OR_RETURN(TensorView wu, get(p + "mlp.up_proj.weight", {inter, h}));
    SIEVE_ASSIGN_OR_RETURN(w.gate_up, upload({wg, wu}, h));
    SIEVE_ASSIGN_OR_RETURN(TensorView wd, get(p + "mlp.down_proj.weight", {h, inter}));
    SIEVE_ASSIGN_OR_RETURN(w.down, upload({wd}, inter));
  }
  return absl::OkStatus();
}

absl::Status ModelWorker::Allocate(const StreamOptions& stream_options) {
  const ModelRunnerOptions& options_ = runner_.options_;
  const ModelConfig& config_ = runner_.config_;
  const AttentionShape& shape_ = runner_.shape_;
  Backend* backend_ = runner_.backend_.get();
  SIEVE_ASSIGN_OR_RETURN(stream_, backend_->CreateStream(stream_options));
  const int64_t m = options_.max_step_tokens, h = config_.hidden_size;
  const int64_t q_cols = int64_t{shape_.num_q_heads} * shape_.head_dim;
  const int64_t qkv_cols = q_cols + 2 * int64_t{shape_.num_kv_heads} * shape_.head_dim;
  const int64_t inter = config_.intermediate_size;
  SIEVE_ASSIGN_OR_RETURN(hidden_, backend_->Allocate(m, h));
  SIEVE_ASSIGN_OR_RETURN(normed_, backend_->Allocate(m, h));
  SIEVE_ASSIGN_OR_RETURN(qkv_, backend_->Allocate(m, qkv_cols));
  SIEVE_ASSIGN_OR_RETURN(q_, backend_->Allocate(m, q_cols));
  SIEVE_ASSIGN_OR_RETURN(attn_, backend_->Allocate(m, q_cols));
  SIEVE_ASSIGN_OR_RETURN(proj_, backend_->Allocate(m, h));
  SIEVE_ASSIGN_OR_RETURN(gate_up_, backend_->Allocate(m, 2 * inter));
  SIEVE_ASSIGN_OR_RETURN(act_, backend_->Allocate(m, inter));
  SIEVE_ASSIGN_OR_RETURN(last_normed_, backend_->Allocate(options_.max_step_logits, h));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> ModelWorker::BuildLayout(
    absl::Span<const SequenceStep> batch, std::vector<int32_t>& tokens) {
  const ModelRunnerOptions& options_ = runner_.options_;
  const ModelConfig& config_ = runner_.config_;
  BatchLayout& l = layout_;
  l.positions.clear();
  l.slots.clear();
  l.kv_lens.clear();
  l.page_table.clear();
  l.query_start.assign(1, 0);
  dense_prefill_.clear();
  dense_decode_.clear();
  tokens.clear();
  std::vector<int32_t> logit_rows;
  size_t stride = 1;
  for (const SequenceStep& s : batch) stride = std::max(stride, s.pages.size());
  l.page_table_stride = static_cast<int32_t>(stride);
  const int32_t ps = options_.page_size;
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceStep& s = batch[i];
    const int64_t total = int64_t{s.num_cached} + s.tokens.size();
    if (s.tokens.empty() || s.num_cached < 0) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, " has no tokens to compute"));
    }
    if (total > int64_t{ps} * static_cast<int64_t>(s.pages.size())) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, " needs ", total,
                                                     " KV slots but has ", s.pages.size(),
                                                     " pages of ", ps));
    }
    for (int32_t page : s.pages) {
      if (page < 0 || page >= options_.num_pages) {
        return absl::InvalidArgumentError(absl::StrCat("page id ", page, " out of range"));
      }
    }
    for (size_t t = 0; t < s.tokens.size(); ++t) {
      if (s.tokens[t] < 0 || s.tokens[t] >= config_.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("token id ", s.tokens[t],
                                                       " outside the vocabulary of ",
                                                       config_.vocab_size));
      }
      const int32_t pos = s.num_cached + static_cast<int32_t>(t);
      tokens.push_back(s.tokens[t]);
      l.positions.push_back(pos);
      l.slots.push_back(int64_t{s.pages[pos / ps]} * ps + pos % ps);
    }
    l.query_start.push_back(static_cast<int32_t>(tokens.size()));
    l.kv_lens.push_back(static_cast<int32_t>(total));
    dense_prefill_.push_back(s.dense_prefill ? 1 : 0);
    dense_decode_.push_back(s.dense_decode ? 1 : 0);
    l.page_table.insert(l.page_table.end(), s.pages.begin(), s.pages.end());
    l.page_table.resize(l.kv_lens.size() * stride, 0);
    if (s.want_logits) logit_rows.push_back(static_cast<int32_t>(tokens.size()) - 1);
  }
  if (static_cast<int64_t>(tokens.size()) > options_.max_step_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("step has ", tokens.size(),
                                                   " tokens; the limit is ",
                                                   options_.max_step_tokens));
  }
  if (static_cast<int64_t>(logit_rows.size()) > options_.max_step_logits) {
    return absl::InvalidArgumentError(absl::StrCat("step asks logits of ", logit_rows.size(),
                                                   " sequences; the limit is ",
                                                   options_.max_step_logits));
  }
  return logit_rows;
}

namespace {

// The smallest power of two >= n (n >= 1).
int32_t PowerOfTwoAtLeast(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return static_cast<int32_t>(std::min<int64_t>(p, INT32_MAX));
}

}  // namespace

bool ModelWorker::IsGraphStep(absl::Span<const SequenceStep> batch) const {
  if (runner_.scratch_page_ < 0 || !step_graphs_) return false;
  for (const SequenceStep& s : batch) {
    if (s.tokens.size() != 1 || !s.want_logits) return false;
  }
  return true;
}

void ModelWorker::PadForGraph(absl::Span<const SequenceStep> batch, std::vector<int32_t>& tokens) {
  const ModelRunnerOptions& o = runner_.options_;
  const int32_t n = static_cast<int32_t>(batch.size());
  // Buckets 1, 2, 4, ... capped by the step limits (which n is within).
  const int32_t bucket = std::min({PowerOfTwoAtLeast(n), o.max_step_logits, o.max_step_tokens});
  size_t max_pages = 1;
  for (const SequenceStep& s : batch) max_pages = std::max(max_pages, s.pages.size());
  int32_t& stride = graph_stride_[bucket];
  stride = std::max(stride, PowerOfTwoAtLeast(static_cast<int64_t>(max_pages)));
  const int32_t scratch = runner_.scratch_page_;
  BatchLayout& l = layout_;
  l.page_table_stride = stride;
  l.page_table.assign(static_cast<size_t>(bucket) * stride, scratch);
  for (int32_t i = 0; i < n; ++i) {
    std::copy(batch[i].pages.begin(), batch[i].pages.end(),
              l.page_table.begin() + static_cast<size_t>(i) * stride);
  }
  // Padding rows: token 0 at position 0 of the scratch page, attending to that one slot.
  for (int32_t i = n; i < bucket; ++i) {
    tokens.push_back(0);
    l.positions.push_back(0);
    l.slots.push_back(int64_t{scratch} * o.page_size);
    l.kv_lens.push_back(1);
    l.query_start.push_back(i + 1);
  }
}

absl::Status ModelWorker::EnqueueLayers(int64_t n, absl::Span<const int32_t> tokens) {
  const ModelRunner& r = runner_;
  const float eps = r.config_.rms_norm_eps;
  const float scale = 1.0f / std::sqrt(static_cast<float>(r.shape_.head_dim));
  Backend& b = *r.backend_;
  BackendStream& st = *stream_;
  Tensor hidden = hidden_.FirstRows(n), normed = normed_.FirstRows(n), qkv = qkv_.FirstRows(n);
  Tensor q = q_.FirstRows(n), attn = attn_.FirstRows(n), proj = proj_.FirstRows(n);
  Tensor gate_up = gate_up_.FirstRows(n), act = act_.FirstRows(n);
  SIEVE_RETURN_IF_ERROR(b.Embed(st, tokens, r.embed_, hidden));
  for (size_t i = 0; i < r.layers_.size(); ++i) {
    const ModelRunner::LayerWeights& w = r.layers_[i];
    const int32_t layer = static_cast<int32_t>(i);
    // The residual stream `hidden` absorbs the previous sublayer's output `proj` in the fused
    // add + norm; the first layer has nothing to add.
    if (i == 0) {
      SIEVE_RETURN_IF_ERROR(b.RmsNorm(st, hidden, w.input_norm, eps, normed));
    } else {
      SIEVE_RETURN_IF_ERROR(b.AddRmsNorm(st, proj, hidden, w.input_norm, eps, normed));
    }
    SIEVE_RETURN_IF_ERROR(b.Linear(st, normed, w.qkv, w.qkv_bias, qkv));
    SIEVE_RETURN_IF_ERROR(b.RopeAndCacheKv(st, layer, qkv, r.shape_, r.rope_, q));
    if (r.options_.quest_page_bounds) SIEVE_RETURN_IF_ERROR(b.UpdatePageBounds(st, layer, r.shape_));
    if (r.options_.ds_label_channels > 0) SIEVE_RETURN_IF_ERROR(b.UpdateDsLabels(st, layer));
    SIEVE_RETURN_IF_ERROR(PlanAttention(layer, q, qkv));
    SIEVE_RETURN_IF_ERROR(b.Attention(st, layer, q, r.shape_, scale, plan_, attn));
    SIEVE_RETURN_IF_ERROR(b.Linear(st, attn, w.o, w.o_bias, proj));
    SIEVE_RETURN_IF_ERROR(b.AddRmsNorm(st, proj, hidden, w.post_norm, eps, normed));
    SIEVE_RETURN_IF_ERROR(b.Linear(st, normed, w.gate_up, Tensor{}, gate_up));
    SIEVE_RETURN_IF_ERROR(b.SiluMul(st, gate_up, act));
    SIEVE_RETURN_IF_ERROR(b.Linear(st, act, w.down, Tensor{}, proj));
  }
  return b.AddRmsNorm(st, proj, hidden, r.final_norm_, eps, normed);
}

absl::Status ModelWorker::PlanAttention(int32_t layer, const Tensor& q, const Tensor& qkv) {
  const ModelRunner& r = runner_;
  AttentionStep step{.layer = layer,
                     .layout = &layout_,
                     .shape = r.shape_,
                     .backend = r.backend_.get(),
                     .stream = stream_.get(),
                     .q = q,
                     .dense_prefill = {},
                     .qkv = qkv,
                     .dense_decode = {}};
  // Graph steps pad the layout past the batch's sequences; only real ones carry a flag.
  if (dense_prefill_.size() == static_cast<size_t>(layout_.num_seqs())) {
    step.dense_prefill = dense_prefill_;
  }
  if (dense_decode_.size() == static_cast<size_t>(layout_.num_seqs())) {
    step.dense_decode = dense_decode_;
  }
  plan_.counted_pairs = -1;  // the last step's count; a policy may count this step's plan
  // Dense and the decode methods (which keep their own DecodeAttentionStats) add no prefill
  // stats.
  const std::string_view method = policy_->method();
  if (std::find(std::begin(kDecodeAttentionMethods), std::end(kDecodeAttentionMethods),
                method) != std::end(kDecodeAttentionMethods)) {
    return policy_->Plan(step, plan_);
  }
  const auto start = std::chrono::steady_clock::now();
  SIEVE_RETURN_IF_ERROR(policy_->Plan(step, plan_));
  prefill_stats_.plan_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const int64_t dense = DensePairs(layout_, r.shape_.num_q_heads);
  prefill_stats_.dense_pairs += dense;
  prefill_stats_.read_pairs += plan_.dense ? dense : plan_.ReadPairs(layout_, r.shape_.num_q_heads);
  prefill_stats_.sparse_layers += plan_.dense ? 0 : 1;
  return absl::OkStatus();
}

absl::StatusOr<DeviceLogits> ModelWorker::RunGraph(absl::Span<const SequenceStep> batch,
                                                   std::vector<int32_t>& tokens) {
  PadForGraph(batch, tokens);
  const ModelRunner& r = runner_;
  Backend& b = *r.backend_;
  BackendStream& st = *stream_;
  const int64_t bucket = static_cast<int64_t>(tokens.size());
  SIEVE_ASSIGN_OR_RETURN(const StepGraphMode mode, b.BeginGraphStep(st, layout_, tokens));
  if (mode != StepGraphMode::kReplay) {
    absl::Status enqueued = EnqueueLayers(bucket, tokens);
    if (enqueued.ok()) enqueued = b.GraphLogits(st, normed_.FirstRows(bucket), r.lm_head_);
    if (!enqueued.ok()) {
      b.AbortGraphStep(st);
      return enqueued;
    }
  }
  // Sequence i is row i: the logits of the real rows are the first rows of the step's.
  SIEVE_ASSIGN_OR_RETURN(DeviceLogits logits, b.EndGraphStepOnDevice(st));
  if (logits.rows < static_cast<int64_t>(batch.size()) || logits.vocab != r.config_.vocab_size) {
    return absl::InternalError(absl::StrCat("graph step returned ", logits.rows, " rows of ",
                                            logits.vocab, " logits for ", batch.size(),
                                            " sequences"));
  }
  logits.rows = static_cast<int64_t>(batch.size());
  return logits;
}

absl::StatusOr<DeviceLogits> ModelWorker::Run(absl::Span<const SequenceStep> batch) {
  if (batch.empty()) return DeviceLogits{};
  std::vector<int32_t> tokens;
  SIEVE_ASSIGN_OR_RETURN(std::vector<int32_t> logit_rows, BuildLayout(batch, tokens));
  if (IsGraphStep(batch)) return RunGraph(batch, tokens);
  const ModelRunner& r = runner_;
  Backend& b = *r.backend_;
  BackendStream& st = *stream_;
  SIEVE_RETURN_IF_ERROR(b.BeginStep(st, layout_));
  SIEVE_RETURN_IF_ERROR(EnqueueLayers(static_cast<int64_t>(tokens.size()), tokens));
  if (logit_rows.empty()) return DeviceLogits{};
  const int64_t rows = static_cast<int64_t>(logit_rows.size());
  Tensor last = last_normed_.FirstRows(rows);
  SIEVE_RETURN_IF_ERROR(b.GatherRows(st, normed_.FirstRows(tokens.size()), logit_rows, last));
  return b.LogitsOnDevice(st, last, r.lm_head_);
}

absl::Status ModelWorker::EndStep(absl::Status status, bool waited) {
  // Whatever happened, nothing the step enqueued may still run when it returns: its caller frees,
  // shares or reuses the step's pages next. A waiting call that succeeded (CopyLogitsToHost,
  // Sample) has waited for everything before it on the stream already.
  if (waited && status.ok()) return status;
  absl::Status synced = runner_.backend_->Synchronize(*stream_);
  if (status.ok() || IsDeviceLost(synced)) return synced;
  return status;
}

absl::Status ModelWorker::Forward(absl::Span<const SequenceStep> batch,
                                  std::vector<float>& logits) {
  absl::StatusOr<DeviceLogits> device = Run(batch);
  if (!device.ok() || device->empty()) return EndStep(device.status());
  const size_t old = logits.size();
  logits.resize(old + device->rows * device->vocab);
  return EndStep(runner_.backend_->CopyLogitsToHost(*stream_, *device,
                                                    absl::MakeSpan(logits).subspan(old)),
                 /*waited=*/true);
}

absl::Status ModelWorker::ForwardSample(absl::Span<const SequenceStep> batch,
                                        std::vector<absl::StatusOr<SampledToken>>& out) {
  std::vector<SampleRow> rows;
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceStep& s = batch[i];
    if (!s.want_logits) continue;
    if (s.sampling == nullptr || s.history == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", i, " wants a token but has no sampling parameters or history"));
    }
    rows.push_back(SampleRow{s.sampling, s.history, s.uniform});
  }
  absl::StatusOr<DeviceLogits> device = Run(batch);
  if (!device.ok() || rows.empty()) return EndStep(device.status());
  if (device->rows != static_cast<int64_t>(rows.size())) {
    return EndStep(absl::InternalError(absl::StrCat(
        "step returned ", device->rows, " rows of logits for ", rows.size(), " sequences")));
  }
  const size_t old = out.size();
  out.resize(old + rows.size(), absl::UnknownError("not sampled"));
  return EndStep(
      runner_.backend_->Sample(*stream_, *device, rows, absl::MakeSpan(out).subspan(old)),
      /*waited=*/true);
}

StepGraphStats ModelWorker::graph_stats() const {
  return runner_.backend_->GraphStats(*stream_);
}

}  // namespace sieve::engine
