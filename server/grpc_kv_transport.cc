// The gRPC streaming KvTransport (kv_transport.h) and the transport-neutral helpers declared
// there (layouts, cancellation).
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "server/crc32c.h"
#include "server/kv_transfer_service.h"
#include "server/kv_transport.h"
#include "sieve/kv/v1/kv_transfer.grpc.pb.h"

namespace sieve::server {

KvLayoutInfo LocalKvLayout(const engine::Engine& engine, const std::string& model_name) {
  const engine::ModelInfo info = engine.model_info();
  KvLayoutInfo l;
  l.model = model_name;
  l.architecture = info.architecture;
  l.dtype = info.dtype;
  l.vocab_size = info.vocab_size;
  l.num_layers = info.num_layers;
  l.num_kv_heads = info.num_kv_heads;
  l.head_dim = info.head_dim;
  l.page_size = info.page_size;
  l.page_bytes = info.kv_page_bytes;
  return l;
}

absl::Status CheckKvLayout(const KvLayoutInfo& mine, const KvLayoutInfo& theirs,
                           const std::string& other_side) {
  std::vector<std::string> diffs;
  auto check = [&](const char* name, const auto& a, const auto& b) {
    if (a != b) diffs.push_back(absl::StrCat(name, " ", a, " here, ", b, " there"));
  };
  check("model", mine.model, theirs.model);
  check("architecture", mine.architecture, theirs.architecture);
  check("dtype", mine.dtype, theirs.dtype);
  check("vocab_size", mine.vocab_size, theirs.vocab_size);
  check("num_layers", mine.num_layers, theirs.num_layers);
  check("num_kv_heads", mine.num_kv_heads, theirs.num_kv_heads);
  check("head_dim", mine.head_dim, theirs.head_dim);
  check("page_size", mine.page_size, theirs.page_size);
  check("page_bytes", mine.page_bytes, theirs.page_bytes);
  if (diffs.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat("KV layout mismatch with the ", other_side,
                                                    ": ", absl::StrJoin(diffs, ", ")));
}

// The hook runs under mu_, so ClearHook cannot return while it runs: whatever it refers to stays
// alive for it. Hooks must be quick and must not call back into this object.
void TransferCancellation::Cancel() {
  std::lock_guard<std::mutex> lock(mu_);
  if (cancelled_) return;
  cancelled_ = true;
  if (hook_) hook_();
}

bool TransferCancellation::cancelled() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cancelled_;
}

void TransferCancellation::SetHook(std::function<void()> hook) {
  std::lock_guard<std::mutex> lock(mu_);
  hook_ = std::move(hook);
  if (cancelled_ && hook_) hook_();
}

void TransferCancellation::ClearHook() {
  std::lock_guard<std::mutex> lock(mu_);
  hook_ = nullptr;
}

namespace {

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

class GrpcKvTransport final : public KvTransport {
 public:
  GrpcKvTransport(const std::string& target, absl::Duration stall_timeout)
      : target_(target), stall_timeout_(stall_timeout) {
    grpc::ChannelArguments args;
    args.SetLoadBalancingPolicyName("round_robin");
    args.SetMaxReceiveMessageSize(-1);
    // Reconnect to a restarted prefill daemon quickly (defaults back off up to 2 minutes).
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
    // Find a prefill daemon that froze (or whose host went away) while a prefill runs there:
    // pings every 10 s (the least interval sieved accepts), unanswered for the stall timeout.
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                static_cast<int>(absl::ToInt64Milliseconds(stall_timeout)));
    args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 0);
    channel_ = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
    stub_ = kv::v1::KvTransfer::NewStub(channel_);
  }

  bool Reachable() override {
    const grpc_connectivity_state s = channel_->GetState(/*try_to_connect=*/true);
    return s == GRPC_CHANNEL_READY;
  }

  absl::StatusOr<RemotePrefillResult> Prefill(const RemotePrefillRequest& request,
                                              KvPageSink& sink,
                                              TransferCancellation& cancel) override;

 private:
  const std::string target_;
  const absl::Duration stall_timeout_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<kv::v1::KvTransfer::Stub> stub_;
};

// Cancels `context` when nothing arrived for `timeout` since the previous message. It is armed
// by the first message (the header, sent when the prefill has run): the prefill itself may wait
// in the prefill daemon's queue for longer, and a dead or frozen daemon is found before that by
// the channel's keepalive pings (and the call's deadline). Progress() marks an arrival.
class StallWatch {
 public:
  StallWatch(grpc::ClientContext& context, absl::Duration timeout)
      : context_(context), timeout_(absl::ToChronoNanoseconds(timeout)) {
    thread_ = std::thread([this] { Run(); });
  }
  ~StallWatch() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void Progress() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      last_ = std::chrono::steady_clock::now();
      armed_ = true;
    }
    cv_.notify_all();
  }
  bool stalled() const { return stalled_.load(); }

 private:
  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return done_ || armed_; });
    while (!done_) {
      const auto due = last_ + timeout_;
      if (std::chrono::steady_clock::now() >= due) {
        stalled_ = true;
        context_.TryCancel();
        return;
      }
      cv_.wait_until(lock, due);
    }
  }

  grpc::ClientContext& context_;
  const std::chrono::nanoseconds timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::chrono::steady_clock::time_point last_;
  bool done_ = false;
  bool armed_ = false;
  std::atomic<bool> stalled_{false};
  std::thread thread_;
};

absl::StatusOr<RemotePrefillResult> GrpcKvTransport::Prefill(const RemotePrefillRequest& request,
                                                             KvPageSink& sink,
                                                             TransferCancellation& cancel) {
  const int32_t ps = request.layout.page_size;
  const int32_t num_pages = static_cast<int32_t>(request.tokens.size()) / ps;
  kv::v1::PrefillRequest req;
  req.mutable_tokens()->Add(request.tokens.begin(), request.tokens.end());
  req.set_first_page(request.first_page);
  KvLayoutToProto(request.layout, req.mutable_layout());

  grpc::ClientContext context;
  if (request.deadline != absl::InfiniteFuture()) {
    context.set_deadline(absl::ToChronoTime(request.deadline));
  }
  RemotePrefillResult result;
  absl::Status failure;
  grpc::Status finish;
  bool stalled = false;
  {
    cancel.SetHook([&context] { context.TryCancel(); });
    StallWatch watch(context, stall_timeout_);
    std::unique_ptr<grpc::ClientReader<kv::v1::PrefillChunk>> reader =
        stub_->Prefill(&context, req);
    kv::v1::PrefillChunk chunk;
    int32_t next_page = request.first_page;
    bool header = false, trailer = false;
    while (failure.ok() && reader->Read(&chunk)) {
      watch.Progress();
      if (chunk.has_header()) {
        const auto& h = chunk.header();
        failure = CheckKvLayout(request.layout, KvLayoutFromProto(h.layout()),
                                absl::StrCat("prefill daemon ", context.peer()));
        if (failure.ok() && (header || h.first_page() != request.first_page ||
                             h.num_pages() != num_pages - request.first_page)) {
          failure = absl::DataLossError(absl::StrCat(
              "kv transfer: the header announces pages [", h.first_page(), ", +",
              h.num_pages(), "), expected [", request.first_page, ", ", num_pages, ")"));
        }
        result.peer_waiting_requests = h.waiting_requests();
        result.peer_waiting_tokens = h.waiting_tokens();
        header = true;
      } else if (chunk.has_pages()) {
        const auto& p = chunk.pages();
        const absl::Span<const uint8_t> data(reinterpret_cast<const uint8_t*>(p.data().data()),
                                             p.data().size());
        if (!header || trailer || p.first_page() != next_page || p.num_pages() <= 0 ||
            next_page + p.num_pages() > num_pages ||
            static_cast<int64_t>(data.size()) != p.num_pages() * request.layout.page_bytes) {
          failure = absl::DataLossError(absl::StrCat(
              "kv transfer: unexpected chunk of pages [", p.first_page(), ", +", p.num_pages(),
              ") with ", data.size(), " bytes; expected page ", next_page));
        } else if (Crc32c(data) != p.crc32c()) {
          failure = absl::DataLossError(absl::StrCat("kv transfer: checksum mismatch in pages [",
                                                     p.first_page(), ", +", p.num_pages(), ")"));
        } else {
          failure = sink.OnPages(p.first_page(), p.num_pages(), data);
          next_page += p.num_pages();
          result.pages += p.num_pages();
          result.bytes += static_cast<int64_t>(data.size());
        }
      } else if (chunk.has_trailer()) {
        if (next_page != num_pages) {
          failure = absl::DataLossError(absl::StrCat("kv transfer: trailer after ", next_page,
                                                     " of ", num_pages, " pages"));
        }
        result.first_token = chunk.trailer().first_token();
        trailer = true;
      }
    }
    if (!failure.ok()) context.TryCancel();
    finish = reader->Finish();
    stalled = watch.stalled();
    if (failure.ok() && finish.ok() && !trailer) {
      failure = absl::DataLossError("kv transfer: the stream ended without a trailer");
    }
    cancel.ClearHook();
  }
  result.peer = context.peer();
  if (!failure.ok()) return failure;
  if (finish.ok()) return result;
  if (cancel.cancelled()) return absl::CancelledError("the request was cancelled");
  if (stalled) {
    return absl::UnavailableError(absl::StrCat("kv transfer from ", result.peer,
                                               " stalled: nothing arrived for ",
                                               absl::FormatDuration(stall_timeout_)));
  }
  absl::Status st = FromGrpc(finish);
  return absl::Status(st.code(), absl::StrCat("remote prefill on ", target_, ": ", st.message()));
}

}  // namespace

std::unique_ptr<KvTransport> MakeGrpcKvTransport(const std::string& target,
                                                 absl::Duration stall_timeout) {
  return std::make_unique<GrpcKvTransport>(target, stall_timeout);
}

}  // namespace sieve::server
