// The UCX KvDataPlane (kv_data_plane.h): one UCP context and worker per process, driven by one
// progress thread that alone calls into the worker (UCS_THREAD_MODE_SINGLE); other threads hand
// it tasks and wake it with ucp_worker_signal. Chunks are tag messages: tag = transfer << 32 |
// first page. The prefill side sends each with ucp_tag_send_sync_nbx on an endpoint it opens to
// the decode daemon's worker address for the one transfer (peer error handling: a decode daemon
// that dies fails the send at once); the decode side posts ucp_tag_recv_nbx for it. Built only
// with SIEVE_HAVE_UCX (CMake's SIEVE_UCX); otherwise the factory says how to get it.
#include "server/kv_data_plane.h"

#include <poll.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/log.h"

#if SIEVE_HAVE_UCX
#include <ucp/api/ucp.h>

// LeakSanitizer (ASan builds, gcc's __SANITIZE_ADDRESS__ or clang's feature): see LsanBlind.
#if defined(__SANITIZE_ADDRESS__)
#define SIEVE_UCX_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIEVE_UCX_LSAN 1
#endif
#endif
#ifdef SIEVE_UCX_LSAN
#include <sanitizer/lsan_interface.h>
#endif
#endif

namespace sieve::server {

#if SIEVE_HAVE_UCX

namespace {

constexpr uint64_t kTransferMask = 0xFFFFFFFF00000000ull;
// How long chunks of a failed transfer are still looked for and dropped on the decode side.
constexpr absl::Duration kDropWindow = absl::Seconds(60);

uint64_t Tag(uint64_t transfer, int32_t first_page) {
  return (transfer << 32) | static_cast<uint32_t>(first_page);
}

// LeakSanitizer cannot judge what UCX allocates for a worker or an endpoint: UCX keeps the only
// pointers to some of those blocks inside memory it maps itself, which LeakSanitizer does not
// scan (an endpoint lives in a ucs_strided_alloc mmap chunk, so its control block, calloc'ed in
// ucp_ep_create_base, looked leaked at exit whenever an endpoint was still open; a worker's
// shared-memory transports keep their segment descriptors, from uct_mm_seg_new, in the shared
// memory). Both live as long as the process's data plane (SharedUcxDataPlane) or until the
// endpoint is closed, so the allocations made inside ucp_worker_create and ucp_ep_create are
// ignored by LeakSanitizer, and so are UCX's own inside ucp_worker_progress, where the worker
// creates the endpoints of peers that connect to it (wireup: a decode daemon draining while a
// prefill daemon's KV was on its way exited with that endpoint open, 2026-12-06); our callbacks,
// which UCX runs inside ucp_worker_progress, are watched again (LsanSee). Nothing else is
// ignored (scripts/sanitize/lsan.supp says why no suppression line is used). No-ops outside
// ASan builds.
#ifdef SIEVE_UCX_LSAN
thread_local int lsan_blind_depth = 0;  // LsanBlind scopes open on this thread
#endif

class LsanBlind {
 public:
#ifdef SIEVE_UCX_LSAN
  LsanBlind() {
    __lsan_disable();
    ++lsan_blind_depth;
  }
  ~LsanBlind() {
    --lsan_blind_depth;
    __lsan_enable();
  }
#else
  LsanBlind() {}  // user-provided: no unused-variable warning where it does nothing
#endif
  LsanBlind(const LsanBlind&) = delete;
  LsanBlind& operator=(const LsanBlind&) = delete;
};

// Inside an LsanBlind scope (a callback UCX runs from ucp_worker_progress): LeakSanitizer
// watches this thread's allocations again until the end of the scope.
class LsanSee {
 public:
#ifdef SIEVE_UCX_LSAN
  LsanSee() : active_(lsan_blind_depth > 0) {
    if (active_) __lsan_enable();
  }
  ~LsanSee() {
    if (active_) __lsan_disable();
  }

 private:
  bool active_;
#else
  LsanSee() {}
#endif
 public:
  LsanSee(const LsanSee&) = delete;
  LsanSee& operator=(const LsanSee&) = delete;
};

absl::Status UcsError(absl::string_view what, ucs_status_t status) {
  return absl::UnavailableError(absl::StrCat(what, ": ", ucs_status_string(status)));
}

class UcxDataPlane final : public KvDataPlane {
 public:
  static absl::StatusOr<std::shared_ptr<UcxDataPlane>> Create() {
    auto plane = std::shared_ptr<UcxDataPlane>(new UcxDataPlane());
    if (absl::Status st = plane->Init(); !st.ok()) return st;
    plane->thread_ = std::thread([p = plane.get()] { p->Loop(); });
    return plane;
  }

  ~UcxDataPlane() override {
    if (thread_.joinable()) {
      Post([this] { stop_ = true; });
      thread_.join();
    }
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    if (context_ != nullptr) ucp_cleanup(context_);
  }

  const std::string& address() const override { return address_; }
  uint64_t NewTransfer() override { return next_transfer_.fetch_add(1) & 0xFFFFFFFFull; }

  absl::StatusOr<std::vector<uint8_t>> Receive(
      uint64_t transfer, int32_t first_page, size_t bytes,
      const std::function<absl::Status()>& check) override;
  void EndTransfer(uint64_t transfer, bool ok) override {
    if (ok) return;
    Post([this, transfer] { dropped_.push_back({transfer, absl::Now() + kDropWindow}); });
  }

  absl::StatusOr<uint64_t> Open(const std::string& address) override;
  void Send(uint64_t endpoint, uint64_t transfer, int32_t first_page,
            std::shared_ptr<const std::string> data,
            std::function<void(absl::Status)> done) override;
  void Close(uint64_t endpoint, bool force) override {
    Post([this, endpoint, force] { CloseNow(endpoint, force); });
  }

 private:
  // What a receive shares with the thread that waits for it.
  struct RecvWait {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    ucs_status_t status = UCS_OK;
    size_t length = 0;
    std::vector<uint8_t> buffer;
  };
  // One operation in flight on the worker; deleted by its callback.
  struct Op {
    UcxDataPlane* plane = nullptr;
    uint64_t id = 0;  // receives: the key in recvs_
    std::function<void(ucs_status_t, size_t)> done;
    std::shared_ptr<const void> keep;  // the buffer the operation reads or writes
  };
  struct Endpoint {
    ucp_ep_h ep = nullptr;
    ucs_status_t error = UCS_OK;  // set by the error handler
  };

  UcxDataPlane() = default;

  absl::Status Init() {
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return UcsError("UCX: reading its configuration (UCX_* variables)", s);
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
    s = ucp_init(&params, config, &context_);
    ucp_config_release(config);
    if (s != UCS_OK) return UcsError("UCX: ucp_init", s);
    ucp_worker_params_t wparams{};
    wparams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wparams.thread_mode = UCS_THREAD_MODE_SINGLE;
    {
      LsanBlind blind;
      s = ucp_worker_create(context_, &wparams, &worker_);
    }
    if (s != UCS_OK) return UcsError("UCX: ucp_worker_create", s);
    ucp_address_t* addr = nullptr;
    size_t len = 0;
    s = ucp_worker_get_address(worker_, &addr, &len);
    if (s != UCS_OK) return UcsError("UCX: ucp_worker_get_address", s);
    address_.assign(reinterpret_cast<const char*>(addr), len);
    ucp_worker_release_address(worker_, addr);
    s = ucp_worker_get_efd(worker_, &efd_);
    if (s != UCS_OK) return UcsError("UCX: ucp_worker_get_efd", s);
    Log(LogLevel::kInfo, absl::StrCat("UCX data plane up (UCX ", UCP_API_MAJOR, ".", UCP_API_MINOR,
                                      ", worker address ", address_.size(), " bytes)"));
    return absl::OkStatus();
  }

  void Post(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.push_back(std::move(task));
    }
    ucp_worker_signal(worker_);
  }

  void Loop() {
    while (true) {
      std::deque<std::function<void()>> tasks;
      {
        std::lock_guard<std::mutex> lock(mu_);
        tasks.swap(tasks_);
      }
      for (auto& t : tasks) t();
      if (stop_) break;
      {
        LsanBlind blind;  // UCX's own allocations (peers' endpoints); callbacks see again
        while (ucp_worker_progress(worker_) != 0) {
        }
      }
      DropFailedTransfers();
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!tasks_.empty()) continue;
      }
      if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
      pollfd p{efd_, POLLIN, 0};
      (void)poll(&p, 1, dropped_.empty() ? 200 : 20);
    }
    // Shutting down: abort what is in flight, and let the callbacks run.
    for (auto& [id, e] : eps_) CloseEp(e, /*force=*/true);
    eps_.clear();
    std::vector<void*> pending;
    for (auto& [id, request] : recvs_) pending.push_back(request);
    for (void* request : pending) ucp_request_cancel(worker_, request);
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    while ((!recvs_.empty() || closing_ > 0) && std::chrono::steady_clock::now() < until) {
      LsanBlind blind;
      ucp_worker_progress(worker_);
    }
  }

  // Receives and drops the chunks of failed transfers that arrived unasked (progress thread).
  void DropFailedTransfers() {
    const absl::Time now = absl::Now();
    while (!dropped_.empty() && dropped_.front().second < now) dropped_.pop_front();
    for (const auto& [transfer, expiry] : dropped_) {
      ucp_tag_recv_info_t info{};
      while (ucp_tag_message_h msg =
                 ucp_tag_probe_nb(worker_, Tag(transfer, 0), kTransferMask, 1, &info)) {
        auto buffer = std::make_shared<std::vector<uint8_t>>(info.length);
        Op* op = new Op{this, 0, nullptr, buffer};
        ucp_request_param_t p{};
        p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                         UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        p.cb.recv = &RecvCallback;
        p.user_data = op;
        ucs_status_ptr_t r = ucp_tag_msg_recv_nbx(worker_, buffer->data(), info.length, msg, &p);
        if (UCS_PTR_IS_ERR(r)) delete op;
      }
    }
  }

  static void SendCallback(void* request, ucs_status_t status, void* user_data) {
    LsanSee see;
    Op* op = static_cast<Op*>(user_data);
    ucp_request_free(request);
    if (op->done) op->done(status, 0);
    delete op;
  }

  static void RecvCallback(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                           void* user_data) {
    LsanSee see;
    Op* op = static_cast<Op*>(user_data);
    if (op->id != 0) op->plane->recvs_.erase(op->id);
    ucp_request_free(request);
    if (op->done) op->done(status, info != nullptr ? info->length : 0);
    delete op;
  }

  static void CloseCallback(void* request, ucs_status_t status, void* user_data) {
    LsanSee see;
    ucp_request_free(request);
    --static_cast<UcxDataPlane*>(user_data)->closing_;
  }

  static void EpError(void* arg, ucp_ep_h ep, ucs_status_t status) {
    LsanSee see;
    static_cast<Endpoint*>(arg)->error = status;
  }

  void CloseEp(const std::shared_ptr<Endpoint>& e, bool force) {
    if (e->ep == nullptr) return;
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_CALLBACK |
                     UCP_OP_ATTR_FIELD_USER_DATA;
    p.flags = force || e->error != UCS_OK ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    p.cb.send = &CloseCallback;
    p.user_data = this;
    ucs_status_ptr_t r = ucp_ep_close_nbx(e->ep, &p);
    e->ep = nullptr;
    if (UCS_PTR_IS_PTR(r)) ++closing_;
  }

  void CloseNow(uint64_t endpoint, bool force) {
    auto it = eps_.find(endpoint);
    if (it == eps_.end()) return;
    std::shared_ptr<Endpoint> e = it->second;
    eps_.erase(it);
    // The error handler's argument must outlive the endpoint: keep it until the close ends.
    CloseEp(e, force);
    retired_.push_back(std::move(e));
    if (retired_.size() > 1024) retired_.pop_front();
  }

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int efd_ = -1;
  std::string address_;
  std::atomic<uint64_t> next_transfer_{1};
  std::atomic<uint64_t> next_id_{1};
  std::thread thread_;

  std::mutex mu_;
  std::deque<std::function<void()>> tasks_;  // guarded by mu_

  // Progress thread only.
  bool stop_ = false;
  std::map<uint64_t, std::shared_ptr<Endpoint>> eps_;
  std::deque<std::shared_ptr<Endpoint>> retired_;
  std::map<uint64_t, void*> recvs_;  // receives in flight, by id: their requests
  std::deque<std::pair<uint64_t, absl::Time>> dropped_;  // failed transfers, until when
  int closing_ = 0;
};

absl::StatusOr<std::vector<uint8_t>> UcxDataPlane::Receive(
    uint64_t transfer, int32_t first_page, size_t bytes,
    const std::function<absl::Status()>& check) {
  auto wait = std::make_shared<RecvWait>();
  wait->buffer.resize(bytes);
  const uint64_t id = next_id_.fetch_add(1);
  Post([this, wait, id, tag = Tag(transfer, first_page), bytes] {
    Op* op = new Op{this, id, nullptr, wait};
    op->done = [wait](ucs_status_t status, size_t length) {
      {
        std::lock_guard<std::mutex> lock(wait->mu);
        wait->done = true;
        wait->status = status;
        wait->length = length;
      }
      wait->cv.notify_all();
    };
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                     UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    p.cb.recv = &RecvCallback;
    p.user_data = op;
    ucs_status_ptr_t r =
        ucp_tag_recv_nbx(worker_, wait->buffer.data(), bytes, tag, ~uint64_t{0}, &p);
    if (UCS_PTR_IS_ERR(r)) {
      op->id = 0;
      op->done(UCS_PTR_STATUS(r), 0);
      delete op;
    } else {
      recvs_[id] = r;
    }
  });
  std::unique_lock<std::mutex> lock(wait->mu);
  while (!wait->done) {
    if (wait->cv.wait_for(lock, std::chrono::milliseconds(10)) == std::cv_status::timeout &&
        !wait->done) {
      lock.unlock();
      absl::Status st = check();
      if (!st.ok()) {
        Post([this, id] {
          auto it = recvs_.find(id);
          if (it != recvs_.end()) ucp_request_cancel(worker_, it->second);
        });
        return st;
      }
      lock.lock();
    }
  }
  if (wait->status != UCS_OK) return UcsError("UCX receive of a KV chunk", wait->status);
  if (wait->length != bytes) {
    return absl::DataLossError(absl::StrCat("UCX: a KV chunk of ", wait->length,
                                            " bytes arrived where ", bytes, " were announced"));
  }
  return std::move(wait->buffer);
}

absl::StatusOr<uint64_t> UcxDataPlane::Open(const std::string& address) {
  if (address.empty() || address.size() > (1 << 16)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ucx_worker_address: ", address.size(), " bytes is not a UCX address"));
  }
  const uint64_t id = next_id_.fetch_add(1);
  Post([this, id, address] {
    auto e = std::make_shared<Endpoint>();
    ucp_ep_params_t p{};
    p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                   UCP_EP_PARAM_FIELD_ERR_HANDLER;
    p.address = reinterpret_cast<const ucp_address_t*>(address.data());
    p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    p.err_handler.cb = &EpError;
    p.err_handler.arg = e.get();
    ucs_status_t s;
    {
      LsanBlind blind;
      s = ucp_ep_create(worker_, &p, &e->ep);
    }
    if (s != UCS_OK) {
      e->ep = nullptr;
      e->error = s;
    }
    eps_[id] = std::move(e);
  });
  return id;
}

void UcxDataPlane::Send(uint64_t endpoint, uint64_t transfer, int32_t first_page,
                        std::shared_ptr<const std::string> data,
                        std::function<void(absl::Status)> done) {
  Post([this, endpoint, transfer, first_page, data = std::move(data),
        done = std::move(done)]() mutable {
    auto it = eps_.find(endpoint);
    if (it == eps_.end() || it->second->ep == nullptr || it->second->error != UCS_OK) {
      const ucs_status_t s = it == eps_.end() ? UCS_ERR_NO_ELEM : it->second->error;
      done(UcsError("UCX: the endpoint to the decode daemon failed", s));
      return;
    }
    Op* op = new Op{this, 0, nullptr, data};
    op->done = [done = std::move(done)](ucs_status_t s, size_t) {
      done(s == UCS_OK ? absl::OkStatus() : UcsError("UCX send of a KV chunk", s));
    };
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                     UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    p.cb.send = &SendCallback;
    p.user_data = op;
    ucs_status_ptr_t r = ucp_tag_send_sync_nbx(it->second->ep, data->data(), data->size(),
                                               Tag(transfer, first_page), &p);
    if (UCS_PTR_IS_ERR(r)) {
      op->done(UCS_PTR_STATUS(r), 0);
      delete op;
    }
  });
}

}  // namespace

bool UcxBuiltIn() { return true; }

absl::StatusOr<std::shared_ptr<KvDataPlane>> SharedUcxDataPlane() {
  static std::mutex mu;
  static std::shared_ptr<KvDataPlane>* plane = nullptr;  // never destroyed: threads may use it
  static absl::Status* error = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (plane == nullptr && error == nullptr) {
    absl::StatusOr<std::shared_ptr<UcxDataPlane>> created = UcxDataPlane::Create();
    if (created.ok()) {
      plane = new std::shared_ptr<KvDataPlane>(*std::move(created));
    } else {
      error = new absl::Status(created.status());
    }
  }
  if (error != nullptr) return *error;
  return *plane;
}

#else  // !SIEVE_HAVE_UCX

bool UcxBuiltIn() { return false; }

absl::StatusOr<std::shared_ptr<KvDataPlane>> SharedUcxDataPlane() {
  return absl::UnimplementedError(
      "this sieved was built without UCX (build it with libucx-dev installed; -DSIEVE_UCX=ON "
      "makes that required); set disaggregation.transport to grpc on the decode daemons");
}

#endif  // SIEVE_HAVE_UCX

}  // namespace sieve::server
