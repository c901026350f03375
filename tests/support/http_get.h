// A minimal blocking HTTP/1.0 GET client over a plain TCP socket, for tests and tools that
// read the metrics endpoint (no TLS, no redirects, no keep-alive).
#ifndef SIEVE_TESTS_SUPPORT_HTTP_GET_H_
#define SIEVE_TESTS_SUPPORT_HTTP_GET_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace sieve::test_support {

// Most bytes of a response HttpGet accepts (headers and body); larger ones are an error.
inline constexpr size_t kHttpGetMaxResponseBytes = 64 << 20;

// Sends `GET path` to host:port and returns the response body when the status is 2xx.
// `host` is a name or address literal ("127.0.0.1", "localhost", "::1"); `path` starts with '/'.
// The whole exchange (resolve, connect, send, receive) must finish within `timeout`.
// Chunked transfer encoding is decoded. Errors: InvalidArgument (bad host, port or path),
// Unavailable (cannot connect), DeadlineExceeded (timeout), DataLoss (malformed or truncated
// response), FailedPrecondition (non-2xx status; the message holds the status line and the
// start of the body).
absl::StatusOr<std::string> HttpGet(const std::string& host, int port, const std::string& path,
                                    absl::Duration timeout);

}  // namespace sieve::test_support

#endif  // SIEVE_TESTS_SUPPORT_HTTP_GET_H_
