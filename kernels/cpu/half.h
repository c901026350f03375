// Conversions between IEEE fp16 / bfloat16 bit patterns and float, on the host.
// Header-only and dependency-free so that every layer can use them.
#ifndef SIEVE_KERNELS_CPU_HALF_H_
#define SIEVE_KERNELS_CPU_HALF_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sieve::kernels {

// Element type of a KV cache on the host (K and V pools alike): fp32, or 16-bit bit patterns
// (bfloat16, IEEE binary16) that the CPU kernels widen to fp32 as they read them.
enum class KvDtype : uint8_t { kFloat32, kBfloat16, kFloat16 };

// Bytes per element: 4 or 2.
inline int KvDtypeBytes(KvDtype t) { return t == KvDtype::kFloat32 ? 4 : 2; }

// "float32", "bfloat16", "float16" (the config spelling).
inline const char* KvDtypeName(KvDtype t) {
  switch (t) {
    case KvDtype::kFloat32: return "float32";
    case KvDtype::kBfloat16: return "bfloat16";
    case KvDtype::kFloat16: return "float16";
  }
  return "?";
}

// bfloat16 is the upper half of an fp32: widening is exact.
inline float Bf16ToFloat(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Rounds to nearest, ties to even; NaN stays NaN.
inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// float to IEEE 754 binary16, rounding to nearest, ties to even: overflow gives inf, NaN stays
// NaN, values below half the smallest subnormal give (signed) zero.
inline uint16_t FloatToF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (abs < 0x38800000u) {  // subnormal or zero in fp16: round abs / 2^-24 to an integer
    float a;
    std::memcpy(&a, &abs, sizeof a);
    const float scaled = a * 16777216.0f;  // exact: a power of two
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
  }
  // Normal: drop 13 mantissa bits with round-to-nearest-even; a carry bumps the exponent.
  uint32_t h = ((abs >> 13) - ((127 - 15) << 10));
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

// IEEE 754 binary16 to float, exact for every input including subnormals, inf and NaN.
inline float F16ToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // Subnormal: normalise.
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// `d` elements of a host cache of element type t, starting at element `offset`, as fp32: the
// elements themselves for float32, else widened (exactly) into buf[0, d) and buf returned.
inline const float* RowAsFloat(const void* cache, KvDtype t, int64_t offset, int d, float* buf) {
  if (t == KvDtype::kFloat32) return static_cast<const float*>(cache) + offset;
  const uint16_t* bits = static_cast<const uint16_t*>(cache) + offset;
  if (t == KvDtype::kBfloat16) {
    for (int i = 0; i < d; ++i) buf[i] = Bf16ToFloat(bits[i]);
  } else {
    for (int i = 0; i < d; ++i) buf[i] = F16ToFloat(bits[i]);
  }
  return buf;
}

// Rounds x's elements to t (bfloat16 or float16, to nearest even): returns their bit patterns
// and replaces x by their exact widening, so that an fp32 cache of x and a 16-bit cache of the
// result hold the same values (what tests and benchmarks of 16-bit caches compare). Vec: a
// contiguous container of float (std::vector with any allocator).
template <typename Vec>
std::vector<uint16_t> RoundToKv16(Vec& x, KvDtype t) {
  std::vector<uint16_t> bits(x.size());
  for (size_t i = 0; i < bits.size(); ++i) {
    bits[i] = t == KvDtype::kBfloat16 ? FloatToBf16(x[i]) : FloatToF16(x[i]);
    x[i] = t == KvDtype::kBfloat16 ? Bf16ToFloat(bits[i]) : F16ToFloat(bits[i]);
  }
  return bits;
}

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_CPU_HALF_H_
