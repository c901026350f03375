// GPU sweep of the paged prefill kernels (mma.sync and wgmma) against PagedAttentionRef
// (label `gpu`).
//
// Every case draws fresh seeded random bf16 inputs (seed printed; SIEVE_TEST_SEED overrides the
// base), scatters the sequences over shuffled page ids, fills every cache slot that no sequence
// owns (the tail of a last page too) with NaN so that a read past a sequence's end would show,
// poisons the output with NaN before each run, and compares with the fp32 reference run on the
// same bf16 values upcast to float. Long cases check a subset of query rows (first, last and
// evenly spread ones) because the reference is O(N^2); every output element is still checked to
// have been written. Multi-sequence cases also check, bit for bit, that each sequence run alone
// gives the batched result, and one case replays the run from a CUDA graph.
//
// Tolerance: relative L2 error <= 1e-2 and max absolute error <= 3e-2 (P and the output are
// rounded to bf16; outputs are averages of unit-variance values, so about 3e-3 relative is
// expected).
//
// Builds as a GoogleTest binary; with -DSIEVE_NO_GTEST it is a plain executable that runs the
// same checks and exits non-zero on any failure (for machines without GoogleTest).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_prefill.h"
#include "kernels/cpu/half.h"

#ifndef SIEVE_NO_GTEST
#include <gtest/gtest.h>
#endif

namespace sieve::kernels {
namespace {

constexpr double kMaxRelL2 = 1e-2;
constexpr double kMaxAbs = 3e-2;
constexpr uint16_t kBf16Nan = 0x7fc0;

// Collects failed checks of one test as readable lines.
struct Failures {
  std::vector<std::string> lines;
  void Check(bool ok, const std::string& what) {
    if (!ok) lines.push_back(what);
  }
  std::string Join() const {
    std::string s;
    for (const auto& l : lines) s += "  " + l + "\n";
    return s;
  }
};

#define CUDA_OK(f, expr)                                                              \
  do {                                                                                \
    cudaError_t e_ = (expr);                                                          \
    (f).Check(e_ == cudaSuccess, std::string(#expr) + ": " + cudaGetErrorString(e_)); \
    if (e_ != cudaSuccess) return;                                                    \
  } while (0)

uint64_t BaseSeed() {
  const char* env = std::getenv("SIEVE_TEST_SEED");
  return env ? std::strtoull(env, nullptr, 10) : 20261123ull;
}

// Counter-based generator: value i of stream `seed`, uniform with standard deviation `std`.
inline uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
inline float RandomValue(uint64_t seed, uint64_t i, float std) {
  const double u = static_cast<double>(SplitMix(seed * 0x100000001b3ull + i) >> 40) / (1 << 24);
  return static_cast<float>((2.0 * u - 1.0) * std::sqrt(3.0) * std);
}

// One sweep point: sequences with their query chunk and KV lengths (kv >= q).
struct Case {
  std::string name;
  int head_dim;
  int group;         // query heads per KV head
  int num_kv_heads;
  int page_size;     // tokens per page
  std::vector<int> q_lens;
  std::vector<int> kv_lens;
  int ref_rows = 0;  // 0: check every query row; else this many rows per sequence
  float q_std = 1.0f;
  int plan_max_q = 0;  // 0: plan for the longest q_len; else a smaller planned length
};

[[maybe_unused]] void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// Host copies of one case's inputs, in the shared paged layout.
struct HostInputs {
  int num_q_heads = 0, stride = 0, num_pages = 0, num_tokens = 0;
  std::vector<uint16_t> q, k, v;  // bf16 bits
  std::vector<int32_t> page_table, kv_lens, query_start;
};

HostInputs MakeInputs(const Case& c, uint64_t seed) {
  HostInputs in;
  const int d = c.head_dim, hkv = c.num_kv_heads, n = static_cast<int>(c.kv_lens.size());
  in.num_q_heads = c.group * hkv;
  int max_pages = 0, total_pages = 0;
  for (int len : c.kv_lens) {
    const int pages = (len + c.page_size - 1) / c.page_size;
    max_pages = std::max(max_pages, pages);
    total_pages += pages;
  }
  in.stride = max_pages + 1;
  in.num_pages = total_pages + 3;  // a few pages nobody owns
  std::vector<int32_t> ids(in.num_pages);
  std::iota(ids.begin(), ids.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(ids.begin(), ids.end(), rng);
  in.page_table.assign(static_cast<size_t>(n) * in.stride, -1);
  const size_t row = static_cast<size_t>(hkv) * d;
  const size_t page_elems = static_cast<size_t>(c.page_size) * row;
  in.k.assign(in.num_pages * page_elems, kBf16Nan);
  in.v.assign(in.num_pages * page_elems, kBf16Nan);
  int next = 0;
  for (int s = 0; s < n; ++s) {
    for (int t = 0; t < c.kv_lens[s]; ++t) {
      int32_t& page = in.page_table[s * in.stride + t / c.page_size];
      if (t % c.page_size == 0) page = ids[next++];
      const size_t base = (static_cast<size_t>(page) * c.page_size + t % c.page_size) * row;
      for (size_t i = 0; i < row; ++i) {
        const uint64_t idx = (static_cast<uint64_t>(s) << 40) + static_cast<uint64_t>(t) * row + i;
        in.k[base + i] = FloatToBf16(RandomValue(seed + 1, idx, 1.0f));
        in.v[base + i] = FloatToBf16(RandomValue(seed + 2, idx, 1.0f));
      }
    }
  }
  in.query_start.assign(n + 1, 0);
  for (int s = 0; s < n; ++s) in.query_start[s + 1] = in.query_start[s] + c.q_lens[s];
  in.num_tokens = in.query_start[n];
  in.q.resize(static_cast<size_t>(in.num_tokens) * in.num_q_heads * d);
  for (size_t i = 0; i < in.q.size(); ++i) in.q[i] = FloatToBf16(RandomValue(seed + 3, i, c.q_std));
  in.kv_lens = c.kv_lens;
  return in;
}

std::vector<float> Upcast(const std::vector<uint16_t>& bits) {
  std::vector<float> f(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) f[i] = Bf16ToFloat(bits[i]);
  return f;
}

// Reference outputs of the checked query rows: rows[i] is a packed token index and
// values[i * num_q_heads * d ...] its output for every head.
struct Expected {
  std::vector<int64_t> rows;
  std::vector<float> values;
};

// The checked rows of sequence s: all of them, or the first and last few and an even spread.
std::vector<int> CheckedRows(const Case& c, int s) {
  const int q_len = c.q_lens[s];
  std::vector<int> rows;
  if (c.ref_rows == 0 || c.ref_rows >= q_len) {
    rows.resize(q_len);
    std::iota(rows.begin(), rows.end(), 0);
    return rows;
  }
  const int edge = std::max(1, c.ref_rows / 4);
  for (int i = 0; i < edge; ++i) rows.push_back(i), rows.push_back(q_len - 1 - i);
  const int spread = c.ref_rows - 2 * edge;
  for (int i = 0; i < spread; ++i) rows.push_back(static_cast<int>(int64_t{q_len} * (2 * i + 1) / (2 * spread)));
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

// Runs the reference on the checked rows only: each checked row becomes a one-query sequence whose
// KV length ends at that row's position, over the same page-table row.
Expected Reference(const Case& c, const HostInputs& in) {
  const int n = static_cast<int>(c.kv_lens.size());
  const size_t row_elems = static_cast<size_t>(in.num_q_heads) * c.head_dim;
  std::vector<int32_t> table, kv, qs = {0};
  std::vector<float> q;
  Expected e;
  for (int s = 0; s < n; ++s) {
    for (int r : CheckedRows(c, s)) {
      const int64_t token = in.query_start[s] + r;
      e.rows.push_back(token);
      table.insert(table.end(), in.page_table.begin() + s * in.stride,
                   in.page_table.begin() + (s + 1) * in.stride);
      kv.push_back(c.kv_lens[s] - c.q_lens[s] + r + 1);
      qs.push_back(qs.back() + 1);
      for (size_t i = 0; i < row_elems; ++i) q.push_back(Bf16ToFloat(in.q[token * row_elems + i]));
    }
  }
  const std::vector<float> k = Upcast(in.k), v = Upcast(in.v);
  e.values.resize(e.rows.size() * row_elems);
  PagedAttentionParams<float> p;
  p.q = q.data();
  p.k_cache = k.data();
  p.v_cache = v.data();
  p.out = e.values.data();
  p.page_table = table.data();
  p.kv_lens = kv.data();
  p.query_start = qs.data();
  p.page_table_stride = in.stride;
  p.num_seqs = static_cast<int>(e.rows.size());
  p.num_q_heads = in.num_q_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.page_size = c.page_size;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  PagedAttentionRef(p, /*num_threads=*/0);
  return e;
}

// Device buffers of one case; freed on destruction.
struct DeviceInputs {
  __nv_bfloat16 *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr;
  int32_t *page_table = nullptr, *kv_lens = nullptr, *query_start = nullptr, *one_start = nullptr;
  ~DeviceInputs() {
    for (void* ptr : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v),
                      static_cast<void*>(out), static_cast<void*>(page_table),
                      static_cast<void*>(kv_lens), static_cast<void*>(query_start),
                      static_cast<void*>(one_start)}) {
      if (ptr) cudaFree(ptr);
    }
  }
};

template <typename D, typename T>
cudaError_t Upload(D** dst, const std::vector<T>& src) {
  static_assert(sizeof(D) == sizeof(T));
  cudaError_t e = cudaMalloc(dst, std::max<size_t>(src.size(), 1) * sizeof(T));
  if (e != cudaSuccess) return e;
  return cudaMemcpy(*dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice);
}

int NumSms() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

// Runs sequences [first, first + count) (count == 1 alone, with its own query_start {0, q_len})
// after poisoning the whole output, and copies the output back. With `graph`, the run is captured
// in a CUDA graph and replayed. Reports the kernel time in *ms.
void RunOnce(Failures& f, const Case& c, const HostInputs& in, DeviceInputs& dev,
             const PagedPrefillPlan& plan, int first, int count, std::vector<uint16_t>& host_out,
             bool graph = false, float* ms = nullptr) {
  const size_t row = static_cast<size_t>(in.num_q_heads) * c.head_dim;
  const int n = static_cast<int>(c.kv_lens.size());
  CUDA_OK(f, cudaMemset(dev.out, 0xff, in.q.size() * sizeof(uint16_t)));
  PagedAttentionParams<__nv_bfloat16> p;
  const int64_t q0 = in.query_start[first];
  p.q = dev.q + q0 * row;
  p.k_cache = dev.k;
  p.v_cache = dev.v;
  p.out = dev.out + q0 * row;
  p.page_table = dev.page_table + static_cast<size_t>(first) * in.stride;
  p.kv_lens = dev.kv_lens + first;
  if (count == n) {
    p.query_start = dev.query_start;
  } else {
    CUDA_OK(f, count == 1 ? cudaSuccess : cudaErrorInvalidValue);
    const int32_t starts[2] = {0, c.q_lens[first]};
    CUDA_OK(f, cudaMemcpy(dev.one_start, starts, sizeof starts, cudaMemcpyHostToDevice));
    p.query_start = dev.one_start;
  }
  p.page_table_stride = in.stride;
  p.num_seqs = count;
  p.num_q_heads = in.num_q_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.page_size = c.page_size;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  CUDA_OK(f, cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  CUDA_OK(f, cudaEventCreate(&start));
  CUDA_OK(f, cudaEventCreate(&stop));
  if (graph) {
    cudaStream_t stream;
    cudaGraph_t g;
    cudaGraphExec_t exec;
    CUDA_OK(f, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUDA_OK(f, cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    const cudaError_t run = PagedPrefillRun(p, plan, nullptr, stream);
    CUDA_OK(f, cudaStreamEndCapture(stream, &g));
    CUDA_OK(f, run);
    CUDA_OK(f, cudaGraphInstantiate(&exec, g, 0));
    CUDA_OK(f, cudaGraphLaunch(exec, stream));
    CUDA_OK(f, cudaStreamSynchronize(stream));
    CUDA_OK(f, cudaGraphExecDestroy(exec));
    CUDA_OK(f, cudaGraphDestroy(g));
    CUDA_OK(f, cudaStreamDestroy(stream));
  } else {
    CUDA_OK(f, cudaEventRecord(start));
    CUDA_OK(f, PagedPrefillRun(p, plan, nullptr, /*stream=*/0));
    CUDA_OK(f, cudaEventRecord(stop));
  }
  CUDA_OK(f, cudaGetLastError());
  CUDA_OK(f, cudaDeviceSynchronize());
  if (ms != nullptr && !graph) CUDA_OK(f, cudaEventElapsedTime(ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  host_out.resize(in.q.size());
  CUDA_OK(f, cudaMemcpy(host_out.data(), dev.out, host_out.size() * 2, cudaMemcpyDeviceToHost));
  (void)n;
}

// Compares the checked rows with the reference and requires every element of the rows of
// sequences [first, first + count) to be finite (written).
void Compare(Failures& f, const std::string& label, const Case& c, const HostInputs& in,
             const std::vector<uint16_t>& got, const Expected& e) {
  const size_t row = static_cast<size_t>(in.num_q_heads) * c.head_dim;
  size_t unwritten = 0;
  for (uint16_t b : got) unwritten += std::isfinite(Bf16ToFloat(b)) ? 0 : 1;
  double err2 = 0.0, ref2 = 0.0, max_abs = 0.0;
  for (size_t i = 0; i < e.rows.size(); ++i) {
    for (size_t j = 0; j < row; ++j) {
      const double g = Bf16ToFloat(got[e.rows[i] * row + j]);
      const double r = e.values[i * row + j];
      if (!std::isfinite(g)) continue;
      err2 += (g - r) * (g - r);
      ref2 += r * r;
      max_abs = std::max(max_abs, std::fabs(g - r));
    }
  }
  const double rel = std::sqrt(err2 / std::max(ref2, 1e-30));
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s: rel_l2 %.3e max_abs %.3e non-finite %zu (rows checked %zu)",
                label.c_str(), rel, max_abs, unwritten, e.rows.size());
  std::printf("    %s\n", buf);
  f.Check(unwritten == 0 && rel <= kMaxRelL2 && max_abs <= kMaxAbs, buf);
}

// The plans every case runs under: mma.sync and the three wgmma consumer schedules.
std::vector<std::pair<std::string, PagedPrefillPlan>> PlansFor(const Case& c, int num_q_heads) {
  PagedPrefillShape shape;
  shape.num_seqs = static_cast<int>(c.kv_lens.size());
  shape.num_q_heads = num_q_heads;
  shape.num_kv_heads = c.num_kv_heads;
  shape.head_dim = c.head_dim;
  shape.max_q_len = c.plan_max_q > 0 ? c.plan_max_q
                                     : *std::max_element(c.q_lens.begin(), c.q_lens.end());
  std::vector<std::pair<std::string, PagedPrefillPlan>> plans;
  plans.emplace_back("mma.sync", Plan(shape, NumSms(), PagedPrefillKernel::kMmaSync));
  PagedPrefillPlan wg = Plan(shape, NumSms(), PagedPrefillKernel::kWgmma);
  wg.overlap = 0;
  plans.emplace_back("wgmma-plain", wg);
  wg.overlap = 1;
  plans.emplace_back("wgmma-overlap", wg);
  wg.overlap = 2;
  plans.emplace_back("wgmma-pingpong", wg);
  return plans;
}

void RunCase(Failures& f, const Case& c) {
  const uint64_t seed = BaseSeed() ^ std::hash<std::string>{}(c.name);
  std::printf("  case %s: d %d group %d kv_heads %d page %d seqs %zu seed %llu\n", c.name.c_str(),
              c.head_dim, c.group, c.num_kv_heads, c.page_size, c.kv_lens.size(),
              static_cast<unsigned long long>(seed));
  const auto t0 = std::chrono::steady_clock::now();
  const HostInputs in = MakeInputs(c, seed);
  const Expected e = Reference(c, in);
  const double ref_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  DeviceInputs dev;
  CUDA_OK(f, Upload(&dev.q, in.q));
  CUDA_OK(f, Upload(&dev.k, in.k));
  CUDA_OK(f, Upload(&dev.v, in.v));
  CUDA_OK(f, Upload(&dev.page_table, in.page_table));
  CUDA_OK(f, Upload(&dev.kv_lens, in.kv_lens));
  CUDA_OK(f, Upload(&dev.query_start, in.query_start));
  CUDA_OK(f, cudaMalloc(&dev.one_start, 2 * sizeof(int32_t)));
  CUDA_OK(f, cudaMalloc(&dev.out, std::max<size_t>(in.q.size(), 1) * 2));
  const int n = static_cast<int>(c.kv_lens.size());
  const size_t row = static_cast<size_t>(in.num_q_heads) * c.head_dim;
  for (const auto& [label, plan] : PlansFor(c, in.num_q_heads)) {
    f.Check(plan.kernel != PagedPrefillKernel::kNone, label + ": plan refused the shape");
    if (plan.kernel == PagedPrefillKernel::kNone) continue;
    std::vector<uint16_t> batched, single;
    float ms = 0.0f;
    RunOnce(f, c, in, dev, plan, 0, n, batched, /*graph=*/false, &ms);
    char timing[96];
    std::snprintf(timing, sizeof timing, " %.3f ms (ref %.1f s)", ms, ref_s);
    Compare(f, label + timing, c, in, batched, e);
    if (c.name == "mixed3_d128_g4_p16") {  // a run captured in a CUDA graph gives the same bits
      std::vector<uint16_t> replayed;
      RunOnce(f, c, in, dev, plan, 0, n, replayed, /*graph=*/true);
      f.Check(replayed == batched, label + ": graph replay differs from a direct run");
    }
    if (n == 1) continue;
    for (int s = 0; s < n; ++s) {
      RunOnce(f, c, in, dev, plan, s, 1, single);
      const size_t off = static_cast<size_t>(in.query_start[s]) * row;
      const size_t len = static_cast<size_t>(c.q_lens[s]) * row;
      f.Check(std::memcmp(single.data() + off, batched.data() + off, len * 2) == 0,
              label + ": sequence " + std::to_string(s) + " alone differs from the batch");
    }
  }
}

std::vector<Case> SweepCases() {
  return {
      // Full prefill (q_len == kv_len) at the lengths around tile edges.
      {"q1_d128_g4_p16", 128, 4, 2, 16, {1}, {1}},
      {"q7_d128_g1_p16", 128, 1, 2, 16, {7}, {7}},
      {"q63_d64_g8_p64", 64, 8, 1, 64, {63}, {63}},
      {"q64_d128_g8_p64", 128, 8, 1, 64, {64}, {64}},
      {"q65_d64_g4_p16", 64, 4, 2, 16, {65}, {65}},
      {"q129_d128_g4_p64", 128, 4, 2, 64, {129}, {129}},
      {"q1000_d128_g4_p16", 128, 4, 2, 16, {1000}, {1000}},
      {"q1000_d64_g1_p64", 64, 1, 3, 64, {1000}, {1000}},
      // Decode-like and chunked prefill: earlier tokens already in the pages.
      {"q1_kv777_d128_g8_p16", 128, 8, 1, 16, {1}, {777}},
      {"q100_kv1000_d128_g4_p64", 128, 4, 2, 64, {100}, {1000}},
      {"q257_kv4099_d64_g8_p16", 64, 8, 2, 16, {257}, {4099}},
      {"q64_kv128_d128_g1_p16", 128, 1, 2, 16, {64}, {128}},
      // Batches of mixed lengths, chunked and not.
      {"mixed3_d128_g4_p16", 128, 4, 2, 16, {1000, 7, 129}, {1000, 500, 129}},
      {"mixed3_d64_g8_p64", 64, 8, 1, 64, {65, 1, 300}, {65, 2000, 301}},
      {"mixed5_d128_g1_p64", 128, 1, 4, 64, {1, 63, 64, 200, 17}, {1, 63, 1064, 200, 4000}},
      {"page32_d128_g4", 128, 4, 2, 32, {300, 45}, {300, 1045}},
      {"page128_d64_g4", 64, 4, 2, 128, {129, 500}, {129, 700}},
      {"peaky_d128_g4_p16", 128, 4, 2, 16, {777}, {2000}, 0, 4.0f},
      // A plan made for shorter queries still covers longer ones (blocks loop over tiles).
      {"underplanned_d128_g4_p16", 128, 4, 2, 16, {1000, 300}, {1000, 900}, 0, 1.0f, 128},
      // Long contexts: a subset of rows is checked against the O(N^2) reference.
      {"q8k_d128_g4_p64", 128, 4, 2, 64, {8192}, {8192}, 96},
      {"q8k_llama_d128_g4_p16", 128, 4, 8, 16, {8192}, {8192}, 24},
      {"q8k_d64_g8_p16", 64, 8, 1, 16, {8192}, {8192}, 96},
      {"q32k_d128_g4_p64", 128, 4, 2, 64, {32768}, {32768}, 64},
      {"q2k_kv32k_d128_g8_p64", 128, 8, 1, 64, {2048}, {32768}, 64},
  };
}

// Plans depend on shapes only; Run refuses bad input without launching.
void CheckPlanner(Failures& f) {
  const PagedPrefillShape s{1, 32, 8, 128, 131072};
  const PagedPrefillPlan a = Plan(s, 132);
  f.Check(a.kernel == PagedPrefillKernel::kWgmma, "auto picks wgmma");
  f.Check(static_cast<int64_t>(a.grid_m) * a.block_m >= 131072, "grid covers 128K queries");
  f.Check(a.workspace_bytes == 0, "no workspace");
  f.Check(a.shared_bytes <= 227 * 1024, "shared memory fits a Hopper SM");
  const PagedPrefillPlan b = Plan(s, 132);
  f.Check(a.grid_m == b.grid_m && a.kernel == b.kernel, "deterministic");
  f.Check(Plan(s, 132, PagedPrefillKernel::kMmaSync).kernel == PagedPrefillKernel::kMmaSync,
          "kernel can be forced");
  PagedPrefillShape bad = s;
  bad.head_dim = 96;
  f.Check(Plan(bad, 132).kernel == PagedPrefillKernel::kNone, "head_dim 96 unsupported");
  bad = s;
  bad.num_q_heads = 12;
  f.Check(Plan(bad, 132).kernel == PagedPrefillKernel::kNone, "heads not a multiple");
  bad = s;
  bad.max_q_len = 0;
  f.Check(Plan(bad, 132).kernel == PagedPrefillKernel::kNone, "empty queries");
  bad = s;
  bad.num_seqs = 70000;
  f.Check(Plan(bad, 132).kernel == PagedPrefillKernel::kNone, "too many sequences for the grid");
  f.Check(Plan(s, 0).kernel == PagedPrefillKernel::kNone, "no SMs");
  f.Check(Plan(s, 132, PagedPrefillKernel::kNone).kernel == PagedPrefillKernel::kNone,
          "kNone stays none");

  // Parameters that do not match the plan are refused without a launch or a sticky error.
  __nv_bfloat16* dummy = nullptr;
  CUDA_OK(f, cudaMalloc(&dummy, 1024));
  PagedAttentionParams<__nv_bfloat16> p;
  p.q = p.k_cache = p.v_cache = dummy;
  p.out = dummy;
  p.page_table = p.kv_lens = p.query_start = reinterpret_cast<const int32_t*>(dummy);
  p.page_table_stride = 1;
  p.num_seqs = 1;
  p.num_q_heads = 32;
  p.num_kv_heads = 8;
  p.head_dim = 128;
  p.page_size = 16;
  p.scale = 0.088f;
  auto refused = [&](PagedAttentionParams<__nv_bfloat16> q, const PagedPrefillPlan& plan,
                     const char* what) {
    f.Check(PagedPrefillRun(q, plan, nullptr, 0) == cudaErrorInvalidValue, what);
  };
  auto q = p;
  q.page_size = 24;
  refused(q, a, "page size not a power of two");
  q = p;
  q.num_q_heads = 16;
  refused(q, a, "heads differ from the plan");
  q = p;
  q.num_seqs = 2;
  refused(q, a, "more sequences than planned");
  q = p;
  q.out = nullptr;
  refused(q, a, "null output");
  q = p;
  q.scale = NAN;
  refused(q, a, "NaN scale");
  refused(p, Plan(bad, 132), "unsupported plan");
  q = p;
  q.num_seqs = 0;
  f.Check(PagedPrefillRun(q, a, nullptr, 0) == cudaSuccess, "zero sequences is a no-op");
  f.Check(cudaGetLastError() == cudaSuccess, "no sticky error after refused runs");
  cudaFree(dummy);
}

// The kernels fit on the device: one block of each per SM with the planned shared memory.
void CheckOccupancy(Failures& f) {
  for (int d : {64, 128}) {
    for (PagedPrefillKernel k : {PagedPrefillKernel::kMmaSync, PagedPrefillKernel::kWgmma}) {
      const char* name = k == PagedPrefillKernel::kWgmma ? "wgmma" : "mma.sync";
      const PagedPrefillPlan plan = Plan(PagedPrefillShape{1, 8, 2, d, 1024}, NumSms(), k);
      const void* kernel = PagedPrefillKernelForTesting(plan);
      f.Check(kernel != nullptr, "kernel exists");
      if (kernel == nullptr) continue;
      CUDA_OK(f, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      plan.shared_bytes));
      int blocks = 0;
      CUDA_OK(f, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, plan.threads,
                                                               plan.shared_bytes));
      std::printf("    %s d %d: %d block(s) per SM, %d bytes shared\n", name, d, blocks,
                  plan.shared_bytes);
      f.Check(blocks >= 1, std::string(name) + " d " + std::to_string(d) + " fits");
    }
  }
}

#ifndef SIEVE_NO_GTEST

class PagedPrefillSweep : public ::testing::TestWithParam<Case> {};

TEST_P(PagedPrefillSweep, MatchesReferenceAndBatchEqualsSingle) {
  Failures f;
  RunCase(f, GetParam());
  EXPECT_TRUE(f.lines.empty()) << f.Join();
}

INSTANTIATE_TEST_SUITE_P(Sweep, PagedPrefillSweep, ::testing::ValuesIn(SweepCases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

TEST(PagedPrefillPlan, DecidesFromShapesAndRefusesBadInput) {
  Failures f;
  CheckPlanner(f);
  EXPECT_TRUE(f.lines.empty()) << f.Join();
}

TEST(PagedPrefillPlan, KernelsFitOnTheDevice) {
  Failures f;
  CheckOccupancy(f);
  EXPECT_TRUE(f.lines.empty()) << f.Join();
}

#endif  // SIEVE_NO_GTEST

}  // namespace
}  // namespace sieve::kernels

#ifdef SIEVE_NO_GTEST
int main(int argc, char** argv) {
  using namespace sieve::kernels;
  const char* only = argc > 1 ? argv[1] : nullptr;  // optional substring filter on case names
  int failed = 0, total = 0;
  auto report = [&](const std::string& name, const Failures& f) {
    ++total;
    if (!f.lines.empty()) ++failed;
    std::printf("[%s] %s\n%s", f.lines.empty() ? "  OK  " : "FAILED", name.c_str(),
                f.Join().c_str());
    std::fflush(stdout);
  };
  if (only == nullptr) {
    Failures a, b;
    CheckPlanner(a);
    report("Plan.DecidesFromShapesAndRefusesBadInput", a);
    CheckOccupancy(b);
    report("Plan.KernelsFitOnTheDevice", b);
  }
  for (const Case& c : SweepCases()) {
    if (only != nullptr && c.name.find(only) == std::string::npos) continue;
    Failures f;
    RunCase(f, c);
    report("Sweep." + c.name, f);
  }
  std::printf("%d of %d tests passed\n", total - failed, total);
  return failed == 0 ? 0 : 1;
}
#endif
