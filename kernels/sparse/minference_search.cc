#include "kernels/sparse/minference_search.h"

#include <cmath>

#include "kernels/attention/paged_attention_cpu.h"

namespace sieve::kernels::minference {

std::vector<HeadPattern> DefaultSearchCandidates() {
  return {{Pattern::kAShape, 100, 800},         {Pattern::kVerticalSlash, 30, 800},
          {Pattern::kVerticalSlash, 100, 800},  {Pattern::kVerticalSlash, 100, 750},
          {Pattern::kVerticalSlash, 500, 700},  {Pattern::kVerticalSlash, 3500, 100},
          {Pattern::kVerticalSlash, 1000, 4096}, {Pattern::kBlockSparse, 100, 0}};
}

std::vector<HeadSearchResult> SearchPatterns(const PagedAttentionParams<float>& p,
                                             const std::vector<HeadPattern>& candidates,
                                             float threshold, const Options& options) {
  const int hq = p.num_q_heads, d = p.head_dim;
  const int64_t tokens = p.query_start[p.num_seqs];
  const size_t size = static_cast<size_t>(tokens) * hq * d;
  std::vector<float> dense(size), sparse(size);
  PagedAttentionParams<float> q = p;
  q.sparse = nullptr;
  q.out = dense.data();
  PagedAttentionCpu(q, options.num_threads);
  std::vector<HeadSearchResult> result(hq);
  for (HeadSearchResult& r : result) r.errors.assign(candidates.size(), 0);
  MInferencePlan plan;
  for (size_t c = 0; c < candidates.size(); ++c) {
    const std::vector<HeadPattern> all(hq, candidates[c]);
    BuildPlan(p, all.data(), options, &plan);
    const SparseAttentionIndex x = plan.View();
    q.sparse = &x;
    q.out = sparse.data();
    PagedAttentionCpu(q, options.num_threads);
    std::vector<int64_t> errors(hq, 0);
    CountErrors(dense.data(), sparse.data(), tokens, hq, d, threshold, errors.data());
    for (int h = 0; h < hq; ++h) result[h].errors[c] = errors[h];
  }
  for (HeadSearchResult& r : result) r.best = BestCandidate(r.errors);
  return result;
}

void CountErrors(const float* dense, const float* sparse, int64_t tokens, int num_heads,
                 int head_dim, float threshold, int64_t* errors) {
  for (int64_t t = 0; t < tokens; ++t) {
    for (int h = 0; h < num_heads; ++h) {
      const size_t off = (static_cast<size_t>(t) * num_heads + h) * head_dim;
      int64_t bad = 0;
      for (int i = 0; i < head_dim; ++i) bad += std::abs(sparse[off + i] - dense[off + i]) > threshold;
      errors[h] += bad;
    }
  }
}

int32_t BestCandidate(const std::vector<int64_t>& errors) {
  int32_t best = 0;
  for (size_t c = 1; c < errors.size(); ++c) {
    if (errors[c] < errors[best]) best = static_cast<int32_t>(c);  // strictly lower
  }
  return best;
}

}  // namespace sieve::kernels::minference
