// MInference vertical-slash prefill on the CPU against the dense tiled kernel, one layer of
// Llama-3.1-8B shape (32 query heads, 8 KV heads, head dim 128, page size 16), on structured
// inputs (generator below), at several prompt lengths. For each length: the dense kernel
// (PagedAttentionCpu), then for each VS budget the index building (BuildPlan: estimation from the
// last 64 queries, selection, conversion into the BSR plan) and the sparse kernel over the plan;
// speed-up = dense / (index + sparse); density = (query, key) pairs read / causal pairs.
//
//   minference_bench [--lengths 8192,16384,32768] [--threads N] [--heads Q,KV] [--reps R]
//
// Structured inputs: q and k are sums of parts with the structure of real attention,
// per KV head g (query heads of a group differ in their noise):
//   - position part (dims [0, 64)): RoPE-like pairs (cos, sin)(theta_f * pos), theta_f =
//     10000^(-f/32), amplitude a_f = 2 for the slow frequencies (theta_f < 0.05) and 0.6 for the
//     fast ones, in q and k, so q_i . k_j has sum_f a_f^2 cos(theta_f (i - j)): a local window
//     peaked at i = j that decays with distance (as RoPE models' attention does);
//   - content part (dims [64, 128)): Gaussian noise (std 0.3 in q and in k);
//   - sinks: keys 0..3 carry 30 s_g, s_g a unit content direction per KV head that every query
//     carries 3x (a logit of ~8, like the local peak: attention sinks);
//   - vertical lines: 16 random keys per KV head carry 18 s_g (a logit of ~4.8);
//   - slash lines: for every other KV head, keys j carry 0.8 x the content of the query at
//     j + delta_g (delta_g in [500, 2500)), i.e. a "look delta_g back" head;
//   - needles: 4 random keys per KV head equal 3 x the mean content of a random 64-query block
//     after them.
// V is uniform in [-1, 1]. Seeds are fixed; the generator is deterministic.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/cpu/parallel_for.h"
#include "kernels/sparse/minference.h"

namespace sieve::kernels {
namespace {

constexpr int kPage = 16;

struct Problem {
  int n, hq, hkv, d;
  std::vector<float> q, k, v, out;
  std::vector<int32_t> page_table, kv_lens, query_start;
  PagedAttentionParams<float> p;

  Problem(int n_, int hq_, int hkv_, int d_) : n(n_), hq(hq_), hkv(hkv_), d(d_) {
    std::mt19937 rng(1234);
    const int pages = (n + kPage - 1) / kPage;
    page_table.resize(pages);
    for (int i = 0; i < pages; ++i) page_table[i] = i;
    std::shuffle(page_table.begin(), page_table.end(), rng);
    kv_lens = {n};
    query_start = {0, n};
    q.assign(static_cast<size_t>(n) * hq * d, 0.0f);
    k.assign(static_cast<size_t>(pages) * kPage * hkv * d, 0.0f);
    v.resize(k.size());
    out.resize(q.size());
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (float& x : v) x = u(rng);
    Generate(rng);
    p.q = q.data();
    p.k_cache = k.data();
    p.v_cache = v.data();
    p.out = out.data();
    p.page_table = page_table.data();
    p.kv_lens = kv_lens.data();
    p.query_start = query_start.data();
    p.page_table_stride = pages;
    p.num_seqs = 1;
    p.num_q_heads = hq;
    p.num_kv_heads = hkv;
    p.head_dim = d;
    p.page_size = kPage;
    p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  }

  float* K(int g, int t) {
    const int64_t page = page_table[t / kPage];
    return k.data() + ((page * kPage + t % kPage) * hkv + g) * int64_t{d};
  }
  float* Q(int h, int t) { return q.data() + (int64_t{t} * hq + h) * d; }

  void Generate(std::mt19937& rng) {
    std::normal_distribution<float> g01(0.0f, 1.0f);
    const int half = d / 2, freqs = half / 2, group = hq / hkv;
    const float a = 2.0f;  // slow-frequency amplitude (21 of 32 pairs): local peak logit ~8
    for (int g = 0; g < hkv; ++g) {
      std::vector<float> sink(half);
      float norm = 0;
      for (float& x : sink) norm += (x = g01(rng)) * x;
      for (float& x : sink) x /= std::sqrt(norm);
      for (int t = 0; t < n; ++t) {
        float* kt = K(g, t);
        for (int f = 0; f < freqs; ++f) {
          const double theta = std::pow(10000.0, -static_cast<double>(f) / freqs);
          const float af = theta < 0.05 ? a : 0.3f * a;  // mostly the slow frequencies
          kt[2 * f] = af * static_cast<float>(std::cos(theta * t));
          kt[2 * f + 1] = af * static_cast<float>(std::sin(theta * t));
        }
        for (int i = half; i < d; ++i) kt[i] = 0.3f * g01(rng);
        for (int h = g * group; h < (g + 1) * group; ++h) {
          float* qt = Q(h, t);
          for (int i = 0; i < half; ++i) qt[i] = kt[i];
          for (int i = half; i < d; ++i) qt[i] = 0.3f * g01(rng) + 3.0f * sink[i - half];
        }
      }
      auto add_sink = [&](int t, float s) {
        for (int i = half; i < d; ++i) K(g, t)[i] += s * sink[i - half];
      };
      for (int t = 0; t < std::min(n, 4); ++t) add_sink(t, 30.0f);  // logit ~8
      for (int j = 0; j < 16; ++j) add_sink(std::uniform_int_distribution<int>(4, n - 1)(rng), 18.0f);
      if (g % 2 == 1) {  // slash head: keys copy the content of the query delta later
        const int delta = std::uniform_int_distribution<int>(500, 2499)(rng);
        for (int t = 0; t + delta < n; ++t) {
          const float* qs = Q(g * group, t + delta);
          for (int i = half; i < d; ++i) K(g, t)[i] += 0.8f * qs[i];
        }
      }
      for (int j = 0; j < 4 && n > 256; ++j) {  // needles
        const int t = std::uniform_int_distribution<int>(0, n - 192)(rng);
        const int b = std::uniform_int_distribution<int>(t + 64, n - 64)(rng);
        std::vector<float> mean(d, 0.0f);
        for (int s = b; s < b + 64; ++s) {
          for (int i = half; i < d; ++i) mean[i] += Q(g * group, s)[i] / 64.0f;
        }
        for (int i = half; i < d; ++i) K(g, t)[i] = 3.0f * mean[i];
      }
    }
  }
};

double Seconds(std::chrono::steady_clock::time_point a) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}

using bench::ParseIntList;

int Main(int argc, char** argv) {
  std::vector<int> lengths = {8192, 16384, 32768};
  int threads = 0, hq = 32, hkv = 8, reps = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i];
    if (f == "--lengths") lengths = ParseIntList(argv[i + 1]);
    else if (f == "--threads") threads = std::atoi(argv[i + 1]);
    else if (f == "--reps") reps = std::max(1, std::atoi(argv[i + 1]));
    else if (f == "--heads") {
      const auto hh = ParseIntList(argv[i + 1]);
      hq = hh.at(0);
      hkv = hh.at(1);
    } else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  if (threads <= 0) threads = DefaultCpuThreads();
  const int d = 128;
  std::printf("# minference_bench: %d q heads, %d KV heads, d %d, page %d, %d threads, target %s, best of %d\n",
              hq, hkv, d, kPage, threads, PagedAttentionCpuTarget(), reps);
  std::printf("| N | method | index ms | attention ms | total ms | dense ms | speed-up | density | GFLOP/s computed |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  const std::pair<int, int> budgets[] = {{1000, 6096}, {100, 800}};
  for (int n : lengths) {
    Problem pr(n, hq, hkv, d);
    const double dense_pairs = static_cast<double>(minference::DensePairs(pr.p));
    double dense_s = 1e30;
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      PagedAttentionCpu(pr.p, threads);
      dense_s = std::min(dense_s, Seconds(t0));
    }
    std::printf("| %d | dense | - | %.1f | %.1f | %.1f | 1.00x | 100%% | %.1f |\n", n, dense_s * 1e3,
                dense_s * 1e3, dense_s * 1e3, 4.0 * d * dense_pairs / dense_s * 1e-9);
    std::fflush(stdout);
    for (const auto [vs, ss] : budgets) {
      const std::vector<minference::HeadPattern> pats(
          hq, minference::HeadPattern{minference::Pattern::kVerticalSlash, vs, ss});
      minference::Options o;
      o.num_threads = threads;
      double index_s = 1e30, attn_s = 1e30;
      double pairs = 0;
      for (int r = 0; r < reps; ++r) {
        minference::MInferencePlan plan;
        PagedAttentionParams<float> est = pr.p;
        est.v_cache = nullptr;
        est.out = nullptr;
        auto t0 = std::chrono::steady_clock::now();
        minference::BuildPlan(est, pats.data(), o, &plan);
        index_s = std::min(index_s, Seconds(t0));
        const SparseAttentionIndex x = plan.View();
        PagedAttentionParams<float> sp = pr.p;
        sp.sparse = &x;
        t0 = std::chrono::steady_clock::now();
        PagedAttentionCpu(sp, threads);
        attn_s = std::min(attn_s, Seconds(t0));
        pairs = static_cast<double>(minference::PlanPairs(pr.p, plan));
      }
      const double total = index_s + attn_s;
      std::printf("| %d | VS (%d, %d) | %.1f | %.1f | %.1f | %.1f | %.2fx | %.1f%% | %.1f |\n", n, vs,
                  ss, index_s * 1e3, attn_s * 1e3, total * 1e3, dense_s * 1e3, dense_s / total,
                  100.0 * pairs / dense_pairs, 4.0 * d * pairs / attn_s * 1e-9);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace
}  // namespace sieve::kernels

int main(int argc, char** argv) { return sieve::kernels::Main(argc, argv); }
