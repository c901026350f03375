#include "server/metrics.h"

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/http_get.h"
#include "tests/support/metrics_text.h"

namespace sieve::server {
namespace {

using ::sieve::test_support::HttpGet;
using ::sieve::test_support::MetricSample;
using ::sieve::test_support::ParsedMetrics;
using ::sieve::test_support::ParseMetricsText;
using ::testing::HasSubstr;
using Labels = std::map<std::string, std::string>;

// Every documented metric family and its type.
const std::vector<std::pair<std::string, std::string>>& DocumentedFamilies() {
  static const auto* const kFamilies = new std::vector<std::pair<std::string, std::string>>{
      {"sieve_request_queue_seconds", "histogram"},
      {"sieve_prefill_attention_density", "histogram"},
      {"sieve_prefill_sparse_index_seconds", "histogram"},
      {"sieve_request_prefill_seconds", "histogram"},
      {"sieve_request_time_to_first_token_seconds", "histogram"},
      {"sieve_request_inter_token_latency_seconds", "histogram"},
      {"sieve_request_decode_seconds", "histogram"},
      {"sieve_request_e2e_latency_seconds", "histogram"},
      {"sieve_decode_selection_seconds", "histogram"},
      {"sieve_decode_kv_read_fraction", "histogram"},
      {"sieve_requests_total", "counter"},
      {"sieve_prompt_tokens_total", "counter"},
      {"sieve_cached_prompt_tokens_total", "counter"},
      {"sieve_generated_tokens_total", "counter"},
      {"sieve_preemptions_total", "counter"},
      {"sieve_device_lost_total", "counter"},
      {"sieve_rejections_total", "counter"},
      {"sieve_grpc_requests_total", "counter"},
      {"sieve_running_requests", "gauge"},
      {"sieve_waiting_requests", "gauge"},
      {"sieve_waiting_tokens", "gauge"},
      {"sieve_kv_pages_used", "gauge"},
      {"sieve_kv_pages_free", "gauge"},
      {"sieve_kv_pages_cached", "gauge"},
      {"sieve_prefix_cache_hit_ratio", "gauge"},
      {"sieve_prefix_cache_query_tokens_total", "counter"},
      {"sieve_prefix_cache_hit_tokens_total", "counter"},
      {"sieve_step_seconds", "histogram"},
      {"sieve_kv_transfer_bytes_total", "counter"},
      {"sieve_kv_transfer_seconds", "histogram"},
      {"sieve_kv_transfers_in_flight", "gauge"},
      {"sieve_kv_transfers_total", "counter"},
      {"sieve_kv_transfer_retries_total", "counter"},
      {"sieve_prefills_total", "counter"},
      {"sieve_prefill_daemons_reachable", "gauge"},
      {"sieve_step_tokens_total", "counter"},
      {"sieve_http_requests_total", "counter"},
      {"sieve_http_request_duration_seconds", "histogram"},
      {"sieve_request_transfer_seconds", "histogram"},
  };
  return *kFamilies;
}

// Scrapes the metrics endpoint over HTTP and parses it.
ParsedMetrics Scrape(const Metrics& m) {
  absl::StatusOr<std::string> body = HttpGet("127.0.0.1", m.port(), "/metrics", absl::Seconds(10));
  EXPECT_TRUE(body.ok()) << body.status();
  if (!body.ok()) return {};
  absl::StatusOr<ParsedMetrics> parsed = ParseMetricsText(*body);
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  return parsed.ok() ? *parsed : ParsedMetrics{};
}

std::unique_ptr<Metrics> MakeMetrics(const std::string& model = "test-model") {
  absl::StatusOr<std::unique_ptr<Metrics>> m = Metrics::Create("127.0.0.1:0", model);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : nullptr;
}

TEST(GrpcStatusCodeNameTest, MapsCanonicalCodes) {
  EXPECT_EQ(GrpcStatusCodeName(0), "OK");
  EXPECT_EQ(GrpcStatusCodeName(3), "INVALID_ARGUMENT");
  EXPECT_EQ(GrpcStatusCodeName(8), "RESOURCE_EXHAUSTED");
  EXPECT_EQ(GrpcStatusCodeName(11), "OUT_OF_RANGE");
  EXPECT_EQ(GrpcStatusCodeName(14), "UNAVAILABLE");
  EXPECT_EQ(GrpcStatusCodeName(16), "UNAUTHENTICATED");
  EXPECT_EQ(GrpcStatusCodeName(17), "UNKNOWN");
  EXPECT_EQ(GrpcStatusCodeName(-1), "UNKNOWN");
}

TEST(LatencyBucketsTest, LogSpacedFromOneMillisecondToTenMinutes) {
  const std::vector<double>& b = LatencyBucketsSeconds();
  ASSERT_EQ(b.size(), 19u);
  EXPECT_DOUBLE_EQ(b.front(), 0.001);
  EXPECT_DOUBLE_EQ(b.back(), 600.0);
  for (size_t i = 1; i < b.size(); ++i) {
    EXPECT_GT(b[i], b[i - 1]);
    EXPECT_LE(b[i] / b[i - 1], 2.5 + 1e-9) << i;  // no gap wider than a 1-2-5 step
  }
}

TEST(MetricsTest, ServesEveryDocumentedFamilyAtZero) {
  std::unique_ptr<Metrics> m = MakeMetrics();
  ASSERT_NE(m, nullptr);
  EXPECT_GT(m->port(), 0);
  ParsedMetrics p = Scrape(*m);
  // sieve_grpc_requests_total has no series (and so no TYPE line) before the first call.
  EXPECT_EQ(p.types.count("sieve_grpc_requests_total"), 0u);
  m->OnGrpcRequest("Generate", "OK");
  p = Scrape(*m);
  for (const auto& [name, type] : DocumentedFamilies()) {
    ASSERT_TRUE(p.types.count(name)) << name;
    EXPECT_EQ(p.types.at(name), type) << name;
    EXPECT_FALSE(p.help.at(name).empty()) << name;
  }
  // Besides ours, only prometheus-cpp's own exposer_* families are served.
  int sieve_families = 0;
  for (const auto& [name, type] : p.types) {
    if (name.rfind("sieve_", 0) == 0) {
      ++sieve_families;
    } else {
      EXPECT_EQ(name.rfind("exposer_", 0), 0u) << name;
    }
  }
  EXPECT_EQ(sieve_families, DocumentedFamilies().size());
  // Every sieve_ sample carries the model label.
  ASSERT_FALSE(p.samples.empty());
  for (const MetricSample& s : p.samples) {
    if (s.name.rfind("sieve_", 0) == 0) {
      EXPECT_EQ(s.labels.at("model"), "test-model") << s.name;
    }
  }
  for (const char* outcome : {"length", "stop", "eos", "cancelled", "error"}) {
    EXPECT_EQ(p.Find("sieve_requests_total", {{"outcome", outcome}}), 0.0) << outcome;
  }
  for (const char* reason : {"queue_full", "invalid", "draining"}) {
    EXPECT_EQ(p.Find("sieve_rejections_total", {{"reason", reason}}), 0.0) << reason;
  }
  for (const char* pool : {"prefill", "decode"}) {
    EXPECT_EQ(p.Find("sieve_running_requests", {{"pool", pool}}), 0.0) << pool;
    EXPECT_EQ(p.Find("sieve_step_seconds_count", {{"pool", pool}}), 0.0) << pool;
    EXPECT_EQ(p.Find("sieve_step_tokens_total", {{"pool", pool}}), 0.0) << pool;
  }
  EXPECT_EQ(p.Find("sieve_prefix_cache_hit_ratio"), 0.0);
  // Histogram buckets are the documented ones, plus +Inf.
  std::vector<MetricSample> buckets = p.All("sieve_request_time_to_first_token_seconds_bucket");
  ASSERT_EQ(buckets.size(), LatencyBucketsSeconds().size() + 1);
  EXPECT_EQ(buckets.back().labels.at("le"), "+Inf");
}

// The transfer phase of a decode daemon's request: observed (and already inside TTFT, which the
// engine computes) only for requests that had one.
TEST(MetricsTest, TransferPhaseIsObservedForRequestsThatHadOne) {
  std::unique_ptr<Metrics> m = MakeMetrics();
  ASSERT_NE(m, nullptr);
  engine::RequestTimings local;
  local.time_to_first_token_s = 0.2;
  m->OnFirstToken(local);
  engine::RequestTimings remote;
  remote.transfer_s = 0.75;
  remote.time_to_first_token_s = 0.95;
  m->OnFirstToken(remote);
  ParsedMetrics p = Scrape(*m);
  EXPECT_EQ(p.Find("sieve_request_transfer_seconds_count"), 1.0);
  EXPECT_NEAR(*p.Find("sieve_request_transfer_seconds_sum"), 0.75, 1e-12);
  EXPECT_EQ(p.Find("sieve_request_transfer_seconds_bucket", {{"le", "0.5"}}), 0.0);
  EXPECT_EQ(p.Find("sieve_request_transfer_seconds_bucket", {{"le", "1"}}), 1.0);
  EXPECT_EQ(p.Find("sieve_request_time_to_first_token_seconds_count"), 2.0);
  EXPECT_NEAR(*p.Find("sieve_request_time_to_first_token_seconds_sum"), 1.15, 1e-12);
}

TEST(MetricsTest, RequestEventsUpdateHistogramsAndCounters) {
  std::unique_ptr<Metrics> m = MakeMetrics();
  ASSERT_NE(m, nullptr);
  engine::RequestTimings t;
  t.queue_s = 0.003;
  t.prefill_s = 0.3;
  t.time_to_first_token_s = 0.303;
  m->OnFirstToken(t);
  t.queue_s = 0.04;
  t.prefill_s = 1.5;
  t.time_to_first_token_s = 1.54;
  m->OnFirstToken(t);
  for (double gap : {0.015, 0.03, 0.03}) m->OnInterTokenLatency(gap);

  engine::RequestOutcome stop;
  stop.finish = engine::FinishReason::kStop;
  stop.prompt_tokens = 100;
  stop.cached_tokens = 32;
  stop.generated_tokens = 10;
  stop.timings.decode_s = 0.7;
  stop.timings.total_s = 1.0;
  m->OnFinished(stop);
  engine::RequestOutcome cancelled;  // cancelled while queued: no tokens generated
  cancelled.finish = engine::FinishReason::kCancelled;
  cancelled.prompt_tokens = 50;
  cancelled.timings.total_s = 30.0;
  m->OnFinished(cancelled);
  engine::RequestOutcome weird;  // kNone should never arrive; it counts as an error
  weird.finish = engine::FinishReason::kNone;
  m->OnFinished(weird);
  m->OnPreempted();
  m->OnPreempted();
  m->OnDeviceLost(absl::UnavailableError("lost"));
  m->OnRejected(engine::RejectReason::kQueueFull);
  m->OnRejected(engine::RejectReason::kQueueFull);
  m->OnRejected(engine::RejectReason::kDraining);

  ParsedMetrics p = Scrape(*m);
  const std::string ttft = "sieve_request_time_to_first_token_seconds";
  EXPECT_EQ(p.Find(ttft + "_count"), 2.0);
  EXPECT_NEAR(*p.Find(ttft + "_sum"), 1.843, 1e-9);
  EXPECT_EQ(p.Find(ttft + "_bucket", {{"le", "0.2"}}), 0.0);
  EXPECT_EQ(p.Find(ttft + "_bucket", {{"le", "0.5"}}), 1.0);
  EXPECT_EQ(p.Find(ttft + "_bucket", {{"le", "2"}}), 2.0);
  EXPECT_EQ(p.Find(ttft + "_bucket", {{"le", "+Inf"}}), 2.0);
  EXPECT_EQ(p.Find("sieve_request_queue_seconds_bucket", {{"le", "0.005"}}), 1.0);
  EXPECT_NEAR(*p.Find("sieve_request_prefill_seconds_sum"), 1.8, 1e-9);
  EXPECT_EQ(p.Find("sieve_request_inter_token_latency_seconds_count"), 3.0);
  EXPECT_EQ(p.Find("sieve_request_inter_token_latency_seconds_bucket", {{"le", "0.02"}}), 1.0);
  // Decode time only for requests that generated tokens; end-to-end for all.
  EXPECT_EQ(p.Find("sieve_request_decode_seconds_count"), 1.0);
  EXPECT_NEAR(*p.Find("sieve_request_decode_seconds_sum"), 0.7, 1e-9);
  EXPECT_EQ(p.Find("sieve_request_e2e_latency_seconds_count"), 3.0);
  EXPECT_EQ(p.Find("sieve_request_e2e_latency_seconds_bucket", {{"le", "20"}}), 2.0);

  EXPECT_EQ(p.Find("sieve_requests_total", {{"outcome", "stop"}}), 1.0);
  EXPECT_EQ(p.Find("sieve_requests_total", {{"outcome", "cancelled"}}), 1.0);
  EXPECT_EQ(p.Find("sieve_requests_total", {{"outcome", "error"}}), 1.0);
  EXPECT_EQ(p.Find("sieve_requests_total", {{"outcome", "length"}}), 0.0);
  EXPECT_EQ(p.Sum("sieve_requests_total"), 3.0);
  EXPECT_EQ(p.Find("sieve_prompt_tokens_total"), 150.0);
  EXPECT_EQ(p.Find("sieve_cached_prompt_tokens_total"), 32.0);
  EXPECT_EQ(p.Find("sieve_generated_tokens_total"), 10.0);
  EXPECT_EQ(p.Find("sieve_preemptions_total"), 2.0);
  EXPECT_EQ(p.Find("sieve_device_lost_total"), 1.0);
  EXPECT_EQ(p.Find("sieve_rejections_total", {{"reason", "queue_full"}}), 2.0);
  EXPECT_EQ(p.Find("sieve_rejections_total", {{"reason", "draining"}}), 1.0);
  EXPECT_EQ(p.Find("sieve_rejections_total", {{"reason", "invalid"}}), 0.0);
}

TEST(MetricsTest, LoadAndStepsUpdateGaugesAndCounters) {
  std::unique_ptr<Metrics> m = MakeMetrics("llama");
  ASSERT_NE(m, nullptr);
  m->OnStep(engine::Pool::kPrefill, 0.25, 512);
  m->OnStep(engine::Pool::kPrefill, 0.0015, 16);
  m->OnStep(engine::Pool::kDecode, 0.02, 4);
  engine::EngineLoad load;
  load.running_prefill = 1;
  load.running_decode = 4;
  load.waiting = 7;
  load.waiting_tokens = 9000;
  load.kv_pages_used = 120;
  load.kv_pages_free = 880;
  load.kv_pages_cached = 30;
  load.prefix_cache_query_tokens = 400;
  load.prefix_cache_hit_tokens = 100;
  m->OnLoad(load);
  load.running_prefill = 0;
  load.prefix_cache_query_tokens = 1000;
  load.prefix_cache_hit_tokens = 600;
  m->OnLoad(load);

  ParsedMetrics p = Scrape(*m);
  EXPECT_EQ(p.Find("sieve_step_seconds_count", {{"pool", "prefill"}}), 2.0);
  EXPECT_EQ(p.Find("sieve_step_seconds_bucket", {{"pool", "prefill"}, {"le", "0.002"}}), 1.0);
  EXPECT_EQ(p.Find("sieve_step_seconds_count", {{"pool", "decode"}}), 1.0);
  EXPECT_EQ(p.Find("sieve_step_tokens_total", {{"pool", "prefill"}}), 528.0);
  EXPECT_EQ(p.Find("sieve_step_tokens_total", {{"pool", "decode"}}), 4.0);
  EXPECT_EQ(p.Find("sieve_running_requests", {{"pool", "prefill"}, {"model", "llama"}}), 0.0);
  EXPECT_EQ(p.Find("sieve_running_requests", {{"pool", "decode"}}), 4.0);
  EXPECT_EQ(p.Find("sieve_waiting_requests"), 7.0);
  EXPECT_EQ(p.Find("sieve_waiting_tokens"), 9000.0);
  EXPECT_EQ(p.Find("sieve_kv_pages_used"), 120.0);
  EXPECT_EQ(p.Find("sieve_kv_pages_free"), 880.0);
  EXPECT_EQ(p.Find("sieve_kv_pages_cached"), 30.0);
  EXPECT_DOUBLE_EQ(*p.Find("sieve_prefix_cache_hit_ratio"), 0.6);
  // Cumulative engine totals become counter increments, not double counts.
  EXPECT_EQ(p.Find("sieve_prefix_cache_query_tokens_total"), 1000.0);
  EXPECT_EQ(p.Find("sieve_prefix_cache_hit_tokens_total"), 600.0);

  // Gauges follow the engine back to baseline.
  m->OnLoad(engine::EngineLoad{.kv_pages_free = 1000,
                               .prefix_cache_query_tokens = 1000,
                               .prefix_cache_hit_tokens = 600});
  p = Scrape(*m);
  EXPECT_EQ(p.Find("sieve_running_requests", {{"pool", "decode"}}), 0.0);
  EXPECT_EQ(p.Find("sieve_kv_pages_used"), 0.0);
  EXPECT_EQ(p.Find("sieve_kv_pages_free"), 1000.0);
  EXPECT_EQ(p.Find("sieve_prefix_cache_query_tokens_total"), 1000.0);
}

TEST(MetricsTest, GrpcRequestsByMethodAndCodeWithBoundedLabels) {
  std::unique_ptr<Metrics> m = MakeMetrics();
  ASSERT_NE(m, nullptr);
  m->OnGrpcRequest("Generate", "OK");
  m->OnGrpcRequest("Generate", GrpcStatusCodeName(0));
  m->OnGrpcRequest("Generate", "INVALID_ARGUMENT");
  m->OnGrpcRequest("Tokenize", "OK");
  m->OnGrpcRequest("Generate", "not a code");                 // -> UNKNOWN
  m->OnGrpcRequest("bad method name with spaces\n", "OK");     // -> other
  m->OnGrpcRequest("", "OK");                                   // -> other
  ParsedMetrics p = Scrape(*m);
  const std::string name = "sieve_grpc_requests_total";
  EXPECT_EQ(p.Find(name, {{"method", "Generate"}, {"code", "OK"}}), 2.0);
  EXPECT_EQ(p.Find(name, {{"method", "Generate"}, {"code", "INVALID_ARGUMENT"}}), 1.0);
  EXPECT_EQ(p.Find(name, {{"method", "Generate"}, {"code", "UNKNOWN"}}), 1.0);
  EXPECT_EQ(p.Find(name, {{"method", "Tokenize"}, {"code", "OK"}}), 1.0);
  EXPECT_EQ(p.Find(name, {{"method", "other"}, {"code", "OK"}}), 2.0);
  EXPECT_EQ(p.All(name).size(), 5u);

  // Beyond kMaxGrpcMethods distinct methods, new ones fold into "other".
  for (int i = 0; i < Metrics::kMaxGrpcMethods + 10; ++i) {
    m->OnGrpcRequest(absl::StrCat("Method", i), "OK");
  }
  p = Scrape(*m);
  std::set<std::string> methods;
  for (const MetricSample& s : p.All(name)) methods.insert(s.labels.at("method"));
  EXPECT_EQ(methods.size(), static_cast<size_t>(Metrics::kMaxGrpcMethods) + 1);  // + "other"
  EXPECT_EQ(p.Sum(name), 7.0 + Metrics::kMaxGrpcMethods + 10);
}

TEST(MetricsTest, HttpRequestsByRouteAndCodeWithBoundedLabels) {
  std::unique_ptr<Metrics> m = MakeMetrics();
  ASSERT_NE(m, nullptr);
  ParsedMetrics p = Scrape(*m);
  const std::string name = "sieve_http_requests_total";
  // Present from the start: code 200 of every route, and each route's duration histogram.
  EXPECT_EQ(p.Find(name, {{"route", "/v1/chat/completions"}, {"code", "200"}}), 0.0);
  EXPECT_EQ(p.Find("sieve_http_request_duration_seconds_count", {{"route", "other"}}), 0.0);
  m->OnHttpRequest("/v1/completions", 200, 0.25);
  m->OnHttpRequest("/v1/completions", 400, 0.001);
  m->OnHttpRequest("/v1/completions", 400, 0.001);
  m->OnHttpRequest("/health", 503, 0.001);
  m->OnHttpRequest("/etc/passwd", 404, 0.001);  // a client's path -> other
  m->OnHttpRequest("/v1/models", 299, 0.001);   // an unlisted status -> other
  p = Scrape(*m);
  EXPECT_EQ(p.Find(name, {{"route", "/v1/completions"}, {"code", "200"}}), 1.0);
  EXPECT_EQ(p.Find(name, {{"route", "/v1/completions"}, {"code", "400"}}), 2.0);
  EXPECT_EQ(p.Find(name, {{"route", "/health"}, {"code", "503"}}), 1.0);
  EXPECT_EQ(p.Find(name, {{"route", "other"}, {"code", "404"}}), 1.0);
  EXPECT_EQ(p.Find(name, {{"route", "/v1/models"}, {"code", "other"}}), 1.0);
  EXPECT_EQ(p.Sum(name), 6.0);
  EXPECT_EQ(p.Find("sieve_http_request_duration_seconds_count", {{"route", "/v1/completions"}}),
            3.0);
  EXPECT_DOUBLE_EQ(
      p.Find("sieve_http_request_duration_seconds_sum", {{"route", "/v1/completions"}}).value_or(0),
      0.252);
}

TEST(MetricsTest, RenderMatchesTheEndpoint) {
  std::unique_ptr<Metrics> m = MakeMetrics();
  ASSERT_NE(m, nullptr);
  m->OnPreempted();
  absl::StatusOr<ParsedMetrics> rendered = ParseMetricsText(m->Render());
  ASSERT_TRUE(rendered.ok()) << rendered.status();
  ParsedMetrics scraped = Scrape(*m);
  auto count_ours = [](const ParsedMetrics& p) {
    int n = 0;
    for (const MetricSample& s : p.samples) n += s.name.rfind("sieve_", 0) == 0;
    return n;
  };
  EXPECT_GT(count_ours(scraped), 100);
  EXPECT_EQ(count_ours(*rendered), count_ours(scraped));
  EXPECT_EQ(rendered->Find("sieve_preemptions_total"), 1.0);
}

TEST(MetricsTest, ShutsDownPromptly) {
  for (const char* address : {"127.0.0.1:0", "0.0.0.0:0"}) {
    absl::StatusOr<std::unique_ptr<Metrics>> m = Metrics::Create(address, "m");
    ASSERT_TRUE(m.ok()) << m.status();
    const int port = (*m)->port();
    const absl::Time start = absl::Now();
    m->reset();
    // civetweb alone needs up to 2 s to notice the stop.
    EXPECT_LT(absl::Now() - start, absl::Milliseconds(1500)) << address;
    EXPECT_FALSE(HttpGet("127.0.0.1", port, "/metrics", absl::Seconds(2)).ok()) << address;
  }
}

TEST(MetricsTest, BindFailureIsAClearError) {
  std::unique_ptr<Metrics> first = MakeMetrics();
  ASSERT_NE(first, nullptr);
  const std::string taken = absl::StrCat("127.0.0.1:", first->port());
  absl::StatusOr<std::unique_ptr<Metrics>> second = Metrics::Create(taken, "m");
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(second.status().message(), HasSubstr(taken));
  // The first one keeps serving.
  EXPECT_TRUE(HttpGet("127.0.0.1", first->port(), "/metrics", absl::Seconds(10)).ok());
}

TEST(MetricsTest, MalformedListenAddressesAreInvalidArgument) {
  for (const char* address : {"", "9090", "127.0.0.1", "127.0.0.1:", "127.0.0.1:http",
                              "127.0.0.1:65536", "127.0.0.1:-1", "example.com:9090",
                              "1.2.3:9090", "[::1]:9090", ":9090"}) {
    absl::StatusOr<std::unique_ptr<Metrics>> m = Metrics::Create(address, "m");
    ASSERT_FALSE(m.ok()) << address;
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << address;
  }
  absl::StatusOr<std::unique_ptr<Metrics>> local = Metrics::Create("localhost:0", "m");
  ASSERT_TRUE(local.ok()) << local.status();
  EXPECT_TRUE(HttpGet("127.0.0.1", (*local)->port(), "/metrics", absl::Seconds(10)).ok());
}

TEST(MetricsTest, ConcurrentEventsAndScrapesAreConsistent) {
  std::unique_ptr<Metrics> m = MakeMetrics();
  ASSERT_NE(m, nullptr);
  constexpr int kThreads = 4, kEvents = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&m, t] {
      for (int i = 0; i < kEvents; ++i) {
        m->OnStep(t % 2 ? engine::Pool::kDecode : engine::Pool::kPrefill, 0.001 * (i % 7), 2);
        m->OnInterTokenLatency(0.01);
        m->OnGrpcRequest(t % 2 ? "Generate" : "Tokenize", "OK");
        m->OnLoad(engine::EngineLoad{.waiting = i});
      }
    });
  }
  for (int i = 0; i < 5; ++i) Scrape(*m);  // scrapes while events arrive
  for (std::thread& th : threads) th.join();
  ParsedMetrics p = Scrape(*m);
  EXPECT_EQ(p.Find("sieve_request_inter_token_latency_seconds_count"), kThreads * kEvents);
  EXPECT_EQ(p.Sum("sieve_step_tokens_total"), 2.0 * kThreads * kEvents);
  EXPECT_EQ(p.Sum("sieve_grpc_requests_total"), kThreads * kEvents);
}

// docs/metrics.md and the table in metrics.h name every family the endpoint serves.
TEST(MetricsTest, EveryFamilyIsDocumented) {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  if (root == nullptr) root = ".";  // tests run from the repository root
  std::unique_ptr<Metrics> m = MakeMetrics();
  ASSERT_NE(m, nullptr);
  m->OnGrpcRequest("Generate", "OK");  // so that sieve_grpc_requests_total is served
  ParsedMetrics p = Scrape(*m);
  auto read = [&](const char* doc) {
    std::ifstream in(absl::StrCat(root, "/", doc));
    EXPECT_TRUE(in.good()) << doc;
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  };
  const std::string markdown = read("docs/metrics.md");
  const std::string header = read("server/metrics.h");
  int documented = 0;
  for (const auto& [name, type] : p.types) {
    if (name.rfind("sieve_", 0) != 0) continue;  // prometheus-cpp's exposer_* families
    ++documented;
    EXPECT_THAT(markdown, HasSubstr(absl::StrCat("| ", name, " | ", type, " |")));
    EXPECT_THAT(header, HasSubstr(absl::StrCat("// | ", name, " ")));
  }
  EXPECT_EQ(documented, DocumentedFamilies().size());
}

}  // namespace
}  // namespace sieve::server
