// What the CUDA backend's sparse-attention GPU tests (cuda_*_gpu_test.cc) share: the test seed,
// random device tensors, RoPE tables, sequences on shuffled pages and one step's batch layout.
// Header-only, tests only.
#ifndef SIEVE_ENGINE_BACKENDS_CUDA_CUDA_TEST_UTIL_H_
#define SIEVE_ENGINE_BACKENDS_CUDA_CUDA_TEST_UTIL_H_

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/backends/backend.h"
#include "engine/model/rope.h"
#include "engine/model/safetensors.h"

namespace sieve::engine::cuda_test {

// SIEVE_TEST_SEED, or a fixed default.
inline uint64_t Seed() {
  const char* env = std::getenv("SIEVE_TEST_SEED");
  return env ? std::strtoull(env, nullptr, 10) : 20261205ull;
}

// A device tensor holding `rows` x `cols` random values (through UploadWeight).
inline absl::StatusOr<Tensor> RandomTensor(Backend& b, int64_t rows, int64_t cols,
                                           std::mt19937_64& rng) {
  std::vector<float> host(rows * cols);
  std::uniform_real_distribution<float> u(-1.7f, 1.7f);
  for (float& x : host) x = u(rng);
  TensorView v;
  v.name = "random";
  v.dtype = DType::kF32;
  v.shape = {rows, cols};
  v.bytes = absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(host.data()),
                                host.size() * sizeof(float));
  return b.UploadWeight({v}, cols);
}

// Layout of one step: sequence s, over pages[s] of `page` tokens, writes positions
// [first[s], first[s] + count[s]).
inline BatchLayout StepLayout(const std::vector<std::vector<int32_t>>& pages,
                              const std::vector<int>& first, const std::vector<int>& count,
                              int page) {
  BatchLayout l;
  l.page_table_stride = 0;
  for (const auto& p : pages) {
    l.page_table_stride = std::max<int32_t>(l.page_table_stride, p.size());
  }
  l.query_start.push_back(0);
  for (size_t s = 0; s < pages.size(); ++s) {
    for (int t = first[s]; t < first[s] + count[s]; ++t) {
      l.positions.push_back(t);
      l.slots.push_back(int64_t{pages[s][t / page]} * page + t % page);
    }
    l.query_start.push_back(l.query_start.back() + count[s]);
    l.kv_lens.push_back(first[s] + count[s]);
    std::vector<int32_t> row = pages[s];
    row.resize(l.page_table_stride, pages[s].front());
    l.page_table.insert(l.page_table.end(), row.begin(), row.end());
  }
  return l;
}

// The RoPE tables of the tests' layers: theta 500000 over the whole head.
inline absl::StatusOr<RopeTables> TestRope(int head_dim) {
  RopeParams rp;
  rp.theta = 500000.0;
  rp.rotary_dim = head_dim;
  return ComputeRopeTables(rp);
}

// Pages for sequences that will hold final_len[s] tokens, each `page` tokens: distinct ids
// taken in order from a shuffle of [0, num_pages). Empty when they do not all fit.
inline std::vector<std::vector<int32_t>> ShuffledPages(const std::vector<int>& final_len,
                                                       int num_pages, int page,
                                                       std::mt19937_64& rng) {
  std::vector<int32_t> ids(num_pages);
  for (int i = 0; i < num_pages; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<std::vector<int32_t>> pages(final_len.size());
  int next = 0;
  for (size_t s = 0; s < final_len.size(); ++s) {
    for (int p = 0; p * page < final_len[s]; ++p) {
      if (next == num_pages) return {};
      pages[s].push_back(ids[next++]);
    }
  }
  return pages;
}

// Begins step `l` on `stream` and caches layer 0's keys and values of random q/k/v rows (RoPE
// applied), returning the step's rotated queries [tokens, Hq * D].
inline absl::StatusOr<Tensor> BeginStepWithRandomQkv(Backend& b, BackendStream& stream,
                                                     const BatchLayout& l,
                                                     const AttentionShape& shape,
                                                     const RopeTables& rope,
                                                     std::mt19937_64& rng) {
  absl::Status st = b.BeginStep(stream, l);
  if (!st.ok()) return st;
  const int64_t d = shape.head_dim;
  auto qkv = RandomTensor(b, l.num_tokens(), (shape.num_q_heads + 2 * shape.num_kv_heads) * d,
                          rng);
  if (!qkv.ok()) return qkv.status();
  auto q = b.Allocate(l.num_tokens(), shape.num_q_heads * d);
  if (!q.ok()) return q.status();
  st = b.RopeAndCacheKv(stream, 0, *qkv, shape, rope, *q);
  if (!st.ok()) return st;
  return q;
}

}  // namespace sieve::engine::cuda_test

#endif  // SIEVE_ENGINE_BACKENDS_CUDA_CUDA_TEST_UTIL_H_
