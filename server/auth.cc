#include "server/auth.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace sieve::server {

bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  // Walks all of `a`, whatever matched so far; `b` is indexed modulo its length so that its
  // length does not change the loop either.
  volatile unsigned char diff = a.size() == b.size() ? 0 : 1;
  if (b.empty()) return a.empty();
  for (size_t i = 0; i < a.size(); ++i) {
    diff = diff | static_cast<unsigned char>(a[i] ^ b[i % b.size()]);
  }
  return diff == 0;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::FromFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat("server.auth.tokens_file: cannot read '", path,
                                                   "': ", std::strerror(errno)));
  }
  std::stringstream text;
  text << in.rdbuf();
  std::vector<std::string> tokens;
  for (absl::string_view line : absl::StrSplit(text.str(), '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || absl::StartsWith(line, "#")) continue;
    tokens.emplace_back(line);
  }
  if (tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "server.auth.tokens_file: '", path, "' holds no token (one per line; # for comments)"));
  }
  return std::make_unique<Authenticator>(std::move(tokens));
}

absl::Status Authenticator::CheckAuthorization(std::string_view header) const {
  constexpr std::string_view kScheme = "bearer ";
  if (header.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(absl::string_view(header.data(), kScheme.size()),
                              absl::string_view(kScheme.data(), kScheme.size()))) {
    return absl::UnauthenticatedError(
        "missing or malformed credentials: send the metadata 'authorization: Bearer <token>'");
  }
  const std::string_view presented = header.substr(kScheme.size());
  bool match = false;
  for (const std::string& token : tokens_) {
    match = ConstantTimeEquals(presented, token) | match;  // no short-circuit
  }
  if (!match) return absl::UnauthenticatedError("the bearer token is not accepted");
  return absl::OkStatus();
}

absl::Status Authenticator::CheckCall(const grpc::ServerContextBase& context) const {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return absl::UnauthenticatedError(
        "this server requires a bearer token: send the metadata 'authorization: Bearer <token>'");
  }
  return CheckAuthorization(std::string_view(it->second.data(), it->second.size()));
}

}  // namespace sieve::server
