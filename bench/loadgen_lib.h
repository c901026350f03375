// The pieces of sieve_loadgen that need no network: flags, the prompt-length mix, Poisson
// arrivals, latency summaries and the report (Markdown and JSON). bench/loadgen.cc drives a
// daemon with them over gRPC.
#ifndef SIEVE_BENCH_LOADGEN_LIB_H_
#define SIEVE_BENCH_LOADGEN_LIB_H_

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace sieve::bench {

// How prompts are built. Both give prompts of exactly the sampled length in tokens.
enum class PromptMode {
  kTokens,  // random token ids (the model's BOS first when it has one), sent as token_ids
  kText,    // random words, each one token, sent as text and checked with Tokenize
};

// The distribution of prompt lengths, in tokens: either weighted choices or a uniform range.
class PromptLengthMix {
 public:
  // Parses "64,512,2048" (equal weights), "64:3,512:1" (weights, > 0) or "32-1024" (uniform
  // over the integers of the closed range). Lengths are in [1, 1048576]. Returns
  // InvalidArgument naming the bad part.
  static absl::StatusOr<PromptLengthMix> Parse(const std::string& spec);

  // Draws one length.
  int32_t Sample(std::mt19937_64& rng) const;

  // The largest length this mix can draw.
  int32_t max_length() const;

  // The mix in the syntax Parse accepts (weights always written for choices).
  std::string ToString() const;

 private:
  std::vector<int32_t> lengths_;  // choices; empty for a range
  std::vector<double> weights_;   // one per choice
  int32_t range_min_ = 0, range_max_ = 0;
};

// Command-line settings of sieve_loadgen.
struct LoadgenOptions {
  std::string target = "127.0.0.1:50051";  // gRPC address of the daemon (loopback by default)
  std::string model;                        // model name; empty selects the daemon's default
  double rate = 1.0;                        // mean arrivals per second (Poisson), > 0
  double duration_s = 60.0;                 // stop sending after this long; 0 = no time bound
  int64_t requests = 0;                     // stop after sending this many; 0 = no count bound
  uint64_t seed = 1;                        // seeds arrivals, lengths, prompts and sampling
  std::string prompt_lengths = "64,512,2048";
  PromptMode prompt_mode = PromptMode::kTokens;
  int32_t shared_prefix_tokens = 0;         // identical leading tokens across prompts
  int32_t max_tokens = 64;                  // tokens to generate per request
  bool ignore_eos = true;                   // generate exactly max_tokens
  float temperature = 0.0f;                 // 0 = greedy
  int32_t concurrency = 64;                 // most requests in flight; arrivals wait beyond it
  double request_timeout_s = 600.0;         // per-request gRPC deadline
  double drain_timeout_s = 120.0;           // after sending stops, wait this long, then cancel
  double connect_timeout_s = 30.0;          // wait for the daemon to answer GetModelInfo
  std::string json_path;                    // also write the report as JSON here
  // Which API the requests go to: "grpc" (sieve.v1 Generate on --target), "http" (the
  // OpenAI-compatible POST /v1/completions, streamed, on --http-target) or "both" (the same
  // schedule with requests alternating between the two, reported per protocol). Model facts and
  // prompts always come over gRPC.
  std::string protocol = "grpc";
  std::string http_target;                  // host:port of the daemon's http.listen_address
};

// The usage text of sieve_loadgen (flags, defaults and what is reported).
const char* LoadgenUsage();

// Parses the flags (argv[0] excluded): "--name value" or "--name=value"; booleans as
// "--ignore-eos" / "--no-ignore-eos". Returns InvalidArgument naming the flag on unknown flags,
// missing or malformed values and out-of-range settings; NotFound("help") for --help.
absl::StatusOr<LoadgenOptions> ParseLoadgenFlags(const std::vector<std::string>& args);

// Seconds to the next arrival of a Poisson process of `rate` arrivals per second.
double NextArrivalGap(std::mt19937_64& rng, double rate);

// Percentiles and extremes of a sample, in its unit (seconds here).
struct LatencySummary {
  int64_t count = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};

// Summarizes `values` (any order). Percentiles interpolate linearly between closest ranks;
// an empty sample gives all zeros.
LatencySummary Summarize(std::vector<double> values);

// What the client saw of one request.
struct RequestRecord {
  int32_t prompt_tokens = 0;          // as sent
  double send_delay_s = 0;            // time waited for a concurrency slot (0: none needed)
  std::string code = "OK";  // gRPC status code name; "INCOMPLETE": OK without a final message
  std::string message;                // the status message when the call failed
  std::string finish_reason;          // "length", "stop", "eos", "cancelled" when complete
  int32_t output_tokens = 0;          // token ids received
  double ttft_s = -1;                 // sent -> first token received; < 0 when none arrived
  double e2e_s = 0;                   // sent -> call finished
  double last_token_s = 0;            // sent -> last token received
  std::vector<double> itl_s;          // gaps between tokens (a k-token message gives k gaps)
  // Server-side per-phase timings from the final message (when complete).
  double server_queue_s = 0, server_prefill_s = 0, server_ttft_s = 0, server_decode_s = 0;
  int32_t cached_prompt_tokens = 0;
  int32_t server_prompt_tokens = -1;  // usage.prompt_tokens of the final message; -1 if none
  std::string protocol = "grpc";      // the API it was sent on: "grpc" or "http"
};

// The aggregate of one run.
struct LoadgenReport {
  int64_t sent = 0, ok = 0;
  double wall_s = 0;                          // first send -> last completion
  LatencySummary ttft, itl, tpot, e2e;        // client-measured, OK requests
  LatencySummary server_queue, server_prefill, send_delay;
  std::map<int32_t, LatencySummary> ttft_by_prompt_length;  // OK requests, per drawn length
  std::map<std::string, int64_t> codes;       // gRPC code name -> requests
  std::map<std::string, std::string> first_messages;  // failing code name -> its first message
  std::map<std::string, int64_t> finish_reasons;  // finish reason -> OK requests
  int64_t prompt_tokens = 0, cached_prompt_tokens = 0, output_tokens = 0;  // OK requests
  int64_t delayed = 0;                        // requests that waited for a concurrency slot
  int64_t length_mismatches = 0;              // OK requests whose server prompt length differed
  double request_throughput = 0;              // OK requests / wall_s
  double output_token_throughput = 0;         // output tokens / wall_s
  double prompt_token_throughput = 0;         // prompt tokens / wall_s
};

// Aggregates `records` of a run that lasted `wall_s` seconds.
LoadgenReport BuildReport(const std::vector<RequestRecord>& records, double wall_s);

// The records sent on `protocol` ("grpc" or "http").
std::vector<RequestRecord> RecordsOf(const std::vector<RequestRecord>& records,
                                     const std::string& protocol);

// Renders the settings and the report as Markdown tables. Time to first token is broken down
// by prompt length when there are at most kMaxLengthRows distinct lengths.
inline constexpr size_t kMaxLengthRows = 8;
std::string FormatMarkdown(const LoadgenOptions& options, const std::string& model_name,
                           const LoadgenReport& report);

// The settings and the report as JSON (seconds and tokens, like the Markdown).
nlohmann::json ReportToJson(const LoadgenOptions& options, const std::string& model_name,
                            const LoadgenReport& report);

}  // namespace sieve::bench

#endif  // SIEVE_BENCH_LOADGEN_LIB_H_
