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
// Method: a row is cut into contiguous id ranges, one per thread, so that scans over threads in
// order give id-ordered prefix sums. Maxima and counts are reductions; every sum of
// probabilities is a sum of 64-bit fixed-point integers (each token's q rounded once to
// 2^-(63 - ceil(log2 vocab)), so the whole row sums below 2^63), which is exact and so does not
// depend on the order or the grouping of the additions. The top-k, top-p and top-logprobs
// boundaries are found by a radix select over the order-preserving integer image of the logits
// (four passes of 8 bits; the top-p pass weighs each token by its fixed-point q), then ties at the
// boundary key are ranked in id order by a scan. The fixed point is coarser than fp32 q by far
// less than the 1e-6 relative window within which the GPU test lets a draw go either way: every
// cumulative mass is off by at most vocab * 2^-(64 - ceil(log2 vocab)) of the kept mass (about
// 2.2e-9 at 152064 tokens), since the kept mass is at least the argmax's q = 1.
//
// Two kernels share that code (sampling.cu):
//   - one block of kSampleThreads threads per row: for large batches (every SM already busy);
//   - several blocks per row (small batches): each block owns a contiguous slice of the row and
//     its threads sub-slices of it; a row's blocks exchange per-block partial results (counts,
//     maxima, fixed-point sums, radix histograms) through a workspace and meet at a barrier of
//     their own (an arrival counter and a generation word per row). The launch is cooperative,
//     so all blocks are resident at once and the spinning barrier cannot deadlock. Because every
//     combined quantity is an exact integer (or a max / min), the multi-block kernel computes the
//     same bits as the one-block kernel: the same ids, logprobs and alternatives.
//
// Plan / run: SamplePlanForCurrentDevice() decides, from the device alone, how many blocks a row
// may get and the workspace size; SampleRun() never allocates and never synchronizes.
#ifndef SIEVE_KERNELS_CUDA_SAMPLING_H_
#define SIEVE_KERNELS_CUDA_SAMPLING_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace sieve::kernels {

// The most top alternatives one row may ask for.
inline constexpr int kSampleMaxTop = 20;
// Threads per block.
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

// How SampleRun spreads rows over thread blocks on one device, and the workspace it needs.
struct SamplePlan {
  int32_t max_rows = 0;            // most rows that take the multi-block kernel
  int32_t max_blocks_per_row = 1;  // most blocks one row gets (1: always the one-block kernel)
  int32_t coresident_blocks = 0;   // blocks of the multi-block kernel the device holds at once
  size_t workspace_bytes = 0;      // 0 when max_blocks_per_row == 1
};

struct SamplePlanOptions {
  // Most blocks one row may get: 0 chooses (as many as fit on the device, at most one per
  // kSampleThreads ids); 1 forces the one-block kernel; n > 1 caps the split at n.
  int32_t max_blocks_per_row = 0;
};

// The most rows the multi-block kernel takes (more rows fill the device with one block each).
inline constexpr int32_t kSampleMaxMultiRows = 64;
// The most blocks one row may get.
inline constexpr int32_t kSampleMaxBlocksPerRow = 256;

// Makes a plan from the device's counts: `num_sms` multiprocessors, each holding
// `blocks_per_sm` blocks of the multi-block kernel, cooperative launches supported or not.
// Depends only on its arguments.
SamplePlan MakeSamplePlan(int num_sms, int blocks_per_sm, bool cooperative,
                          const SamplePlanOptions& options);

// Makes the plan for the current device (host-side queries only: attributes and the kernel's
// occupancy; never synchronizes).
cudaError_t SamplePlanForCurrentDevice(const SamplePlanOptions& options, SamplePlan* plan);

// The blocks each row gets when `num_rows` rows of `vocab` ids run with `plan`: 1 means the
// one-block kernel. At most ceil(vocab / kSampleThreads) and plan.coresident_blocks / num_rows.
int32_t SampleBlocksPerRow(const SamplePlan& plan, int32_t num_rows, int64_t vocab);

// Enqueues the sampling of every row on `stream` (num_rows == 0 launches nothing), with the
// kernel `plan` picks for p.num_rows rows. `workspace`: plan.workspace_bytes bytes of device
// memory, 256-byte aligned, zero-filled once before its first run (runs leave the words that must
// stay zero as they found them; the rest is scratch), used by one run at a time; it may be null
// when plan.workspace_bytes == 0. The plan must have been made for the device that runs the
// work; if the device then holds fewer blocks at once (shared by other processes), the launch
// falls back to the one-block kernel. Returns cudaErrorInvalidValue without launching on bad
// arguments, else the launch error.
cudaError_t SampleRun(const SampleParams& p, const SamplePlan& plan, void* workspace,
                      cudaStream_t stream);

// The one-block kernel alone: SampleRun with the default SamplePlan (max_blocks_per_row 1).
cudaError_t SampleRun(const SampleParams& p, cudaStream_t stream);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_CUDA_SAMPLING_H_
