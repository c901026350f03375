// The model forward pass at real shapes: prefill tokens/s and time per decode step, on any
// backend, with seeded random weights (configs/models/*). Run on the GPU machine next to
// bench/model_baseline.py (transformers with SDPA, same shapes, same run).
//
//   model_bench --model configs/models/llama-3.1-8b --backend cuda \
//       --prefill 8192,32768 --decode 1:32768,1:131072,32:4096
//
// Prefill: one sequence of N tokens in chunks of --chunk tokens (the last chunk asks for logits,
// which waits for the device); reports seconds and tokens/s. Decode: B sequences whose KV holds
// C tokens (filled by a prefill first), then timed single-token steps over the batch; reports
// the median step time of --steps steps.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "engine/model_runner.h"

namespace sieve {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct Args {
  std::string model = "configs/models/llama-3.1-8b";
  std::string backend = "cuda";
  std::vector<int64_t> prefill = {8192};
  std::vector<std::pair<int64_t, int64_t>> decode;  // (batch, context)
  int64_t chunk = 16384;
  int steps = 20;
  int page_size = 64;
};

// Fills `batch` sequences with `context` tokens each (chunked prefill), pages laid out
// contiguously per sequence; returns false on error.
bool Prefill(engine::ModelRunner& m, int64_t batch, int64_t context, int64_t chunk,
             std::vector<std::vector<int32_t>>& pages, double* seconds) {
  const int ps = m.options().page_size;
  const int64_t per_seq = (context + 1 + ps - 1) / ps;
  pages.assign(batch, {});
  for (int64_t s = 0; s < batch; ++s) {
    for (int64_t p = 0; p < per_seq; ++p) pages[s].push_back(static_cast<int32_t>(s * per_seq + p));
  }
  std::vector<int32_t> tokens(chunk);
  const int64_t vocab = m.config().vocab_size;
  for (int64_t i = 0; i < chunk; ++i) tokens[i] = static_cast<int32_t>((i * 7919 + 13) % vocab);
  std::vector<float> logits;
  const auto t0 = Clock::now();
  for (int64_t s = 0; s < batch; ++s) {
    for (int64_t done = 0; done < context;) {
      const int64_t n = std::min(chunk, context - done);
      engine::SequenceStep st{absl::MakeConstSpan(tokens).subspan(0, n),
                              static_cast<int32_t>(done), pages[s], done + n == context};
      logits.clear();
      absl::Status status = m.Forward({st}, logits);
      if (!status.ok()) {
        std::fprintf(stderr, "prefill failed: %s\n", status.ToString().c_str());
        return false;
      }
      done += n;
    }
  }
  *seconds = Seconds(t0, Clock::now());
  return true;
}

int Run(const Args& a) {
  int64_t max_kv = 0;
  for (int64_t n : a.prefill) max_kv = std::max(max_kv, n + 1);
  for (auto [b, c] : a.decode) max_kv = std::max(max_kv, b * (c + a.page_size + 1));
  engine::ModelRunnerOptions o;
  o.backend = a.backend;
  o.weights = "random";
  o.random_seed = 1;
  o.page_size = a.page_size;
  o.num_pages = static_cast<int32_t>(max_kv / a.page_size + 64);
  o.max_step_tokens = static_cast<int32_t>(a.chunk);
  o.max_step_logits = 64;
  const auto t0 = Clock::now();
  auto runner = engine::ModelRunner::Load(a.model, o);
  if (!runner.ok()) {
    std::fprintf(stderr, "load failed: %s\n", runner.status().ToString().c_str());
    return 1;
  }
  engine::ModelRunner& m = **runner;
  std::printf("model %s on %s: loaded random weights in %.1f s; KV pages %d x %d tokens\n",
              a.model.c_str(), a.backend.c_str(), Seconds(t0, Clock::now()), o.num_pages,
              o.page_size);
  std::vector<std::vector<int32_t>> pages;
  double s = 0;
  Prefill(m, 1, 512, a.chunk, pages, &s);  // warm-up
  std::printf("\n| phase | tokens | batch | time | rate |\n|---|---|---|---|---|\n");
  for (int64_t n : a.prefill) {
    double best = 1e30;
    for (int rep = 0; rep < 2; ++rep) {
      if (!Prefill(m, 1, n, a.chunk, pages, &s)) return 1;
      best = std::min(best, s);
    }
    std::printf("| prefill | %ld | 1 | %.3f s | %.0f tok/s |\n", n, best, n / best);
    std::fflush(stdout);
  }
  for (auto [batch, context] : a.decode) {
    if (!Prefill(m, batch, context, a.chunk, pages, &s)) return 1;
    std::vector<int32_t> next(batch, 42);
    std::vector<engine::SequenceStep> step(batch);
    std::vector<double> times;
    std::vector<float> logits;
    for (int i = 0; i < a.steps + 3; ++i) {
      for (int64_t b = 0; b < batch; ++b) {
        // Every step rewrites position `context`: the KV read per step stays `context` + 1.
        step[b] = engine::SequenceStep{absl::MakeConstSpan(next).subspan(b, 1),
                                       static_cast<int32_t>(context), pages[b], true};
      }
      logits.clear();
      const auto t = Clock::now();
      absl::Status status = m.Forward(step, logits);
      if (!status.ok()) {
        std::fprintf(stderr, "decode failed: %s\n", status.ToString().c_str());
        return 1;
      }
      if (i >= 3) times.push_back(Seconds(t, Clock::now()));
    }
    std::sort(times.begin(), times.end());
    const double med = times[times.size() / 2];
    std::printf("| decode step | context %ld | %ld | %.2f ms | %.0f tok/s |\n", context, batch,
                med * 1e3, batch / med);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace sieve

int main(int argc, char** argv) {
  sieve::Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--model") a.model = v;
    else if (k == "--backend") a.backend = v;
    else if (k == "--chunk") (void)absl::SimpleAtoi(v, &a.chunk);
    else if (k == "--steps") (void)absl::SimpleAtoi(v, &a.steps);
    else if (k == "--page-size") (void)absl::SimpleAtoi(v, &a.page_size);
    else if (k == "--prefill") {
      a.prefill.clear();
      for (absl::string_view p : absl::StrSplit(v, ',', absl::SkipEmpty())) {
        int64_t n;
        if (absl::SimpleAtoi(p, &n)) a.prefill.push_back(n);
      }
    } else if (k == "--decode") {
      for (absl::string_view p : absl::StrSplit(v, ',', absl::SkipEmpty())) {
        std::pair<absl::string_view, absl::string_view> bc = absl::StrSplit(p, ':');
        int64_t b, c;
        if (absl::SimpleAtoi(bc.first, &b) && absl::SimpleAtoi(bc.second, &c)) a.decode.push_back({b, c});
      }
    } else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  return sieve::Run(a);
}
