// A model's chat template: turns a conversation into the prompt text the model was trained on,
// as Hugging Face's `apply_chat_template` does (engine/tokenizer/jinja_template.h renders it).
//
// Sources, the first present wins: a template file given by configuration
// (`model.chat_template_file`); the tokenizer folder's chat_template.jinja (where recent
// transformers versions save it); tokenizer_config.json's "chat_template" (a string, or the list
// form [{"name": ..., "template": ...}] of which "default" is used). The special tokens the template may use
// (bos_token, eos_token, unk_token, pad_token) come from tokenizer_config.json, as strings or
// AddedToken objects ({"content": ...}); absent ones are undefined in the template.
//
// Render context, as transformers passes it: messages (a list of {"role", "content"} dicts),
// add_generation_prompt, the special tokens above, tools = none, documents = none; globals
// raise_exception() and strftime_now() (UTC).
// The rendered text is tokenized with add_special_tokens = false: the template places BOS.
//
// Thread-safety: immutable after creation; Apply may be called from any number of threads.
#ifndef SIEVE_ENGINE_TOKENIZER_CHAT_TEMPLATE_H_
#define SIEVE_ENGINE_TOKENIZER_CHAT_TEMPLATE_H_

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "engine/tokenizer/jinja_template.h"
#include "engine/tokenizer/jinja_value.h"

namespace sieve::engine {

// One message of a conversation.
struct ChatMessage {
  std::string role;     // "system", "user", "assistant", "tool" ... as the template expects.
  std::string content;  // The message text (UTF-8).
};

// The special tokens a template may print (nullopt: undefined in the template).
struct ChatSpecialTokens {
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
  std::optional<std::string> unk_token;
  std::optional<std::string> pad_token;
};

class ChatTemplate {
 public:
  // Parses template `source`; `origin` names where it came from in error messages (e.g.
  // "tokenizer_config.json chat_template"). InvalidArgument on a syntax error.
  static absl::StatusOr<std::unique_ptr<ChatTemplate>> Create(
      std::string_view source, std::string origin, ChatSpecialTokens tokens,
      const jinja::RenderLimits& limits = {});

  // Renders `messages` with the generation prompt added when `add_generation_prompt`; `now` is
  // what strftime_now() formats. InvalidArgument when rendering fails: "chat template: <msg>"
  // for the template's raise_exception(msg) (e.g. roles that do not alternate), else
  // "chat template (<origin>) line N: <what failed>".
  absl::StatusOr<std::string> Apply(absl::Span<const ChatMessage> messages,
                                    bool add_generation_prompt,
                                    absl::Time now = absl::Now()) const;

  // Same with messages as any value (e.g. parsed from JSON, with tool calls) and extra
  // variables (e.g. "tools") that override the defaults.
  absl::StatusOr<std::string> ApplyValue(const jinja::Value& messages, bool add_generation_prompt,
                                         const jinja::ValueDict& extra, absl::Time now) const;

  const std::string& origin() const { return origin_; }
  const ChatSpecialTokens& special_tokens() const { return tokens_; }

 private:
  ChatTemplate() = default;

  std::unique_ptr<jinja::Template> template_;
  std::string origin_;
  ChatSpecialTokens tokens_;
};

// Reads the chat template and special tokens from tokenizer_config.json's text. NotFound when
// the config has no "chat_template"; InvalidArgument when the JSON or the template is malformed
// (naming the field).
absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplateFromTokenizerConfig(
    std::string_view tokenizer_config_json);

// The file name a tokenizer folder may hold its chat template in.
inline constexpr std::string_view kChatTemplateFileName = "chat_template.jinja";

// Loads a model's chat template: the file `template_file` when non-empty, else
// `tokenizer_dir`/chat_template.jinja when present, else `tokenizer_dir`'s tokenizer_config.json
// chat_template; special tokens come from tokenizer_config.json when present. NotFound when none
// provides one; a file's read or parse errors name the file.
absl::StatusOr<std::unique_ptr<ChatTemplate>> LoadChatTemplate(const std::string& tokenizer_dir,
                                                               const std::string& template_file);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_TOKENIZER_CHAT_TEMPLATE_H_
