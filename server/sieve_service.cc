#include "server/sieve_service.h"

#include <algorithm>
#include <chrono>
#include <mutex>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/status_macros.h"
#include "server/log.h"
#include "server/tsan_handoff.h"

namespace sieve::server {

// The state one Generate call shares between its reactor (gRPC threads) and its sink (the
// engine's output thread). It outlives the reactor: the engine may still hold the sink after
// the call is done. `reactor` may be used only while `finished` is false, and only by the one
// thread that took the right to start the next operation (see Pump).
struct SieveService::Stream {
  std::mutex mu;  // guards the members marked "mu" (std::mutex: see mu_ in the header)
  GenerateReactor* reactor = nullptr;          // mu
  engine::Engine* engine = nullptr;            // set before the stream is shared
  const engine::Tokenizer* tokenizer = nullptr;
  std::string response_id;                     // request_id echoed on every message
  std::optional<std::chrono::system_clock::time_point> deadline;

  std::optional<engine::RequestId> engine_id;  // mu
  // Output not yet handed to gRPC; deltas coalesce here while a write is in flight.
  v1::GenerateResponse pending;                // mu
  bool has_pending = false;                    // mu
  std::optional<engine::RequestOutcome> outcome;  // mu
  // The message gRPC is writing; untouched until the write completes (or the call is done).
  v1::GenerateResponse in_flight;
  bool write_in_flight = false;                // mu
  bool cancelled = false;  // mu; the client went away or the deadline passed
  // A remote prefill in progress (decode daemons), cancelled with the call.
  std::shared_ptr<TransferCancellation> transfer;  // mu
  bool finished = false;   // mu; Finish or StartWriteAndFinish was issued
  grpc::StatusCode final_code = grpc::StatusCode::OK;  // mu

  // Starts the next gRPC operation if one is due and none is in flight: a write of the pending
  // output, the last message with the Completion, or Finish. Any thread may call it.
  void Pump();

  // True if the call has a deadline and it has passed (within the engine's clock conversion
  // error of a few milliseconds).
  bool DeadlinePassed() const {
    return deadline.has_value() &&
           std::chrono::system_clock::now() + std::chrono::milliseconds(10) >= *deadline;
  }
};

// One Generate call. Created on a gRPC thread; deletes itself in OnDone.
class SieveService::GenerateReactor final
    : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateReactor(SieveService* service, grpc::CallbackServerContext* context)
      : service_(service), call_(context->c_call()), stream_(std::make_shared<Stream>()) {
    std::lock_guard<std::mutex> lock(stream_->mu);
    stream_->reactor = this;
    const auto deadline = context->deadline();
    if (deadline != std::chrono::system_clock::time_point::max()) stream_->deadline = deadline;
    TsanHandOff(this);  // server/tsan_handoff.h
  }

  // Validates and submits `request`; on failure finishes the call with the error.
  void Start(const v1::GenerateRequest& request);

  // Ends a call that never reached the engine.
  void Reject(const absl::Status& status) {
    {
      std::lock_guard<std::mutex> lock(stream_->mu);
      stream_->finished = true;
      stream_->final_code = ToGrpcCode(status.code());
    }
    service_->CountRejected(ToGrpcCode(status.code()));
    Log(LogLevel::kDebug, absl::StrCat("Generate rejected: ", status.ToString()));
    TsanHandOff(this);
    Finish(ToGrpcStatus(status));
  }

  void OnWriteDone(bool ok) override {
    TsanTakeOver(this, call_);
    std::optional<engine::RequestId> cancel;
    std::shared_ptr<TransferCancellation> transfer;
    {
      std::lock_guard<std::mutex> lock(stream_->mu);
      stream_->write_in_flight = false;
      if (!ok && !stream_->cancelled) {
        stream_->cancelled = true;  // the stream broke: nobody reads the rest
        cancel = stream_->engine_id;
        transfer = stream_->transfer;
      }
    }
    if (transfer) transfer->Cancel();
    if (cancel.has_value()) stream_->engine->Cancel(*cancel);
    stream_->Pump();
  }

  void OnCancel() override {
    TsanTakeOver(this, call_);
    std::optional<engine::RequestId> cancel;
    std::shared_ptr<TransferCancellation> transfer;
    {
      std::lock_guard<std::mutex> lock(stream_->mu);
      stream_->cancelled = true;
      cancel = stream_->engine_id;
      transfer = stream_->transfer;
    }
    if (transfer) transfer->Cancel();
    if (cancel.has_value()) stream_->engine->Cancel(*cancel);
    stream_->Pump();
  }

  void OnDone() override {
    TsanTakeOver(this, call_);
    grpc::StatusCode code;
    {
      std::lock_guard<std::mutex> lock(stream_->mu);
      stream_->reactor = nullptr;
      code = stream_->final_code;
    }
    if (code == grpc::StatusCode::CANCELLED && stream_->DeadlinePassed()) {
      code = grpc::StatusCode::DEADLINE_EXCEEDED;
    }
    if (registered_) service_->Unregister(stream_.get());
    service_->ReportDone("Generate", code);
    delete this;
  }

 private:
  SieveService* const service_;
  grpc_call* const call_;  // for the TSan hand-off only (server/tsan_handoff.h)
  const std::shared_ptr<Stream> stream_;
  bool registered_ = false;
};

// Receives a request's output on the engine's output thread and hands it to its stream.
class SieveService::StreamSink final : public engine::RequestSink {
 public:
  explicit StreamSink(std::shared_ptr<Stream> stream) : stream_(std::move(stream)) {}

  void OnTokens(const engine::TokenDelta& delta) override {
    {
      std::lock_guard<std::mutex> lock(stream_->mu);
      if (stream_->finished || stream_->cancelled) return;
      AppendDelta(delta, *stream_->tokenizer, &stream_->pending);
      stream_->has_pending = true;
    }
    stream_->Pump();
  }

  void OnFinish(const engine::RequestOutcome& outcome) override {
    {
      std::lock_guard<std::mutex> lock(stream_->mu);
      stream_->outcome = outcome;
    }
    if (LogEnabled(LogLevel::kDebug)) {
      Log(LogLevel::kDebug,
          absl::StrCat("request ", stream_->response_id, " finished: ",
                       engine::FinishReasonToString(outcome.finish), ", prompt ",
                       outcome.prompt_tokens, " (cached ", outcome.cached_tokens,
                       "), generated ", outcome.generated_tokens, ", total ",
                       outcome.timings.total_s, " s"));
    }
    stream_->Pump();
  }

 private:
  const std::shared_ptr<Stream> stream_;
};

void SieveService::Stream::Pump() {
  enum class Action { kNone, kWrite, kWriteAndFinish, kFinish } action = Action::kNone;
  grpc::Status status;
  GenerateReactor* target = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (finished || write_in_flight) return;
    target = reactor;
    if (cancelled) {
      action = Action::kFinish;
      status = grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled");
    } else if (outcome.has_value() && outcome->finish == engine::FinishReason::kCancelled &&
               DeadlinePassed()) {
      // The engine's copy of the deadline fired before gRPC's: the client sees
      // DEADLINE_EXCEEDED either way, so say so.
      action = Action::kFinish;
      status = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the deadline passed");
    } else if (has_pending || outcome.has_value()) {
      const bool failed = outcome.has_value() && (outcome->finish == engine::FinishReason::kError ||
                                                  outcome->finish == engine::FinishReason::kNone);
      if (has_pending || !failed) {
        in_flight.Clear();
        in_flight.Swap(&pending);
        has_pending = false;
        in_flight.set_request_id(response_id);
        action = Action::kWrite;
        if (outcome.has_value() && !failed) {
          // The engine's timings include the transfer phase (RequestSpec::kv_transfer_s).
          ToCompletion(*outcome, in_flight.mutable_complete());
          action = Action::kWriteAndFinish;
        }
      } else {
        // A failed request ends with its error status once its output is out.
        absl::Status error = outcome->status.ok()
                                 ? absl::InternalError("the request ended without a reason")
                                 : outcome->status;
        status = ToGrpcStatus(error);
        action = Action::kFinish;
      }
    }
    switch (action) {
      case Action::kNone:
        return;
      case Action::kWrite:
        write_in_flight = true;
        break;
      case Action::kWriteAndFinish:
        finished = true;
        final_code = grpc::StatusCode::OK;
        break;
      case Action::kFinish:
        finished = true;
        final_code = status.error_code();
        break;
    }
  }
  // Outside the lock: only this thread may touch the reactor until the operation completes.
  if (action != Action::kNone) TsanHandOff(target);
  switch (action) {
    case Action::kWrite:
      target->StartWrite(&in_flight);
      break;
    case Action::kWriteAndFinish:
      target->StartWriteAndFinish(&in_flight, grpc::WriteOptions(), grpc::Status::OK);
      break;
    case Action::kFinish:
      target->Finish(status);
      break;
    case Action::kNone:
      break;
  }
}

void SieveService::GenerateReactor::Start(const v1::GenerateRequest& request) {
  RequestGate& gate = service_->gate_;
  absl::StatusOr<engine::Engine*> engine = gate.Available();
  if (!engine.ok()) return Reject(engine.status());
  if (absl::Status s = gate.CheckModel(request.model()); !s.ok()) return Reject(s);
  absl::StatusOr<engine::RequestSpec> spec = gate.Prepare(request, **engine);
  if (!spec.ok()) return Reject(spec.status());

  Stream& stream = *stream_;
  stream.engine = *engine;
  stream.tokenizer = &(*engine)->tokenizer();
  stream.response_id =
      request.has_request_id()
          ? request.request_id()
          : absl::StrCat("sieve-", service_->next_request_number_.fetch_add(1));
  if (stream.deadline.has_value()) spec->deadline = absl::FromChrono(*stream.deadline);
  spec->sink = std::make_shared<StreamSink>(stream_);

  service_->Register(stream_);
  registered_ = true;
  const absl::Time deadline =
      stream.deadline.has_value() ? absl::FromChrono(*stream.deadline) : absl::InfiniteFuture();
  SieveService* service = service_;
  std::shared_ptr<Stream> shared = stream_;
  std::shared_ptr<TransferCancellation> transfer = gate.Submit(
      **engine, *std::move(spec), deadline,
      [service, shared](absl::StatusOr<engine::RequestId> id, double transfer_s) {
        service->OnSubmitted(shared, std::move(id), transfer_s);
      });
  if (transfer == nullptr) return;
  // A remote prefill runs: the call's cancellation must reach it.
  bool cancelled;
  {
    std::lock_guard<std::mutex> lock(stream.mu);
    stream.transfer = transfer;
    cancelled = stream.cancelled;
  }
  if (cancelled) transfer->Cancel();
}

void SieveService::OnSubmitted(const std::shared_ptr<Stream>& shared,
                               absl::StatusOr<engine::RequestId> id, double transfer_s) {
  Stream& stream = *shared;
  if (!id.ok()) {
    // Ends the call with the error, through the stream (a write or OnCancel may be racing).
    {
      std::lock_guard<std::mutex> lock(stream.mu);
      engine::RequestOutcome failed;
      failed.finish = engine::FinishReason::kError;
      failed.status = id.status();
      stream.outcome = failed;
    }
    Log(LogLevel::kDebug, absl::StrCat("Generate rejected: ", id.status().ToString()));
    stream.Pump();
    return;
  }
  bool cancelled;
  {
    std::lock_guard<std::mutex> lock(stream.mu);
    stream.engine_id = *id;
    cancelled = stream.cancelled;
  }
  // OnCancel may have run before the id was known.
  if (cancelled) stream.engine->Cancel(*id);
  if (LogEnabled(LogLevel::kDebug)) {
    Log(LogLevel::kDebug, absl::StrCat("request ", stream.response_id, " accepted: engine id ",
                                       *id,
                                       transfer_s > 0 ? absl::StrCat(", KV transferred in ",
                                                                     transfer_s, " s")
                                                      : std::string()));
  }
}

SieveService::SieveService(ServiceOptions options)
    : options_(std::move(options)),
      gate_(RequestGateOptions{options_.model_name, options_.default_max_tokens,
                               options_.max_stop_strings, options_.remote_prefill}) {}

SieveService::~SieveService() = default;

void SieveService::SetEngine(engine::Engine* engine) { gate_.SetEngine(engine); }

void SieveService::StartDraining() { gate_.StartDraining(); }

void SieveService::CancelAll() {
  std::vector<std::shared_ptr<Stream>> streams;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [raw, stream] : streams_) streams.push_back(stream);
  }
  for (const std::shared_ptr<Stream>& stream : streams) {
    std::optional<engine::RequestId> id;
    std::shared_ptr<TransferCancellation> transfer;
    {
      std::lock_guard<std::mutex> lock(stream->mu);
      id = stream->engine_id;
      transfer = stream->transfer;
    }
    if (transfer) transfer->Cancel();
    if (id.has_value()) stream->engine->Cancel(*id);
  }
}

bool SieveService::WaitForNoActiveStreams(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  auto none = [this] { return streams_.empty(); };
  if (timeout == absl::InfiniteDuration()) {
    streams_changed_.wait(lock, none);
    return true;
  }
  return streams_changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout), none);
}

int SieveService::active_streams() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(streams_.size());
}

void SieveService::Register(std::shared_ptr<Stream> stream) {
  std::lock_guard<std::mutex> lock(mu_);
  Stream* raw = stream.get();
  streams_.emplace(raw, std::move(stream));
}

void SieveService::Unregister(Stream* stream) {
  std::lock_guard<std::mutex> lock(mu_);
  streams_.erase(stream);
  streams_changed_.notify_all();
}

void SieveService::ReportDone(std::string_view method, grpc::StatusCode code) const {
  if (options_.on_rpc_done) options_.on_rpc_done(method, code);
}

absl::Status SieveService::Authenticate(const grpc::CallbackServerContext& context) const {
  if (options_.authenticator == nullptr) return absl::OkStatus();
  return options_.authenticator->CheckCall(context);
}

void SieveService::CountRejected(grpc::StatusCode code) const {
  if (!options_.on_rejected_invalid) return;
  if (code == grpc::StatusCode::INVALID_ARGUMENT || code == grpc::StatusCode::OUT_OF_RANGE ||
      code == grpc::StatusCode::NOT_FOUND) {
    options_.on_rejected_invalid();
  }
}

grpc::ServerUnaryReactor* SieveService::FinishUnary(grpc::CallbackServerContext* context,
                                                    std::string_view method,
                                                    const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const grpc::Status grpc_status = ToGrpcStatus(status);
  CountRejected(grpc_status.error_code());
  ReportDone(method, grpc_status.error_code());
  reactor->Finish(grpc_status);
  return reactor;
}

void SieveService::FillModelInfo(engine::Engine& engine, v1::ModelInfo* out) const {
  ToProtoModelInfo(engine.model_info(), engine.model_config(), engine.tokenizer(),
                   gate_.limits().context_tokens, out);
  out->set_name(options_.model_name);
}

grpc::ServerWriteReactor<v1::GenerateResponse>* SieveService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto* reactor = new GenerateReactor(this, context);
  if (absl::Status auth = Authenticate(*context); !auth.ok()) {
    reactor->Reject(auth);
    return reactor;
  }
  reactor->Start(*request);
  TsanHandOff(reactor);
  return reactor;
}

grpc::ServerUnaryReactor* SieveService::Tokenize(grpc::CallbackServerContext* context,
                                                 const v1::TokenizeRequest* request,
                                                 v1::TokenizeResponse* response) {
  absl::Status status = [&]() -> absl::Status {
    SIEVE_RETURN_IF_ERROR(Authenticate(*context));
    SIEVE_ASSIGN_OR_RETURN(engine::Engine * engine, gate_.Available());
    SIEVE_RETURN_IF_ERROR(gate_.CheckModel(request->model()));
    const engine::Tokenizer& tokenizer = engine->tokenizer();
    std::vector<int32_t> ids;
    if (request->has_messages()) {
      if (!request->text().empty()) {
        return absl::InvalidArgumentError("set either text or messages, not both");
      }
      SIEVE_ASSIGN_OR_RETURN(RenderedChat chat,
                             RenderChat(request->messages(), tokenizer, "messages"));
      response->set_rendered_text(std::move(chat.text));
      ids = std::move(chat.ids);
    } else {
      const bool add_special =
          !request->has_add_special_tokens() || request->add_special_tokens();
      absl::StatusOr<std::vector<int32_t>> encoded =
          tokenizer.Encode(request->text(), add_special);
      if (!encoded.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("text: ", encoded.status().message()));
      }
      ids = *std::move(encoded);
    }
    for (int32_t id : ids) {
      response->add_token_ids(id);
      if (request->return_pieces()) {
        absl::StatusOr<std::string> piece = tokenizer.TokenBytes(id);
        response->add_pieces(piece.ok() ? *std::move(piece) : std::string());
      }
    }
    return absl::OkStatus();
  }();
  return FinishUnary(context, "Tokenize", status);
}

grpc::ServerUnaryReactor* SieveService::Detokenize(grpc::CallbackServerContext* context,
                                                   const v1::DetokenizeRequest* request,
                                                   v1::DetokenizeResponse* response) {
  absl::Status status = [&]() -> absl::Status {
    SIEVE_RETURN_IF_ERROR(Authenticate(*context));
    SIEVE_ASSIGN_OR_RETURN(engine::Engine * engine, gate_.Available());
    SIEVE_RETURN_IF_ERROR(gate_.CheckModel(request->model()));
    const auto& ids = request->token_ids();
    SIEVE_RETURN_IF_ERROR(CheckTokenIds(ids, gate_.limits().vocab_size, "token_ids"));
    const bool skip = !request->has_skip_special_tokens() || request->skip_special_tokens();
    absl::StatusOr<std::string> text =
        engine->tokenizer().Decode(absl::MakeConstSpan(ids.data(), ids.size()), skip);
    if (!text.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("token_ids: ", text.status().message()));
    }
    response->set_text(*std::move(text));
    return absl::OkStatus();
  }();
  return FinishUnary(context, "Detokenize", status);
}

grpc::ServerUnaryReactor* SieveService::ListModels(grpc::CallbackServerContext* context,
                                                   const v1::ListModelsRequest* request,
                                                   v1::ListModelsResponse* response) {
  absl::Status status = [&]() -> absl::Status {
    SIEVE_RETURN_IF_ERROR(Authenticate(*context));
    SIEVE_ASSIGN_OR_RETURN(engine::Engine * engine, gate_.Available());
    FillModelInfo(*engine, response->add_models());
    return absl::OkStatus();
  }();
  return FinishUnary(context, "ListModels", status);
}

grpc::ServerUnaryReactor* SieveService::GetModelInfo(grpc::CallbackServerContext* context,
                                                     const v1::GetModelInfoRequest* request,
                                                     v1::ModelInfo* response) {
  absl::Status status = [&]() -> absl::Status {
    SIEVE_RETURN_IF_ERROR(Authenticate(*context));
    SIEVE_ASSIGN_OR_RETURN(engine::Engine * engine, gate_.Available());
    SIEVE_RETURN_IF_ERROR(gate_.CheckModel(request->model()));
    FillModelInfo(*engine, response);
    return absl::OkStatus();
  }();
  return FinishUnary(context, "GetModelInfo", status);
}

}  // namespace sieve::server
