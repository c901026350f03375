// A generator of attention inputs with the structure real LLM attention has (BENCHMARKS.md,
// "Structured attention inputs"), for the sparse prefill benchmarks (XAttention, MInference):
// random Q and K give nearly uniform attention, where no threshold method can skip anything.
//
// Post-RoPE queries q[i, h, :] and keys k[j, g, :] (d = head_dim, G = Hq / Hkv, g = h / G) are
// sums of the following parts; every direction below is a random unit vector drawn per KV head
// from the seed, and sigma-scaled N(0, 1) noise is added to both:
//   - sinks: keys 0 .. sink_tokens-1 carry sink_key * u_sink; every query carries
//     sink_query * u_sink, so every query's score with a sink key is about
//     sink_key * sink_query / sqrt(d) above the noise;
//   - locality: a per-head vector w, nonzero on the dimension pairs f in [0, rope_freq_end),
//     rotated by RoPE at the token's position (frequency theta^(-2f/d)) and scaled by
//     local_scale on both sides (|w| = 1): q_i . k_j peaks at i = j (local_scale^2 / sqrt(d)) and
//     falls with |i - j|; with every pair carrying w (log-spaced frequencies) it falls about
//     linearly in log |i - j| (a power-law decay of attention with distance, the local window);
//   - vertical lines: `verticals` random key positions per KV head carry vertical_key * u_vert;
//     every query carries vertical_query * u_vert;
//   - slash lines: for `slashes` random offsets delta per KV head (in [slash_min, slash_max]),
//     the keys also carry slash_copy * w rotated by RoPE at position j + delta, so that q_i . k_j
//     has a second window centred on i - j = delta (a "look delta back" band, peak about
//     local_scale * slash_copy / sqrt(d));
//   - needles: `needles` random (query block, key block) pairs per KV head, blocks of
//     needle_block tokens, the key block far from the diagonal: the keys carry
//     needle_key * u_needle(pair) and the queries of the query block needle_query * u_needle(pair).
// V is N(0, 1). The parameters are printed with every result (Describe).
#ifndef SIEVE_BENCH_STRUCTURED_ATTENTION_H_
#define SIEVE_BENCH_STRUCTURED_ATTENTION_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace sieve::bench {

struct StructuredAttentionParams {
  int32_t tokens = 8192;
  int32_t num_q_heads = 32;
  int32_t num_kv_heads = 8;
  int32_t head_dim = 128;
  uint32_t seed = 1;
  // Score scales at d = 128 (sqrt(d) = 11.3): locality 25.6 at distance 0, falling about
  // logarithmically with distance (every RoPE frequency carries w: about 16 at 100 tokens, 12 at
  // 1000, 8 at 10000); sinks 17, verticals 11.3, needles 16, slash bands 16 at their offset;
  // noise std about 1. Attention then decays with distance as a power law, plus the lines.
  float noise = 0.5f;          // sigma of the N(0, sigma) noise on q and k
  int32_t sink_tokens = 4;
  float sink_key = 16.0f, sink_query = 12.0f;
  float local_scale = 17.0f;
  float rope_theta = 500000.0f;
  int32_t rope_freq_end = 64;  // dimension pairs [0, 64) carry w (all of them at d = 128)
  int32_t verticals = 32;
  float vertical_key = 10.0f, vertical_query = 12.8f;
  int32_t slashes = 2;
  int32_t slash_min = 200, slash_max = 4000;
  float slash_copy = 10.5f;
  int32_t needles = 4;
  int32_t needle_block = 128;
  float needle_key = 13.5f, needle_query = 13.5f;

  std::string Describe() const {
    return "seed=" + std::to_string(seed) + " noise=" + std::to_string(noise) +
           " sinks=" + std::to_string(sink_tokens) + "x(" + std::to_string(sink_key) + "," +
           std::to_string(sink_query) + ") local=" + std::to_string(local_scale) +
           " rope_theta=" + std::to_string(rope_theta) + " freq_end=" +
           std::to_string(rope_freq_end) + " verticals=" + std::to_string(verticals) +
           "x(" + std::to_string(vertical_key) + "," + std::to_string(vertical_query) +
           ") slashes=" + std::to_string(slashes) + "[" + std::to_string(slash_min) + "," +
           std::to_string(slash_max) + "]x" + std::to_string(slash_copy) +
           " needles=" + std::to_string(needles) + "x" + std::to_string(needle_block) + "(" +
           std::to_string(needle_key) + "," + std::to_string(needle_query) + ")";
  }
};

// q [tokens, num_q_heads, head_dim], k and v [tokens, num_kv_heads, head_dim], row-major.
struct StructuredAttention {
  std::vector<float> q, k, v;
};

inline StructuredAttention MakeStructuredAttention(const StructuredAttentionParams& p) {
  const int32_t N = p.tokens, Hq = p.num_q_heads, Hkv = p.num_kv_heads, d = p.head_dim;
  const int32_t G = Hq / Hkv;
  std::mt19937 rng(p.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto unit = [&] {
    std::vector<float> u(d);
    double s = 0;
    for (float& x : u) {
      x = normal(rng);
      s += double{x} * x;
    }
    for (float& x : u) x = static_cast<float>(x / std::sqrt(s));
    return u;
  };
  StructuredAttention out;
  out.q.resize(static_cast<size_t>(N) * Hq * d);
  out.k.resize(static_cast<size_t>(N) * Hkv * d);
  out.v.resize(out.k.size());
  for (float& x : out.q) x = p.noise * normal(rng);
  for (float& x : out.k) x = p.noise * normal(rng);
  for (float& x : out.v) x = normal(rng);
  auto Q = [&](int32_t i, int32_t h) { return out.q.data() + (static_cast<size_t>(i) * Hq + h) * d; };
  auto K = [&](int32_t j, int32_t g) { return out.k.data() + (static_cast<size_t>(j) * Hkv + g) * d; };
  auto add = [d](float* x, const std::vector<float>& u, float c) {
    for (int32_t e = 0; e < d; ++e) x[e] += c * u[e];
  };
  std::vector<double> freq(d / 2);
  for (int32_t f = 0; f < d / 2; ++f) freq[f] = std::pow(double(p.rope_theta), -2.0 * f / d);
  for (int32_t g = 0; g < Hkv; ++g) {
    const std::vector<float> sink = unit(), vert = unit();
    for (int32_t j = 0; j < std::min(N, p.sink_tokens); ++j) add(K(j, g), sink, p.sink_key);
    std::uniform_int_distribution<int32_t> pos(p.sink_tokens, std::max(p.sink_tokens, N - 1));
    for (int32_t c = 0; c < p.verticals; ++c) add(K(pos(rng), g), vert, p.vertical_key);
    std::uniform_int_distribution<int32_t> offset(p.slash_min, std::max(p.slash_min, p.slash_max));
    std::vector<int32_t> deltas;
    for (int32_t c = 0; c < p.slashes; ++c) deltas.push_back(offset(rng));
    std::vector<float> w = unit();  // shared by the group: its keys carry it too
    for (int32_t e = 2 * p.rope_freq_end; e < d; ++e) w[e] = 0.0f;
    double w2 = 0;
    for (float x : w) w2 += double{x} * x;
    for (float& x : w) x = static_cast<float>(x / std::sqrt(w2));
    for (int32_t hh = 0; hh < G; ++hh) {
      const int32_t h = g * G + hh;
      for (int32_t i = 0; i < N; ++i) {
        add(Q(i, h), sink, p.sink_query);
        add(Q(i, h), vert, p.vertical_query);
      }
      // Locality: RoPE-rotated w on both sides; slashes: w rotated ahead by delta on the keys.
      for (int32_t i = 0; i < N; ++i) {
        for (int32_t f = 0; f < std::min(p.rope_freq_end, d / 2); ++f) {
          const double x = w[2 * f], y = w[2 * f + 1];
          auto rotate_into = [&](float* out, double pos, double scale) {
            const double c = std::cos(pos * freq[f]), s = std::sin(pos * freq[f]);
            out[2 * f] += static_cast<float>(scale * (x * c - y * s));
            out[2 * f + 1] += static_cast<float>(scale * (x * s + y * c));
          };
          rotate_into(Q(i, h), i, p.local_scale);
          if (hh == 0) {
            rotate_into(K(i, g), i, p.local_scale);
            for (int32_t delta : deltas) rotate_into(K(i, g), static_cast<double>(i) + delta, p.slash_copy);
          }
        }
      }
    }
    // Needles: (query block, key block) pairs far from the diagonal.
    const int32_t blocks = N / p.needle_block;
    if (blocks >= 8) {
      std::uniform_int_distribution<int32_t> qblock(blocks / 2, blocks - 1);
      for (int32_t c = 0; c < p.needles; ++c) {
        const int32_t mq = qblock(rng);
        std::uniform_int_distribution<int32_t> kblock(1, std::max(1, mq - 4));
        const int32_t mk = kblock(rng);
        const std::vector<float> u = unit();
        for (int32_t j = mk * p.needle_block; j < (mk + 1) * p.needle_block; ++j) {
          add(K(j, g), u, p.needle_key);
        }
        for (int32_t i = mq * p.needle_block; i < (mq + 1) * p.needle_block; ++i) {
          for (int32_t hh = 0; hh < G; ++hh) add(Q(i, g * G + hh), u, p.needle_query);
        }
      }
    }
  }
  return out;
}

}  // namespace sieve::bench

#endif  // SIEVE_BENCH_STRUCTURED_ATTENTION_H_
