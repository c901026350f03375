#include "engine/sampling/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace sieve::engine {
namespace {

// ---------------------------------------------------------------------------------------------
// Validation helpers.

// Returns InvalidArgument "<field> must be <rule>, got <value>".
absl::Status FieldError(absl::string_view field, absl::string_view rule, double value) {
  return absl::InvalidArgumentError(absl::StrCat(field, " must be ", rule, ", got ", value));
}

// Returns whether `s` is well-formed UTF-8 (no overlongs, surrogates or code points > U+10FFFF).
bool IsValidUtf8(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int len;
    uint32_t min_cp;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2, min_cp = 0x80, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, min_cp = 0x800, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, min_cp = 0x10000, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > s.size()) return false;
    for (int k = 1; k < len; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Random stream.

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t RotateLeft(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// ---------------------------------------------------------------------------------------------
// Sampling helpers.

// One token under consideration: its id, penalized logit and unnormalized probability
// exp((logit - max_logit) / temperature).
struct Candidate {
  int32_t id;
  float logit;
  float prob;
};

// Whether `a` ranks before `b`: higher logit first, ties to the lower id. A strict total order.
bool Better(const Candidate& a, const Candidate& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

// Top-k selections up to this size use a bounded heap over the row (no vocab-sized buffer).
constexpr size_t kHeapSelectMax = 256;

// Replaces `out` with the min(k, finite count) best finite entries of `logits`: best first when
// `sorted`, else in an unspecified order.
void SelectTopK(absl::Span<const float> logits, size_t k, bool sorted,
                std::vector<Candidate>& out) {
  out.clear();
  if (k == 0) return;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (k <= kHeapSelectMax) {
    // Heap ordered by Better: its front is the worst of the best k seen so far.
    for (size_t i = 0; i < logits.size(); ++i) {
      if (logits[i] == neg_inf) continue;
      const Candidate c{static_cast<int32_t>(i), logits[i], 0.0f};
      if (out.size() < k) {
        out.push_back(c);
        std::push_heap(out.begin(), out.end(), Better);
      } else if (Better(c, out.front())) {
        std::pop_heap(out.begin(), out.end(), Better);
        out.back() = c;
        std::push_heap(out.begin(), out.end(), Better);
      }
    }
    if (sorted) std::sort_heap(out.begin(), out.end(), Better);
    return;
  }
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logits[i] != neg_inf) out.push_back({static_cast<int32_t>(i), logits[i], 0.0f});
  }
  if (k < out.size()) {
    std::nth_element(out.begin(), out.begin() + k, out.end(), Better);
    out.resize(k);
  }
  if (sorted) std::sort(out.begin(), out.end(), Better);
}

// The result of scanning a penalized row.
struct RowStats {
  float max_logit;
  int32_t argmax;  // Lowest id holding max_logit.
};

// Returns the row's maximum and argmax, or Internal on NaN, +inf or an all -inf row.
absl::StatusOr<RowStats> ScanLogits(absl::Span<const float> logits) {
  const float inf = std::numeric_limits<float>::infinity();
  RowStats stats{-inf, -1};
  for (size_t i = 0; i < logits.size(); ++i) {
    const float x = logits[i];
    if (std::isnan(x) || x == inf) {
      return absl::InternalError(absl::StrCat("logits hold ", x, " at token ", i, " of ",
                                              logits.size(), "; refusing to sample"));
    }
    if (x > stats.max_logit) stats = {x, static_cast<int32_t>(i)};
  }
  if (stats.argmax < 0) {
    return absl::InternalError(
        absl::StrCat("all ", logits.size(), " logits are -inf; nothing to sample"));
  }
  return stats;
}

// Returns log(sum(exp(logits))) for a row whose maximum is `max_logit`.
double LogSumExp(absl::Span<const float> logits, float max_logit) {
  double sum = 0.0;
  for (float x : logits) sum += std::exp(x - max_logit);
  return max_logit + std::log(sum);
}

// Returns the unnormalized probability exp((logit - max_logit) / temperature), which is 1 for
// the best token and 0 for -inf. Dividing (rather than multiplying by 1/T) keeps a denormal
// temperature from producing 0 * inf.
inline float UnnormalizedProb(float logit, float max_logit, float temperature) {
  return std::exp((logit - max_logit) / temperature);
}

// Returns the worst candidate of the smallest Better-first set of `c` (probabilities set) whose
// mass reaches `target`; reorders `c`, which must not be empty. Quickselect on mass, expected
// O(n), at most 64 rounds before the rest is sorted: the vocabulary is never fully sorted.
Candidate TopPBoundary(std::vector<Candidate>& c, double target) {
  size_t lo = 0;
  size_t hi = c.size();
  double before = 0.0;  // Mass of c[0, lo), each of which is better than all of c[lo, n).
  for (int round = 0; hi - lo > 32 && round < 64; ++round) {
    // Median of three as the pivot, parked at hi - 1 while partitioning.
    size_t a = lo, b = lo + (hi - lo) / 2, d = hi - 1;
    if (Better(c[b], c[a])) std::swap(a, b);
    if (Better(c[d], c[b])) std::swap(b, d);
    if (Better(c[b], c[a])) std::swap(a, b);
    std::swap(c[b], c[hi - 1]);
    const Candidate pivot = c[hi - 1];
    auto split = std::partition(c.begin() + lo, c.begin() + hi - 1,
                                [&pivot](const Candidate& x) { return Better(x, pivot); });
    const size_t p = split - c.begin();
    std::swap(c[p], c[hi - 1]);
    double mass = 0.0;
    for (size_t i = lo; i < p; ++i) mass += c[i].prob;
    if (before + mass >= target) {
      hi = p;  // The set ends before the pivot.
    } else if (before + mass + pivot.prob >= target) {
      return pivot;
    } else {
      before += mass + pivot.prob;
      lo = p + 1;
    }
  }
  std::sort(c.begin() + lo, c.begin() + hi, Better);
  for (size_t i = lo; i < hi; ++i) {
    before += c[i].prob;
    if (before >= target) return c[i];
  }
  // Reached when the range emptied because target <= 0 (keep the best token), or when rounding
  // kept the sum below target (keep everything before hi).
  if (target <= 0.0 || hi == 0) return *std::min_element(c.begin(), c.end(), Better);
  return *std::max_element(c.begin(), c.begin() + hi, Better);
}

// Samples over the whole row in id order with temperature and min-p, keeping only tokens at or
// above `boundary` (in Better order) when it is set: inverse CDF with the draw `u` in [0, 1).
int32_t SampleInIdOrder(absl::Span<const float> logits, const SamplingParams& p,
                        const RowStats& stats, const std::optional<Candidate>& boundary,
                        double u) {
  // (id, unnormalized probability) of kept tokens, ascending id. The best token's probability
  // is 1, so min-p compares against min_p itself.
  thread_local std::vector<std::pair<int32_t, float>> kept;
  kept.clear();
  double total = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const float x = logits[i];
    if (boundary.has_value() && Better(*boundary, {static_cast<int32_t>(i), x, 0.0f})) continue;
    const float q = UnnormalizedProb(x, stats.max_logit, p.temperature);
    if (q <= 0.0f || q < p.min_p) continue;
    kept.emplace_back(static_cast<int32_t>(i), q);
    total += q;
  }
  const double target = u * total;
  double cum = 0.0;
  for (const auto& [id, q] : kept) {
    cum += q;
    if (target < cum) return id;
  }
  // Rounding left the draw past the last sum (or nothing had mass).
  return kept.empty() ? stats.argmax : kept.back().first;
}

// Samples from the row with temperature, top-k, top-p and min-p, using the uniform draw `u` in
// [0, 1): inverse CDF over the kept tokens in ascending id order. `stats` describes the row.
int32_t SampleFiltered(absl::Span<const float> logits, const SamplingParams& p,
                       const RowStats& stats, double u) {
  const bool top_k = p.top_k > 0 && static_cast<size_t>(p.top_k) < logits.size();
  const bool top_p = p.top_p < 1.0f;
  if (!top_k && !top_p) return SampleInIdOrder(logits, p, stats, std::nullopt, u);

  // The kept set is every token at or above a boundary token; find that token.
  thread_local std::vector<Candidate> cands;
  Candidate boundary;
  if (top_k) {
    SelectTopK(logits, static_cast<size_t>(p.top_k), /*sorted=*/false, cands);
    boundary = *std::max_element(cands.begin(), cands.end(), Better);  // The k-th best.
  }
  if (top_p) {
    double total = 0.0;
    if (top_k) {
      for (Candidate& c : cands) {
        c.prob = UnnormalizedProb(c.logit, stats.max_logit, p.temperature);
        total += c.prob;
      }
    } else {
      // Tokens below (1 - top_p) * total / n hold less than 1 - top_p of the mass together, so
      // the top-p set lies among the others: only those become candidates.
      thread_local std::vector<float> probs;
      probs.resize(logits.size());
      for (size_t i = 0; i < logits.size(); ++i) {
        probs[i] = UnnormalizedProb(logits[i], stats.max_logit, p.temperature);
        total += probs[i];
      }
      const double floor = (1.0 - p.top_p) * total / static_cast<double>(logits.size());
      cands.clear();
      for (size_t i = 0; i < logits.size(); ++i) {
        if (probs[i] > 0.0f && probs[i] >= floor) {
          cands.push_back({static_cast<int32_t>(i), logits[i], probs[i]});
        }
      }
    }
    if (cands.empty()) return stats.argmax;  // Not reachable: the best token always qualifies.
    boundary = TopPBoundary(cands, (static_cast<double>(p.top_p) - 1e-6) * total);
  }
  return SampleInIdOrder(logits, p, stats, boundary, u);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// SamplingParams.

absl::Status SamplingParams::Validate() const {
  if (!std::isfinite(temperature) || temperature < 0.0f) {
    return FieldError("temperature", "finite and >= 0", temperature);
  }
  if (top_k < 0) return FieldError("top_k", ">= 0 (0 = off)", top_k);
  if (!std::isfinite(top_p) || top_p <= 0.0f || top_p > 1.0f) {
    return FieldError("top_p", "in (0, 1]", top_p);
  }
  if (!std::isfinite(min_p) || min_p < 0.0f || min_p > 1.0f) {
    return FieldError("min_p", "in [0, 1]", min_p);
  }
  if (!std::isfinite(repetition_penalty) || repetition_penalty <= 0.0f) {
    return FieldError("repetition_penalty", "finite and > 0", repetition_penalty);
  }
  if (!std::isfinite(presence_penalty) || presence_penalty < -2.0f || presence_penalty > 2.0f) {
    return FieldError("presence_penalty", "in [-2, 2]", presence_penalty);
  }
  if (!std::isfinite(frequency_penalty) || frequency_penalty < -2.0f ||
      frequency_penalty > 2.0f) {
    return FieldError("frequency_penalty", "in [-2, 2]", frequency_penalty);
  }
  if (top_logprobs < 0 || top_logprobs > kMaxTopLogprobs) {
    return FieldError("top_logprobs", absl::StrCat("in [0, ", kMaxTopLogprobs, "]"),
                      top_logprobs);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// SamplerRng.

SamplerRng::SamplerRng(uint64_t seed) {
  uint64_t state = seed;
  for (uint64_t& word : s_) word = SplitMix64(state);
}

uint64_t SamplerRng::NextU64() {
  const uint64_t result = RotateLeft(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = RotateLeft(s_[3], 45);
  return result;
}

double SamplerRng::NextUniform() {
  return static_cast<double>(NextU64() >> 11) * 0x1.0p-53;
}

uint64_t NondeterministicSeed() {
  absl::BitGen gen;  // Seeded from the operating system's entropy.
  return absl::Uniform<uint64_t>(gen);
}

// ---------------------------------------------------------------------------------------------
// TokenHistory.

void TokenHistory::AddPrompt(absl::Span<const int32_t> ids) {
  for (int32_t id : ids) ++counts_[id].prompt;
}

void TokenHistory::AddGenerated(int32_t id) {
  ++counts_[id].generated;
  ++num_generated_;
}

int32_t TokenHistory::PromptCount(int32_t id) const {
  auto it = counts_.find(id);
  return it == counts_.end() ? 0 : it->second.prompt;
}

int32_t TokenHistory::GeneratedCount(int32_t id) const {
  auto it = counts_.find(id);
  return it == counts_.end() ? 0 : it->second.generated;
}

// ---------------------------------------------------------------------------------------------
// Penalties and sampling.

absl::Status ApplyPenalties(absl::Span<float> logits, const SamplingParams& params,
                            const TokenHistory& history) {
  const bool repetition = params.repetition_penalty != 1.0f;
  const bool additive = params.presence_penalty != 0.0f || params.frequency_penalty != 0.0f;
  if (!repetition && !additive) return absl::OkStatus();
  for (const auto& [id, counts] : history.counts()) {
    const bool generated = counts.generated > 0;
    if (!generated && !(repetition && counts.prompt > 0)) continue;
    if (id < 0 || static_cast<size_t>(id) >= logits.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token history holds id ", id, " outside the vocabulary of ", logits.size()));
    }
    float& x = logits[id];
    if (repetition) x = x > 0.0f ? x / params.repetition_penalty : x * params.repetition_penalty;
    if (additive && generated) {
      x -= params.frequency_penalty * static_cast<float>(counts.generated);
      x -= params.presence_penalty;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SampledToken> SampleTokenWithUniform(absl::Span<float> logits,
                                                    const SamplingParams& params,
                                                    const TokenHistory& history, double uniform) {
  if (logits.empty()) return absl::InvalidArgumentError("logits row is empty");
  SIEVE_RETURN_IF_ERROR(params.Validate());
  SIEVE_RETURN_IF_ERROR(ApplyPenalties(logits, params, history));
  SIEVE_ASSIGN_OR_RETURN(const RowStats stats, ScanLogits(logits));

  SampledToken out;
  out.id = params.temperature == 0.0f ? stats.argmax
                                      : SampleFiltered(logits, params, stats, uniform);
  if (params.return_logprob || params.top_logprobs > 0) {
    const double log_z = LogSumExp(logits, stats.max_logit);
    out.logprob = static_cast<float>(logits[out.id] - log_z);
    if (params.top_logprobs > 0) {
      thread_local std::vector<Candidate> top;
      SelectTopK(logits, static_cast<size_t>(params.top_logprobs), /*sorted=*/true, top);
      out.top.reserve(top.size());
      for (const Candidate& c : top) {
        out.top.emplace_back(c.id, static_cast<float>(c.logit - log_z));
      }
    }
  }
  return out;
}

absl::StatusOr<SampledToken> SampleToken(absl::Span<float> logits, const SamplingParams& params,
                                         const TokenHistory& history, SamplerRng& rng) {
  return SampleTokenWithUniform(logits, params, history, rng.NextUniform());
}

// ---------------------------------------------------------------------------------------------
// StopCriteria and FinishReason.

absl::Status StopCriteria::Validate(int32_t vocab_size) const {
  if (vocab_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("vocab_size must be > 0, got ", vocab_size));
  }
  if (max_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 1, got ", max_tokens));
  }
  for (size_t i = 0; i < stop_token_ids.size(); ++i) {
    if (stop_token_ids[i] < 0 || stop_token_ids[i] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("stop_token_ids[", i, "] = ",
                                                     stop_token_ids[i], " is outside [0, ",
                                                     vocab_size, ")"));
    }
  }
  if (stop_strings.size() > static_cast<size_t>(kMaxStopStrings)) {
    return absl::InvalidArgumentError(absl::StrCat("stop_strings holds ", stop_strings.size(),
                                                   " strings; at most ", kMaxStopStrings));
  }
  for (size_t i = 0; i < stop_strings.size(); ++i) {
    const std::string& s = stop_strings[i];
    if (s.empty() || s.size() > static_cast<size_t>(kMaxStopStringBytes)) {
      return absl::InvalidArgumentError(absl::StrCat("stop_strings[", i, "] is ", s.size(),
                                                     " bytes; must be 1..",
                                                     kMaxStopStringBytes));
    }
    if (!IsValidUtf8(s)) {
      return absl::InvalidArgumentError(absl::StrCat("stop_strings[", i, "] is not valid UTF-8"));
    }
  }
  return absl::OkStatus();
}

absl::string_view FinishReasonToString(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "unknown";
}

}  // namespace sieve::engine
