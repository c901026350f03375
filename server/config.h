// The daemon's configuration: plain structs with defaults, loaded from one YAML file and
// overridable key by key from the command line (`--set scheduler.max_batch_tokens=4096`).
//
// Every setting is described once, in a key table inside config.cc ({path, doc, field, rule}).
// That table drives YAML loading, unknown-key detection, per-key validation, `--set`
// overrides, `--help` output and ConfigToYaml(), so adding a setting is one struct member plus
// one table entry.
//
// Key paths mirror the struct members: `kv_cache.page_size_tokens` is
// `ServerConfig::kv_cache.page_size_tokens` and the YAML
//
//   kv_cache:
//     page_size_tokens: 16
//
// Relative paths (model.directory) are resolved against the daemon's working directory.
//
// Thread safety: the functions here are pure apart from LoadConfigFile's file read; a
// ServerConfig is a value, safe to read from many threads once built.
#ifndef SIEVE_SERVER_CONFIG_H_
#define SIEVE_SERVER_CONFIG_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace sieve::server {

// The gRPC listener (`server.*`).
struct GrpcServerConfig {
  // Address to serve gRPC on: "host:port", "[ipv6]:port" or "unix:/path". Port 0 picks a
  // free port (the daemon logs the one it got).
  std::string listen_address = "0.0.0.0:50051";
  // Largest request or response message accepted or sent, in bytes.
  int max_message_bytes = 16 * 1024 * 1024;
  // Interval between keepalive pings the server sends on an idle connection, in seconds.
  double keepalive_time_s = 60.0;
  // How long to wait for a keepalive ping's acknowledgement before closing, in seconds.
  double keepalive_timeout_s = 20.0;
  // On SIGTERM: how long in-flight requests may keep running before they are cancelled, in
  // seconds. 0 cancels them at once.
  double drain_grace_period_s = 30.0;

  bool operator==(const GrpcServerConfig&) const = default;
};

// The Prometheus metrics endpoint (`metrics.*`).
struct MetricsConfig {
  // Serve /metrics over HTTP.
  bool enabled = true;
  // Address of the metrics HTTP listener, "host:port". Port 0 picks a free port.
  std::string listen_address = "0.0.0.0:9090";

  bool operator==(const MetricsConfig&) const = default;
};

// The served model and where it runs (`model.*`).
struct ModelConfig {
  // Name clients pass in requests' `model` field, and the `model` metric label.
  std::string name = "sieve-embedded";
  // Hugging Face checkpoint folder: config.json, *.safetensors, tokenizer.json.
  std::string directory = "models/embedded";
  // Compute backend: "cpu" (fp32 reference) or "cuda".
  std::string backend = "cpu";
  // CUDA device ordinals to use (cuda only; empty means device 0). Must be empty for cpu.
  std::vector<int> devices;
  // Compute dtype: "auto" (float32 on cpu, bfloat16 on cuda), "float32" or "bfloat16".
  std::string dtype = "auto";
  // Context length limit per request (prompt + generated), in tokens; 0 uses the model's.
  int max_context_tokens = 0;
  // Where the weights come from: "checkpoint" (the directory's *.safetensors) or "random"
  // (seeded random weights of the shapes config.json implies; for benchmarking real shapes
  // such as configs/models/llama-3.1-8b without a checkpoint).
  std::string weights = "checkpoint";
  // Seed of the random weights.
  int random_seed = 0;
  // Folder of tokenizer.json (and tokenizer_config.json); empty means `directory`. Lets a
  // shape-only model directory (configs/models/*) borrow a tokenizer.
  std::string tokenizer_directory;

  bool operator==(const ModelConfig&) const = default;
};

// The paged KV cache (`kv_cache.*`).
struct KvCacheConfig {
  // Tokens per KV page; a power of two in [1, 256].
  int page_size_tokens = 16;
  // Pages to allocate (shared by all layers' page tables); 0 derives the count from
  // memory_fraction of the memory left after the weights (cpu only so far). The default, 4096
  // pages of 16 tokens, holds 65536 tokens: 256 MiB for the embedded model on cpu.
  int num_pages = 4096;
  // With num_pages = 0: fraction of the device memory (cuda) or physical memory (cpu) left
  // after loading the weights that the KV cache may use, in (0, 1].
  double memory_fraction = 0.9;

  bool operator==(const KvCacheConfig&) const = default;
};

// The continuous-batching scheduler (`scheduler.*`).
struct SchedulerConfig {
  // Token budget of one scheduler step: decode tokens plus prefill chunk tokens, in tokens.
  int max_batch_tokens = 2048;
  // Requests admitted to run (prefilling or decoding) at once.
  int max_running_requests = 64;
  // Requests waiting for admission; beyond it new requests get RESOURCE_EXHAUSTED.
  int max_queued_requests = 256;
  // Prompt tokens waiting for admission, summed over the queue, in tokens; beyond it new
  // requests get RESOURCE_EXHAUSTED.
  int max_queued_tokens = 1 << 20;
  // Largest prefill chunk of one request in one step, in tokens.
  int prefill_chunk_tokens = 512;
  // Reuse the KV pages of identical full-page prompt prefixes across requests.
  bool enable_prefix_caching = true;
  // What to do when KV pages run out: "recompute" frees the lowest-priority request's pages
  // and prefills it again later.
  std::string preemption = "recompute";

  bool operator==(const SchedulerConfig&) const = default;
};

// The worker pools (`pools.*`).
struct PoolsConfig {
  // Worker threads running prefill batches.
  int prefill_workers = 1;
  // Worker threads running decode batches.
  int decode_workers = 1;
  // Priority of the decode workers' device streams: "high" (decode kernels start ahead of a
  // concurrent prefill chunk's waiting blocks) or "normal" (both pools alike). CUDA only.
  std::string decode_priority = "high";

  bool operator==(const PoolsConfig&) const = default;
};

// The attention policy (`attention.*`). Only "dense" exists so far; the sparse policies add
// their names and settings here when they land.
struct AttentionConfig {
  // Prefill attention policy.
  std::string prefill = "dense";
  // Decode attention policy.
  std::string decode = "dense";

  bool operator==(const AttentionConfig&) const = default;
};

// Per-request limits and defaults (`limits.*`).
struct LimitsConfig {
  // max_tokens of a request that does not set it, in tokens (capped to the context left).
  int default_max_tokens = 256;
  // Most stop strings one request may carry.
  int max_stop_strings = 16;

  bool operator==(const LimitsConfig&) const = default;
};

// Logging (`logging.*`).
struct LoggingConfig {
  // Least severe level logged: "debug", "info", "warning" or "error".
  std::string level = "info";

  bool operator==(const LoggingConfig&) const = default;
};

// Everything the daemon reads at start-up. A default-constructed ServerConfig serves the
// embedded model on CPU and passes Validate().
struct ServerConfig {
  GrpcServerConfig server;
  MetricsConfig metrics;
  ModelConfig model;
  KvCacheConfig kv_cache;
  SchedulerConfig scheduler;
  PoolsConfig pools;
  AttentionConfig attention;
  LimitsConfig limits;
  LoggingConfig logging;

  // Checks every setting against its rule (range, choices, format) and the settings against
  // each other (e.g. prefill_chunk_tokens <= max_batch_tokens). Returns INVALID_ARGUMENT
  // naming the key(s) at fault; several problems are reported one per line.
  absl::Status Validate() const;

  bool operator==(const ServerConfig&) const = default;
};

// Parses `yaml` (the contents of a config file) onto the defaults, then applies `overrides`
// ("key.path=value" strings, as given to `--set`) in order, then runs Validate(). Missing keys
// keep their defaults; an empty document gives the defaults. Errors (INVALID_ARGUMENT) are
// prefixed by "<source_name>:<line>: " and name the full key path, e.g.
// "configs/x.yaml:12: unknown key 'scheduler.max_batch_tokenz'"; all problems found are
// reported, one per line. Never throws.
absl::StatusOr<ServerConfig> LoadConfigString(std::string_view yaml, std::string_view source_name,
                                              absl::Span<const std::string> overrides = {});

// Reads the file at `path` and loads it as LoadConfigString() does, with `path` as the source
// name. A missing or unreadable file is NOT_FOUND / PERMISSION_DENIED / INVALID_ARGUMENT.
absl::StatusOr<ServerConfig> LoadConfigFile(const std::string& path,
                                            absl::Span<const std::string> overrides = {});

// Sets the key at `key_path` (e.g. "scheduler.max_batch_tokens") from its text form `value`,
// with the key's type and rule checked (cross-field checks are left to Validate(), since a
// set of overrides may pass through invalid combinations). Lists are written "0,1" or "[0, 1]"
// ("" or "[]" for empty); booleans true/false/yes/no/on/off/1/0. On error `config` is
// unchanged.
absl::Status ApplyOverride(ServerConfig& config, std::string_view key_path,
                           std::string_view value);

// Like ApplyOverride() with "key.path=value" split at the first '='.
absl::Status ApplyOverrideAssignment(ServerConfig& config, std::string_view assignment);

// One configuration key, as listed by `sieved --help`.
struct ConfigKeyInfo {
  // Full dotted path, e.g. "kv_cache.page_size_tokens".
  std::string path;
  // Value type: "int", "number", "bool", "string" or "list of int".
  std::string type;
  // The default value in its text form (as ApplyOverride() accepts it).
  std::string default_value;
  // The values the key accepts, e.g. "an integer between 1 and 256" or "one of: cpu, cuda".
  std::string accepted;
  // What the key does, with units and accepted values.
  std::string doc;
};

// Every configuration key in table order (grouped by section), with defaults and docs.
std::vector<ConfigKeyInfo> ListConfigKeys();

// ListConfigKeys() formatted for a terminal: one block per key with type, default and doc.
std::string FormatConfigHelp();

// Reads the key at `key_path` in its text form (as ApplyOverride() accepts it); NOT_FOUND for
// an unknown key.
absl::StatusOr<std::string> GetConfigValue(const ServerConfig& config, std::string_view key_path);

// Writes `config` as a YAML document holding every key, each preceded by its doc as a comment.
// LoadConfigString() of the result gives back `config`.
std::string ConfigToYaml(const ServerConfig& config);

}  // namespace sieve::server

#endif  // SIEVE_SERVER_CONFIG_H_
