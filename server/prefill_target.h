// PrefillTarget: the addresses behind disaggregation.prefill_target, one gRPC channel target
// each, so that a decode daemon can pick a prefill daemon by its load (server/prefill_balancer.h)
// rather than leave the choice to a round-robin channel.
//
// gRPC 1.51's C++ API neither exposes a channel's resolved addresses nor takes a custom load
// balancing policy, so the target is resolved here, with gRPC's syntax and rules:
//   ipv4:a:p[,b:p...] / ipv6:[a]:p[,...]  the listed addresses (static);
//   dns:[//authority/]host[:port], or host[:port] with no scheme gRPC knows
//                                          host's addresses (getaddrinfo; port 443 when none),
//                                          resolved again as the caller asks (every few seconds);
//   anything else (unix:, unix-abstract:, xds:, ...)
//                                          opaque: one channel to the target itself, balanced by
//                                          gRPC round-robin as before (no load-aware choice).
// Each address of a dns target is dialled as "ipv4:ip:port" / "ipv6:[ip]:port" with the
// original host:port as the channel's authority, so TLS checks the certificate against the
// host name the operator wrote.
//
// Thread-safety: pure functions (ResolveDnsTarget blocks in getaddrinfo).
#ifndef SIEVE_SERVER_PREFILL_TARGET_H_
#define SIEVE_SERVER_PREFILL_TARGET_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sieve::server {

struct PrefillTarget {
  enum class Kind { kStatic, kDns, kOpaque };
  Kind kind = Kind::kOpaque;
  // kStatic: the channel targets, one per address ("ipv4:127.0.0.1:50061"). kOpaque: the target.
  std::vector<std::string> addresses;
  // kDns: what to resolve.
  std::string host;
  std::string port;
  // kDns: the authority of every address's channel ("host:port"); empty otherwise.
  std::string authority;
};

// Parses a gRPC target string. InvalidArgument (naming disaggregation.prefill_target) for an
// empty one, an ipv4:/ipv6: list with a malformed entry, or a dns target without a host.
absl::StatusOr<PrefillTarget> ParsePrefillTarget(const std::string& target);

// Resolves a kDns target: its addresses as channel targets, deduplicated, in the resolver's
// order. Unavailable when the name does not resolve.
absl::StatusOr<std::vector<std::string>> ResolveDnsTarget(const PrefillTarget& target);

}  // namespace sieve::server

#endif  // SIEVE_SERVER_PREFILL_TARGET_H_
