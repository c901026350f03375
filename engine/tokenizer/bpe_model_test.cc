#include "engine/tokenizer/bpe_model.h"

#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Json = nlohmann::json;

std::unique_ptr<BpeModel> MustBuild(const Json& model) {
  auto bpe = BpeModel::FromJson(model, "model");
  EXPECT_TRUE(bpe.ok()) << bpe.status();
  return bpe.ok() ? std::move(*bpe) : nullptr;
}

std::vector<int32_t> Tok(const BpeModel& bpe, std::string_view word) {
  std::vector<int32_t> ids;
  const absl::Status status = bpe.Tokenize(word, &ids);
  EXPECT_TRUE(status.ok()) << status;
  return ids;
}

TEST(BpeModelTest, LowestRankMergesFirst) {
  // "b c" outranks "a b", so "abc" becomes a + bc, then abc.
  auto bpe = MustBuild({{"vocab", {{"a", 0}, {"b", 1}, {"c", 2}, {"bc", 3}, {"ab", 4}, {"abc", 5}}},
                        {"merges", {"b c", "a b", "a bc"}}});
  EXPECT_THAT(Tok(*bpe, "abc"), ElementsAre(5));
  EXPECT_THAT(Tok(*bpe, "ab"), ElementsAre(4));
  EXPECT_THAT(Tok(*bpe, "cab"), ElementsAre(2, 4));
  EXPECT_EQ(bpe->num_merges(), 3u);
}

TEST(BpeModelTest, WithoutTheFinalMergeRankDecides) {
  auto bpe =
      MustBuild({{"vocab", {{"a", 0}, {"b", 1}, {"c", 2}, {"bc", 3}, {"ab", 4}}},
                 {"merges", Json::array({Json::array({"b", "c"}), Json::array({"a", "b"})})}});
  EXPECT_THAT(Tok(*bpe, "abc"), ElementsAre(0, 3));  // Not ab + c.
}

TEST(BpeModelTest, LeftmostWinsAmongEqualRanks) {
  auto bpe =
      MustBuild({{"vocab", {{"a", 0}, {"aa", 1}, {"aaaa", 2}}}, {"merges", {"a a", "aa aa"}}});
  EXPECT_THAT(Tok(*bpe, "aaa"), ElementsAre(1, 0));
  EXPECT_THAT(Tok(*bpe, "aaaaa"), ElementsAre(2, 0));
  const std::vector<int32_t> long_run = Tok(*bpe, std::string(5000, 'a'));
  EXPECT_EQ(long_run, std::vector<int32_t>(1250, 2));
}

TEST(BpeModelTest, RepeatedMergeKeepsItsLastRank) {
  // As in Hugging Face (merges collected into a map), the second "b c" (rank 2) is the one
  // that counts, so "a b" (rank 1) goes first.
  auto bpe = MustBuild({{"vocab", {{"a", 0}, {"b", 1}, {"c", 2}, {"bc", 3}, {"ab", 4}}},
                        {"merges", {"b c", "a b", "b c"}}});
  EXPECT_THAT(Tok(*bpe, "abc"), ElementsAre(4, 2));
}

TEST(BpeModelTest, IgnoreMergesEmitsWholeVocabularyWords) {
  const Json vocab = {{"a", 0}, {"b", 1}, {"c", 2}, {"ab", 3}, {"abc", 4}};
  auto merging = MustBuild({{"vocab", vocab}, {"merges", {"a b"}}});
  auto ignoring = MustBuild({{"vocab", vocab}, {"merges", {"a b"}}, {"ignore_merges", true}});
  EXPECT_THAT(Tok(*merging, "abc"), ElementsAre(3, 2));
  EXPECT_THAT(Tok(*ignoring, "abc"), ElementsAre(4));
  EXPECT_THAT(Tok(*ignoring, "abcab"), ElementsAre(3, 2, 3));  // Not in the vocabulary.
}

TEST(BpeModelTest, UnknownCharacters) {
  const Json vocab = {{"a", 0}, {"<unk>", 1}};
  auto dropping = MustBuild({{"vocab", vocab}, {"merges", Json::array()}});
  EXPECT_THAT(Tok(*dropping, "axya"), ElementsAre(0, 0));
  auto unk = MustBuild({{"vocab", vocab}, {"unk_token", "<unk>"}});
  EXPECT_THAT(Tok(*unk, "axya"), ElementsAre(0, 1, 1, 0));
  auto fused = MustBuild({{"vocab", vocab}, {"unk_token", "<unk>"}, {"fuse_unk", true}});
  EXPECT_THAT(Tok(*fused, "axya"), ElementsAre(0, 1, 0));
  EXPECT_THAT(Tok(*fused, "xy"), ElementsAre(1));
  auto missing = MustBuild({{"vocab", vocab}, {"unk_token", "<missing>"}});
  std::vector<int32_t> ids;
  EXPECT_TRUE(missing->Tokenize("aa", &ids).ok());
  const absl::Status status = missing->Tokenize("ax", &ids);
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(status.message(), HasSubstr("<missing>"));
}

TEST(BpeModelTest, ByteFallback) {
  auto bpe =
      MustBuild({{"vocab", {{"a", 0}, {"<unk>", 1}, {"<0xC3>", 2}, {"<0xA9>", 3}, {"<0x78>", 4}}},
                 {"unk_token", "<unk>"},
                 {"byte_fallback", true}});
  EXPECT_THAT(Tok(*bpe, "a\u00e9"), ElementsAre(0, 2, 3));
  EXPECT_THAT(Tok(*bpe, "\u00e8a"), ElementsAre(1, 0));  // <0xA8> missing: unk.
  // Hugging Face emits byte-fallback tokens before a pending unk token.
  EXPECT_THAT(Tok(*bpe, "\u00e8x"), ElementsAre(4, 1));
}

TEST(BpeModelTest, CacheReturnsTheSameIds) {
  auto bpe = MustBuild({{"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}, {"ba", 3}, {"aba", 4}}},
                        {"merges", {"a b", "b a", "ab a"}}});
  std::mt19937 rng(7);
  for (int i = 0; i < 2000; ++i) {
    std::string word;
    const int len = 1 + rng() % 12;
    for (int k = 0; k < len; ++k) word.push_back("ab"[rng() % 2]);
    std::vector<int32_t> cached, uncached;
    ASSERT_TRUE(bpe->Tokenize(word, &cached).ok());
    ASSERT_TRUE(bpe->TokenizeUncached(word, &uncached).ok());
    EXPECT_EQ(cached, uncached) << word;
    std::vector<int32_t> again;
    ASSERT_TRUE(bpe->Tokenize(word, &again).ok());
    EXPECT_EQ(again, uncached) << word;
  }
}

TEST(BpeModelTest, VocabularyLookups) {
  auto bpe = MustBuild({{"vocab", {{"a", 0}, {"b", 2}}}});
  EXPECT_EQ(bpe->id_limit(), 3);
  EXPECT_EQ(bpe->TokenToId("b"), 2);
  EXPECT_EQ(bpe->TokenToId("c"), std::nullopt);
  ASSERT_NE(bpe->IdToToken(0), nullptr);
  EXPECT_EQ(*bpe->IdToToken(0), "a");
  EXPECT_EQ(bpe->IdToToken(1), nullptr);  // A gap.
  EXPECT_EQ(bpe->IdToToken(3), nullptr);
  EXPECT_EQ(bpe->IdToToken(-1), nullptr);
}

struct BadModel {
  Json model;
  absl::StatusCode code;
  std::string message;
};

TEST(BpeModelTest, RejectsMalformedModels) {
  const Json vocab = {{"a", 0}, {"b", 1}, {"ab", 2}};
  const BadModel cases[] = {
      {Json::array(), absl::StatusCode::kInvalidArgument, "expected an object"},
      {{{"merges", Json::array()}}, absl::StatusCode::kInvalidArgument, "model.vocab"},
      {{{"vocab", Json::array({"a"})}}, absl::StatusCode::kInvalidArgument, "model.vocab"},
      {{{"vocab", {{"a", -1}}}}, absl::StatusCode::kInvalidArgument, "out of range"},
      {{{"vocab", {{"a", "0"}}}}, absl::StatusCode::kInvalidArgument, "model.vocab.a"},
      {{{"vocab", {{"a", 1.5}}}}, absl::StatusCode::kInvalidArgument, "integer"},
      {{{"vocab", {{"a", 4000000000LL}}}}, absl::StatusCode::kInvalidArgument, "out of range"},
      {{{"vocab", {{"a", 2000000000}}}}, absl::StatusCode::kInvalidArgument, "dense"},
      {{{"vocab", {{"a", 0}, {"b", 0}}}}, absl::StatusCode::kInvalidArgument, "duplicate id 0"},
      {{{"vocab", vocab}, {"merges", "a b"}}, absl::StatusCode::kInvalidArgument, "model.merges"},
      {{{"vocab", vocab}, {"merges", {"ab"}}},
       absl::StatusCode::kInvalidArgument,
       "model.merges[0]"},
      {{{"vocab", vocab}, {"merges", {"a b", "a b b"}}},
       absl::StatusCode::kInvalidArgument,
       "model.merges[1]"},
      {{{"vocab", vocab}, {"merges", Json::array({Json::array({"a"})})}},
       absl::StatusCode::kInvalidArgument,
       "model.merges[0]"},
      {{{"vocab", vocab}, {"merges", Json::array({Json::array({"a", 1})})}},
       absl::StatusCode::kInvalidArgument,
       "model.merges[0]"},
      {{{"vocab", vocab}, {"merges", {"a c"}}}, absl::StatusCode::kInvalidArgument, "'c'"},
      {{{"vocab", vocab}, {"merges", {"b a"}}}, absl::StatusCode::kInvalidArgument, "'ba'"},
      {{{"vocab", vocab}, {"dropout", 0.1}}, absl::StatusCode::kUnimplemented, "dropout"},
      {{{"vocab", vocab}, {"dropout", "x"}}, absl::StatusCode::kInvalidArgument, "dropout"},
      {{{"vocab", vocab}, {"continuing_subword_prefix", "##"}},
       absl::StatusCode::kUnimplemented,
       "continuing_subword_prefix"},
      {{{"vocab", vocab}, {"ignore_merges", 1}},
       absl::StatusCode::kInvalidArgument,
       "model.ignore_merges"},
      {{{"vocab", vocab}, {"unk_token", 5}}, absl::StatusCode::kInvalidArgument, "model.unk_token"},
  };
  for (const BadModel& bad : cases) {
    auto bpe = BpeModel::FromJson(bad.model, "model");
    ASSERT_FALSE(bpe.ok()) << bad.model.dump();
    EXPECT_EQ(bpe.status().code(), bad.code) << bad.model.dump() << " " << bpe.status();
    EXPECT_THAT(bpe.status().message(), HasSubstr(bad.message)) << bad.model.dump();
  }
}

TEST(BpeModelTest, AcceptsNullOptionalFields) {
  auto bpe = MustBuild({{"type", "BPE"},
                        {"vocab", {{"a", 0}}},
                        {"merges", Json::array()},
                        {"dropout", nullptr},
                        {"unk_token", nullptr},
                        {"continuing_subword_prefix", nullptr},
                        {"end_of_word_suffix", ""},
                        {"fuse_unk", false},
                        {"byte_fallback", false}});
  ASSERT_NE(bpe, nullptr);
  EXPECT_THAT(Tok(*bpe, "aa"), ElementsAre(0, 0));
  auto zero_dropout = MustBuild({{"vocab", {{"a", 0}}}, {"dropout", 0.0}});
  EXPECT_NE(zero_dropout, nullptr);
}

}  // namespace
}  // namespace sieve::engine
