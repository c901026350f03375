#include "engine/model/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace sieve::engine {
namespace {

// YaRN's magnitude correction for a context stretched by `scale`.
double YarnMscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

// The dimension index whose wavelength completes `rotations` turns over `max_pos` tokens.
double YarnCorrectionDim(double rotations, int dim, double base, double max_pos) {
  return dim * std::log(max_pos / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(base));
}

}  // namespace

absl::StatusOr<RopeTables> ComputeRopeTables(const RopeParams& p) {
  if (p.rotary_dim <= 0 || p.rotary_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rope: rotary dimension must be positive and even, got ", p.rotary_dim));
  }
  if (!(p.theta > 0.0)) {
    return absl::InvalidArgumentError(absl::StrCat("rope: rope_theta must be > 0, got ", p.theta));
  }
  if (!(p.factor >= 1.0) && p.type != RopeParams::Type::kDefault) {
    return absl::InvalidArgumentError(
        absl::StrCat("rope: scaling factor must be >= 1, got ", p.factor));
  }
  const int dim = p.rotary_dim;
  const int half = dim / 2;
  const float base = static_cast<float>(p.theta);
  RopeTables t;
  t.inv_freq.resize(half);
  // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in fp32.
  std::vector<float> pos_freq(half);
  for (int i = 0; i < half; ++i) {
    pos_freq[i] = std::pow(base, static_cast<float>(2 * i) / static_cast<float>(dim));
    t.inv_freq[i] = 1.0f / pos_freq[i];
  }
  const float factor = static_cast<float>(p.factor);
  switch (p.type) {
    case RopeParams::Type::kDefault:
      break;
    case RopeParams::Type::kLinear:
      for (float& f : t.inv_freq) f /= factor;
      break;
    case RopeParams::Type::kLlama3: {
      if (!(p.high_freq_factor > p.low_freq_factor) || !(p.low_freq_factor > 0.0)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "rope: llama3 needs 0 < low_freq_factor < high_freq_factor, got ",
            p.low_freq_factor, " and ", p.high_freq_factor));
      }
      const float old_len = static_cast<float>(p.original_max_position);
      const float low_wavelen = old_len / static_cast<float>(p.low_freq_factor);
      const float high_wavelen = old_len / static_cast<float>(p.high_freq_factor);
      for (float& f : t.inv_freq) {
        const float wavelen = 2.0f * static_cast<float>(std::numbers::pi) / f;
        if (wavelen > low_wavelen) {
          f = f / factor;  // Low frequencies: interpolate fully.
        } else if (wavelen >= high_wavelen) {
          // Medium frequencies: blend between interpolation and the original frequency.
          const float smooth = (old_len / wavelen - static_cast<float>(p.low_freq_factor)) /
                               static_cast<float>(p.high_freq_factor - p.low_freq_factor);
          f = (1.0f - smooth) * f / factor + smooth * f;
        }
      }
      break;
    }
    case RopeParams::Type::kYarn: {
      double low = YarnCorrectionDim(p.beta_fast, dim, p.theta, p.original_max_position);
      double high = YarnCorrectionDim(p.beta_slow, dim, p.theta, p.original_max_position);
      if (p.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
      }
      low = std::max(low, 0.0);
      high = std::min(high, static_cast<double>(dim - 1));
      if (low == high) high += 0.001;
      for (int i = 0; i < half; ++i) {
        float ramp = (static_cast<float>(i) - static_cast<float>(low)) /
                     static_cast<float>(high - low);
        ramp = std::clamp(ramp, 0.0f, 1.0f);
        const float extrapolation = 1.0f - ramp;  // 1 = keep the original frequency.
        const float interp = 1.0f / (factor * pos_freq[i]);
        const float extrap = 1.0f / pos_freq[i];
        t.inv_freq[i] = interp * (1.0f - extrapolation) + extrap * extrapolation;
      }
      if (p.attention_factor > 0.0) {
        t.attention_scaling = static_cast<float>(p.attention_factor);
      } else if (p.mscale > 0.0 && p.mscale_all_dim > 0.0) {
        t.attention_scaling = static_cast<float>(YarnMscale(p.factor, p.mscale) /
                                                 YarnMscale(p.factor, p.mscale_all_dim));
      } else {
        t.attention_scaling = static_cast<float>(YarnMscale(p.factor, 1.0));
      }
      break;
    }
  }
  return t;
}

}  // namespace sieve::engine
