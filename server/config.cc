#include "server/config.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <optional>
#include <sstream>
#include <system_error>
#include <utility>
#include <variant>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "engine/sampling.h"
#include "yaml-cpp/yaml.h"

namespace sieve::server {
namespace {

// Debian's Abseil keeps its own string_view type; the public API speaks std::string_view.
absl::string_view View(std::string_view s) { return absl::string_view(s.data(), s.size()); }
std::string_view StdView(absl::string_view s) { return std::string_view(s.data(), s.size()); }

// A pointer to one setting inside a ServerConfig. The alternatives are in the same order as
// Value's, so `FieldRef::index()` is the setting's type.
using FieldRef = std::variant<int*, double*, bool*, std::string*, std::vector<int>*>;

// One setting's value, detached from a config.
using Value = std::variant<int, double, bool, std::string, std::vector<int>>;

enum ValueType { kInt = 0, kNumber = 1, kBool = 2, kString = 3, kIntList = 4 };

// What values a key accepts beyond its type.
enum class RuleKind {
  kAny,           // Any value of the type.
  kIntRange,      // lo <= v <= hi.
  kPowerOfTwo,    // A power of two with lo <= v <= hi.
  kNumberRange,   // lo <= v <= hi (lo < v with lo_exclusive); always finite.
  kChoice,        // One of `choices`.
  kNonEmpty,      // A non-empty string.
  kHostPort,      // "host:port" or "[v6]:port", port in [0, 65535].
  kGrpcAddress,   // kHostPort or "unix:/path".
  kDeviceList,    // Distinct integers in [lo, hi].
};

struct Rule {
  RuleKind kind = RuleKind::kAny;
  double lo = 0;
  double hi = 0;
  bool lo_exclusive = false;
  std::vector<absl::string_view> choices;
};

Rule MakeRule(RuleKind kind, double lo = 0, double hi = 0, bool lo_exclusive = false,
              std::vector<absl::string_view> choices = {}) {
  return Rule{kind, lo, hi, lo_exclusive, std::move(choices)};
}
Rule Any() { return MakeRule(RuleKind::kAny); }
Rule IntRange(int lo, int hi) { return MakeRule(RuleKind::kIntRange, lo, hi); }
Rule PowerOfTwo(int lo, int hi) { return MakeRule(RuleKind::kPowerOfTwo, lo, hi); }
Rule NumberRange(double lo, double hi, bool lo_exclusive = false) {
  return MakeRule(RuleKind::kNumberRange, lo, hi, lo_exclusive);
}
Rule OneOf(std::initializer_list<absl::string_view> choices) {
  return MakeRule(RuleKind::kChoice, 0, 0, false, choices);
}
Rule NonEmpty() { return MakeRule(RuleKind::kNonEmpty); }
Rule HostPort() { return MakeRule(RuleKind::kHostPort); }
Rule GrpcAddress() { return MakeRule(RuleKind::kGrpcAddress); }
Rule DeviceList(int lo, int hi) { return MakeRule(RuleKind::kDeviceList, lo, hi); }

// One configuration key: its dotted path, what it accepts, its doc and where it lives.
struct KeySpec {
  absl::string_view path;
  Rule rule;
  absl::string_view doc;
  FieldRef (*field)(ServerConfig&);
};

// The path is the member expression itself, so a key's name cannot drift from its field.
#define SIEVE_CONFIG_KEY(member, rule, doc) \
  KeySpec { #member, rule, doc, [](ServerConfig& c) -> FieldRef { return &c.member; } }

constexpr int kMaxInt = std::numeric_limits<int>::max();

// The key table: the one place a setting is described. Order is the order of --help and of
// ConfigToYaml(); keys of one section stay together.
const std::vector<KeySpec>& Keys() {
  static const std::vector<KeySpec>* const keys = new std::vector<KeySpec>{
      SIEVE_CONFIG_KEY(server.listen_address, GrpcAddress(),
                       "Address the gRPC service listens on. Port 0 picks a free port."),
      SIEVE_CONFIG_KEY(server.max_message_bytes, IntRange(4096, kMaxInt),
                       "Largest gRPC message received or sent, in bytes."),
      SIEVE_CONFIG_KEY(server.keepalive_time_s, NumberRange(1, 86400),
                       "Seconds between keepalive pings on an idle connection."),
      SIEVE_CONFIG_KEY(server.keepalive_timeout_s, NumberRange(1, 3600),
                       "Seconds to wait for a keepalive ping's ack before closing."),
      SIEVE_CONFIG_KEY(server.drain_grace_period_s, NumberRange(0, 3600),
                       "On SIGTERM, seconds in-flight requests may keep running before they "
                       "are cancelled; 0 cancels at once."),

      SIEVE_CONFIG_KEY(metrics.enabled, Any(), "Serve Prometheus metrics over HTTP."),
      SIEVE_CONFIG_KEY(metrics.listen_address, HostPort(),
                       "Address of the metrics HTTP listener (/metrics). Port 0 picks a free "
                       "port."),

      SIEVE_CONFIG_KEY(model.name, NonEmpty(),
                       "Model name clients pass in requests, and the `model` metric label."),
      SIEVE_CONFIG_KEY(model.directory, NonEmpty(),
                       "Hugging Face checkpoint folder (config.json, *.safetensors, "
                       "tokenizer.json); relative to the working directory."),
      SIEVE_CONFIG_KEY(model.backend, OneOf({"cpu", "cuda"}),
                       "Compute backend: cpu (fp32 reference) or cuda."),
      SIEVE_CONFIG_KEY(model.devices, DeviceList(0, 63),
                       "CUDA device ordinals (cuda only; empty means device 0). Must be empty "
                       "with the cpu backend."),
      SIEVE_CONFIG_KEY(model.dtype, OneOf({"auto", "float32", "bfloat16"}),
                       "Compute dtype; auto is float32 on cpu and bfloat16 on cuda."),
      SIEVE_CONFIG_KEY(model.max_context_tokens, IntRange(0, 1 << 24),
                       "Context limit per request (prompt + generated), in tokens; 0 uses the "
                       "model's own."),
      SIEVE_CONFIG_KEY(model.weights, OneOf({"checkpoint", "random"}),
                       "checkpoint: the directory's *.safetensors; random: seeded random weights "
                       "of config.json's shapes (benchmarks of real shapes without weights)."),
      SIEVE_CONFIG_KEY(model.random_seed, IntRange(0, 1 << 30),
                       "Seed of model.weights: random."),
      SIEVE_CONFIG_KEY(model.tokenizer_directory, Any(),
                       "Folder of tokenizer.json; empty uses model.directory."),

      SIEVE_CONFIG_KEY(kv_cache.page_size_tokens, PowerOfTwo(1, 256), "Tokens per KV page."),
      SIEVE_CONFIG_KEY(kv_cache.num_pages, IntRange(0, 1 << 24),
                       "KV pages to allocate; 0 derives the count from memory_fraction."),
      SIEVE_CONFIG_KEY(kv_cache.memory_fraction, NumberRange(0, 1, /*lo_exclusive=*/true),
                       "With num_pages 0: fraction of the memory left after the weights (GPU "
                       "memory on cuda, physical memory on cpu) the KV cache may use."),

      SIEVE_CONFIG_KEY(scheduler.max_batch_tokens, IntRange(1, 1 << 20),
                       "Token budget of one scheduler step (decode tokens + prefill chunk "
                       "tokens), in tokens."),
      SIEVE_CONFIG_KEY(scheduler.max_running_requests, IntRange(1, 1 << 16),
                       "Requests admitted to run (prefilling or decoding) at once."),
      SIEVE_CONFIG_KEY(scheduler.max_queued_requests, IntRange(1, 1 << 20),
                       "Requests waiting for admission; more are rejected with "
                       "RESOURCE_EXHAUSTED."),
      SIEVE_CONFIG_KEY(scheduler.max_queued_tokens, IntRange(1, 1 << 30),
                       "Prompt tokens waiting for admission, summed over the queue; more are "
                       "rejected with RESOURCE_EXHAUSTED."),
      SIEVE_CONFIG_KEY(scheduler.prefill_chunk_tokens, IntRange(1, 1 << 20),
                       "Largest prefill chunk of one request in one step, in tokens."),
      SIEVE_CONFIG_KEY(scheduler.enable_prefix_caching, Any(),
                       "Share the KV pages of identical full-page prompt prefixes across "
                       "requests."),
      SIEVE_CONFIG_KEY(scheduler.preemption, OneOf({"recompute"}),
                       "What happens when KV pages run out: recompute frees the lowest-priority "
                       "request's pages and prefills it again later."),

      SIEVE_CONFIG_KEY(pools.prefill_workers, IntRange(1, 256),
                       "Worker threads running prefill batches."),
      SIEVE_CONFIG_KEY(pools.decode_workers, IntRange(1, 256),
                       "Worker threads running decode batches."),
      SIEVE_CONFIG_KEY(pools.decode_priority, OneOf({"high", "normal"}),
                       "Device stream priority of the decode workers (cuda): high starts decode "
                       "kernels ahead of a concurrent prefill chunk's waiting blocks; normal "
                       "treats both pools alike."),

      SIEVE_CONFIG_KEY(attention.prefill, OneOf({"dense"}),
                       "Prefill attention policy (only dense is implemented so far)."),
      SIEVE_CONFIG_KEY(attention.decode, OneOf({"dense"}),
                       "Decode attention policy (only dense is implemented so far)."),

      SIEVE_CONFIG_KEY(limits.default_max_tokens, IntRange(1, 1 << 24),
                       "max_tokens of a request that does not set it (capped to the context "
                       "left after the prompt)."),
      SIEVE_CONFIG_KEY(limits.max_stop_strings, IntRange(0, engine::kMaxStopStrings),
                       "Most stop strings one request may carry."),

      SIEVE_CONFIG_KEY(logging.level, OneOf({"debug", "info", "warning", "error"}),
                       "Least severe log level written."),
  };
  return *keys;
}

#undef SIEVE_CONFIG_KEY

const KeySpec* FindKey(absl::string_view path) {
  for (const KeySpec& key : Keys()) {
    if (key.path == path) return &key;
  }
  return nullptr;
}

// Section paths ("scheduler", and deeper prefixes if keys ever nest further).
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

std::string FormatValue(const Value& v) {
  switch (v.index()) {
    case kInt: return absl::StrCat(std::get<int>(v));
    case kNumber: return FormatNumber(std::get<double>(v));
    case kBool: return std::get<bool>(v) ? "true" : "false";
    case kString: return std::get<std::string>(v);
    default: return FormatIntList(std::get<std::vector<int>>(v));
  }
}

// `v` as it appears after "got" in error messages: strings quoted, the rest plain.
std::string ShowValue(const Value& v) {
  if (v.index() == kString) return absl::StrCat("'", std::get<std::string>(v), "'");
  return FormatValue(v);
}

std::optional<int> ParseInt(absl::string_view text) {
  int v = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &v)) return std::nullopt;
  return v;
}

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

std::string UnknownKey(absl::string_view path) {
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

// --- YAML --------------------------------------------------------------------------------------

// Walks a YAML document onto a ServerConfig, collecting every problem with its line.
class YamlLoader {
 public:
  YamlLoader(absl::string_view source, ServerConfig& config) : source_(source), config_(config) {}

  // Loads the document's mappings, section by section.
  void LoadDocument(const YAML::Node& root) {
    if (root.IsNull()) return;  // An empty file: all defaults.
    if (!root.IsMap()) {
      Error(root.Mark(), absl::StrCat("the configuration must be a mapping of sections, got ",
                                      Describe(root)));
      return;
    }
    LoadMapping(root, "");
  }

  // Records `message` at `mark`.
  void Error(const YAML::Mark& mark, absl::string_view message) {
    if (mark.line >= 0) {
      errors_.push_back(absl::StrCat(source_, ":", mark.line + 1, ": ", message));
    } else {
      errors_.push_back(absl::StrCat(source_, ": ", message));
    }
  }

  std::vector<std::string>& errors() { return errors_; }

 private:
  static std::string Describe(const YAML::Node& node) {
    if (node.IsMap()) return "a mapping";
    if (node.IsSequence()) return "a list";
    if (node.IsNull()) return "an empty value";
    return absl::StrCat("'", node.Scalar(), "'");
  }

  void LoadMapping(const YAML::Node& map, const std::string& prefix) {
    for (const auto& entry : map) {
      // Copies: Node is a handle, and the iterator's pair is a temporary.
      const YAML::Node key = entry.first;
      const YAML::Node value = entry.second;
      if (!key.IsScalar()) {
        Error(key.Mark(), absl::StrCat("keys must be plain names, got ", Describe(key),
                                       prefix.empty() ? "" : " under '" + prefix + "'"));
        continue;
      }
      std::string path = prefix.empty() ? key.Scalar() : absl::StrCat(prefix, ".", key.Scalar());
      if (!seen_.insert(path).second) {
        Error(key.Mark(), absl::StrCat("duplicate key '", path, "'"));
        continue;
      }
      if (const KeySpec* spec = FindKey(path)) {
        LoadValue(*spec, key.Mark(), value);
      } else if (Sections().contains(path)) {
        if (value.IsMap()) {
          LoadMapping(value, path);
        } else if (!value.IsNull()) {  // "scheduler:" alone keeps the section's defaults.
          Error(key.Mark(), absl::StrCat("'", path, "' must be a mapping of keys, got ",
                                           Describe(value)));
        }
      } else {
        Error(key.Mark(), UnknownKey(path));
      }
    }
  }

  // Loads one key's value. Problems with the value as a whole are reported on the key's line
  // (`key_mark`): yaml-cpp marks an empty value or a block list on the following line.
  void LoadValue(const KeySpec& spec, const YAML::Mark& key_mark, const YAML::Node& value) {
    std::string error;
    if (TypeOf(spec) == kIntList && (value.IsSequence() || value.IsNull())) {
      std::vector<int> list;
      for (const YAML::Node& item : value) {
        std::optional<int> v = item.IsScalar() ? ParseInt(item.Scalar()) : std::nullopt;
        if (!v) {
          Error(item.Mark(), MustBe(spec, absl::StrCat("an element ", Describe(item))));
          return;
        }
        list.push_back(*v);
      }
      error = CheckValue(spec, Value(list));
      if (error.empty()) Write(spec, config_, Value(std::move(list)));
    } else if (TypeOf(spec) != kIntList && value.IsScalar()) {
      error = SetFromText(spec, config_, value.Scalar());
    } else {
      error = MustBe(spec, Describe(value));
    }
    if (!error.empty()) Error(key_mark, error);
  }

  std::string source_;
  ServerConfig& config_;
  absl::flat_hash_set<std::string> seen_;
  std::vector<std::string> errors_;
};

// Parses `yaml` onto `config`, appending problems to `errors`. Never throws.
void ParseInto(absl::string_view yaml, absl::string_view source, ServerConfig& config,
               std::vector<std::string>& errors) {
  YamlLoader loader(source, config);
  try {
    std::vector<YAML::Node> documents = YAML::LoadAll(std::string(yaml));
    if (documents.size() > 1) {
      loader.Error(documents[1].Mark(),
                   "expected one YAML document, found several (remove the '---' separator)");
    } else if (documents.size() == 1) {
      loader.LoadDocument(documents[0]);
    }
  } catch (const YAML::Exception& e) {
    loader.Error(e.mark, absl::StrCat("YAML syntax error: ", e.msg));
  } catch (const std::exception& e) {
    loader.Error(YAML::Mark::null_mark(), absl::StrCat("cannot read configuration: ", e.what()));
  } catch (...) {
    loader.Error(YAML::Mark::null_mark(), "cannot read configuration: unknown error");
  }
  for (std::string& e : loader.errors()) errors.push_back(std::move(e));
}

// --- Cross-field checks ------------------------------------------------------------------------

void CheckCrossField(const ServerConfig& c, std::vector<std::string>& errors) {
  const SchedulerConfig& s = c.scheduler;
  if (s.prefill_chunk_tokens > s.max_batch_tokens) {
    errors.push_back(absl::StrCat("scheduler.prefill_chunk_tokens (", s.prefill_chunk_tokens,
                                  ") must not exceed scheduler.max_batch_tokens (",
                                  s.max_batch_tokens, ")"));
  }
  if (s.max_running_requests > s.max_batch_tokens) {
    errors.push_back(absl::StrCat(
        "scheduler.max_running_requests (", s.max_running_requests,
        ") must not exceed scheduler.max_batch_tokens (", s.max_batch_tokens,
        "): every running request decodes one token per step"));
  }
  const int context = c.model.max_context_tokens;
  if (context > 0 && s.max_queued_tokens < context) {
    errors.push_back(absl::StrCat("scheduler.max_queued_tokens (", s.max_queued_tokens,
                                  ") must be at least model.max_context_tokens (", context,
                                  "), else a full-length prompt could never be queued"));
  }
  const KvCacheConfig& kv = c.kv_cache;
  const int64_t kv_tokens = int64_t{kv.num_pages} * kv.page_size_tokens;
  if (kv.num_pages > 0 && context > 0 && kv_tokens < context) {
    errors.push_back(absl::StrCat("kv_cache.num_pages * kv_cache.page_size_tokens (", kv_tokens,
                                  " tokens) must hold one full context of "
                                  "model.max_context_tokens (",
                                  context, " tokens)"));
  }
  if (c.model.backend == "cpu") {
    if (!c.model.devices.empty()) {
      errors.push_back(absl::StrCat("model.devices must be empty with model.backend cpu, got ",
                                    FormatIntList(c.model.devices)));
    }
    if (c.model.dtype == "bfloat16") {
      errors.push_back("model.dtype bfloat16 needs model.backend cuda (the cpu backend computes "
                       "in float32)");
    }
  }
  if (c.metrics.enabled) {
    std::optional<int> grpc_port = PortOf(c.server.listen_address);
    std::optional<int> metrics_port = PortOf(c.metrics.listen_address);
    if (grpc_port && metrics_port && *grpc_port != 0 && *grpc_port == *metrics_port) {
      errors.push_back(absl::StrCat("metrics.listen_address and server.listen_address use the "
                                    "same port ",
                                    *grpc_port));
    }
  }
}

// Greedy word wrap of `text` to `width` columns, each line prefixed by `indent`.
std::string Wrap(absl::string_view text, absl::string_view indent, size_t width) {
  std::string out;
  std::string line;
  for (absl::string_view word : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    if (!line.empty() && indent.size() + line.size() + 1 + word.size() > width) {
      absl::StrAppend(&out, indent, line, "\n");
      line.clear();
    }
    absl::StrAppend(&line, line.empty() ? "" : " ", word);
  }
  if (!line.empty()) absl::StrAppend(&out, indent, line, "\n");
  return out;
}

// `s` as a YAML double-quoted scalar.
std::string YamlQuote(absl::string_view s) {
  std::string out = "\"";
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      absl::StrAppend(&out, "\\", std::string(1, ch));
    } else if (c < 0x20 || c == 0x7f) {
      constexpr char kHex[] = "0123456789abcdef";
      absl::StrAppend(&out, "\\x", std::string(1, kHex[c >> 4]), std::string(1, kHex[c & 15]));
    } else {
      out.push_back(ch);
    }
  }
  out.push_back('"');
  return out;
}

}  // namespace

absl::Status ServerConfig::Validate() const {
  std::vector<std::string> errors;
  for (const KeySpec& key : Keys()) {
    std::string error = CheckValue(key, Read(key, *this));
    if (!error.empty()) errors.push_back(std::move(error));
  }
  CheckCrossField(*this, errors);
  if (errors.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrJoin(errors, "\n"));
}

absl::StatusOr<ServerConfig> LoadConfigString(std::string_view yaml_text,
                                              std::string_view source_text,
                                              absl::Span<const std::string> overrides) {
  const absl::string_view yaml = View(yaml_text);
  const absl::string_view source_name = View(source_text);
  ServerConfig config;
  std::vector<std::string> errors;
  ParseInto(yaml, source_name, config, errors);
  for (const std::string& assignment : overrides) {
    absl::Status status = ApplyOverrideAssignment(config, assignment);
    if (!status.ok()) errors.push_back(absl::StrCat("--set ", assignment, ": ", status.message()));
  }
  if (!errors.empty()) return absl::InvalidArgumentError(absl::StrJoin(errors, "\n"));
  absl::Status valid = config.Validate();
  if (!valid.ok()) {
    std::vector<std::string> lines = absl::StrSplit(valid.message(), '\n');
    for (std::string& line : lines) line = absl::StrCat(source_name, ": ", line);
    return absl::InvalidArgumentError(absl::StrJoin(lines, "\n"));
  }
  return config;
}

absl::StatusOr<ServerConfig> LoadConfigFile(const std::string& path,
                                            absl::Span<const std::string> overrides) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config file '", path, "' is a directory, not a YAML file"));
  }
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::string reason = std::error_code(errno, std::generic_category()).message();
    std::string message = absl::StrCat("cannot open config file '", path, "': ", reason);
    if (errno == ENOENT) return absl::NotFoundError(message);
    if (errno == EACCES) return absl::PermissionDeniedError(message);
    return absl::InvalidArgumentError(message);
  }
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat("cannot read '", path, "'"));
  return LoadConfigString(contents.str(), path, overrides);
}

absl::Status ApplyOverride(ServerConfig& config, std::string_view key_path_text,
                           std::string_view value_text) {
  const absl::string_view key_path = View(key_path_text);
  const absl::string_view value = View(value_text);
  const KeySpec* key = FindKey(key_path);
  if (key == nullptr) return absl::InvalidArgumentError(UnknownKey(key_path));
  std::string error = SetFromText(*key, config, value);
  if (!error.empty()) return absl::InvalidArgumentError(error);
  return absl::OkStatus();
}

absl::Status ApplyOverrideAssignment(ServerConfig& config, std::string_view assignment_text) {
  const absl::string_view assignment = View(assignment_text);
  size_t eq = assignment.find('=');
  if (eq == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected key.path=value, got '", assignment, "'"));
  }
  return ApplyOverride(config, StdView(absl::StripAsciiWhitespace(assignment.substr(0, eq))),
                       StdView(assignment.substr(eq + 1)));
}

std::vector<ConfigKeyInfo> ListConfigKeys() {
  static const char* const kTypeNames[] = {"int", "number", "bool", "string", "list of int"};
  const ServerConfig defaults;
  std::vector<ConfigKeyInfo> out;
  out.reserve(Keys().size());
  for (const KeySpec& key : Keys()) {
    out.push_back(ConfigKeyInfo{std::string(key.path), kTypeNames[TypeOf(key)],
                                FormatValue(Read(key, defaults)), Expectation(key),
                                std::string(key.doc)});
  }
  return out;
}

std::string FormatConfigHelp() {
  std::string out;
  for (const ConfigKeyInfo& key : ListConfigKeys()) {
    std::string shown_default =
        key.type == "string" ? absl::StrCat("\"", key.default_value, "\"") : key.default_value;
    absl::StrAppend(&out, "  ", key.path, " (", key.type, ", default ", shown_default, ")\n");
    absl::StrAppend(&out, Wrap(absl::StrCat(key.doc, " Accepts ", key.accepted, "."), "      ", 96));
  }
  return out;
}

absl::StatusOr<std::string> GetConfigValue(const ServerConfig& config,
                                           std::string_view key_path_text) {
  const absl::string_view key_path = View(key_path_text);
  const KeySpec* key = FindKey(key_path);
  if (key == nullptr) return absl::NotFoundError(UnknownKey(key_path));
  return FormatValue(Read(*key, config));
}

std::string ConfigToYaml(const ServerConfig& config) {
  std::string out;
  std::vector<absl::string_view> open;  // Sections currently open, outermost first.
  for (const KeySpec& key : Keys()) {
    std::vector<absl::string_view> parts = absl::StrSplit(key.path, '.');
    absl::string_view leaf = parts.back();
    parts.pop_back();
    size_t common = 0;
    while (common < open.size() && common < parts.size() && open[common] == parts[common]) {
      ++common;
    }
    open.resize(common);
    for (size_t i = common; i < parts.size(); ++i) {
      if (i == 0 && !out.empty()) out.push_back('\n');
      absl::StrAppend(&out, std::string(2 * i, ' '), parts[i], ":\n");
      open.push_back(parts[i]);
    }
    std::string indent(2 * parts.size(), ' ');
    absl::StrAppend(&out, Wrap(key.doc, absl::StrCat(indent, "# "), 96));
    Value v = Read(key, config);
    std::string text = v.index() == kString ? YamlQuote(std::get<std::string>(v)) : FormatValue(v);
    absl::StrAppend(&out, indent, leaf, ": ", text, "\n");
  }
  return out;
}

}  // namespace sieve::server
