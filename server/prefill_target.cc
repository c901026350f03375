#include "server/prefill_target.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <string_view>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace sieve::server {
namespace {

constexpr char kKey[] = "disaggregation.prefill_target";

absl::Status Invalid(const std::string& target, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(kKey, ": '", target, "' ", why));
}

bool ValidPort(absl::string_view port) {
  int value = 0;
  return absl::SimpleAtoi(port, &value) && value > 0 && value < 65536;
}

// Splits "host:port", "[v6]:port", "host" into host and port (default 443, as gRPC's dns
// resolver does).
bool SplitHostPort(absl::string_view text, std::string& host, std::string& port) {
  port = "443";
  if (absl::StartsWith(text, "[")) {
    const size_t close = text.find(']');
    if (close == absl::string_view::npos) return false;
    host = std::string(text.substr(1, close - 1));
    absl::string_view rest = text.substr(close + 1);
    if (!rest.empty()) {
      if (!absl::ConsumePrefix(&rest, ":")) return false;
      port = std::string(rest);
    }
  } else if (std::count(text.begin(), text.end(), ':') == 1) {
    const size_t colon = text.find(':');
    host = std::string(text.substr(0, colon));
    port = std::string(text.substr(colon + 1));
  } else {
    host = std::string(text);  // no port, or a bare IPv6 literal
  }
  return !host.empty() && !port.empty();
}

// "ipv4:" / "ipv6:" followed by comma-separated addresses with ports.
absl::StatusOr<PrefillTarget> ParseStatic(const std::string& target, bool v6) {
  PrefillTarget out;
  out.kind = PrefillTarget::Kind::kStatic;
  const std::string scheme = v6 ? "ipv6:" : "ipv4:";
  for (absl::string_view entry : absl::StrSplit(absl::string_view(target).substr(5), ',')) {
    entry = absl::StripAsciiWhitespace(entry);
    std::string host, port;
    if (!SplitHostPort(entry, host, port) || !ValidPort(port) || entry.find(':') == entry.npos ||
        v6 != absl::StartsWith(entry, "[")) {
      return Invalid(target, absl::StrCat("has a malformed address '", entry,
                                          "' (want ", v6 ? "[addr]:port" : "a.b.c.d:port", ")"));
    }
    unsigned char buf[sizeof(in6_addr)];
    if (inet_pton(v6 ? AF_INET6 : AF_INET, host.c_str(), buf) != 1) {
      return Invalid(target, absl::StrCat("has '", host, "', not an IPv", v6 ? "6" : "4",
                                          " address"));
    }
    const std::string address = absl::StrCat(scheme, entry);
    if (std::find(out.addresses.begin(), out.addresses.end(), address) == out.addresses.end()) {
      out.addresses.push_back(address);
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<PrefillTarget> ParsePrefillTarget(const std::string& target) {
  if (target.empty()) return Invalid(target, "is empty");
  if (absl::StartsWith(target, "ipv4:")) return ParseStatic(target, /*v6=*/false);
  if (absl::StartsWith(target, "ipv6:")) return ParseStatic(target, /*v6=*/true);
  absl::string_view rest = target;
  const bool dns = absl::ConsumePrefix(&rest, "dns:");
  if (dns && absl::ConsumePrefix(&rest, "//")) {
    const size_t slash = rest.find('/');  // skip the DNS server authority, if any
    if (slash == absl::string_view::npos) return Invalid(target, "has no host after dns://");
    rest = rest.substr(slash + 1);
  }
  if (!dns) {
    // Schemes gRPC resolves itself: leave them to one round-robin channel.
    for (const char* scheme : {"unix:", "unix-abstract:", "xds:", "google-c2p:", "vsock:"}) {
      if (absl::StartsWith(target, scheme)) {
        return PrefillTarget{PrefillTarget::Kind::kOpaque, {target}, "", "", ""};
      }
    }
    if (absl::StrContains(target, "://")) {
      return PrefillTarget{PrefillTarget::Kind::kOpaque, {target}, "", "", ""};
    }
  }
  PrefillTarget out;
  out.kind = PrefillTarget::Kind::kDns;
  if (!SplitHostPort(rest, out.host, out.port)) {
    return Invalid(target, "has no host to resolve (want dns:///host:port or host:port)");
  }
  out.authority = std::string(rest);
  return out;
}

absl::StatusOr<std::vector<std::string>> ResolveDnsTarget(const PrefillTarget& target) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(target.host.c_str(), target.port.c_str(), &hints, &found);
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("cannot resolve prefill daemons at '",
                                               target.authority, "': ", gai_strerror(rc)));
  }
  std::vector<std::string> out;
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
    char text[INET6_ADDRSTRLEN] = {};
    std::string address;
    if (a->ai_family == AF_INET) {
      const auto* in = reinterpret_cast<const sockaddr_in*>(a->ai_addr);
      inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text));
      address = absl::StrCat("ipv4:", text, ":", ntohs(in->sin_port));
    } else if (a->ai_family == AF_INET6) {
      const auto* in6 = reinterpret_cast<const sockaddr_in6*>(a->ai_addr);
      inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof(text));
      address = absl::StrCat("ipv6:[", text, "]:", ntohs(in6->sin6_port));
    } else {
      continue;
    }
    if (std::find(out.begin(), out.end(), address) == out.end()) out.push_back(address);
  }
  freeaddrinfo(found);
  if (out.empty()) {
    return absl::UnavailableError(
        absl::StrCat("'", target.authority, "' resolves to no IPv4 or IPv6 address"));
  }
  return out;
}

}  // namespace sieve::server
