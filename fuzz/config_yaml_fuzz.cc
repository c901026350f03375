// libFuzzer target for the daemon's YAML configuration loader (server/config.h).
//
// The input is a YAML document, optionally followed by a NUL byte and `--set` overrides, one
// "key.path=value" per line. Checked on every input (any violation traps; an exception escaping
// the loader aborts the run):
//   - LoadConfigString never throws; an error is INVALID_ARGUMENT with a message;
//   - an accepted configuration passes Validate();
//   - every key of an accepted configuration reads back (GetConfigValue) in a form that
//     ApplyOverride accepts and that rebuilds the same configuration from the defaults.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/str_split.h"
#include "server/config.h"

namespace {

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string_view yaml = input.substr(0, nul);
  std::vector<std::string> overrides;
  if (nul != std::string_view::npos) {
    for (absl::string_view line : absl::StrSplit(
             absl::string_view(input.data() + nul + 1, input.size() - nul - 1), '\n')) {
      if (!line.empty()) overrides.emplace_back(line);
    }
  }
  absl::StatusOr<sieve::server::ServerConfig> config =
      sieve::server::LoadConfigString(yaml, "fuzz.yaml", overrides);
  if (!config.ok()) {
    Check(config.status().code() == absl::StatusCode::kInvalidArgument);
    Check(!config.status().message().empty());
    return 0;
  }
  Check(config->Validate().ok());
  sieve::server::ServerConfig rebuilt;
  for (const sieve::server::ConfigKeyInfo& key : sieve::server::ListConfigKeys()) {
    absl::StatusOr<std::string> value = sieve::server::GetConfigValue(*config, key.path);
    Check(value.ok());
    Check(sieve::server::ApplyOverride(rebuilt, key.path, *value).ok());
  }
  Check(rebuilt == *config);
  return 0;
}
