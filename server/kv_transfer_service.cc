#include "server/kv_transfer_service.h"

#include <chrono>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/convert.h"
#include "server/crc32c.h"
#include "server/kv_data_plane.h"
#include "server/log.h"
#include "server/tsan_handoff.h"

namespace sieve::server {
namespace {

std::atomic<int64_t> chunk_delay_us{0};

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

void SetKvChunkDelayForTesting(absl::Duration delay) {
  chunk_delay_us.store(absl::ToInt64Microseconds(delay));
}

void KvLayoutToProto(const KvLayoutInfo& l, kv::v1::KvLayout* out) {
  out->set_model(l.model);
  out->set_architecture(l.architecture);
  out->set_vocab_size(l.vocab_size);
  out->set_num_layers(l.num_layers);
  out->set_num_kv_heads(l.num_kv_heads);
  out->set_head_dim(l.head_dim);
  out->set_page_size(l.page_size);
  out->set_dtype(l.dtype);
  out->set_page_bytes(l.page_bytes);
}

KvLayoutInfo KvLayoutFromProto(const kv::v1::KvLayout& p) {
  KvLayoutInfo l;
  l.model = p.model();
  l.architecture = p.architecture();
  l.vocab_size = p.vocab_size();
  l.num_layers = p.num_layers();
  l.num_kv_heads = p.num_kv_heads();
  l.head_dim = p.head_dim();
  l.page_size = p.page_size();
  l.dtype = p.dtype();
  l.page_bytes = p.page_bytes();
  return l;
}

// One Prefill call. Its state is shared with the engine request's sink, which may outlive the
// reactor (the engine can deliver the outcome after the call is done). The reactor deletes
// itself in OnDone. Every gRPC operation is started by the one thread that set write_in_flight
// or finished under mu.
class KvTransferService::PrefillReactor final
    : public grpc::ServerWriteReactor<kv::v1::PrefillChunk> {
 public:
  PrefillReactor(KvTransferService* service, grpc::CallbackServerContext* context);

  void Start(const kv::v1::PrefillRequest& request);
  // Ends the call with `status` before it starts (e.g. UNAUTHENTICATED).
  void Fail(const absl::Status& status) { Reject(status); }
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  struct State;
  class Sink;

  // Ends a call that never started streaming.
  void Reject(const absl::Status& status);

  KvTransferService* const service_;
  grpc_call* const call_;  // for the TSan hand-off only (server/tsan_handoff.h)
  const std::shared_ptr<State> state_;
  std::optional<std::chrono::system_clock::time_point> deadline_;
  std::optional<grpc::StatusCode> final_code_;
  bool started_ = false;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

struct KvTransferService::PrefillReactor::State
    : std::enable_shared_from_this<KvTransferService::PrefillReactor::State> {
  std::mutex mu;
  PrefillReactor* reactor = nullptr;  // null once the call is done
  engine::Engine* engine = nullptr;
  KvLayoutInfo layout;  // this daemon's, for the header
  int64_t page_bytes = 0;
  int64_t chunk_pages = 1;
  int32_t first_page = 0;  // prompt page index of the first page to send
  std::optional<engine::RequestId> id;
  bool outcome_arrived = false;
  bool cancelled = false;
  bool finished = false;  // Finish or StartWriteAndFinish was issued
  bool write_in_flight = false;
  bool trailer_sent = false;
  std::optional<engine::KvExport> hold;
  int32_t next_page = 0;  // index into hold->pages of the next page to send
  int32_t first_token = -1;
  int64_t bytes_sent = 0;
  kv::v1::PrefillChunk message;  // the message being written
  // disaggregation.transport ucx (kv_data_plane.h): chunks' bytes go over `plane` on
  // `endpoint`, each send started with its Pages message; the next chunk waits for both.
  std::shared_ptr<KvDataPlane> plane;
  uint64_t endpoint = 0;
  uint64_t transfer = 0;
  bool send_in_flight = false;
  bool write_failed = false;
  absl::Status send_error;

  // Finishes the call with `status` unless it is finished or a write is in flight (then
  // WriteDone finishes it).
  void FinishIfIdle(const grpc::Status& status) {
    PrefillReactor* target = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (finished || write_in_flight || reactor == nullptr) return;
      finished = true;
      target = reactor;
      target->final_code_ = status.error_code();
    }
    TsanHandOff(target);  // server/tsan_handoff.h
    target->Finish(status);
  }

  // After a gRPC write.
  void WriteDone(bool ok) {
    const int64_t delay_us = chunk_delay_us.load();
    if (ok && delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    std::unique_lock<std::mutex> lock(mu);
    write_in_flight = false;
    if (!ok) write_failed = true;
    Advance(lock);
  }

  // After a chunk's send on the data plane (on the plane's thread).
  void SendDone(const absl::Status& st) {
    std::unique_lock<std::mutex> lock(mu);
    send_in_flight = false;
    if (!st.ok() && send_error.ok()) send_error = st;
    Advance(lock);
  }

  // Once the chunk's write (and send) completed: the next chunk, the trailer, or the end. A
  // failure ends the call even while a send is in flight: OnDone's Close aborts it.
  void Advance(std::unique_lock<std::mutex>& lock) {
    enum { kNone, kWrite, kLast, kFinish } action = kNone;
    PrefillReactor* target = reactor;
    grpc::Status status;
    std::shared_ptr<std::string> ucx_data;
    int32_t chunk_first_page = 0;
    if (finished || target == nullptr || write_in_flight) return;
    if (write_failed || cancelled) {
      status = grpc::Status(grpc::StatusCode::CANCELLED, "the transfer was cancelled");
      action = kFinish;
    } else if (!send_error.ok()) {
      status = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                            std::string(send_error.message()));
      action = kFinish;
    } else if (send_in_flight) {
      return;
    } else if (next_page < static_cast<int32_t>(hold->pages.size())) {
      const int32_t n = static_cast<int32_t>(
          std::min<int64_t>(chunk_pages, static_cast<int64_t>(hold->pages.size()) - next_page));
      message.Clear();
      kv::v1::PrefillChunk::Pages* pages = message.mutable_pages();
      chunk_first_page = first_page + next_page;
      pages->set_first_page(chunk_first_page);
      pages->set_num_pages(n);
      std::string* data = pages->mutable_data();
      if (plane != nullptr) {
        ucx_data = std::make_shared<std::string>();
        data = ucx_data.get();
        pages->set_ucx(true);
      }
      data->resize(static_cast<size_t>(n * page_bytes));
      const absl::Span<uint8_t> bytes(reinterpret_cast<uint8_t*>(data->data()), data->size());
      const absl::Status read = engine->ReadKvPages(
          absl::MakeConstSpan(hold->pages).subspan(next_page, n), bytes);
      if (!read.ok()) {
        status = ToGrpcStatus(read);
        action = kFinish;
      } else {
        pages->set_crc32c(Crc32c(bytes));
        next_page += n;
        bytes_sent += static_cast<int64_t>(data->size());
        action = kWrite;
      }
    } else {
      message.Clear();
      message.mutable_trailer()->set_first_token(first_token);
      trailer_sent = true;
      action = kLast;
    }
    if (action == kWrite) {
      write_in_flight = true;
      send_in_flight = ucx_data != nullptr;
    }
    if (action != kWrite) {
      finished = true;
      target->final_code_ = action == kLast ? grpc::StatusCode::OK : status.error_code();
    }
    lock.unlock();
    TsanHandOff(target);
    if (action == kWrite && ucx_data != nullptr) {
      plane->Send(endpoint, transfer, chunk_first_page, std::move(ucx_data),
                  [self = shared_from_this()](absl::Status st) { self->SendDone(st); });
    }
    if (action == kWrite) target->StartWrite(&message);
    if (action == kLast) target->StartWriteAndFinish(&message, grpc::WriteOptions(), grpc::Status::OK);
    if (action == kFinish) target->Finish(status);
  }
};

// Receives the engine request's outcome on the engine's output thread: starts the header write, or
// ends the call (and the export's hold) when there is nothing to send.
class KvTransferService::PrefillReactor::Sink final : public engine::RequestSink {
 public:
  explicit Sink(std::shared_ptr<State> state) : state_(std::move(state)) {}

  void OnTokens(const engine::TokenDelta& delta) override {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (!delta.token_ids.empty()) state_->first_token = delta.token_ids.front();
  }

  void OnFinish(const engine::RequestOutcome& outcome) override {
    std::optional<int64_t> release;
    PrefillReactor* target = nullptr;
    grpc::Status status;
    bool write = false;
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      State& s = *state_;
      s.outcome_arrived = true;
      const bool gone = s.reactor == nullptr || s.cancelled || s.finished;
      if (outcome.kv_export.has_value()) {
        if (gone) {
          release = outcome.kv_export->id;
        } else {
          s.hold = outcome.kv_export;
        }
      }
      if (s.reactor == nullptr || s.finished) {
        // Nothing to do for the call.
      } else if (s.cancelled) {
        status = grpc::Status(grpc::StatusCode::CANCELLED, "the transfer was cancelled");
      } else if (outcome.finish == engine::FinishReason::kCancelled) {
        status = grpc::Status(grpc::StatusCode::CANCELLED, "the prefill was cancelled");
      } else if (outcome.finish == engine::FinishReason::kError ||
                 outcome.finish == engine::FinishReason::kNone) {
        status = ToGrpcStatus(outcome.status.ok() ? absl::InternalError("the prefill failed")
                                                  : outcome.status);
      } else if (!s.hold.has_value() ||
                 static_cast<int32_t>(s.hold->pages.size()) < s.first_page + 1) {
        status = grpc::Status(grpc::StatusCode::INTERNAL,
                              "the prompt's KV pages are not in the prefix cache after its "
                              "prefill");
      } else {
        s.next_page = s.first_page;
        s.first_page = 0;  // pages are named by their prompt index: next_page is one already
        const engine::EngineLoad load = s.engine->load();
        s.message.Clear();
        kv::v1::PrefillChunk::Header* h = s.message.mutable_header();
        KvLayoutToProto(s.layout, h->mutable_layout());
        h->set_first_page(s.next_page);
        h->set_num_pages(static_cast<int32_t>(s.hold->pages.size()) - s.next_page);
        h->set_waiting_requests(load.waiting);
        h->set_waiting_tokens(load.waiting_tokens);
        s.write_in_flight = true;
        write = true;
      }
      target = s.reactor;
      if (target != nullptr && !s.finished && !write) {
        s.finished = true;
        target->final_code_ = status.error_code();
      } else if (!write) {
        target = nullptr;
      }
    }
    if (release.has_value()) (void)state_->engine->EndKvExport(*release);
    if (target == nullptr) return;
    TsanHandOff(target);
    if (write) {
      target->StartWrite(&state_->message);
    } else {
      target->Finish(status);
    }
  }

 private:
  const std::shared_ptr<State> state_;
};

KvTransferService::PrefillReactor::PrefillReactor(KvTransferService* service,
                                                  grpc::CallbackServerContext* context)
    : service_(service), call_(context->c_call()), state_(std::make_shared<State>()) {
  state_->reactor = this;
  const auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) deadline_ = deadline;
  TsanHandOff(this);
}

void KvTransferService::PrefillReactor::Reject(const absl::Status& status) {
  final_code_ = ToGrpcCode(status.code());
  Log(LogLevel::kDebug, absl::StrCat("KvTransfer.Prefill rejected: ", status.ToString()));
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->finished = true;
  }
  TsanHandOff(this);
  Finish(ToGrpcStatus(status));
}

void KvTransferService::PrefillReactor::OnWriteDone(bool ok) {
  TsanTakeOver(this, call_);
  state_->WriteDone(ok);
}

void KvTransferService::PrefillReactor::OnCancel() {
  TsanTakeOver(this, call_);
  std::optional<engine::RequestId> cancel;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->cancelled = true;
    if (!state_->outcome_arrived) cancel = state_->id;
  }
  if (cancel.has_value()) state_->engine->Cancel(*cancel);
  state_->FinishIfIdle(grpc::Status(grpc::StatusCode::CANCELLED, "the transfer was cancelled"));
}

void KvTransferService::PrefillReactor::OnDone() {
  TsanTakeOver(this, call_);
  std::optional<engine::KvExport> hold;
  bool ok;
  int64_t bytes;
  std::shared_ptr<KvDataPlane> plane;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->reactor = nullptr;
    hold.swap(state_->hold);
    ok = state_->trailer_sent && !state_->cancelled;
    bytes = state_->bytes_sent;
    plane = state_->plane;
  }
  if (hold.has_value()) (void)state_->engine->EndKvExport(hold->id);
  if (plane != nullptr) plane->Close(state_->endpoint, /*force=*/!ok);
  if (started_) {
    const KvTransferServiceOptions& o = service_->options_;
    const bool ucx = plane != nullptr;
    if (o.on_transfer) o.on_transfer(ucx, ok ? bytes : 0, SecondsSince(start_), ok);
    if (o.on_in_flight) o.on_in_flight(ucx, -1);
  }
  service_->CallDone("Prefill", final_code_.value_or(grpc::StatusCode::OK));
  delete this;
}

void KvTransferService::PrefillReactor::Start(const kv::v1::PrefillRequest& request) {
  if (service_->draining_.load()) {
    return Reject(absl::UnavailableError("the prefill daemon is draining; retry elsewhere"));
  }
  engine::Engine* engine = service_->engine_.load(std::memory_order_acquire);
  if (engine == nullptr) return Reject(absl::UnavailableError("the model is still loading"));
  const KvLayoutInfo& mine = service_->layout_;
  if (absl::Status st = CheckKvLayout(mine, KvLayoutFromProto(request.layout()), "decode daemon");
      !st.ok()) {
    return Reject(st);
  }
  const int32_t ps = mine.page_size;
  const int32_t pages = request.tokens_size() / ps;
  if (request.tokens_size() == 0 || request.tokens_size() % ps != 0) {
    return Reject(absl::InvalidArgumentError(absl::StrCat(
        "tokens: ", request.tokens_size(), " tokens are not a whole number (>= 1) of ", ps,
        "-token pages")));
  }
  if (request.first_page() < 0 || request.first_page() >= pages) {
    return Reject(absl::InvalidArgumentError(absl::StrCat(
        "first_page ", request.first_page(), " is outside the prompt's ", pages, " pages")));
  }
  State& s = *state_;
  if (!request.ucx_worker_address().empty()) {
    absl::StatusOr<std::shared_ptr<KvDataPlane>> plane = SharedUcxDataPlane();
    if (!plane.ok()) {
      return Reject(absl::FailedPreconditionError(absl::StrCat(
          "the decode daemon asked for the KV over UCX, which this prefill daemon cannot send: ",
          plane.status().message())));
    }
    absl::StatusOr<uint64_t> endpoint = (*plane)->Open(request.ucx_worker_address());
    if (!endpoint.ok()) return Reject(endpoint.status());
    s.plane = *std::move(plane);
    s.endpoint = *endpoint;
    s.transfer = request.ucx_transfer_id();
  }
  s.engine = engine;
  s.layout = mine;
  s.page_bytes = mine.page_bytes;
  s.chunk_pages = std::max<int64_t>(1, service_->options_.chunk_bytes / mine.page_bytes);
  s.first_page = request.first_page();

  engine::RequestSpec spec;
  spec.prompt.assign(request.tokens().begin(), request.tokens().end());
  spec.sampling.temperature = 0;
  spec.stop.max_tokens = 1;
  spec.stop.ignore_eos = true;
  spec.export_prompt_kv = true;
  if (deadline_.has_value()) spec.deadline = absl::FromChrono(*deadline_);
  spec.sink = std::make_shared<Sink>(state_);
  started_ = true;
  if (service_->options_.on_in_flight) service_->options_.on_in_flight(s.plane != nullptr, +1);
  absl::StatusOr<engine::RequestId> id = engine->Submit(std::move(spec));
  if (!id.ok()) return Reject(id.status());
  std::lock_guard<std::mutex> lock(s.mu);
  s.id = *id;
}

KvTransferService::KvTransferService(KvTransferServiceOptions options)
    : options_(std::move(options)) {}

KvTransferService::~KvTransferService() = default;

void KvTransferService::SetEngine(engine::Engine* engine) {
  layout_ = LocalKvLayout(*engine, options_.model_name);
  engine_.store(engine, std::memory_order_release);
}

void KvTransferService::StartDraining() { draining_.store(true); }

bool KvTransferService::WaitForNoCalls(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  auto none = [this] { return calls_ == 0; };
  if (timeout == absl::InfiniteDuration()) {
    calls_changed_.wait(lock, none);
    return true;
  }
  return calls_changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout), none);
}

int KvTransferService::active_calls() const {
  std::lock_guard<std::mutex> lock(mu_);
  return calls_;
}

void KvTransferService::CallDone(std::string_view method, grpc::StatusCode code) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    --calls_;
    calls_changed_.notify_all();
  }
  if (options_.on_rpc_done) options_.on_rpc_done(method, code);
}

grpc::ServerWriteReactor<kv::v1::PrefillChunk>* KvTransferService::Prefill(
    grpc::CallbackServerContext* context, const kv::v1::PrefillRequest* request) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++calls_;
  }
  auto* reactor = new PrefillReactor(this, context);
  if (options_.authenticator != nullptr) {
    if (absl::Status auth = options_.authenticator->CheckCall(*context); !auth.ok()) {
      reactor->Fail(auth);
      return reactor;
    }
  }
  reactor->Start(*request);
  TsanHandOff(reactor);
  return reactor;
}

}  // namespace sieve::server
