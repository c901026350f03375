#include "tests/support/http_get.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::test_support {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

// A one-shot HTTP server on 127.0.0.1: accepts one connection, reads the request header,
// answers with a canned reply (unless `reply` is null: then it holds the connection open until
// destroyed) and closes.
class OneShotServer {
 public:
  explicit OneShotServer(std::string reply, bool answer = true) : reply_(std::move(reply)) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    EXPECT_EQ(bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    EXPECT_EQ(listen(listen_fd_, 1), 0);
    socklen_t len = sizeof(addr);
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this, answer] {
      int fd = accept(listen_fd_, nullptr, nullptr);
      if (fd < 0) return;
      char buf[4096];
      while (!absl::StrContains(request_, "\r\n\r\n")) {
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n <= 0) break;
        request_.append(buf, static_cast<size_t>(n));
      }
      if (answer) {
        send(fd, reply_.data(), reply_.size(), MSG_NOSIGNAL);
      } else {
        recv(fd, buf, sizeof(buf), 0);  // blocks until the client gives up and closes
      }
      close(fd);
    });
  }
  ~OneShotServer() {
    if (thread_.joinable()) thread_.join();
    close(listen_fd_);
  }
  int port() const { return port_; }
  // The request as received; valid after the client call returned and the server finished.
  const std::string& request() {
    if (thread_.joinable()) thread_.join();
    return request_;
  }

 private:
  std::string reply_;
  std::string request_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::thread thread_;
};

TEST(HttpGetTest, ReturnsTheBodyAndSendsAWellFormedRequest) {
  OneShotServer server("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
                       "hello");
  absl::StatusOr<std::string> body =
      HttpGet("127.0.0.1", server.port(), "/metrics", absl::Seconds(5));
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_EQ(*body, "hello");
  EXPECT_THAT(server.request(), StartsWith("GET /metrics HTTP/1.0\r\n"));
  EXPECT_THAT(server.request(), HasSubstr("\r\nHost: 127.0.0.1:"));
}

TEST(HttpGetTest, ResolvesLocalhost) {
  OneShotServer server("HTTP/1.0 200 OK\r\n\r\nno length, read to close");
  absl::StatusOr<std::string> body = HttpGet("localhost", server.port(), "/", absl::Seconds(5));
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_EQ(*body, "no length, read to close");
}

TEST(HttpGetTest, DecodesChunkedBodies) {
  OneShotServer server(
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
      "5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n");
  absl::StatusOr<std::string> body = HttpGet("127.0.0.1", server.port(), "/x", absl::Seconds(5));
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_EQ(*body, "hello, world");
}

TEST(HttpGetTest, NonSuccessStatusIsFailedPrecondition) {
  OneShotServer server("HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno such x");
  absl::StatusOr<std::string> body = HttpGet("127.0.0.1", server.port(), "/x", absl::Seconds(5));
  ASSERT_FALSE(body.ok());
  EXPECT_EQ(body.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(body.status().message(), HasSubstr("404"));
  EXPECT_THAT(body.status().message(), HasSubstr("no such x"));
}

TEST(HttpGetTest, MalformedResponsesAreDataLoss) {
  for (const char* reply : {
           "garbage\r\n\r\n",
           "HTTP/1.1 2x0 OK\r\n\r\n",
           "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
           "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
           "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
           "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
           "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc\r\n",
           "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc",
           "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n",  // header never ends
           "",                                           // closed without a reply
       }) {
    OneShotServer server(reply);
    absl::StatusOr<std::string> body =
        HttpGet("127.0.0.1", server.port(), "/", absl::Seconds(5));
    ASSERT_FALSE(body.ok()) << reply;
    EXPECT_EQ(body.status().code(), absl::StatusCode::kDataLoss) << reply << body.status();
  }
}

TEST(HttpGetTest, SilentServerTimesOut) {
  OneShotServer server("", /*answer=*/false);
  const absl::Time start = absl::Now();
  absl::StatusOr<std::string> body =
      HttpGet("127.0.0.1", server.port(), "/", absl::Milliseconds(300));
  ASSERT_FALSE(body.ok());
  EXPECT_EQ(body.status().code(), absl::StatusCode::kDeadlineExceeded) << body.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
}

TEST(HttpGetTest, ClosedPortIsUnavailable) {
  int port = 0;
  {
    // Find a port nobody listens on: bind one, then close it.
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    socklen_t len = sizeof(addr);
    getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
    port = ntohs(addr.sin_port);
    close(fd);
  }
  absl::StatusOr<std::string> body = HttpGet("127.0.0.1", port, "/", absl::Seconds(5));
  ASSERT_FALSE(body.ok());
  EXPECT_EQ(body.status().code(), absl::StatusCode::kUnavailable) << body.status();
}

TEST(HttpGetTest, BadArgumentsAreInvalidArgument) {
  EXPECT_EQ(HttpGet("", 80, "/", absl::Seconds(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpGet("a b", 80, "/", absl::Seconds(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpGet("127.0.0.1", 0, "/", absl::Seconds(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpGet("127.0.0.1", 70000, "/", absl::Seconds(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpGet("127.0.0.1", 80, "metrics", absl::Seconds(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpGet("127.0.0.1", 80, "/a\r\nX: y", absl::Seconds(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sieve::test_support
