#include "engine/tokenizer/unicode.h"

#include <algorithm>
#include <array>
#include <cstring>

namespace sieve::engine::unicode {
namespace {

// A run of code points [first, last] sharing `value` (class bits or combining class).
struct ClassRange {
  char32_t first;
  char32_t last;
  uint8_t value;
};

// One level of canonical decomposition: `cp` -> `first` `second` (second 0: a singleton).
struct Decomposition {
  char32_t cp;
  char32_t first;
  char32_t second;
};

// A primary composite: `first` + `second` -> `composite`.
struct Composition {
  char32_t first;
  char32_t second;
  char32_t composite;
};

#include "engine/tokenizer/unicode_tables.inc"

constexpr char32_t kMaxCodePoint = 0x10FFFF;

// Hangul syllable algorithm constants (Unicode chapter 3.12).
constexpr char32_t kHangulSBase = 0xAC00, kHangulLBase = 0x1100, kHangulVBase = 0x1161,
                   kHangulTBase = 0x11A7;
constexpr int kHangulLCount = 19, kHangulVCount = 21, kHangulTCount = 28;
constexpr int kHangulNCount = kHangulVCount * kHangulTCount;
constexpr int kHangulSCount = kHangulLCount * kHangulNCount;

// Below this code point every character is a starter that NFC leaves unchanged.
constexpr char32_t kNfcStableBelow = 0x300;

// Looks `cp` up in sorted disjoint ranges; 0 if not covered.
template <size_t N>
uint8_t LookupRange(const ClassRange (&ranges)[N], char32_t cp) {
  const ClassRange* end = ranges + N;
  const ClassRange* it = std::upper_bound(
      ranges, end, cp, [](char32_t c, const ClassRange& r) { return c < r.first; });
  if (it == ranges) return 0;
  --it;
  return cp <= it->last ? it->value : 0;
}

// Class bits of the Basic Multilingual Plane, one byte per code point (64 KiB).
const std::array<uint8_t, 0x10000>& BmpClasses() {
  static const auto* table = [] {
    auto* t = new std::array<uint8_t, 0x10000>();
    t->fill(0);
    for (const ClassRange& r : kCodePointClassRanges) {
      if (r.first > 0xFFFF) break;
      for (char32_t c = r.first; c <= std::min<char32_t>(r.last, 0xFFFF); ++c) (*t)[c] = r.value;
    }
    return t;
  }();
  return *table;
}

// Returns the one-level canonical decomposition of `cp`, or nullptr.
const Decomposition* FindDecomposition(char32_t cp) {
  const Decomposition* end = kCanonicalDecompositions + std::size(kCanonicalDecompositions);
  const Decomposition* it =
      std::lower_bound(kCanonicalDecompositions, end, cp,
                       [](const Decomposition& d, char32_t c) { return d.cp < c; });
  return (it != end && it->cp == cp) ? it : nullptr;
}

// Appends the full canonical decomposition of `cp` to `out`.
void Decompose(char32_t cp, std::vector<char32_t>* out) {
  if (cp >= kHangulSBase && cp < kHangulSBase + kHangulSCount) {
    const int s = cp - kHangulSBase;
    out->push_back(kHangulLBase + s / kHangulNCount);
    out->push_back(kHangulVBase + (s % kHangulNCount) / kHangulTCount);
    if (s % kHangulTCount != 0) out->push_back(kHangulTBase + s % kHangulTCount);
    return;
  }
  const Decomposition* d = FindDecomposition(cp);
  if (d == nullptr) {
    out->push_back(cp);
    return;
  }
  Decompose(d->first, out);
  if (d->second != 0) Decompose(d->second, out);
}

// Returns the primary composite of `a` + `b`, or 0 if there is none.
char32_t Compose(char32_t a, char32_t b) {
  if (a >= kHangulLBase && a < kHangulLBase + kHangulLCount && b >= kHangulVBase &&
      b < kHangulVBase + kHangulVCount) {
    return kHangulSBase + ((a - kHangulLBase) * kHangulVCount + (b - kHangulVBase)) * kHangulTCount;
  }
  if (a >= kHangulSBase && a < kHangulSBase + kHangulSCount &&
      (a - kHangulSBase) % kHangulTCount == 0 && b > kHangulTBase &&
      b < kHangulTBase + kHangulTCount) {
    return a + (b - kHangulTBase);
  }
  const Composition* end = kCanonicalCompositions + std::size(kCanonicalCompositions);
  const Composition* it =
      std::lower_bound(kCanonicalCompositions, end, std::make_pair(a, b),
                       [](const Composition& c, const std::pair<char32_t, char32_t>& key) {
                         return c.first != key.first ? c.first < key.first : c.second < key.second;
                       });
  return (it != end && it->first == a && it->second == b) ? it->composite : 0;
}

// Sorts each run of non-starters by combining class, keeping equal classes in order.
void CanonicalOrder(std::vector<char32_t>* chars) {
  std::vector<char32_t>& c = *chars;
  size_t i = 0;
  while (i < c.size()) {
    if (CombiningClass(c[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < c.size() && CombiningClass(c[j]) != 0) ++j;
    if (j - i > 1) {
      std::stable_sort(c.begin() + i, c.begin() + j, [](char32_t x, char32_t y) {
        return CombiningClass(x) < CombiningClass(y);
      });
    }
    i = j;
  }
}

// Canonically composes decomposed, canonically ordered `chars` in place.
void ComposeAll(std::vector<char32_t>* chars) {
  std::vector<char32_t>& c = *chars;
  size_t out = 0;
  std::optional<size_t> starter;  // Index in the output of the last starter.
  int last_class = -1;            // Class of the last uncomposed char after it; -1: adjacent.
  for (size_t i = 0; i < c.size(); ++i) {
    const char32_t ch = c[i];
    const int cc = CombiningClass(ch);
    if (starter.has_value() && (last_class == -1 || (last_class != 0 && last_class < cc))) {
      const char32_t composite = Compose(c[*starter], ch);
      if (composite != 0) {
        c[*starter] = composite;
        continue;
      }
    }
    if (cc == 0) {
      starter = out;
      last_class = -1;
    } else {
      last_class = cc;
    }
    c[out++] = ch;
  }
  c.resize(out);
}

}  // namespace

std::vector<CodePointRange> AssignedAfterUnicode14(char category) {
  std::vector<CodePointRange> out;
  auto add = [&out](const auto& ranges) {
    for (const CodePointRange& r : ranges) {
      if (r.last != 0) out.push_back(r);
    }
  };
  switch (category) {
    case 'L':
      add(kLettersAfterUnicode14);
      break;
    case 'N':
      add(kNumbersAfterUnicode14);
      break;
    case 'P':
      add(kPunctuationAfterUnicode14);
      break;
    case 'S':
      add(kSymbolsAfterUnicode14);
      break;
    case 'M':
      add(kMarksAfterUnicode14);
      break;
    default:
      break;
  }
  return out;
}

uint8_t ClassesOf(char32_t cp) {
  if (cp <= 0xFFFF) return BmpClasses()[cp];
  if (cp > kMaxCodePoint) return 0;
  return LookupRange(kCodePointClassRanges, cp);
}

int CombiningClass(char32_t cp) {
  if (cp < kNfcStableBelow) return 0;
  return LookupRange(kCombiningClassRanges, cp);
}

const char* UnicodeDataVersion() { return kUnicodeDataVersion; }

namespace {

// Length of the well-formed UTF-8 sequence that lead byte `b` starts (0: never a lead), and
// the range [lo, hi] allowed for the second byte.
int SequenceInfo(unsigned char b, unsigned char* lo, unsigned char* hi) {
  *lo = 0x80;
  *hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) return 2;
  if (b >= 0xE0 && b <= 0xEF) {
    if (b == 0xE0) *lo = 0xA0;
    if (b == 0xED) *hi = 0x9F;
    return 3;
  }
  if (b >= 0xF0 && b <= 0xF4) {
    if (b == 0xF0) *lo = 0x90;
    if (b == 0xF4) *hi = 0x8F;
    return 4;
  }
  return 0;
}

// Returns how many bytes of `s` starting at `pos` form a valid prefix of one well-formed
// sequence (at least 1 when the lead byte is valid), and sets `*complete` when that prefix is
// the whole sequence. Returns 0 if s[pos] cannot start a sequence.
size_t ValidPrefix(std::string_view s, size_t pos, bool* complete) {
  const auto* u = reinterpret_cast<const unsigned char*>(s.data());
  *complete = false;
  if (u[pos] < 0x80) {
    *complete = true;
    return 1;
  }
  unsigned char lo, hi;
  const int len = SequenceInfo(u[pos], &lo, &hi);
  if (len == 0) return 0;
  size_t n = 1;
  while (n < static_cast<size_t>(len) && pos + n < s.size()) {
    const unsigned char b = u[pos + n];
    const bool ok = n == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) break;
    ++n;
  }
  *complete = n == static_cast<size_t>(len);
  return n;
}

}  // namespace

std::optional<size_t> FindInvalidUtf8(std::string_view bytes) {
  size_t i = 0;
  while (i < bytes.size()) {
    if (static_cast<unsigned char>(bytes[i]) < 0x80) {
      ++i;
      continue;
    }
    bool complete;
    const size_t n = ValidPrefix(bytes, i, &complete);
    if (!complete) return i;
    i += n;
  }
  return std::nullopt;
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::vector<char32_t> DecodeUtf8(std::string_view text) {
  std::vector<char32_t> out;
  out.reserve(text.size());
  size_t pos = 0;
  while (pos < text.size()) out.push_back(DecodeNext(text, &pos));
  return out;
}

std::string Utf8Lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    bool complete;
    const size_t n = ValidPrefix(bytes, i, &complete);
    if (complete) {
      out.append(bytes.data() + i, n);
      i += n;
    } else {
      AppendUtf8(kReplacementChar, &out);
      i += std::max<size_t>(n, 1);
    }
  }
  return out;
}

size_t IncompleteUtf8Suffix(std::string_view bytes) {
  const size_t n = bytes.size();
  // A lead byte within the last three bytes may start a sequence that is still incomplete.
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const size_t pos = n - back;
    const auto b = static_cast<unsigned char>(bytes[pos]);
    if (b >= 0x80 && b <= 0xBF) continue;  // Continuation byte: look further back.
    bool complete;
    const size_t len = ValidPrefix(bytes, pos, &complete);
    return (!complete && len == back) ? back : 0;
  }
  return 0;
}

std::string NfcNormalize(std::string_view text) {
  size_t pos = 0;
  bool trivial = true;
  while (pos < text.size()) {
    if (DecodeNext(text, &pos) >= kNfcStableBelow) {
      trivial = false;
      break;
    }
  }
  if (trivial) return std::string(text);
  std::vector<char32_t> chars;
  chars.reserve(text.size());
  pos = 0;
  while (pos < text.size()) Decompose(DecodeNext(text, &pos), &chars);
  CanonicalOrder(&chars);
  ComposeAll(&chars);
  std::string out;
  out.reserve(text.size());
  for (char32_t c : chars) AppendUtf8(c, &out);
  return out;
}

}  // namespace sieve::engine::unicode
