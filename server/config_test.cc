#include "server/config.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/runner/model_runner.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/config_docs.h"

namespace sieve::server {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

// The repository root: SIEVE_SOURCE_DIR when set, else the working directory.
std::string RepoPath(const std::string& relative) {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return root != nullptr ? absl::StrCat(root, "/", relative) : relative;
}

// Loads `yaml` and returns the error message (empty when loading succeeded).
std::string LoadError(const std::string& yaml, std::vector<std::string> overrides = {}) {
  absl::StatusOr<ServerConfig> config = LoadConfigString(yaml, "x.yaml", overrides);
  if (config.ok()) return "";
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(config.status().message());
}

// Every key the daemon documents; a key dropped from or added to the table must show here.
const std::vector<std::string> kExpectedKeys = {
    "server.listen_address",          "server.max_message_bytes",
    "server.keepalive_time_s",        "server.keepalive_timeout_s",
    "server.drain_grace_period_s",    "server.role",
    "server.allowed_directories",
    "server.auth.tokens_file",        "server.auth.exempt_health",
    "server.auth.exempt_reflection",  "server.auth.exempt_metrics",
    "server.auth.reload_interval_s",
    "server.tls.cert_file",
    "server.tls.key_file",            "server.tls.client_ca_file",
    "server.tls.reload_interval_s",
    "metrics.enabled",
    "metrics.listen_address",         "model.name",
    "model.directory",                "model.backend",
    "model.devices",                  "model.dtype",
    "model.max_context_tokens",       "model.weights",
    "model.random_seed",              "model.cpu_threads",
    "model.tokenizer_directory",
    "model.chat_template_file",
    "kv_cache.page_size_tokens",      "kv_cache.num_pages",
    "kv_cache.memory_fraction",       "kv_cache.dtype",
    "scheduler.max_batch_tokens",
    "scheduler.max_running_requests", "scheduler.max_queued_requests",
    "scheduler.max_queued_tokens",    "scheduler.prefill_chunk_tokens",
    "scheduler.enable_prefix_caching", "pools.prefill_workers",
    "pools.decode_workers",           "pools.decode_priority",
    "pools.step_timeout_s", "pools.output_workers",
    "attention.prefill.method",       "attention.prefill.sparse_min_tokens",
    "attention.prefill.dense_layers", "attention.prefill.max_density",
    "attention.prefill.xattention.stride",
    "attention.prefill.xattention.threshold", "attention.prefill.xattention.block_size",
    "attention.prefill.xattention.threshold_file", "attention.prefill.minference.pattern_file",
    "attention.prefill.minference.vertical_size", "attention.prefill.minference.slash_size",
    "attention.prefill.minference.last_q", "attention.decode.method",
    "attention.decode.sparse_min_tokens", "attention.decode.token_budget",
    "attention.decode.dense_layers",  "attention.decode.quest.per_kv_head",
    "attention.decode.double_sparsity.calibration_file",
    "attention.decode.double_sparsity.channels", "attention.decode.double_sparsity.label_bits",
    "attention.decode.double_sparsity.per_kv_head", "attention.decode.double_sparsity.statistic",
    "attention.kernel",               "limits.default_max_tokens",      "limits.max_stop_strings",
    "disaggregation.prefill_target",  "disaggregation.local_prefill_below_tokens",
    "disaggregation.fallback",        "disaggregation.max_attempts",
    "disaggregation.transfer_timeout_s", "disaggregation.stall_timeout_s",
    "disaggregation.chunk_bytes",     "disaggregation.transfer_threads",
    "disaggregation.token_file",      "disaggregation.tls.ca_file",
    "disaggregation.tls.cert_file",   "disaggregation.tls.key_file",
    "disaggregation.transport",
    "logging.level",                  "logging.access_log",
    "http.listen_address",            "http.max_request_bytes",         "http.threads",
};

TEST(ConfigTest, DefaultsAreValid) {
  ServerConfig config;
  EXPECT_TRUE(config.Validate().ok()) << config.Validate();
  EXPECT_EQ(config.server.listen_address, "0.0.0.0:50051");
  EXPECT_EQ(config.metrics.listen_address, "0.0.0.0:9090");
  EXPECT_EQ(config.engine.model.name, "sieve-embedded");
  EXPECT_EQ(config.engine.model.directory, "models/embedded");
  EXPECT_EQ(config.engine.model.backend, "cpu");
  EXPECT_EQ(config.engine.kv_cache.page_size_tokens, 16);
  EXPECT_EQ(config.engine.attention.prefill.method, "dense");
  EXPECT_EQ(config.logging.level, "info");
}

// The engine's keys are the engine's fields, with the engine's defaults.
TEST(ConfigTest, TlsKeysMustComeTogether) {
  const std::string yaml =
      "server:\n  auth:\n    tokens_file: /etc/sieve/tokens\n    exempt_health: false\n"
      "  tls:\n    cert_file: /etc/sieve/cert.pem\n    key_file: /etc/sieve/key.pem\n"
      "    client_ca_file: /etc/sieve/ca.pem\n    reload_interval_s: 5\n";
  absl::StatusOr<ServerConfig> ok = LoadConfigString(yaml, "x.yaml");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->server.auth.tokens_file, "/etc/sieve/tokens");
  EXPECT_FALSE(ok->server.auth.exempt_health);
  EXPECT_EQ(ok->server.tls.client_ca_file, "/etc/sieve/ca.pem");
  EXPECT_EQ(ok->server.tls.reload_interval_s, 5);
  absl::StatusOr<ServerConfig> no_key =
      LoadConfigString("", "x.yaml", {"server.tls.cert_file=/c.pem"});
  EXPECT_THAT(std::string(no_key.status().message()),
              HasSubstr("server.tls.cert_file and server.tls.key_file must be set together"));
  absl::StatusOr<ServerConfig> ca_only =
      LoadConfigString("", "x.yaml", {"server.tls.client_ca_file=/ca.pem"});
  EXPECT_THAT(std::string(ca_only.status().message()), HasSubstr("server.tls.client_ca_file"));
  absl::StatusOr<ServerConfig> interval =
      LoadConfigString("", "x.yaml", {"server.tls.reload_interval_s=0"});
  EXPECT_THAT(std::string(interval.status().message()), HasSubstr("server.tls.reload_interval_s"));
}

// server.auth.reload_interval_s: 0 (read only at start) up to a day; negative is refused.
TEST(ConfigTest, TokensReloadInterval) {
  EXPECT_EQ(ServerConfig().server.auth.reload_interval_s, 10);
  absl::StatusOr<ServerConfig> off =
      LoadConfigString("server:\n  auth:\n    reload_interval_s: 0\n", "x.yaml");
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_EQ(off->server.auth.reload_interval_s, 0);
  absl::StatusOr<ServerConfig> negative =
      LoadConfigString("", "x.yaml", {"server.auth.reload_interval_s=-1"});
  EXPECT_THAT(std::string(negative.status().message()),
              HasSubstr("server.auth.reload_interval_s"));
}

TEST(ConfigTest, CpuThreadsKeyReachesTheRunnerOptions) {
  EXPECT_EQ(ServerConfig().engine.model.cpu_threads, 0);
  absl::StatusOr<ServerConfig> three = LoadConfigString("", "x.yaml", {"model.cpu_threads=3"});
  ASSERT_TRUE(three.ok()) << three.status();
  EXPECT_EQ(three->engine.model.cpu_threads, 3);
  EXPECT_EQ(engine::RunnerOptionsFor(three->engine).num_threads, 3);
  absl::StatusOr<ServerConfig> negative =
      LoadConfigString("", "x.yaml", {"model.cpu_threads=-1"});
  EXPECT_THAT(std::string(negative.status().message()), HasSubstr("model.cpu_threads"));
}

TEST(ConfigTest, DisaggregationCredentialKeysLoadAndClientCertNeedsItsKey) {
  const std::string yaml =
      "disaggregation:\n  token_file: /etc/sieve/prefill-token\n  tls:\n"
      "    ca_file: /etc/sieve/prefill-ca.pem\n    cert_file: /etc/sieve/decode.pem\n"
      "    key_file: /etc/sieve/decode.key\n";
  absl::StatusOr<ServerConfig> ok = LoadConfigString(yaml, "x.yaml");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->disaggregation.token_file, "/etc/sieve/prefill-token");
  EXPECT_EQ(ok->disaggregation.tls.ca_file, "/etc/sieve/prefill-ca.pem");
  EXPECT_EQ(ok->disaggregation.tls.key_file, "/etc/sieve/decode.key");
  EXPECT_TRUE(ok->disaggregation.tls.enabled());
  EXPECT_FALSE(ServerConfig().disaggregation.tls.enabled());
  absl::StatusOr<ServerConfig> no_key =
      LoadConfigString("", "x.yaml", {"disaggregation.tls.cert_file=/c.pem"});
  EXPECT_THAT(std::string(no_key.status().message()),
              HasSubstr("disaggregation.tls.cert_file and disaggregation.tls.key_file must be "
                        "set together"));
  // A CA alone is server-authenticated TLS.
  EXPECT_TRUE(LoadConfigString("", "x.yaml", {"disaggregation.tls.ca_file=/ca.pem"}).ok());
}

TEST(ConfigTest, EngineKeysBindToTheEngineConfig) {
  EXPECT_EQ(ServerConfig().engine, engine::EngineConfig());
  ServerConfig config;
  ASSERT_TRUE(ApplyOverride(config, "scheduler.max_batch_tokens", "4096").ok());
  ASSERT_TRUE(ApplyOverride(config, "attention.decode.method", "dense").ok());
  ASSERT_TRUE(ApplyOverride(config, "model.devices", "2").ok());
  EXPECT_EQ(config.engine.scheduler.max_batch_tokens, 4096);
  EXPECT_THAT(config.engine.model.devices, ElementsAre(2));
  // Every engine key reads back what the engine struct holds.
  const engine::EngineConfig defaults;
  EXPECT_EQ(*GetConfigValue(ServerConfig(), "kv_cache.num_pages"),
            std::to_string(defaults.kv_cache.num_pages));
  EXPECT_EQ(*GetConfigValue(ServerConfig(), "pools.decode_priority"),
            defaults.pools.decode_priority);
}

// configs/default.yaml is the generated dump of the defaults (`sieved --print-config`), and the
// key reference in docs/config.md is the generated one: every key with its default, no stale
// key. After changing a key, scripts/gen-config-docs.sh rewrites both.
TEST(ConfigTest, CommittedDocsAreGeneratedFromTheKeyTable) {
  const std::string yaml_path = RepoPath("configs/default.yaml");
  std::ifstream yaml_file(yaml_path);
  std::stringstream yaml;
  yaml << yaml_file.rdbuf();
  EXPECT_EQ(yaml.str(), ConfigToYaml(ServerConfig()))
      << yaml_path << " is stale: run scripts/gen-config-docs.sh";
  absl::StatusOr<ServerConfig> config = LoadConfigFile(yaml_path);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(*config, ServerConfig());

  std::ifstream doc_file(RepoPath("docs/config.md"));
  std::stringstream doc;
  doc << doc_file.rdbuf();
  absl::StatusOr<std::string> regenerated =
      ReplaceGeneratedSection(doc.str(), FormatConfigMarkdown());
  ASSERT_TRUE(regenerated.ok()) << regenerated.status();
  EXPECT_EQ(*regenerated, doc.str()) << "docs/config.md is stale: run scripts/gen-config-docs.sh";
  for (const ConfigKeyInfo& key : ListConfigKeys()) {
    EXPECT_THAT(doc.str(), HasSubstr("| `" + key.path + "` | " + key.type)) << key.path;
  }
}

TEST(ConfigTest, ReplaceGeneratedSectionNeedsBothMarkers) {
  const std::string doc = absl::StrCat("intro\n", kGeneratedBegin, "\nold\n", kGeneratedEnd,
                                       "\noutro\n");
  absl::StatusOr<std::string> out = ReplaceGeneratedSection(doc, "new\n");
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, absl::StrCat("intro\n", kGeneratedBegin, "\n\nnew\n\n", kGeneratedEnd,
                               "\noutro\n"));
  EXPECT_FALSE(ReplaceGeneratedSection("no markers", "x").ok());
  EXPECT_FALSE(
      ReplaceGeneratedSection(absl::StrCat(kGeneratedEnd, "\n", kGeneratedBegin), "x").ok());
}

TEST(ConfigTest, EmptyDocumentsGiveDefaults) {
  for (const char* yaml : {"", "\n", "# only a comment\n", "scheduler:\n", "---\n"}) {
    absl::StatusOr<ServerConfig> config = LoadConfigString(yaml, "x.yaml");
    ASSERT_TRUE(config.ok()) << yaml << ": " << config.status();
    EXPECT_EQ(*config, ServerConfig());
  }
}

TEST(ConfigTest, LoadsEveryType) {
  absl::StatusOr<ServerConfig> config = LoadConfigString(
      "server:\n"
      "  listen_address: '[::1]:6000'\n"
      "  keepalive_time_s: 2.5\n"
      "metrics:\n"
      "  enabled: false\n"
      "model:\n"
      "  backend: cuda\n"
      "  devices: [1]\n"
      "  dtype: bfloat16\n"
      "scheduler:\n"
      "  max_batch_tokens: 8192\n",
      "x.yaml");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->server.listen_address, "[::1]:6000");
  EXPECT_DOUBLE_EQ(config->server.keepalive_time_s, 2.5);
  EXPECT_FALSE(config->metrics.enabled);
  EXPECT_EQ(config->engine.model.backend, "cuda");
  EXPECT_THAT(config->engine.model.devices, ElementsAre(1));
  EXPECT_EQ(config->engine.model.dtype, "bfloat16");
  EXPECT_EQ(config->engine.scheduler.max_batch_tokens, 8192);
  EXPECT_EQ(config->engine.scheduler.max_running_requests, 64);  // Untouched keys keep defaults.
}

TEST(ConfigTest, UnknownKeyNamesPathAndLine) {
  std::string error = LoadError(
      "scheduler:\n"
      "  max_batch_tokens: 4096\n"
      "  max_batch_tokenz: 4096\n");
  EXPECT_THAT(error, HasSubstr("x.yaml:3: unknown key 'scheduler.max_batch_tokenz'"));
  EXPECT_THAT(error, HasSubstr("did you mean 'scheduler.max_batch_tokens'?"));

  error = LoadError("server:\n  listen_address: 'a:1'\nschedular:\n  max_batch_tokens: 1\n");
  EXPECT_THAT(error, HasSubstr("x.yaml:3: unknown key 'schedular'"));
  EXPECT_THAT(error, HasSubstr("did you mean 'scheduler'?"));

  error = LoadError("model:\n  totally_unrelated_thing: 1\n");
  EXPECT_THAT(error, HasSubstr("x.yaml:2: unknown key 'model.totally_unrelated_thing'"));
  EXPECT_THAT(error, Not(HasSubstr("did you mean")));
}

TEST(ConfigTest, BadValuesNameKeyLineAndValue) {
  struct Case {
    std::string yaml;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"kv_cache:\n  page_size_tokens: 17\n",
       "x.yaml:2: kv_cache.page_size_tokens must be a power of two between 1 and 256, got 17"},
      {"kv_cache:\n  page_size_tokens: 512\n", "between 1 and 256, got 512"},
      {"kv_cache:\n  page_size_tokens: 0\n", "power of two between 1 and 256, got 0"},
      {"\nscheduler:\n  max_batch_tokens: abc\n",
       "x.yaml:3: scheduler.max_batch_tokens must be an integer between 1 and 1048576, got 'abc'"},
      {"scheduler:\n  max_batch_tokens: 1.5\n", "got '1.5'"},
      {"scheduler:\n  max_batch_tokens: 99999999999\n", "got '99999999999'"},
      {"scheduler:\n  max_batch_tokens: -4\n", "max_batch_tokens must be an integer between 1 "
                                                "and 1048576, got -4"},
      {"kv_cache:\n  memory_fraction: 0\n",
       "kv_cache.memory_fraction must be a number greater than 0 and at most 1, got 0"},
      {"kv_cache:\n  memory_fraction: .nan\n", "kv_cache.memory_fraction must be a number"},
      {"kv_cache:\n  memory_fraction: nan\n", "got 'nan'"},
      {"server:\n  drain_grace_period_s: inf\n", "server.drain_grace_period_s must be a number"},
      {"metrics:\n  enabled: maybe\n", "x.yaml:2: metrics.enabled must be true or false, got "
                                       "'maybe'"},
      {"model:\n  backend: tpu\n", "model.backend must be one of: cpu, cuda, got 'tpu'"},
      {"attention:\n  prefill:\n    method: flexprefill\n",
       "x.yaml:3: attention.prefill.method must be one of: dense, minference, xattention, got "
       "'flexprefill'"},
      {"attention:\n  decode:\n    method: h2o\n",
       "attention.decode.method must be one of: dense, quest, double_sparsity, got 'h2o'"},
      {"attention:\n  kernel: fastest\n", "attention.kernel must be one of: auto, simple"},
      {"attention:\n  prefill: dense\n",
       "x.yaml:2: 'attention.prefill' must be a mapping of keys, got 'dense' (it is a section now: "
       "set attention.prefill.method)"},
      {"scheduler:\n  preemption: recompute\n",
       "x.yaml:2: unknown key 'scheduler.preemption': it was removed: preemption is always by "
       "recompute"},
      {"pools:\n  decode_priority: urgent\n",
       "pools.decode_priority must be one of: high, normal, got 'urgent'"},
      {"logging:\n  level: verbose\n", "logging.level must be one of: debug, info, warning, error"},
      {"model:\n  name: ''\n", "model.name must be a non-empty string, got ''"},
      {"server:\n  listen_address: localhost\n",
       "server.listen_address must be an address host:port with port 0-65535, or unix:/path, got "
       "'localhost'"},
      {"server:\n  listen_address: 'a:70000'\n", "got 'a:70000'"},
      {"server:\n  listen_address: 'a:b:1'\n", "got 'a:b:1'"},
      {"server:\n  listen_address: 'unix:'\n", "got 'unix:'"},
      {"metrics:\n  listen_address: 'unix:/tmp/x'\n", "metrics.listen_address must be an address"},
      {"http:\n  listen_address: localhost\n",
       "http.listen_address must be empty, or an address host:port with port 0-65535, got "
       "'localhost'"},
      {"http:\n  threads: 0\n", "http.threads must be an integer between 1 and 4096"},
      {"model:\n  devices: [0, 0]\n",
       "x.yaml:2: model.devices must be a list of distinct integers between 0 and 63, got [0, 0]"},
      {"model:\n  devices: [64]\n", "got [64]"},
      {"model:\n  devices:\n    - 0\n    - x\n", "x.yaml:4: model.devices must be a list"},
      {"model:\n  devices: 0\n", "model.devices must be a list of distinct integers between 0 "
                                 "and 63, got '0'"},
      {"scheduler:\n  max_batch_tokens: [1, 2]\n", "max_batch_tokens must be an integer between 1 "
                                                   "and 1048576, got a list"},
      {"scheduler:\n  max_batch_tokens:\n    a: 1\n", "got a mapping"},
      {"scheduler:\n  max_batch_tokens:\n", "x.yaml:2: scheduler.max_batch_tokens must be an "
                                            "integer between 1 and 1048576, got an empty value"},
      {"scheduler: 5\n", "x.yaml:1: 'scheduler' must be a mapping of keys, got '5'"},
      {"scheduler: [1]\n", "'scheduler' must be a mapping of keys, got a list"},
      {"- a\n- b\n", "x.yaml:1: the configuration must be a mapping of sections, got a list"},
      {"hello\n", "the configuration must be a mapping of sections, got 'hello'"},
      {"scheduler:\n  max_batch_tokens: 1\n  max_batch_tokens: 2\n",
       "x.yaml:3: duplicate key 'scheduler.max_batch_tokens'"},
      {"scheduler:\n  [a]: 1\n", "x.yaml:2: keys must be plain names, got a list under "
                                 "'scheduler'"},
      {"scheduler:\n  max_batch_tokens: [1\n", "x.yaml:"},
      {"server:\n\tlisten_address: x\n", "YAML syntax error"},
      {"a: 1\n---\nb: 2\n", "expected one YAML document"},
      {"model:\n  name: *undefined_anchor\n", "YAML syntax error"},
  };
  for (const Case& c : cases) {
    std::string error = LoadError(c.yaml);
    EXPECT_THAT(error, HasSubstr(c.expected)) << "yaml:\n" << c.yaml;
  }
}

TEST(ConfigTest, SyntaxErrorsCarryTheirLine) {
  std::string error = LoadError("server:\n  listen_address: 'a:1'\nmodel: [1, 2\n");
  EXPECT_THAT(error, HasSubstr("YAML syntax error"));
  EXPECT_TRUE(absl::StartsWith(error, "x.yaml:")) << error;
  EXPECT_FALSE(absl::StartsWith(error, "x.yaml:1:")) << error;
}

TEST(ConfigTest, EveryProblemIsReported) {
  std::string error = LoadError(
      "kv_cache:\n"
      "  page_size_tokens: 17\n"
      "  bogus: 1\n"
      "logging:\n"
      "  level: loud\n");
  EXPECT_THAT(error, HasSubstr("x.yaml:2: kv_cache.page_size_tokens"));
  EXPECT_THAT(error, HasSubstr("x.yaml:3: unknown key 'kv_cache.bogus'"));
  EXPECT_THAT(error, HasSubstr("x.yaml:5: logging.level"));
}

TEST(ConfigTest, MalformedInputNeverThrows) {
  const std::vector<std::string> inputs = {
      "{", "[", "]]", "a: b: c", "? [a]\n: 1\n", std::string("\0\1\2\xff\xfe", 5), "&a [*a]",
      "model: {name: [}", "'unterminated", std::string(10000, '['), "scheduler: !!binary xx",
      "server: {listen_address: {a: {b: c}}}"};
  for (const std::string& input : inputs) {
    absl::StatusOr<ServerConfig> config = LoadConfigString(input, "fuzz.yaml");
    EXPECT_FALSE(config.ok()) << input;
  }
}

TEST(ConfigTest, CrossFieldChecks) {
  struct Case {
    std::string yaml;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"scheduler:\n  prefill_chunk_tokens: 4096\n",
       "scheduler.prefill_chunk_tokens (4096) must not exceed scheduler.max_batch_tokens (2048)"},
      {"scheduler:\n  max_running_requests: 4096\n",
       "scheduler.max_running_requests (4096) must not exceed scheduler.max_batch_tokens"},
      {"model:\n  max_context_tokens: 4096\nscheduler:\n  max_queued_tokens: 100\n",
       "scheduler.max_queued_tokens (100) must be at least model.max_context_tokens (4096)"},
      {"model:\n  max_context_tokens: 4096\nkv_cache:\n  num_pages: 10\n",
       "kv_cache.num_pages * kv_cache.page_size_tokens (160 tokens) must hold one full context"},
      {"model:\n  devices: [0]\n", "model.devices must be empty with model.backend cpu, got [0]"},
      {"model:\n  backend: cuda\n  devices: [0, 1]\n",
       "model.devices lists 2 devices [0, 1]; the cuda backend serves on one device"},
      {"model:\n  dtype: bfloat16\n",
       "model.dtype bfloat16 is not what the cpu backend computes in (float32)"},
      {"model:\n  backend: cuda\n  dtype: float32\n",
       "model.dtype float32 is not what the cuda backend computes in (bfloat16)"},
      {"server:\n  listen_address: '0.0.0.0:9090'\n",
       "metrics.listen_address and server.listen_address use the same port 9090"},
      {"server:\n  role: decode\n",
       "disaggregation.prefill_target must name the prefill daemons when server.role is decode"},
      {"server:\n  role: prefill\nscheduler:\n  enable_prefix_caching: false\n",
       "server.role prefill needs scheduler.enable_prefix_caching"},
      {"http:\n  listen_address: '0.0.0.0:50051'\n",
       "http.listen_address and server.listen_address use the same port 50051"},
      {"http:\n  listen_address: '0.0.0.0:9090'\n",
       "http.listen_address and metrics.listen_address use the same port 9090"},
      {"disaggregation:\n  chunk_bytes: 33554432\n",
       "disaggregation.chunk_bytes (33554432) exceeds server.max_message_bytes (16777216)"},
      {"server:\n  role: decode\ndisaggregation:\n  prefill_target: 'dns:///a b'\n",
       "disaggregation.prefill_target must not contain spaces, got 'dns:///a b'"},
  };
  for (const Case& c : cases) {
    std::string error = LoadError(c.yaml);
    EXPECT_THAT(error, HasSubstr("x.yaml: " + c.expected)) << "yaml:\n" << c.yaml;
  }
  // The same settings pass when the other side of each check allows them.
  EXPECT_EQ(LoadError("model:\n  backend: cuda\n  devices: [0]\n  dtype: bfloat16\n"), "");
  EXPECT_EQ(LoadError("metrics:\n  enabled: false\nserver:\n  listen_address: '0.0.0.0:9090'\n"),
            "");
  EXPECT_EQ(LoadError("server:\n  listen_address: '127.0.0.1:0'\nmetrics:\n  listen_address: "
                      "'127.0.0.1:0'\n"),
            "");
  EXPECT_EQ(LoadError("model:\n  max_context_tokens: 4096\nkv_cache:\n  num_pages: 256\n"), "");
  EXPECT_EQ(LoadError("http:\n  listen_address: '127.0.0.1:8000'\n"), "");
  EXPECT_EQ(LoadError("http:\n  listen_address: ''\n"), "");
}

TEST(ConfigTest, ValidateCatchesValuesSetInCode) {
  ServerConfig config;
  config.engine.kv_cache.page_size_tokens = 24;
  config.logging.level = "trace";
  absl::Status status = config.Validate();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("kv_cache.page_size_tokens must be a power of two "
                                          "between 1 and 256, got 24"));
  EXPECT_THAT(status.message(), HasSubstr("logging.level must be one of"));
}

TEST(ConfigTest, OverridesSetEveryType) {
  ServerConfig config;
  ASSERT_TRUE(ApplyOverride(config, "scheduler.max_batch_tokens", "4096").ok());
  ASSERT_TRUE(ApplyOverride(config, "kv_cache.memory_fraction", "0.5").ok());
  ASSERT_TRUE(ApplyOverride(config, "scheduler.enable_prefix_caching", "off").ok());
  ASSERT_TRUE(ApplyOverride(config, "model.directory", "/models/llama").ok());
  ASSERT_TRUE(ApplyOverride(config, "model.devices", "[2, 3]").ok());
  EXPECT_EQ(config.engine.scheduler.max_batch_tokens, 4096);
  EXPECT_DOUBLE_EQ(config.engine.kv_cache.memory_fraction, 0.5);
  EXPECT_FALSE(config.engine.scheduler.enable_prefix_caching);
  EXPECT_EQ(config.engine.model.directory, "/models/llama");
  EXPECT_THAT(config.engine.model.devices, ElementsAre(2, 3));  // Validate() rejects it later
  ASSERT_TRUE(ApplyOverride(config, "model.devices", "1,0").ok());
  EXPECT_THAT(config.engine.model.devices, ElementsAre(1, 0));
  ASSERT_TRUE(ApplyOverride(config, "model.devices", "").ok());
  EXPECT_TRUE(config.engine.model.devices.empty());
  ASSERT_TRUE(ApplyOverrideAssignment(config, "logging.level=debug").ok());
  EXPECT_EQ(config.logging.level, "debug");
  // The value may itself hold '='.
  ASSERT_TRUE(ApplyOverrideAssignment(config, "model.directory=/a=b").ok());
  EXPECT_EQ(config.engine.model.directory, "/a=b");
}

TEST(ConfigTest, BadOverridesFailAndLeaveConfigUnchanged) {
  ServerConfig config;
  const ServerConfig before = config;
  absl::Status status = ApplyOverride(config, "kv_cache.page_size_tokens", "17");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(),
            "kv_cache.page_size_tokens must be a power of two between 1 and 256, got 17");
  status = ApplyOverride(config, "scheduler.max_batch_tokenz", "1");
  EXPECT_EQ(status.message(),
            "unknown key 'scheduler.max_batch_tokenz' (did you mean 'scheduler.max_batch_tokens'?)");
  EXPECT_FALSE(ApplyOverride(config, "scheduler", "1").ok());  // A section, not a key.
  EXPECT_FALSE(ApplyOverride(config, "", "1").ok());
  EXPECT_FALSE(ApplyOverride(config, "model.devices", "[0, x]").ok());
  EXPECT_FALSE(ApplyOverride(config, "model.devices", "[0, 1").ok());
  EXPECT_FALSE(ApplyOverride(config, "metrics.enabled", "yesno").ok());
  EXPECT_FALSE(ApplyOverride(config, "server.keepalive_time_s", "nan").ok());
  EXPECT_FALSE(ApplyOverride(config, "server.keepalive_time_s", "1e999").ok());
  status = ApplyOverrideAssignment(config, "scheduler.max_batch_tokens");
  EXPECT_THAT(status.message(), HasSubstr("expected key.path=value"));
  EXPECT_EQ(config, before);
}

TEST(ConfigTest, OverridesApplyAfterTheFileAndBeforeValidation) {
  // The file alone fails a cross-field check; the override makes the result valid.
  const std::string yaml = "scheduler:\n  prefill_chunk_tokens: 4096\n";
  EXPECT_NE(LoadError(yaml), "");
  absl::StatusOr<ServerConfig> config =
      LoadConfigString(yaml, "x.yaml", {"scheduler.max_batch_tokens=8192"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->engine.scheduler.max_batch_tokens, 8192);
  EXPECT_EQ(config->engine.scheduler.prefill_chunk_tokens, 4096);

  // Later overrides win; errors name the override.
  config = LoadConfigString("", "x.yaml", {"pools.decode_workers=2", "pools.decode_workers=3"});
  ASSERT_TRUE(config.ok());
  EXPECT_EQ(config->engine.pools.decode_workers, 3);
  EXPECT_THAT(LoadError("", {"pools.decode_workers=0"}),
              HasSubstr("--set pools.decode_workers=0: pools.decode_workers must be an integer "
                        "between 1 and 256, got 0"));
  EXPECT_THAT(LoadError("", {"model.backend=cpu", "model.devices=1"}),
              HasSubstr("model.devices must be empty with model.backend cpu"));
}

TEST(ConfigTest, KeyTableListsEveryKeyWithDefaultsAndDocs) {
  std::vector<ConfigKeyInfo> keys = ListConfigKeys();
  std::vector<std::string> paths;
  for (const ConfigKeyInfo& key : keys) {
    paths.push_back(key.path);
    EXPECT_FALSE(key.doc.empty()) << key.path;
    EXPECT_FALSE(key.accepted.empty()) << key.path;
    EXPECT_FALSE(key.type.empty()) << key.path;
  }
  EXPECT_EQ(paths, kExpectedKeys);

  // Each listed default is accepted by its override and reads back the same.
  const ServerConfig defaults;
  ServerConfig config;
  for (const ConfigKeyInfo& key : keys) {
    EXPECT_TRUE(ApplyOverride(config, key.path, key.default_value).ok()) << key.path;
    absl::StatusOr<std::string> value = GetConfigValue(defaults, key.path);
    ASSERT_TRUE(value.ok()) << key.path;
    EXPECT_EQ(*value, key.default_value) << key.path;
  }
  EXPECT_EQ(config, defaults);
  EXPECT_EQ(GetConfigValue(defaults, "nope.nope").status().code(), absl::StatusCode::kNotFound);
}

TEST(ConfigTest, HelpMentionsEveryKeyAndDefault) {
  std::string help = FormatConfigHelp();
  for (const ConfigKeyInfo& key : ListConfigKeys()) {
    EXPECT_THAT(help, HasSubstr("  " + key.path + " (" + key.type + ", default ")) << key.path;
  }
  EXPECT_THAT(help, HasSubstr("kv_cache.page_size_tokens (int, default 16)"));
  EXPECT_THAT(help, HasSubstr("server.listen_address (string, default \"0.0.0.0:50051\")"));
  EXPECT_THAT(help, HasSubstr("model.devices (list of int, default [])"));
  EXPECT_THAT(help, HasSubstr("a power of two between 1 and 256"));
  for (const absl::string_view line : absl::StrSplit(help, '\n')) {
    EXPECT_LE(line.size(), 100u) << line;
  }
}

TEST(ConfigTest, YamlRoundTripOfDefaults) {
  const std::string yaml = ConfigToYaml(ServerConfig());
  absl::StatusOr<ServerConfig> loaded = LoadConfigString(yaml, "dump.yaml");
  ASSERT_TRUE(loaded.ok()) << loaded.status() << "\n" << yaml;
  EXPECT_EQ(*loaded, ServerConfig());
  for (const std::string& key : kExpectedKeys) {
    std::string leaf = key.substr(key.rfind('.') + 1);
    EXPECT_THAT(yaml, HasSubstr("  " + leaf + ": ")) << key;
  }
}

TEST(ConfigTest, YamlRoundTripOfUnusualValues) {
  ServerConfig config;
  config.engine.model.name = "we\"ird\\ name: #1\t";
  config.engine.model.directory = "/tmp/ünïcode/dir";
  config.engine.model.backend = "cuda";
  config.engine.model.devices = {3};
  config.engine.kv_cache.memory_fraction = 0.1 + 0.2;  // Not exactly representable in short form.
  config.server.keepalive_time_s = 10.0 / 3.0;
  config.server.listen_address = "unix:/run/sieve.sock";
  config.metrics.enabled = false;
  ASSERT_TRUE(config.Validate().ok()) << config.Validate();
  absl::StatusOr<ServerConfig> loaded = LoadConfigString(ConfigToYaml(config), "dump.yaml");
  ASSERT_TRUE(loaded.ok()) << loaded.status() << "\n" << ConfigToYaml(config);
  EXPECT_EQ(*loaded, config);
}

TEST(ConfigTest, LoadConfigFileReadsFilesAndReportsMissingOnes) {
  const std::string path = testing::TempDir() + "/sieve_config_test.yaml";
  {
    std::ofstream out(path);
    out << "scheduler:\n  max_queued_requests: 7\n";
  }
  absl::StatusOr<ServerConfig> config = LoadConfigFile(path, {"logging.level=error"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->engine.scheduler.max_queued_requests, 7);
  EXPECT_EQ(config->logging.level, "error");

  {
    std::ofstream out(path);
    out << "\n\nscheduler:\n  max_queued_requests: 0\n";
  }
  config = LoadConfigFile(path);
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(config.status().message(), HasSubstr(path + ":4: scheduler.max_queued_requests"));

  config = LoadConfigFile(testing::TempDir());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config.status().message(), HasSubstr("is a directory"));

  config = LoadConfigFile(testing::TempDir() + "/does/not/exist.yaml");
  EXPECT_EQ(config.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(config.status().message(), HasSubstr("does/not/exist.yaml"));
}

// Found by fuzz/config_yaml_fuzz: Debian's yaml-cpp 0.7 never returned on a ',' after a
// top-level flow collection (memory grew until the process died); now a syntax error.
TEST(ConfigTest, StrayCommaAfterAFlowCollectionIsAnErrorNotAHang) {
  for (const char* yaml : {"{a: b}, c", "[a], c", "{server: {role: decode}},", "kv_cache: {}\n[1],"}) {
    absl::StatusOr<ServerConfig> config = LoadConfigString(yaml, "x.yaml");
    ASSERT_FALSE(config.ok()) << yaml;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << yaml;
    EXPECT_THAT(config.status().message(), HasSubstr("YAML syntax error")) << yaml;
  }
  // Long valid documents stay under the parser's event bound.
  std::string many = "model:\n  devices: [";
  for (int i = 0; i < 2000; ++i) many += i ? ", 0" : "0";
  many += "]\n";
  absl::StatusOr<ServerConfig> config = LoadConfigString(many, "x.yaml");
  ASSERT_FALSE(config.ok());  // 2000 devices is out of range, but the document parsed
  EXPECT_THAT(config.status().message(), testing::Not(HasSubstr("syntax error")));
  config = LoadConfigString("a: &x [{}, [], {b: *x}, ~, null, '', -1]\nb: [[[[[[]]]]]]\n", "x.yaml");
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(config.status().message(), testing::Not(HasSubstr("syntax error")));
}

// server.allowed_directories confines the model and its side files: paths outside, escapes by
// "..", by a symbolic link and by a sibling sharing the prefix ("allowed2") are refused naming
// the key; paths inside (relative ones against the working directory) pass; empty: anywhere.
TEST(ConfigTest, AllowedDirectoriesConfineModelAndSideFiles) {
  namespace fs = std::filesystem;
  const fs::path root = fs::path(::testing::TempDir()) /
                        ("allowed_dirs_" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root / "allowed" / "model");
  fs::create_directories(root / "allowed2");
  fs::create_directories(root / "outside");
  fs::create_symlink(root / "outside", root / "allowed" / "link");
  ServerConfig c;
  c.server.allowed_directories = (root / "other").string() + ", " + (root / "allowed").string();
  c.engine.model.directory = (root / "allowed" / "model").string();
  EXPECT_TRUE(c.Validate().ok()) << c.Validate();
  const struct {
    std::string path;
    bool ok;
  } cases[] = {{(root / "allowed" / "model" / "calibration.json").string(), true},
               {(root / "allowed" / "not_yet_made" / "x.json").string(), true},
               {(root / "outside" / "calibration.json").string(), false},
               {(root / "allowed" / ".." / "outside" / "c.json").string(), false},
               {(root / "allowed" / "link" / "c.json").string(), false},
               {(root / "allowed2" / "c.json").string(), false},
               {"/etc/passwd", false}};
  for (const auto& k : cases) {
    ServerConfig d = c;
    d.engine.attention.decode.double_sparsity.calibration_file = k.path;
    const absl::Status st = d.Validate();
    EXPECT_EQ(st.ok(), k.ok) << k.path << ": " << st;
    if (!k.ok) {
      EXPECT_THAT(st.message(), ::testing::HasSubstr(
                                    "attention.decode.double_sparsity.calibration_file"));
      EXPECT_THAT(st.message(), ::testing::HasSubstr("server.allowed_directories"));
    }
  }
  ServerConfig outside_model = c;
  outside_model.engine.model.directory = (root / "outside").string();
  EXPECT_THAT(outside_model.Validate().message(), ::testing::HasSubstr("model.directory"));
  ServerConfig template_outside = c;
  template_outside.engine.model.chat_template_file = (root / "outside" / "t.jinja").string();
  EXPECT_THAT(template_outside.Validate().message(),
              ::testing::HasSubstr("model.chat_template_file"));
  // Relative paths resolve against the working directory.
  const fs::path cwd = fs::current_path();
  fs::current_path(root);
  ServerConfig relative = c;
  relative.engine.model.directory = "allowed/model";
  EXPECT_TRUE(relative.Validate().ok()) << relative.Validate();
  relative.engine.model.directory = "outside";
  EXPECT_FALSE(relative.Validate().ok());
  fs::current_path(cwd);
  // Empty: no confinement.
  ServerConfig open = outside_model;
  open.server.allowed_directories.clear();
  EXPECT_TRUE(open.Validate().ok()) << open.Validate();
  fs::remove_all(root);
}

}  // namespace
}  // namespace sieve::server
