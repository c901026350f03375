// The daemon's configuration: plain structs with defaults, loaded from one YAML file and
// overridable key by key from the command line (`--set scheduler.max_batch_tokens=4096`).
//
// Every setting is described once, in the key table (server/config_keys.cc: {path, rule, doc,
// field}); its default is the struct member's. The table drives YAML loading, unknown-key
// detection, per-key validation, `--set` overrides, `--help`, `--print-config`, and the
// generated docs (server/config_docs.h: configs/default.yaml and the key reference in
// docs/config.md), so adding a setting is one struct member plus one table entry.
//
// Key paths mirror the struct members: `server.listen_address` is
// ServerConfig::server.listen_address; the engine's keys are members of ServerConfig::engine
// (engine/serving/engine_config.h), so `kv_cache.page_size_tokens` is
// ServerConfig::engine.kv_cache.page_size_tokens and the YAML
//
//   kv_cache:
//     page_size_tokens: 16
//
// Relative paths (model.directory) are resolved against the daemon's working directory. The
// `sieve generate --model` CLI loads its configuration with the same functions.
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
#include "engine/serving/engine_config.h"

namespace sieve::server {

// Bearer-token authentication of gRPC calls (`server.auth.*`, server/auth.h).
struct AuthConfig {
  // File of accepted bearer tokens, one per line ('#' starts a comment line; blank lines are
  // skipped). Empty: no authentication. With a file, every call must carry the metadata
  // "authorization: Bearer <token>" or fails with UNAUTHENTICATED.
  std::string tokens_file;
  // grpc.health.v1.Health answers without a token (for load balancers and kubelet probes).
  bool exempt_health = true;
  // grpc.reflection.* answers without a token.
  bool exempt_reflection = false;
  // GET /metrics answers without a token (Prometheus scrapes it). False: the metrics endpoint
  // asks for HTTP Basic authentication whose password is an accepted token (any user name).
  bool exempt_metrics = true;
  // How often tokens_file is re-read, so that added and removed tokens take effect without a
  // restart, in seconds; 0 reads it only at start. A file that cannot be used keeps the last
  // good tokens (server/auth.h).
  int reload_interval_s = 10;

  bool operator==(const AuthConfig&) const = default;
};

// TLS on the gRPC port (`server.tls.*`).
struct TlsConfig {
  // PEM certificate chain the server presents; with key_file, turns TLS on. Empty: plaintext.
  std::string cert_file;
  // PEM private key of cert_file.
  std::string key_file;
  // PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).
  std::string client_ca_file;
  // How often the three files are re-read, so that renewed certificates take effect without a
  // restart, in seconds.
  int reload_interval_s = 60;

  bool operator==(const TlsConfig&) const = default;
};

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
  // This daemon's part in disaggregated serving (docs/disaggregation.md): "both" (prefill and
  // decode here), "prefill" (serves sieve.kv.v1.KvTransfer for decode daemons) or "decode"
  // (the front door: prompts of disaggregation.local_prefill_below_tokens tokens or more are
  // prefilled on disaggregation.prefill_target).
  std::string role = "both";
  // Directories the model and its side files must lie in, comma-separated; empty: anywhere.
  // model.directory, model.tokenizer_directory, model.chat_template_file and the sparse
  // attention's pattern, threshold and calibration files, resolved as the daemon opens them
  // (against the working directory, through symbolic links), must be inside one of them, or
  // the configuration is refused naming the key.
  std::string allowed_directories;
  // Bearer-token authentication (server/auth.h).
  AuthConfig auth;
  // TLS and mutual TLS.
  TlsConfig tls;

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

// The OpenAI-compatible HTTP API (`http.*`, docs/http.md).
struct HttpConfig {
  // Address of the HTTP API listener, "host:port"; empty serves no HTTP API. Port 0 picks a
  // free port (the daemon logs the one it got).
  std::string listen_address;
  // Largest request body accepted, in bytes; larger ones get 413.
  int max_request_bytes = 16 * 1024 * 1024;
  // Connections served at once (a thread each; a streamed response holds its thread).
  int threads = 64;
  bool operator==(const HttpConfig&) const = default;
};

// Per-request limits and defaults (`limits.*`).
struct LimitsConfig {
  // max_tokens of a request that does not set it, in tokens (capped to the context left).
  int default_max_tokens = 256;
  // Most stop strings one request may carry.
  int max_stop_strings = 16;

  bool operator==(const LimitsConfig&) const = default;
};

// TLS of a decode daemon's calls to its prefill daemons (`disaggregation.tls.*`).
struct DisaggregationTlsConfig {
  // PEM CA bundle the prefill daemons' certificates must chain to; set, it turns TLS on. Empty
  // (with cert_file set): the system's roots.
  std::string ca_file;
  // PEM certificate chain this daemon presents to the prefill daemons (their
  // server.tls.client_ca_file: mutual TLS); with key_file, turns TLS on.
  std::string cert_file;
  // PEM private key of cert_file.
  std::string key_file;

  // True when any file is set: the calls use TLS.
  bool enabled() const { return !ca_file.empty() || !cert_file.empty() || !key_file.empty(); }
  bool operator==(const DisaggregationTlsConfig&) const = default;
};

// Disaggregated serving (`disaggregation.*`): how a decode daemon uses prefill daemons.
struct DisaggregationConfig {
  // gRPC target of the prefill daemons, e.g. "dns:///sieve-prefill:50051" or
  // "ipv4:127.0.0.1:50061,127.0.0.1:50062"; each remote prefill goes to the least-loaded address
  // it resolves to (server/prefill_balancer.h). Required when server.role is decode.
  std::string prefill_target;
  // Prompts shorter than this (tokens) are prefilled locally on a decode daemon.
  int local_prefill_below_tokens = 256;
  // When every attempt at a remote prefill failed: "local" prefills here, "fail" fails the
  // request with the transfer's status.
  std::string fallback = "local";
  // Attempts at a remote prefill per request (each may go to another prefill daemon).
  int max_attempts = 3;
  // Longest a remote prefill with its transfer may take, in seconds.
  double transfer_timeout_s = 120.0;
  // A transfer that receives nothing for this long after its first message is abandoned (and
  // retried), in seconds; also the keepalive timeout of the channel to the prefill daemons.
  double stall_timeout_s = 10.0;
  // Bytes of KV per streamed chunk (rounded down to whole pages, at least one page).
  int chunk_bytes = 1 << 20;
  // Threads that run remote prefills on a decode daemon (transfers in flight at once).
  int transfer_threads = 8;
  // File holding the bearer token this daemon presents to the prefill daemons (their
  // server.auth.tokens_file), on its first line that is neither blank nor a '#' comment. Empty:
  // no token is sent.
  std::string token_file;
  // TLS (and mutual TLS) of the calls to the prefill daemons; plaintext when no file is set.
  DisaggregationTlsConfig tls;
  // How a decode daemon's KV pages travel: "grpc" (in the KvTransfer stream) or "ucx" (the
  // stream carries the control messages, the page bytes go over UCX; needs a build with UCX).
  std::string transport = "grpc";

  bool operator==(const DisaggregationConfig&) const = default;
};

// Logging (`logging.*`).
struct LoggingConfig {
  // Least severe level logged: "debug", "info", "warning" or "error".
  std::string level = "info";
  // One info line per gRPC call when it ends (server/call_interceptor.h): request id, method,
  // status, tokens, durations, peer; never prompt text.
  bool access_log = true;

  bool operator==(const LoggingConfig&) const = default;
};

// Everything the daemon reads at start-up: the server-only sections and the engine's settings,
// whose keys (`model.*`, `kv_cache.*`, `scheduler.*`, `pools.*`, `attention.*`) bind straight to
// engine::EngineConfig's fields and take its defaults. A default-constructed ServerConfig serves
// the embedded model on CPU and passes Validate().
struct ServerConfig {
  GrpcServerConfig server;
  MetricsConfig metrics;
  engine::EngineConfig engine;
  LimitsConfig limits;
  LoggingConfig logging;
  DisaggregationConfig disaggregation;
  HttpConfig http;

  // Checks every setting against its key's rule (range, choices, format), then, when those pass,
  // the settings against each other: engine::EngineConfig::Validate() (e.g.
  // scheduler.prefill_chunk_tokens <= scheduler.max_batch_tokens, model.dtype against
  // model.backend) and the server's own (the metrics and gRPC ports differ). Returns
  // INVALID_ARGUMENT naming the key(s) at fault; several problems are reported one per line.
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

// Keys that no longer exist, each with what replaced it (or why it went), e.g.
// {"scheduler.preemption", "removed: preemption is always by recompute"}. Loading one is an
// error that says so.
struct RetiredConfigKey {
  std::string path;
  std::string note;
};
std::vector<RetiredConfigKey> ListRetiredConfigKeys();

// Reads the key at `key_path` in its text form (as ApplyOverride() accepts it); NOT_FOUND for
// an unknown key.
absl::StatusOr<std::string> GetConfigValue(const ServerConfig& config, std::string_view key_path);

}  // namespace sieve::server

#endif  // SIEVE_SERVER_CONFIG_H_
