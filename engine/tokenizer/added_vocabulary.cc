#include "engine/tokenizer/added_vocabulary.h"

#include "engine/tokenizer/unicode.h"

namespace sieve::engine {
namespace {

bool IsContinuationByte(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

// Returns the start of the code point that ends at `end` (end > 0).
size_t PreviousCharStart(std::string_view text, size_t end) {
  size_t start = end - 1;
  while (start > 0 && IsContinuationByte(text[start])) --start;
  return start;
}

// Returns the code point that ends at `end` (end > 0).
char32_t CharBefore(std::string_view text, size_t end) {
  size_t start = PreviousCharStart(text, end);
  return unicode::DecodeNext(text, &start);
}

// Returns the code point that starts at `pos` (pos < size).
char32_t CharAt(std::string_view text, size_t pos) { return unicode::DecodeNext(text, &pos); }

}  // namespace

AddedTokenMatcher::AddedTokenMatcher(
    const std::vector<std::pair<std::string, const AddedToken*>>& tokens) {
  terminal_.push_back(-1);
  for (const auto& [pattern, token] : tokens) {
    if (pattern.empty()) continue;
    int32_t node = 0;
    for (char c : pattern) {
      const uint64_t key = (static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(c);
      auto it = edges_.find(key);
      if (it == edges_.end()) {
        const int32_t child = static_cast<int32_t>(terminal_.size());
        terminal_.push_back(-1);
        it = edges_.emplace(key, child).first;
      }
      node = it->second;
    }
    if (terminal_[node] < 0) {
      terminal_[node] = static_cast<int32_t>(patterns_.size());
      patterns_.push_back(token);
      first_byte_[static_cast<uint8_t>(pattern[0])] = true;
    }
  }
}

int AddedTokenMatcher::LongestMatchAt(std::string_view text, size_t pos, size_t* len) const {
  int best = -1;
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    auto it = edges_.find((static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(text[i]));
    if (it == edges_.end()) break;
    node = it->second;
    if (terminal_[node] >= 0) {
      best = terminal_[node];
      *len = i + 1 - pos;
    }
  }
  return best;
}

void AddedTokenMatcher::Split(std::string_view text, std::vector<AddedTokenSplit>* out) const {
  size_t start_offset = 0;  // End of what has been emitted so far.
  size_t pos = 0;           // Where the search for the next match resumes.
  while (!empty() && pos < text.size()) {
    if (!first_byte_[static_cast<uint8_t>(text[pos])]) {
      ++pos;
      continue;
    }
    size_t len = 0;
    const int index = LongestMatchAt(text, pos, &len);
    if (index < 0) {
      ++pos;
      continue;
    }
    const AddedToken& token = *patterns_[index];
    size_t start = pos;
    size_t stop = pos + len;
    pos = stop;
    if (token.single_word) {
      const bool word_before = start > 0 && unicode::IsWordChar(CharBefore(text, start));
      const bool word_after = stop < text.size() && unicode::IsWordChar(CharAt(text, stop));
      if (word_before || word_after) continue;
    }
    if (token.lstrip) {
      size_t new_start = start;
      while (new_start > 0 && unicode::IsWhitespace(CharBefore(text, new_start))) {
        new_start = PreviousCharStart(text, new_start);
      }
      start = std::max(new_start, start_offset);
    }
    if (token.rstrip) {
      while (stop < text.size()) {
        size_t next = stop;
        if (!unicode::IsWhitespace(unicode::DecodeNext(text, &next))) break;
        stop = next;
      }
    }
    if (start_offset < start) out->push_back({text.substr(start_offset, start - start_offset), -1});
    // A match inside whitespace that an rstrip token swallowed overlaps it, as in Hugging Face.
    const size_t token_begin = std::min(start, stop);
    out->push_back({text.substr(token_begin, stop - token_begin), token.id});
    start_offset = std::max(start_offset, stop);
  }
  if (start_offset < text.size()) out->push_back({text.substr(start_offset), -1});
}

}  // namespace sieve::engine
