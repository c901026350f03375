#include "engine/serving/stop_checker.h"

#include <algorithm>
#include <string>
#include <string_view>
#include <utility>

namespace sieve::engine {

StopChecker::StopChecker(StopCriteria criteria, absl::Span<const int32_t> eos_ids)
    : criteria_(std::move(criteria)), eos_ids_(eos_ids.begin(), eos_ids.end()) {
  auto& stops = criteria_.stop_strings;
  stops.erase(std::remove_if(stops.begin(), stops.end(),
                             [](const std::string& s) { return s.empty(); }),
              stops.end());
}

StopChecker::Step StopChecker::Finish(FinishReason reason) {
  finish_ = reason;
  Step step;
  step.emit = std::move(pending_);
  pending_.clear();
  step.finish = reason;
  return step;
}

StopChecker::Step StopChecker::Push(int32_t id, std::string_view text_delta) {
  if (finish_ != FinishReason::kNone) return Step{std::string(), finish_};
  ++num_tokens_;
  auto contains = [id](const std::vector<int32_t>& ids) {
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  };
  if (!criteria_.ignore_eos && contains(eos_ids_)) return Finish(FinishReason::kEos);
  if (contains(criteria_.stop_token_ids)) return Finish(FinishReason::kStop);

  pending_.append(text_delta);
  // A match can only start inside pending_: anything earlier was released because no suffix
  // starting there could begin a stop string. Pick the earliest-ending match, then earliest-start.
  size_t best_start = std::string::npos;
  size_t best_end = std::string::npos;
  for (const std::string& stop : criteria_.stop_strings) {
    const size_t pos = pending_.find(stop);
    if (pos == std::string::npos) continue;
    const size_t end = pos + stop.size();
    if (end < best_end || (end == best_end && pos < best_start)) {
      best_start = pos;
      best_end = end;
    }
  }
  if (best_start != std::string::npos) {
    pending_.resize(best_start);
    return Finish(FinishReason::kStop);
  }
  if (num_tokens_ >= criteria_.max_tokens) return Finish(FinishReason::kLength);

  const size_t hold = HoldBackLength();
  Step step;
  step.emit = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return step;
}

std::string StopChecker::Flush() {
  std::string out = std::move(pending_);
  pending_.clear();
  return out;
}

size_t StopChecker::HoldBackLength() const {
  const std::string_view text(pending_);
  size_t best = 0;
  for (const std::string& stop : criteria_.stop_strings) {
    // Only suffixes longer than the best so far and shorter than the stop string can improve it.
    const size_t max_len = std::min(text.size(), stop.size() - 1);
    for (size_t len = max_len; len > best; --len) {
      if (text.substr(text.size() - len) == std::string_view(stop).substr(0, len)) {
        best = len;
        break;
      }
    }
  }
  return best;
}

}  // namespace sieve::engine
