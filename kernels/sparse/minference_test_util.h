// Test helpers for the MInference tests: a paged batch of sequences with random q, K, V
// (kernels/attention/paged_kv_test_util.h), the key set a plan row gives each query, and the set
// section 1.6 defines.
#ifndef SIEVE_KERNELS_SPARSE_MINFERENCE_TEST_UTIL_H_
#define SIEVE_KERNELS_SPARSE_MINFERENCE_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_kv_test_util.h"
#include "kernels/sparse/minference.h"

namespace sieve::kernels::minference::testing {

// Sequences in a shuffled paged cache; q, K, V uniform in [-1, 1] (the shared builder).
using SeqShape = test_util::SeqLens;
using Batch = test_util::PagedBatch;

// The keys query position `pos` reads in plan row `row` (listed blocks and columns, <= pos).
inline std::vector<int32_t> RowKeys(const MInferencePlan& plan, int64_t row, int32_t pos) {
  std::vector<int32_t> keys;
  for (int32_t i = plan.row_start[row]; i < plan.row_start[row + 1]; ++i) {
    for (int32_t t = plan.key_blocks[i] * kBlock; t < (plan.key_blocks[i] + 1) * kBlock; ++t) {
      if (t <= pos) keys.push_back(t);
    }
  }
  for (int32_t i = plan.column_start[row]; i < plan.column_start[row + 1]; ++i) {
    if (plan.columns[i] <= pos) keys.push_back(plan.columns[i]);
  }
  std::sort(keys.begin(), keys.end());
  return keys;
}

// S_i of section 1.6 for a query at `pos` (< n keys) from a block's converted key lists.
inline std::vector<int32_t> SpecKeys(const BlockKeys& b, int32_t pos, int32_t n) {
  std::vector<int32_t> keys;
  for (size_t r = 0; r < b.range_start.size(); ++r) {
    for (int32_t t = b.range_start[r]; t < b.range_end[r]; ++t) {
      if (t <= pos && t < n) keys.push_back(t);
    }
  }
  for (int32_t c : b.columns) {
    if (c <= pos) keys.push_back(c);
  }
  std::sort(keys.begin(), keys.end());
  return keys;
}

// Per-row relative L2 error of out against ref, worst row.
inline double WorstRelError(const std::vector<float>& out, const std::vector<float>& ref, int d) {
  double worst = 0;
  for (size_t r = 0; r < ref.size() / d; ++r) {
    double err = 0, norm = 0;
    for (int i = 0; i < d; ++i) {
      const double a = out[r * d + i], b = ref[r * d + i];
      err += (a - b) * (a - b);
      norm += b * b;
    }
    worst = std::max(worst, norm == 0 ? std::sqrt(err) : std::sqrt(err / norm));
  }
  return worst;
}

}  // namespace sieve::kernels::minference::testing

#endif  // SIEVE_KERNELS_SPARSE_MINFERENCE_TEST_UTIL_H_
