#include "server/prefill_balancer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

namespace sieve::server {

void PrefillBalancer::SetPeers(const std::vector<std::string>& peers) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Peer> next;
  next.reserve(peers.size());
  for (const std::string& name : peers) {
    Peer* old = Find(name);
    next.push_back(old != nullptr ? std::move(*old) : Peer{name});
    next.back().name = name;
  }
  peers_ = std::move(next);
  if (next_ >= peers_.size()) next_ = 0;
}

std::vector<std::string> PrefillBalancer::peers() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const Peer& p : peers_) out.push_back(p.name);
  return out;
}

PrefillBalancer::Peer* PrefillBalancer::Find(const std::string& name) {
  for (Peer& p : peers_) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

int64_t PrefillBalancer::Estimate(const Peer& p, absl::Time now) const {
  int64_t reported = 0;
  if (p.reported_tokens > 0) {
    const double half_lives = std::max(0.0, absl::FDivDuration(now - p.reported_at, options_.report_half_life));
    reported = static_cast<int64_t>(
        std::floor(static_cast<double>(p.reported_tokens) * std::exp2(-half_lives)));
  }
  return p.in_flight_tokens + reported;
}

std::optional<std::string> PrefillBalancer::Pick(
    int64_t tokens, const std::function<int(const std::string&)>& tier, absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t n = peers_.size();
  if (n == 0) return std::nullopt;
  // Rank: (the caller's tier, recently failed), then the load; ties by distance from next_.
  int best_rank = std::numeric_limits<int>::max();
  int64_t best_load = std::numeric_limits<int64_t>::max();
  size_t best = 0;
  for (size_t k = 0; k < n; ++k) {
    const size_t i = (next_ + k) % n;
    const Peer& p = peers_[i];
    const bool failed_lately = now - p.failed_at < options_.failure_hold;
    const int rank = tier(p.name) * 2 + (failed_lately ? 1 : 0);
    const int64_t load = Estimate(p, now);
    if (rank < best_rank || (rank == best_rank && load < best_load)) {
      best_rank = rank;
      best_load = load;
      best = i;
    }
  }
  Peer& chosen = peers_[best];
  chosen.in_flight_tokens += tokens;
  ++chosen.in_flight;
  ++chosen.picks;
  next_ = (best + 1) % n;
  return chosen.name;
}

void PrefillBalancer::End(const std::string& peer, int64_t tokens,
                          std::optional<int64_t> reported_waiting_tokens, bool peer_fault,
                          absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  Peer* p = Find(peer);
  if (p == nullptr) return;  // resolved away meanwhile
  p->in_flight_tokens = std::max<int64_t>(0, p->in_flight_tokens - tokens);
  p->in_flight = std::max(0, p->in_flight - 1);
  if (reported_waiting_tokens.has_value()) {
    p->reported_tokens = std::max<int64_t>(0, *reported_waiting_tokens);
    p->reported_at = now;
  }
  if (peer_fault) p->failed_at = now;
}

std::vector<PrefillBalancer::PeerLoad> PrefillBalancer::Loads(absl::Time now) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<PeerLoad> out;
  for (const Peer& p : peers_) {
    out.push_back(PeerLoad{p.name, Estimate(p, now), p.in_flight_tokens, p.in_flight,
                           p.reported_tokens, p.picks});
  }
  return out;
}

}  // namespace sieve::server
