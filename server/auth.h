// Authenticator: bearer-token authentication of the daemon's callers (server.auth.*).
//
// One class for every front end: the gRPC services call CheckCall(); an HTTP API checks its
// Authorization header with CheckAuthorization() (it is written to be reused there). Tokens
// come from server.auth.tokens_file, one per line; lines starting with '#' and blank lines are
// skipped, surrounding whitespace is trimmed. A caller presents "Bearer <token>" (the scheme is
// case-insensitive) in the `authorization` header / gRPC metadata.
//
// Comparison is constant-time in the tokens' contents: every configured token is compared over
// the whole presented value, with no early exit, so timing reveals neither which bytes matched
// nor which token did. Tokens are never logged or put in error messages.
//
// Thread-safety: immutable after construction; all methods may be called from any thread.
#ifndef SIEVE_SERVER_AUTH_H_
#define SIEVE_SERVER_AUTH_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sieve::server {

class Authenticator {
 public:
  // Reads the tokens of `path` (server.auth.tokens_file). Errors name the key: a missing or
  // unreadable file, or a file with no token (which would lock every caller out).
  static absl::StatusOr<std::unique_ptr<Authenticator>> FromFile(const std::string& path);

  // An authenticator accepting `tokens` (each non-empty).
  explicit Authenticator(std::vector<std::string> tokens) : tokens_(std::move(tokens)) {}

  // OK when `header` (an Authorization header's value) is "Bearer <token>" with a configured
  // token; else UNAUTHENTICATED with a message that never repeats the value.
  absl::Status CheckAuthorization(std::string_view header) const;

  // CheckAuthorization() on the call's `authorization` metadata (UNAUTHENTICATED when absent).
  absl::Status CheckCall(const grpc::ServerContextBase& context) const;

  // The number of configured tokens.
  size_t num_tokens() const { return tokens_.size(); }

 private:
  std::vector<std::string> tokens_;
};

// True when `a` equals `b`, in time that depends only on a's and b's lengths.
bool ConstantTimeEquals(std::string_view a, std::string_view b);

}  // namespace sieve::server

#endif  // SIEVE_SERVER_AUTH_H_
