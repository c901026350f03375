#include "engine/model/weight_store.h"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

struct Spec {
  std::string name;
  std::vector<int64_t> shape;  // BF16 tensors; element i holds bf16(i + bias).
  float bias = 0;
};

// Writes a BF16-only safetensors file from `specs`.
std::vector<uint8_t> Build(const std::vector<Spec>& specs) {
  std::vector<std::string> entries;
  std::vector<uint8_t> data;
  for (const Spec& s : specs) {
    int64_t n = 1;
    for (int64_t d : s.shape) n *= d;
    size_t begin = data.size();
    for (int64_t i = 0; i < n; ++i) {
      float f = static_cast<float>(i % 256) + s.bias;
      uint32_t u;
      std::memcpy(&u, &f, 4);
      data.push_back(static_cast<uint8_t>(u >> 16));
      data.push_back(static_cast<uint8_t>(u >> 24));
    }
    entries.push_back(absl::StrCat("\"", s.name, "\":{\"dtype\":\"BF16\",\"shape\":[",
                                   absl::StrJoin(s.shape, ","), "],\"data_offsets\":[", begin, ",",
                                   data.size(), "]}"));
  }
  std::string header = absl::StrCat("{", absl::StrJoin(entries, ","), "}");
  while (header.size() % 8 != 0) header.push_back(' ');
  std::vector<uint8_t> file(8);
  uint64_t len = header.size();
  std::memcpy(file.data(), &len, 8);
  file.insert(file.end(), header.begin(), header.end());
  file.insert(file.end(), data.begin(), data.end());
  return file;
}

class WeightStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (std::filesystem::path(::testing::TempDir()) /
            absl::StrCat("weight_store_test_", getpid(), "_",
                         ::testing::UnitTest::GetInstance()->current_test_info()->name()))
               .string();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  void WriteText(const std::string& name, const std::string& text) {
    std::ofstream(std::filesystem::path(dir_) / name, std::ios::binary) << text;
  }
  void WriteShard(const std::string& name, const std::vector<Spec>& specs) {
    std::vector<uint8_t> bytes = Build(specs);
    std::ofstream out(std::filesystem::path(dir_) / name, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  // Writes model.safetensors.index.json mapping tensor -> shard.
  void WriteIndex(const std::vector<std::pair<std::string, std::string>>& map) {
    std::vector<std::string> entries;
    for (const auto& [tensor, shard] : map) {
      entries.push_back(absl::StrCat("\"", tensor, "\": \"", shard, "\""));
    }
    WriteText("model.safetensors.index.json",
              absl::StrCat(R"({"metadata": {"total_size": 123}, "weight_map": {)",
                           absl::StrJoin(entries, ", "), "}}"));
  }

  std::string dir_;
};

TEST_F(WeightStoreTest, SingleFile) {
  WriteShard("model.safetensors", {{"model.embed_tokens.weight", {8, 4}, 0.0f},
                                   {"model.layers.3.mlp.up_proj.weight", {512, 256}, 1.0f}});
  // Another *.safetensors file is ignored when model.safetensors exists, even with duplicates.
  WriteShard("extra.safetensors", {{"model.embed_tokens.weight", {8, 4}}});
  auto store = WeightStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->files().size(), 1u);
  EXPECT_THAT((*store)->Names(),
              ElementsAre("model.embed_tokens.weight", "model.layers.3.mlp.up_proj.weight"));
  EXPECT_TRUE((*store)->Has("model.embed_tokens.weight"));
  EXPECT_FALSE((*store)->Has("lm_head.weight"));

  auto up = (*store)->GetWithShape("model.layers.3.mlp.up_proj.weight", {512, 256});
  ASSERT_TRUE(up.ok()) << up.status();
  std::vector<float> values(up->numel());
  ASSERT_TRUE(CopyToFloat32(*up, absl::MakeSpan(values)).ok());
  EXPECT_EQ(values[0], 1.0f);
  EXPECT_EQ(values[255], 256.0f);
  EXPECT_EQ(values[257], 2.0f);

  absl::Status s =
      (*store)->GetWithShape("model.layers.3.mlp.up_proj.weight", {1024, 256}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      s.message(),
      "tensor 'model.layers.3.mlp.up_proj.weight' has shape [512, 256], expected [1024, 256]");
  s = (*store)->GetWithShape("model.embed_tokens.weight", {8, 4, 1}).status();
  EXPECT_THAT(s.message(), HasSubstr("has shape [8, 4], expected [8, 4, 1]"));

  s = (*store)->Get("lm_head.weight").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("'lm_head.weight'"));
  EXPECT_THAT(s.message(), HasSubstr(dir_));
  EXPECT_EQ((*store)->GetWithShape("lm_head.weight", {1}).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(WeightStoreTest, ShardedWithIndex) {
  WriteShard("model-00001-of-00002.safetensors", {{"a", {2, 3}}, {"b", {4}}});
  WriteShard("model-00002-of-00002.safetensors", {{"c", {5}, 7.0f}});
  WriteShard("unrelated.safetensors", {{"a", {1}}});  // Not in the index: never opened.
  WriteIndex({{"a", "model-00001-of-00002.safetensors"},
              {"b", "model-00001-of-00002.safetensors"},
              {"c", "model-00002-of-00002.safetensors"}});
  auto store = WeightStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->files().size(), 2u);
  EXPECT_THAT((*store)->Names(), ElementsAre("a", "b", "c"));
  auto c = (*store)->GetWithShape("c", {5});
  ASSERT_TRUE(c.ok());
  float f[5];
  ASSERT_TRUE(CopyToFloat32(*c, absl::MakeSpan(f)).ok());
  EXPECT_EQ(f[4], 11.0f);
  EXPECT_EQ((*store)->size(), 3u);
}

TEST_F(WeightStoreTest, IndexNamingMissingShard) {
  WriteShard("model-00001-of-00002.safetensors", {{"a", {2}}});
  WriteIndex(
      {{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00002-of-00002.safetensors"}});
  absl::Status s = WeightStore::Open(dir_).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("model-00002-of-00002.safetensors"));
  EXPECT_THAT(s.message(), HasSubstr("model.safetensors.index.json"));
}

TEST_F(WeightStoreTest, IndexNamingTensorAbsentFromItsShard) {
  WriteShard("s1.safetensors", {{"a", {2}}});
  WriteShard("s2.safetensors", {{"b", {2}}});
  WriteIndex({{"a", "s1.safetensors"}, {"b", "s1.safetensors"}, {"z", "s2.safetensors"}});
  absl::Status s = WeightStore::Open(dir_).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  // "b" exists, but in s2, not in s1 as the index claims (checked before "z", alphabetically).
  EXPECT_THAT(s.message(), HasSubstr("tensor 'b'"));
  EXPECT_THAT(s.message(), HasSubstr("shard 's1.safetensors'"));
}

TEST_F(WeightStoreTest, MalformedIndex) {
  WriteShard("s1.safetensors", {{"a", {2}}});
  WriteText("model.safetensors.index.json", "{\"weight_map\": ");
  EXPECT_THAT(WeightStore::Open(dir_).status().message(), HasSubstr("not valid JSON"));
  WriteText("model.safetensors.index.json", "{\"metadata\": {}}");
  EXPECT_THAT(WeightStore::Open(dir_).status().message(), HasSubstr("missing field 'weight_map'"));
  WriteText("model.safetensors.index.json", "{\"weight_map\": {\"a\": 3}}");
  EXPECT_THAT(WeightStore::Open(dir_).status().message(),
              HasSubstr("value for tensor 'a' must be a string"));
  WriteIndex({{"a", "../s1.safetensors"}});
  absl::Status s = WeightStore::Open(dir_).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("../s1.safetensors"));
}

TEST_F(WeightStoreTest, MultipleFilesWithoutIndex) {
  WriteShard("b.safetensors", {{"y", {3}}});
  WriteShard("a.safetensors", {{"x", {2}}, {"z", {1}}});
  WriteText("README.md", "not a checkpoint");
  auto store = WeightStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  ASSERT_EQ((*store)->files().size(), 2u);
  EXPECT_THAT((*store)->files()[0]->path(), HasSubstr("a.safetensors"));
  EXPECT_THAT((*store)->Names(), ElementsAre("x", "y", "z"));
}

TEST_F(WeightStoreTest, DuplicateNamesAcrossFiles) {
  WriteShard("a.safetensors", {{"x", {2}}});
  WriteShard("b.safetensors", {{"x", {2}}});
  absl::Status s = WeightStore::Open(dir_).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("tensor 'x' appears in both"));
  EXPECT_THAT(s.message(), HasSubstr("a.safetensors"));
  EXPECT_THAT(s.message(), HasSubstr("b.safetensors"));
}

TEST_F(WeightStoreTest, NoCheckpointAndBadFiles) {
  absl::Status s = WeightStore::Open(dir_).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("no *.safetensors in"));
  EXPECT_THAT(s.message(), HasSubstr(dir_));

  s = WeightStore::Open(dir_ + "/does-not-exist").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);

  WriteText("model.safetensors", "garbage");
  s = WeightStore::Open(dir_).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("model.safetensors"));
}

}  // namespace
}  // namespace sieve::engine
