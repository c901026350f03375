// Inter-token latency at many concurrent streams, in process (issue 15, item 1), and where the
// engine's scheduler thread spends its time (Engine::scheduler_profile). For each stream count,
// runs the same burst twice in one process: output processing inline on the scheduler thread
// (pools.output_workers 0, the behaviour before OutputPool) and on one output thread. Sinks
// record when each token reaches them (steady clock); inter-token latency is the gap between a
// stream's consecutive tokens.
//   engine_load_bench [--streams 64,256,1000] [--prompt 32] [--max-tokens 16] [--stop-strings]
// (from the repository root; the embedded model). Prints Markdown.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "engine/serving/engine.h"
#include "engine/testing/recording_sink.h"

namespace {

using Clock = std::chrono::steady_clock;
using sieve::engine::Engine;
using sieve::engine::EngineConfig;
using sieve::engine::RequestSpec;

class TimingSink : public sieve::engine::testing::RecordingSink {
 public:
  void OnTokens(const sieve::engine::TokenDelta& delta) override {
    {
      std::lock_guard<std::mutex> lock(times_mu_);
      times_.push_back(Clock::now());
    }
    RecordingSink::OnTokens(delta);
  }
  std::vector<Clock::time_point> times() const {
    std::lock_guard<std::mutex> lock(times_mu_);
    return times_;
  }

 private:
  mutable std::mutex times_mu_;
  std::vector<Clock::time_point> times_;
};

double Percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

struct Run {
  double itl_p50_ms = 0, itl_p90_ms = 0, itl_p99_ms = 0, ttft_p50_s = 0, wall_s = 0;
  double tokens_per_s = 0;
  int errors = 0;
  sieve::engine::SchedulerThreadProfile profile;
};

Run RunBurst(int streams, int prompt, int max_tokens, bool stop_strings, int output_workers) {
  EngineConfig c;
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  c.model.directory = std::string(root != nullptr ? root : ".") + "/models/embedded";
  c.model.cpu_threads = 1;
  c.kv_cache.num_pages =
      std::max(256, streams * ((prompt + max_tokens + 15) / 16 + 1));
  c.scheduler.max_running_requests = streams;
  c.scheduler.max_queued_requests = streams;
  c.scheduler.max_batch_tokens = std::max(2048, streams);
  c.pools.output_workers = output_workers;
  auto engine = Engine::Create(c, nullptr);
  if (!engine.ok()) {
    std::fprintf(stderr, "engine: %s\n", engine.status().ToString().c_str());
    std::exit(2);
  }
  std::mt19937 rng(7);
  std::vector<std::shared_ptr<TimingSink>> sinks;
  std::vector<Clock::time_point> sent;
  const Clock::time_point start = Clock::now();
  for (int i = 0; i < streams; ++i) {
    RequestSpec s;
    for (int t = 0; t < prompt; ++t) s.prompt.push_back(2 + rng() % 4000);
    s.sampling.temperature = 0;
    s.stop.max_tokens = max_tokens;
    s.stop.ignore_eos = true;
    if (stop_strings) s.stop.stop_strings = {"never appears here", "\n\n\n\n"};
    sinks.push_back(std::make_shared<TimingSink>());
    s.sink = sinks.back();
    sent.push_back(Clock::now());
    if (!(*engine)->Submit(std::move(s)).ok()) std::exit(3);
  }
  Run r;
  std::vector<double> itl, ttft;
  for (int i = 0; i < streams; ++i) {
    sinks[i]->WaitFinished(absl::Minutes(10));
    if (sinks[i]->tokens().size() != static_cast<size_t>(max_tokens)) ++r.errors;
    const std::vector<Clock::time_point> t = sinks[i]->times();
    if (!t.empty()) ttft.push_back(std::chrono::duration<double>(t[0] - sent[i]).count());
    for (size_t j = 1; j < t.size(); ++j) {
      itl.push_back(std::chrono::duration<double, std::milli>(t[j] - t[j - 1]).count());
    }
  }
  r.wall_s = std::chrono::duration<double>(Clock::now() - start).count();
  (*engine)->WaitIdle(absl::Minutes(1));
  r.profile = (*engine)->scheduler_profile();
  r.itl_p50_ms = Percentile(itl, 0.5);
  r.itl_p90_ms = Percentile(itl, 0.9);
  r.itl_p99_ms = Percentile(itl, 0.99);
  r.ttft_p50_s = Percentile(ttft, 0.5);
  r.tokens_per_s = static_cast<double>(streams) * max_tokens / r.wall_s;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> stream_counts = {64, 256, 1000};
  int prompt = 32, max_tokens = 16;
  bool stop_strings = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    const char* value = i + 1 < argc ? argv[i + 1] : "";
    if (flag == "--streams") {
      stream_counts.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        int n = 0;
        if (!absl::SimpleAtoi(part, &n) || n < 1) return 2;
        stream_counts.push_back(n);
      }
      ++i;
    } else if (flag == "--prompt") {
      prompt = std::atoi(value);
      ++i;
    } else if (flag == "--max-tokens") {
      max_tokens = std::atoi(value);
      ++i;
    } else if (flag == "--stop-strings") {
      stop_strings = true;
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  std::printf("prompt %d tokens (random ids), max_tokens %d (ignore_eos), greedy, stop strings %s\n\n",
              prompt, max_tokens, stop_strings ? "2 (never matching)" : "none");
  std::printf("| streams | output | ITL p50 ms | p90 | p99 | TTFT p50 s | wall s | tokens/s | "
              "errors |\n|---|---|---|---|---|---|---|---|---|\n");
  std::vector<std::pair<std::string, Run>> runs;
  for (int n : stream_counts) {
    for (int workers : {0, 1}) {
      const Run r = RunBurst(n, prompt, max_tokens, stop_strings, workers);
      const std::string label = workers == 0 ? "inline" : "1 thread";
      std::printf("| %d | %s | %.2f | %.2f | %.2f | %.3f | %.2f | %.0f | %d |\n", n,
                  label.c_str(), r.itl_p50_ms, r.itl_p90_ms, r.itl_p99_ms, r.ttft_p50_s,
                  r.wall_s, r.tokens_per_s, r.errors);
      std::fflush(stdout);
      runs.push_back({absl::StrFormat("%d streams, %s", n, label), r});
    }
  }
  std::printf("\nScheduler thread (sieve-sched): share of its wall time per part of its loop, "
              "and its CPU microseconds per token handled in that part (wall time on this "
              "loaded machine includes time the thread was descheduled):\n\n"
              "| run | iterations | tokens | wait | completions | intake | schedule | dispatch "
              "| publish | output | busy CPU us/token |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& [label, r] : runs) {
    const auto& p = r.profile;
    using Part = sieve::engine::SchedulerThreadProfile::Part;
    const Part* parts[] = {&p.wait,     &p.completions, &p.intake, &p.schedule,
                           &p.dispatch, &p.publish,     &p.output};
    double wall = 0, busy_cpu = 0;
    for (const Part* part : parts) wall += part->wall_s;
    for (const Part* part : parts) busy_cpu += part == &p.wait ? 0 : part->cpu_s;
    const double per_tok = p.tokens > 0 ? 1e6 / static_cast<double>(p.tokens) : 0;
    auto cell = [&](const Part& part) {
      return absl::StrFormat("%.1f%% / %.1f", 100 * part.wall_s / wall, part.cpu_s * per_tok);
    };
    std::printf("| %s | %lld | %lld | %s | %s | %s | %s | %s | %s | %s | %.1f |\n", label.c_str(),
                static_cast<long long>(p.iterations), static_cast<long long>(p.tokens),
                cell(p.wait).c_str(), cell(p.completions).c_str(), cell(p.intake).c_str(),
                cell(p.schedule).c_str(), cell(p.dispatch).c_str(), cell(p.publish).c_str(),
                cell(p.output).c_str(), busy_cpu * per_tok);
  }
  return 0;
}
