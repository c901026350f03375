// The DoubleSparsity calibration file: stats -> file -> parse round trip, label channel lists
// (per query head, per KV head by the group's summed means, from a k ranking), and errors that
// name the key.
#include "engine/attention/double_sparsity_calibration.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

DsCalibration Random(kernels::DsStatistic stat) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<kernels::DsChannelStats> layers;
  for (int l = 0; l < 2; ++l) {
    layers.emplace_back(stat, 4, 2, 8);
    std::vector<float> q(10 * 4 * 8), k(10 * 2 * 8);
    for (float& x : q) x = u(rng);
    for (float& x : k) x = u(rng);
    layers.back().Add(q.data(), k.data(), 10);
  }
  return DsCalibrationFromStats(layers, 4, 2, "test");
}

TEST(DsCalibrationTest, RoundTrips) {
  for (auto stat : {kernels::DsStatistic::kQ, kernels::DsStatistic::kK, kernels::DsStatistic::kQK}) {
    const DsCalibration c = Random(stat);
    absl::StatusOr<DsCalibration> back = ParseDsCalibration(DsCalibrationToJson(c), "mem");
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->statistic, stat);
    EXPECT_EQ(back->calibration_tokens, 10);
    EXPECT_EQ(back->channels, c.channels);
    EXPECT_EQ(back->means, c.means);
    EXPECT_EQ(back->source, "test");
    EXPECT_TRUE(CheckDsCalibrationFits(*back, 2, 4, 2, 8).ok());
    const absl::Status misfit = CheckDsCalibrationFits(*back, 2, 4, 2, 16);
    EXPECT_NE(misfit.message().find("head_dim"), std::string::npos) << misfit;
  }
}

TEST(DsCalibrationTest, LabelChannels) {
  DsCalibration c = Random(kernels::DsStatistic::kQK);
  // Per query head: each head's own top r.
  const std::vector<int32_t> q = c.LabelChannels(1, 3, false);
  ASSERT_EQ(q.size(), 4u * 3);
  for (int h = 0; h < 4; ++h) {
    EXPECT_EQ(std::vector<int32_t>(q.begin() + 3 * h, q.begin() + 3 * h + 3),
              std::vector<int32_t>(c.channels[1][h].begin(), c.channels[1][h].begin() + 3));
  }
  // Per KV head: the ranking of the group's summed means; plant a channel that wins in sum but
  // is no single head's first.
  for (int h = 0; h < 2; ++h) {
    for (int ch = 0; ch < 8; ++ch) c.means[0][h][ch] = ch == h ? 1.0 : (ch == 5 ? 0.8 : 0.0);
  }
  const std::vector<int32_t> kv = c.LabelChannels(0, 1, true);
  ASSERT_EQ(kv.size(), 2u);
  EXPECT_EQ(kv[0], 5);
  // A k ranking serves every query head of its KV head.
  const DsCalibration k = Random(kernels::DsStatistic::kK);
  const std::vector<int32_t> kq = k.LabelChannels(0, 2, false);
  EXPECT_EQ(kq[0], k.channels[0][0][0]);
  EXPECT_EQ(kq[2 * 2], k.channels[0][0][0]);  // query head 1 is in KV head 0's group
  EXPECT_EQ(kq[2 * 3 + 1], k.channels[0][1][1]);
}

TEST(DsCalibrationTest, ErrorsNameTheKey) {
  const std::string good = DsCalibrationToJson(Random(kernels::DsStatistic::kQ));
  auto fails_with = [](const std::string& text, const std::string& want) {
    absl::StatusOr<DsCalibration> c = ParseDsCalibration(text, "cal.json");
    ASSERT_FALSE(c.ok()) << want;
    EXPECT_NE(c.status().message().find(want), std::string::npos) << c.status();
    EXPECT_NE(c.status().message().find("cal.json"), std::string::npos) << c.status();
  };
  fails_with("{not json", "not valid JSON");
  auto edit = [&](auto fn) {
    nlohmann::json j = nlohmann::json::parse(good);
    fn(j);
    return j.dump();
  };
  fails_with(edit([](auto& j) { j["format"] = "x"; }), "format");
  fails_with(edit([](auto& j) { j.erase("head_dim"); }), "head_dim is missing");
  fails_with(edit([](auto& j) { j["statistic"] = "v"; }), "statistic");
  fails_with(edit([](auto& j) { j["num_kv_heads"] = 3; }), "num_kv_heads");
  fails_with(edit([](auto& j) { j["layers"].erase(1); }), "layers");
  fails_with(edit([](auto& j) { j["layers"][1]["channels"][2][0] = j["layers"][1]["channels"][2][1]; }),
             "layers[1].channels[2] must be a permutation");
  fails_with(edit([](auto& j) { j["layers"][0]["means"][3].erase(0); }), "layers[0].means[3]");
  fails_with(edit([](auto& j) { j["layers"][0]["channels"].erase(0); }), "num_q_heads");
  EXPECT_EQ(LoadDsCalibration("/nonexistent/cal.json").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace sieve::engine
