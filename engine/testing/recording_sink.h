// RecordingSink: a RequestSink for tests that records what the engine streams to one request and
// counts breaches of the sink contract (calls after OnFinish, empty deltas). Thread-safe.
#ifndef SIEVE_ENGINE_TESTING_RECORDING_SINK_H_
#define SIEVE_ENGINE_TESTING_RECORDING_SINK_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "engine/serving/request.h"

namespace sieve::engine::testing {

class RecordingSink : public RequestSink {
 public:
  void OnTokens(const TokenDelta& delta) override {
    std::function<void(size_t)> hook;
    size_t n = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finishes_ > 0) ++calls_after_finish_;
      if (delta.token_ids.empty()) ++empty_deltas_;
      tokens_.insert(tokens_.end(), delta.token_ids.begin(), delta.token_ids.end());
      logprobs_.insert(logprobs_.end(), delta.logprobs.begin(), delta.logprobs.end());
      text_ += delta.text;
      n = tokens_.size();
      hook = on_tokens_;
    }
    cv_.notify_all();
    if (hook) hook(n);
  }
  void OnFinish(const RequestOutcome& outcome) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++finishes_;
      outcome_ = outcome;
    }
    cv_.notify_all();
  }

  // Waits for OnFinish; false after `timeout`.
  bool WaitFinished(absl::Duration timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [this] { return finishes_ > 0; });
  }
  // Waits until `n` tokens arrived or the request finished; false after `timeout`.
  bool WaitTokens(size_t n, absl::Duration timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                        [&] { return tokens_.size() >= n || finishes_ > 0; });
  }
  // Called with the number of tokens so far after each OnTokens, on the engine's thread.
  void set_on_tokens(std::function<void(size_t)> f) {
    std::lock_guard<std::mutex> lock(mu_);
    on_tokens_ = std::move(f);
  }

  std::vector<int32_t> tokens() const {
    std::lock_guard<std::mutex> l(mu_);
    return tokens_;
  }
  std::string text() const {
    std::lock_guard<std::mutex> l(mu_);
    return text_;
  }
  std::vector<TokenLogprob> logprobs() const {
    std::lock_guard<std::mutex> l(mu_);
    return logprobs_;
  }
  RequestOutcome outcome() const {
    std::lock_guard<std::mutex> l(mu_);
    return outcome_;
  }
  int finishes() const {
    std::lock_guard<std::mutex> l(mu_);
    return finishes_;
  }
  // OnTokens calls after OnFinish, plus deltas without a token: both break the sink contract.
  int contract_breaches() const {
    std::lock_guard<std::mutex> l(mu_);
    return calls_after_finish_ + empty_deltas_;
  }
  int calls_after_finish() const {
    std::lock_guard<std::mutex> l(mu_);
    return calls_after_finish_;
  }
  int empty_deltas() const {
    std::lock_guard<std::mutex> l(mu_);
    return empty_deltas_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int32_t> tokens_;
  std::vector<TokenLogprob> logprobs_;
  std::string text_;
  RequestOutcome outcome_;
  int finishes_ = 0;
  int calls_after_finish_ = 0;
  int empty_deltas_ = 0;
  std::function<void(size_t)> on_tokens_;
};

}  // namespace sieve::engine::testing

#endif  // SIEVE_ENGINE_TESTING_RECORDING_SINK_H_
