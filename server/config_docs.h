// The configuration's documentation, written from the key table (server/config_keys.h) so that
// it cannot drift from it: `sieved --help`, `sieved --print-config`, configs/default.yaml (the
// defaults as `--print-config` prints them) and the key reference in docs/config.md (between
// the markers kGeneratedBegin and kGeneratedEnd). config_test checks that both committed files
// equal what these functions write; `scripts/gen-config-docs.sh` rewrites them after a key
// changes.
//
// Thread-safety: pure functions.
#ifndef SIEVE_SERVER_CONFIG_DOCS_H_
#define SIEVE_SERVER_CONFIG_DOCS_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "server/config.h"

namespace sieve::server {

// The lines that open and close the generated key reference in docs/config.md.
inline constexpr char kGeneratedBegin[] =
    "<!-- BEGIN GENERATED KEY REFERENCE: scripts/gen-config-docs.sh writes this part -->";
inline constexpr char kGeneratedEnd[] = "<!-- END GENERATED KEY REFERENCE -->";

// ListConfigKeys() formatted for a terminal: one block per key with type, default, doc and the
// values it accepts.
std::string FormatConfigHelp();

// `config` as a YAML document holding every key, each preceded by its doc and accepted values
// as comments, after a header that says how to use it. LoadConfigString() of the result gives
// back `config`; for ServerConfig() the result is configs/default.yaml.
std::string ConfigToYaml(const ServerConfig& config);

// The key reference in Markdown: per section a table of key, type, default, accepted values and
// doc; then the retired keys and what replaced them.
std::string FormatConfigMarkdown();

// `document` with the text between its kGeneratedBegin and kGeneratedEnd lines replaced by
// `generated`. InvalidArgument when the markers are missing or out of order.
absl::StatusOr<std::string> ReplaceGeneratedSection(std::string_view document,
                                                    std::string_view generated);

}  // namespace sieve::server

#endif  // SIEVE_SERVER_CONFIG_DOCS_H_
