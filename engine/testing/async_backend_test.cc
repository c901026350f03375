// AsyncBackend itself: operators run after their call returns, waiting calls drain, the KV
// ordering checker flags cross-stream use of unsynchronized writes (and only that), and injected
// faults surface as documented.
#include "engine/testing/async_backend.h"

#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace sieve::engine::testing {
namespace {

constexpr int32_t kPageSize = 4;
constexpr int32_t kPages = 8;
constexpr int64_t kHidden = 8;
constexpr int64_t kVocab = 16;

class AsyncBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    control_ = std::make_shared<AsyncBackendControl>();
    AsyncBackendOptions o;
    o.max_latency_us = 20000;  // 20 ms: a step's operators sit queued long enough to look
    backend_ = std::make_unique<AsyncBackend>(o, control_);
    ASSERT_TRUE(backend_->AllocateKvCache(1, kPages, kPageSize, {1, 1, kHidden}).ok());
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1, 1);
    table_values_.resize(kVocab * kHidden);
    for (float& v : table_values_) v = u(rng);
    TensorView view{"embed", DType::kF32, {kVocab, kHidden},
                    absl::Span<const uint8_t>(
                        reinterpret_cast<const uint8_t*>(table_values_.data()),
                        table_values_.size() * sizeof(float))};
    auto table = backend_->UploadWeight({view}, kHidden);
    ASSERT_TRUE(table.ok()) << table.status();
    table_ = *table;
    auto out = backend_->Allocate(4, kHidden);
    ASSERT_TRUE(out.ok());
    out_ = *out;
    for (auto* s : {&a_, &b_}) {
      auto stream = backend_->CreateStream({});
      ASSERT_TRUE(stream.ok());
      *s = *std::move(stream);
    }
  }

  // One sequence of `kv_len` tokens on `pages`, whose last `new_tokens` this step computes.
  static BatchLayout Layout(std::vector<int32_t> pages, int32_t kv_len, int32_t new_tokens) {
    BatchLayout l;
    for (int32_t p = kv_len - new_tokens; p < kv_len; ++p) {
      l.positions.push_back(p);
      l.slots.push_back(int64_t{pages[p / kPageSize]} * kPageSize + p % kPageSize);
    }
    l.query_start = {0, new_tokens};
    l.kv_lens = {kv_len};
    l.page_table_stride = static_cast<int32_t>(pages.size());
    l.page_table = std::move(pages);
    return l;
  }

  const float* Out() const { return static_cast<const float*>(out_.data); }

  std::shared_ptr<AsyncBackendControl> control_;
  std::unique_ptr<AsyncBackend> backend_;
  std::vector<float> table_values_;
  Tensor table_, out_;
  std::unique_ptr<BackendStream> a_, b_;
};

TEST_F(AsyncBackendTest, OperatorsRunAfterTheCallReturnsAndSynchronizeWaitsForThem) {
  float* out = static_cast<float*>(out_.data);
  std::fill(out, out + 4 * kHidden, -7.0f);
  const BatchLayout layout = Layout({0}, 2, 2);
  const std::vector<int32_t> tokens = {3, 11};
  // Retry a few times in case the drawn latency was near zero.
  bool saw_pending = false;
  for (int attempt = 0; attempt < 5 && !saw_pending; ++attempt) {
    std::fill(out, out + 4 * kHidden, -7.0f);
    ASSERT_TRUE(backend_->BeginStep(*a_, layout).ok());
    ASSERT_TRUE(backend_->Embed(*a_, tokens, table_, out_.FirstRows(2)).ok());
    saw_pending = Out()[0] == -7.0f;
    ASSERT_TRUE(backend_->Synchronize(*a_).ok());
    for (int64_t c = 0; c < kHidden; ++c) {
      ASSERT_EQ(Out()[c], table_values_[3 * kHidden + c]);
      ASSERT_EQ(Out()[kHidden + c], table_values_[11 * kHidden + c]);
    }
  }
  EXPECT_TRUE(saw_pending) << "Embed ran before its call returned, five times";
  EXPECT_GT(control_->ops_run(), 0);
}

TEST_F(AsyncBackendTest, CheckerFlagsOnlyUnsynchronizedCrossStreamUse) {
  // Stream a writes page 2 (tokens 0-3 of a sequence).
  ASSERT_TRUE(backend_->BeginStep(*a_, Layout({2}, 4, 4)).ok());
  // The same stream may read its own pending writes: streams are ordered.
  ASSERT_TRUE(backend_->BeginStep(*a_, Layout({2, 5}, 5, 1)).ok());
  EXPECT_EQ(control_->violations(), 0);
  // Stream b reading page 2 before anyone waited for a: a violation.
  ASSERT_TRUE(backend_->BeginStep(*b_, Layout({2, 6}, 6, 2)).ok());
  EXPECT_EQ(control_->violations(), 1);
  EXPECT_NE(control_->first_violation().find("KV page 2"), std::string::npos);
  // Stream b writing page 5, which a's pending step writes: another.
  ASSERT_TRUE(backend_->BeginStep(*b_, Layout({5}, 1, 1)).ok());
  EXPECT_EQ(control_->violations(), 2);
  ASSERT_TRUE(backend_->Synchronize(*a_).ok());
  ASSERT_TRUE(backend_->Synchronize(*b_).ok());
  // After the host waited for both, anything goes.
  ASSERT_TRUE(backend_->BeginStep(*b_, Layout({2, 5}, 8, 3)).ok());
  ASSERT_TRUE(backend_->BeginStep(*a_, Layout({2, 7}, 6, 2)).ok());
  EXPECT_EQ(control_->violations(), 2);
  ASSERT_TRUE(backend_->Synchronize(*a_).ok());
  ASSERT_TRUE(backend_->Synchronize(*b_).ok());
}

TEST_F(AsyncBackendTest, RecoverableFaultIsReportedOnceByTheNextCall) {
  control_->InjectFault(2, FaultKind::kRecoverable);
  const std::vector<int32_t> tokens = {1};
  ASSERT_TRUE(backend_->BeginStep(*a_, Layout({0}, 1, 1)).ok());
  ASSERT_TRUE(backend_->Embed(*a_, tokens, table_, out_.FirstRows(1)).ok());  // fails later
  const absl::Status first = backend_->Synchronize(*a_);
  EXPECT_EQ(first.code(), absl::StatusCode::kInternal) << first;
  EXPECT_FALSE(IsDeviceLost(first));
  // Reported once; the stream and the device work again.
  ASSERT_TRUE(backend_->BeginStep(*a_, Layout({0}, 1, 1)).ok());
  ASSERT_TRUE(backend_->Embed(*a_, tokens, table_, out_.FirstRows(1)).ok());
  EXPECT_TRUE(backend_->Synchronize(*a_).ok());
  EXPECT_EQ(Out()[0], table_values_[kHidden]);
  EXPECT_FALSE(control_->device_lost());
}

TEST_F(AsyncBackendTest, FatalFaultLosesTheDeviceForEveryLaterCall) {
  control_->InjectFault(1, FaultKind::kFatal);
  ASSERT_TRUE(backend_->BeginStep(*a_, Layout({0}, 1, 1)).ok());
  const absl::Status lost = backend_->Synchronize(*a_);
  EXPECT_TRUE(IsDeviceLost(lost)) << lost;
  EXPECT_EQ(lost.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(control_->device_lost());
  EXPECT_TRUE(IsDeviceLost(backend_->BeginStep(*b_, Layout({1}, 1, 1))));
  EXPECT_TRUE(IsDeviceLost(backend_->Synchronize(*b_)));
  EXPECT_TRUE(IsDeviceLost(backend_->Allocate(1, 1).status()));
  EXPECT_FALSE(IsDeviceLost(absl::UnavailableError("draining")));
}

}  // namespace
}  // namespace sieve::engine::testing
