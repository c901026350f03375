// `sieve calibrate --method minference` on the embedded model (models/embedded) with a short
// text (the first 1500 tokens of engine/README.md): the written file parses back to the result,
// each head's pattern is the first candidate with the fewest errors, and the candidates whose
// budgets cover the whole text (VS (1000, 4096): slash_size >= N; block-sparse top-100 over 24
// blocks) give the dense output exactly enough to count zero errors.
#include "cli/calibrate.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "kernels/sparse/minference_search.h"
#include "nlohmann/json.hpp"

namespace sieve::cli {
namespace {

std::string Root() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return root != nullptr ? root : ".";
}

TEST(CalibrateTest, EmbeddedModelWritesAValidPatternFile) {
  const std::string out = ::testing::TempDir() + "/minference_patterns.json";
  CalibrateOptions o;
  o.model_dir = Root() + "/models/embedded";
  o.text_path = Root() + "/engine/README.md";
  o.output_path = out;
  o.max_tokens = 1500;
  o.threads = 2;
  auto r = CalibrateMInference(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens, 1500);
  ASSERT_EQ(r->patterns.size(), 4u);  // the embedded model: 4 layers of 4 query heads

  std::ifstream in(out);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, r->file_text);
  auto back = engine::ParseMInferencePatterns(text, out, 4, 4, {});
  ASSERT_TRUE(back.ok()) << back.status();
  const nlohmann::json doc = nlohmann::json::parse(text);
  const auto cands = kernels::minference::DefaultSearchCandidates();
  const nlohmann::json& errors = doc["calibration"]["errors"];
  for (int l = 0; l < 4; ++l) {
    for (int h = 0; h < 4; ++h) {
      const std::vector<int64_t> e = errors[l][h].get<std::vector<int64_t>>();
      ASSERT_EQ(e.size(), cands.size());
      EXPECT_EQ(e[6], 0) << "VS (1000, 4096) covers 1500 tokens: dense";
      EXPECT_EQ(e[7], 0) << "block-sparse top-100 covers 24 blocks: dense";
      const int best = kernels::minference::BestCandidate(e);
      EXPECT_EQ((*back)[l][h].pattern, cands[best].pattern) << "layer " << l << " head " << h;
      EXPECT_EQ((*back)[l][h].vertical_size, cands[best].vertical_size);
      EXPECT_EQ((*back)[l][h].slash_size, cands[best].slash_size);
      EXPECT_EQ(doc["layers"][l][std::to_string(h)][3], e[best]);
      EXPECT_EQ(r->errors[l][h], e[best]);
    }
  }
}

TEST(CalibrateTest, BadArgumentsNameTheProblem) {
  CalibrateOptions o;
  o.model_dir = Root() + "/models/embedded";
  o.text_path = "/nonexistent/text.txt";
  auto r = CalibrateMInference(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("/nonexistent/text.txt"), std::string_view::npos);
  o.method = "flexprefill";
  r = CalibrateMInference(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("--method"), std::string_view::npos);
}

}  // namespace
}  // namespace sieve::cli
