#include "server/config_keys.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <span>
#include <system_error>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "engine/serving/engine_config.h"
#include "engine/model/kv_budget.h"
#include "engine/sampling/sampling.h"

namespace sieve::server::config_keys {
namespace {

Rule MakeRule(RuleKind kind, double lo = 0, double hi = 0, bool lo_exclusive = false,
              std::vector<std::string> choices = {}) {
  return Rule{kind, lo, hi, lo_exclusive, std::move(choices)};
}

Rule Any() { return MakeRule(RuleKind::kAny); }
Rule IntRange(int lo, int hi) { return MakeRule(RuleKind::kIntRange, lo, hi); }
Rule PowerOfTwo(int lo, int hi) { return MakeRule(RuleKind::kPowerOfTwo, lo, hi); }
Rule NumberRange(double lo, double hi, bool lo_exclusive = false) {
  return MakeRule(RuleKind::kNumberRange, lo, hi, lo_exclusive);
}

Rule OneOf(std::initializer_list<std::string_view> choices) {
  return MakeRule(RuleKind::kChoice, 0, 0, false, {choices.begin(), choices.end()});
}

// One of the values an engine setting accepts (engine/serving/engine_config.h lists them).
Rule OneOf(std::span<const std::string_view> choices) {
  return MakeRule(RuleKind::kChoice, 0, 0, false, {choices.begin(), choices.end()});
}
Rule NonEmpty() { return MakeRule(RuleKind::kNonEmpty); }
Rule HostPort() { return MakeRule(RuleKind::kHostPort); }
Rule GrpcAddress() { return MakeRule(RuleKind::kGrpcAddress); }
Rule DeviceList(int lo, int hi) { return MakeRule(RuleKind::kDeviceList, lo, hi); }
Rule OptionalHostPort() { return MakeRule(RuleKind::kOptionalHostPort); }

// A server key: the path is the member expression itself, so a key's name cannot drift from its
// field.
#define SIEVE_SERVER_KEY(member, rule, doc) \
  KeySpec { #member, rule, doc, [](ServerConfig& c) -> FieldRef { return &c.member; } }

// An engine key: `model.name` is ServerConfig::engine.model.name (engine/serving/engine_config.h).
#define SIEVE_ENGINE_KEY(member, rule, doc) \
  KeySpec { #member, rule, doc, [](ServerConfig& c) -> FieldRef { return &c.engine.member; } }

constexpr int kMaxInt = std::numeric_limits<int>::max();

}  // namespace

// The key table: the one place a setting is described (its default is its struct member's).
const std::vector<KeySpec>& Keys() {
  static const std::vector<KeySpec>* const keys = new std::vector<KeySpec>{
      SIEVE_SERVER_KEY(server.listen_address, GrpcAddress(),
                       "Address the gRPC service listens on: host:port, [ipv6]:port or "
                       "unix:/path. Port 0 picks a free port (the daemon logs the one it got)."),
      SIEVE_SERVER_KEY(server.max_message_bytes, IntRange(4096, kMaxInt),
                       "Largest gRPC message received or sent, in bytes."),
      SIEVE_SERVER_KEY(server.keepalive_time_s, NumberRange(1, 86400),
                       "Seconds between keepalive pings the server sends on an idle connection."),
      SIEVE_SERVER_KEY(server.keepalive_timeout_s, NumberRange(1, 3600),
                       "Seconds to wait for a keepalive ping's acknowledgement before closing."),
      SIEVE_SERVER_KEY(server.drain_grace_period_s, NumberRange(0, 3600),
                       "On SIGTERM: health turns NOT_SERVING, new calls get UNAVAILABLE, and "
                       "in-flight requests may run this many seconds before they are cancelled "
                       "(0 cancels them at once)."),
      SIEVE_SERVER_KEY(server.role, OneOf({"both", "prefill", "decode"}),
                       "Part in disaggregated serving (docs/disaggregation.md): both (prefill and "
                       "decode here), prefill (runs prompts for decode daemons and streams their "
                       "KV back over sieve.kv.v1.KvTransfer) or decode (the front door: long "
                       "prompts are prefilled on disaggregation.prefill_target)."),
      SIEVE_SERVER_KEY(server.allowed_directories, Any(),
                       "Directories the model and its side files must lie in, comma-separated; "
                       "empty: anywhere. model.directory, model.tokenizer_directory, "
                       "model.chat_template_file and the prefill pattern/threshold and decode "
                       "calibration files, resolved as the daemon opens them (against the "
                       "working directory, through symbolic links), must be inside one, or the "
                       "daemon refuses to start, naming the key."),
      SIEVE_SERVER_KEY(server.auth.tokens_file, Any(),
                       "File of accepted bearer tokens, one per line (lines starting with # are "
                       "comments). Empty: no authentication. Set: every gRPC call must carry "
                       "`authorization: Bearer <token>` or fails with UNAUTHENTICATED (tokens are "
                       "compared in constant time and never logged)."),
      SIEVE_SERVER_KEY(server.auth.exempt_health, Any(),
                       "With server.auth.tokens_file: grpc.health.v1.Health answers without a "
                       "token (for load-balancer and kubelet probes)."),
      SIEVE_SERVER_KEY(server.auth.exempt_reflection, Any(),
                       "With server.auth.tokens_file: server reflection answers without a token."),
      SIEVE_SERVER_KEY(server.auth.exempt_metrics, Any(),
                       "With server.auth.tokens_file: GET /metrics answers without a token (for "
                       "Prometheus). false: the metrics endpoint requires HTTP Basic "
                       "authentication whose password is an accepted token, any user name "
                       "(Prometheus: basic_auth with password_file); others get 401."),
      SIEVE_SERVER_KEY(server.auth.reload_interval_s, IntRange(0, 86400),
                       "Seconds between re-reads of server.auth.tokens_file: tokens added or "
                       "removed take effect without a restart; a file that cannot be read (or "
                       "holds no token) keeps the last good tokens and logs an error. 0 reads the "
                       "file only at start."),
      SIEVE_SERVER_KEY(server.tls.cert_file, Any(),
                       "PEM certificate chain of the gRPC port; with server.tls.key_file it turns "
                       "TLS on. Empty: plaintext."),
      SIEVE_SERVER_KEY(server.tls.key_file, Any(), "PEM private key of server.tls.cert_file."),
      SIEVE_SERVER_KEY(server.tls.client_ca_file, Any(),
                       "PEM CA bundle: when set, clients must present a certificate it signed "
                       "(mutual TLS)."),
      SIEVE_SERVER_KEY(server.tls.reload_interval_s, IntRange(1, 86400),
                       "Seconds between re-reads of the TLS files: renewed certificates take "
                       "effect without a restart."),

      SIEVE_SERVER_KEY(metrics.enabled, Any(),
                       "Serve Prometheus metrics (names prefixed sieve_) over HTTP at /metrics."),
      SIEVE_SERVER_KEY(metrics.listen_address, HostPort(),
                       "Address of the metrics HTTP listener: host:port. Must not share the gRPC "
                       "port. Port 0 picks a free port."),

      SIEVE_ENGINE_KEY(model.name, NonEmpty(),
                       "Name clients pass in requests' `model` field (empty there selects this "
                       "model); also the `model` metric label."),
      SIEVE_ENGINE_KEY(model.directory, NonEmpty(),
                       "Hugging Face checkpoint folder (config.json, *.safetensors, "
                       "tokenizer.json); relative to the working directory."),
      SIEVE_ENGINE_KEY(model.backend, OneOf(engine::kBackendNames),
                       "Compute backend: cpu (fp32 reference, always built) or cuda (bf16)."),
      SIEVE_ENGINE_KEY(model.devices, DeviceList(0, 63),
                       "CUDA device to serve on, as a list of one ordinal, e.g. [1] (cuda only; "
                       "empty means device 0; one device per daemon). Must be empty with the cpu "
                       "backend."),
      SIEVE_ENGINE_KEY(model.dtype, OneOf(engine::kDtypeNames),
                       "Compute dtype: auto, or the dtype the backend computes in (float32 on "
                       "cpu, bfloat16 on cuda); any other is rejected."),
      SIEVE_ENGINE_KEY(model.max_context_tokens, IntRange(0, 1 << 24),
                       "Context limit per request (prompt + generated tokens); 0 uses the model's "
                       "own."),
      SIEVE_ENGINE_KEY(model.weights, OneOf(engine::kWeightSources),
                       "Where the weights come from: checkpoint (the directory's *.safetensors) "
                       "or random (seeded random weights of the shapes in config.json, for "
                       "benchmarking real shapes such as configs/models/llama-3.1-8b without a "
                       "checkpoint)."),
      SIEVE_ENGINE_KEY(model.random_seed, IntRange(0, 1 << 30), "Seed of model.weights random."),
      SIEVE_ENGINE_KEY(model.cpu_threads, IntRange(0, 4096),
                       "Host threads the cpu backend's operators (linear layers, attention, "
                       "sparse selection) split each step over; 0 uses every hardware thread. "
                       "Not used by the cuda backend."),
      SIEVE_ENGINE_KEY(model.tokenizer_directory, Any(),
                       "Folder of tokenizer.json; empty uses model.directory (a shape-only "
                       "directory borrows one)."),
      SIEVE_ENGINE_KEY(model.chat_template_file, Any(),
                       "Jinja chat template file that renders chat messages (GenerateRequest / "
                       "TokenizeRequest messages) in place of tokenizer_config.json's "
                       "chat_template; empty uses the model's own. See docs/chat.md."),

      SIEVE_ENGINE_KEY(kv_cache.page_size_tokens, PowerOfTwo(1, 256), "Tokens per KV page."),
      SIEVE_ENGINE_KEY(kv_cache.num_pages, IntRange(0, static_cast<int>(engine::kMaxKvPages)),
                       "KV pages to allocate, shared by all requests (8192 x 16 tokens = 131072 "
                       "tokens, the embedded model's whole context: 512 MiB for it on cpu, "
                       "resident only as pages fill). A pool larger than the backend's available "
                       "memory is refused at start-up. 0 derives the count from "
                       "kv_cache.memory_fraction, capped at what scheduler.max_running_requests "
                       "full-context requests can use."),
      SIEVE_ENGINE_KEY(kv_cache.memory_fraction, NumberRange(0, 1, /*lo_exclusive=*/true),
                       "With num_pages 0: fraction of the memory free after loading the weights "
                       "(GPU memory on cuda, available host memory on cpu) that the KV cache may "
                       "use."),
      SIEVE_ENGINE_KEY(kv_cache.dtype, OneOf(engine::kDtypeNames),
                       "Element type of the stored keys and values: auto (the backend's compute "
                       "dtype: float32 on cpu, bfloat16 on cuda), float32, or bfloat16. On cpu, "
                       "bfloat16 halves the KV memory and the bytes decode attention reads (keys "
                       "and values rounded when written, computed in fp32), with every prefill "
                       "and decode method. cuda takes auto or bfloat16 only. Daemons that "
                       "exchange KV pages (disaggregation) need the same setting."),

      SIEVE_ENGINE_KEY(scheduler.max_batch_tokens, IntRange(1, 1 << 20),
                       "Token budget of one scheduler step: one token per decoding request plus "
                       "prefill chunks. Bounds step latency, so a long prompt never stalls "
                       "decoding requests."),
      SIEVE_ENGINE_KEY(scheduler.max_running_requests, IntRange(1, 1 << 16),
                       "Requests admitted to run (prefilling or decoding) at once (at most "
                       "max_batch_tokens)."),
      SIEVE_ENGINE_KEY(scheduler.max_queued_requests, IntRange(1, 1 << 20),
                       "Requests waiting for admission; beyond it new requests get "
                       "RESOURCE_EXHAUSTED at once."),
      SIEVE_ENGINE_KEY(scheduler.max_queued_tokens, IntRange(1, 1 << 30),
                       "Prompt tokens waiting for admission, summed over the queue; beyond it "
                       "new requests get RESOURCE_EXHAUSTED at once."),
      SIEVE_ENGINE_KEY(scheduler.prefill_chunk_tokens, IntRange(1, 1 << 20),
                       "Largest prefill chunk of one request in one step (at most "
                       "max_batch_tokens)."),
      SIEVE_ENGINE_KEY(scheduler.enable_prefix_caching, Any(),
                       "Share the KV pages of identical full-page prompt prefixes across "
                       "requests (reference-counted, evicted least recently used)."),

      SIEVE_ENGINE_KEY(pools.prefill_workers, IntRange(1, 256),
                       "Worker threads running prefill batches."),
      SIEVE_ENGINE_KEY(pools.decode_workers, IntRange(1, 256),
                       "Worker threads running decode batches."),
      SIEVE_ENGINE_KEY(pools.decode_priority, OneOf(engine::kStreamPriorityNames),
                       "Device stream priority of the decode workers: high (decode kernels start "
                       "ahead of a concurrent prefill chunk's waiting blocks, bounding "
                       "inter-token latency while long prompts prefill) or normal (both pools "
                       "alike). Only the cuda backend has stream priorities."),

      SIEVE_ENGINE_KEY(pools.step_timeout_s, NumberRange(0, 86400),
                       "Watchdog: a worker step, scheduler iteration or output batch not "
                       "finished after this many seconds means a hung device, worker, engine or "
                       "sink; health turns NOT_SERVING and the daemon drains "
                       "and exits for its supervisor to restart it. 0 turns it off."),
      SIEVE_ENGINE_KEY(pools.output_workers, IntRange(0, 64),
                       "Threads that turn sampled tokens into streamed output (detokenizing, "
                       "stop strings, building response messages) off the scheduler thread; 0 "
                       "does that work on the scheduler thread (for comparisons)."),

      SIEVE_ENGINE_KEY(attention.prefill.method, OneOf(engine::kPrefillAttentionMethods),
                       "Prefill attention method: dense (every causal key), minference "
                       "(per-head vertical-slash / A-shape / block-sparse indices from the last "
                       "queries) or xattention (antidiagonal block scoring, then block-sparse "
                       "attention); both run on cpu and cuda (on cuda xattention needs "
                       "block_size 128, and minference's block_sparse heads are cpu only). A "
                       "request may ask for dense (GenerateRequest.prefill_attention)."),
      SIEVE_ENGINE_KEY(attention.prefill.sparse_min_tokens, IntRange(0, 1 << 30),
                       "A prefill chunk runs sparse only when its sequence's KV length (cached "
                       "plus new tokens) is above this many tokens; shorter ones attend densely."),
      SIEVE_ENGINE_KEY(attention.prefill.dense_layers, IntRange(0, 1 << 20),
                       "The first this many layers always attend densely in prefill."),
      SIEVE_ENGINE_KEY(attention.prefill.max_density, NumberRange(0, 1),
                       "A layer's sparse prefill plan that reads more than this fraction of its "
                       "sequences' causal (query, key) pairs runs dense instead: past it the "
                       "block-sparse kernel costs more than the dense one. 0: the backend's "
                       "break-even (cpu 0.9; cuda 0.8 for XAttention, whose blocks run on the "
                       "wgmma kernel at 0.83 of dense per tile, 0.4 for MInference, whose plans "
                       "run on the mma.sync kernel at 0.84 of dense mma.sync, half the dense "
                       "wgmma kernel's rate on the H100); 1: never."),
      SIEVE_ENGINE_KEY(attention.prefill.xattention.stride, IntRange(4, 16),
                       "XAttention antidiagonal stride S (4, 8 or 16): queries and keys are scored in groups "
                       "of S tokens (cost 1/(2S) of dense attention)."),
      SIEVE_ENGINE_KEY(attention.prefill.xattention.threshold, NumberRange(-1, 2),
                       "XAttention cumulative-mass threshold tau: each (head, query block) keeps "
                       "the fewest key blocks whose estimated mass, with the forced first and "
                       "diagonal blocks, reaches tau of the row's; above 1 keeps every block."),
      SIEVE_ENGINE_KEY(attention.prefill.xattention.block_size, IntRange(16, 1024),
                       "XAttention query and key block size in tokens (a multiple of the "
                       "stride; 128 as in the paper; 128 on the cuda backend)."),
      SIEVE_ENGINE_KEY(attention.prefill.xattention.threshold_file, Any(),
                       "Optional JSON file of per-(layer, head) thresholds replacing threshold "
                       "(format in engine/attention/README.md); empty: none."),
      SIEVE_ENGINE_KEY(attention.prefill.minference.pattern_file, Any(),
                       "Optional MInference per-(layer, head) pattern file, as `sieve calibrate "
                       "--method minference` writes it (format in engine/attention/"
                       "minference_patterns.h); empty: every head vertical-slash with "
                       "vertical_size and slash_size."),
      SIEVE_ENGINE_KEY(attention.prefill.minference.vertical_size, IntRange(1, 1 << 30),
                       "MInference vertical-slash key columns kept per head (at least 30; the "
                       "first 30 always)."),
      SIEVE_ENGINE_KEY(attention.prefill.minference.slash_size, IntRange(1, 1 << 30),
                       "MInference vertical-slash diagonals kept per head (at least 50; the 100 "
                       "most local always), as 64-key tiles."),
      SIEVE_ENGINE_KEY(attention.prefill.minference.last_q, IntRange(1, 4096),
                       "MInference: the last this many queries of each prefill chunk estimate "
                       "the vertical-slash indices against all of the sequence's keys."),
      SIEVE_ENGINE_KEY(attention.decode.method, OneOf(engine::kDecodeAttentionMethods),
                       "Decode attention method: dense (every key), quest (per query head, "
                       "the pages whose key bounds promise the largest scores, within "
                       "attention.decode.token_budget) or double_sparsity (per query head, the "
                       "tokens whose outlier key channels score highest; needs a calibration, "
                       "see attention.decode.double_sparsity.calibration_file). Both run on cpu "
                       "and cuda."),
      SIEVE_ENGINE_KEY(attention.decode.sparse_min_tokens, IntRange(0, 1 << 30),
                       "A sparse decode method reads every key of a sequence whose context is "
                       "this long or shorter."),
      SIEVE_ENGINE_KEY(attention.decode.token_budget, IntRange(1, 1 << 30),
                       "Keys each query head of a sequence reads under a sparse decode method "
                       "(quest: whole pages including the last one; at least two pages)."),
      SIEVE_ENGINE_KEY(attention.decode.dense_layers, IntRange(0, 1 << 16),
                       "The first this many layers always decode with dense attention."),
      SIEVE_ENGINE_KEY(attention.decode.quest.per_kv_head, Any(),
                       "quest: one page set per KV head (largest bound over its query heads) "
                       "instead of one per query head; reads each page once per group."),
      SIEVE_ENGINE_KEY(attention.decode.double_sparsity.calibration_file, Any(),
                       "double_sparsity: the channel calibration of this model (written by "
                       "`sieve calibrate --method double-sparsity`); empty: calibrate at start-up "
                       "on the model directory's calibration.txt, or refuse to start without one."),
      SIEVE_ENGINE_KEY(attention.decode.double_sparsity.channels, IntRange(1, 1 << 16),
                       "double_sparsity: outlier channels kept per head in the label cache "
                       "(at most the model's head_dim)."),
      SIEVE_ENGINE_KEY(attention.decode.double_sparsity.label_bits, IntRange(4, 16),
                       "double_sparsity: label precision, 16 (fp16) or 4 (4-bit codes)."),
      SIEVE_ENGINE_KEY(attention.decode.double_sparsity.per_kv_head, Any(),
                       "double_sparsity: one channel list, label row and token set per KV head "
                       "(summed scores of its query heads) instead of per query head; reads "
                       "each selected token once per group."),
      SIEVE_ENGINE_KEY(attention.decode.double_sparsity.statistic, OneOf({"qk", "q", "k"}),
                       "double_sparsity: the channel statistic of a start-up calibration."),
      SIEVE_ENGINE_KEY(attention.kernel, OneOf(engine::kAttentionKernels),
                       "Attention kernels: auto (the fastest that applies to each step) or simple "
                       "(cuda: the simple kernel everywhere, a cross-check of the fast ones). The "
                       "cpu backend has one kernel: auto only."),

      SIEVE_SERVER_KEY(limits.default_max_tokens, IntRange(1, 1 << 24),
                       "max_tokens of a request that does not set it (capped to the context "
                       "left after the prompt)."),
      SIEVE_SERVER_KEY(limits.max_stop_strings, IntRange(0, engine::kMaxStopStrings),
                       "Most stop strings one request may carry."),

      SIEVE_SERVER_KEY(disaggregation.prefill_target, Any(),
                       "gRPC target of the prefill daemons: e.g. dns:///sieve-prefill:50051 "
                       "(resolved again every 5 s) or ipv4:127.0.0.1:50061,127.0.0.1:50062. Each "
                       "remote prefill goes to the least-loaded address (tokens in flight from "
                       "here plus the queue it last reported; ties round-robin); other schemes "
                       "(unix:, xds:, ...) are plain round-robin. Required when server.role is "
                       "decode."),
      SIEVE_SERVER_KEY(disaggregation.local_prefill_below_tokens, IntRange(0, 1 << 24),
                       "On a decode daemon, prompts shorter than this many tokens are prefilled "
                       "locally (a transfer costs more than it saves)."),
      SIEVE_SERVER_KEY(disaggregation.fallback, OneOf({"local", "fail"}),
                       "When every attempt at a remote prefill failed: local (prefill here) or "
                       "fail (the request fails with the transfer's status)."),
      SIEVE_SERVER_KEY(disaggregation.max_attempts, IntRange(1, 16),
                       "Attempts at a remote prefill per request; each retry may reach another "
                       "prefill daemon."),
      SIEVE_SERVER_KEY(disaggregation.transfer_timeout_s, NumberRange(0.1, 86400),
                       "Seconds a remote prefill and its KV transfer may take in all."),
      SIEVE_SERVER_KEY(disaggregation.stall_timeout_s, NumberRange(0.1, 3600),
                       "Seconds without a message, once the first one (sent when the prefill has "
                       "run) arrived, after which a transfer is abandoned and retried; also how "
                       "long a keepalive ping to a prefill daemon may go unanswered."),
      SIEVE_SERVER_KEY(disaggregation.chunk_bytes, IntRange(4096, 1 << 30),
                       "KV bytes per streamed chunk (whole pages, at least one); at most "
                       "server.max_message_bytes."),
      SIEVE_SERVER_KEY(disaggregation.transfer_threads, IntRange(1, 256),
                       "Threads of a decode daemon that run remote prefills (transfers at once)."),
      SIEVE_SERVER_KEY(disaggregation.token_file, Any(),
                       "File holding the bearer token a decode daemon sends to the prefill "
                       "daemons (`authorization: Bearer <token>`; their server.auth.tokens_file "
                       "must accept it): its first line that is neither blank nor a # comment. "
                       "Empty: no token."),
      SIEVE_SERVER_KEY(disaggregation.tls.ca_file, Any(),
                       "PEM CA bundle the prefill daemons' certificates must chain to (their host "
                       "names are checked); set, the calls to them use TLS. Empty with "
                       "disaggregation.tls.cert_file set: the system's roots."),
      SIEVE_SERVER_KEY(disaggregation.tls.cert_file, Any(),
                       "PEM certificate chain a decode daemon presents to the prefill daemons "
                       "(mutual TLS: their server.tls.client_ca_file); with "
                       "disaggregation.tls.key_file. Re-read every server.tls.reload_interval_s "
                       "seconds, like the CA file."),
      SIEVE_SERVER_KEY(disaggregation.tls.key_file, Any(),
                       "PEM private key of disaggregation.tls.cert_file."),
      SIEVE_SERVER_KEY(disaggregation.transport, OneOf({"grpc", "ucx"}),
                       "How a decode daemon's KV pages travel from the prefill daemons: grpc (in "
                       "the KvTransfer stream) or ucx (the stream keeps the control messages and "
                       "checksums; the page bytes go over UCX, whose transports UCX_TLS picks). "
                       "ucx needs a sieved built with libucx-dev (SIEVE_UCX); prefill daemons "
                       "serve either."),

      SIEVE_SERVER_KEY(logging.level, OneOf({"debug", "info", "warning", "error"}),
                       "Least severe log level written."),
      SIEVE_SERVER_KEY(logging.access_log, Any(),
                       "Log one info line per gRPC call when it ends: request id, method, status, "
                       "tokens, time to first message and total, peer (never prompt text; control "
                       "characters escaped)."),

      SIEVE_SERVER_KEY(http.listen_address, OptionalHostPort(),
                       "Address of the OpenAI-compatible HTTP API (docs/http.md): host:port; "
                       "empty serves none. Must not share the gRPC or metrics port. Port 0 picks "
                       "a free port (the daemon logs the one it got)."),
      SIEVE_SERVER_KEY(http.max_request_bytes, IntRange(1024, kMaxInt),
                       "Largest HTTP request body accepted, in bytes; larger ones get 413."),
      SIEVE_SERVER_KEY(http.threads, IntRange(1, 4096),
                       "HTTP connections served at once (a thread each; a streamed response "
                       "holds its thread until it ends); further connections wait."),
  };
  return *keys;
}

#undef SIEVE_SERVER_KEY
#undef SIEVE_ENGINE_KEY

// Keys that were accepted once, and what became of them.
const std::vector<RetiredConfigKey>& RetiredKeys() {
  static const std::vector<RetiredConfigKey>* const retired = new std::vector<RetiredConfigKey>{
      {"scheduler.preemption",
       "it was removed: preemption is always by recompute, the only policy there is"},
      {"attention.prefill", "it is a section now: set attention.prefill.method"},
      {"attention.decode", "it is a section now: set attention.decode.method"},
  };
  return *retired;
}

const std::string* FindRetired(absl::string_view path) {
  for (const RetiredConfigKey& key : RetiredKeys()) {
    if (key.path == path) return &key.note;
  }
  return nullptr;
}

const KeySpec* FindKey(absl::string_view path) {
  for (const KeySpec& key : Keys()) {
    if (key.path == path) return &key;
  }
  return nullptr;
}

const absl::flat_hash_set<std::string>& Sections() {
  static const auto* const sections = [] {
    auto* out = new absl::flat_hash_set<std::string>();
    for (const KeySpec& key : Keys()) {
      for (size_t dot = key.path.find('.'); dot != absl::string_view::npos;
           dot = key.path.find('.', dot + 1)) {
        out->insert(std::string(key.path.substr(0, dot)));
      }
    }
    return out;
  }();
  return *sections;
}

ValueType TypeOf(const KeySpec& key) {
  static ServerConfig* const scratch = new ServerConfig();
  return static_cast<ValueType>(key.field(*scratch).index());
}

// --- Text forms --------------------------------------------------------------------------------

namespace {

// The shortest text that parses back to exactly `v`.
std::string FormatNumber(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  if (ec != std::errc()) return absl::StrCat(v);
  return std::string(buf, end);
}

std::string FormatIntList(const std::vector<int>& v) {
  return absl::StrCat("[", absl::StrJoin(v, ", "), "]");
}

}  // namespace

std::string FormatValue(const Value& v) {
  switch (v.index()) {
    case kInt: return absl::StrCat(std::get<int>(v));
    case kNumber: return FormatNumber(std::get<double>(v));
    case kBool: return std::get<bool>(v) ? "true" : "false";
    case kString: return std::get<std::string>(v);
    default: return FormatIntList(std::get<std::vector<int>>(v));
  }
}

namespace {

// `v` as it appears after "got" in error messages: strings quoted, the rest plain.
std::string ShowValue(const Value& v) {
  if (v.index() == kString) return absl::StrCat("'", std::get<std::string>(v), "'");
  return FormatValue(v);
}

}  // namespace

std::optional<int> ParseInt(absl::string_view text) {
  int v = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &v)) return std::nullopt;
  return v;
}

namespace {

std::optional<Value> ParseScalar(ValueType type, absl::string_view text) {
  switch (type) {
    case kInt: {
      std::optional<int> v = ParseInt(text);
      if (!v) return std::nullopt;
      return Value(*v);
    }
    case kNumber: {
      double v = 0;
      if (!absl::SimpleAtod(absl::StripAsciiWhitespace(text), &v) || !std::isfinite(v)) {
        return std::nullopt;
      }
      return Value(v);
    }
    case kBool: {
      std::string lower = absl::AsciiStrToLower(absl::StripAsciiWhitespace(text));
      if (lower == "true" || lower == "yes" || lower == "on" || lower == "1") return Value(true);
      if (lower == "false" || lower == "no" || lower == "off" || lower == "0") return Value(false);
      return std::nullopt;
    }
    case kString: return Value(std::string(text));
    default: break;
  }
  // A list written on one line: "0,1", "[0, 1]", "" or "[]".
  absl::string_view body = absl::StripAsciiWhitespace(text);
  if (absl::ConsumePrefix(&body, "[") != absl::ConsumeSuffix(&body, "]")) return std::nullopt;
  std::vector<int> list;
  if (absl::StripAsciiWhitespace(body).empty()) return Value(list);
  for (absl::string_view item : absl::StrSplit(body, ',')) {
    std::optional<int> v = ParseInt(item);
    if (!v) return std::nullopt;
    list.push_back(*v);
  }
  return Value(std::move(list));
}

}  // namespace

// The port of "host:port" / "[v6]:port", or nullopt when `address` is not of that form.
std::optional<int> PortOf(absl::string_view address) {
  size_t colon = address.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) return std::nullopt;
  absl::string_view host = address.substr(0, colon);
  absl::string_view port = address.substr(colon + 1);
  if (host.front() == '[') {
    if (host.size() < 3 || host.back() != ']') return std::nullopt;
  } else if (host.find(':') != absl::string_view::npos) {
    return std::nullopt;
  }
  for (char c : host) {
    if (absl::ascii_isspace(static_cast<unsigned char>(c))) return std::nullopt;
  }
  if (port.empty() || port.size() > 5) return std::nullopt;
  for (char c : port) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return std::nullopt;
  }
  int p = 0;
  if (!absl::SimpleAtoi(port, &p) || p > 65535) return std::nullopt;
  return p;
}

// --- Rules -------------------------------------------------------------------------------------

// What `key` accepts, phrased to follow "must be".
std::string Expectation(const KeySpec& key) {
  const Rule& r = key.rule;
  switch (r.kind) {
    case RuleKind::kIntRange:
      return absl::StrCat("an integer between ", FormatNumber(r.lo), " and ", FormatNumber(r.hi));
    case RuleKind::kPowerOfTwo:
      return absl::StrCat("a power of two between ", FormatNumber(r.lo), " and ",
                          FormatNumber(r.hi));
    case RuleKind::kNumberRange:
      if (r.lo_exclusive) {
        return absl::StrCat("a number greater than ", FormatNumber(r.lo), " and at most ",
                            FormatNumber(r.hi));
      }
      return absl::StrCat("a number between ", FormatNumber(r.lo), " and ", FormatNumber(r.hi));
    case RuleKind::kChoice:
      return absl::StrCat("one of: ", absl::StrJoin(r.choices, ", "));
    case RuleKind::kNonEmpty: return "a non-empty string";
    case RuleKind::kHostPort: return "an address host:port with port 0-65535";
    case RuleKind::kOptionalHostPort:
      return "empty, or an address host:port with port 0-65535";
    case RuleKind::kGrpcAddress:
      return "an address host:port with port 0-65535, or unix:/path";
    case RuleKind::kDeviceList:
      return absl::StrCat("a list of distinct integers between ", FormatNumber(r.lo), " and ",
                          FormatNumber(r.hi));
    case RuleKind::kAny: break;
  }
  switch (TypeOf(key)) {
    case kInt: return "an integer";
    case kNumber: return "a finite number";
    case kBool: return "true or false";
    case kString: return "a string";
    default: return "a list of integers";
  }
}

namespace {

bool Satisfies(const Rule& r, const Value& v) {
  switch (r.kind) {
    case RuleKind::kAny: return true;
    case RuleKind::kIntRange: {
      int x = std::get<int>(v);
      return x >= r.lo && x <= r.hi;
    }
    case RuleKind::kPowerOfTwo: {
      int x = std::get<int>(v);
      return x > 0 && (x & (x - 1)) == 0 && x >= r.lo && x <= r.hi;
    }
    case RuleKind::kNumberRange: {
      double x = std::get<double>(v);
      return std::isfinite(x) && (r.lo_exclusive ? x > r.lo : x >= r.lo) && x <= r.hi;
    }
    case RuleKind::kChoice: {
      const std::string& s = std::get<std::string>(v);
      return std::find(r.choices.begin(), r.choices.end(), s) != r.choices.end();
    }
    case RuleKind::kNonEmpty: return !std::get<std::string>(v).empty();
    case RuleKind::kHostPort: return PortOf(std::get<std::string>(v)).has_value();
    case RuleKind::kOptionalHostPort: {
      const std::string& s = std::get<std::string>(v);
      return s.empty() || PortOf(s).has_value();
    }
    case RuleKind::kGrpcAddress: {
      const std::string& s = std::get<std::string>(v);
      if (absl::StartsWith(s, "unix:")) return s.size() > 5;
      return PortOf(s).has_value();
    }
    case RuleKind::kDeviceList: {
      const auto& list = std::get<std::vector<int>>(v);
      absl::flat_hash_set<int> seen;
      for (int d : list) {
        if (d < r.lo || d > r.hi || !seen.insert(d).second) return false;
      }
      return true;
    }
  }
  return false;
}

}  // namespace

std::string MustBe(const KeySpec& key, absl::string_view shown) {
  return absl::StrCat(key.path, " must be ", Expectation(key), ", got ", shown);
}

// Checks `v` against `key`'s rule; returns the error message, or "" when it passes.
std::string CheckValue(const KeySpec& key, const Value& v) {
  return Satisfies(key.rule, v) ? std::string() : MustBe(key, ShowValue(v));
}

Value Read(const KeySpec& key, const ServerConfig& config) {
  // The accessor only forms a pointer; nothing is written through it here.
  FieldRef ref = key.field(const_cast<ServerConfig&>(config));
  return std::visit([](auto* field) -> Value { return *field; }, ref);
}

void Write(const KeySpec& key, ServerConfig& config, Value v) {
  std::visit(
      [&v](auto* field) {
        using T = std::remove_pointer_t<decltype(field)>;
        *field = std::get<T>(std::move(v));
      },
      key.field(config));
}

// Parses `text` for `key`, checks it and stores it; returns the error message or "".
std::string SetFromText(const KeySpec& key, ServerConfig& config, absl::string_view text) {
  std::optional<Value> v = ParseScalar(TypeOf(key), text);
  if (!v) return MustBe(key, absl::StrCat("'", text, "'"));
  std::string error = CheckValue(key, *v);
  if (error.empty()) Write(key, config, std::move(*v));
  return error;
}

// --- Unknown keys ------------------------------------------------------------------------------

namespace {

size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1] ? 1 : 0)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string UnknownKey(absl::string_view path) {
  if (const std::string* note = FindRetired(path)) {
    return absl::StrCat("unknown key '", path, "': ", *note);
  }
  absl::string_view best;
  size_t best_distance = std::max<size_t>(2, path.size() / 5) + 1;
  auto consider = [&](absl::string_view candidate) {
    size_t d = EditDistance(path, candidate);
    if (d < best_distance) {
      best_distance = d;
      best = candidate;
    }
  };
  for (const KeySpec& key : Keys()) consider(key.path);
  for (const std::string& section : Sections()) consider(section);
  std::string message = absl::StrCat("unknown key '", path, "'");
  if (!best.empty()) absl::StrAppend(&message, " (did you mean '", best, "'?)");
  return message;
}

}  // namespace sieve::server::config_keys
