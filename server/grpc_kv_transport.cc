// The gRPC streaming KvTransport (kv_transport.h) and the transport-neutral helpers declared
// there (layouts, cancellation). One channel per prefill daemon (server/prefill_target.h), the
// daemon of each attempt chosen by load (server/prefill_balancer.h), with the bearer token and
// TLS of disaggregation.token_file and disaggregation.tls.*.
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "engine/status_macros.h"
#include "server/crc32c.h"
#include "server/kv_data_plane.h"
#include "server/kv_transfer_service.h"
#include "server/kv_transport.h"
#include "server/log.h"
#include "server/prefill_balancer.h"
#include "server/prefill_target.h"
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

// How often a dns target is resolved again (gRPC's own resolver waits 30 s between
// resolutions; prefill pods come and go faster under an autoscaler), and the least time between
// two resolutions when failed attempts ask for one sooner.
constexpr absl::Duration kResolveInterval = absl::Seconds(5);
constexpr absl::Duration kMinResolveInterval = absl::Seconds(1);

absl::StatusOr<std::string> ReadToken(const std::string& path);  // below

// The bearer token of disaggregation.token_file, re-read every `period` (the daemon passes
// server.auth.reload_interval_s; zero reads it only at start), so that a rotated token is sent
// from the first read after the change, without a restart. A file that cannot be used (missing,
// unreadable, no token: as while an editor rewrites it) keeps the last good token and logs an
// error naming the key, once per distinct error. Never logs the token. Thread-safe.
class TokenFile {
 public:
  TokenFile(std::string path, std::string token, absl::Duration period)
      : path_(std::move(path)), token_(std::move(token)) {
    if (!path_.empty() && period > absl::ZeroDuration()) {
      thread_ = std::thread([this, period] { Loop(period); });
    }
  }
  ~TokenFile() {
    stop_.Notify();
    if (thread_.joinable()) thread_.join();
  }
  std::string token() const {
    std::lock_guard<std::mutex> lock(mu_);
    return token_;
  }

 private:
  void Loop(absl::Duration period) {
    std::string last_error;  // the error logged last; empty while the file is usable
    while (!stop_.WaitForNotificationWithTimeout(period)) {
      absl::StatusOr<std::string> read = ReadToken(path_);
      if (!read.ok()) {
        const std::string error(read.status().message());
        if (error != last_error) {
          Log(LogLevel::kError, absl::StrCat(error, "; the token read before is still sent"));
          last_error = error;
        }
        continue;
      }
      bool changed;
      {
        std::lock_guard<std::mutex> lock(mu_);
        changed = *read != token_;
        token_ = *std::move(read);
      }
      if (changed || !last_error.empty()) {
        Log(LogLevel::kInfo,
            absl::StrCat("disaggregation.token_file '", path_, "' ",
                         changed ? "changed: its new token is sent from now on"
                                 : "is usable again"));
      }
      last_error.clear();
    }
  }

  const std::string path_;
  mutable std::mutex mu_;
  std::string token_;  // guarded by mu_
  absl::Notification stop_;
  std::thread thread_;
};

// One prefill daemon: a channel to one address (or, for an opaque target, to the target).
struct PeerChannel {
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<kv::v1::KvTransfer::Stub> stub;
};

// The balancer's tier of a channel: 0 connected, 1 idle or connecting, 2 failing.
int Tier(grpc::Channel& channel) {
  switch (channel.GetState(/*try_to_connect=*/false)) {
    case GRPC_CHANNEL_READY:
      return 0;
    case GRPC_CHANNEL_IDLE:
    case GRPC_CHANNEL_CONNECTING:
      return 1;
    default:
      return 2;
  }
}

// Statuses that say the prefill daemon (or the way to it) failed, as opposed to the call being
// cancelled or refused: the balancer ranks that daemon behind the others for a while.
bool PeerFault(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDataLoss:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kUnauthenticated:  // refused this daemon's credentials
    case absl::StatusCode::kPermissionDenied:
      return true;
    default:
      return false;
  }
}

class GrpcKvTransport final : public KvTransport {
 public:
  // `plane`: null, or the data plane the page bytes travel on (kv_data_plane.h).
  GrpcKvTransport(PrefillTarget target, absl::Duration stall_timeout,
                  std::shared_ptr<grpc::ChannelCredentials> credentials,
                  std::unique_ptr<TokenFile> token, std::shared_ptr<KvDataPlane> plane)
      : target_(std::move(target)),
        stall_timeout_(stall_timeout),
        credentials_(std::move(credentials)),
        token_(std::move(token)),
        plane_(std::move(plane)) {
    if (target_.kind == PrefillTarget::Kind::kDns) {
      resolver_ = std::thread([this] { ResolveLoop(); });
    } else {
      SetAddresses(target_.addresses);
    }
  }

  ~GrpcKvTransport() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (resolver_.joinable()) resolver_.join();
  }

  bool Reachable() override {
    bool any = false;
    for (const auto& peer : Peers()) {
      // Every channel is asked, so that each starts connecting (and is then ranked by it).
      any = peer->channel->GetState(/*try_to_connect=*/true) == GRPC_CHANNEL_READY || any;
    }
    return any;
  }

  absl::StatusOr<RemotePrefillResult> Prefill(const RemotePrefillRequest& request,
                                              KvPageSink& sink,
                                              TransferCancellation& cancel) override;

  std::vector<PrefillBalancer::PeerLoad> Loads() const override {
    return balancer_.Loads(absl::Now());
  }

 private:
  // One attempt on `peer`; `reported` gets the queue its header reported, if one arrived.
  absl::StatusOr<RemotePrefillResult> Attempt(const std::string& address, PeerChannel& peer,
                                              const RemotePrefillRequest& request,
                                              KvPageSink& sink, TransferCancellation& cancel,
                                              std::optional<int64_t>& reported);

  std::shared_ptr<PeerChannel> MakePeer(const std::string& address) const {
    grpc::ChannelArguments args;
    if (target_.kind == PrefillTarget::Kind::kOpaque) {
      args.SetLoadBalancingPolicyName("round_robin");
    }
    if (!target_.authority.empty()) args.SetString(GRPC_ARG_DEFAULT_AUTHORITY, target_.authority);
    args.SetMaxReceiveMessageSize(-1);
    // Reconnect to a restarted prefill daemon quickly (defaults back off up to 2 minutes).
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
    // Find a prefill daemon that froze (or whose host went away) while a prefill runs there:
    // pings every 10 s (the least interval sieved accepts), unanswered for the stall timeout.
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                static_cast<int>(absl::ToInt64Milliseconds(stall_timeout_)));
    args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 0);
    auto peer = std::make_shared<PeerChannel>();
    peer->channel = grpc::CreateCustomChannel(address, credentials_, args);
    peer->stub = kv::v1::KvTransfer::NewStub(peer->channel);
    return peer;
  }

  // Makes `addresses` the peers: channels of those that stay are kept.
  void SetAddresses(const std::vector<std::string>& addresses) {
    std::map<std::string, std::shared_ptr<PeerChannel>> next;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const std::string& a : addresses) {
        auto it = peers_.find(a);
        next[a] = it != peers_.end() ? it->second : nullptr;
      }
    }
    for (auto& [address, peer] : next) {
      if (peer == nullptr) peer = MakePeer(address);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      peers_ = std::move(next);
      resolved_ = true;
    }
    balancer_.SetPeers(addresses);
    cv_.notify_all();
  }

  std::vector<std::shared_ptr<PeerChannel>> Peers() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::shared_ptr<PeerChannel>> out;
    for (const auto& [address, peer] : peers_) out.push_back(peer);
    return out;
  }

  // Resolves a dns target now and every kResolveInterval, or sooner when asked.
  void ResolveLoop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      resolve_now_ = false;
      lock.unlock();
      absl::StatusOr<std::vector<std::string>> addresses = ResolveDnsTarget(target_);
      if (addresses.ok()) {
        SetAddresses(*addresses);
      } else {
        Log(LogLevel::kWarning, std::string(addresses.status().message()));
      }
      lock.lock();
      resolve_error_ = addresses.ok() ? absl::OkStatus() : addresses.status();
      resolve_attempted_ = true;
      cv_.notify_all();
      cv_.wait_for(lock, absl::ToChronoNanoseconds(kMinResolveInterval), [this] { return stop_; });
      cv_.wait_for(lock, absl::ToChronoNanoseconds(kResolveInterval - kMinResolveInterval),
                   [this] { return stop_ || resolve_now_; });
    }
  }

  // Asks the resolver for a new resolution (a peer failed: it may have gone away).
  void ResolveSoon() {
    if (target_.kind != PrefillTarget::Kind::kDns) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      resolve_now_ = true;
    }
    cv_.notify_all();
  }

  const PrefillTarget target_;
  const absl::Duration stall_timeout_;
  const std::shared_ptr<grpc::ChannelCredentials> credentials_;
  // Its token is sent as "authorization: Bearer <token>" when not empty.
  const std::unique_ptr<TokenFile> token_;
  const std::shared_ptr<KvDataPlane> plane_;
  PrefillBalancer balancer_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::shared_ptr<PeerChannel>> peers_;  // by address; guarded by mu_
  bool resolved_ = false;           // peers_ was set at least once; guarded by mu_
  bool resolve_attempted_ = false;  // guarded by mu_
  absl::Status resolve_error_;      // of the latest resolution; guarded by mu_
  bool resolve_now_ = false;        // guarded by mu_
  bool stop_ = false;               // guarded by mu_
  std::thread resolver_;
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

// Polled while a chunk's bytes are awaited on the data plane: why to stop waiting, if any.
absl::Status DataPlaneWait(PeerChannel& peer, absl::Time deadline,
                           const TransferCancellation& cancel, const StallWatch& watch,
                           const std::string& address) {
  if (cancel.cancelled()) return absl::CancelledError("the request was cancelled");
  if (absl::Now() >= deadline) {
    return absl::DeadlineExceededError("the deadline passed during the KV transfer");
  }
  if (watch.stalled()) {
    return absl::UnavailableError(
        absl::StrCat("kv transfer from ", address, " stalled waiting for a UCX chunk"));
  }
  // The control stream's connection broke (the prefill daemon died): no chunk will come.
  if (peer.channel->GetState(/*try_to_connect=*/false) != GRPC_CHANNEL_READY) {
    return absl::UnavailableError(absl::StrCat(
        "the connection to prefill daemon ", address, " broke during a UCX transfer"));
  }
  return absl::OkStatus();
}

absl::StatusOr<RemotePrefillResult> GrpcKvTransport::Prefill(const RemotePrefillRequest& request,
                                                             KvPageSink& sink,
                                                             TransferCancellation& cancel) {
  {
    // A dns target's first resolution runs on the resolver thread: wait for it (briefly).
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::seconds(2),
                 [this] { return stop_ || resolved_ || resolve_attempted_; });
  }
  const int64_t tokens = static_cast<int64_t>(request.tokens.size());
  std::map<std::string, int> tiers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [a, peer] : peers_) tiers[a] = Tier(*peer->channel);
  }
  const std::optional<std::string> address = balancer_.Pick(
      tokens,
      [&tiers](const std::string& a) {
        auto it = tiers.find(a);
        return it == tiers.end() ? 3 : it->second;
      },
      absl::Now());
  if (!address.has_value()) {
    ResolveSoon();
    std::lock_guard<std::mutex> lock(mu_);
    return absl::UnavailableError(
        absl::StrCat("no prefill daemon at disaggregation.prefill_target '",
                     target_.kind == PrefillTarget::Kind::kDns ? target_.authority
                                                               : target_.addresses.front(),
                     "'", resolve_error_.ok() ? "" : ": ", resolve_error_.message()));
  }
  std::shared_ptr<PeerChannel> peer;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = peers_.find(*address);
    if (it != peers_.end()) peer = it->second;
  }
  std::optional<int64_t> reported;
  absl::StatusOr<RemotePrefillResult> result =
      peer != nullptr
          ? Attempt(*address, *peer, request, sink, cancel, reported)
          : absl::StatusOr<RemotePrefillResult>(absl::UnavailableError(absl::StrCat(
                "prefill daemon ", *address, " went away (the target was resolved again)")));
  const bool fault = !result.ok() && !cancel.cancelled() && PeerFault(result.status());
  balancer_.End(*address, tokens, reported, fault, absl::Now());
  if (fault) ResolveSoon();
  return result;
}

absl::StatusOr<RemotePrefillResult> GrpcKvTransport::Attempt(const std::string& address,
                                                             PeerChannel& peer,
                                                             const RemotePrefillRequest& request,
                                                             KvPageSink& sink,
                                                             TransferCancellation& cancel,
                                                             std::optional<int64_t>& reported) {
  const int32_t ps = request.layout.page_size;
  const int32_t num_pages = static_cast<int32_t>(request.tokens.size()) / ps;
  kv::v1::PrefillRequest req;
  req.mutable_tokens()->Add(request.tokens.begin(), request.tokens.end());
  req.set_first_page(request.first_page);
  KvLayoutToProto(request.layout, req.mutable_layout());
  const uint64_t transfer = plane_ != nullptr ? plane_->NewTransfer() : 0;
  if (plane_ != nullptr) {
    req.set_ucx_worker_address(plane_->address());
    req.set_ucx_transfer_id(static_cast<uint32_t>(transfer));
  }

  grpc::ClientContext context;
  const std::string token = token_->token();
  if (!token.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", token));
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
        peer.stub->Prefill(&context, req);
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
        reported = h.waiting_tokens();
        header = true;
      } else if (chunk.has_pages()) {
        const auto& p = chunk.pages();
        absl::Span<const uint8_t> data(reinterpret_cast<const uint8_t*>(p.data().data()),
                                       p.data().size());
        const bool ucx = p.ucx() && plane_ != nullptr && p.data().empty() && header &&
                         !trailer && p.first_page() == next_page && p.num_pages() > 0 &&
                         next_page + p.num_pages() <= num_pages;
        std::vector<uint8_t> received;
        if (ucx) {
          absl::StatusOr<std::vector<uint8_t>> bytes = plane_->Receive(
              transfer, p.first_page(),
              static_cast<size_t>(p.num_pages() * request.layout.page_bytes),
              [&]() -> absl::Status {
                return DataPlaneWait(peer, request.deadline, cancel, watch, address);
              });
          if (bytes.ok()) {
            watch.Progress();
            received = *std::move(bytes);
            data = absl::MakeConstSpan(received);
          } else {
            failure = bytes.status();
            continue;
          }
        }
        if (!header || trailer || p.first_page() != next_page || p.num_pages() <= 0 ||
            next_page + p.num_pages() > num_pages || (p.ucx() && !ucx) ||
            static_cast<int64_t>(data.size()) != p.num_pages() * request.layout.page_bytes) {
          failure = absl::DataLossError(absl::StrCat(
              "kv transfer: unexpected chunk of pages [", p.first_page(), ", +", p.num_pages(),
              ") with ", data.size(), p.ucx() ? " bytes over UCX" : " bytes",
              "; expected page ", next_page));
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
  if (plane_ != nullptr) plane_->EndTransfer(transfer, failure.ok() && finish.ok());
  result.peer = address;
  if (!failure.ok()) return failure;
  if (finish.ok()) return result;
  if (cancel.cancelled()) return absl::CancelledError("the request was cancelled");
  if (stalled) {
    return absl::UnavailableError(absl::StrCat("kv transfer from ", result.peer,
                                               " stalled: nothing arrived for ",
                                               absl::FormatDuration(stall_timeout_)));
  }
  absl::Status st = FromGrpc(finish);
  if (st.code() == absl::StatusCode::kUnauthenticated ||
      st.code() == absl::StatusCode::kPermissionDenied) {
    return absl::Status(
        st.code(), absl::StrCat("prefill daemon ", address, " refused this decode daemon's ",
                                token.empty() ? "call (it wants a bearer token: set "
                                                 "disaggregation.token_file)"
                                               : "bearer token (disaggregation.token_file)",
                                ": ", st.message()));
  }
  return absl::Status(st.code(), absl::StrCat("remote prefill on ", address, ": ", st.message()));
}

}  // namespace

namespace {

// Reads a file named by `key`; a clear error naming the key when it cannot.
absl::StatusOr<std::string> ReadConfiguredFile(absl::string_view key, const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat(key, ": cannot read '", path, "': ", std::strerror(errno)));
  }
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

absl::Status CheckPem(absl::string_view key, const std::string& path) {
  SIEVE_ASSIGN_OR_RETURN(std::string text, ReadConfiguredFile(key, path));
  if (text.find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(key, ": '", path, "' is not a PEM file"));
  }
  return absl::OkStatus();
}

// The channel credentials of disaggregation.tls.*: plaintext, TLS (server certificates checked
// against ca_file or the system's roots, and their host names against the target's), or mutual
// TLS (cert_file and key_file presented). The files are re-read every `reload_interval_s`.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(
    const DisaggregationTlsConfig& tls, int reload_interval_s) {
  if (!tls.enabled()) return grpc::InsecureChannelCredentials();
  const bool ca = !tls.ca_file.empty();
  const bool identity = !tls.cert_file.empty();
  if (ca) SIEVE_RETURN_IF_ERROR(CheckPem("disaggregation.tls.ca_file", tls.ca_file));
  if (identity) {
    SIEVE_RETURN_IF_ERROR(CheckPem("disaggregation.tls.cert_file", tls.cert_file));
    SIEVE_RETURN_IF_ERROR(CheckPem("disaggregation.tls.key_file", tls.key_file));
  }
  const unsigned interval = static_cast<unsigned>(std::max(1, reload_interval_s));
  std::shared_ptr<grpc::experimental::CertificateProviderInterface> provider;
  if (identity) {
    provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
        tls.key_file, tls.cert_file, ca ? tls.ca_file : std::string(), interval);
  } else {
    provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(tls.ca_file,
                                                                                   interval);
  }
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(provider);
  if (ca) options.watch_root_certs();  // else the system's roots
  if (identity) options.watch_identity_key_cert_pairs();
  options.set_verify_server_certs(true);
  options.set_certificate_verifier(
      std::make_shared<grpc::experimental::HostNameCertificateVerifier>());
  std::shared_ptr<grpc::ChannelCredentials> credentials =
      grpc::experimental::TlsCredentials(options);
  if (credentials == nullptr) {
    return absl::InvalidArgumentError("disaggregation.tls: gRPC refused the TLS settings");
  }
  return credentials;
}

// The token of disaggregation.token_file: its first line that is neither blank nor a comment.
absl::StatusOr<std::string> ReadToken(const std::string& path) {
  SIEVE_ASSIGN_OR_RETURN(std::string text, ReadConfiguredFile("disaggregation.token_file", path));
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (!line.empty() && !absl::StartsWith(line, "#")) return std::string(line);
  }
  return absl::InvalidArgumentError(absl::StrCat("disaggregation.token_file: '", path,
                                                 "' holds no token (# starts a comment line)"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvTransport>> MakeGrpcKvTransport(
    const DisaggregationConfig& config, int tls_reload_interval_s, int token_reload_interval_s) {
  std::shared_ptr<KvDataPlane> plane;
  if (config.transport == "ucx") {
    absl::StatusOr<std::shared_ptr<KvDataPlane>> ucx = SharedUcxDataPlane();
    if (!ucx.ok()) {
      return absl::Status(ucx.status().code(),
                          absl::StrCat("disaggregation.transport is ucx but ",
                                       ucx.status().message()));
    }
    plane = *std::move(ucx);
  } else if (config.transport != "grpc") {
    return absl::InvalidArgumentError(absl::StrCat(
        "disaggregation.transport must be grpc or ucx, got '", config.transport, "'"));
  }
  SIEVE_ASSIGN_OR_RETURN(PrefillTarget target, ParsePrefillTarget(config.prefill_target));
  SIEVE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                         ChannelCredentials(config.tls, tls_reload_interval_s));
  std::string token;
  if (!config.token_file.empty()) {
    SIEVE_ASSIGN_OR_RETURN(token, ReadToken(config.token_file));
    if (!config.tls.enabled()) {
      Log(LogLevel::kWarning,
          "disaggregation.token_file is set but disaggregation.tls.* is not: the bearer token "
          "travels to the prefill daemons in plaintext");
    }
  }
  Log(LogLevel::kInfo,
      absl::StrCat("prefill daemons at '", config.prefill_target, "': ",
                   target.kind == PrefillTarget::Kind::kOpaque
                       ? "one round-robin channel (the scheme is resolved by gRPC: no "
                         "load-aware choice)"
                       : "least-loaded choice per request",
                   ", ", !config.tls.enabled() ? "plaintext"
                         : config.tls.cert_file.empty() ? "TLS" : "mutual TLS",
                   token.empty() ? ", no bearer token" : ", bearer token",
                   plane != nullptr ? ", KV pages over UCX" : ""));
  return std::unique_ptr<KvTransport>(
      std::make_unique<GrpcKvTransport>(std::move(target),
                                        absl::Seconds(config.stall_timeout_s),
                                        std::move(credentials),
                                        std::make_unique<TokenFile>(
                                            config.token_file, std::move(token),
                                            absl::Seconds(token_reload_interval_s)),
                                        std::move(plane)));
}

}  // namespace sieve::server
