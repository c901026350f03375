#include "server/remote_prefill.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/log.h"

namespace sieve::server {
namespace {

// Writes arriving pages into an import's pages_to_fill.
class ImportWriter final : public KvPageSink {
 public:
  ImportWriter(engine::Engine& engine, const engine::KvImport& import, int32_t first_page,
               int64_t page_bytes)
      : engine_(engine), import_(import), first_page_(first_page), page_bytes_(page_bytes) {}

  absl::Status OnPages(int32_t first_page, int32_t num_pages,
                       absl::Span<const uint8_t> data) override {
    const int64_t at = int64_t{first_page} - first_page_;
    if (at < 0 || at + num_pages > static_cast<int64_t>(import_.pages_to_fill.size()) ||
        static_cast<int64_t>(data.size()) != num_pages * page_bytes_) {
      return absl::DataLossError(absl::StrCat("kv transfer: pages [", first_page, ", +",
                                              num_pages, ") do not fit the import"));
    }
    return engine_.WriteKvPages(absl::MakeConstSpan(import_.pages_to_fill).subspan(at, num_pages),
                                data);
  }

 private:
  engine::Engine& engine_;
  const engine::KvImport& import_;
  const int32_t first_page_;
  const int64_t page_bytes_;
};

// Statuses for which another attempt (maybe on another prefill daemon) can succeed.
bool Retryable(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kDataLoss:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kUnknown:
    // A prefill daemon that refuses this daemon's credentials: another may accept them (e.g.
    // while a token is rotated); when none does, the fallback decides.
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kPermissionDenied:
      return true;
    default:
      return false;
  }
}

double SecondsSince(absl::Time t) { return absl::ToDoubleSeconds(absl::Now() - t); }

}  // namespace

RemotePrefill::RemotePrefill(const DisaggregationConfig& config, std::string model_name,
                             std::unique_ptr<KvTransport> transport, RemotePrefillEvents events)
    : config_(config),
      model_name_(std::move(model_name)),
      transport_(std::move(transport)),
      events_(std::move(events)) {
  for (int i = 0; i < config_.transfer_threads; ++i) threads_.emplace_back([this] { Work(); });
  monitor_ = std::thread([this] { Monitor(); });
}

RemotePrefill::~RemotePrefill() {
  CancelAll();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  monitor_cv_.notify_all();
  for (std::thread& t : threads_) t.join();
  monitor_.join();
}

void RemotePrefill::SetEngine(engine::Engine* engine) {
  engine_.store(engine, std::memory_order_release);
}

bool RemotePrefill::Wants(size_t prompt_tokens) const {
  engine::Engine* engine = engine_.load(std::memory_order_acquire);
  if (engine == nullptr) return false;
  const size_t ps = static_cast<size_t>(engine->model_info().page_size);
  // At least one page to import: (len - 1) / page_size >= 1.
  return prompt_tokens >= static_cast<size_t>(config_.local_prefill_below_tokens) &&
         prompt_tokens > ps;
}

std::shared_ptr<TransferCancellation> RemotePrefill::Start(
    std::vector<int32_t> prompt, absl::Time deadline,
    std::function<void(absl::Status, double)> done) {
  auto cancel = std::make_shared<TransferCancellation>();
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(Job{std::move(prompt), deadline, std::move(done), cancel, absl::Now()});
    ++pending_;
  }
  cv_.notify_one();
  return cancel;
}

void RemotePrefill::CancelAll() {
  std::vector<std::shared_ptr<TransferCancellation>> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Job& job : queue_) all.push_back(job.cancel);
    for (const auto& weak : running_) {
      if (auto c = weak.lock()) all.push_back(std::move(c));
    }
  }
  for (const auto& c : all) c->Cancel();
}

void RemotePrefill::Work() {
  while (true) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and nothing left to answer
      job = std::move(queue_.front());
      queue_.pop_front();
      running_.erase(std::remove_if(running_.begin(), running_.end(),
                                    [](const auto& w) { return w.expired(); }),
                     running_.end());
      running_.push_back(job.cancel);
    }
    double transfer_s = 0;
    const absl::Status status = Run(job, transfer_s);
    job.done(status, transfer_s);
    {
      std::lock_guard<std::mutex> lock(mu_);
      --pending_;
    }
    idle_cv_.notify_all();
  }
}

bool RemotePrefill::WaitIdle(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return idle_cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                           [this] { return pending_ == 0; });
}

void RemotePrefill::Monitor() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    lock.unlock();
    const bool up = transport_->Reachable();
    reachable_.store(up);
    if (events_.on_reachable) events_.on_reachable(up);
    lock.lock();
    monitor_cv_.wait_for(lock, std::chrono::seconds(1), [this] { return stop_; });
  }
}

absl::Status RemotePrefill::Run(const Job& job, double& transfer_s) {
  const absl::Time start = absl::Now();
  // The transfer phase of the request's timings runs from its arrival here (job.queued): the
  // wait for this thread is part of what the request spent before the engine saw it.
  engine::Engine* engine = engine_.load(std::memory_order_acquire);
  auto local = [&](const char* why) {
    if (events_.on_placed) events_.on_placed(false);
    if (LogEnabled(LogLevel::kDebug)) {
      Log(LogLevel::kDebug, absl::StrCat("prefill of ", job.prompt.size(), " tokens is local: ",
                                         why));
    }
    return absl::OkStatus();
  };
  if (engine == nullptr) return absl::UnavailableError("the model is still loading");
  if (job.cancel->cancelled()) return absl::CancelledError("the request was cancelled");
  const KvLayoutInfo layout = LocalKvLayout(*engine, model_name_);
  const int32_t ps = layout.page_size;
  const int32_t pages = (static_cast<int32_t>(job.prompt.size()) - 1) / ps;
  if (pages < 1) return local("shorter than two pages");
  std::vector<int32_t> tokens(job.prompt.begin(), job.prompt.begin() + int64_t{pages} * ps);
  absl::StatusOr<engine::KvImport> import = engine->BeginKvImport(tokens);
  if (!import.ok()) {
    if (import.status().code() == absl::StatusCode::kUnavailable) return import.status();
    return local("no KV pages free for an import");
  }
  const int32_t first_page = import->cached_tokens / ps;
  if (first_page == pages) {
    (void)engine->AbortKvImport(import->id);
    return local("every page is cached here");
  }
  RemotePrefillRequest request;
  request.tokens = std::move(tokens);
  request.first_page = first_page;
  request.layout = layout;
  request.deadline =
      std::min(job.deadline, start + absl::Seconds(config_.transfer_timeout_s));
  ImportWriter writer(*engine, *import, first_page, layout.page_bytes);

  absl::Status last;
  for (int attempt = 1; attempt <= config_.max_attempts; ++attempt) {
    const absl::Time t0 = absl::Now();
    if (events_.on_in_flight) events_.on_in_flight(+1);
    absl::StatusOr<RemotePrefillResult> result = transport_->Prefill(request, writer, *job.cancel);
    if (events_.on_in_flight) events_.on_in_flight(-1);
    if (events_.on_transfer) {
      events_.on_transfer(result.ok() ? result->bytes : 0, SecondsSince(t0), result.ok());
    }
    if (result.ok()) {
      (void)engine->CommitKvImport(import->id);
      transfer_s = SecondsSince(job.queued);
      if (events_.on_placed) events_.on_placed(true);
      if (LogEnabled(LogLevel::kDebug)) {
        Log(LogLevel::kDebug,
            absl::StrCat("remote prefill of ", job.prompt.size(), " tokens on ", result->peer,
                         ": ", result->pages, " pages, ", result->bytes, " bytes in ",
                         transfer_s, " s (attempt ", attempt, ")"));
      }
      return absl::OkStatus();
    }
    last = result.status();
    if (job.cancel->cancelled()) break;
    if (!Retryable(last) || attempt == config_.max_attempts || absl::Now() >= request.deadline) {
      break;
    }
    if (events_.on_retry) events_.on_retry();
    Log(LogLevel::kWarning, absl::StrCat("remote prefill attempt ", attempt, " failed (",
                                         last.ToString(), "); retrying"));
    absl::SleepFor(absl::Milliseconds(20 * attempt));
  }
  (void)engine->AbortKvImport(import->id);
  transfer_s = SecondsSince(job.queued);
  if (job.cancel->cancelled()) return absl::CancelledError("the request was cancelled");
  if (absl::Now() >= job.deadline) return absl::DeadlineExceededError("the deadline passed");
  Log(LogLevel::kWarning, absl::StrCat("remote prefill of ", job.prompt.size(),
                                       " tokens failed: ", last.ToString(),
                                       config_.fallback == "local" ? "; prefilling locally" : ""));
  if (config_.fallback == "local" && last.code() != absl::StatusCode::kFailedPrecondition) {
    return local("the remote prefill failed");
  }
  if (last.code() == absl::StatusCode::kUnauthenticated ||
      last.code() == absl::StatusCode::kPermissionDenied) {
    // The client authenticated with this daemon; what failed is this daemon's own credentials
    // with the prefill tier: a deployment problem, reported as such (not as the client's).
    return absl::FailedPreconditionError(last.message());
  }
  return last;
}

}  // namespace sieve::server
