#include "engine/tokenizer/chat_template.h"

#include <fstream>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using Json = nlohmann::json;

// A special token's text: a string, or an AddedToken object's "content"; nullopt when absent
// or null.
absl::StatusOr<std::optional<std::string>> TokenText(const Json& config, const char* key) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::optional<std::string>();
  if (it->is_string()) return std::optional<std::string>(it->get<std::string>());
  if (it->is_object()) {
    auto content = it->find("content");
    if (content != it->end() && content->is_string()) {
      return std::optional<std::string>(content->get<std::string>());
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "tokenizer_config.json ", key, ": expected a string or an object with a string \"content\""));
}

absl::StatusOr<ChatSpecialTokens> SpecialTokens(const Json& config) {
  ChatSpecialTokens tokens;
  SIEVE_ASSIGN_OR_RETURN(tokens.bos_token, TokenText(config, "bos_token"));
  SIEVE_ASSIGN_OR_RETURN(tokens.eos_token, TokenText(config, "eos_token"));
  SIEVE_ASSIGN_OR_RETURN(tokens.unk_token, TokenText(config, "unk_token"));
  SIEVE_ASSIGN_OR_RETURN(tokens.pad_token, TokenText(config, "pad_token"));
  return tokens;
}

absl::StatusOr<Json> ParseConfig(std::string_view text) {
  Json config = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError("tokenizer_config.json: not a JSON object");
  }
  return config;
}

// tokenizer_config.json's chat_template: a string, or the named list's "default" entry.
absl::StatusOr<std::string> TemplateSource(const Json& config) {
  auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) {
    return absl::NotFoundError("tokenizer_config.json has no chat_template");
  }
  if (it->is_string()) return it->get<std::string>();
  if (it->is_array()) {
    std::string names;
    for (const Json& entry : *it) {
      if (!entry.is_object()) continue;
      auto name = entry.find("name");
      auto source = entry.find("template");
      if (name == entry.end() || !name->is_string()) continue;
      absl::StrAppend(&names, names.empty() ? "" : ", ", name->get<std::string>());
      if (name->get<std::string>() == "default" && source != entry.end() && source->is_string()) {
        return source->get<std::string>();
      }
    }
    return absl::NotFoundError(absl::StrCat(
        "tokenizer_config.json chat_template lists no template named \"default\" (it has: ",
        names, ")"));
  }
  return absl::InvalidArgumentError(
      "tokenizer_config.json chat_template: expected a string or a list of {name, template}");
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::Create(
    std::string_view source, std::string origin, ChatSpecialTokens tokens,
    const jinja::RenderLimits& limits) {
  absl::StatusOr<std::unique_ptr<jinja::Template>> parsed = jinja::Template::Parse(source, limits);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("chat template (", origin, ") ", parsed.status().message()));
  }
  std::unique_ptr<ChatTemplate> t(new ChatTemplate());
  t->template_ = *std::move(parsed);
  t->origin_ = std::move(origin);
  t->tokens_ = std::move(tokens);
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Apply(absl::Span<const ChatMessage> messages,
                                                bool add_generation_prompt,
                                                absl::Time now) const {
  jinja::ValueList list;
  list.reserve(messages.size());
  for (const ChatMessage& m : messages) {
    jinja::ValueDict d;
    d.Set("role", jinja::Value::String(m.role));
    d.Set("content", jinja::Value::String(m.content));
    list.push_back(jinja::Value::Dict(std::move(d)));
  }
  return ApplyValue(jinja::Value::List(std::move(list)), add_generation_prompt, {}, now);
}

absl::StatusOr<std::string> ChatTemplate::ApplyValue(const jinja::Value& messages,
                                                     bool add_generation_prompt,
                                                     const jinja::ValueDict& extra,
                                                     absl::Time now) const {
  jinja::ValueDict context;
  context.Set("messages", messages);
  context.Set("tools", jinja::Value::None());
  context.Set("documents", jinja::Value::None());
  context.Set("add_generation_prompt", jinja::Value::Bool(add_generation_prompt));
  const std::pair<const char*, const std::optional<std::string>*> tokens[] = {
      {"bos_token", &tokens_.bos_token},
      {"eos_token", &tokens_.eos_token},
      {"unk_token", &tokens_.unk_token},
      {"pad_token", &tokens_.pad_token}};
  for (const auto& [name, value] : tokens) {
    if (value->has_value()) context.Set(name, jinja::Value::String(**value));
  }
  for (const auto& [name, value] : extra.items) context.Set(name, value);
  absl::StatusOr<std::string> text = template_->Render(context, now);
  if (text.ok()) return text;
  if (text.status().GetPayload(jinja::kRaisedPayload).has_value()) {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", text.status().message()));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("chat template (", origin_, ") ", text.status().message()));
}

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplateFromTokenizerConfig(
    std::string_view tokenizer_config_json) {
  SIEVE_ASSIGN_OR_RETURN(Json config, ParseConfig(tokenizer_config_json));
  SIEVE_ASSIGN_OR_RETURN(std::string source, TemplateSource(config));
  SIEVE_ASSIGN_OR_RETURN(ChatSpecialTokens tokens, SpecialTokens(config));
  return ChatTemplate::Create(source, "tokenizer_config.json chat_template", std::move(tokens));
}

absl::StatusOr<std::unique_ptr<ChatTemplate>> LoadChatTemplate(const std::string& tokenizer_dir,
                                                               const std::string& template_file) {
  const std::string config_path = tokenizer_dir + "/tokenizer_config.json";
  std::optional<std::string> config_text;
  if (std::ifstream(config_path).good()) {
    SIEVE_ASSIGN_OR_RETURN(config_text, ReadFile(config_path));
  }
  const std::string folder_file = tokenizer_dir + "/" + std::string(kChatTemplateFileName);
  if (template_file.empty() && std::ifstream(folder_file).good()) {
    return LoadChatTemplate(tokenizer_dir, folder_file);
  }
  if (template_file.empty()) {
    if (!config_text.has_value()) {
      return absl::NotFoundError(absl::StrCat("no tokenizer_config.json in ", tokenizer_dir));
    }
    return ChatTemplateFromTokenizerConfig(*config_text);
  }
  absl::StatusOr<std::string> source = ReadFile(template_file);
  if (!source.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("chat template file ", template_file, ": ", source.status().message()));
  }
  ChatSpecialTokens tokens;
  if (config_text.has_value()) {
    SIEVE_ASSIGN_OR_RETURN(Json config, ParseConfig(*config_text));
    SIEVE_ASSIGN_OR_RETURN(tokens, SpecialTokens(config));
  }
  return ChatTemplate::Create(*source, template_file, std::move(tokens));
}

}  // namespace sieve::engine
