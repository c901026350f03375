// The configuration key table and the typed access to a ServerConfig it gives: each key's path,
// rule (what values it accepts) and doc, and a pointer to its field, whose default is the
// struct member's (engine keys bind straight to engine::EngineConfig's members). Internal to
// server/config*.cc: config.cc loads YAML and overrides through it, config_docs.cc writes the
// help, the YAML dump and the docs from it.
//
// Thread-safety: the table is built once, on first use (thread-safe static); the functions are
// pure.
#ifndef SIEVE_SERVER_CONFIG_KEYS_H_
#define SIEVE_SERVER_CONFIG_KEYS_H_

#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/string_view.h"
#include "server/config.h"

namespace sieve::server::config_keys {

// Debian's Abseil keeps its own string_view type; the public API speaks std::string_view.
inline absl::string_view View(std::string_view s) { return absl::string_view(s.data(), s.size()); }
inline std::string_view StdView(absl::string_view s) {
  return std::string_view(s.data(), s.size());
}

// A pointer to one setting inside a ServerConfig. The alternatives are in the same order as
// Value's, so `FieldRef::index()` is the setting's type.
using FieldRef = std::variant<int*, double*, bool*, std::string*, std::vector<int>*>;

// One setting's value, detached from a config.
using Value = std::variant<int, double, bool, std::string, std::vector<int>>;

// The index of each alternative of Value (and FieldRef).
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
  kOptionalHostPort,  // Empty, or kHostPort.
};

// A key's rule: its kind and the kind's parameters.
struct Rule {
  RuleKind kind = RuleKind::kAny;
  double lo = 0;
  double hi = 0;
  bool lo_exclusive = false;
  std::vector<std::string> choices;
};

// One configuration key: its dotted path, what it accepts, its doc and where it lives.
struct KeySpec {
  absl::string_view path;
  Rule rule;
  absl::string_view doc;
  FieldRef (*field)(ServerConfig&);
};

// The key table, in the order of --help, --print-config and the docs; keys of one section stay
// together.
const std::vector<KeySpec>& Keys();

// The key at `path`, or null.
const KeySpec* FindKey(absl::string_view path);

// Section paths: every proper prefix of a key path ("scheduler", "attention.prefill").
const absl::flat_hash_set<std::string>& Sections();

// Keys that were accepted once, each with what became of it (ListRetiredConfigKeys).
const std::vector<RetiredConfigKey>& RetiredKeys();

// The note of the retired key at `path`, or null.
const std::string* FindRetired(absl::string_view path);

// The type of `key`'s value.
ValueType TypeOf(const KeySpec& key);

// `v` in its text form, as ApplyOverride() accepts it (lists "[0, 1]").
std::string FormatValue(const Value& v);

// The port of "host:port" / "[v6]:port", or nullopt when `address` is not of that form.
std::optional<int> PortOf(absl::string_view address);

// An integer written in `text` (surrounding spaces allowed), or nullopt.
std::optional<int> ParseInt(absl::string_view text);

// What `key` accepts, phrased to follow "must be" ("an integer between 1 and 256").
std::string Expectation(const KeySpec& key);

// "<path> must be <expectation>, got <shown>".
std::string MustBe(const KeySpec& key, absl::string_view shown);

// Checks `v` against `key`'s rule; returns the error message, or "" when it passes.
std::string CheckValue(const KeySpec& key, const Value& v);

// The value of `key` in `config`.
Value Read(const KeySpec& key, const ServerConfig& config);

// Stores `v` (of `key`'s type) in `config`.
void Write(const KeySpec& key, ServerConfig& config, Value v);

// Parses `text` for `key`, checks it and stores it; returns the error message or "".
std::string SetFromText(const KeySpec& key, ServerConfig& config, absl::string_view text);

// "unknown key '<path>'", with what replaced it when it was retired, else the closest key or
// section when one is near.
std::string UnknownKey(absl::string_view path);

}  // namespace sieve::server::config_keys

#endif  // SIEVE_SERVER_CONFIG_KEYS_H_
