#include "bench/loadgen_lib.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <type_traits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace sieve::bench {
namespace {

constexpr int32_t kMaxPromptLength = 1 << 20;

absl::Status Bad(const std::string& flag, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", why));
}

bool ParseLength(absl::string_view text, int32_t* out) {
  return absl::SimpleAtoi(absl::StripAsciiWhitespace(text), out) && *out >= 1 &&
         *out <= kMaxPromptLength;
}

std::string Seconds(double s) { return absl::StrFormat("%.4f", s); }

}  // namespace

absl::StatusOr<PromptLengthMix> PromptLengthMix::Parse(const std::string& spec) {
  PromptLengthMix mix;
  const std::string why = absl::StrCat("\"", spec, "\": ");
  if (spec.find('-') != std::string::npos) {
    std::vector<absl::string_view> ends = absl::StrSplit(spec, '-');
    if (ends.size() != 2 || !ParseLength(ends[0], &mix.range_min_) ||
        !ParseLength(ends[1], &mix.range_max_) || mix.range_min_ > mix.range_max_) {
      return Bad("prompt-lengths", why + "a range is MIN-MAX with 1 <= MIN <= MAX <= 1048576");
    }
    return mix;
  }
  for (absl::string_view part : absl::StrSplit(spec, ',')) {
    std::vector<absl::string_view> lw = absl::StrSplit(part, ':');
    int32_t length = 0;
    double weight = 1.0;
    if (lw.size() > 2 || !ParseLength(lw[0], &length)) {
      return Bad("prompt-lengths",
                 why + absl::StrCat("bad length \"", part, "\" (integers in 1..1048576)"));
    }
    if (lw.size() == 2 && (!absl::SimpleAtod(lw[1], &weight) || !(weight > 0) ||
                           !std::isfinite(weight))) {
      return Bad("prompt-lengths", why + absl::StrCat("bad weight in \"", part, "\" (> 0)"));
    }
    mix.lengths_.push_back(length);
    mix.weights_.push_back(weight);
  }
  return mix;
}

int32_t PromptLengthMix::Sample(std::mt19937_64& rng) const {
  if (lengths_.empty()) {
    return std::uniform_int_distribution<int32_t>(range_min_, range_max_)(rng);
  }
  std::discrete_distribution<size_t> pick(weights_.begin(), weights_.end());
  return lengths_[pick(rng)];
}

int32_t PromptLengthMix::max_length() const {
  return lengths_.empty() ? range_max_ : *std::max_element(lengths_.begin(), lengths_.end());
}

std::string PromptLengthMix::ToString() const {
  if (lengths_.empty()) return absl::StrCat(range_min_, "-", range_max_);
  std::vector<std::string> parts;
  for (size_t i = 0; i < lengths_.size(); ++i) {
    parts.push_back(absl::StrCat(lengths_[i], ":", weights_[i]));
  }
  return absl::StrJoin(parts, ",");
}

const char* LoadgenUsage() {
  return R"(usage: sieve_loadgen [flags]

Sends Generate requests to a Sieve daemon with Poisson arrivals and mixed prompt lengths, then
reports time to first token, inter-token latency, end-to-end latency (p50/p90/p99/max),
request and token throughput, and errors by gRPC code, as Markdown on stdout.
Stops by itself: sending ends at --duration or --requests, whichever comes first; requests
still running --drain-timeout seconds later are cancelled.

flags:
  --target HOST:PORT       daemon address (default 127.0.0.1:50051)
  --model NAME             model name (default: the daemon's default model)
  --rate R                 mean arrivals per second, Poisson (default 1)
  --duration S             stop sending after S seconds; 0 = no time bound (default 60)
  --requests N             stop after sending N requests; 0 = no count bound (default 0)
  --seed N                 seed of arrivals, lengths, prompts and sampling (default 1)
  --prompt-lengths SPEC    prompt lengths in tokens: "64,512,2048" (equal weights),
                           "64:3,512:1" (weighted) or "32-1024" (uniform) (default 64,512,2048)
  --prompt-mode MODE       tokens: random token ids; text: random one-token words, checked
                           with Tokenize (default tokens)
  --shared-prefix N        the first N prompt tokens are the same in every request (default 0)
  --max-tokens N           tokens to generate per request (default 64)
  --ignore-eos | --no-ignore-eos
                           generate exactly --max-tokens (default on)
  --temperature T          sampling temperature; 0 = greedy (default 0)
  --concurrency N          most requests in flight; arrivals wait for a slot (default 64)
  --request-timeout S      per-request deadline (default 600)
  --drain-timeout S        after sending stops, cancel what still runs after S s (default 120)
  --connect-timeout S      wait this long for the daemon to answer (default 30)
  --json FILE              also write the settings and results as JSON
  --protocol P             grpc: sieve.v1 Generate on --target; http: the OpenAI-compatible
                           POST /v1/completions (streamed) on --http-target; both: the same
                           schedule alternating between them, reported per protocol
                           (default grpc). Over HTTP, server timings are not reported and
                           inter-token gaps are per SSE chunk (one token unless the server
                           coalesced). Model facts and prompts always come over gRPC.
  --http-target HOST:PORT  the daemon's HTTP API (http.listen_address); needed with http/both
  --help                   this text
)";
}

absl::StatusOr<LoadgenOptions> ParseLoadgenFlags(const std::vector<std::string>& args) {
  LoadgenOptions o;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string arg = args[i];
    if (arg == "--help" || arg == "-h") return absl::NotFoundError("help");
    if (arg == "--ignore-eos" || arg == "--no-ignore-eos") {
      o.ignore_eos = arg == "--ignore-eos";
      continue;
    }
    if (arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument \"", arg, "\""));
    }
    arg = arg.substr(2);
    std::string name = arg, value;
    if (size_t eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      return Bad(name, "needs a value");
    }
    auto number = [&](double* out, double lo, double hi) -> absl::Status {
      if (!absl::SimpleAtod(value, out) || !(*out >= lo && *out <= hi)) {
        return Bad(name, absl::StrCat("\"", value, "\" is not a number in [", lo, ", ", hi, "]"));
      }
      return absl::OkStatus();
    };
    auto integer = [&](auto* out, int64_t lo, int64_t hi) -> absl::Status {
      int64_t v = 0;
      if (!absl::SimpleAtoi(value, &v) || v < lo || v > hi) {
        return Bad(name, absl::StrCat("\"", value, "\" is not an integer in [", lo, ", ", hi, "]"));
      }
      *out = static_cast<std::remove_pointer_t<decltype(out)>>(v);
      return absl::OkStatus();
    };
    absl::Status s;
    double temperature = 0;
    if (name == "target") {
      o.target = value;
    } else if (name == "model") {
      o.model = value;
    } else if (name == "rate") {
      s = number(&o.rate, 1e-6, 1e6);
    } else if (name == "duration") {
      s = number(&o.duration_s, 0, 7 * 86400);
    } else if (name == "requests") {
      s = integer(&o.requests, 0, 1'000'000);
    } else if (name == "seed") {
      if (!absl::SimpleAtoi(value, &o.seed)) s = Bad(name, "not an unsigned integer");
    } else if (name == "prompt-lengths") {
      o.prompt_lengths = value;
      s = PromptLengthMix::Parse(value).status();
    } else if (name == "prompt-mode") {
      if (value == "tokens") {
        o.prompt_mode = PromptMode::kTokens;
      } else if (value == "text") {
        o.prompt_mode = PromptMode::kText;
      } else {
        s = Bad(name, "must be tokens or text");
      }
    } else if (name == "shared-prefix") {
      s = integer(&o.shared_prefix_tokens, 0, kMaxPromptLength);
    } else if (name == "max-tokens") {
      s = integer(&o.max_tokens, 1, kMaxPromptLength);
    } else if (name == "temperature") {
      s = number(&temperature, 0, 100);
      o.temperature = static_cast<float>(temperature);
    } else if (name == "concurrency") {
      s = integer(&o.concurrency, 1, 100000);
    } else if (name == "request-timeout") {
      s = number(&o.request_timeout_s, 0.001, 86400);
    } else if (name == "drain-timeout") {
      s = number(&o.drain_timeout_s, 0, 86400);
    } else if (name == "connect-timeout") {
      s = number(&o.connect_timeout_s, 0.001, 86400);
    } else if (name == "json") {
      o.json_path = value;
    } else if (name == "protocol") {
      if (value != "grpc" && value != "http" && value != "both") {
        s = Bad(name, "must be grpc, http or both");
      }
      o.protocol = value;
    } else if (name == "http-target") {
      o.http_target = value;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name, " (see --help)"));
    }
    if (!s.ok()) return s;
  }
  if (o.duration_s == 0 && o.requests == 0) {
    return absl::InvalidArgumentError(
        "--duration 0 and --requests 0: the run must be bounded by time or count");
  }
  if (o.target.empty()) return Bad("target", "must not be empty");
  if (o.protocol != "grpc" && o.http_target.empty()) {
    return Bad("http-target", absl::StrCat("is needed with --protocol ", o.protocol));
  }
  return o;
}

double NextArrivalGap(std::mt19937_64& rng, double rate) {
  return std::exponential_distribution<double>(rate)(rng);
}

LatencySummary Summarize(std::vector<double> values) {
  LatencySummary s;
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  s.count = static_cast<int64_t>(values.size());
  s.mean = std::accumulate(values.begin(), values.end(), 0.0) / values.size();
  s.max = values.back();
  auto pct = [&](double q) {
    const double rank = q * (values.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(rank));
    const size_t hi = std::min(lo + 1, values.size() - 1);
    return values[lo] + (values[hi] - values[lo]) * (rank - lo);
  };
  s.p50 = pct(0.50);
  s.p90 = pct(0.90);
  s.p99 = pct(0.99);
  return s;
}

LoadgenReport BuildReport(const std::vector<RequestRecord>& records, double wall_s) {
  LoadgenReport r;
  r.wall_s = wall_s;
  std::vector<double> ttft, itl, tpot, e2e, queue, prefill, delay;
  std::map<int32_t, std::vector<double>> ttft_by_length;
  for (const RequestRecord& rec : records) {
    ++r.sent;
    ++r.codes[rec.code];
    if (rec.code != "OK" && !rec.message.empty()) r.first_messages.emplace(rec.code, rec.message);
    delay.push_back(rec.send_delay_s);
    if (rec.send_delay_s > 0) ++r.delayed;
    if (rec.code != "OK") continue;
    ++r.ok;
    ++r.finish_reasons[rec.finish_reason];
    r.prompt_tokens += rec.prompt_tokens;
    r.cached_prompt_tokens += rec.cached_prompt_tokens;
    r.output_tokens += rec.output_tokens;
    if (rec.server_prompt_tokens >= 0 && rec.server_prompt_tokens != rec.prompt_tokens) {
      ++r.length_mismatches;
    }
    e2e.push_back(rec.e2e_s);
    queue.push_back(rec.server_queue_s);
    prefill.push_back(rec.server_prefill_s);
    if (rec.ttft_s >= 0) {
      ttft.push_back(rec.ttft_s);
      ttft_by_length[rec.prompt_tokens].push_back(rec.ttft_s);
    }
    itl.insert(itl.end(), rec.itl_s.begin(), rec.itl_s.end());
    if (rec.output_tokens > 1 && rec.ttft_s >= 0) {
      tpot.push_back((rec.last_token_s - rec.ttft_s) / (rec.output_tokens - 1));
    }
  }
  r.ttft = Summarize(std::move(ttft));
  r.itl = Summarize(std::move(itl));
  r.tpot = Summarize(std::move(tpot));
  r.e2e = Summarize(std::move(e2e));
  r.server_queue = Summarize(std::move(queue));
  r.server_prefill = Summarize(std::move(prefill));
  r.send_delay = Summarize(std::move(delay));
  for (auto& [length, values] : ttft_by_length) {
    r.ttft_by_prompt_length[length] = Summarize(std::move(values));
  }
  if (wall_s > 0) {
    r.request_throughput = r.ok / wall_s;
    r.output_token_throughput = r.output_tokens / wall_s;
    r.prompt_token_throughput = r.prompt_tokens / wall_s;
  }
  return r;
}

std::vector<RequestRecord> RecordsOf(const std::vector<RequestRecord>& records,
                                     const std::string& protocol) {
  std::vector<RequestRecord> out;
  for (const RequestRecord& r : records) {
    if (r.protocol == protocol) out.push_back(r);
  }
  return out;
}

std::string FormatMarkdown(const LoadgenOptions& o, const std::string& model_name,
                           const LoadgenReport& r) {
  std::string out;
  auto row = [&](const std::string& name, const LatencySummary& s) {
    absl::StrAppend(&out, "| ", name, " | ", s.count, " | ", Seconds(s.mean), " | ",
                    Seconds(s.p50), " | ", Seconds(s.p90), " | ", Seconds(s.p99), " | ",
                    Seconds(s.max), " |\n");
  };
  absl::StrAppend(&out, "| setting | value |\n|---|---|\n");
  absl::StrAppend(&out, "| target | ", o.target, " (model ", model_name, ") |\n");
  absl::StrAppend(&out, "| protocol | ", o.protocol,
                  o.protocol != "grpc" ? absl::StrCat(" (HTTP API on ", o.http_target, ")") : "",
                  " |\n");
  absl::StrAppend(&out, "| arrivals | Poisson, ", o.rate, " req/s, seed ", o.seed, " |\n");
  absl::StrAppend(&out, "| bounds | ", o.duration_s > 0 ? absl::StrCat(o.duration_s, " s") : "-",
                  ", ", o.requests > 0 ? absl::StrCat(o.requests, " requests") : "-",
                  " (first reached) |\n");
  absl::StrAppend(&out, "| prompt lengths (tokens:weight) | ", o.prompt_lengths, " (",
                  o.prompt_mode == PromptMode::kTokens ? "token ids" : "text",
                  o.shared_prefix_tokens > 0
                      ? absl::StrCat(", shared prefix ", o.shared_prefix_tokens)
                      : std::string(),
                  ") |\n");
  absl::StrAppend(&out, "| max tokens | ", o.max_tokens, o.ignore_eos ? " (ignore_eos)" : "",
                  ", temperature ", o.temperature, " |\n");
  absl::StrAppend(&out, "| concurrency cap | ", o.concurrency, " |\n\n");

  absl::StrAppend(&out, "| latency (s) | n | mean | p50 | p90 | p99 | max |\n");
  absl::StrAppend(&out, "|---|---|---|---|---|---|---|\n");
  row("time to first token", r.ttft);
  row("inter-token latency", r.itl);
  row("time per output token", r.tpot);
  row("end-to-end", r.e2e);
  row("server: queue", r.server_queue);
  row("server: prefill", r.server_prefill);
  row("client: wait for a concurrency slot", r.send_delay);
  if (r.ttft_by_prompt_length.size() <= kMaxLengthRows) {
    for (const auto& [length, s] : r.ttft_by_prompt_length) {
      row(absl::StrCat("time to first token, prompt ", length), s);
    }
  }
  absl::StrAppend(&out, "\n| throughput | value |\n|---|---|\n");
  absl::StrAppend(&out, "| requests sent / ok | ", r.sent, " / ", r.ok, " |\n");
  absl::StrAppend(&out, "| wall time (s) | ", absl::StrFormat("%.2f", r.wall_s), " |\n");
  absl::StrAppend(&out, "| requests/s | ", absl::StrFormat("%.3f", r.request_throughput), " |\n");
  absl::StrAppend(&out, "| output tokens/s | ",
                  absl::StrFormat("%.2f", r.output_token_throughput), " |\n");
  absl::StrAppend(&out, "| prompt tokens/s | ",
                  absl::StrFormat("%.2f", r.prompt_token_throughput), " |\n");
  absl::StrAppend(&out, "| prompt tokens served from cache | ", r.cached_prompt_tokens, " of ",
                  r.prompt_tokens, " |\n");
  absl::StrAppend(&out, "| requests that waited for a concurrency slot | ", r.delayed, " |\n");
  if (r.length_mismatches > 0) {
    absl::StrAppend(&out, "| requests whose server-side prompt length differed | ",
                    r.length_mismatches, " |\n");
  }
  absl::StrAppend(&out, "\n| outcome | requests | first message |\n|---|---|---|\n");
  for (const auto& [reason, n] : r.finish_reasons) {
    absl::StrAppend(&out, "| OK, finish ", reason, " | ", n, " | |\n");
  }
  for (const auto& [code, n] : r.codes) {
    if (code == "OK") continue;
    auto it = r.first_messages.find(code);
    std::string message = it == r.first_messages.end() ? "" : it->second;
    absl::StrReplaceAll({{"|", "\\|"}, {"\n", " "}}, &message);
    absl::StrAppend(&out, "| ", code, " | ", n, " | ", message, " |\n");
  }
  return out;
}

nlohmann::json ReportToJson(const LoadgenOptions& o, const std::string& model_name,
                            const LoadgenReport& r) {
  auto summary = [](const LatencySummary& s) {
    return nlohmann::json{{"count", s.count}, {"mean", s.mean}, {"p50", s.p50},
                          {"p90", s.p90},     {"p99", s.p99},   {"max", s.max}};
  };
  nlohmann::json by_length = nlohmann::json::object();
  for (const auto& [length, s] : r.ttft_by_prompt_length) {
    by_length[std::to_string(length)] = summary(s);
  }
  return nlohmann::json{
      {"settings",
       {{"target", o.target},
        {"model", model_name},
        {"rate_per_s", o.rate},
        {"duration_s", o.duration_s},
        {"requests", o.requests},
        {"seed", o.seed},
        {"prompt_lengths", o.prompt_lengths},
        {"prompt_mode", o.prompt_mode == PromptMode::kTokens ? "tokens" : "text"},
        {"shared_prefix_tokens", o.shared_prefix_tokens},
        {"max_tokens", o.max_tokens},
        {"ignore_eos", o.ignore_eos},
        {"temperature", o.temperature},
        {"concurrency", o.concurrency},
        {"protocol", o.protocol},
        {"http_target", o.http_target}}},
      {"sent", r.sent},
      {"ok", r.ok},
      {"wall_s", r.wall_s},
      {"latency_s",
       {{"time_to_first_token", summary(r.ttft)},
        {"inter_token", summary(r.itl)},
        {"time_per_output_token", summary(r.tpot)},
        {"end_to_end", summary(r.e2e)},
        {"server_queue", summary(r.server_queue)},
        {"server_prefill", summary(r.server_prefill)},
        {"client_slot_wait", summary(r.send_delay)},
        {"time_to_first_token_by_prompt_length", by_length}}},
      {"throughput",
       {{"requests_per_s", r.request_throughput},
        {"output_tokens_per_s", r.output_token_throughput},
        {"prompt_tokens_per_s", r.prompt_token_throughput}}},
      {"tokens",
       {{"prompt", r.prompt_tokens},
        {"cached_prompt", r.cached_prompt_tokens},
        {"output", r.output_tokens}}},
      {"requests_delayed_by_concurrency_cap", r.delayed},
      {"prompt_length_mismatches", r.length_mismatches},
      {"codes", r.codes},
      {"first_messages", r.first_messages},
      {"finish_reasons", r.finish_reasons},
  };
}

}  // namespace sieve::bench
