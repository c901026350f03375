// Token sampling on the GPU: one row of fp32 logits in, one token id (and, when asked, its log
// probability and the top alternatives) out, for a batch of rows with their own parameters.
//
// The semantics are those of the engine's CPU reference (engine/sampling.h,
// SampleTokenWithUniform), step for step:
//   1. penalties, in place: for each listed token, repetition (x > 0 ? x / r : x * r) when r != 1,
//      then x -= frequency * generated_count, x -= presence when generated_count > 0;
//   2. scan: NaN or +inf anywhere, or every logit -inf, is the row's error (nothing is sampled);
//      the maximum and the argmax (ties to the lowest id);
//   3. log_softmax of the penalized logits for the chosen token and the top_logprobs best finite
//      tokens (higher logit first, ties to the lowest id);
//   4. greedy (temperature 0): the argmax; otherwise q = exp((x - max) / T), top-k (the k best by
//      the same order), top-p (the smallest best-first set whose mass reaches
//      (top_p - 1e-6) * mass of the top-k set), min-p (q >= min_p), then inverse CDF over the
//      kept tokens in ascending id order with the row's uniform: the first kept token whose
//      cumulative q exceeds uniform * (kept mass).
//
// Method: one thread block of kSampleThreads threads per row; each thread owns a contiguous range
// of ids, so block scans over per-thread sums give id-ordered prefix sums. Maxima and sums are
// block reductions (sums of probabilities in fp64). The top-k, top-p and top-logprobs boundaries
// are found by a radix select over the order-preserving integer image of the logits (four passes
// of 8 bits; the top-p pass weighs each token by its q, accumulated in 64-bit fixed point), then
// ties at the boundary value are resolved in id order by a block scan.
//
// Run never allocates and never synchronizes; it needs no workspace besides its arguments.
#ifndef SIEVE_KERNELS_CUDA_SAMPLING_H_
#define SIEVE_KERNELS_CUDA_SAMPLING_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace sieve::kernels {

// The most top alternatives one row may ask for.
inline constexpr int kSampleMaxTop = 20;
// Threads per row (one block).
inline constexpr int kSampleThreads = 1024;

// One row's sampling parameters (host-validated: temperature >= 0 and finite, top_k >= 0,
// top_p in (0, 1], min_p in [0, 1], repetition_penalty > 0, top_logprobs in [0, kSampleMaxTop]).
struct SampleRowParams {
  double uniform = 0.0;           // the draw, in [0, 1)
  int64_t logits_row = 0;         // which row of SampleParams::logits
  float temperature = 1.0f;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t top_k = 0;              // 0: off
  int32_t top_logprobs = 0;       // alternatives to report
  int32_t want_logprob = 0;       // nonzero: report the chosen token's logprob
  int32_t penalty_begin = 0;      // this row's entries: penalties[begin, begin + count)
  int32_t penalty_count = 0;
};

// One token a row penalizes: its id (in [0, vocab), distinct within a row) and how often it
// occurred. The host lists only tokens a penalty applies to.
struct PenaltyEntry {
  int32_t id = 0;
  int32_t prompt_count = 0;
  int32_t generated_count = 0;
};

// What a row's sampling found.
enum SampleStatus : int32_t {
  kSampleOk = 0,
  kSampleBadLogit = 1,   // NaN or +inf at error_index (the lowest such id), value error_value
  kSampleAllNegInf = 2,  // every logit is -inf
};

// One row's result.
struct SampleRowResult {
  int32_t status = kSampleOk;
  int32_t id = -1;               // the sampled token
  int32_t error_index = -1;
  float error_value = 0.0f;
  float logprob = 0.0f;          // log_softmax at id (when want_logprob or top_logprobs > 0)
  int32_t num_top = 0;           // alternatives written, best first
  int32_t top_ids[kSampleMaxTop] = {};
  float top_logprobs[kSampleMaxTop] = {};
};

// A batch of rows to sample. Pointers are device pointers.
struct SampleParams {
  float* logits = nullptr;                  // [*, vocab] fp32; penalized in place
  int64_t vocab = 0;                        // floats per row, >= 1
  const SampleRowParams* rows = nullptr;    // [num_rows]
  const PenaltyEntry* penalties = nullptr;  // entries the rows index
  SampleRowResult* results = nullptr;       // [num_rows], written
  int32_t num_rows = 0;
};

// Enqueues the sampling of every row on `stream` (num_rows == 0 launches nothing). Returns
// cudaErrorInvalidValue without launching on bad arguments, else the launch error.
cudaError_t SampleRun(const SampleParams& p, cudaStream_t stream);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_CUDA_SAMPLING_H_
