#include "engine/testing/churn.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <queue>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace sieve::engine::testing {
namespace {

using Clock = std::chrono::steady_clock;

enum class Fate {
  kRun,            // to the end
  kCancelNow,      // right after Submit
  kCancelLater,    // after a random delay
  kCancelFirst,    // from the sink, at the first token
  kCancelDecode,   // from the sink, at a random later token
  kCancelLast,     // from the sink, one token before max_tokens
  kDeadline,       // a random deadline
};
constexpr int kFates = 7;

// One request's sink: counts what arrives, cancels itself at its chosen token.
class ChurnSink final : public RequestSink {
 public:
  ChurnSink(Engine& engine, int32_t cancel_at, std::atomic<int32_t>& live,
            std::condition_variable& live_cv, std::mutex& live_mu)
      : engine_(engine), cancel_at_(cancel_at), live_(live), live_cv_(live_cv), live_mu_(live_mu) {}

  void OnTokens(const TokenDelta& delta) override {
    if (finished_.load()) breaches_.fetch_add(1);
    if (delta.token_ids.empty()) breaches_.fetch_add(1);
    const int32_t n = tokens_.fetch_add(static_cast<int32_t>(delta.token_ids.size())) +
                      static_cast<int32_t>(delta.token_ids.size());
    if (cancel_at_ > 0 && n >= cancel_at_ && !want_cancel_.exchange(true)) CancelIfKnown();
  }
  void OnFinish(const RequestOutcome& outcome) override {
    if (finished_.exchange(true)) breaches_.fetch_add(1);
    {
      std::lock_guard<std::mutex> lock(outcome_mu_);
      outcome_ = outcome;
    }
    {
      std::lock_guard<std::mutex> lock(live_mu_);
      live_.fetch_sub(1);
    }
    live_cv_.notify_all();
  }

  // The id Submit returned; cancels now if the sink asked for it before the id was known.
  void SetId(RequestId id) {
    id_.store(id);
    if (want_cancel_.load()) engine_.Cancel(id);
  }
  // Cancels the request now (or as soon as its id is known).
  void Cancel() {
    want_cancel_.store(true);
    CancelIfKnown();
  }

  bool finished() const { return finished_.load(); }
  int64_t breaches() const { return breaches_.load(); }
  int32_t tokens() const { return tokens_.load(); }
  RequestOutcome outcome() const {
    std::lock_guard<std::mutex> lock(outcome_mu_);
    return outcome_;
  }

 private:
  void CancelIfKnown() {
    const RequestId id = id_.load();
    if (id != 0) engine_.Cancel(id);
  }

  Engine& engine_;
  const int32_t cancel_at_;  // 0: never from the sink
  std::atomic<int32_t>& live_;
  std::condition_variable& live_cv_;
  std::mutex& live_mu_;
  std::atomic<RequestId> id_{0};
  std::atomic<bool> want_cancel_{false};
  std::atomic<bool> finished_{false};
  std::atomic<int32_t> tokens_{0};
  std::atomic<int64_t> breaches_{0};
  mutable std::mutex outcome_mu_;
  RequestOutcome outcome_;
};

// Cancels sinks at given times, on its own thread.
class Canceller {
 public:
  Canceller() : thread_([this] { Loop(); }) {}
  ~Canceller() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  void At(Clock::time_point when, std::shared_ptr<ChurnSink> sink) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push({when, std::move(sink)});
    }
    cv_.notify_one();
  }

 private:
  struct Item {
    Clock::time_point when;
    std::shared_ptr<ChurnSink> sink;
    bool operator>(const Item& o) const { return when > o.when; }
  };
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      if (stop_ && queue_.empty()) return;
      if (queue_.empty()) {
        cv_.wait(lock);
        continue;
      }
      const Clock::time_point when = queue_.top().when;
      if (Clock::now() < when && !stop_) {
        cv_.wait_until(lock, when);
        continue;
      }
      std::shared_ptr<ChurnSink> sink = queue_.top().sink;
      queue_.pop();
      lock.unlock();
      sink->Cancel();
      sink.reset();
      lock.lock();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::priority_queue<Item, std::vector<Item>, std::greater<>> queue_;
  bool stop_ = false;
  std::thread thread_;
};

int64_t CountEntries(const char* dir) {
  std::error_code ec;
  int64_t n = 0;
  for (auto it = std::filesystem::directory_iterator(dir, ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    ++n;
  }
  return ec ? -1 : n;
}

}  // namespace

int64_t CountThreads() { return CountEntries("/proc/self/task"); }
int64_t CountOpenFds() { return CountEntries("/proc/self/fd"); }

EngineConfig ChurnEngineConfig(const std::string& model_dir, int32_t output_workers) {
  EngineConfig c;
  c.model.directory = model_dir;
  c.model.cpu_threads = 1;
  // 40 pages of 16 tokens: about 3 requests of the largest size (200 tokens) while 24 may run,
  // so running requests run out of pages and preempt each other.
  c.kv_cache.num_pages = 40;
  c.kv_cache.page_size_tokens = 16;
  c.scheduler.max_running_requests = 24;
  c.scheduler.max_queued_requests = 256;
  c.scheduler.max_batch_tokens = 256;
  c.scheduler.prefill_chunk_tokens = 32;  // long prompts prefill over several steps
  c.pools.output_workers = output_workers;
  return c;
}

bool ChurnResult::AtBaseline() const {
  return load_after.running_prefill == 0 && load_after.running_decode == 0 &&
         load_after.waiting == 0 && load_after.kv_pages_used == load_after.kv_pages_cached &&
         load_after.kv_pages_used + load_after.kv_pages_free ==
             load_before.kv_pages_used + load_before.kv_pages_free &&
         threads_after == threads_before && fds_after == fds_before && missing_finishes == 0 &&
         sinks_still_referenced == 0 && contract_breaches == 0;
}

std::string ChurnResult::ToMarkdown() const {
  std::string s = "| figure | value |\n|---|---|\n";
  auto row = [&s](const std::string& name, const auto& value) {
    absl::StrAppend(&s, "| ", name, " | ", value, " |\n");
  };
  row("requests submitted / rejected", absl::StrCat(submitted, " / ", rejected));
  row("completed / cancelled (incl. deadlines) / errors",
      absl::StrCat(completed, " / ", cancelled, " / ", errors));
  row("requests with a deadline", deadlines);
  row("cancelled while queued (never scheduled)", ended_queued);
  row("cancelled while prefilling (no token yet)", ended_prefilling);
  row("cancelled at the first token", ended_first_token);
  row("cancelled while decoding", ended_decoding);
  row("cancelled in the last step (one token short)", ended_last_step);
  row("cancelled after a preemption", ended_preempted);
  row("preemptions (all requests)", preemptions);
  row("tokens streamed", tokens);
  row("sink contract breaches / missing OnFinish / sinks still held",
      absl::StrCat(contract_breaches, " / ", missing_finishes, " / ", sinks_still_referenced));
  row("running + waiting before -> after",
      absl::StrCat(load_before.running_prefill + load_before.running_decode + load_before.waiting,
                   " -> ",
                   load_after.running_prefill + load_after.running_decode + load_after.waiting));
  row("KV pages held by requests (used - cached) before -> after",
      absl::StrCat(load_before.kv_pages_used - load_before.kv_pages_cached, " -> ",
                   load_after.kv_pages_used - load_after.kv_pages_cached));
  row("threads before -> after", absl::StrCat(threads_before, " -> ", threads_after));
  row("open file descriptors before -> after", absl::StrCat(fds_before, " -> ", fds_after));
  row("wall time (s)", absl::StrFormat("%.1f", seconds));
  row("back at baseline", AtBaseline() ? "yes" : "NO");
  return s;
}

absl::StatusOr<ChurnResult> RunChurn(Engine& engine, const ChurnOptions& options) {
  ChurnResult result;
  result.load_before = engine.load();
  result.threads_before = CountThreads();
  result.fds_before = CountOpenFds();
  const Clock::time_point start = Clock::now();
  std::mt19937_64 rng(options.seed);
  const int32_t vocab = static_cast<int32_t>(engine.model_config().vocab_size);
  std::atomic<int32_t> live{0};
  std::mutex live_mu;
  std::condition_variable live_cv;
  std::vector<std::shared_ptr<ChurnSink>> sinks;
  std::vector<int32_t> max_tokens_of;
  sinks.reserve(options.requests);
  {
    Canceller canceller;
    for (int64_t i = 0; i < options.requests; ++i) {
      {
        std::unique_lock<std::mutex> lock(live_mu);
        live_cv.wait(lock, [&] { return live.load() < options.max_in_flight; });
      }
      RequestSpec spec;
      const int32_t prompt_len = std::uniform_int_distribution<int32_t>(
          options.min_prompt_tokens, options.max_prompt_tokens)(rng);
      for (int32_t t = 0; t < prompt_len; ++t) {
        spec.prompt.push_back(std::uniform_int_distribution<int32_t>(2, vocab - 1)(rng));
      }
      const int32_t max_tokens = std::uniform_int_distribution<int32_t>(
          std::max(options.min_max_tokens, 2), options.max_max_tokens)(rng);
      spec.stop.max_tokens = max_tokens;
      spec.stop.ignore_eos = true;
      spec.sampling.temperature = 0;
      spec.priority = std::uniform_int_distribution<int>(0, 3)(rng) == 0 ? 1 : 0;
      const Fate fate = static_cast<Fate>(std::uniform_int_distribution<int>(0, kFates - 1)(rng));
      int32_t cancel_at = 0;
      if (fate == Fate::kCancelFirst) cancel_at = 1;
      if (fate == Fate::kCancelDecode) {
        cancel_at = std::uniform_int_distribution<int32_t>(2, std::max(2, max_tokens - 1))(rng);
      }
      if (fate == Fate::kCancelLast) cancel_at = max_tokens - 1;
      double delay_s = 0;
      if (fate == Fate::kCancelLater) {
        delay_s = std::uniform_real_distribution<double>(0, options.max_cancel_delay_s)(rng);
      }
      if (fate == Fate::kDeadline) {
        delay_s = std::uniform_real_distribution<double>(0, options.max_deadline_s)(rng);
        spec.deadline = absl::Now() + absl::Seconds(delay_s);
        ++result.deadlines;
      }
      auto sink = std::make_shared<ChurnSink>(engine, cancel_at, live, live_cv, live_mu);
      spec.sink = sink;
      live.fetch_add(1);
      absl::StatusOr<RequestId> id = engine.Submit(std::move(spec));
      if (!id.ok()) {
        live.fetch_sub(1);
        ++result.rejected;
        continue;
      }
      ++result.submitted;
      sink->SetId(*id);
      if (fate == Fate::kCancelNow) sink->Cancel();
      if (fate == Fate::kCancelLater) {
        canceller.At(Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(delay_s)),
                     sink);
      }
      sinks.push_back(std::move(sink));
      max_tokens_of.push_back(max_tokens);
    }
  }  // the canceller is done: every delayed cancel was issued
  if (!engine.WaitIdle(absl::Minutes(1))) {
    return absl::DeadlineExceededError(absl::StrCat(
        "the engine did not go idle within a minute after ", result.submitted, " requests"));
  }
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  for (size_t i = 0; i < sinks.size(); ++i) {
    const ChurnSink& sink = *sinks[i];
    result.contract_breaches += sink.breaches();
    result.tokens += sink.tokens();
    if (!sink.finished()) {
      ++result.missing_finishes;
      continue;
    }
    const RequestOutcome o = sink.outcome();
    result.preemptions += o.preemptions;
    if (o.finish == FinishReason::kError) ++result.errors;
    if (o.finish == FinishReason::kLength || o.finish == FinishReason::kEos) ++result.completed;
    if (o.finish != FinishReason::kCancelled) continue;
    ++result.cancelled;
    const bool scheduled = o.timings.queue_s < o.timings.total_s;
    if (o.generated_tokens == 0) {
      (scheduled ? result.ended_prefilling : result.ended_queued) += 1;
    } else if (o.generated_tokens == 1) {
      ++result.ended_first_token;
    } else if (o.generated_tokens == max_tokens_of[i] - 1) {
      ++result.ended_last_step;
    } else {
      ++result.ended_decoding;
    }
    if (o.preemptions > 0) ++result.ended_preempted;
  }
  // The engine lets go of each sink when it delivered OnFinish (the output thread drops the
  // request's state right after): give the last one a moment.
  const Clock::time_point until = Clock::now() + std::chrono::seconds(5);
  while (true) {
    result.sinks_still_referenced = 0;
    for (const auto& sink : sinks) result.sinks_still_referenced += sink.use_count() > 1 ? 1 : 0;
    if (result.sinks_still_referenced == 0 || Clock::now() > until) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  result.load_after = engine.load();
  result.threads_after = CountThreads();
  result.fds_after = CountOpenFds();
  return result;
}

}  // namespace sieve::engine::testing
