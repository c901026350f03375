#include "server/auth.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/log.h"

namespace sieve::server {
namespace {

// The tokens of the file at `path`, or an error naming server.auth.tokens_file: the path cannot
// be opened or read (no such file, no permission), is not a regular file, or holds no token.
absl::StatusOr<std::vector<std::string>> ReadTokens(const std::string& path) {
  const auto unreadable = [&path] {
    return absl::InvalidArgumentError(absl::StrCat("server.auth.tokens_file: cannot read '", path,
                                                   "': ", std::strerror(errno)));
  };
  // O_NONBLOCK: a FIFO at the path must not block the daemon's start or its reload thread.
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return unreadable();
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat("server.auth.tokens_file: '", path, "' is not a regular file"));
  }
  std::string text;
  char buffer[4096];
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) != 0) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      absl::Status error = unreadable();
      close(fd);
      return error;
    }
    text.append(buffer, static_cast<size_t>(n));
  }
  close(fd);
  std::vector<std::string> tokens;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || absl::StartsWith(line, "#")) continue;
    tokens.emplace_back(line);
  }
  if (tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "server.auth.tokens_file: '", path, "' holds no token (one per line; # for comments)"));
  }
  return tokens;
}

// How many of `b`'s distinct tokens are not in `a`.
size_t CountMissing(const std::vector<std::string>& a, const std::vector<std::string>& b) {
  const std::set<std::string> in_a(a.begin(), a.end());
  const std::set<std::string> in_b(b.begin(), b.end());
  size_t n = 0;
  for (const std::string& t : in_b) n += in_a.count(t) == 0 ? 1 : 0;
  return n;
}

}  // namespace

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

Authenticator::Authenticator(std::vector<std::string> tokens)
    : Authenticator(std::string(), std::move(tokens)) {}

Authenticator::Authenticator(std::string path, std::vector<std::string> tokens)
    : path_(std::move(path)),
      tokens_(std::make_shared<const std::vector<std::string>>(std::move(tokens))) {}

Authenticator::~Authenticator() {
  stop_.Notify();
  if (reloader_.joinable()) reloader_.join();
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::FromFile(const std::string& path) {
  absl::StatusOr<std::vector<std::string>> tokens = ReadTokens(path);
  if (!tokens.ok()) return tokens.status();
  return std::unique_ptr<Authenticator>(new Authenticator(path, *std::move(tokens)));
}

std::shared_ptr<const std::vector<std::string>> Authenticator::tokens() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tokens_;
}

size_t Authenticator::num_tokens() const { return tokens()->size(); }

absl::StatusOr<bool> Authenticator::Reload() {
  if (path_.empty()) {
    return absl::FailedPreconditionError("this authenticator has no server.auth.tokens_file");
  }
  absl::StatusOr<std::vector<std::string>> read = ReadTokens(path_);
  if (!read.ok()) return read.status();
  auto fresh = std::make_shared<const std::vector<std::string>>(*std::move(read));
  std::lock_guard<std::mutex> lock(mu_);
  const bool changed = *fresh != *tokens_;
  tokens_ = std::move(fresh);
  return changed;
}

void Authenticator::StartReloading(absl::Duration period) {
  if (path_.empty() || reloader_.joinable()) return;
  reloader_ = std::thread([this, period] {
    pthread_setname_np(pthread_self(), "sieve-auth");
    std::string last_error;  // the error logged last; empty while the file is usable
    while (!stop_.WaitForNotificationWithTimeout(period)) {
      const std::shared_ptr<const std::vector<std::string>> before = tokens();
      absl::StatusOr<bool> changed = Reload();
      if (!changed.ok()) {
        const std::string error(changed.status().message());
        if (error != last_error) {
          Log(LogLevel::kError,
              absl::StrCat(error, "; the ", before->size(),
                           " tokens read before stay accepted until the file can be read again"));
          last_error = error;
        }
        continue;
      }
      const std::shared_ptr<const std::vector<std::string>> after = tokens();
      if (!last_error.empty() || *changed) {
        Log(LogLevel::kInfo,
            absl::StrCat("server.auth.tokens_file '", path_, "' ",
                         last_error.empty() ? "reloaded" : "is usable again", ": ",
                         after->size(), " tokens accepted (", CountMissing(*before, *after),
                         " added, ", CountMissing(*after, *before), " removed)"));
      }
      last_error.clear();
    }
  });
}

absl::Status Authenticator::CheckAuthorization(std::string_view header) const {
  constexpr std::string_view kScheme = "bearer ";
  if (header.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(absl::string_view(header.data(), kScheme.size()),
                              absl::string_view(kScheme.data(), kScheme.size()))) {
    return absl::UnauthenticatedError(
        "missing or malformed credentials: send the metadata 'authorization: Bearer <token>'");
  }
  if (!Accepts(header.substr(kScheme.size()))) {
    return absl::UnauthenticatedError("the bearer token is not accepted");
  }
  return absl::OkStatus();
}

bool Authenticator::Accepts(std::string_view presented) const {
  const std::shared_ptr<const std::vector<std::string>> accepted = tokens();
  bool match = false;
  for (const std::string& token : *accepted) {
    match = ConstantTimeEquals(presented, token) | match;  // no short-circuit
  }
  return match;
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
