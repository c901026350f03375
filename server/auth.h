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
// Reload without a restart (server.auth.reload_interval_s): StartReloading() re-reads the file
// periodically on its own thread; a token added to the file is accepted and a token removed is
// refused from the first reload after the change. A file that cannot be used (unreadable,
// missing, or without a token, as while an editor truncates it) keeps the last good tokens in
// force and logs an error naming the key; a later good read logs that the file is usable again.
//
// Thread-safety: every method may be called from any thread; checks see either the old or the
// new token set, never a mix.
#ifndef SIEVE_SERVER_AUTH_H_
#define SIEVE_SERVER_AUTH_H_

#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace sieve::server {

class Authenticator {
 public:
  // Reads the tokens of `path` (server.auth.tokens_file). Errors name the key: a missing or
  // unreadable file, or a file with no token (which would lock every caller out).
  static absl::StatusOr<std::unique_ptr<Authenticator>> FromFile(const std::string& path);

  // An authenticator accepting `tokens` (each non-empty); it has no file to reload.
  explicit Authenticator(std::vector<std::string> tokens);

  // Stops the reload thread, if any.
  ~Authenticator();

  Authenticator(const Authenticator&) = delete;
  Authenticator& operator=(const Authenticator&) = delete;

  // OK when `header` (an Authorization header's value) is "Bearer <token>" with a configured
  // token; else UNAUTHENTICATED with a message that never repeats the value.
  absl::Status CheckAuthorization(std::string_view header) const;

  // Whether `token` (a bare token, no scheme) is an accepted one, compared in constant time
  // with every accepted token (the metrics endpoint's Basic password).
  bool Accepts(std::string_view token) const;

  // CheckAuthorization() on the call's `authorization` metadata (UNAUTHENTICATED when absent).
  absl::Status CheckCall(const grpc::ServerContextBase& context) const;

  // Re-reads the tokens file now. On success the file's tokens replace the accepted ones;
  // returns whether they differ from those before. On an error (as FromFile's, naming the key)
  // the accepted tokens stay as they were. FailedPrecondition without a file.
  absl::StatusOr<bool> Reload();

  // Calls Reload() every `period` on a thread of its own until destruction, logging a change
  // (the numbers of tokens, never the tokens) at info level and a failure at error level (once
  // per distinct error; the last good tokens stay in force). Call at most once; needs a file.
  void StartReloading(absl::Duration period);

  // The number of accepted tokens.
  size_t num_tokens() const;

 private:
  Authenticator(std::string path, std::vector<std::string> tokens);
  std::shared_ptr<const std::vector<std::string>> tokens() const;

  const std::string path_;  // empty: constructed from a list
  // std::mutex, not absl::Mutex: ThreadSanitizer sees pthread locking but not the locking inside
  // Debian's uninstrumented Abseil (scripts/sanitize.sh), and the reload thread is checked by it.
  mutable std::mutex mu_;
  std::shared_ptr<const std::vector<std::string>> tokens_;  // guarded by mu_
  absl::Notification stop_;
  std::thread reloader_;
};

// True when `a` equals `b`, in time that depends only on a's and b's lengths.
bool ConstantTimeEquals(std::string_view a, std::string_view b);

}  // namespace sieve::server

#endif  // SIEVE_SERVER_AUTH_H_
