// GPU sweep of the paged decode kernel against PagedAttentionRef (label `gpu`).
//
// Every case draws fresh seeded random bf16 inputs (seed printed; SIEVE_TEST_SEED overrides the
// base), scatters the sequences over shuffled page ids, fills every cache slot that no sequence
// owns with NaN (so a read past a sequence's end would show), poisons the output with NaN before
// each run, and compares with the fp32 reference run on the same bf16 values upcast to float.
// Each case runs under three plans (the planner's, one split, 64-token splits), and the batched
// result must equal, bit for bit, each sequence run alone under the same plan, and the same run
// captured in a CUDA graph and replayed.
//
// Tolerances: relative L2 error <= 1e-2 and max absolute error <= 2e-2. Outputs are averages of
// unit-variance values, so bf16 rounding of P and of the output gives about 3e-3 relative.
//
// Builds as a GoogleTest binary; with -DSIEVE_NO_GTEST it is a plain executable that runs the
// same checks and exits non-zero on any failure (for machines without GoogleTest).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
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
#include "kernels/attention/paged_decode.h"
#include "kernels/cpu/half.h"

#ifndef SIEVE_NO_GTEST
#include <gtest/gtest.h>
#endif

namespace sieve::kernels {
namespace {

constexpr double kMaxRelL2 = 1e-2;
constexpr double kMaxAbs = 2e-2;
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

#define CUDA_OK(f, expr)                                                                  \
  do {                                                                                    \
    cudaError_t e_ = (expr);                                                              \
    (f).Check(e_ == cudaSuccess, std::string(#expr) + ": " + cudaGetErrorString(e_));     \
    if (e_ != cudaSuccess) return;                                                        \
  } while (0)

uint64_t BaseSeed() {
  const char* env = std::getenv("SIEVE_TEST_SEED");
  return env ? std::strtoull(env, nullptr, 10) : 20261123ull;
}

// Counter-based generator: value i of stream `seed` is uniform with unit variance times `std`.
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

// One sweep point.
struct Case {
  std::string name;
  int head_dim;
  int group;          // query heads per KV head
  int num_kv_heads;
  int page_size;      // tokens per page
  std::vector<int> kv_lens;
  float q_std = 1.0f; // larger values make the softmax peaky
};

// gtest prints a parameter by its name.
[[maybe_unused]] void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// Host copies of one case's inputs, in the shared paged layout.
struct HostInputs {
  int num_q_heads = 0, stride = 0, num_pages = 0;
  std::vector<uint16_t> q, k, v;     // bf16 bits
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
    const int len = c.kv_lens[s];
    for (int t = 0; t < len; ++t) {
      if (t % c.page_size == 0) in.page_table[s * in.stride + t / c.page_size] = ids[next++];
      const size_t base =
          (static_cast<size_t>(in.page_table[s * in.stride + t / c.page_size]) * c.page_size +
           t % c.page_size) * row;
      for (size_t i = 0; i < row; ++i) {
        const uint64_t idx = (static_cast<uint64_t>(s) << 40) + static_cast<uint64_t>(t) * row + i;
        in.k[base + i] = FloatToBf16(RandomValue(seed + 1, idx, 1.0f));
        in.v[base + i] = FloatToBf16(RandomValue(seed + 2, idx, 1.0f));
      }
    }
  }
  in.q.resize(static_cast<size_t>(n) * in.num_q_heads * d);
  for (size_t i = 0; i < in.q.size(); ++i) in.q[i] = FloatToBf16(RandomValue(seed + 3, i, c.q_std));
  in.kv_lens = c.kv_lens;
  in.query_start.resize(n + 1);
  std::iota(in.query_start.begin(), in.query_start.end(), 0);
  return in;
}

std::vector<float> Upcast(const std::vector<uint16_t>& bits) {
  std::vector<float> f(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) f[i] = Bf16ToFloat(bits[i]);
  return f;
}

std::vector<float> Reference(const Case& c, const HostInputs& in) {
  const std::vector<float> q = Upcast(in.q), k = Upcast(in.k), v = Upcast(in.v);
  std::vector<float> out(in.q.size());
  PagedAttentionParams<float> p;
  p.q = q.data();
  p.k_cache = k.data();
  p.v_cache = v.data();
  p.out = out.data();
  p.page_table = in.page_table.data();
  p.kv_lens = in.kv_lens.data();
  p.query_start = in.query_start.data();
  p.page_table_stride = in.stride;
  p.num_seqs = static_cast<int>(c.kv_lens.size());
  p.num_q_heads = in.num_q_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.page_size = c.page_size;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  PagedAttentionRef(p, /*num_threads=*/0);
  return out;
}

// Device buffers of one case; freed on destruction.
struct DeviceInputs {
  __nv_bfloat16 *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr;
  int32_t *page_table = nullptr, *kv_lens = nullptr, *query_start = nullptr;
  void* workspace = nullptr;
  ~DeviceInputs() {
    for (void* ptr : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v),
                      static_cast<void*>(out), static_cast<void*>(page_table),
                      static_cast<void*>(kv_lens), static_cast<void*>(query_start), workspace}) {
      if (ptr) cudaFree(ptr);
    }
  }
};

// Copies `src` into a new device buffer of element type D (the same size as T).
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

// Runs the kernel on sequences [first, first + count) of the case with `plan`, after poisoning
// their output rows, and copies all of `out` back into `host_out`. With `graph`, the run is
// captured in a CUDA graph on a fresh stream and replayed instead of launched directly.
void RunOnce(Failures& f, const Case& c, const HostInputs& in, DeviceInputs& dev,
             const PagedDecodePlan& plan, int first, int count, std::vector<uint16_t>& host_out,
             bool graph = false) {
  const size_t row = static_cast<size_t>(in.num_q_heads) * c.head_dim;
  CUDA_OK(f, cudaMemset(dev.out + first * row, 0xff, count * row * sizeof(uint16_t)));
  CUDA_OK(f, cudaDeviceSynchronize());
  PagedAttentionParams<__nv_bfloat16> p;
  p.q = dev.q + first * row;
  p.k_cache = dev.k;
  p.v_cache = dev.v;
  p.out = dev.out + first * row;
  p.page_table = dev.page_table + static_cast<size_t>(first) * in.stride;
  p.kv_lens = dev.kv_lens + first;
  p.query_start = dev.query_start;
  p.page_table_stride = in.stride;
  p.num_seqs = count;
  p.num_q_heads = in.num_q_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.page_size = c.page_size;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  if (graph) {
    cudaStream_t stream;
    cudaGraph_t g;
    cudaGraphExec_t exec;
    CUDA_OK(f, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUDA_OK(f, cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    const cudaError_t run = PagedDecodeRun(p, plan, dev.workspace, stream);
    CUDA_OK(f, cudaStreamEndCapture(stream, &g));
    CUDA_OK(f, run);
    CUDA_OK(f, cudaGraphInstantiate(&exec, g, 0));
    CUDA_OK(f, cudaGraphLaunch(exec, stream));
    CUDA_OK(f, cudaStreamSynchronize(stream));
    CUDA_OK(f, cudaGraphExecDestroy(exec));
    CUDA_OK(f, cudaGraphDestroy(g));
    CUDA_OK(f, cudaStreamDestroy(stream));
  } else {
    CUDA_OK(f, PagedDecodeRun(p, plan, dev.workspace, /*stream=*/0));
  }
  CUDA_OK(f, cudaGetLastError());
  CUDA_OK(f, cudaDeviceSynchronize());
  host_out.resize(in.q.size());
  CUDA_OK(f, cudaMemcpy(host_out.data(), dev.out, host_out.size() * 2, cudaMemcpyDeviceToHost));
}

// Compares a device result with the reference; every element must be written (no NaN left).
void Compare(Failures& f, const std::string& label, const std::vector<uint16_t>& got,
             const std::vector<float>& ref) {
  double err2 = 0.0, ref2 = 0.0, max_abs = 0.0;
  size_t unwritten = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = Bf16ToFloat(got[i]);
    if (!std::isfinite(g)) {
      ++unwritten;
      continue;
    }
    const double e = g - ref[i];
    err2 += e * e;
    ref2 += static_cast<double>(ref[i]) * ref[i];
    max_abs = std::max(max_abs, std::fabs(e));
  }
  const double rel = std::sqrt(err2 / std::max(ref2, 1e-30));
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s: rel_l2 %.3e max_abs %.3e non-finite %zu", label.c_str(),
                rel, max_abs, unwritten);
  std::printf("    %s\n", buf);
  f.Check(unwritten == 0 && rel <= kMaxRelL2 && max_abs <= kMaxAbs, buf);
}

// The three plans a case runs under: the planner's, one split, and 64-token splits (capped at
// 1024 splits, so long sequences also exercise "the last split takes the rest").
std::vector<std::pair<std::string, PagedDecodePlan>> PlansFor(const Case& c, int num_q_heads) {
  PagedDecodeShape shape;
  shape.num_seqs = static_cast<int>(c.kv_lens.size());
  shape.num_q_heads = num_q_heads;
  shape.num_kv_heads = c.num_kv_heads;
  shape.head_dim = c.head_dim;
  shape.max_kv_len = *std::max_element(c.kv_lens.begin(), c.kv_lens.end());
  std::vector<std::pair<std::string, PagedDecodePlan>> plans;
  plans.emplace_back("planned", Plan(shape, NumSms()));
  PagedDecodePlan one = plans[0].second;
  one.num_splits = 1;
  one.chunk_tokens = std::max(64, (shape.max_kv_len + 63) / 64 * 64);
  one.workspace_bytes = 0;
  plans.emplace_back("one-split", one);
  PagedDecodePlan tiny = one;
  tiny.chunk_tokens = 64;
  tiny.num_splits = std::min(1024, std::max(2, (shape.max_kv_len + 63) / 64));
  tiny.workspace_bytes = static_cast<size_t>(shape.num_seqs) * num_q_heads * tiny.num_splits *
                         (c.head_dim + 2) * sizeof(float);
  plans.emplace_back("64-token-splits", tiny);
  return plans;
}

void RunCase(Failures& f, const Case& c) {
  const uint64_t seed = BaseSeed() ^ std::hash<std::string>{}(c.name);
  std::printf("  case %s: d %d group %d kv_heads %d page %d seqs %zu seed %llu\n", c.name.c_str(),
              c.head_dim, c.group, c.num_kv_heads, c.page_size, c.kv_lens.size(),
              static_cast<unsigned long long>(seed));
  const HostInputs in = MakeInputs(c, seed);
  const std::vector<float> ref = Reference(c, in);
  DeviceInputs dev;
  CUDA_OK(f, Upload(&dev.q, in.q));
  CUDA_OK(f, Upload(&dev.k, in.k));
  CUDA_OK(f, Upload(&dev.v, in.v));
  CUDA_OK(f, Upload(&dev.page_table, in.page_table));
  CUDA_OK(f, Upload(&dev.kv_lens, in.kv_lens));
  CUDA_OK(f, Upload(&dev.query_start, in.query_start));
  CUDA_OK(f, cudaMalloc(&dev.out, in.q.size() * 2));
  const int n = static_cast<int>(c.kv_lens.size());
  for (const auto& [label, plan] : PlansFor(c, in.num_q_heads)) {
    f.Check(plan.num_splits > 0, label + ": unsupported shape");
    if (plan.num_splits <= 0) return;
    if (dev.workspace) cudaFree(dev.workspace);
    dev.workspace = nullptr;
    if (plan.workspace_bytes > 0) CUDA_OK(f, cudaMalloc(&dev.workspace, plan.workspace_bytes));
    std::vector<uint16_t> batched, single;
    RunOnce(f, c, in, dev, plan, 0, n, batched);
    Compare(f, label + " (splits " + std::to_string(plan.num_splits) + ", chunk " +
                   std::to_string(plan.chunk_tokens) + ")",
            batched, ref);
    if (label == "planned") {  // the same run captured in a CUDA graph gives the same bits
      std::vector<uint16_t> replayed;
      RunOnce(f, c, in, dev, plan, 0, n, replayed, /*graph=*/true);
      f.Check(replayed == batched, label + ": graph replay differs from a direct run");
    }
    if (n == 1) continue;
    const size_t row = static_cast<size_t>(in.num_q_heads) * c.head_dim;
    for (int s = 0; s < n; ++s) {
      RunOnce(f, c, in, dev, plan, s, 1, single);
      f.Check(std::memcmp(single.data() + s * row, batched.data() + s * row, row * 2) == 0,
              label + ": sequence " + std::to_string(s) + " alone differs from the batch");
    }
  }
}

std::vector<Case> SweepCases() {
  std::vector<Case> cases = {
      {"len1_d128_g4_p16", 128, 4, 2, 16, {1}},
      {"len15_d128_g4_p16", 128, 4, 2, 16, {15}},
      {"len16_d128_g4_p16", 128, 4, 2, 16, {16}},
      {"len17_d128_g4_p16", 128, 4, 2, 16, {17}},
      {"len63_64_65_d64_g1_p64", 64, 1, 4, 64, {63, 64, 65}},
      {"len1000_d128_g8_p64", 128, 8, 2, 64, {1000}},
      {"mixed3_d64_g8_p16", 64, 8, 2, 16, {333, 1, 4097}},
      {"mixed8_d128_g4_p16", 128, 4, 2, 16, {1, 15, 16, 17, 129, 1000, 2047, 5001}},
      {"mixed8_d64_g4_p64", 64, 4, 2, 64, {64, 65, 127, 7, 3000, 1, 640, 999}},
      {"odd_d128_g1_p16", 128, 1, 3, 16, {31, 97, 1}},
      {"group16_d64_p16", 64, 16, 1, 16, {700, 70}},
      {"group16_d128_p64", 128, 16, 2, 64, {3001}},
      {"page1_d128_g4", 128, 4, 2, 1, {100, 37}},
      {"page7_d64_g4", 64, 4, 2, 7, {50, 7, 8}},
      {"page128_d128_g4", 128, 4, 2, 128, {300, 128}},
      {"peaky_d128_g4_p16", 128, 4, 2, 16, {4096, 777}, 4.0f},
      {"len32k_d128_g1_p64", 128, 1, 2, 64, {32768}},
      {"mixed32k_d128_g8_p64", 128, 8, 2, 64, {32768, 1, 999}},
      {"len32k_d64_g4_p16", 64, 4, 2, 16, {32767}},
      {"len128k_llama_d128_g4_p16", 128, 4, 8, 16, {131072}},
  };
  return cases;
}

// Plan decisions depend on shapes only and stay inside their bounds.
void CheckPlanner(Failures& f) {
  PagedDecodeShape s{1, 32, 8, 128, 131072};
  const PagedDecodePlan a = Plan(s, 132);
  f.Check(a.num_splits > 1, "128K batch 1 should split");
  f.Check(static_cast<int64_t>(a.num_splits) * a.chunk_tokens >= 131072, "chunks cover 128K");
  f.Check(a.chunk_tokens % 64 == 0, "chunk is a multiple of 64");
  f.Check(8 * a.num_splits <= 132 * PagedDecodeBlocksPerSm(128), "128K batch 1 fits one wave");
  f.Check(a.workspace_bytes >= size_t{32} * a.num_splits * 130 * 4, "workspace holds partials");
  const PagedDecodePlan b = Plan(s, 132);
  f.Check(a.num_splits == b.num_splits && a.chunk_tokens == b.chunk_tokens, "deterministic");
  PagedDecodeShape big{32, 32, 8, 128, 32768};
  f.Check(Plan(big, 132).num_splits == 1, "batch 32 at 32K needs no split");
  f.Check(Plan(big, 132).workspace_bytes == 0, "no workspace without a split");
  PagedDecodeShape bad = s;
  bad.head_dim = 96;
  f.Check(Plan(bad, 132).num_splits == 0, "head_dim 96 unsupported");
  bad = s;
  bad.num_q_heads = 12;
  bad.num_kv_heads = 8;
  f.Check(Plan(bad, 132).num_splits == 0, "heads not a multiple");
  bad = s;
  bad.num_q_heads = 32 * 8;
  f.Check(Plan(bad, 132).num_splits == 0, "group 32 unsupported");
  f.Check(Plan(s, 0).num_splits == 0, "no SMs");
  // Mismatched parameters are refused without launching.
  PagedAttentionParams<__nv_bfloat16> p;
  p.num_seqs = 2;
  p.num_q_heads = 32;
  p.num_kv_heads = 8;
  p.head_dim = 128;
  p.page_size = 16;
  f.Check(PagedDecodeRun(p, a, nullptr, 0) == cudaErrorInvalidValue, "null pointers refused");
  f.Check(cudaGetLastError() == cudaSuccess, "no sticky error after a refused run");
}

// The blocks per SM the planner assumes are the ones the hardware gives.
void CheckOccupancy(Failures& f) {
  for (int d : {64, 128}) {
    for (int group : {4, 16}) {
      const void* kernel = PagedDecodeKernelForTesting(d, group);
      const int smem = PagedDecodeSharedBytes(d);
      CUDA_OK(f, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      int blocks = 0;
      CUDA_OK(f, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, 128, smem));
      f.Check(blocks == PagedDecodeBlocksPerSm(d),
              "d " + std::to_string(d) + " group " + std::to_string(group) + ": occupancy " +
                  std::to_string(blocks) + " vs planned " +
                  std::to_string(PagedDecodeBlocksPerSm(d)));
    }
  }
}

#ifndef SIEVE_NO_GTEST

class PagedDecodeSweep : public ::testing::TestWithParam<Case> {};

TEST_P(PagedDecodeSweep, MatchesReferenceAndBatchEqualsSingle) {
  Failures f;
  RunCase(f, GetParam());
  EXPECT_TRUE(f.lines.empty()) << f.Join();
}

INSTANTIATE_TEST_SUITE_P(Sweep, PagedDecodeSweep, ::testing::ValuesIn(SweepCases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

TEST(PagedDecodePlan, DecidesFromShapesAndRefusesBadInput) {
  Failures f;
  CheckPlanner(f);
  EXPECT_TRUE(f.lines.empty()) << f.Join();
}

TEST(PagedDecodePlan, OccupancyMatchesPlannerAssumption) {
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
  if (argc > 1) {  // GoogleTest flags mean nothing here; say so rather than run everything
    std::fprintf(stderr, "%s: built without GoogleTest; takes no arguments\n", argv[0]);
    return 2;
  }
  int failed = 0, total = 0;
  auto report = [&](const std::string& name, const Failures& f) {
    ++total;
    if (!f.lines.empty()) ++failed;
    std::printf("[%s] %s\n%s", f.lines.empty() ? "  OK  " : "FAILED", name.c_str(),
                f.Join().c_str());
    std::fflush(stdout);
  };
  {
    Failures f;
    CheckPlanner(f);
    report("Plan.DecidesFromShapesAndRefusesBadInput", f);
  }
  {
    Failures f;
    CheckOccupancy(f);
    report("Plan.OccupancyMatchesPlannerAssumption", f);
  }
  for (const Case& c : SweepCases()) {
    Failures f;
    RunCase(f, c);
    report("Sweep." + c.name, f);
  }
  std::printf("%d of %d tests passed\n", total - failed, total);
  return failed == 0 ? 0 : 1;
}
#endif
