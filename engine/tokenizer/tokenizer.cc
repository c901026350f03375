#include "engine/tokenizer/tokenizer.h"

#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/tokenizer_json.h"
#include "engine/tokenizer/unicode.h"

namespace sieve::engine {
namespace {

using tokenizer_json::FieldError;
using tokenizer_json::FieldPath;
using tokenizer_json::IndexPath;
using tokenizer_json::Json;

constexpr int kMaxSequenceDepth = 8;

// Reads a whole file; NotFound if it does not exist.
absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("tokenizer: cannot open ", path));
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("tokenizer: cannot read ", path));
  return contents.str();
}

// Returns the content of a tokenizer_config.json token entry: a string, {"content": s}, or
// null (nullopt).
absl::StatusOr<std::optional<std::string>> ConfigTokenContent(const Json& config,
                                                              std::string_view key) {
  const Json* v = tokenizer_json::FindField(config, key);
  const std::string path = absl::StrCat("tokenizer_config.json ", tokenizer_json::AbslView(key));
  if (v == nullptr) return std::optional<std::string>();
  if (v->is_string()) return std::optional<std::string>(v->get<std::string>());
  if (v->is_object()) return tokenizer_json::OptionalString(*v, "content", path);
  return FieldError(path, "expected a string, an object with \"content\", or null");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromDirectory(const std::string& dir) {
  SIEVE_ASSIGN_OR_RETURN(std::string tokenizer_json, ReadFile(dir + "/tokenizer.json"));
  std::string config_json;
  const std::string config_path = dir + "/tokenizer_config.json";
  if (std::ifstream(config_path).good()) {
    SIEVE_ASSIGN_OR_RETURN(config_json, ReadFile(config_path));
  }
  SIEVE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer,
                         FromJson(tokenizer_json, config_json));
  if (std::ifstream(dir + "/" + std::string(kChatTemplateFileName)).good()) {
    tokenizer->SetChatTemplate(LoadChatTemplate(dir, ""));
  }
  return tokenizer;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(
    std::string_view tokenizer_json, std::string_view tokenizer_config_json) {
  SIEVE_ASSIGN_OR_RETURN(Json root, tokenizer_json::ParseJson(tokenizer_json, "tokenizer.json"));
  std::optional<Json> config;
  if (!tokenizer_config_json.empty()) {
    SIEVE_ASSIGN_OR_RETURN(
        config, tokenizer_json::ParseJson(tokenizer_config_json, "tokenizer_config.json"));
  }
  std::unique_ptr<Tokenizer> tokenizer(new Tokenizer());
  try {
    SIEVE_RETURN_IF_ERROR(tokenizer->Init(root, config.has_value() ? &*config : nullptr));
  } catch (const std::exception& e) {  // Defensive: every access is type-checked first.
    return absl::InvalidArgumentError(absl::StrCat("tokenizer: malformed JSON: ", e.what()));
  }
  if (config.has_value()) {
    tokenizer->SetChatTemplate(ChatTemplateFromTokenizerConfig(tokenizer_config_json));
  }
  return tokenizer;
}

void Tokenizer::SetChatTemplate(absl::StatusOr<std::unique_ptr<ChatTemplate>> chat_template) {
  if (chat_template.ok()) {
    chat_template_ = *std::move(chat_template);
    chat_template_status_ = absl::OkStatus();
  } else {
    chat_template_.reset();
    chat_template_status_ = chat_template.status();
  }
}

absl::Status Tokenizer::Init(const Json& root, const Json* config) {
  SIEVE_RETURN_IF_ERROR(tokenizer_json::ExpectObject(root, "tokenizer.json"));
  SIEVE_ASSIGN_OR_RETURN(const Json* model, tokenizer_json::RequiredField(root, "model", ""));
  SIEVE_RETURN_IF_ERROR(tokenizer_json::ExpectObject(*model, "model"));
  SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> type,
                         tokenizer_json::OptionalString(*model, "type", "model"));
  if (type.has_value() && *type != "BPE") {
    return absl::UnimplementedError(
        absl::StrCat("tokenizer: model.type: unsupported model type '", *type, "' (only BPE)"));
  }
  SIEVE_ASSIGN_OR_RETURN(model_, BpeModel::FromJson(*model, "model"));
  const Json null_value;
  const Json* normalizer = tokenizer_json::FindField(root, "normalizer");
  SIEVE_ASSIGN_OR_RETURN(normalizer_,
                         Normalizer::FromJson(normalizer ? *normalizer : null_value, "normalizer"));
  const Json* pre = tokenizer_json::FindField(root, "pre_tokenizer");
  SIEVE_ASSIGN_OR_RETURN(pre_tokenizer_,
                         PreTokenizer::FromJson(pre ? *pre : null_value, "pre_tokenizer"));
  SIEVE_RETURN_IF_ERROR(ParseAddedTokens(root));
  const Json* post = tokenizer_json::FindField(root, "post_processor");
  SIEVE_RETURN_IF_ERROR(ParsePostProcessor(post ? *post : null_value, "post_processor", 0));
  const Json* decoder = tokenizer_json::FindField(root, "decoder");
  SIEVE_ASSIGN_OR_RETURN(decoder_,
                         TokenDecoder::FromJson(decoder ? *decoder : null_value, "decoder"));
  BuildTokenTable();
  if (!prefix_ids_.empty()) bos_id_ = prefix_ids_.front();
  if (config != nullptr) SIEVE_RETURN_IF_ERROR(ApplyConfig(*config));
  for (const std::vector<int32_t>* ids : {&prefix_ids_, &suffix_ids_}) {
    for (int32_t id : *ids) {
      if (!Lookup(id).ok()) {
        return FieldError("post_processor",
                          absl::StrCat("adds token id ", id, " which is not in the vocabulary"));
      }
    }
  }
  return absl::OkStatus();
}

namespace {

// Parses one "added_tokens" entry (its "id" is only type-checked; see ParseAddedTokens).
absl::StatusOr<AddedToken> ParseAddedToken(const Json& entry, const std::string& path) {
  SIEVE_RETURN_IF_ERROR(tokenizer_json::ExpectObject(entry, path));
  AddedToken token;
  SIEVE_ASSIGN_OR_RETURN(const Json* id, tokenizer_json::RequiredField(entry, "id", path));
  SIEVE_ASSIGN_OR_RETURN(token.id, tokenizer_json::AsTokenId(*id, FieldPath(path, "id")));
  SIEVE_ASSIGN_OR_RETURN(token.content, tokenizer_json::RequiredString(entry, "content", path));
  SIEVE_ASSIGN_OR_RETURN(token.special,
                         tokenizer_json::OptionalBool(entry, "special", false, path));
  SIEVE_ASSIGN_OR_RETURN(token.single_word,
                         tokenizer_json::OptionalBool(entry, "single_word", false, path));
  SIEVE_ASSIGN_OR_RETURN(token.lstrip, tokenizer_json::OptionalBool(entry, "lstrip", false, path));
  SIEVE_ASSIGN_OR_RETURN(token.rstrip, tokenizer_json::OptionalBool(entry, "rstrip", false, path));
  SIEVE_ASSIGN_OR_RETURN(token.normalized,
                         tokenizer_json::OptionalBool(entry, "normalized", !token.special, path));
  return token;
}

// Reads the [cls] / [sep] ids of a RobertaProcessing or BertProcessing post-processor.
absl::Status ParseClsSep(const Json& config, std::string_view path, std::vector<int32_t>* prefix,
                         std::vector<int32_t>* suffix) {
  for (const char* key : {"cls", "sep"}) {
    SIEVE_ASSIGN_OR_RETURN(const Json* pair, tokenizer_json::RequiredField(config, key, path));
    const std::string pair_path = FieldPath(path, key);
    if (!pair->is_array() || pair->size() != 2 || !(*pair)[0].is_string()) {
      return FieldError(pair_path, "expected [token, id]");
    }
    SIEVE_ASSIGN_OR_RETURN(int32_t id, tokenizer_json::AsTokenId((*pair)[1], pair_path));
    (std::string_view(key) == "cls" ? prefix : suffix)->push_back(id);
  }
  return absl::OkStatus();
}

// Reads the ids a TemplateProcessing post-processor puts around a single sequence.
absl::Status ParseTemplate(const Json& config, std::string_view path, std::vector<int32_t>* prefix,
                           std::vector<int32_t>* suffix) {
  SIEVE_ASSIGN_OR_RETURN(const Json* single, tokenizer_json::RequiredField(config, "single", path));
  SIEVE_ASSIGN_OR_RETURN(const Json* specials,
                         tokenizer_json::RequiredField(config, "special_tokens", path));
  const std::string single_path = FieldPath(path, "single");
  if (!single->is_array()) return FieldError(single_path, "expected an array of pieces");
  bool seen_sequence = false;
  for (size_t i = 0; i < single->size(); ++i) {
    const Json& piece = (*single)[i];
    const std::string piece_path = IndexPath(single_path, i);
    if (const Json* seq = tokenizer_json::FindField(piece, "Sequence")) {
      SIEVE_ASSIGN_OR_RETURN(std::string id,
                             tokenizer_json::RequiredString(*seq, "id", piece_path));
      if (id != "A" || seen_sequence) {
        return FieldError(piece_path, "the single template must contain sequence A exactly once");
      }
      seen_sequence = true;
      continue;
    }
    const Json* special = tokenizer_json::FindField(piece, "SpecialToken");
    if (special == nullptr) return FieldError(piece_path, "expected Sequence or SpecialToken");
    SIEVE_ASSIGN_OR_RETURN(std::string name,
                           tokenizer_json::RequiredString(*special, "id", piece_path));
    const Json* entry = tokenizer_json::FindField(*specials, name);
    const std::string entry_path = FieldPath(FieldPath(path, "special_tokens"), name);
    if (entry == nullptr) return FieldError(entry_path, "missing special token");
    SIEVE_ASSIGN_OR_RETURN(const Json* ids,
                           tokenizer_json::RequiredField(*entry, "ids", entry_path));
    if (!ids->is_array()) return FieldError(FieldPath(entry_path, "ids"), "expected an array");
    for (size_t k = 0; k < ids->size(); ++k) {
      SIEVE_ASSIGN_OR_RETURN(
          int32_t id,
          tokenizer_json::AsTokenId((*ids)[k], IndexPath(FieldPath(entry_path, "ids"), k)));
      (seen_sequence ? suffix : prefix)->push_back(id);
    }
  }
  if (!seen_sequence) return FieldError(single_path, "the single template has no sequence A");
  return absl::OkStatus();
}

bool SameToken(const AddedToken& a, const AddedToken& b) {
  return a.content == b.content && a.special == b.special && a.single_word == b.single_word &&
         a.lstrip == b.lstrip && a.rstrip == b.rstrip && a.normalized == b.normalized;
}

}  // namespace

absl::Status Tokenizer::ParseAddedTokens(const Json& root) {
  const Json* list = tokenizer_json::FindField(root, "added_tokens");
  if (list == nullptr) return absl::OkStatus();
  if (!list->is_array()) return FieldError("added_tokens", "expected an array");
  // Ids are assigned as Hugging Face does when it loads the file (it ignores the stored id
  // and warns on a mismatch): a content already known keeps its id (added tokens first, then
  // the vocabulary); any other token gets the next id after the vocabulary and the added
  // tokens so far. For well-formed files this is the stored id.
  const int64_t vocab_entries = model_->num_entries();
  absl::flat_hash_map<int32_t, size_t> index_by_id;
  int64_t max_added_id = -1;
  for (size_t i = 0; i < list->size(); ++i) {
    const std::string path = IndexPath("added_tokens", i);
    SIEVE_ASSIGN_OR_RETURN(AddedToken token, ParseAddedToken((*list)[i], path));
    if (token.content.empty()) continue;  // Hugging Face ignores empty added tokens.
    if (unicode::FindInvalidUtf8(token.content).has_value()) {
      return FieldError(FieldPath(path, "content"), "not valid UTF-8");
    }
    if (auto it = added_ids_.find(token.content); it != added_ids_.end()) {
      token.id = it->second;
    } else if (std::optional<int32_t> vocab_id = model_->TokenToId(token.content)) {
      token.id = *vocab_id;
    } else {
      int64_t next = vocab_entries;
      if (max_added_id >= 0 && (max_added_id >= vocab_entries || vocab_entries == 0)) {
        next = max_added_id + 1;
      }
      if (next > INT32_MAX) return FieldError(path, "too many added tokens");
      token.id = static_cast<int32_t>(next);
    }
    max_added_id = std::max<int64_t>(max_added_id, token.id);
    added_ids_[token.content] = token.id;
    if (auto it = index_by_id.find(token.id); it != index_by_id.end()) {
      AddedToken& existing = added_tokens_[it->second];
      if (!SameToken(existing, token)) {
        // Hugging Face keeps a content special once it was declared special.
        const bool was_special = existing.special && existing.content == token.content;
        existing = token;
        existing.special = existing.special || was_special;
      }
      continue;
    }
    index_by_id.emplace(token.id, added_tokens_.size());
    added_tokens_.push_back(std::move(token));
  }
  // Hugging Face matches special tokens first, then the others (this decides between tokens
  // with equal patterns).
  std::vector<std::pair<std::string, const AddedToken*>> raw, normalized;
  for (bool special : {true, false}) {
    for (const AddedToken& token : added_tokens_) {
      if (token.special != special) continue;
      if (!token.normalized) {
        raw.emplace_back(token.content, &token);
      } else {
        SIEVE_ASSIGN_OR_RETURN(std::string pattern, normalizer_.Normalize(token.content));
        if (pattern.empty()) continue;  // Normalized away: it can never match.
        normalized.emplace_back(std::move(pattern), &token);
      }
    }
  }
  raw_matcher_ = AddedTokenMatcher(raw);
  normalized_matcher_ = AddedTokenMatcher(normalized);
  return absl::OkStatus();
}

absl::Status Tokenizer::ParsePostProcessor(const Json& config, std::string_view path, int depth) {
  if (config.is_null()) return absl::OkStatus();
  if (depth > kMaxSequenceDepth) return FieldError(path, "Sequence nested too deeply");
  SIEVE_RETURN_IF_ERROR(tokenizer_json::ExpectObject(config, path));
  SIEVE_ASSIGN_OR_RETURN(std::string type, tokenizer_json::RequiredString(config, "type", path));
  std::vector<int32_t> prefix, suffix;
  if (type == "ByteLevel") return absl::OkStatus();  // Only adjusts offsets.
  if (type == "Sequence") {
    SIEVE_ASSIGN_OR_RETURN(const Json* list,
                           tokenizer_json::RequiredField(config, "processors", path));
    const std::string list_path = FieldPath(path, "processors");
    if (!list->is_array()) return FieldError(list_path, "expected an array");
    for (size_t i = 0; i < list->size(); ++i) {
      SIEVE_RETURN_IF_ERROR(ParsePostProcessor((*list)[i], IndexPath(list_path, i), depth + 1));
    }
    return absl::OkStatus();
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    SIEVE_RETURN_IF_ERROR(ParseClsSep(config, path, &prefix, &suffix));
  } else if (type == "TemplateProcessing") {
    SIEVE_RETURN_IF_ERROR(ParseTemplate(config, path, &prefix, &suffix));
  } else {
    return absl::UnimplementedError(absl::StrCat("tokenizer: ", FieldPath(path, "type"),
                                                 ": unsupported post-processor type '", type, "'"));
  }
  // A later processor in a Sequence wraps the output of the earlier ones.
  prefix.insert(prefix.end(), prefix_ids_.begin(), prefix_ids_.end());
  prefix_ids_ = std::move(prefix);
  suffix_ids_.insert(suffix_ids_.end(), suffix.begin(), suffix.end());
  return absl::OkStatus();
}

void Tokenizer::BuildTokenTable() {
  vocab_size_ = model_->id_limit();
  for (const AddedToken& token : added_tokens_) vocab_size_ = std::max(vocab_size_, token.id + 1);
  tokens_.assign(vocab_size_, TokenInfo());
  auto set = [this](int32_t id, std::string_view token) {
    TokenInfo& info = tokens_[id];
    info.bytes = decoder_.Piece(token, /*first=*/false);
    info.fallback = static_cast<int16_t>(decoder_.FallbackByte(info.bytes));
    info.has_first = false;
    info.first_bytes.clear();
    if (decoder_.first_differs()) {
      std::string first = decoder_.Piece(token, /*first=*/true);
      if (first != info.bytes) {
        info.has_first = true;
        info.first_bytes = std::move(first);
      }
    }
    info.exists = true;
  };
  for (int32_t id = 0; id < model_->id_limit(); ++id) {
    if (const std::string* token = model_->IdToToken(id)) set(id, *token);
  }
  for (const AddedToken& token : added_tokens_) {
    // Like Hugging Face, a normalized token decodes from its NFC content.
    set(token.id, token.normalized && normalizer_.has_nfc() ? unicode::NfcNormalize(token.content)
                                                            : token.content);
    tokens_[token.id].special = token.special;
  }
}

absl::Status Tokenizer::ApplyConfig(const Json& config) {
  SIEVE_RETURN_IF_ERROR(tokenizer_json::ExpectObject(config, "tokenizer_config.json"));
  SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> bos, ConfigTokenContent(config, "bos_token"));
  SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> eos, ConfigTokenContent(config, "eos_token"));
  if (bos.has_value()) {
    bos_id_ = TokenToId(*bos);
    if (!bos_id_.has_value()) {
      return FieldError("tokenizer_config.json bos_token",
                        absl::StrCat("'", *bos, "' is not a token"));
    }
  }
  if (eos.has_value()) {
    std::optional<int32_t> eos_id = TokenToId(*eos);
    if (!eos_id.has_value()) {
      return FieldError("tokenizer_config.json eos_token",
                        absl::StrCat("'", *eos, "' is not a token"));
    }
    eos_ids_ = {*eos_id};
  }
  SIEVE_ASSIGN_OR_RETURN(bool add_bos, tokenizer_json::OptionalBool(config, "add_bos_token", false,
                                                                    "tokenizer_config.json"));
  SIEVE_ASSIGN_OR_RETURN(bool add_eos, tokenizer_json::OptionalBool(config, "add_eos_token", false,
                                                                    "tokenizer_config.json"));
  if (add_bos && bos_id_.has_value() && (prefix_ids_.empty() || prefix_ids_.front() != *bos_id_)) {
    prefix_ids_.insert(prefix_ids_.begin(), *bos_id_);
  }
  if (add_eos && !eos_ids_.empty() &&
      (suffix_ids_.empty() || suffix_ids_.back() != eos_ids_.front())) {
    suffix_ids_.push_back(eos_ids_.front());
  }
  return absl::OkStatus();
}

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  if (auto it = added_ids_.find(tokenizer_json::AbslView(token)); it != added_ids_.end())
    return it->second;
  return model_->TokenToId(token);
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < vocab_size_ && tokens_[id].special;
}

absl::StatusOr<const Tokenizer::TokenInfo*> Tokenizer::Lookup(int32_t id) const {
  if (id < 0 || id >= vocab_size_ || !tokens_[id].exists) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokenizer: token id ", id, " is not in the vocabulary (size ", vocab_size_, ")"));
  }
  return &tokens_[id];
}

absl::StatusOr<std::string> Tokenizer::TokenBytes(int32_t id) const {
  SIEVE_ASSIGN_OR_RETURN(const TokenInfo* info, Lookup(id));
  if (info->fallback >= 0) return std::string(1, static_cast<char>(info->fallback));
  return info->bytes;
}

absl::Status Tokenizer::EncodeSegment(std::string_view segment, bool at_start,
                                      std::vector<int32_t>* ids) const {
  std::string normalized_storage;
  std::string_view normalized = segment;
  if (!normalizer_.empty()) {
    SIEVE_ASSIGN_OR_RETURN(normalized_storage, normalizer_.Normalize(segment));
    normalized = normalized_storage;
  }
  std::vector<AddedTokenSplit> splits;
  if (normalized_matcher_.empty()) {
    splits.push_back({normalized, -1});
  } else {
    normalized_matcher_.Split(normalized, &splits);
  }
  std::vector<std::string> words;
  for (const AddedTokenSplit& split : splits) {
    if (split.id >= 0) {
      ids->push_back(split.id);
      continue;
    }
    SIEVE_RETURN_IF_ERROR(
        pre_tokenizer_->Split(split.text, at_start && split.text.data() == normalized.data(), &words));
    for (const std::string& word : words) SIEVE_RETURN_IF_ERROR(model_->Tokenize(word, ids));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text,
                                                       bool add_special_tokens) const {
  if (std::optional<size_t> bad = unicode::FindInvalidUtf8(text)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: text is not valid UTF-8 (at byte ", *bad, ")"));
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + prefix_ids_.size() + suffix_ids_.size() + 1);
  if (add_special_tokens) ids.insert(ids.end(), prefix_ids_.begin(), prefix_ids_.end());
  if (raw_matcher_.empty()) {
    SIEVE_RETURN_IF_ERROR(EncodeSegment(text, /*at_start=*/true, &ids));
  } else {
    std::vector<AddedTokenSplit> splits;
    raw_matcher_.Split(text, &splits);
    for (const AddedTokenSplit& split : splits) {
      if (split.id >= 0) {
        ids.push_back(split.id);
      } else {
        SIEVE_RETURN_IF_ERROR(EncodeSegment(split.text, split.text.data() == text.data(), &ids));
      }
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

void Tokenizer::PushToken(const TokenInfo& info, DecodeStream* stream, std::string* out) {
  if (info.has_first && stream->at_first()) {
    stream->Push(info.first_bytes, -1, out);
  } else {
    stream->Push(info.bytes, info.fallback, out);
  }
}

absl::StatusOr<std::string> Tokenizer::Decode(absl::Span<const int32_t> ids,
                                              bool skip_special_tokens) const {
  DecodeStream stream(decoder_, /*eager=*/false);
  std::string out;
  for (int32_t id : ids) {
    SIEVE_ASSIGN_OR_RETURN(const TokenInfo* info, Lookup(id));
    if (skip_special_tokens && info->special) continue;
    PushToken(*info, &stream, &out);
  }
  stream.Finish(&out);
  return out;
}

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer),
      skip_special_tokens_(skip_special_tokens),
      stream_(tokenizer.decoder_, /*eager=*/true) {}

absl::StatusOr<std::string> IncrementalDecoder::Push(int32_t id) {
  if (id >= tokenizer_.vocab_size()) return std::string();
  SIEVE_ASSIGN_OR_RETURN(const Tokenizer::TokenInfo* info, tokenizer_.Lookup(id));
  if (skip_special_tokens_ && info->special) return std::string();
  std::string out;
  Tokenizer::PushToken(*info, &stream_, &out);
  return out;
}

std::string IncrementalDecoder::Flush() {
  std::string out;
  stream_.Finish(&out);
  return out;
}

}  // namespace sieve::engine
