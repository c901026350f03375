#include "engine/testing/async_backend.h"

#include <chrono>
#include <condition_variable>
#include <algorithm>
#include <deque>
#include <functional>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace sieve::engine::testing {

void AsyncBackendControl::InjectFault(int64_t n, FaultKind kind) {
  std::lock_guard<std::mutex> lock(mu_);
  fault_countdown_ = n < 1 ? 1 : n;
  fault_kind_ = kind;
}

void AsyncBackendControl::ReleaseHangs() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    hangs_released_ = true;
  }
  hang_cv_.notify_all();
}

std::string AsyncBackendControl::first_violation() const {
  std::lock_guard<std::mutex> lock(const_cast<std::mutex&>(mu_));
  return first_violation_;
}

bool AsyncBackendControl::TakeFault(FaultKind& kind) {
  std::lock_guard<std::mutex> lock(mu_);
  if (fault_countdown_ == 0 || --fault_countdown_ > 0) return false;
  kind = fault_kind_;
  return true;
}

absl::Status AsyncBackendControl::OperatorFault(std::string_view who) {
  FaultKind kind;
  if (!device_lost() && !TakeFault(kind)) return absl::OkStatus();
  if (device_lost() || kind == FaultKind::kFatal) {
    device_lost_ = true;
    return DeviceLostError(absl::StrCat(std::string(who), ": the device was lost (injected fatal fault)"));
  }
  if (kind == FaultKind::kHang) {
    ++hanging_;
    std::unique_lock<std::mutex> lock(mu_);
    hang_cv_.wait(lock, [this] { return hangs_released_; });
    --hanging_;
    return absl::InternalError(absl::StrCat(std::string(who), ": released from an injected hang"));
  }
  return absl::InternalError(absl::StrCat(std::string(who), ": injected recoverable fault"));
}

// One stream: the wrapped CPU stream and the executor thread that runs its queued operators.
class AsyncBackend::Stream final : public BackendStream {
 public:
  using Op = std::function<absl::Status()>;
  using Clock = std::chrono::steady_clock;

  Stream(std::unique_ptr<BackendStream> inner, AsyncBackend& backend, uint64_t seed)
      : inner_(std::move(inner)), backend_(backend), rng_(seed), caller_rng_(seed ^ 0x5eed) {
    thread_ = std::thread([this] { Loop(); });
  }

  ~Stream() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  BackendStream& inner() { return *inner_; }

  // Draws the latency of the step that begins now (caller thread).
  void NewStepLatency() {
    std::uniform_int_distribution<int64_t> latency(0, backend_.options_.max_latency_us);
    step_latency_ = std::chrono::microseconds(latency(caller_rng_));
  }

  // Queues `op`, or returns the error an earlier operator of this stream left (dropping what is
  // still queued, as that step failed), or the lost device's status.
  absl::Status Enqueue(Op op) {
    if (absl::Status lost = backend_.LostStatus(); !lost.ok()) return lost;
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_.ok()) return TakeErrorLocked();
    queue_.push_back(Queued{std::move(op), Clock::now() + step_latency_});
    cv_.notify_all();
    return absl::OkStatus();
  }

  // Waits until every queued operator has run; returns the first unreported error (or the lost
  // device's status).
  absl::Status Drain() {
    std::unique_lock<std::mutex> lock(mu_);
    backend_.control_->ops_waited_for_ += static_cast<int64_t>(queue_.size()) + (running_ ? 1 : 0);
    ++draining_;
    cv_.notify_all();  // queued operators may start now
    idle_.wait(lock, [this] { return queue_.empty() && !running_; });
    --draining_;
    backend_.ReleaseKvWrites(*this);
    absl::Status lost = backend_.LostStatus();
    if (!lost.ok()) return lost;
    return TakeErrorLocked();
  }

  // The layout of the step the executor runs now (executor thread only).
  std::shared_ptr<const BatchLayout> held_layout;

 private:
  absl::Status TakeErrorLocked() {
    absl::Status e = std::move(error_);
    error_ = absl::OkStatus();
    if (!e.ok()) queue_.clear();
    return e;
  }

  void Loop() {
    AsyncBackendControl& control = *backend_.control_;
    while (true) {
      Op op;
      bool skip = false;
      {
        std::unique_lock<std::mutex> lock(mu_);
        while (true) {
          if (queue_.empty()) {
            if (stop_) return;  // stopping with nothing left
            cv_.wait(lock);
            continue;
          }
          const Clock::time_point start_at = queue_.front().start_at;
          if (stop_ || draining_ > 0 || Clock::now() >= start_at) break;
          cv_.wait_until(lock, start_at);
        }
        op = std::move(queue_.front().op);
        queue_.pop_front();
        running_ = true;
        skip = !error_.ok();  // the step already failed: the rest of it does not run
      }
      const int64_t max_delay = backend_.options_.max_delay_us;
      if (max_delay > 0) {
        std::uniform_int_distribution<int64_t> delay(0, max_delay);
        std::this_thread::sleep_for(std::chrono::microseconds(delay(rng_)));
      }
      absl::Status status;
      if (!skip) {
        status = control.OperatorFault("async backend");
        if (status.ok()) status = op();
        control.CountOperator();
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!status.ok() && error_.ok()) error_ = status;
        running_ = false;
        if (queue_.empty()) idle_.notify_all();
      }
    }
  }

  std::unique_ptr<BackendStream> inner_;
  AsyncBackend& backend_;
  std::mt19937_64 rng_;         // executor thread only
  std::mt19937_64 caller_rng_;  // caller thread only
  std::chrono::microseconds step_latency_{0};  // caller thread only
  std::mutex mu_;
  std::condition_variable cv_;    // the executor waits for work here
  std::condition_variable idle_;  // Drain waits here
  struct Queued {
    Op op;
    Clock::time_point start_at;  // not before, unless drained
  };
  std::deque<Queued> queue_;      // guarded by mu_
  int draining_ = 0;              // guarded by mu_: Drain calls waiting
  bool running_ = false;          // guarded by mu_: the executor is inside an operator
  bool stop_ = false;             // guarded by mu_
  absl::Status error_;            // guarded by mu_: first error not reported yet
  std::thread thread_;
};

namespace {

AsyncBackend::Stream& AsStream(BackendStream& s) { return static_cast<AsyncBackend::Stream&>(s); }

}  // namespace

AsyncBackend::AsyncBackend(const AsyncBackendOptions& options,
                           std::shared_ptr<AsyncBackendControl> control)
    : options_(options), control_(std::move(control)), cpu_(options.num_threads) {}

AsyncBackend::~AsyncBackend() = default;

absl::Status AsyncBackend::LostStatus() const {
  if (!control_->device_lost()) return absl::OkStatus();
  return DeviceLostError("async backend: the device was lost (injected fatal fault)");
}

absl::StatusOr<Tensor> AsyncBackend::UploadWeight(absl::Span<const TensorView> parts,
                                                  int64_t cols) {
  if (absl::Status lost = LostStatus(); !lost.ok()) return lost;
  return cpu_.UploadWeight(parts, cols);
}

absl::StatusOr<Tensor> AsyncBackend::Allocate(int64_t rows, int64_t cols) {
  if (absl::Status lost = LostStatus(); !lost.ok()) return lost;
  return cpu_.Allocate(rows, cols);
}

absl::Status AsyncBackend::AllocateKvCache(int32_t num_layers, int32_t num_pages,
                                           int32_t page_size, const AttentionShape& shape) {
  if (absl::Status lost = LostStatus(); !lost.ok()) return lost;
  {
    std::lock_guard<std::mutex> lock(pages_mu_);
    page_writer_.assign(std::max(num_pages, 0), nullptr);
    page_size_ = page_size;
  }
  return cpu_.AllocateKvCache(num_layers, num_pages, page_size, shape);
}

int64_t AsyncBackend::KvPageBytes(int32_t num_layers, int32_t page_size,
                                  const AttentionShape& shape) const {
  return cpu_.KvPageBytes(num_layers, page_size, shape);
}

absl::StatusOr<std::unique_ptr<BackendStream>> AsyncBackend::CreateStream(
    const StreamOptions& options) {
  if (absl::Status lost = LostStatus(); !lost.ok()) return lost;
  absl::StatusOr<std::unique_ptr<BackendStream>> inner = cpu_.CreateStream(options);
  if (!inner.ok()) return inner.status();
  static std::atomic<uint64_t> streams{0};
  const uint64_t seed = options_.seed * 1000003 + streams.fetch_add(1);
  return std::unique_ptr<BackendStream>(new Stream(*std::move(inner), *this, seed));
}

void AsyncBackend::CheckAndRecordKvAccess(const Stream& stream, const BatchLayout& layout) {
  std::lock_guard<std::mutex> lock(pages_mu_);
  if (page_size_ <= 0) return;
  const auto pages = static_cast<int64_t>(page_writer_.size());
  std::string problem;
  auto check = [&](int64_t page, const char* what) {
    if (page < 0 || page >= pages) return;
    const Stream* writer = page_writer_[page];
    if (writer != nullptr && writer != &stream && problem.empty()) {
      problem = absl::StrCat("a step ", what, " KV page ", page,
                             " while another stream's unsynchronized step writes it");
    }
  };
  // Reads: every page of every sequence's KV, including the tokens of this step.
  for (int32_t seq = 0; seq < layout.num_seqs(); ++seq) {
    const int64_t used = (int64_t{layout.kv_lens[seq]} + page_size_ - 1) / page_size_;
    for (int64_t i = 0; i < used && i < layout.page_table_stride; ++i) {
      check(layout.page_table[seq * static_cast<size_t>(layout.page_table_stride) + i], "reads");
    }
  }
  for (int64_t slot : layout.slots) check(slot / page_size_, "writes");
  for (int64_t slot : layout.slots) {
    const int64_t page = slot / page_size_;
    if (page >= 0 && page < pages) page_writer_[page] = &stream;
  }
  if (!problem.empty()) {
    ++control_->violations_;
    std::lock_guard<std::mutex> control_lock(control_->mu_);
    if (control_->first_violation_.empty()) control_->first_violation_ = problem;
  }
}

void AsyncBackend::ReleaseKvWrites(const Stream& stream) {
  std::lock_guard<std::mutex> lock(pages_mu_);
  for (const Stream*& writer : page_writer_) {
    if (writer == &stream) writer = nullptr;
  }
}

absl::Status AsyncBackend::BeginStep(BackendStream& stream, const BatchLayout& layout) {
  Stream& s = AsStream(stream);
  // The caller may change `layout` as soon as this returns: the operators use a copy.
  CheckAndRecordKvAccess(s, layout);
  auto copy = std::make_shared<const BatchLayout>(layout);
  s.NewStepLatency();
  return s.Enqueue([this, &s, copy] {
    s.held_layout = copy;
    return cpu_.BeginStep(s.inner(), *copy);
  });
}

absl::Status AsyncBackend::Embed(BackendStream& stream, absl::Span<const int32_t> tokens,
                                 const Tensor& table, Tensor out) {
  Stream& s = AsStream(stream);
  std::vector<int32_t> ids(tokens.begin(), tokens.end());
  return s.Enqueue([this, &s, ids = std::move(ids), table, out] {
    return cpu_.Embed(s.inner(), ids, table, out);
  });
}

absl::Status AsyncBackend::RmsNorm(BackendStream& stream, const Tensor& x, const Tensor& weight,
                                   float eps, Tensor out) {
  Stream& s = AsStream(stream);
  return s.Enqueue([this, &s, x, weight, eps, out] {
    return cpu_.RmsNorm(s.inner(), x, weight, eps, out);
  });
}

absl::Status AsyncBackend::AddRmsNorm(BackendStream& stream, const Tensor& x, Tensor residual,
                                      const Tensor& weight, float eps, Tensor out) {
  Stream& s = AsStream(stream);
  return s.Enqueue([this, &s, x, residual, weight, eps, out] {
    return cpu_.AddRmsNorm(s.inner(), x, residual, weight, eps, out);
  });
}

absl::Status AsyncBackend::Linear(BackendStream& stream, const Tensor& x, const Tensor& weight,
                                  const Tensor& bias, Tensor out) {
  Stream& s = AsStream(stream);
  return s.Enqueue([this, &s, x, weight, bias, out] {
    return cpu_.Linear(s.inner(), x, weight, bias, out);
  });
}

absl::Status AsyncBackend::RopeAndCacheKv(BackendStream& stream, int32_t layer, const Tensor& qkv,
                                          const AttentionShape& shape, const RopeTables& rope,
                                          Tensor q_out) {
  Stream& s = AsStream(stream);
  // `rope` belongs to the model runner, which outlives its streams.
  return s.Enqueue([this, &s, layer, qkv, shape, &rope, q_out] {
    return cpu_.RopeAndCacheKv(s.inner(), layer, qkv, shape, rope, q_out);
  });
}

absl::Status AsyncBackend::Attention(BackendStream& stream, int32_t layer, const Tensor& q,
                                     const AttentionShape& shape, float scale,
                                     const AttentionPlan& plan, Tensor out) {
  Stream& s = AsStream(stream);
  // The caller reuses its plan for the next layer: the operator keeps a copy.
  auto copy = std::make_shared<const AttentionPlan>(plan);
  return s.Enqueue([this, &s, layer, q, shape, scale, copy, out] {
    return cpu_.Attention(s.inner(), layer, q, shape, scale, *copy, out);
  });
}

absl::Status AsyncBackend::SiluMul(BackendStream& stream, const Tensor& gate_up, Tensor out) {
  Stream& s = AsStream(stream);
  return s.Enqueue([this, &s, gate_up, out] { return cpu_.SiluMul(s.inner(), gate_up, out); });
}

absl::Status AsyncBackend::GatherRows(BackendStream& stream, const Tensor& x,
                                      absl::Span<const int32_t> rows, Tensor out) {
  Stream& s = AsStream(stream);
  std::vector<int32_t> copy(rows.begin(), rows.end());
  return s.Enqueue([this, &s, x, copy = std::move(copy), out] {
    return cpu_.GatherRows(s.inner(), x, copy, out);
  });
}

absl::Status AsyncBackend::CopyToHost(BackendStream& stream, const Tensor& x,
                                      absl::Span<float> out) {
  Stream& s = AsStream(stream);
  if (absl::Status st = s.Drain(); !st.ok()) return st;
  return cpu_.CopyToHost(s.inner(), x, out);
}

absl::Status AsyncBackend::Logits(BackendStream& stream, const Tensor& x, const Tensor& lm_head,
                                  absl::Span<float> host_out) {
  Stream& s = AsStream(stream);
  if (absl::Status st = s.Drain(); !st.ok()) return st;
  return cpu_.Logits(s.inner(), x, lm_head, host_out);
}

absl::StatusOr<DeviceLogits> AsyncBackend::LogitsOnDevice(BackendStream& stream, const Tensor& x,
                                                          const Tensor& lm_head) {
  Stream& s = AsStream(stream);
  if (absl::Status st = s.Drain(); !st.ok()) return st;
  return cpu_.LogitsOnDevice(s.inner(), x, lm_head);
}

absl::Status AsyncBackend::CopyLogitsToHost(BackendStream& stream, const DeviceLogits& logits,
                                            absl::Span<float> host_out) {
  Stream& s = AsStream(stream);
  if (absl::Status st = s.Drain(); !st.ok()) return st;
  return cpu_.CopyLogitsToHost(s.inner(), logits, host_out);
}

absl::Status AsyncBackend::Sample(BackendStream& stream, const DeviceLogits& logits,
                                  absl::Span<const SampleRow> rows,
                                  absl::Span<absl::StatusOr<SampledToken>> out) {
  Stream& s = AsStream(stream);
  if (absl::Status st = s.Drain(); !st.ok()) return st;
  return cpu_.Sample(s.inner(), logits, rows, out);
}

absl::Status AsyncBackend::Synchronize(BackendStream& stream) { return AsStream(stream).Drain(); }

std::shared_ptr<AsyncBackendControl> RegisterAsyncBackend(const std::string& name,
                                                          const AsyncBackendOptions& options) {
  auto control = std::make_shared<AsyncBackendControl>();
  RegisterBackend(name, [options, control](int num_threads)
                            -> absl::StatusOr<std::unique_ptr<Backend>> {
    AsyncBackendOptions o = options;
    if (num_threads > 0) o.num_threads = num_threads;
    return std::unique_ptr<Backend>(new AsyncBackend(o, control));
  });
  return control;
}

}  // namespace sieve::engine::testing
