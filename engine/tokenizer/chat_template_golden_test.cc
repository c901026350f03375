// Differential test of the chat-template renderer against Python's Jinja2: every template of
// tests/data/chat_templates/ (Llama 3.3 / 3.1, Llama 3 short form, Qwen3, Mistral Nemo, Gemma 2,
// Gemma 3, DeepSeek-V3) on every message list of goldens.json, written by
// scripts/chat_template_goldens/gen_goldens.py with the environment transformers uses. Outputs
// must be byte-equal; where Jinja2 raised, so must we (the same message for raise_exception).
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/time/civil_time.h"
#include "absl/time/time.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/jinja_template.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

std::string DataDir() {
  const char* source = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(source != nullptr ? source : ".") + "/tests/data/chat_templates/";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::optional<std::string> Token(const nlohmann::ordered_json& tokens, const char* key) {
  auto it = tokens.find(key);
  if (it == tokens.end() || !it->is_string()) return std::nullopt;
  return it->get<std::string>();
}

TEST(ChatTemplateGoldenTest, EqualsJinja2OnEveryTemplateAndMessageList) {
  const std::string text = ReadFile(DataDir() + "goldens.json");
  ASSERT_FALSE(text.empty()) << "missing " << DataDir() << "goldens.json";
  const nlohmann::ordered_json goldens = nlohmann::ordered_json::parse(text);
  const nlohmann::ordered_json& cases = goldens["cases"];
  ASSERT_GT(cases.size(), 150u);
  // strftime_now() is pinned to the date the generator used.
  const absl::Time now = absl::FromCivil(absl::CivilSecond(2026, 12, 5, 12, 0, 0),
                                         absl::UTCTimeZone());
  int templates = 0, compared = 0, errors = 0;
  for (const auto& [name, spec] : goldens["templates"].items()) {
    SCOPED_TRACE(name);
    ++templates;
    ChatSpecialTokens tokens;
    tokens.bos_token = Token(spec["tokens"], "bos_token");
    tokens.eos_token = Token(spec["tokens"], "eos_token");
    tokens.unk_token = Token(spec["tokens"], "unk_token");
    tokens.pad_token = Token(spec["tokens"], "pad_token");
    const std::string source = ReadFile(DataDir() + spec["file"].get<std::string>());
    absl::StatusOr<std::unique_ptr<ChatTemplate>> tmpl = ChatTemplate::Create(source, name, tokens);
    ASSERT_TRUE(tmpl.ok()) << tmpl.status();
    const nlohmann::ordered_json& results = spec["results"];
    ASSERT_EQ(results.size(), cases.size());
    for (size_t i = 0; i < cases.size(); ++i) {
      SCOPED_TRACE(testing::Message() << "case " << i << ": " << cases[i]["messages"].dump());
      absl::StatusOr<jinja::Value> messages = jinja::ValueFromJson(cases[i]["messages"].dump());
      ASSERT_TRUE(messages.ok());
      jinja::ValueDict extra;
      if (cases[i].contains("extra")) {
        absl::StatusOr<jinja::Value> e = jinja::ValueFromJson(cases[i]["extra"].dump());
        ASSERT_TRUE(e.ok());
        extra = e->dict();
      }
      absl::StatusOr<std::string> got = (*tmpl)->ApplyValue(
          *messages, cases[i]["add_generation_prompt"].get<bool>(), extra, now);
      const nlohmann::ordered_json& want = results[i];
      if (want.contains("output")) {
        ASSERT_TRUE(got.ok()) << got.status();
        EXPECT_EQ(*got, want["output"].get<std::string>());
      } else {
        ++errors;
        ASSERT_FALSE(got.ok()) << "Jinja2 failed with: " << want["error"] << "\nwe rendered:\n"
                               << *got;
        if (want["raised"].get<bool>()) {
          EXPECT_EQ(std::string(got.status().message()),
                    "chat template: " + want["error"].get<std::string>());
        }
      }
      ++compared;
    }
  }
  EXPECT_EQ(templates, 7);
  EXPECT_GT(errors, 50);  // The role checks of Mistral and Gemma are exercised.
  EXPECT_EQ(compared, templates * static_cast<int>(cases.size()));
}

}  // namespace
}  // namespace sieve::engine
