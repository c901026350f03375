#include "tests/support/http_get.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string_view>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"

namespace sieve::test_support {
namespace {

// Closes a file descriptor when it goes out of scope.
class ScopedFd {
 public:
  explicit ScopedFd(int fd) : fd_(fd) {}
  ~ScopedFd() {
    if (fd_ >= 0) close(fd_);
  }
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

// Milliseconds left until `deadline` for poll(), at least 0.
int RemainingMs(absl::Time deadline) {
  const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
  return static_cast<int>(std::clamp<int64_t>(ms, 0, 1 << 30));
}

// Waits until `fd` has `events` or the deadline passes.
absl::Status WaitFor(int fd, short events, absl::Time deadline, absl::string_view what) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int n = poll(&p, 1, RemainingMs(deadline));
    if (n > 0) return absl::OkStatus();
    if (n == 0) return absl::DeadlineExceededError(absl::StrCat("HTTP GET: timed out ", what));
    if (errno != EINTR) {
      return absl::UnavailableError(absl::StrCat("HTTP GET: poll: ", std::strerror(errno)));
    }
  }
}

// Connects a non-blocking socket to host:port, trying each resolved address in turn.
absl::StatusOr<int> Connect(const std::string& host, int port, absl::Time deadline) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addrs = nullptr;
  const std::string service = absl::StrCat(port);
  const int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &addrs);
  if (rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("HTTP GET: cannot resolve \"", host, "\": ", gai_strerror(rc)));
  }
  absl::Status last = absl::UnavailableError(absl::StrCat("HTTP GET: no address for ", host));
  for (addrinfo* a = addrs; a != nullptr; a = a->ai_next) {
    ScopedFd fd(socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (fd.get() < 0) {
      last = absl::UnavailableError(absl::StrCat("HTTP GET: socket: ", std::strerror(errno)));
      continue;
    }
    if (connect(fd.get(), a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      last = absl::UnavailableError(absl::StrCat("HTTP GET: connect to ", host, ":", port, ": ",
                                                 std::strerror(errno)));
      continue;
    }
    absl::Status waited = WaitFor(fd.get(), POLLOUT, deadline, "connecting");
    if (!waited.ok()) {
      last = waited;
      if (absl::IsDeadlineExceeded(waited)) break;
      continue;
    }
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      last = absl::UnavailableError(
          absl::StrCat("HTTP GET: connect to ", host, ":", port, ": ", std::strerror(err)));
      continue;
    }
    freeaddrinfo(addrs);
    return fd.release();
  }
  freeaddrinfo(addrs);
  return last;
}

absl::Status SendAll(int fd, std::string_view data, absl::Time deadline) {
  while (!data.empty()) {
    const ssize_t n = send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      absl::Status s = WaitFor(fd, POLLOUT, deadline, "sending");
      if (!s.ok()) return s;
    } else {
      return absl::UnavailableError(absl::StrCat("HTTP GET: send: ", std::strerror(errno)));
    }
  }
  return absl::OkStatus();
}

// Reads until the peer closes the connection.
absl::StatusOr<std::string> ReadAll(int fd, absl::Time deadline) {
  std::string out;
  char buf[16384];
  for (;;) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
      if (out.size() > kHttpGetMaxResponseBytes) {
        return absl::DataLossError("HTTP GET: response larger than the limit");
      }
    } else if (n == 0) {
      return out;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
      absl::Status s = WaitFor(fd, POLLIN, deadline, "reading the response");
      if (!s.ok()) return s;
    } else {
      return absl::UnavailableError(absl::StrCat("HTTP GET: recv: ", std::strerror(errno)));
    }
  }
}

// Decodes a chunked body (RFC 9112 section 7.1); trailers are ignored.
absl::StatusOr<std::string> DecodeChunked(absl::string_view body) {
  std::string out;
  for (;;) {
    const size_t eol = body.find("\r\n");
    if (eol == absl::string_view::npos) return absl::DataLossError("HTTP GET: truncated chunk");
    absl::string_view size_text = body.substr(0, eol);
    size_text = size_text.substr(0, size_text.find(';'));  // drop chunk extensions
    uint64_t size = 0;
    if (size_text.empty() || size_text.size() > 15 ||
        !absl::SimpleHexAtoi(size_text, &size)) {
      return absl::DataLossError("HTTP GET: malformed chunk size");
    }
    body.remove_prefix(eol + 2);
    if (size == 0) return out;
    if (body.size() < size + 2 || body.substr(size, 2) != "\r\n") {
      return absl::DataLossError("HTTP GET: truncated chunk");
    }
    out.append(body.data(), size);
    body.remove_prefix(size + 2);
  }
}

// Splits a raw response into status, headers and body, and returns the decoded body.
absl::StatusOr<std::string> ParseResponse(const std::string& raw) {
  const size_t header_end = raw.find("\r\n\r\n");
  if (header_end == std::string::npos) {
    return absl::DataLossError("HTTP GET: response without a complete header");
  }
  std::vector<absl::string_view> lines =
      absl::StrSplit(absl::string_view(raw.data(), header_end), "\r\n");
  // Status line: HTTP/1.x NNN reason
  const absl::string_view status_line = lines[0];
  int code = 0;
  if (!absl::StartsWith(status_line, "HTTP/1.") || status_line.size() < 12 ||
      status_line[8] != ' ' || !absl::SimpleAtoi(status_line.substr(9, 3), &code)) {
    return absl::DataLossError(
        absl::StrCat("HTTP GET: malformed status line \"", status_line.substr(0, 80), "\""));
  }
  bool chunked = false;
  int64_t content_length = -1;
  for (size_t i = 1; i < lines.size(); ++i) {
    const size_t colon = lines[i].find(':');
    if (colon == absl::string_view::npos) return absl::DataLossError("HTTP GET: malformed header");
    const std::string name = absl::AsciiStrToLower(lines[i].substr(0, colon));
    const absl::string_view value = absl::StripAsciiWhitespace(lines[i].substr(colon + 1));
    if (name == "transfer-encoding") {
      chunked = absl::StrContains(absl::AsciiStrToLower(value), "chunked");
    } else if (name == "content-length") {
      if (!absl::SimpleAtoi(value, &content_length) || content_length < 0) {
        return absl::DataLossError("HTTP GET: malformed Content-Length");
      }
    }
  }
  absl::string_view body = absl::string_view(raw).substr(header_end + 4);
  std::string decoded;
  if (chunked) {
    absl::StatusOr<std::string> d = DecodeChunked(body);
    if (!d.ok()) return d.status();
    decoded = *std::move(d);
  } else if (content_length >= 0) {
    if (body.size() < static_cast<uint64_t>(content_length)) {
      return absl::DataLossError(absl::StrCat("HTTP GET: body truncated at ", body.size(),
                                              " of ", content_length, " bytes"));
    }
    decoded = std::string(body.substr(0, static_cast<size_t>(content_length)));
  } else {
    decoded = std::string(body);
  }
  if (code < 200 || code > 299) {
    return absl::FailedPreconditionError(
        absl::StrCat("HTTP GET: \"", status_line, "\": ", decoded.substr(0, 200)));
  }
  return decoded;
}

bool HasControlOrSpace(std::string_view s) {
  return std::any_of(s.begin(), s.end(),
                     [](char c) { return static_cast<unsigned char>(c) <= ' ' || c == 0x7f; });
}

}  // namespace

absl::StatusOr<std::string> HttpGet(const std::string& host, int port, const std::string& path,
                                    absl::Duration timeout) {
  if (host.empty() || HasControlOrSpace(host)) {
    return absl::InvalidArgumentError("HTTP GET: host must be a non-empty name without spaces");
  }
  if (port < 1 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("HTTP GET: port ", port, " not in 1..65535"));
  }
  if (path.empty() || path[0] != '/' || HasControlOrSpace(path)) {
    return absl::InvalidArgumentError("HTTP GET: path must start with '/' and have no spaces");
  }
  const absl::Time deadline = absl::Now() + timeout;
  absl::StatusOr<int> fd_or = Connect(host, port, deadline);
  if (!fd_or.ok()) return fd_or.status();
  ScopedFd fd(*fd_or);
  const bool v6_literal = host.find(':') != std::string::npos;
  const std::string request =
      absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", v6_literal ? "[" : "", host,
                   v6_literal ? "]" : "", ":", port,
                   "\r\nAccept: */*\r\nConnection: close\r\n\r\n");
  absl::Status sent = SendAll(fd.get(), request, deadline);
  if (!sent.ok()) return sent;
  absl::StatusOr<std::string> raw = ReadAll(fd.get(), deadline);
  if (!raw.ok()) return raw.status();
  return ParseResponse(*raw);
}

}  // namespace sieve::test_support
