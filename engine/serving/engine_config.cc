#include "engine/serving/engine_config.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/backends/backend.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/scheduler.h"

namespace sieve::engine {
namespace {

std::string Quoted(std::string_view s) { return absl::StrCat("'", std::string(s), "'"); }

// "<key> must be one of: a, b, got 'c'" unless `value` is one of `choices`.
void CheckChoice(std::string_view key, std::string_view value,
                 std::span<const std::string_view> choices, std::vector<std::string>& errors) {
  if (IsOneOf(value, choices)) return;
  std::vector<std::string> names(choices.begin(), choices.end());
  errors.push_back(absl::StrCat(std::string(key), " must be one of: ", absl::StrJoin(names, ", "),
                                ", got ", Quoted(value)));
}

// "<key> must be at least <lo>, got <v>" unless v >= lo.
void CheckAtLeast(std::string_view key, int64_t v, int64_t lo, std::vector<std::string>& errors) {
  if (v >= lo) return;
  errors.push_back(absl::StrCat(std::string(key), " must be at least ", lo, ", got ", v));
}

void CheckModel(const ServedModelConfig& m, std::vector<std::string>& errors) {
  if (m.directory.empty()) errors.push_back("model.directory must be a non-empty path");
  if (!FindRegisteredBackend(m.backend)) {
    CheckChoice("model.backend", m.backend, kBackendNames, errors);
  }
  CheckChoice("model.dtype", m.dtype, kDtypeNames, errors);
  CheckChoice("model.weights", m.weights, kWeightSources, errors);
  CheckAtLeast("model.max_context_tokens", m.max_context_tokens, 0, errors);
  const std::string devices = absl::StrCat("[", absl::StrJoin(m.devices, ", "), "]");
  for (int d : m.devices) {
    if (d < 0) errors.push_back(absl::StrCat("model.devices holds a negative ordinal: ", devices));
  }
  if (m.backend == "cpu" && !m.devices.empty()) {
    errors.push_back(
        absl::StrCat("model.devices must be empty with model.backend cpu, got ", devices));
  }
  if (m.backend == "cuda" && m.devices.size() > 1) {
    errors.push_back(absl::StrCat("model.devices lists ", m.devices.size(), " devices ", devices,
                                  "; the cuda backend serves on one device: list one ordinal "
                                  "(or none for device 0)"));
  }
  const std::string_view computes = BackendDtype(m.backend);
  if (m.dtype != "auto" && !computes.empty() && IsOneOf(m.dtype, kDtypeNames) &&
      m.dtype != computes) {
    const std::string dtype(computes);
    errors.push_back(absl::StrCat("model.dtype ", m.dtype, " is not what the ", m.backend,
                                  " backend computes in (", dtype, "); use auto or ", dtype));
  }
}

void CheckKvAndScheduler(const EngineConfig& c, std::vector<std::string>& errors) {
  const KvCacheConfig& kv = c.kv_cache;
  const SchedulerConfig& s = c.scheduler;
  const int32_t page = kv.page_size_tokens;
  if (page <= 0 || (page & (page - 1)) != 0) {
    errors.push_back(
        absl::StrCat("kv_cache.page_size_tokens must be a power of two, got ", page));
  }
  CheckAtLeast("kv_cache.num_pages", kv.num_pages, 0, errors);
  CheckChoice("kv_cache.dtype", kv.dtype, kDtypeNames, errors);
  const std::string& backend = c.model.backend;
  if (kv.dtype != "auto" && IsOneOf(kv.dtype, kDtypeNames)) {
    if (backend == "cuda" && kv.dtype != "bfloat16") {
      errors.push_back(absl::StrCat("kv_cache.dtype ", kv.dtype, " is not available on the cuda "
                                    "backend (its KV cache is bfloat16); use auto or bfloat16"));
    } else if (backend != "cpu" && backend != "cuda") {
      errors.push_back(absl::StrCat("kv_cache.dtype must be auto on backend ", backend,
                                    ", got ", kv.dtype));
    }
  }
  if (!(kv.memory_fraction > 0 && kv.memory_fraction <= 1)) {
    errors.push_back(absl::StrCat("kv_cache.memory_fraction must be in (0, 1], got ",
                                  kv.memory_fraction));
  }
  CheckAtLeast("scheduler.max_batch_tokens", s.max_batch_tokens, 1, errors);
  CheckAtLeast("scheduler.max_running_requests", s.max_running_requests, 1, errors);
  CheckAtLeast("scheduler.max_queued_requests", s.max_queued_requests, 1, errors);
  CheckAtLeast("scheduler.max_queued_tokens", s.max_queued_tokens, 1, errors);
  CheckAtLeast("scheduler.prefill_chunk_tokens", s.prefill_chunk_tokens, 1, errors);
  if (s.prefill_chunk_tokens > s.max_batch_tokens) {
    errors.push_back(absl::StrCat("scheduler.prefill_chunk_tokens (", s.prefill_chunk_tokens,
                                  ") must not exceed scheduler.max_batch_tokens (",
                                  s.max_batch_tokens, ")"));
  }
  if (s.max_running_requests > s.max_batch_tokens) {
    errors.push_back(absl::StrCat("scheduler.max_running_requests (", s.max_running_requests,
                                  ") must not exceed scheduler.max_batch_tokens (",
                                  s.max_batch_tokens,
                                  "): every running request decodes one token per step"));
  }
  const int32_t context = c.model.max_context_tokens;
  if (context > 0 && s.max_queued_tokens < context) {
    errors.push_back(absl::StrCat("scheduler.max_queued_tokens (", s.max_queued_tokens,
                                  ") must be at least model.max_context_tokens (", context,
                                  "), else a full-length prompt could never be queued"));
  }
  const int64_t kv_tokens = int64_t{kv.num_pages} * page;
  if (kv.num_pages > 0 && context > 0 && kv_tokens < context) {
    errors.push_back(absl::StrCat("kv_cache.num_pages * kv_cache.page_size_tokens (", kv_tokens,
                                  " tokens) must hold one full context of "
                                  "model.max_context_tokens (",
                                  context, " tokens)"));
  }
}

}  // namespace

bool IsOneOf(std::string_view value, std::span<const std::string_view> choices) {
  return std::find(choices.begin(), choices.end(), value) != choices.end();
}

std::string KvCacheDtype(const EngineConfig& c) {
  if (c.kv_cache.dtype != "auto") return c.kv_cache.dtype;
  return std::string(BackendDtype(c.model.backend));
}

double AutoPrefillMaxDensity(std::string_view backend, std::string_view method) {
  if (backend == "cpu") return 0.9;
  if (backend == "cuda") return method == "xattention" ? 0.8 : 0.4;
  return 1.0;
}

std::string_view BackendDtype(std::string_view backend) {
  if (backend == "cpu") return "float32";
  if (backend == "cuda") return "bfloat16";
  return "";
}

absl::Status EngineConfig::Validate() const {
  std::vector<std::string> errors;
  CheckModel(model, errors);
  CheckKvAndScheduler(*this, errors);
  CheckAtLeast("pools.prefill_workers", pools.prefill_workers, 1, errors);
  CheckAtLeast("pools.decode_workers", pools.decode_workers, 1, errors);
  CheckChoice("pools.decode_priority", pools.decode_priority, kStreamPriorityNames, errors);
  CheckAtLeast("pools.output_workers", pools.output_workers, 0, errors);
  if (!(pools.step_timeout_s >= 0)) {
    errors.push_back(absl::StrCat("pools.step_timeout_s must be >= 0 (0: off), got ",
                                  pools.step_timeout_s));
  }
  attention.prefill.Validate(errors);
  // XAttention runs on cuda with the block-sparse prefill kernel's 128-query tiles
  // (engine/backends/cuda/cuda_sparse.cc); MInference with its 64-query-row mode and the GPU
  // vertical-slash estimator (cuda_minference.cc; block-sparse heads are refused there).
  if (attention.prefill.method == "xattention" && model.backend == "cuda" &&
      attention.prefill.xattention.block_size != 128) {
    errors.push_back(absl::StrCat("attention.prefill.xattention.block_size must be 128 on the "
                                  "cuda backend (its block-sparse prefill kernel's query tile), "
                                  "got ", attention.prefill.xattention.block_size));
  }
  CheckChoice("attention.kernel", attention.kernel, kAttentionKernels, errors);
  if (model.backend == "cpu" && attention.kernel != "auto") {
    errors.push_back(absl::StrCat("attention.kernel ", attention.kernel,
                                  " is not available on cpu (it has one attention kernel); use "
                                  "auto"));
  }
  attention.decode.Validate(errors);
  const DecodeAttentionConfig& dec = attention.decode;
  if (dec.method == "quest" && dec.token_budget < 2 * kv_cache.page_size_tokens) {
    errors.push_back(absl::StrCat("attention.decode.token_budget must be at least two KV pages (",
                                  2 * kv_cache.page_size_tokens, " tokens) for ", dec.method,
                                  ", got ", dec.token_budget));
  }
  // Quest and DoubleSparsity run on cpu and cuda (engine/backends/cuda/cuda_sparse.cc,
  // cuda_double_sparsity.cc).
  if (dec.method != "dense" && model.backend != "cpu" && model.backend != "cuda") {
    errors.push_back(absl::StrCat("attention.decode.method ", dec.method,
                                  " is not available on ", model.backend, " yet (cpu only)"));
  }
  if (errors.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrJoin(errors, "\n"));
}

ModelRunnerOptions RunnerOptionsFor(const EngineConfig& c) {
  ModelRunnerOptions o;
  o.backend = c.model.backend;
  o.device = c.model.devices.empty() ? 0 : c.model.devices.front();
  o.weights = c.model.weights;
  o.random_seed = static_cast<uint64_t>(c.model.random_seed);
  o.num_threads = c.model.cpu_threads;
  o.kv_dtype = KvCacheDtype(c);
  o.cuda_graphs = c.model.cuda_graphs;
  o.quest_page_bounds = c.attention.decode.method == "quest";
  // Sparse decode reads a few pages per KV head: head-major pages make each a run (quest
  // grouped attention at 128K on the 8B shape 1.25x faster). Dense decode: the runner chooses
  // by the model's shape (ModelRunnerOptions::kv_layout).
  if (c.attention.decode.method != "dense") o.kv_layout = kernels::KvLayout::kHeadMajor;
  if (c.attention.decode.method == "double_sparsity") {
    const DoubleSparsityDecodeConfig& ds = c.attention.decode.double_sparsity;
    o.ds_label_channels = ds.channels;
    o.ds_label_bits = ds.label_bits;
    o.ds_per_kv_head = ds.per_kv_head;
  }
  o.attention_kernel = c.attention.kernel;
  o.page_size = c.kv_cache.page_size_tokens;
  o.num_pages = c.kv_cache.num_pages;
  o.kv_memory_fraction = c.kv_cache.memory_fraction;
  o.kv_max_sequences = c.scheduler.max_running_requests;
  o.kv_max_context_tokens = c.model.max_context_tokens;
  o.max_step_tokens = c.scheduler.max_batch_tokens;
  // One logits row per running request and step at most (decodes and finishing prefills).
  o.max_step_logits = c.scheduler.max_running_requests;
  return o;
}

SchedulerOptions SchedulerOptionsFor(const EngineConfig& c, int32_t num_pages) {
  SchedulerOptions o;
  o.page_size = c.kv_cache.page_size_tokens;
  o.num_pages = num_pages;
  o.max_batch_tokens = c.scheduler.max_batch_tokens;
  o.prefill_chunk_tokens = c.scheduler.prefill_chunk_tokens;
  o.max_running_requests = c.scheduler.max_running_requests;
  o.prefill_workers = c.pools.prefill_workers;
  o.decode_workers = c.pools.decode_workers;
  o.max_worker_tokens = c.scheduler.max_batch_tokens;
  o.max_worker_sequences = c.scheduler.max_running_requests;
  o.enable_prefix_caching = c.scheduler.enable_prefix_caching;
  return o;
}

}  // namespace sieve::engine
