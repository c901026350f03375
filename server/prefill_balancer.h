// PrefillBalancer: which prefill daemon a decode daemon sends its next remote prefill to
// (disaggregated serving, docs/disaggregation.md). Transport-neutral: a peer is a string (for
// the gRPC transport, one address the prefill target resolves to).
//
// Each peer has a load estimate in prompt tokens:
//   in flight here: the tokens this decode daemon asked the peer to prefill whose attempt has not
//     ended (Pick() adds them, End() takes them off), plus
//   reported: the prefill queue (waiting_tokens) the peer reported in the header of its latest
//     transfer. The peer drains it while nothing is heard from it, so the report ages: it is
//     halved every `report_half_life` and rounded down to whole tokens (a report of 10,000
//     tokens is gone after 14 half-lives).
// Pick() takes the least-loaded peer among the best usable ones; ties go round-robin (in peer
// order, from after the previous pick). "Best usable" ranks peers by the caller's tier (e.g. 0
// connected, 1 connecting, 2 failing), and within a tier puts a peer whose last attempt failed
// through its own fault within `failure_hold` behind the others, so that a retry goes to another
// daemon when one is there.
//
// Thread-safety: every method may be called from any thread.
#ifndef SIEVE_SERVER_PREFILL_BALANCER_H_
#define SIEVE_SERVER_PREFILL_BALANCER_H_

#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"

namespace sieve::server {

class PrefillBalancer {
 public:
  struct Options {
    // How fast a reported queue ages (halved once per this).
    absl::Duration report_half_life = absl::Seconds(2);
    // How long a peer whose attempt failed through its fault ranks behind the others.
    absl::Duration failure_hold = absl::Seconds(2);
  };

  // One peer's state, for tests, logs and the transport.
  struct PeerLoad {
    std::string peer;
    int64_t estimate = 0;          // tokens: in_flight_tokens + the aged report
    int64_t in_flight_tokens = 0;  // tokens of attempts in flight from here
    int32_t in_flight = 0;         // attempts in flight from here
    int64_t reported_tokens = 0;   // the latest report, not aged
    int64_t picks = 0;             // attempts sent to it since it appeared
  };

  PrefillBalancer() : PrefillBalancer(Options{}) {}
  explicit PrefillBalancer(Options options) : options_(options) {}

  // Replaces the set of peers (e.g. after the target was resolved again), in the order ties
  // rotate through. Peers that stay keep their state; attempts in flight on a peer that went away
  // end harmlessly.
  void SetPeers(const std::vector<std::string>& peers);

  // The current peers, in order.
  std::vector<std::string> peers() const;

  // Picks the peer for an attempt at prefilling `tokens` tokens and counts the attempt in flight
  // there (End() must follow). `tier(peer)` ranks peers for usability, lower first (it runs under
  // this object's lock: it must be quick and must not call back). nullopt when there is no peer.
  std::optional<std::string> Pick(int64_t tokens, const std::function<int(const std::string&)>& tier,
                                  absl::Time now);

  // Ends an attempt Pick() started on `peer` with `tokens`. `reported_waiting_tokens`: the queue
  // the peer reported in this attempt, if it got that far. `peer_fault`: the attempt failed
  // through the peer (connection lost, stalled, corrupt data), not through a cancellation.
  void End(const std::string& peer, int64_t tokens, std::optional<int64_t> reported_waiting_tokens,
           bool peer_fault, absl::Time now);

  // Every peer's state at `now`, in peer order.
  std::vector<PeerLoad> Loads(absl::Time now) const;

 private:
  struct Peer {
    std::string name;
    int64_t in_flight_tokens = 0;
    int32_t in_flight = 0;
    int64_t reported_tokens = 0;
    absl::Time reported_at = absl::InfinitePast();
    absl::Time failed_at = absl::InfinitePast();
    int64_t picks = 0;
  };

  int64_t Estimate(const Peer& p, absl::Time now) const;
  Peer* Find(const std::string& name);

  const Options options_;
  mutable std::mutex mu_;
  std::vector<Peer> peers_;  // guarded by mu_
  size_t next_ = 0;          // where the round-robin of ties resumes; guarded by mu_
};

}  // namespace sieve::server

#endif  // SIEVE_SERVER_PREFILL_BALANCER_H_
