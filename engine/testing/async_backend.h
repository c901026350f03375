// AsyncBackend: a test backend that behaves like a GPU on the CPU. It wraps CpuBackend, but its
// operators return at once and run later, in order, on one executor thread per stream (optionally
// after a random delay each), so returning from a call means nothing has happened yet, exactly as
// a CUDA launch returns before its kernel runs. The calls the Backend contract documents as
// waiting (CopyToHost, Logits, LogitsOnDevice, CopyLogitsToHost, Sample, Synchronize) drain the
// stream first. Faults can be injected: an operator that fails recoverably (reported at the next
// call on its stream, like an asynchronous CUDA error; the rest of that stream's queued work is
// skipped) or unrecoverably (DeviceLostError; every later call on every stream fails).
//
// It also checks the ordering rule a GPU imposes, deterministically rather than by luck: work of
// stream Y is known to be finished on another stream only after the host synchronized with Y (a
// waiting call on Y). A step that reads or writes a KV page that a step of another stream wrote
// and that stream was not synchronized since is counted as a violation (AsyncBackendControl::
// violations), whether or not the race happened to corrupt anything this time.
//
// Engine tests use it to check that nothing depending on a step's KV happens before the step has
// run (see async_engine_test.cc). Register it under a name with RegisterAsyncBackend and set
// ModelRunnerOptions::backend to that name.
//
// Thread safety: as the Backend contract. Each stream's calls come from one thread; its executor
// is a second thread. InjectFault, ops_run and AsyncBackendControl may be called from any thread.
#ifndef SIEVE_ENGINE_TESTING_ASYNC_BACKEND_H_
#define SIEVE_ENGINE_TESTING_ASYNC_BACKEND_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "engine/backends/backend.h"
#include "engine/backends/cpu_backend.h"

namespace sieve::engine::testing {

// How an injected fault fails its operator.
enum class FaultKind {
  kRecoverable,  // the operator fails with Internal; the stream and the device stay usable
  kFatal,        // the device is lost: DeviceLostError now and from every later call
  kHang,         // the operator never finishes (until ReleaseHangs; then it fails, recoverably)
};

struct AsyncBackendOptions {
  int num_threads = 1;       // threads of the wrapped CpuBackend's operators
  int64_t max_delay_us = 0;  // each operator first sleeps a uniform random time in [0, max] (us)
  // The operators of a step (from one BeginStep to the next) do not start before a latency drawn
  // uniformly in [0, max_latency_us] per step has passed since they were queued, unless a
  // waiting call (Synchronize, Sample, ...) drains their stream: like kernels queued behind long
  // ones on a busy GPU. Steps queued later on another stream often run first, so any use of a
  // step's results before it has run shows up, not as a rare race.
  int64_t max_latency_us = 0;
  uint64_t seed = 1;         // of the delays
};

// Shared state of every AsyncBackend made by one registration: lets a test inject faults into
// the backend an Engine created internally, and count what ran.
class AsyncBackendControl {
 public:
  // The `n`-th asynchronous operator (n >= 1) that starts running from now on, over all streams
  // of all backends of this control, fails with `kind`. One fault is pending at a time; a new
  // call replaces it.
  void InjectFault(int64_t n, FaultKind kind);

  // Asynchronous operators run so far (executed or failed), over all streams.
  int64_t ops_run() const { return ops_run_.load(); }

  // Operators that were still queued when a Synchronize-like call began waiting, summed: > 0
  // shows that callers really did get ahead of the executor.
  int64_t ops_waited_for() const { return ops_waited_for_.load(); }

  // Lets every operator stuck in a kHang fault return (with an Internal error), now and later.
  void ReleaseHangs();

  // True while an operator is stuck in a kHang fault.
  bool hanging() const { return hanging_.load() > 0; }

  // True once a fatal fault fired.
  bool device_lost() const { return device_lost_.load(); }

  // For a backend of this control (AsyncBackend, FaultBackend), just before an operator runs:
  // OkStatus to run it, or the status it fails with instead: DeviceLostError once a fatal fault
  // fired (this one or an earlier one), Internal for a recoverable fault; a kHang fault blocks
  // here until ReleaseHangs, then fails recoverably. `who` starts the messages. The caller
  // counts the operator with CountOperator either way.
  absl::Status OperatorFault(std::string_view who);
  void CountOperator() { ++ops_run_; }

  // Steps that read or wrote a KV page written by another stream that was not synchronized since.
  int64_t violations() const { return violations_.load(); }

  // The first violation, described (empty when none).
  std::string first_violation() const;

 private:
  friend class AsyncBackend;
  // Called by an executor before each operator: the fault to apply to it, if any.
  bool TakeFault(FaultKind& kind);

  std::mutex mu_;
  int64_t fault_countdown_ = 0;  // guarded by mu_; 0 = none pending
  FaultKind fault_kind_ = FaultKind::kRecoverable;
  std::atomic<int64_t> ops_run_{0};
  std::atomic<int64_t> ops_waited_for_{0};
  std::atomic<bool> device_lost_{false};
  std::atomic<int64_t> violations_{0};
  std::atomic<int> hanging_{0};
  std::condition_variable hang_cv_;  // with mu_
  bool hangs_released_ = false;      // guarded by mu_
  std::string first_violation_;  // guarded by mu_
};

class AsyncBackend final : public Backend {
 public:
  AsyncBackend(const AsyncBackendOptions& options, std::shared_ptr<AsyncBackendControl> control);
  ~AsyncBackend() override;

  std::string_view name() const override { return "cpu-async"; }
  absl::StatusOr<Tensor> UploadWeight(absl::Span<const TensorView> parts, int64_t cols) override;
  absl::StatusOr<Tensor> Allocate(int64_t rows, int64_t cols) override;
  absl::Status AllocateKvCache(int32_t num_layers, int32_t num_pages, int32_t page_size,
                               const AttentionShape& shape) override;
  int64_t KvPageBytes(int32_t num_layers, int32_t page_size,
                      const AttentionShape& shape) const override;
  absl::StatusOr<std::unique_ptr<BackendStream>> CreateStream(
      const StreamOptions& options) override;
  absl::Status BeginStep(BackendStream& stream, const BatchLayout& layout) override;
  absl::Status Embed(BackendStream& stream, absl::Span<const int32_t> tokens, const Tensor& table,
                     Tensor out) override;
  absl::Status RmsNorm(BackendStream& stream, const Tensor& x, const Tensor& weight, float eps,
                       Tensor out) override;
  absl::Status AddRmsNorm(BackendStream& stream, const Tensor& x, Tensor residual,
                          const Tensor& weight, float eps, Tensor out) override;
  absl::Status Linear(BackendStream& stream, const Tensor& x, const Tensor& weight,
                      const Tensor& bias, Tensor out) override;
  absl::Status RopeAndCacheKv(BackendStream& stream, int32_t layer, const Tensor& qkv,
                              const AttentionShape& shape, const RopeTables& rope,
                              Tensor q_out) override;
  absl::Status Attention(BackendStream& stream, int32_t layer, const Tensor& q,
                         const AttentionShape& shape, float scale, const AttentionPlan& plan,
                         Tensor out) override;
  absl::Status SiluMul(BackendStream& stream, const Tensor& gate_up, Tensor out) override;
  absl::Status GatherRows(BackendStream& stream, const Tensor& x, absl::Span<const int32_t> rows,
                          Tensor out) override;
  absl::Status CopyToHost(BackendStream& stream, const Tensor& x, absl::Span<float> out) override;
  absl::Status Logits(BackendStream& stream, const Tensor& x, const Tensor& lm_head,
                      absl::Span<float> host_out) override;
  absl::StatusOr<DeviceLogits> LogitsOnDevice(BackendStream& stream, const Tensor& x,
                                              const Tensor& lm_head) override;
  absl::Status CopyLogitsToHost(BackendStream& stream, const DeviceLogits& logits,
                                absl::Span<float> host_out) override;
  absl::Status Sample(BackendStream& stream, const DeviceLogits& logits,
                      absl::Span<const SampleRow> rows,
                      absl::Span<absl::StatusOr<SampledToken>> out) override;
  absl::Status Synchronize(BackendStream& stream) override;

  // The streams this backend makes (defined in the .cc file).
  class Stream;

 private:
  // The status every call returns once the device is lost (OK before).
  absl::Status LostStatus() const;
  // Checks the KV pages `layout` reads and writes against other streams' unsynchronized writes,
  // then records the pages it writes as unsynchronized writes of `stream`.
  void CheckAndRecordKvAccess(const Stream& stream, const BatchLayout& layout);
  // The host synchronized with `stream`: its writes are visible to every stream.
  void ReleaseKvWrites(const Stream& stream);

  // The KV ordering checker's state: per page, the stream with unsynchronized writes to it.
  std::mutex pages_mu_;
  std::vector<const Stream*> page_writer_;  // guarded by pages_mu_; [num_pages], null: none
  int32_t page_size_ = 0;

  AsyncBackendOptions options_;
  std::shared_ptr<AsyncBackendControl> control_;
  CpuBackend cpu_;
};

// Registers AsyncBackend under `name` (see RegisterBackend) with `options`; every backend it makes
// shares the returned control. Thread-safe.
std::shared_ptr<AsyncBackendControl> RegisterAsyncBackend(const std::string& name,
                                                          const AsyncBackendOptions& options);

}  // namespace sieve::engine::testing

#endif  // SIEVE_ENGINE_TESTING_ASYNC_BACKEND_H_
