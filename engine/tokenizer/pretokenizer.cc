#include "engine/tokenizer/pretokenizer.h"

#include <algorithm>
#include <array>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/tokenizer_json.h"
#include "engine/tokenizer/unicode.h"

namespace sieve::engine {
namespace {

using tokenizer_json::FieldError;
using tokenizer_json::FieldPath;
using tokenizer_json::Json;

constexpr int kMaxSequenceDepth = 8;
constexpr char32_t kNone = 0xFFFFFFFF;  // Past the end of the text.

// The code points of a text with their classes and byte offsets, and the regex building
// blocks the scanners are made of. Index i is the i-th code point; n() is one past the end.
class CodePointScanner {
 public:
  explicit CodePointScanner(std::string_view text) : text_(text) {
    cps_.reserve(text.size());
    offsets_.reserve(text.size() + 1);
    size_t pos = 0;
    while (pos < text.size()) {
      offsets_.push_back(static_cast<uint32_t>(pos));
      const char32_t cp = unicode::DecodeNext(text, &pos);
      cps_.push_back(cp);
      classes_.push_back(unicode::ClassesOf(cp));
    }
    offsets_.push_back(static_cast<uint32_t>(text.size()));
  }

  size_t n() const { return cps_.size(); }
  char32_t At(size_t i) const { return i < cps_.size() ? cps_[i] : kNone; }
  bool IsLetter(size_t i) const { return Has(i, unicode::kLetter); }
  bool IsNumber(size_t i) const { return Has(i, unicode::kNumber); }
  bool IsSpace(size_t i) const { return Has(i, unicode::kWhitespace); }
  // [^\s\p{L}\p{N}]
  bool IsOther(size_t i) const {
    return i < cps_.size() &&
           (classes_[i] & (unicode::kLetter | unicode::kNumber | unicode::kWhitespace)) == 0;
  }
  bool IsNewline(size_t i) const { return At(i) == '\r' || At(i) == '\n'; }

  // Returns the end of the maximal run starting at `i` of code points satisfying `pred`.
  template <typename Pred>
  size_t RunEnd(size_t i, Pred pred) const {
    while (i < cps_.size() && pred(i)) ++i;
    return i;
  }
  size_t LetterRunEnd(size_t i) const {
    return RunEnd(i, [this](size_t k) { return IsLetter(k); });
  }
  size_t NumberRunEnd(size_t i) const {
    return RunEnd(i, [this](size_t k) { return IsNumber(k); });
  }
  size_t SpaceRunEnd(size_t i) const {
    return RunEnd(i, [this](size_t k) { return IsSpace(k); });
  }
  size_t OtherRunEnd(size_t i) const {
    return RunEnd(i, [this](size_t k) { return IsOther(k); });
  }
  size_t NewlineRunEnd(size_t i) const {
    return RunEnd(i, [this](size_t k) { return IsNewline(k); });
  }

  // The end of `\s+(?!\S)|\s+` matched at whitespace `i`: the whole run when it ends the text
  // or is one character long, else the run without its last character.
  size_t TrailingSpaceEnd(size_t i) const {
    const size_t end = SpaceRunEnd(i);
    if (end == n() || end - i < 2) return end;
    return end - 1;
  }

  // The end of a contraction 's|'t|'re|'ve|'m|'ll|'d at `i`, or 0 if there is none there.
  // `fold` maps a code point to the lowercase letter it matches.
  template <typename Fold>
  size_t ContractionEnd(size_t i, Fold fold) const {
    if (At(i) != '\'') return 0;
    const char32_t a = fold(At(i + 1));
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    const char32_t b = fold(At(i + 2));
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    return 0;
  }

  std::string_view Slice(size_t begin, size_t end) const {
    return text_.substr(offsets_[begin], offsets_[end] - offsets_[begin]);
  }

 private:
  bool Has(size_t i, uint8_t bits) const { return i < cps_.size() && (classes_[i] & bits); }

  std::string_view text_;
  std::vector<char32_t> cps_;
  std::vector<uint8_t> classes_;
  std::vector<uint32_t> offsets_;  // Byte offset of each code point, plus the text size.
};

char32_t CaseSensitive(char32_t c) { return c; }

// Case-insensitive matching of the contraction letters as Oniguruma folds them: ASCII case
// and U+017F LATIN SMALL LETTER LONG S, which folds to 's'.
char32_t FoldContractionLetter(char32_t c) {
  if (c >= 'A' && c <= 'Z') return c + ('a' - 'A');
  if (c == 0x17F) return 's';
  return c;
}

// One match of the GPT-2 regex at `i`; returns its end.
size_t MatchGpt2(const CodePointScanner& s, size_t i) {
  if (size_t end = s.ContractionEnd(i, CaseSensitive)) return end;
  // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: the optional space first.
  const size_t j = s.At(i) == ' ' ? i + 1 : i;
  for (size_t k : {j, i}) {
    if (s.IsLetter(k)) return s.LetterRunEnd(k);
    if (s.IsNumber(k)) return s.NumberRunEnd(k);
    if (s.IsOther(k)) return s.OtherRunEnd(k);
  }
  return s.TrailingSpaceEnd(i);  // `\s+(?!\S)|\s+`
}

// One match of the Llama-3 family regex at `i` (`max_digits` per number piece); returns its end.
size_t MatchLlama3(const CodePointScanner& s, size_t i, size_t max_digits) {
  if (size_t end = s.ContractionEnd(i, FoldContractionLetter)) return end;
  // `[^\r\n\p{L}\p{N}]?\p{L}+`
  if (!s.IsNewline(i) && !s.IsLetter(i) && !s.IsNumber(i) && s.IsLetter(i + 1)) {
    return s.LetterRunEnd(i + 1);
  }
  if (s.IsLetter(i)) return s.LetterRunEnd(i);
  // `\p{N}{1,3}` or `\p{N}`
  if (s.IsNumber(i)) return std::min(s.NumberRunEnd(i), i + max_digits);
  // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
  const size_t j = (s.At(i) == ' ' && s.IsOther(i + 1)) ? i + 1 : i;
  if (s.IsOther(j)) return s.NewlineRunEnd(s.OtherRunEnd(j));
  // `\s*[\r\n]+`: the whitespace run up to and including its last \r or \n.
  const size_t run_end = s.SpaceRunEnd(i);
  for (size_t k = run_end; k > i; --k) {
    if (s.IsNewline(k - 1)) return k;
  }
  return s.TrailingSpaceEnd(i);  // `\s+(?!\S)|\s+`
}

// GPT-2's bytes_to_unicode table and its inverse.
struct ByteLevelTables {
  std::array<std::array<char, 2>, 256> utf8;  // UTF-8 of each byte's character.
  std::array<uint8_t, 256> utf8_len;
  std::array<int16_t, 0x144> byte_of;  // Code point -> byte, or -1.
};

const ByteLevelTables& GetByteLevelTables() {
  static const ByteLevelTables* tables = [] {
    auto* t = new ByteLevelTables();
    t->byte_of.fill(-1);
    int next = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const char32_t cp = printable ? b : next++;
      std::string enc;
      unicode::AppendUtf8(cp, &enc);
      t->utf8[b] = {enc[0], enc.size() > 1 ? enc[1] : '\0'};
      t->utf8_len[b] = static_cast<uint8_t>(enc.size());
      t->byte_of[cp] = static_cast<int16_t>(b);
    }
    return t;
  }();
  return *tables;
}

}  // namespace

absl::StatusOr<PretokenizerRegex> RecognizePretokenizerRegex(std::string_view pattern) {
  if (pattern == kGpt2Regex) return PretokenizerRegex::kGpt2;
  if (pattern == kLlama3Regex) return PretokenizerRegex::kLlama3;
  if (pattern == kQwen2Regex) return PretokenizerRegex::kQwen2;
  return absl::UnimplementedError(absl::StrCat(
      "tokenizer: unsupported pre-tokenizer regex (only the GPT-2, Llama-3 and Qwen2 patterns "
      "are implemented): ",
      tokenizer_json::AbslView(pattern)));
}

void SplitByRegex(PretokenizerRegex regex, std::string_view text,
                  std::vector<std::string_view>* pieces) {
  const CodePointScanner scanner(text);
  size_t i = 0;
  while (i < scanner.n()) {
    size_t end;
    switch (regex) {
      case PretokenizerRegex::kGpt2:
        end = MatchGpt2(scanner, i);
        break;
      case PretokenizerRegex::kLlama3:
        end = MatchLlama3(scanner, i, 3);
        break;
      case PretokenizerRegex::kQwen2:
      default:
        end = MatchLlama3(scanner, i, 1);
        break;
    }
    pieces->push_back(scanner.Slice(i, end));
    i = end;
  }
}

std::string_view ByteLevelChar(uint8_t b) {
  const ByteLevelTables& t = GetByteLevelTables();
  return std::string_view(t.utf8[b].data(), t.utf8_len[b]);
}

int ByteLevelByte(char32_t cp) {
  const ByteLevelTables& t = GetByteLevelTables();
  return cp < t.byte_of.size() ? t.byte_of[cp] : -1;
}

void AppendByteLevel(std::string_view bytes, std::string* out) {
  const ByteLevelTables& t = GetByteLevelTables();
  for (char c : bytes) {
    const auto b = static_cast<uint8_t>(c);
    out->append(t.utf8[b].data(), t.utf8_len[b]);
  }
}

void SplitAtMatches(size_t size, const std::vector<Regex::Span>& matches, bool invert,
                    SplitBehavior behavior, std::vector<Regex::Span>* pieces) {
  if (size == 0) return;
  // The text as alternating gaps and matches, covering all of it.
  struct Part {
    uint32_t begin, end;
    bool delimiter;
  };
  std::vector<Part> parts;
  parts.reserve(matches.size() * 2 + 1);
  uint32_t pos = 0;
  for (const auto& [begin, end] : matches) {
    if (begin > pos) parts.push_back({pos, begin, invert});
    parts.push_back({begin, end, !invert});
    pos = end;
  }
  if (pos < size) parts.push_back({pos, static_cast<uint32_t>(size), invert});
  std::vector<Regex::Span> out;
  out.reserve(parts.size());
  bool previous_delimiter = false;
  switch (behavior) {
    case SplitBehavior::kRemoved:
      for (const Part& p : parts) {
        if (!p.delimiter) out.emplace_back(p.begin, p.end);
      }
      break;
    case SplitBehavior::kIsolated:
      for (const Part& p : parts) out.emplace_back(p.begin, p.end);
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const Part& p : parts) {
        if (p.delimiter && !previous_delimiter && !out.empty()) {
          out.back().second = p.end;
        } else {
          out.emplace_back(p.begin, p.end);
        }
        previous_delimiter = p.delimiter;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      // Built backwards: a delimiter joins the piece after it unless that is a delimiter too.
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        if (it->delimiter && !previous_delimiter && !out.empty()) {
          out.back().first = it->begin;
        } else {
          out.emplace_back(it->begin, it->end);
        }
        previous_delimiter = it->delimiter;
      }
      std::reverse(out.begin(), out.end());
      break;
    case SplitBehavior::kContiguous:
      for (size_t i = 0; i < parts.size(); ++i) {
        if (i > 0 && parts[i].delimiter == previous_delimiter) {
          out.back().second = parts[i].end;
        } else {
          out.emplace_back(parts[i].begin, parts[i].end);
        }
        previous_delimiter = parts[i].delimiter;
      }
      break;
  }
  for (const Regex::Span& span : out) {
    if (span.second > span.first) pieces->push_back(span);
  }
}

absl::Status PreTokenizer::ParseSplit(const Json& config, std::string_view path, Step* step) {
  step->kind = Step::Kind::kSplit;
  SIEVE_ASSIGN_OR_RETURN(const Json* pattern,
                         tokenizer_json::RequiredField(config, "pattern", path));
  const std::string pattern_path = FieldPath(path, "pattern");
  SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> regex,
                         tokenizer_json::OptionalString(*pattern, "Regex", pattern_path));
  SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> literal,
                         tokenizer_json::OptionalString(*pattern, "String", pattern_path));
  if (regex.has_value()) {
    if (absl::StatusOr<PretokenizerRegex> scanner = RecognizePretokenizerRegex(*regex);
        scanner.ok()) {
      step->scanner = *scanner;
    } else {
      SIEVE_ASSIGN_OR_RETURN(std::unique_ptr<Regex> compiled, Regex::Compile(*regex));
      step->regex = std::move(compiled);
    }
  } else if (literal.has_value() && !literal->empty()) {
    step->literal = *literal;
  } else {
    return FieldError(pattern_path, "expected {\"Regex\": ...} or {\"String\": non-empty}");
  }
  SIEVE_ASSIGN_OR_RETURN(std::string behavior,
                         tokenizer_json::RequiredString(config, "behavior", path));
  static constexpr std::pair<std::string_view, SplitBehavior> kBehaviors[] = {
      {"Removed", SplitBehavior::kRemoved},
      {"Isolated", SplitBehavior::kIsolated},
      {"MergedWithPrevious", SplitBehavior::kMergedWithPrevious},
      {"MergedWithNext", SplitBehavior::kMergedWithNext},
      {"Contiguous", SplitBehavior::kContiguous}};
  bool known = false;
  for (const auto& [name, value] : kBehaviors) {
    if (behavior == name) {
      step->behavior = value;
      known = true;
    }
  }
  if (!known) {
    return FieldError(FieldPath(path, "behavior"),
                      absl::StrCat("unknown Split behavior '", behavior, "'"));
  }
  SIEVE_ASSIGN_OR_RETURN(step->invert, tokenizer_json::OptionalBool(config, "invert", false, path));
  return absl::OkStatus();
}

absl::Status PreTokenizer::ParseMetaspace(const Json& config, std::string_view path, Step* step) {
  step->kind = Step::Kind::kMetaspace;
  SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> replacement,
                         tokenizer_json::OptionalString(config, "replacement", path));
  step->replacement = replacement.value_or("\xE2\x96\x81");  // U+2581
  if (step->replacement.empty() || unicode::FindInvalidUtf8(step->replacement).has_value()) {
    return FieldError(FieldPath(path, "replacement"), "expected one character");
  }
  size_t pos = 0;
  unicode::DecodeNext(step->replacement, &pos);
  if (pos != step->replacement.size()) {
    return FieldError(FieldPath(path, "replacement"), "expected one character");
  }
  SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> scheme,
                         tokenizer_json::OptionalString(config, "prepend_scheme", path));
  SIEVE_ASSIGN_OR_RETURN(bool add_prefix_space,
                         tokenizer_json::OptionalBool(config, "add_prefix_space", true, path));
  if (!scheme.has_value()) {
    step->prepend = add_prefix_space ? Step::Prepend::kAlways : Step::Prepend::kNever;
  } else if (*scheme == "always") {
    step->prepend = Step::Prepend::kAlways;
  } else if (*scheme == "first") {
    step->prepend = Step::Prepend::kFirst;
  } else if (*scheme == "never") {
    step->prepend = Step::Prepend::kNever;
  } else {
    return FieldError(FieldPath(path, "prepend_scheme"),
                      absl::StrCat("expected always, first or never, not '", *scheme, "'"));
  }
  SIEVE_ASSIGN_OR_RETURN(step->split, tokenizer_json::OptionalBool(config, "split", true, path));
  return absl::OkStatus();
}

absl::Status PreTokenizer::AppendSteps(const Json& config, std::string_view path, int depth,
                                       std::vector<Step>* steps) {
  if (depth > kMaxSequenceDepth) return FieldError(path, "Sequence nested too deeply");
  SIEVE_RETURN_IF_ERROR(tokenizer_json::ExpectObject(config, path));
  SIEVE_ASSIGN_OR_RETURN(std::string type, tokenizer_json::RequiredString(config, "type", path));
  if (type == "Sequence") {
    SIEVE_ASSIGN_OR_RETURN(const Json* list,
                           tokenizer_json::RequiredField(config, "pretokenizers", path));
    const std::string list_path = FieldPath(path, "pretokenizers");
    if (!list->is_array()) return FieldError(list_path, "expected an array");
    for (size_t i = 0; i < list->size(); ++i) {
      SIEVE_RETURN_IF_ERROR(
          AppendSteps((*list)[i], tokenizer_json::IndexPath(list_path, i), depth + 1, steps));
    }
    return absl::OkStatus();
  }
  Step step;
  if (type == "ByteLevel") {
    step.kind = Step::Kind::kByteLevel;
    SIEVE_ASSIGN_OR_RETURN(step.add_prefix_space,
                           tokenizer_json::OptionalBool(config, "add_prefix_space", true, path));
    SIEVE_ASSIGN_OR_RETURN(step.use_regex,
                           tokenizer_json::OptionalBool(config, "use_regex", true, path));
    step.scanner = PretokenizerRegex::kGpt2;
  } else if (type == "Split") {
    SIEVE_RETURN_IF_ERROR(ParseSplit(config, path, &step));
  } else if (type == "Metaspace") {
    SIEVE_RETURN_IF_ERROR(ParseMetaspace(config, path, &step));
  } else {
    return absl::UnimplementedError(absl::StrCat("tokenizer: ", FieldPath(path, "type"),
                                                 ": unsupported pre-tokenizer type '", type, "'"));
  }
  steps->push_back(std::move(step));
  return absl::OkStatus();
}

absl::StatusOr<PreTokenizer> PreTokenizer::FromJson(const Json& config, std::string_view path) {
  PreTokenizer pre;
  if (config.is_null()) return pre;
  SIEVE_RETURN_IF_ERROR(AppendSteps(config, path, 0, &pre.steps_));
  for (const Step& step : pre.steps_) {
    if (step.kind == Step::Kind::kByteLevel) pre.byte_level_ = true;
  }
  return pre;
}

absl::Status PreTokenizer::ApplyStep(const Step& step, std::string_view piece, bool at_start,
                                     Scratch* scratch, std::vector<std::string>* out,
                                     bool* first_at_start) {
  std::vector<std::string_view>& views = scratch->views;
  std::vector<Regex::Span>& matches = scratch->matches;
  std::vector<Regex::Span>& spans = scratch->spans;
  std::string& source_storage = scratch->storage;
  views.clear();
  matches.clear();
  spans.clear();
  source_storage.clear();
  std::string_view source = piece;
  *first_at_start = at_start;  // Unless a leading part is removed (below).
  switch (step.kind) {
    case Step::Kind::kByteLevel: {
      if (step.add_prefix_space && piece[0] != ' ') {
        source_storage.assign(" ");
        source_storage.append(piece);
        source = source_storage;
      }
      if (!step.use_regex) {
        std::string& mapped = out->emplace_back();
        mapped.reserve(source.size() * 2);
        AppendByteLevel(source, &mapped);
        return absl::OkStatus();
      }
      SplitByRegex(step.scanner, source, &views);  // The matches cover the text.
      for (std::string_view v : views) {
        if (v.empty()) continue;
        std::string& mapped = out->emplace_back();
        mapped.reserve(v.size() * 2);
        AppendByteLevel(v, &mapped);
      }
      return absl::OkStatus();
    }
    case Step::Kind::kSplit:
      if (step.regex != nullptr) {
        SIEVE_RETURN_IF_ERROR(step.regex->FindAll(source, &matches));
      } else if (!step.literal.empty()) {
        for (size_t hit = 0; (hit = source.find(step.literal, hit)) != std::string_view::npos;
             hit += step.literal.size()) {
          matches.emplace_back(hit, hit + step.literal.size());
        }
      } else {
        SplitByRegex(step.scanner, source, &views);
        if (step.behavior == SplitBehavior::kIsolated && !step.invert) {
          // The scanners' matches cover the text: they are the pieces.
          for (std::string_view v : views) out->emplace_back(v);
          return absl::OkStatus();
        }
        for (std::string_view v : views) {
          const auto begin = static_cast<uint32_t>(v.data() - source.data());
          matches.emplace_back(begin, begin + static_cast<uint32_t>(v.size()));
        }
      }
      SplitAtMatches(source.size(), matches, step.invert, step.behavior, &spans);
      break;
    case Step::Kind::kMetaspace: {
      for (size_t pos = 0;;) {
        const size_t hit = source.find(' ', pos);
        source_storage.append(source.substr(pos, hit - pos));
        if (hit == std::string_view::npos) break;
        source_storage.append(step.replacement);
        pos = hit + 1;
      }
      const bool prepend = step.prepend == Step::Prepend::kAlways ||
                           (step.prepend == Step::Prepend::kFirst && at_start);
      if (prepend && source_storage.compare(0, step.replacement.size(), step.replacement) != 0) {
        source_storage.insert(0, step.replacement);
      }
      source = source_storage;
      if (!step.split) {
        out->emplace_back(source);
        return absl::OkStatus();
      }
      for (size_t hit = 0; (hit = source.find(step.replacement, hit)) != std::string_view::npos;
           hit += step.replacement.size()) {
        matches.emplace_back(hit, hit + step.replacement.size());
      }
      SplitAtMatches(source.size(), matches, false, SplitBehavior::kMergedWithNext, &spans);
      break;
    }
  }
  *first_at_start = at_start && !spans.empty() && spans.front().first == 0;
  for (const auto& [begin, end] : spans) out->emplace_back(source.substr(begin, end - begin));
  return absl::OkStatus();
}

absl::Status PreTokenizer::Split(std::string_view text, bool at_start,
                                 std::vector<std::string>* pieces) const {
  pieces->clear();
  if (text.empty()) return absl::OkStatus();
  // Only the first piece can start the original input: `first_at_start` says whether it does.
  std::vector<std::string> next;
  Scratch scratch;
  pieces->emplace_back(text);
  bool first_at_start = at_start;
  for (const Step& step : steps_) {
    next.clear();
    bool next_first_at_start = false;
    for (size_t k = 0; k < pieces->size(); ++k) {
      const size_t before = next.size();
      bool starts = false;
      SIEVE_RETURN_IF_ERROR(
          ApplyStep(step, (*pieces)[k], k == 0 && first_at_start, &scratch, &next, &starts));
      if (before == 0 && next.size() > 0) next_first_at_start = k == 0 && starts;
    }
    pieces->swap(next);
    first_at_start = next_first_at_start;
  }
  // Steps never produce empty pieces except a ByteLevel step on an empty regex match.
  pieces->erase(std::remove_if(pieces->begin(), pieces->end(),
                               [](const std::string& p) { return p.empty(); }),
                pieces->end());
  return absl::OkStatus();
}

}  // namespace sieve::engine
