// MInference's offline, kernel-aware pattern search (SPARSE_ATTENTION.md section 1.3, the
// current "v2" objective): for one layer's prefill, every candidate pattern runs through the real
// plan builder and attention kernel (BuildPlan + PagedAttentionCpu), and each query head keeps
// the first candidate, in list order, with the fewest output elements that differ from dense
// attention by more than `threshold` (5e-3 in the reference).
#ifndef SIEVE_KERNELS_SPARSE_MINFERENCE_SEARCH_H_
#define SIEVE_KERNELS_SPARSE_MINFERENCE_SEARCH_H_

#include <cstdint>
#include <vector>

#include "kernels/attention/paged_attention.h"
#include "kernels/sparse/minference.h"

namespace sieve::kernels::minference {

constexpr float kSearchThreshold = 5e-3f;

// The reference's v2 candidates in its order: A-shape (100, 800); VS (30, 800), (100, 800),
// (100, 750), (500, 700), (3500, 100), (1000, 4096); block-sparse top-100.
std::vector<HeadPattern> DefaultSearchCandidates();

struct HeadSearchResult {
  int32_t best = 0;             // index of the chosen candidate
  std::vector<int64_t> errors;  // per candidate: elements with |sparse - dense| > threshold
};

// errors[h] += elements of head h with |sparse - dense| > threshold, over outputs laid out
// [tokens, num_heads, head_dim].
void CountErrors(const float* dense, const float* sparse, int64_t tokens, int num_heads,
                 int head_dim, float threshold, int64_t* errors);

// The first index with the strictly lowest count (list order breaks ties).
int32_t BestCandidate(const std::vector<int64_t>& errors);

// One result per query head of p (q, k_cache, v_cache, page table of the layer; p.out and
// p.sparse are ignored), with `candidates` applied to every head at once. Allocates two output
// buffers the size of q. fp32 caches only: options.k_dtype must be kFloat32 (the attention it
// runs reads p.k_cache and p.v_cache as fp32; `sieve calibrate` goes through the backend).
std::vector<HeadSearchResult> SearchPatterns(const PagedAttentionParams<float>& p,
                                             const std::vector<HeadPattern>& candidates,
                                             float threshold, const Options& options);

}  // namespace sieve::kernels::minference

#endif  // SIEVE_KERNELS_SPARSE_MINFERENCE_SEARCH_H_
