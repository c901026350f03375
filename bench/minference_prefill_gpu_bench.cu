// MInference vertical-slash prefill on the GPU against dense prefill, measured in the same run.
//
// One Llama-3.1-8B attention layer (32 query heads, 8 KV heads, head dim 128, bf16, page 16), one
// fresh prompt of 32K and 128K tokens (--tokens to change) with the structure real attention has
// (bench/structured_attention.h, parameters printed), every head vertical-slash at each budget
// (vertical_size, slash_size) of --budgets (default 1000/6096 and 100/800). Timed:
//   dense_wgmma  PagedPrefillRun, the Hopper wgmma kernel (the production dense path; device
//                events, median of --iters, of at most 3 above 32K tokens)
//   dense_mma    PagedPrefillRun, the mma.sync kernel (the inner loop the sparse run shares)
//   estimate     MInferenceVsScoresGpu: the last 64 queries against all keys, every head
//                (device events)
//   d2h          the scores (2 x 32 x tokens floats) to pinned host memory (device events)
//   select_host  BuildPlanFromScores on all host threads: top-k with forced entries, the
//                section 1.6 conversion, the plan (host clock, median of --iters)
//   h2d          the plan's arrays to the device (host clock around a synchronous copy)
//   sparse       PagedPrefillRun on that plan (mma.sync, 64-query-row mode; device events)
// and, on their own lines per budget, the index built on the device as the backend does by
// default (count, fill, the plan's copy to the host), checked equal to the host plan, and the
// device-resident plan of a one-sequence step (count, fill, pair count; nothing copied back).
// Reported: density (query-key pairs the plan reads / causal pairs), index = estimate + d2h +
// select_host + h2d (the engine's path today, cuda_minference.cc), end2end = dense_wgmma /
// (index + sparse), sparse/mma = dense_mma / sparse, pair parity = dense_mma / (sparse /
// density) (1.0: the sparse kernel computes a pair as fast as the dense one). Checked in the
// same run (PASS / FAIL, exit status 1 on a FAIL), at lengths up to 32K: the GPU scores of
// heads 0 and 31 against VsScoresRef (fp64) on the same bf16 values, relative 2e-4 per score
// (the bound minference_gpu_test.cc derives), and the selections made from both equal up to ties
// within that tolerance of the cut.
//
//   usage: minference_prefill_gpu_bench [--iters N] [--tokens N[,N...]]
//                                       [--budgets V/S[,V/S...]]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "bench/bench_cuda.cuh"
#include "bench/structured_attention.h"
#include "kernels/attention/paged_prefill.h"
#include "kernels/cpu/half.h"
#include "kernels/sparse/minference.h"
#include "kernels/sparse/minference_cuda.h"

namespace {

using namespace sieve::kernels;  // NOLINT: a benchmark's one translation unit
namespace mi = sieve::kernels::minference;

constexpr int kHq = 32, kHkv = 8, kD = 128, kPage = 16;
constexpr double kScoreRelTol = 2e-4;

using sieve::bench::MedianMs;

template <typename Fn>
double MedianHostMs(int iters, Fn run) {
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

template <typename T>
T* Upload(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// The GPU selection against the fp64 one: equal except items within the tolerance of the cut.
bool SameUpToTies(const std::vector<int32_t>& gpu, const std::vector<int32_t>& ref,
                  const std::vector<double>& score, int forced) {
  if (gpu.size() != ref.size()) return false;
  double cut = std::numeric_limits<double>::infinity();
  for (int32_t i : ref) {
    if (i >= forced) cut = std::min(cut, score[i]);
  }
  const std::set<int32_t> r(ref.begin(), ref.end());
  for (int32_t i : gpu) {
    if (r.count(i) == 0 && score[i] < cut * (1 - 2 * kScoreRelTol)) return false;
  }
  return true;
}


// The index on the device, as the CUDA backend builds it (cuda_minference.cc, IndexOnDevice): the
// selection and row counts (MInferenceIndexCountGpu), the two totals to the host, the rows
// (MInferenceIndexFillGpu), then either the whole plan copied to the host (a step of several
// sequences) or, for a step of one sequence, only its pair count (MInferencePlanPairsGpu: the
// plan stays on the device); each timed, the device plan checked equal to the host's
// BuildPlanFromScores plan and its pair count to PlanPairs. The end-to-end figure of the
// device-resident path: dense_wgmma / (estimate + count + fill + pairs + sparse).
bool DeviceIndex(int tokens, int vs, int ss, const float* d_scores, size_t n,
                 const mi::MInferencePlan& want, int64_t want_pairs, double estimate,
                 double sparse, double dense_wg) {
  MInferenceIndexGpuParams ip;
  ip.vertical = d_scores;
  ip.slash = d_scores + n;
  ip.num_heads = kHq;
  ip.q_len = tokens;
  ip.kv_len = tokens;
  for (int h = 0; h < kHq; ++h) {
    ip.pattern[h] = 0;
    ip.vertical_size[h] = vs;
    ip.slash_size[h] = ss;
  }
  const size_t rows = static_cast<size_t>((tokens + mi::kBlock - 1) / mi::kBlock) * kHq;
  const size_t ws_bytes = MInferenceIndexGpuWorkspaceBytes(ip);
  void* ws = nullptr;
  int32_t *d_rs = nullptr, *d_cs = nullptr, *d_kb = nullptr, *d_cl = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
  CHECK_CUDA(cudaMalloc(&d_rs, (rows + 1) * 4));
  CHECK_CUDA(cudaMalloc(&d_cs, (rows + 1) * 4));
  const double count = MedianMs(3, [&] {
    CHECK_CUDA(MInferenceIndexCountGpu(ip, ws, ws_bytes, d_rs, d_cs, nullptr));
  });
  int32_t totals[2];
  CHECK_CUDA(cudaMemcpy(&totals[0], d_rs + rows, 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(&totals[1], d_cs + rows, 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMalloc(&d_kb, std::max<size_t>(totals[0], 1) * 4));
  CHECK_CUDA(cudaMalloc(&d_cl, std::max<size_t>(totals[1], 1) * 4));
  const double fill = MedianMs(3, [&] {
    CHECK_CUDA(MInferenceIndexFillGpu(ip, ws, d_rs, d_cs, d_kb, d_cl, nullptr));
  });
  mi::MInferencePlan got;
  const double to_host = MedianHostMs(1, [&] {
    got.row_start.resize(rows + 1);
    got.column_start.resize(rows + 1);
    got.key_blocks.resize(totals[0]);
    got.columns.resize(totals[1]);
    CHECK_CUDA(cudaMemcpy(got.row_start.data(), d_rs, (rows + 1) * 4, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(got.column_start.data(), d_cs, (rows + 1) * 4, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(got.key_blocks.data(), d_kb, got.key_blocks.size() * 4,
                          cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(got.columns.data(), d_cl, got.columns.size() * 4,
                          cudaMemcpyDeviceToHost));
  });
  const bool same = got.row_start == want.row_start && got.column_start == want.column_start &&
                    got.key_blocks == want.key_blocks && got.columns == want.columns;
  std::printf("device index %6d %5d/%-5d: count %.3f ms, fill %.3f ms, plan to host %.3f ms "
              "(%d key blocks, %d columns); device plan == host plan: %s\n",
              tokens, vs, ss, count, fill, to_host, totals[0], totals[1], same ? "PASS" : "FAIL");
  unsigned long long* d_pairs = nullptr;
  CHECK_CUDA(cudaMalloc(&d_pairs, sizeof(*d_pairs)));
  const double pairs_ms = MedianMs(3, [&] {
    CHECK_CUDA(MInferencePlanPairsGpu(ip, d_rs, d_kb, d_cs, d_cl, d_pairs, nullptr));
  });
  unsigned long long pairs = 0;
  CHECK_CUDA(cudaMemcpy(&pairs, d_pairs, sizeof(pairs), cudaMemcpyDeviceToHost));
  const bool pairs_ok = static_cast<int64_t>(pairs) == want_pairs;
  const double index = estimate + count + fill + pairs_ms;
  std::printf("device-resident %6d %5d/%-5d: pairs %.3f ms (%llu; == PlanPairs: %s); index "
              "(estimate + count + fill + pairs) %.3f ms + sparse %.3f ms: end2end %.2fx dense "
              "wgmma\n",
              tokens, vs, ss, pairs_ms, pairs, pairs_ok ? "PASS" : "FAIL", index, sparse,
              dense_wg / (index + sparse));
  for (void* ptr : {ws, static_cast<void*>(d_rs), static_cast<void*>(d_cs),
                    static_cast<void*>(d_kb), static_cast<void*>(d_cl),
                    static_cast<void*>(d_pairs)}) {
    CHECK_CUDA(cudaFree(ptr));
  }
  return same && pairs_ok;
}

bool RunLength(int tokens, int iters, const std::vector<std::pair<int, int>>& budgets, int sms,
               bool first) {
  sieve::bench::StructuredAttentionParams sp;
  sp.tokens = tokens;
  sieve::bench::StructuredAttention in = sieve::bench::MakeStructuredAttention(sp);
  if (first) std::printf("inputs: %s\n", sp.Describe().c_str());
  // The values the GPU sees, for the reference check.
  for (auto* vec : {&in.q, &in.k}) {
    for (float& x : *vec) x = Bf16ToFloat(FloatToBf16(x));
  }
  // Pages in order: page j holds positions [16 j, 16 j + 16).
  const int pages = (tokens + kPage - 1) / kPage;
  std::vector<int32_t> table(pages);
  for (int i = 0; i < pages; ++i) table[i] = i;
  auto upload_bf16 = [](const std::vector<float>& f) {
    std::vector<uint16_t> h(f.size());
    for (size_t i = 0; i < f.size(); ++i) h[i] = FloatToBf16(f[i]);
    return reinterpret_cast<__nv_bfloat16*>(Upload(h));
  };
  __nv_bfloat16 *q = upload_bf16(in.q), *k = upload_bf16(in.k), *v = upload_bf16(in.v), *out;
  CHECK_CUDA(cudaMalloc(&out, in.q.size() * 2));
  int32_t* d_table = Upload(table);
  int32_t* d_kv = Upload(std::vector<int32_t>{tokens});
  int32_t* d_qs = Upload(std::vector<int32_t>{0, tokens});
  PagedAttentionParams<__nv_bfloat16> p;
  p.q = q;
  p.k_cache = k;
  p.v_cache = v;
  p.out = out;
  p.page_table = d_table;
  p.kv_lens = d_kv;
  p.query_start = d_qs;
  p.page_table_stride = pages;
  p.num_seqs = 1;
  p.num_q_heads = kHq;
  p.num_kv_heads = kHkv;
  p.head_dim = kD;
  p.page_size = kPage;
  p.scale = 0.08838834764f;
  const PagedPrefillShape shape{1, kHq, kHkv, kD, tokens};
  const PagedPrefillPlan wg = Plan(shape, sms, PagedPrefillKernel::kWgmma);
  const PagedPrefillPlan mma = Plan(shape, sms, PagedPrefillKernel::kMmaSync);
  const int slow_iters = tokens > 32768 ? std::min(iters, 3) : iters;
  const double dense_wg =
      MedianMs(slow_iters, [&] { CHECK_CUDA(PagedPrefillRun(p, wg, nullptr, nullptr)); });
  const double dense_mma =
      MedianMs(slow_iters, [&] { CHECK_CUDA(PagedPrefillRun(p, mma, nullptr, nullptr)); });

  // The estimate (the same for every budget).
  MInferenceVsGpuParams ep;
  ep.q = q;
  ep.q_row_stride = kHq * kD;
  ep.k_cache = k;
  ep.page_table = d_table;
  ep.page_size = kPage;
  ep.num_q_heads = kHq;
  ep.num_kv_heads = kHkv;
  ep.head_dim = kD;
  ep.q_len = tokens;
  ep.kv_len = tokens;
  const size_t n = static_cast<size_t>(kHq) * tokens;
  const size_t ws_bytes = MInferenceVsGpuWorkspaceBytes(ep);
  float *d_scores = nullptr, *h_scores = nullptr;
  void* d_ws = nullptr;
  CHECK_CUDA(cudaMalloc(&d_scores, 2 * n * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_ws, ws_bytes));
  CHECK_CUDA(cudaMallocHost(&h_scores, 2 * n * sizeof(float)));
  CHECK_CUDA(cudaMemset(d_scores, 0xff, 2 * n * sizeof(float)));  // NaN: every score is written
  const double estimate = MedianMs(iters, [&] {
    CHECK_CUDA(MInferenceVsScoresGpu(ep, d_scores, d_scores + n, d_ws, ws_bytes, nullptr));
  });
  const double d2h = MedianMs(iters, [&] {
    CHECK_CUDA(cudaMemcpyAsync(h_scores, d_scores, 2 * n * sizeof(float),
                               cudaMemcpyDeviceToHost, nullptr));
  });
  CHECK_CUDA(cudaDeviceSynchronize());
  const float* vertical = h_scores;
  const float* slash = h_scores + n;

  bool ok = true;
  if (tokens <= 32768) {
    // Heads 0 and 31 against the fp64 reference on the same values.
    sieve::kernels::PagedAttentionParams<float> rp;
    const int32_t kv = tokens, qs[2] = {0, tokens};
    rp.q = in.q.data();
    rp.k_cache = in.k.data();
    rp.page_table = table.data();
    rp.page_table_stride = pages;
    rp.kv_lens = &kv;
    rp.query_start = qs;
    rp.num_seqs = 1;
    rp.num_q_heads = kHq;
    rp.num_kv_heads = kHkv;
    rp.head_dim = kD;
    rp.page_size = kPage;
    rp.scale = p.scale;
    for (int h : {0, kHq - 1}) {
      mi::VsScores ref;
      mi::VsScoresRef(rp, 0, h, mi::kDefaultLastQ, &ref);
      const float* gv = vertical + static_cast<size_t>(h) * tokens;
      const float* gs = slash + static_cast<size_t>(h) * tokens;
      int bad = 0;
      for (int j = 0; j < tokens; ++j) {
        bad += !(std::abs(gv[j] - ref.vertical[j]) <= kScoreRelTol * ref.vertical[j]);
        bad += !(std::abs(gs[j] - ref.slash[j]) <= kScoreRelTol * ref.slash[j]);
      }
      bool same = true;
      for (const auto& [vs, ss] : budgets) {
        const mi::VsIndex a = mi::SelectVs(gv, gs, tokens, vs, ss);
        const mi::VsIndex b = mi::SelectVs(ref.vertical.data(), ref.slash.data(), tokens, vs, ss);
        same = same && SameUpToTies(a.vertical, b.vertical, ref.vertical, mi::kForcedColumns) &&
               SameUpToTies(a.slash, b.slash, ref.slash, mi::kForcedDiagonals);
      }
      std::printf("check %6d: head %d GPU scores vs fp64 (%d off by > 2e-4 rel), selections "
                  "equal up to ties: %s\n",
                  tokens, h, bad, bad == 0 && same ? "PASS" : "FAIL");
      ok = ok && bad == 0 && same;
    }
  }

  for (const auto& [vs, ss] : budgets) {
    std::vector<mi::HeadPattern> pats(kHq, {mi::Pattern::kVerticalSlash, vs, ss});
    const int32_t kv = tokens, qs[2] = {0, tokens};
    sieve::kernels::PagedAttentionParams<float> lp;
    lp.kv_lens = &kv;
    lp.query_start = qs;
    lp.num_seqs = 1;
    lp.num_q_heads = kHq;
    lp.num_kv_heads = kHkv;
    lp.head_dim = kD;
    lp.page_size = kPage;
    mi::MInferencePlan plan;
    const double select_host = MedianHostMs(std::min(iters, 3), [&] {
      if (!mi::BuildPlanFromScores(lp, pats.data(), vertical, slash, mi::Options{}, &plan)) {
        std::fprintf(stderr, "BuildPlanFromScores refused the plan\n");
        std::exit(1);
      }
    });
    const double density =
        static_cast<double>(mi::PlanPairs(lp, plan)) / static_cast<double>(mi::DensePairs(lp));
    int32_t *d_qbs = nullptr, *d_rs = nullptr, *d_kb = nullptr, *d_cs = nullptr, *d_cl = nullptr;
    const double h2d = MedianHostMs(1, [&] {
      d_qbs = Upload(plan.query_block_start);
      d_rs = Upload(plan.row_start);
      d_kb = Upload(plan.key_blocks);
      d_cs = Upload(plan.column_start);
      d_cl = Upload(plan.columns);
    });
    SparseAttentionIndex idx;
    idx.query_block = mi::kBlock;
    idx.key_block = mi::kBlock;
    idx.query_block_start = d_qbs;
    idx.row_start = d_rs;
    idx.key_blocks = d_kb;
    idx.column_start = d_cs;
    idx.columns = d_cl;
    PagedAttentionParams<__nv_bfloat16> ps = p;
    ps.sparse = &idx;
    const double sparse =
        MedianMs(iters, [&] { CHECK_CUDA(PagedPrefillRun(ps, mma, nullptr, nullptr)); });
    const double index = estimate + d2h + select_host + h2d;
    std::printf("%6d %5d/%-5d %11.2f %9.2f %9.3f %7.3f %11.2f %7.2f %9.2f %9.2f %7.2f%% %8.2fx "
                "%10.2fx %11.2f %10zu %10zu\n",
                tokens, vs, ss, dense_wg, dense_mma, estimate, d2h, select_host, h2d, index, sparse,
                100 * density, dense_wg / (index + sparse), dense_mma / sparse,
                dense_mma / (sparse / density), plan.key_blocks.size(), plan.columns.size());
    for (int32_t* ptr : {d_qbs, d_rs, d_kb, d_cs, d_cl}) CHECK_CUDA(cudaFree(ptr));
    ok = DeviceIndex(tokens, vs, ss, d_scores, n, plan, mi::PlanPairs(lp, plan), estimate,
                     sparse, dense_wg) &&
         ok;
  }
  CHECK_CUDA(cudaFreeHost(h_scores));
  for (void* ptr : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v),
                    static_cast<void*>(out), static_cast<void*>(d_table), static_cast<void*>(d_kv),
                    static_cast<void*>(d_qs), static_cast<void*>(d_scores), d_ws}) {
    CHECK_CUDA(cudaFree(ptr));
  }
  return ok;
}

std::vector<std::string> Split(const std::string& list) {
  std::vector<std::string> out;
  for (size_t at = 0; at < list.size();) {
    const size_t comma = std::min(list.find(',', at), list.size());
    out.push_back(list.substr(at, comma - at));
    at = comma + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 10;
  std::vector<int> lengths = {32768, 131072};
  std::vector<std::pair<int, int>> budgets = {{1000, 6096}, {100, 800}};
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (!std::strcmp(argv[i], "--iters") && has_value) {
      iters = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--tokens") && has_value) {
      lengths.clear();
      for (const std::string& s : Split(argv[++i])) lengths.push_back(std::atoi(s.c_str()));
    } else if (!std::strcmp(argv[i], "--budgets") && has_value) {
      budgets.clear();
      for (const std::string& s : Split(argv[++i])) {
        const size_t slash = s.find('/');
        if (slash == std::string::npos) {
          std::fprintf(stderr, "--budgets: %s is not V/S\n", s.c_str());
          return 2;
        }
        budgets.emplace_back(std::atoi(s.substr(0, slash).c_str()),
                             std::atoi(s.substr(slash + 1).c_str()));
      }
    } else {
      std::fprintf(stderr, "usage: %s [--iters N] [--tokens N[,N...]] [--budgets V/S[,V/S...]]\n",
                   argv[0]);
      return 2;
    }
  }
  for (int t : lengths) {
    if (t < 128 || t % 128 != 0) {
      std::fprintf(stderr, "--tokens: %d is not a positive multiple of 128\n", t);
      return 2;
    }
  }
  if (iters < 1) iters = 1;
  int dev = 0, sms = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %s, %d SMs; Llama-3.1-8B layer, MInference vertical-slash, every head; ms "
              "(index = estimate + d2h + select_host + h2d)\n",
              prop.name, sms);
  std::printf("%6s %11s %11s %9s %9s %7s %11s %7s %9s %9s %8s %9s %11s %11s %10s %10s\n",
              "tokens", "budget", "dense_wgmma", "dense_mma", "estimate", "d2h", "select_host",
              "h2d", "index", "sparse", "density", "end2end", "sparse/mma", "pair_parity",
              "key_blocks", "columns");
  bool ok = true;
  for (size_t i = 0; i < lengths.size(); ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    ok = RunLength(lengths[i], iters, budgets, sms, i == 0) && ok;
    std::printf("wall %6d: %.1f s\n", lengths[i],
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("checks: %s\n", ok ? "all PASS" : "FAIL (see the check lines)");
  return ok ? 0 : 1;
}
