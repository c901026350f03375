#include "server/config.h"

#include <cerrno>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "server/config_keys.h"
#include "yaml-cpp/eventhandler.h"
#include "yaml-cpp/yaml.h"

namespace sieve::server {
namespace {

using config_keys::CheckValue;
using config_keys::FindKey;
using config_keys::FindRetired;
using config_keys::FormatValue;
using config_keys::Expectation;
using config_keys::KeySpec;
using config_keys::Keys;
using config_keys::MustBe;
using config_keys::ParseInt;
using config_keys::PortOf;
using config_keys::Read;
using config_keys::RetiredKeys;
using config_keys::Sections;
using config_keys::SetFromText;
using config_keys::StdView;
using config_keys::TypeOf;
using config_keys::UnknownKey;
using config_keys::Value;
using config_keys::View;
using config_keys::Write;
using config_keys::kIntList;

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
          const std::string* retired = FindRetired(path);
          Error(key.Mark(), absl::StrCat("'", path, "' must be a mapping of keys, got ",
                                           Describe(value), retired ? " (" + *retired + ")" : ""));
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

// Debian's yaml-cpp (0.7) never returns on some malformed documents: after a ',' that follows a
// top-level flow collection ("{a: b},", "[a], c") its parser emits null nodes forever, growing
// memory until the process dies (found by fuzz/config_yaml_fuzz; reproducer in
// fuzz/corpus/config_yaml_fuzz/). A first pass over the parser's events stops it once they
// exceed what a document of the input's length can produce: every event but the zero-width
// ones (block starts and ends, implicit nulls) consumes at least one byte, and those come at
// most a few per byte, so 8 per byte plus a constant is never reached by a document that ends.
class BoundedEvents final : public YAML::EventHandler {
 public:
  explicit BoundedEvents(size_t input_bytes) : limit_(8 * input_bytes + 64) {}

  void OnDocumentStart(const YAML::Mark& mark) override { Count(mark); }
  void OnDocumentEnd() override { Count(last_); }
  void OnNull(const YAML::Mark& mark, YAML::anchor_t) override { Count(mark); }
  void OnAlias(const YAML::Mark& mark, YAML::anchor_t) override { Count(mark); }
  void OnScalar(const YAML::Mark& mark, const std::string&, YAML::anchor_t,
                const std::string&) override {
    Count(mark);
  }
  void OnSequenceStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {
    Count(mark);
  }
  void OnSequenceEnd() override { Count(last_); }
  void OnMapStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t,
                  YAML::EmitterStyle::value) override {
    Count(mark);
  }
  void OnMapEnd() override { Count(last_); }

 private:
  void Count(const YAML::Mark& mark) {
    last_ = mark;
    if (++count_ > limit_) {
      throw YAML::ParserException(
          mark, "the parser does not progress here (a ',' after a closing '}' or ']'?)");
    }
  }

  size_t limit_;
  size_t count_ = 0;
  YAML::Mark last_ = YAML::Mark::null_mark();
};

// Parses `yaml` onto `config`, appending problems to `errors`. Never throws.
void ParseInto(absl::string_view yaml, absl::string_view source, ServerConfig& config,
               std::vector<std::string>& errors) {
  YamlLoader loader(source, config);
  try {
    {
      std::istringstream in{std::string(yaml)};
      YAML::Parser parser(in);
      BoundedEvents guard(yaml.size());
      while (parser.HandleNextDocument(guard)) {
      }
    }
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

// server.allowed_directories: every configured model path inside one of the directories, both
// resolved as the daemon resolves them (working directory, symbolic links of what exists).
void CheckAllowedDirectories(const ServerConfig& c, std::vector<std::string>& errors) {
  if (c.server.allowed_directories.empty()) return;
  namespace fs = std::filesystem;
  auto resolve = [](const std::string& path) {
    std::error_code ec;
    fs::path p = fs::weakly_canonical(fs::absolute(fs::path(path), ec), ec);
    return ec ? fs::path() : p.lexically_normal();
  };
  std::vector<fs::path> allowed;
  for (absl::string_view dir :
       absl::StrSplit(c.server.allowed_directories, ',', absl::SkipWhitespace())) {
    const fs::path d = resolve(std::string(absl::StripAsciiWhitespace(dir)));
    if (d.empty()) {
      errors.push_back(absl::StrCat("server.allowed_directories: cannot resolve '", dir, "'"));
      return;
    }
    allowed.push_back(d);
  }
  auto inside = [&](const fs::path& p) {
    for (const fs::path& d : allowed) {
      const auto di = std::mismatch(d.begin(), d.end(), p.begin(), p.end()).first;
      // d a prefix of p, component by component ("/models" does not contain "/models2");
      // a trailing separator of d leaves one empty component.
      if (di == d.end() || (std::next(di) == d.end() && di->empty())) return true;
    }
    return false;
  };
  const auto& e = c.engine;
  const std::pair<const char*, const std::string*> paths[] = {
      {"model.directory", &e.model.directory},
      {"model.tokenizer_directory", &e.model.tokenizer_directory},
      {"model.chat_template_file", &e.model.chat_template_file},
      {"attention.prefill.xattention.threshold_file", &e.attention.prefill.xattention.threshold_file},
      {"attention.prefill.minference.pattern_file", &e.attention.prefill.minference.pattern_file},
      {"attention.decode.double_sparsity.calibration_file",
       &e.attention.decode.double_sparsity.calibration_file},
  };
  for (const auto& [key, value] : paths) {
    if (value->empty()) continue;
    const fs::path p = resolve(*value);
    if (p.empty() || !inside(p)) {
      errors.push_back(absl::StrCat(key, " '", *value, "' (", p.string(),
                                    ") is outside server.allowed_directories (",
                                    c.server.allowed_directories, ")"));
    }
  }
}

// The server's own cross-field checks (the engine's are engine::EngineConfig::Validate()).
void CheckCrossField(const ServerConfig& c, std::vector<std::string>& errors) {
  CheckAllowedDirectories(c, errors);
  if (c.server.role == "decode" && c.disaggregation.prefill_target.empty()) {
    errors.push_back("disaggregation.prefill_target must name the prefill daemons when "
                     "server.role is decode");
  }
  if (c.server.role != "both" && !c.engine.scheduler.enable_prefix_caching) {
    errors.push_back(absl::StrCat("server.role ", c.server.role,
                                  " needs scheduler.enable_prefix_caching: KV transfers go "
                                  "through the prefix cache"));
  }
  if (c.disaggregation.chunk_bytes > c.server.max_message_bytes) {
    errors.push_back(absl::StrCat("disaggregation.chunk_bytes (", c.disaggregation.chunk_bytes,
                                  ") exceeds server.max_message_bytes (",
                                  c.server.max_message_bytes, ")"));
  }
  for (const char c_ : c.disaggregation.prefill_target) {
    if (c_ == ' ' || c_ == '\t' || c_ == '\n') {
      errors.push_back(absl::StrCat("disaggregation.prefill_target must not contain spaces, got '",
                                    c.disaggregation.prefill_target, "'"));
      break;
    }
  }
  const TlsConfig& tls = c.server.tls;
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    errors.push_back("server.tls.cert_file and server.tls.key_file must be set together");
  }
  if (!tls.client_ca_file.empty() && tls.cert_file.empty()) {
    errors.push_back("server.tls.client_ca_file (mutual TLS) needs server.tls.cert_file and "
                     "server.tls.key_file");
  }
  const DisaggregationTlsConfig& dtls = c.disaggregation.tls;
  if (dtls.cert_file.empty() != dtls.key_file.empty()) {
    errors.push_back(
        "disaggregation.tls.cert_file and disaggregation.tls.key_file must be set together");
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
  if (!c.http.listen_address.empty()) {
    std::optional<int> http_port = PortOf(c.http.listen_address);
    std::optional<int> grpc_port = PortOf(c.server.listen_address);
    std::optional<int> metrics_port = PortOf(c.metrics.listen_address);
    if (http_port && *http_port != 0) {
      if (grpc_port && *grpc_port == *http_port) {
        errors.push_back(absl::StrCat("http.listen_address and server.listen_address use the "
                                      "same port ",
                                      *http_port));
      }
      if (c.metrics.enabled && metrics_port && *metrics_port == *http_port) {
        errors.push_back(absl::StrCat("http.listen_address and metrics.listen_address use the "
                                      "same port ",
                                      *http_port));
      }
    }
  }
}

}  // namespace

absl::Status ServerConfig::Validate() const {
  std::vector<std::string> errors;
  for (const KeySpec& key : Keys()) {
    std::string error = CheckValue(key, Read(key, *this));
    if (!error.empty()) errors.push_back(std::move(error));
  }
  // The engine's checks repeat some keys' rules; run them once every key passed its own, so that
  // no problem is reported twice.
  if (errors.empty()) {
    if (absl::Status engine_status = engine.Validate(); !engine_status.ok()) {
      for (absl::string_view line : absl::StrSplit(engine_status.message(), '\n')) {
        errors.emplace_back(line);
      }
    }
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

std::vector<RetiredConfigKey> ListRetiredConfigKeys() { return RetiredKeys(); }

absl::StatusOr<std::string> GetConfigValue(const ServerConfig& config,
                                           std::string_view key_path_text) {
  const absl::string_view key_path = View(key_path_text);
  const KeySpec* key = FindKey(key_path);
  if (key == nullptr) return absl::NotFoundError(UnknownKey(key_path));
  return FormatValue(Read(*key, config));
}

}  // namespace sieve::server
