// sieve_loadgen: a load test for a Sieve daemon. Sends sieve.v1 Generate requests with
// Poisson arrivals and mixed prompt lengths over one gRPC channel, or the same requests as
// streamed OpenAI completions to the daemon's HTTP API (one connection and thread per request),
// or both alternating in one run; measures what the client sees (time to first token,
// inter-token gaps, end-to-end latency) and prints a Markdown report per protocol; see
// LoadgenUsage() in loadgen_lib.cc for the flags.
//
// The schedule (arrival times, prompt lengths, prompts) is drawn up front from --seed, so two
// runs with the same flags send the same requests at the same offsets. Latencies are measured
// from the moment a request is actually sent; an arrival that finds --concurrency requests in
// flight waits for a slot, and that wait is reported separately.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "bench/loadgen_lib.h"
#include "grpcpp/grpcpp.h"
#include "sieve/v1/sieve.grpc.pb.h"

namespace sieve::bench {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::chrono::system_clock::time_point DeadlineIn(double seconds) {
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(
             std::chrono::duration<double>(seconds));
}

std::string CodeName(grpc::StatusCode code) {
  static constexpr const char* kNames[] = {
      "OK",          "CANCELLED",         "UNKNOWN",          "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED", "NOT_FOUND",   "ALREADY_EXISTS",   "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",        "UNAVAILABLE",      "DATA_LOSS",
      "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? kNames[i] : absl::StrCat("CODE_", i);
}

// What the client needs to know about the served model.
struct ModelFacts {
  std::string name;
  int32_t vocab_size = 0;
  int32_t context_length = 0;
  std::optional<int32_t> bos;
  std::vector<int32_t> eos;
};

absl::StatusOr<ModelFacts> FetchModelFacts(v1::Sieve::Stub& stub, const LoadgenOptions& o) {
  grpc::ClientContext ctx;
  ctx.set_wait_for_ready(true);
  ctx.set_deadline(DeadlineIn(o.connect_timeout_s));
  v1::GetModelInfoRequest request;
  request.set_model(o.model);
  v1::ModelInfo info;
  const grpc::Status s = stub.GetModelInfo(&ctx, request, &info);
  if (!s.ok()) {
    return absl::UnavailableError(absl::StrCat("GetModelInfo on ", o.target, ": ",
                                               CodeName(s.error_code()), ": ",
                                               s.error_message()));
  }
  ModelFacts f;
  f.name = info.name();
  f.vocab_size = static_cast<int32_t>(info.vocab_size());
  f.context_length = static_cast<int32_t>(info.context_length());
  if (info.has_bos_token_id()) f.bos = info.bos_token_id();
  f.eos.assign(info.eos_token_ids().begin(), info.eos_token_ids().end());
  if (f.vocab_size < 16) return absl::FailedPreconditionError("model vocabulary too small");
  return f;
}

// One request to send: when, and what.
struct PlannedRequest {
  double arrival_s = 0;  // offset from the start of the run
  int32_t prompt_tokens = 0;
  bool http = false;     // sent to the HTTP API instead of over gRPC
  v1::GenerateRequest request;
};

// Builds prompts of exact token lengths.
class PromptBuilder {
 public:
  PromptBuilder(v1::Sieve::Stub& stub, const LoadgenOptions& o, const ModelFacts& facts)
      : stub_(stub), options_(o), facts_(facts) {}

  // In text mode, finds words that are one token each (pieces of random vocabulary entries
  // that start with a space and round-trip through Tokenize) and the special-token overhead.
  absl::Status Prepare(std::mt19937_64& rng) {
    if (options_.prompt_mode == PromptMode::kTokens) return absl::OkStatus();
    absl::StatusOr<std::vector<int32_t>> empty = Tokenize("", /*special=*/true);
    if (!empty.ok()) return empty.status();
    special_overhead_ = static_cast<int32_t>(empty->size());
    std::uniform_int_distribution<int32_t> id(0, facts_.vocab_size - 1);
    for (int tries = 0; tries < 2048 && words_.size() < 256; ++tries) {
      grpc::ClientContext ctx;
      ctx.set_deadline(DeadlineIn(10));
      v1::DetokenizeRequest req;
      req.set_model(options_.model);
      req.add_token_ids(id(rng));
      v1::DetokenizeResponse resp;
      if (!stub_.Detokenize(&ctx, req, &resp).ok()) continue;
      const std::string& piece = resp.text();
      if (piece.size() < 2 || piece[0] != ' ' ||
          !std::all_of(piece.begin() + 1, piece.end(),
                       [](char c) { return absl::ascii_isalpha(c); })) {
        continue;
      }
      absl::StatusOr<std::vector<int32_t>> ids = Tokenize(piece, /*special=*/false);
      if (ids.ok() && ids->size() == 1) words_.push_back(piece);
    }
    if (words_.size() < 8) {
      return absl::FailedPreconditionError(
          "--prompt-mode text: found fewer than 8 one-token words in the vocabulary; use "
          "--prompt-mode tokens");
    }
    return absl::OkStatus();
  }

  // Builds a request whose prompt is exactly `length` tokens.
  absl::StatusOr<v1::GenerateRequest> Build(int32_t length, uint64_t request_seed,
                                            std::mt19937_64& rng) {
    v1::GenerateRequest r;
    r.set_model(options_.model);
    r.set_request_id(absl::StrCat("loadgen-", request_seed));
    auto* sampling = r.mutable_sampling();
    sampling->set_temperature(options_.temperature);
    sampling->set_seed(request_seed);
    r.mutable_stop()->set_max_tokens(static_cast<uint32_t>(options_.max_tokens));
    r.mutable_stop()->set_ignore_eos(options_.ignore_eos);
    if (options_.prompt_mode == PromptMode::kTokens) {
      std::vector<int32_t> ids = TokenPrompt(length, rng);
      r.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
      return r;
    }
    absl::StatusOr<std::string> text = TextPrompt(length, rng);
    if (!text.ok()) return text.status();
    r.set_text(*text);
    r.set_add_special_tokens(true);
    return r;
  }

 private:
  bool IsSpecial(int32_t id) const {
    return (facts_.bos && id == *facts_.bos) ||
           std::find(facts_.eos.begin(), facts_.eos.end(), id) != facts_.eos.end();
  }

  int32_t RandomId(std::mt19937_64& rng) const {
    std::uniform_int_distribution<int32_t> id(0, facts_.vocab_size - 1);
    int32_t t = id(rng);
    while (IsSpecial(t)) t = id(rng);
    return t;
  }

  // BOS (when the model has one), the shared prefix, then random ids: `length` in all.
  std::vector<int32_t> TokenPrompt(int32_t length, std::mt19937_64& rng) const {
    std::vector<int32_t> ids;
    ids.reserve(length);
    if (facts_.bos) ids.push_back(*facts_.bos);
    std::mt19937_64 prefix_rng(options_.seed ^ 0x5eedf00dULL);
    while (static_cast<int32_t>(ids.size()) < std::min(length, options_.shared_prefix_tokens)) {
      ids.push_back(RandomId(prefix_rng));
    }
    while (static_cast<int32_t>(ids.size()) < length) ids.push_back(RandomId(rng));
    ids.resize(length);
    return ids;
  }

  // Random one-token words, adjusted until Tokenize (with special tokens) gives `length`.
  absl::StatusOr<std::string> TextPrompt(int32_t length, std::mt19937_64& rng) {
    std::uniform_int_distribution<size_t> pick(0, words_.size() - 1);
    std::mt19937_64 prefix_rng(options_.seed ^ 0x5eedf00dULL);
    std::vector<std::string> words;
    const int32_t want_words = std::max(1, length - special_overhead_);
    for (int32_t i = 0; i < want_words; ++i) {
      words.push_back(words_[i < options_.shared_prefix_tokens ? pick(prefix_rng) : pick(rng)]);
    }
    for (int attempt = 0; attempt < 16; ++attempt) {
      std::string text = absl::StrJoin(words, "");
      absl::StatusOr<std::vector<int32_t>> ids = Tokenize(text, /*special=*/true);
      if (!ids.ok()) return ids.status();
      const int32_t got = static_cast<int32_t>(ids->size());
      if (got == length) return text;
      if (got > length && words.size() > 1) {
        words.resize(words.size() - std::min<size_t>(words.size() - 1, got - length));
      } else if (got < length) {
        for (int32_t i = got; i < length; ++i) words.push_back(words_[pick(rng)]);
      } else {
        break;
      }
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "--prompt-mode text: cannot build a prompt of exactly ", length,
        " tokens from one-token words; use --prompt-mode tokens"));
  }

  absl::StatusOr<std::vector<int32_t>> Tokenize(const std::string& text, bool special) {
    grpc::ClientContext ctx;
    ctx.set_deadline(DeadlineIn(30));
    v1::TokenizeRequest req;
    req.set_model(options_.model);
    req.set_text(text);
    req.set_add_special_tokens(special);
    v1::TokenizeResponse resp;
    const grpc::Status s = stub_.Tokenize(&ctx, req, &resp);
    if (!s.ok()) {
      return absl::UnavailableError(
          absl::StrCat("Tokenize: ", CodeName(s.error_code()), ": ", s.error_message()));
    }
    return std::vector<int32_t>(resp.token_ids().begin(), resp.token_ids().end());
  }

  v1::Sieve::Stub& stub_;
  const LoadgenOptions& options_;
  const ModelFacts& facts_;
  int32_t special_overhead_ = 0;
  std::vector<std::string> words_;
};

// Most requests one run may plan (the schedule is drawn up front).
constexpr size_t kMaxPlannedRequests = 1'000'000;

// Draws the whole schedule: Poisson arrival offsets within the bounds, lengths and prompts.
absl::StatusOr<std::vector<PlannedRequest>> Plan(const LoadgenOptions& o, const ModelFacts& facts,
                                                 PromptBuilder& builder) {
  absl::StatusOr<PromptLengthMix> mix = PromptLengthMix::Parse(o.prompt_lengths);
  if (!mix.ok()) return mix.status();
  if (mix->max_length() + o.max_tokens > facts.context_length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "longest prompt (", mix->max_length(), ") + --max-tokens (", o.max_tokens,
        ") exceeds the model's context length ", facts.context_length));
  }
  std::mt19937_64 rng(o.seed);
  std::vector<PlannedRequest> plan;
  double t = 0;
  for (int64_t i = 0; o.requests == 0 || i < o.requests; ++i) {
    t += NextArrivalGap(rng, o.rate);
    if (o.duration_s > 0 && t >= o.duration_s) break;
    if (plan.size() >= kMaxPlannedRequests) {
      return absl::InvalidArgumentError(absl::StrCat(
          "more than ", kMaxPlannedRequests,
          " requests planned; lower --rate or --duration, or set --requests"));
    }
    PlannedRequest p;
    p.arrival_s = t;
    p.prompt_tokens = mix->Sample(rng);
    absl::StatusOr<v1::GenerateRequest> r =
        builder.Build(p.prompt_tokens, o.seed * 1000003ULL + static_cast<uint64_t>(i), rng);
    if (!r.ok()) return r.status();
    p.request = *std::move(r);
    p.http = o.protocol == "http" || (o.protocol == "both" && i % 2 == 1);
    plan.push_back(std::move(p));
  }
  return plan;
}

class Runner;

// A request in flight, over either protocol.
class Pending {
 public:
  virtual ~Pending() = default;
  // Asks the request to stop; it still reports through Runner::Finished.
  virtual void Cancel() = 0;
  // Valid once the request is done.
  virtual const RequestRecord& record() const = 0;
};

// One Generate call: a gRPC client reactor that records what arrives and when.
class Call : public grpc::ClientReadReactor<v1::GenerateResponse>, public Pending {
 public:
  Call(Runner* runner, PlannedRequest planned, double send_delay_s, double timeout_s)
      : runner_(runner), request_(std::move(planned.request)) {
    record_.prompt_tokens = planned.prompt_tokens;
    record_.send_delay_s = send_delay_s;
    context_.set_deadline(DeadlineIn(timeout_s));
  }

  void Start(v1::Sieve::Stub& stub) {
    start_ = Clock::now();
    stub.async()->Generate(&context_, &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void Cancel() override { context_.TryCancel(); }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    const Clock::time_point now = Clock::now();
    const int k = response_.token_ids_size();
    if (k > 0) {
      if (record_.ttft_s < 0) {
        record_.ttft_s = SecondsBetween(start_, now);
      } else {
        const double gap = SecondsBetween(last_token_, now) / k;
        record_.itl_s.insert(record_.itl_s.end(), k, gap);
      }
      record_.output_tokens += k;
      record_.last_token_s = SecondsBetween(start_, now);
      last_token_ = now;
    }
    if (response_.has_complete()) {
      complete_ = true;
      const v1::Completion& c = response_.complete();
      std::string reason = v1::FinishReason_Name(c.finish_reason());
      reason = absl::AsciiStrToLower(absl::StripPrefix(reason, "FINISH_REASON_"));
      record_.finish_reason = reason;
      record_.cached_prompt_tokens = static_cast<int32_t>(c.usage().cached_prompt_tokens());
      record_.server_prompt_tokens = static_cast<int32_t>(c.usage().prompt_tokens());
      record_.server_queue_s = c.timings().queue_seconds();
      record_.server_prefill_s = c.timings().prefill_seconds();
      record_.server_ttft_s = c.timings().time_to_first_token_seconds();
      record_.server_decode_s = c.timings().decode_seconds();
    }
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override;

  const RequestRecord& record() const override { return record_; }

 private:
  Runner* runner_;
  grpc::ClientContext context_;
  v1::GenerateRequest request_;
  v1::GenerateResponse response_;
  Clock::time_point start_, last_token_;
  bool complete_ = false;
  RequestRecord record_;
};

// One streamed POST /v1/completions on its own connection and thread: the same request as
// the gRPC call would send, as OpenAI JSON. Each SSE chunk with text counts as one token's
// arrival (the server sends one per token unless its writer fell behind); the token count comes
// from the usage chunk.
class HttpCall : public Pending {
 public:
  HttpCall(Runner* runner, PlannedRequest planned, double send_delay_s,
           const LoadgenOptions& o)
      : runner_(runner), options_(o) {
    record_.prompt_tokens = planned.prompt_tokens;
    record_.send_delay_s = send_delay_s;
    record_.protocol = "http";
    const v1::GenerateRequest& r = planned.request;
    nlohmann::json body;
    if (!r.model().empty()) body["model"] = r.model();
    if (r.has_token_ids()) {
      body["prompt"] = std::vector<int32_t>(r.token_ids().ids().begin(), r.token_ids().ids().end());
    } else {
      body["prompt"] = r.text();
    }
    body["max_tokens"] = r.stop().max_tokens();
    body["ignore_eos"] = r.stop().ignore_eos();
    body["temperature"] = r.sampling().temperature();
    body["seed"] = r.sampling().seed();
    body["stream"] = true;
    body["stream_options"] = {{"include_usage", true}};
    body_ = body.dump();
  }

  ~HttpCall() override {
    if (thread_.joinable()) thread_.join();
  }

  void Start() {
    start_ = Clock::now();
    thread_ = std::thread([this] { Run(); });
  }

  void Cancel() override { cancelled_.store(true); }

  const RequestRecord& record() const override { return record_; }

 private:
  void Run();

  // One SSE event ("data: {...}").
  void OnEvent(absl::string_view event) {
    if (!absl::ConsumePrefix(&event, "data: ")) return;  // a comment (keep-alive)
    if (event == "[DONE]") {
      done_ = true;
      return;
    }
    nlohmann::json chunk =
        nlohmann::json::parse(event.begin(), event.end(), nullptr, /*allow_exceptions=*/false);
    if (chunk.is_discarded()) return;
    if (chunk.contains("error")) {
      error_ = chunk["error"].value("message", std::string("error event"));
      return;
    }
    const Clock::time_point now = Clock::now();
    const nlohmann::json& choices = chunk["choices"];
    if (choices.is_array() && !choices.empty()) {
      const nlohmann::json& c = choices[0];
      if (c.contains("text") && c["text"].is_string() && !c["text"].get<std::string>().empty()) {
        if (record_.ttft_s < 0) {
          record_.ttft_s = SecondsBetween(start_, now);
        } else {
          record_.itl_s.push_back(SecondsBetween(last_token_, now));
        }
        record_.last_token_s = SecondsBetween(start_, now);
        last_token_ = now;
        ++chunks_;
      }
      if (c.contains("finish_reason") && c["finish_reason"].is_string()) {
        record_.finish_reason = c["finish_reason"].get<std::string>();
      }
    }
    if (chunk.contains("usage") && chunk["usage"].is_object()) {
      const nlohmann::json& u = chunk["usage"];
      record_.output_tokens = u.value("completion_tokens", 0);
      record_.server_prompt_tokens = u.value("prompt_tokens", -1);
      if (u.contains("prompt_tokens_details")) {
        record_.cached_prompt_tokens = u["prompt_tokens_details"].value("cached_tokens", 0);
      }
    }
  }

  Runner* runner_;
  const LoadgenOptions& options_;
  std::string body_;
  std::thread thread_;
  std::atomic<bool> cancelled_{false};
  Clock::time_point start_, last_token_;
  std::string buffer_;  // received bytes not yet split into events
  std::string error_;
  bool done_ = false;
  int32_t chunks_ = 0;
  RequestRecord record_;
};

// Sends the planned requests on schedule and waits for them.
class Runner {
 public:
  Runner(v1::Sieve::Stub& stub, const LoadgenOptions& o) : stub_(stub), options_(o) {}

  // Runs the plan; returns the records of finished calls and the wall time.
  std::pair<std::vector<RequestRecord>, double> Run(std::vector<PlannedRequest> plan) {
    const Clock::time_point start = Clock::now();
    const auto send_until =
        start + std::chrono::duration_cast<Clock::duration>(
                    std::chrono::duration<double>(options_.duration_s > 0 ? options_.duration_s
                                                                          : 1e9));
    std::optional<Clock::time_point> first_send;
    for (PlannedRequest& p : plan) {
      const auto due = start + std::chrono::duration_cast<Clock::duration>(
                                   std::chrono::duration<double>(p.arrival_s));
      std::this_thread::sleep_until(due);
      double slot_wait_s = 0;
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (in_flight_ >= options_.concurrency) {
          const Clock::time_point wait_start = Clock::now();
          if (!cv_.wait_until(lock, send_until,
                              [&] { return in_flight_ < options_.concurrency; })) {
            break;  // the time bound passed while waiting for a slot
          }
          slot_wait_s = SecondsBetween(wait_start, Clock::now());
        }
        ++in_flight_;
      }
      const Clock::time_point now = Clock::now();
      if (!first_send) first_send = now;
      if (p.http) {
        auto call = std::make_unique<HttpCall>(this, std::move(p), slot_wait_s, options_);
        HttpCall* raw = call.get();
        {
          std::lock_guard<std::mutex> lock(mu_);
          calls_.push_back(std::move(call));
        }
        raw->Start();
        continue;
      }
      auto call = std::make_unique<Call>(this, std::move(p), slot_wait_s,
                                         options_.request_timeout_s);
      Call* raw = call.get();
      {
        std::lock_guard<std::mutex> lock(mu_);
        calls_.push_back(std::move(call));
      }
      raw->Start(stub_);
    }
    Drain();
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<RequestRecord> records;
    for (auto& c : calls_) {
      if (done_.count(c.get())) {
        records.push_back(c->record());
      } else {
        c.release();  // still owned by gRPC (it never ended): leak rather than free it
      }
    }
    const double wall = first_send ? SecondsBetween(*first_send, last_done_) : 0.0;
    return {std::move(records), std::max(wall, 0.0)};
  }

  // Called by a call's OnDone.
  void Finished(Pending* call) {
    std::lock_guard<std::mutex> lock(mu_);
    done_.insert(call);
    --in_flight_;
    last_done_ = Clock::now();
    cv_.notify_all();
  }

 private:
  // Waits for in-flight calls; past --drain-timeout, cancels them and waits for that.
  void Drain() {
    std::unique_lock<std::mutex> lock(mu_);
    const auto drain_until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                std::chrono::duration<double>(
                                                    options_.drain_timeout_s));
    if (cv_.wait_until(lock, drain_until, [&] { return in_flight_ == 0; })) return;
    std::vector<Pending*> running;
    for (const auto& c : calls_) {
      if (!done_.count(c.get())) running.push_back(c.get());
    }
    std::cerr << "sieve_loadgen: cancelling " << running.size()
              << " requests still running after --drain-timeout\n";
    lock.unlock();
    for (Pending* c : running) c->Cancel();  // calls are never freed before Run returns
    lock.lock();
    if (!cv_.wait_for(lock, std::chrono::seconds(30), [&] { return in_flight_ == 0; })) {
      std::cerr << "sieve_loadgen: " << in_flight_ << " calls did not end after cancel\n";
    }
  }

  v1::Sieve::Stub& stub_;
  const LoadgenOptions& options_;
  std::mutex mu_;
  std::condition_variable cv_;
  int32_t in_flight_ = 0;
  std::vector<std::unique_ptr<Pending>> calls_;
  std::set<const Pending*> done_;
  Clock::time_point last_done_ = Clock::now();
};

void HttpCall::Run() {
  std::string host = options_.http_target;
  int port = 80;
  if (const size_t colon = host.rfind(':'); colon != std::string::npos) {
    if (!absl::SimpleAtoi(host.substr(colon + 1), &port)) port = 80;
    host = host.substr(0, colon);
  }
  httplib::Client client(host, port);
  const auto timeout = std::chrono::duration<double>(options_.request_timeout_s);
  client.set_read_timeout(std::chrono::duration_cast<std::chrono::microseconds>(timeout));
  client.set_connection_timeout(std::chrono::seconds(10));
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.headers = {{"Content-Type", "application/json"}};
  req.body = std::move(body_);
  req.content_receiver = [this](const char* data, size_t n, uint64_t, uint64_t) {
    if (cancelled_.load()) return false;
    buffer_.append(data, n);
    for (size_t end; (end = buffer_.find("\n\n")) != std::string::npos;) {
      OnEvent(absl::string_view(buffer_).substr(0, end));
      buffer_.erase(0, end + 2);
    }
    return true;
  };
  httplib::Response res;
  httplib::Error error = httplib::Error::Success;
  const bool sent = client.send(req, res, error);
  record_.e2e_s = SecondsBetween(start_, Clock::now());
  if (!sent) {
    record_.code = cancelled_.load() ? "CANCELLED" : "HTTP_ERROR";
    record_.message = httplib::to_string(error);
  } else if (res.status != 200) {
    record_.code = absl::StrCat("HTTP_", res.status);
    record_.message = buffer_.empty() ? res.body : buffer_;
  } else if (!error_.empty()) {
    record_.code = "STREAM_ERROR";
    record_.message = error_;
  } else {
    record_.code = done_ ? "OK" : "INCOMPLETE";
  }
  runner_->Finished(this);
}

void Call::OnDone(const grpc::Status& status) {
  record_.e2e_s = SecondsBetween(start_, Clock::now());
  record_.code = CodeName(status.error_code());
  if (!status.ok()) record_.message = status.error_message();
  if (status.ok() && !complete_) record_.code = "INCOMPLETE";
  request_.Clear();  // prompts can be large; the call no longer needs its request
  runner_->Finished(this);
}

int Main(int argc, char** argv) {
  absl::StatusOr<LoadgenOptions> options =
      ParseLoadgenFlags(std::vector<std::string>(argv + 1, argv + argc));
  if (!options.ok()) {
    if (absl::IsNotFound(options.status())) {
      std::cout << LoadgenUsage();
      return 0;
    }
    std::cerr << "sieve_loadgen: " << options.status().message() << "\n";
    return 2;
  }
  const LoadgenOptions& o = *options;
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(64 << 20);
  args.SetMaxReceiveMessageSize(64 << 20);
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(o.target, grpc::InsecureChannelCredentials(), args);
  std::unique_ptr<v1::Sieve::Stub> stub = v1::Sieve::NewStub(channel);

  absl::StatusOr<ModelFacts> facts = FetchModelFacts(*stub, o);
  if (!facts.ok()) {
    std::cerr << "sieve_loadgen: " << facts.status().message() << "\n";
    return 1;
  }
  std::mt19937_64 prep_rng(o.seed ^ 0x7e47ULL);
  PromptBuilder builder(*stub, o, *facts);
  if (absl::Status prepared = builder.Prepare(prep_rng); !prepared.ok()) {
    std::cerr << "sieve_loadgen: " << prepared.message() << "\n";
    return 2;
  }
  absl::StatusOr<std::vector<PlannedRequest>> plan = Plan(o, *facts, builder);
  if (!plan.ok()) {
    std::cerr << "sieve_loadgen: " << plan.status().message() << "\n";
    return 2;
  }
  std::cerr << "sieve_loadgen: sending " << plan->size() << " requests to " << o.target
            << " (model " << facts->name << ")\n";

  Runner runner(*stub, o);
  auto [records, wall_s] = runner.Run(*std::move(plan));
  // One report per protocol sent on; "both" shares the run's wall time between the two halves.
  std::vector<std::string> protocols;
  if (o.protocol != "http") protocols.push_back("grpc");
  if (o.protocol != "grpc") protocols.push_back("http");
  nlohmann::json json = nlohmann::json::object();
  bool any_ok = false;
  for (const std::string& protocol : protocols) {
    const LoadgenReport report = BuildReport(RecordsOf(records, protocol), wall_s);
    any_ok = any_ok || report.ok > 0;
    if (protocols.size() > 1) std::cout << "\n### " << protocol << "\n\n";
    std::cout << FormatMarkdown(o, facts->name, report);
    json[protocol] = ReportToJson(o, facts->name, report);
  }
  if (!o.json_path.empty()) {
    std::ofstream out(o.json_path);
    out << (protocols.size() > 1 ? json : json[protocols[0]]).dump(2) << "\n";
    if (!out.good()) {
      std::cerr << "sieve_loadgen: cannot write " << o.json_path << "\n";
      return 1;
    }
  }
  return any_ok ? 0 : 1;
}

}  // namespace
}  // namespace sieve::bench

int main(int argc, char** argv) { return sieve::bench::Main(argc, argv); }
