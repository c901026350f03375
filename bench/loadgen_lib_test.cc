#include "bench/loadgen_lib.h"

#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::bench {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

absl::StatusOr<LoadgenOptions> Parse(std::vector<std::string> args) {
  return ParseLoadgenFlags(args);
}

TEST(PromptLengthMixTest, EqualWeightsDrawEachLength) {
  absl::StatusOr<PromptLengthMix> mix = PromptLengthMix::Parse("32,256,1024");
  ASSERT_TRUE(mix.ok()) << mix.status();
  EXPECT_EQ(mix->max_length(), 1024);
  std::mt19937_64 rng(7);
  std::map<int32_t, int> counts;
  for (int i = 0; i < 3000; ++i) ++counts[mix->Sample(rng)];
  ASSERT_EQ(counts.size(), 3u);
  for (int32_t len : {32, 256, 1024}) EXPECT_NEAR(counts[len], 1000, 150) << len;
  EXPECT_EQ(mix->ToString(), "32:1,256:1,1024:1");
}

TEST(PromptLengthMixTest, WeightsAndRanges) {
  absl::StatusOr<PromptLengthMix> mix = PromptLengthMix::Parse("64:3,512:1");
  ASSERT_TRUE(mix.ok()) << mix.status();
  std::mt19937_64 rng(1);
  int short_ones = 0;
  for (int i = 0; i < 4000; ++i) short_ones += mix->Sample(rng) == 64;
  EXPECT_NEAR(short_ones, 3000, 150);

  absl::StatusOr<PromptLengthMix> range = PromptLengthMix::Parse("10-20");
  ASSERT_TRUE(range.ok()) << range.status();
  EXPECT_EQ(range->max_length(), 20);
  int lo = 100, hi = 0;
  for (int i = 0; i < 2000; ++i) {
    const int32_t v = range->Sample(rng);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  EXPECT_EQ(lo, 10);
  EXPECT_EQ(hi, 20);
}

TEST(PromptLengthMixTest, RejectsMalformedSpecs) {
  for (const char* spec : {"", "0", "-5", "abc", "64,", "64:0", "64:-1", "64:x", "64:1:2",
                           "20-10", "1-2-3", "5-", "2000000", "64,nan", "64:nan", "64:inf"}) {
    absl::StatusOr<PromptLengthMix> mix = PromptLengthMix::Parse(spec);
    EXPECT_FALSE(mix.ok()) << spec;
    if (!mix.ok()) {
      EXPECT_THAT(mix.status().message(), HasSubstr("--prompt-lengths")) << spec;
    }
  }
}

TEST(ParseLoadgenFlagsTest, DefaultsAreBoundedAndTargetLoopback) {
  absl::StatusOr<LoadgenOptions> o = Parse({});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->target, "127.0.0.1:50051");
  EXPECT_GT(o->duration_s, 0);
  EXPECT_GT(o->drain_timeout_s, 0);
  EXPECT_TRUE(o->ignore_eos);
}

TEST(ParseLoadgenFlagsTest, ParsesEveryFlag) {
  absl::StatusOr<LoadgenOptions> o =
      Parse({"--target", "127.0.0.1:6000", "--model=m", "--rate", "2.5", "--duration", "30",
             "--requests", "40", "--seed", "9", "--prompt-lengths", "32,256,1024",
             "--prompt-mode", "text", "--shared-prefix", "16", "--max-tokens", "8",
             "--no-ignore-eos", "--temperature", "0.7", "--concurrency", "4",
             "--request-timeout", "20", "--drain-timeout", "5", "--connect-timeout", "3",
             "--json", "/tmp/x.json"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->target, "127.0.0.1:6000");
  EXPECT_EQ(o->model, "m");
  EXPECT_DOUBLE_EQ(o->rate, 2.5);
  EXPECT_DOUBLE_EQ(o->duration_s, 30);
  EXPECT_EQ(o->requests, 40);
  EXPECT_EQ(o->seed, 9u);
  EXPECT_EQ(o->prompt_lengths, "32,256,1024");
  EXPECT_EQ(o->prompt_mode, PromptMode::kText);
  EXPECT_EQ(o->shared_prefix_tokens, 16);
  EXPECT_EQ(o->max_tokens, 8);
  EXPECT_FALSE(o->ignore_eos);
  EXPECT_FLOAT_EQ(o->temperature, 0.7f);
  EXPECT_EQ(o->concurrency, 4);
  EXPECT_DOUBLE_EQ(o->request_timeout_s, 20);
  EXPECT_DOUBLE_EQ(o->drain_timeout_s, 5);
  EXPECT_DOUBLE_EQ(o->connect_timeout_s, 3);
  EXPECT_EQ(o->json_path, "/tmp/x.json");
}

TEST(ParseLoadgenFlagsTest, RejectsBadFlagsNamingThem) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--rate", "0"}, "--rate"},
      {{"--rate", "fast"}, "--rate"},
      {{"--rate", "nan"}, "--rate"},
      {{"--duration", "-1"}, "--duration"},
      {{"--requests", "-3"}, "--requests"},
      {{"--max-tokens", "0"}, "--max-tokens"},
      {{"--concurrency", "0"}, "--concurrency"},
      {{"--temperature", "101"}, "--temperature"},
      {{"--prompt-mode", "words"}, "--prompt-mode"},
      {{"--prompt-lengths", "0,5"}, "--prompt-lengths"},
      {{"--seed", "-1"}, "--seed"},
      {{"--target", ""}, "--target"},
      {{"--rate"}, "--rate"},
      {{"--bogus", "1"}, "--bogus"},
      {{"stray"}, "stray"},
      {{"--duration", "0", "--requests", "0"}, "bounded"},
      {{"--protocol", "udp"}, "--protocol"},
      {{"--protocol", "http"}, "--http-target"},
      {{"--protocol", "both"}, "--http-target"},
  };
  for (const auto& [args, expect] : cases) {
    absl::StatusOr<LoadgenOptions> o = Parse(args);
    ASSERT_FALSE(o.ok()) << args[0];
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument) << args[0];
    EXPECT_THAT(o.status().message(), HasSubstr(expect)) << args[0];
  }
  EXPECT_TRUE(absl::IsNotFound(Parse({"--help"}).status()));
  EXPECT_THAT(LoadgenUsage(), HasSubstr("--prompt-lengths"));
}

TEST(ParseLoadgenFlagsTest, ProtocolChoosesTheApi) {
  absl::StatusOr<LoadgenOptions> o = Parse({});
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->protocol, "grpc");
  o = Parse({"--protocol", "both", "--http-target", "127.0.0.1:8000"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->protocol, "both");
  EXPECT_EQ(o->http_target, "127.0.0.1:8000");
  EXPECT_THAT(FormatMarkdown(*o, "m", BuildReport({}, 0)), HasSubstr("| protocol | both"));
  EXPECT_EQ(ReportToJson(*o, "m", BuildReport({}, 0))["settings"]["protocol"], "both");
  RequestRecord grpc_record, http_record;
  http_record.protocol = "http";
  const std::vector<RequestRecord> records = {grpc_record, http_record, http_record};
  EXPECT_EQ(RecordsOf(records, "http").size(), 2u);
  EXPECT_EQ(RecordsOf(records, "grpc").size(), 1u);
}

TEST(NextArrivalGapTest, MeanIsOneOverRate) {
  std::mt19937_64 rng(3);
  double sum = 0;
  constexpr int kN = 20000;
  for (int i = 0; i < kN; ++i) {
    const double gap = NextArrivalGap(rng, 4.0);
    ASSERT_GE(gap, 0.0);
    sum += gap;
  }
  EXPECT_NEAR(sum / kN, 0.25, 0.01);
}

TEST(SummarizeTest, InterpolatedPercentiles) {
  std::vector<double> v;
  for (int i = 100; i >= 1; --i) v.push_back(i);  // 1..100, unsorted
  LatencySummary s = Summarize(v);
  EXPECT_EQ(s.count, 100);
  EXPECT_DOUBLE_EQ(s.mean, 50.5);
  EXPECT_DOUBLE_EQ(s.p50, 50.5);
  EXPECT_DOUBLE_EQ(s.p90, 90.1);
  EXPECT_DOUBLE_EQ(s.p99, 99.01);
  EXPECT_DOUBLE_EQ(s.max, 100);
  LatencySummary one = Summarize({0.25});
  EXPECT_DOUBLE_EQ(one.p50, 0.25);
  EXPECT_DOUBLE_EQ(one.p99, 0.25);
  LatencySummary none = Summarize({});
  EXPECT_EQ(none.count, 0);
  EXPECT_EQ(none.max, 0);
}

RequestRecord Ok(int32_t prompt, double ttft, std::vector<double> itl, double e2e) {
  RequestRecord r;
  r.prompt_tokens = prompt;
  r.finish_reason = "length";
  r.ttft_s = ttft;
  r.itl_s = std::move(itl);
  r.output_tokens = static_cast<int32_t>(r.itl_s.size()) + 1;
  r.last_token_s = ttft;
  for (double g : r.itl_s) r.last_token_s += g;
  r.e2e_s = e2e;
  r.server_queue_s = 0.01;
  return r;
}

TEST(BuildReportTest, AggregatesOkRequestsAndCountsErrors) {
  std::vector<RequestRecord> records = {
      Ok(32, 0.1, {0.05, 0.05, 0.05}, 0.3),
      Ok(1024, 0.9, {0.05, 0.07}, 1.1),
  };
  RequestRecord rejected;
  rejected.prompt_tokens = 256;
  rejected.code = "RESOURCE_EXHAUSTED";
  rejected.message = "queue full | 512 requests";
  rejected.send_delay_s = 0.5;
  records.push_back(rejected);
  rejected.message = "a later message";
  records.push_back(rejected);
  records[1].server_prompt_tokens = 1023;  // the server saw a different length
  records[0].server_prompt_tokens = 32;
  RequestRecord incomplete = Ok(32, 0.2, {}, 0.2);
  incomplete.code = "INCOMPLETE";
  records.push_back(incomplete);

  LoadgenReport r = BuildReport(records, 2.0);
  EXPECT_EQ(r.sent, 5);
  EXPECT_EQ(r.ok, 2);
  EXPECT_EQ(r.codes.at("OK"), 2);
  EXPECT_EQ(r.codes.at("RESOURCE_EXHAUSTED"), 2);
  EXPECT_EQ(r.first_messages.at("RESOURCE_EXHAUSTED"), "queue full | 512 requests");
  EXPECT_EQ(r.first_messages.count("INCOMPLETE"), 0u);
  EXPECT_EQ(r.codes.at("INCOMPLETE"), 1);
  EXPECT_EQ(r.finish_reasons.at("length"), 2);
  EXPECT_EQ(r.ttft.count, 2);
  EXPECT_DOUBLE_EQ(r.ttft.max, 0.9);
  EXPECT_EQ(r.itl.count, 5);
  EXPECT_DOUBLE_EQ(r.itl.max, 0.07);
  EXPECT_EQ(r.tpot.count, 2);
  EXPECT_NEAR(r.tpot.max, 0.06, 1e-12);
  EXPECT_EQ(r.output_tokens, 7);
  EXPECT_EQ(r.prompt_tokens, 1056);
  EXPECT_DOUBLE_EQ(r.request_throughput, 1.0);
  EXPECT_DOUBLE_EQ(r.output_token_throughput, 3.5);
  EXPECT_EQ(r.delayed, 2);
  EXPECT_EQ(r.length_mismatches, 1);
  ASSERT_EQ(r.ttft_by_prompt_length.size(), 2u);
  EXPECT_DOUBLE_EQ(r.ttft_by_prompt_length.at(1024).p50, 0.9);

  LoadgenOptions o;
  const std::string md = FormatMarkdown(o, "m", r);
  EXPECT_THAT(md, HasSubstr("| time to first token | 2 |"));
  EXPECT_THAT(md, HasSubstr("| RESOURCE_EXHAUSTED | 2 | queue full \\| 512 requests |"));
  EXPECT_THAT(md, HasSubstr("| OK, finish length | 2 | |"));
  EXPECT_THAT(md, HasSubstr("| requests sent / ok | 5 / 2 |"));
  EXPECT_THAT(md, HasSubstr("time to first token, prompt 1024"));
  EXPECT_THAT(md, HasSubstr("server-side prompt length differed | 1 |"));
  const nlohmann::json j = ReportToJson(o, "m", r);
  EXPECT_EQ(j["ok"], 2);
  EXPECT_EQ(j["codes"]["RESOURCE_EXHAUSTED"], 2);
  EXPECT_EQ(j["first_messages"]["RESOURCE_EXHAUSTED"], "queue full | 512 requests");
  EXPECT_DOUBLE_EQ(j["latency_s"]["time_to_first_token"]["max"].get<double>(), 0.9);
  EXPECT_DOUBLE_EQ(j["throughput"]["output_tokens_per_s"].get<double>(), 3.5);
  EXPECT_EQ(j["settings"]["target"], "127.0.0.1:50051");
}

TEST(BuildReportTest, ManyDistinctLengthsAreNotListedOneByOne) {
  std::vector<RequestRecord> records;
  for (int i = 0; i < 20; ++i) records.push_back(Ok(10 + i, 0.1, {0.01}, 0.2));
  LoadgenReport r = BuildReport(records, 1.0);
  EXPECT_EQ(r.ttft_by_prompt_length.size(), 20u);
  const std::string md = FormatMarkdown(LoadgenOptions{}, "m", r);
  EXPECT_THAT(md, Not(HasSubstr("time to first token, prompt")));
  EXPECT_EQ(ReportToJson(LoadgenOptions{}, "m", r)["latency_s"]
                        ["time_to_first_token_by_prompt_length"].size(), 20u);
}

TEST(BuildReportTest, EmptyRunIsAllZeros) {
  LoadgenReport r = BuildReport({}, 0.0);
  EXPECT_EQ(r.sent, 0);
  EXPECT_EQ(r.request_throughput, 0);
  EXPECT_FALSE(FormatMarkdown(LoadgenOptions{}, "m", r).empty());
}

}  // namespace
}  // namespace sieve::bench
