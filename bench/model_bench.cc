// The model forward pass at real shapes: prefill tokens/s and time per decode step, on any
// backend, with seeded random weights (configs/models/*). Run on the GPU machine next to
// bench/model_baseline.py (transformers with SDPA, same shapes, same run).
//
//   model_bench --model configs/models/llama-3.1-8b --backend cuda
//       --prefill 8192,32768 --decode 1:32768,1:131072,32:4096 --copy-bandwidth 1
//
// Prefill: one sequence of N tokens in chunks of --chunk tokens (the last chunk asks for logits,
// which waits for the device); reports seconds and tokens/s. Decode: B sequences whose KV holds
// C tokens (filled by a prefill first), then timed single-token steps over the batch; reports
// the median step time of --steps steps, with CUDA graphs off and on (--graphs both|on|off, or a
// list such as off,on,off,on). --decode-method dense,quest times each decode attention method
// with its own worker (--budget tokens, --dense-layers; sparse from any context length) and
// reports the fraction of the KV each step read; "quest/kv" and "double_sparsity/kv" select one
// set per KV head (attention.decode.<method>.per_kv_head) instead of one per query head.
// --sample none|host|device|both (or a list) adds sampling to each timed decode step, with
// temperature 0.8, top-p 0.95 and the chosen token's logprob: "host" copies the fp32 logits to the
// host and runs SampleToken per row (the engine's path before device sampling), "device" runs
// ModelWorker::ForwardSample (Backend::Sample; only ids and logprobs come back); "none" times the
// forward pass with the logits copied to the host and not sampled.
// --threads N sets the cpu backend's host threads (default 0 = all hardware threads);
// --kv-dtype bfloat16 keeps the cpu backend's KV cache in bfloat16 (kv_cache.dtype).
// --kv-layout auto|token|head orders the cpu backend's KV page rows (paged_attention.h KvLayout);
// auto, the default, is what the engine picks: head-major when a sparse method is timed, else by
// the model's shape (ModelRunnerOptions::kv_layout).
// --quest-bounds float32 keeps the cpu backend's Quest page bounds in fp32 (the backend's default
// is bfloat16, half the bytes, rounded outward on an fp32 cache; this compares the two in one
// binary).
// On a CUDA build, --copy-bandwidth 1 first measures a device-to-device copy (bytes read plus
// written per second), the bandwidth floor of a decode step.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "engine/backends/backend.h"
#include "engine/backends/cpu_backend.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine_config.h"
#include "engine/sampling/sampling.h"
#ifdef SIEVE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

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
  std::string graphs = "both";  // decode with CUDA graphs: "on", "off", "both" or a list
  int copy_bandwidth = 0;       // 1: measure device-to-device copy bandwidth first (CUDA)
  std::string sample = "none";  // sampling in decode steps: none, host, device, both or a list
  // Decode attention methods to time, each with its own worker and policy (dense, quest).
  std::string decode_method = "dense";
  int budget = 4096;      // attention.decode.token_budget for the sparse methods
  int dense_layers = 2;   // attention.decode.dense_layers
  int threads = 0;        // cpu backend threads (0 = all)
  std::string kv_dtype;   // cpu backend KV cache: float32 (default) or bfloat16
  // cpu backend Quest page bounds: empty (the backend's choice: bfloat16, on either cache),
  // float32 or bfloat16.
  std::string quest_bounds;
  std::string kv_layout = "auto";  // cpu KV page rows: auto (head with a sparse method), token, head
};

// Device-to-device copy bandwidth in bytes (read + written) per second: the median of 20 copies
// of 4 GiB between two random-filled buffers; 0 where unavailable.
double CopyBandwidth() {
#ifdef SIEVE_HAVE_CUDA
  const size_t bytes = size_t{4} << 30;
  void *a = nullptr, *b = nullptr;
  if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) {
    cudaFree(a);
    return 0;
  }
  std::vector<uint32_t> host(size_t{1} << 24);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<uint32_t>(i * 2654435761u);
  for (size_t off = 0; off < bytes; off += host.size() * 4) {
    cudaMemcpy(static_cast<char*>(a) + off, host.data(), host.size() * 4, cudaMemcpyHostToDevice);
  }
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<double> t;
  for (int i = 0; i < 23; ++i) {
    cudaEventRecord(e0);
    cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    if (i >= 3) t.push_back(ms * 1e-3);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  if (cudaGetLastError() != cudaSuccess) return 0;
  std::sort(t.begin(), t.end());
  return 2.0 * bytes / t[t.size() / 2];
#else
  return 0;
#endif
}

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

// Times `steps` single-token steps (after 3 warm-ups) of `batch` sequences of `context` cached
// tokens; every step rewrites position `context`, so the KV read per step stays context + 1.
// `sample`: "none", "host" or "device" (see the top of the file).
bool DecodeSteps(engine::ModelRunner& m, engine::ModelWorker& w, int64_t batch, int64_t context,
                 int steps,
                 const std::vector<std::vector<int32_t>>& pages, const std::string& sample,
                 double* median) {
  std::vector<int32_t> next(batch, 42);
  std::vector<engine::SequenceStep> step(batch);
  std::vector<double> times;
  std::vector<float> logits;
  std::vector<absl::StatusOr<engine::SampledToken>> sampled;
  engine::SamplingParams params;
  params.temperature = 0.8f;
  params.top_p = 0.95f;
  params.return_logprob = true;
  const engine::TokenHistory history;
  engine::SamplerRng rng(7);
  const int64_t vocab = m.config().vocab_size;
  for (int i = 0; i < steps + 3; ++i) {
    for (int64_t b = 0; b < batch; ++b) {
      step[b] = engine::SequenceStep{absl::MakeConstSpan(next).subspan(b, 1),
                                     static_cast<int32_t>(context), pages[b], true};
      step[b].sampling = &params;
      step[b].history = &history;
      step[b].uniform = rng.NextUniform();
    }
    logits.clear();
    sampled.clear();
    const auto t = Clock::now();
    absl::Status status;
    if (sample == "device") {
      status = w.ForwardSample(step, sampled);
    } else {
      status = w.Forward(step, logits);
      for (int64_t b = 0; status.ok() && sample == "host" && b < batch; ++b) {
        sampled.push_back(engine::SampleTokenWithUniform(
            absl::MakeSpan(logits).subspan(b * vocab, vocab), params, history, step[b].uniform));
      }
    }
    for (const auto& token : sampled) {
      if (status.ok() && !token.ok()) status = token.status();
    }
    if (!status.ok()) {
      std::fprintf(stderr, "decode failed: %s\n", status.ToString().c_str());
      return false;
    }
    if (i >= 3) times.push_back(Seconds(t, Clock::now()));
  }
  std::sort(times.begin(), times.end());
  *median = times[times.size() / 2];
  return true;
}

int Run(const Args& a) {
  if (a.copy_bandwidth) {
    std::printf("device-to-device copy: %.3f TB/s (bytes read + written)\n", CopyBandwidth() * 1e-12);
  }
  int64_t max_kv = 0;
  for (int64_t n : a.prefill) max_kv = std::max(max_kv, n + 1);
  for (auto [b, c] : a.decode) max_kv = std::max(max_kv, b * (c + a.page_size + 1));
  engine::ModelRunnerOptions o = engine::RunnerOptionsFor(engine::EngineConfig());
  o.backend = a.backend;
  std::vector<std::string> methods = absl::StrSplit(a.decode_method, ',');
  bool sparse = false;
  for (const std::string& method : methods) {
    o.quest_page_bounds |= method == "quest" || method == "quest/kv";
    sparse |= method != "dense";
  }
  // As the engine picks it (RunnerOptionsFor): head-major pages with a sparse decode method, else
  // the runner's choice by the model's shape.
  if (a.kv_layout == "head" || (a.kv_layout == "auto" && sparse)) {
    o.kv_layout = kernels::KvLayout::kHeadMajor;
  } else if (a.kv_layout == "token") {
    o.kv_layout = kernels::KvLayout::kTokenMajor;
  } else if (a.kv_layout != "auto") {
    std::fprintf(stderr, "--kv-layout takes auto, token or head\n");
    return 2;
  }
  if (!a.quest_bounds.empty()) {
    if (a.backend != "cpu" || (a.quest_bounds != "float32" && a.quest_bounds != "bfloat16")) {
      std::fprintf(stderr, "--quest-bounds takes float32 or bfloat16 (the default), on the cpu "
                           "backend\n");
      return 2;
    }
    if (a.quest_bounds == "float32") {
      // The cpu backend with fp32 bounds, under a name only this program registers.
      const kernels::KvDtype kv = a.kv_dtype == "bfloat16" ? kernels::KvDtype::kBfloat16
                                                           : kernels::KvDtype::kFloat32;
      // This factory sees no model: the layout chosen above, else head-major (Quest's).
      const kernels::KvLayout layout = o.kv_layout.value_or(kernels::KvLayout::kHeadMajor);
      engine::RegisterBackend(
          "cpu-fp32-quest-bounds",
          [kv, layout](int threads) -> absl::StatusOr<std::unique_ptr<engine::Backend>> {
            return std::unique_ptr<engine::Backend>(
                new engine::CpuBackend(threads, kv, /*bf16_page_bounds=*/false, layout));
          });
      o.backend = "cpu-fp32-quest-bounds";
    }
  }
  o.weights = "random";
  o.random_seed = 1;
  o.num_threads = a.threads;
  o.kv_dtype = a.kv_dtype;
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
  if (o.quest_page_bounds) {
    const auto* cpu = dynamic_cast<const engine::CpuBackend*>(&m.backend());
    std::printf("Quest page bounds: %s, %ld bytes per KV page\n",
                cpu == nullptr ? "the backend's" : cpu->page_bounds_bf16() ? "bfloat16" : "float32",
                static_cast<long>(m.side_data_bytes_per_page()));
  }
  std::printf("model %s on %s: loaded random weights in %.1f s; KV pages %d x %d tokens\n",
              a.model.c_str(), a.backend.c_str(), Seconds(t0, Clock::now()), o.num_pages,
              o.page_size);
  std::vector<std::vector<int32_t>> pages;
  double s = 0;
  Prefill(m, 1, 512, a.chunk, pages, &s);  // warm-up
  std::printf("\n| phase | tokens | batch | time | rate | CUDA graphs |\n|---|---|---|---|---|---|\n");
  for (int64_t n : a.prefill) {
    double best = 1e30;
    for (int rep = 0; rep < 2; ++rep) {
      if (!Prefill(m, 1, n, a.chunk, pages, &s)) return 1;
      best = std::min(best, s);
    }
    std::printf("| prefill | %ld | 1 | %.3f s | %.0f tok/s | |\n", n, best, n / best);
    std::fflush(stdout);
  }
  // --graphs both = off,on; a list (off,on,off,on) repeats modes to show the spread.
  std::vector<bool> modes;
  for (absl::string_view g : absl::StrSplit(a.graphs == "both" ? "off,on" : a.graphs, ',')) {
    if (g != "on" && g != "off") {
      std::fprintf(stderr, "--graphs takes on, off, both or a list of on/off\n");
      return 2;
    }
    modes.push_back(g == "on");
  }
  std::vector<std::string> samples;
  for (absl::string_view x : absl::StrSplit(a.sample == "both" ? "host,device" : a.sample, ',')) {
    if (x != "none" && x != "host" && x != "device") {
      std::fprintf(stderr, "--sample takes none, host, device, both or a list of them\n");
      return 2;
    }
    samples.emplace_back(x);
  }
  // One worker per decode method (the default worker's policy is dense).
  engine::AttentionConfig attention;
  attention.decode.sparse_min_tokens = 0;
  attention.decode.token_budget = a.budget;
  attention.decode.dense_layers = a.dense_layers;
  const engine::AttentionModelShape shape{.page_size = a.page_size};
  std::vector<std::unique_ptr<engine::ModelWorker>> workers;
  for (const std::string& method : methods) {
    // "quest/kv", "double_sparsity/kv": one selection per KV head (per_kv_head).
    const bool per_kv_head = absl::EndsWith(method, "/kv");
    attention.decode.method = per_kv_head ? method.substr(0, method.size() - 3) : method;
    attention.decode.quest.per_kv_head = per_kv_head;
    attention.decode.double_sparsity.per_kv_head = per_kv_head;
    auto policy = engine::MakeAttentionPolicy(attention, engine::AttentionPhase::kDecode, shape);
    if (!policy.ok()) {
      std::fprintf(stderr, "%s\n", policy.status().ToString().c_str());
      return 2;
    }
    auto w = m.CreateWorker({}, std::move(*policy));
    if (!w.ok()) return 1;
    workers.push_back(std::move(*w));
  }
  for (auto [batch, context] : a.decode) {
    if (!Prefill(m, batch, context, a.chunk, pages, &s)) return 1;
    for (size_t mi = 0; mi < methods.size(); ++mi) {
      engine::ModelWorker& w = *workers[mi];
      for (bool graphs : modes) {
        w.SetStepGraphs(graphs);
        for (const std::string& sample : samples) {
          const engine::StepGraphStats before = w.graph_stats();
          w.TakeDecodeStats();
          double med = 0;
          if (!DecodeSteps(m, w, batch, context, a.steps, pages, sample, &med)) return 1;
          const engine::StepGraphStats after = w.graph_stats();
          const engine::DecodeAttentionStats ds = w.TakeDecodeStats();
          std::printf("| decode step %s | context %ld | %ld | %.2f ms | %.0f tok/s | graphs %s: "
                      "%ld recorded (%.1f ms), %ld replayed; sampling %s; KV read %.3f |\n",
                      methods[mi].c_str(), context, batch, med * 1e3, batch / med,
                      graphs ? "on" : "off", after.recorded_steps - before.recorded_steps,
                      (after.record_seconds - before.record_seconds) * 1e3,
                      after.replayed_steps - before.replayed_steps, sample.c_str(),
                      ds.dense_pairs > 0 ? static_cast<double>(ds.read_pairs) / ds.dense_pairs
                                         : 1.0);
          std::fflush(stdout);
        }
      }
    }
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
    else if (k == "--graphs") a.graphs = v;
    else if (k == "--sample") a.sample = v;
    else if (k == "--decode-method") a.decode_method = v;
    else if (k == "--budget") (void)absl::SimpleAtoi(v, &a.budget);
    else if (k == "--dense-layers") (void)absl::SimpleAtoi(v, &a.dense_layers);
    else if (k == "--threads") (void)absl::SimpleAtoi(v, &a.threads);
    else if (k == "--kv-dtype") a.kv_dtype = v;
    else if (k == "--quest-bounds") a.quest_bounds = v;
    else if (k == "--kv-layout") a.kv_layout = v;
    else if (k == "--copy-bandwidth") (void)absl::SimpleAtoi(v, &a.copy_bandwidth);
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
