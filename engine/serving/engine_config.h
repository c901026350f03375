// EngineConfig: every engine setting and its default, written once. The daemon's key table
// (server/config_keys.cc) binds its `model.*`, `kv_cache.*`, `scheduler.*`, `pools.*` and
// `attention.*` keys straight to these fields, so a key's path is the member path here:
// `kv_cache.page_size_tokens` is EngineConfig::kv_cache.page_size_tokens. The `sieve generate
// --model` CLI loads the same tree through the same loader.
//
// The engine's parts take their own option structs (ModelRunnerOptions, SchedulerOptions); both
// are derived from this tree by the two functions at the end of this file and nowhere else.
//
// Thread-safety: plain values.
#ifndef SIEVE_ENGINE_SERVING_ENGINE_CONFIG_H_
#define SIEVE_ENGINE_SERVING_ENGINE_CONFIG_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "engine/attention/attention_config.h"
#include "engine/attention/attention_methods.h"

namespace sieve::engine {

// The values each choice setting accepts (the engine checks them; the key table lists them).
inline constexpr std::string_view kBackendNames[] = {"cpu", "cuda"};
inline constexpr std::string_view kDtypeNames[] = {"auto", "float32", "bfloat16"};
inline constexpr std::string_view kWeightSources[] = {"checkpoint", "random"};
inline constexpr std::string_view kStreamPriorityNames[] = {"high", "normal"};
inline constexpr std::string_view kAttentionKernels[] = {"auto", "simple"};

// The element type backend `backend` computes in: "float32" for cpu, "bfloat16" for cuda, ""
// for an unknown name.
std::string_view BackendDtype(std::string_view backend);

// attention.prefill.max_density's 0 ("the backend's") for `backend` and prefill `method`: the plan
// density past which dense prefill is faster than block-sparse. cpu 0.9 (the CPU block-sparse
// kernel runs at 0.9-1.2 of the dense kernel per computed tile, bench/results/2026-12-05-cpu-
// gates.md); cuda: XAttention's 128 x 128 blocks run on the wgmma kernel at 0.83-0.84 of dense
// wgmma per computed tile, so 0.8; MInference's plans on the mma.sync kernel at 0.84 of dense
// mma.sync per tile, which takes 2.05x dense wgmma's time at 128K: 0.84 / 2.05 = 0.41, so 0.4
// (bench/results/2026-12-06-gpu-run-2-h100.md, -gpu-run-3-h100.md); other backends 1 (never).
double AutoPrefillMaxDensity(std::string_view backend, std::string_view method);

// The served model and where it runs (`model.*`).
struct ServedModelConfig {
  // Name clients pass in requests' `model` field, and the `model` metric label.
  std::string name = "sieve-embedded";
  // Hugging Face checkpoint folder: config.json, *.safetensors, tokenizer.json. Relative paths
  // are resolved against the working directory.
  std::string directory = "models/embedded";
  // Compute backend, one of kBackendNames: "cpu" (fp32 reference) or "cuda" (bf16); tests may
  // also name a backend registered with RegisterBackend (engine/backend.h).
  std::string backend = "cpu";
  // CUDA device ordinal to serve on, as a list of at most one (empty: device 0). Empty on cpu.
  std::vector<int> devices;
  // Compute dtype, one of kDtypeNames; anything but "auto" must be BackendDtype(backend).
  std::string dtype = "auto";
  // Context limit per request (prompt + generated), in tokens; 0 uses the model's.
  int32_t max_context_tokens = 0;
  // Where the weights come from, one of kWeightSources: the directory's *.safetensors, or
  // seeded random weights of the shapes config.json implies (benchmarks of real shapes).
  std::string weights = "checkpoint";
  // Seed of weights "random".
  int32_t random_seed = 0;
  // Folder of tokenizer.json (and tokenizer_config.json); empty means `directory`.
  std::string tokenizer_directory;
  // A Jinja chat template file that replaces tokenizer_config.json's chat_template; empty keeps
  // the model's own (engine/tokenizer/chat_template.h).
  std::string chat_template_file;

  // Host threads of the cpu backend's operators; 0 = every hardware thread.
  int32_t cpu_threads = 0;

  // Not configuration keys; for the CLI, tests and benchmarks.
  // Run decode steps from CUDA graphs on backends that have them (ModelRunnerOptions).
  bool cuda_graphs = true;

  bool operator==(const ServedModelConfig&) const = default;
};

// The paged KV pool (`kv_cache.*`).
struct KvCacheConfig {
  // Tokens per KV page; a power of two.
  int32_t page_size_tokens = 16;
  // Pages to allocate, shared by all requests; 0 derives the count from memory_fraction of the
  // memory left after the weights. 8192 pages of 16 tokens hold 131072 tokens, the embedded
  // model's full context (512 MiB for it on cpu, touched only as pages fill). A count whose pool
  // does not fit in the backend's available memory is refused before allocating.
  int32_t num_pages = 8192;
  // With num_pages 0: the fraction of the backend's free memory after loading the weights (GPU
  // memory on cuda, available host memory on cpu) the KV pool may use, in (0, 1]. The pool never
  // grows beyond what scheduler.max_running_requests full-context requests can use.
  double memory_fraction = 0.9;
  // Element type of the stored keys and values, one of kDtypeNames: "auto" is the backend's
  // compute dtype (BackendDtype: float32 on cpu, bfloat16 on cuda). The cpu backend also takes
  // "bfloat16": keys and values rounded as written and widened as read (half the KV bytes and
  // memory; decode attention reads half as much), computing in fp32, with every prefill and
  // decode method. cuda keeps bfloat16 only.
  std::string dtype = "auto";

  bool operator==(const KvCacheConfig&) const = default;
};

// The continuous-batching scheduler (`scheduler.*`). Preemption is always by recompute (see
// engine/scheduler.h); there is no setting for it.
struct SchedulerConfig {
  // Token budget of one step over both pools: one token per decoding request plus prefill
  // chunks, in tokens. Also the most tokens one worker step carries.
  int32_t max_batch_tokens = 2048;
  // Requests admitted to run (prefilling or decoding) at once; also the most logits rows of
  // one worker step.
  int32_t max_running_requests = 64;
  // Requests waiting for admission; beyond it Submit returns ResourceExhausted.
  int32_t max_queued_requests = 256;
  // Prompt tokens waiting for admission, summed over the queue, in tokens; beyond it Submit
  // returns ResourceExhausted.
  int32_t max_queued_tokens = 1 << 20;
  // Largest prefill chunk of one request in one step, in tokens.
  int32_t prefill_chunk_tokens = 512;
  // Reuse the KV pages of identical full-page prefixes across requests.
  bool enable_prefix_caching = true;

  bool operator==(const SchedulerConfig&) const = default;
};

// The worker pools (`pools.*`).
struct PoolsConfig {
  // Worker threads running prefill batches.
  int32_t prefill_workers = 1;
  // Worker threads running decode batches.
  int32_t decode_workers = 1;
  // Priority of the decode workers' device streams, one of kStreamPriorityNames: "high" lets a
  // decode step's kernels start ahead of a concurrent prefill chunk's waiting blocks (cuda);
  // "normal" treats both pools alike. The prefill pool's streams are always normal.
  std::string decode_priority = "high";
  // Watchdog, in seconds: a worker step (one batch on the device), a scheduler-thread iteration
  // or an output thread's batch of sink calls that has not finished after this long means a
  // hung device, worker, engine or sink (the last two are seen by a watchdog thread). The
  // engine then reports itself failed (health() and EngineObserver::OnDeviceLost, as for a lost
  // device) and the daemon turns NOT_SERVING, drains what it can and exits for its supervisor
  // to restart it. 0 turns the watchdog off.
  double step_timeout_s = 300.0;
  // Threads that turn sampled tokens into streamed output (detokenizing, stop strings, the
  // sinks' OnTokens/OnFinish, where the server builds response messages), off the scheduler
  // thread. 0 runs that work on the scheduler thread itself (for comparisons).
  int32_t output_workers = 1;

  bool operator==(const PoolsConfig&) const = default;
};

// Everything Engine::Create needs. A default-constructed EngineConfig serves the embedded model
// (models/embedded, relative to the working directory) on cpu and passes Validate().
struct EngineConfig {
  ServedModelConfig model;
  KvCacheConfig kv_cache;
  SchedulerConfig scheduler;
  PoolsConfig pools;
  AttentionConfig attention;

  // Checks every setting the engine relies on: choices, ranges, and the settings against each
  // other (e.g. scheduler.prefill_chunk_tokens <= scheduler.max_batch_tokens, model.dtype and
  // model.devices against model.backend). Returns InvalidArgument naming the key paths at fault,
  // one problem per line; OK otherwise.
  absl::Status Validate() const;

  bool operator==(const EngineConfig&) const = default;
};

struct ModelRunnerOptions;
struct SchedulerOptions;

// The model runner's options for `config`: backend, device, weights, page size and count (0:
// sized by ModelRunner::Load from the free memory), the sizing budget, and the step limits
// (scheduler.max_batch_tokens tokens, scheduler.max_running_requests logits rows). The one place
// they are derived; tests and benchmarks that drive a runner directly start from
// RunnerOptionsFor(EngineConfig()). Include engine/model_runner.h to call it.
ModelRunnerOptions RunnerOptionsFor(const EngineConfig& config);

// The scheduler's options for `config` with a pool of `num_pages` KV pages (the runner's count,
// which Load may have derived). The one place they are derived. Include engine/scheduler.h to
// call it.
SchedulerOptions SchedulerOptionsFor(const EngineConfig& config, int32_t num_pages);

// kv_cache.dtype resolved for `config`'s backend: "auto" becomes BackendDtype(model.backend).
std::string KvCacheDtype(const EngineConfig& config);

// Whether `value` is one of `choices`.
bool IsOneOf(std::string_view value, std::span<const std::string_view> choices);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_ENGINE_CONFIG_H_
