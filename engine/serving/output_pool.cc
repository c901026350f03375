#include "engine/serving/output_pool.h"

#include <algorithm>
#include <chrono>
#include <string_view>
#include <utility>

#include "engine/serving/thread_name.h"

namespace sieve::engine {

RequestOutput::RequestOutput(const RequestSpec& spec, absl::Span<const int32_t> eos_ids,
                             const Tokenizer& tokenizer)
    : sink_(spec.sink),
      criteria_(spec.stop),
      stop_(spec.stop, eos_ids),
      decoder_(tokenizer, /*skip_special_tokens=*/true),
      logprobs_(spec.sampling.return_logprob || spec.sampling.top_logprobs > 0) {}

OutputPool::OutputPool(int32_t threads, EngineObserver* observer, Callbacks callbacks)
    : observer_(observer), callbacks_(std::move(callbacks)) {
  for (int32_t i = 0; i < threads; ++i) workers_.push_back(std::make_unique<Worker>());
  for (auto& w : workers_) {
    Worker* raw = w.get();
    raw->thread = std::thread([this, raw] { Loop(*raw); });
  }
}

OutputPool::~OutputPool() {
  for (auto& w : workers_) {
    {
      std::lock_guard<std::mutex> lock(w->mu);
      w->stop = true;
    }
    w->cv.notify_one();
  }
  for (auto& w : workers_) w->thread.join();
}

std::vector<OutputPool::Event>& OutputPool::StagedFor(RequestId id) {
  if (workers_.empty()) return inline_staged_;
  return workers_[id % workers_.size()]->staged;
}

void OutputPool::StageToken(RequestOutput* out, int32_t token, float logprob,
                            std::vector<std::pair<int32_t, float>> top, double decode_s) {
  Event e;
  e.out = out;
  e.token = token;
  e.logprob = logprob;
  e.top = std::move(top);
  e.decode_s = decode_s;
  StagedFor(out->id).push_back(std::move(e));
}

void OutputPool::StageFinish(std::unique_ptr<RequestOutput> out, RequestOutcome outcome) {
  Event e;
  e.out = out.get();
  e.owned = std::move(out);
  e.outcome = std::make_unique<RequestOutcome>(std::move(outcome));
  StagedFor(e.out->id).push_back(std::move(e));
}

void OutputPool::Flush() {
  if (workers_.empty()) {
    // Inline: a sink may be called here; the vector is ours alone (callbacks never stage).
    for (Event& e : inline_staged_) Process(e);
    inline_staged_.clear();
    return;
  }
  for (auto& w : workers_) {
    if (w->staged.empty()) continue;
    bool was_empty;
    {
      std::lock_guard<std::mutex> lock(w->mu);
      was_empty = w->queue.empty();
      if (was_empty) {
        w->queue.swap(w->staged);
      } else {
        for (Event& e : w->staged) w->queue.push_back(std::move(e));
      }
    }
    w->staged.clear();
    if (was_empty) w->cv.notify_one();
  }
}

void OutputPool::Loop(Worker& w) {
  NameThisThread("sieve-output");
  std::vector<Event> batch;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(w.mu);
      w.cv.wait(lock, [&w] { return w.stop || !w.queue.empty(); });
      if (w.queue.empty()) return;  // stopping and everything handed over is done
      batch.swap(w.queue);
    }
    w.busy_since_ns.store(std::chrono::steady_clock::now().time_since_epoch().count());
    for (Event& e : batch) Process(e);
    batch.clear();
    w.busy_since_ns.store(0);
  }
}

int64_t OutputPool::BusySinceNs() const {
  int64_t oldest = 0;
  for (const auto& w : workers_) {
    const int64_t since = w->busy_since_ns.load();
    if (since != 0 && (oldest == 0 || since < oldest)) oldest = since;
  }
  return oldest;
}

void OutputPool::Process(Event& e) {
  if (e.outcome != nullptr) {
    ProcessFinish(e);
  } else {
    ProcessToken(e);
  }
}

void OutputPool::ProcessToken(Event& e) {
  RequestOutput& out = *e.out;
  // After a stop string the scheduler may have sampled a token or two more: they are not output.
  if (out.stop_.finish_reason() != FinishReason::kNone) return;
  // An id the tokenizer does not know (padding rows of the vocabulary) adds no text.
  absl::StatusOr<std::string> piece = out.decoder_.Push(e.token);
  const std::string text = piece.ok() ? *std::move(piece) : std::string();
  if (!out.criteria_.stop_strings.empty()) out.text_ += text;
  StopChecker::Step step = out.stop_.Push(e.token, text);
  if (step.finish != FinishReason::kNone) {
    // The decoder may hold the first bytes of a character the stream ended inside.
    step.emit += out.stop_.Flush();
    if (step.finish == FinishReason::kLength) step.emit += out.decoder_.Flush();
  }
  TokenDelta delta;
  delta.token_ids.push_back(e.token);
  delta.text = std::move(step.emit);
  if (out.logprobs_) delta.logprobs.push_back(TokenLogprob{e.token, e.logprob, std::move(e.top)});
  ++out.streamed_;
  out.streamed_decode_s_ = e.decode_s;
  out.sink_->OnTokens(delta);
  if (step.finish != FinishReason::kStop) return;
  const std::vector<int32_t>& ids = out.criteria_.stop_token_ids;
  if (std::find(ids.begin(), ids.end(), e.token) != ids.end()) {
    out.matched_stop_token_ = e.token;  // the scheduler ended the request on this token itself
    return;
  }
  // A stop string completed first (ties: the one starting earliest), as StopChecker decides.
  size_t best_end = std::string::npos, best_pos = std::string::npos;
  for (const std::string& s : out.criteria_.stop_strings) {
    if (s.empty()) continue;
    const size_t pos = out.text_.find(s);
    if (pos == std::string::npos) continue;
    const size_t end = pos + s.size();
    if (best_end == std::string::npos || end < best_end || (end == best_end && pos < best_pos)) {
      best_end = end;
      best_pos = pos;
      out.matched_stop_ = s;
    }
  }
  if (callbacks_.stop) callbacks_.stop(out.id, out.streamed_);
}

void OutputPool::ProcessFinish(Event& e) {
  RequestOutput& out = *e.out;
  RequestOutcome& o = *e.outcome;
  if (out.stop_.finish_reason() != FinishReason::kNone) {
    // What was streamed decides: a stop string may have ended the output before the scheduler
    // knew (it then ended the request as kStop, or a cancellation or error came first).
    o.finish = out.stop_.finish_reason();
    o.status = absl::OkStatus();
    if (o.generated_tokens > out.streamed_) {
      o.generated_tokens = out.streamed_;
      o.timings.decode_s = out.streamed_decode_s_;
    }
    o.matched_stop = out.matched_stop_;
    o.matched_stop_token = out.matched_stop_token_;
  }
  out.sink_->OnFinish(o);
  if (observer_ != nullptr) observer_->OnFinished(o);
  // Its last event: nothing of the request is used after this.
  e.owned.reset();
  e.outcome.reset();
  if (callbacks_.delivered) callbacks_.delivered();
}

}  // namespace sieve::engine
