// Engine: creation and the public methods, which any thread may call. The scheduler thread's
// side is in engine_loop.cc; engine/README.md describes the threading model.
#include "engine/serving/engine.h"

#include <algorithm>
#include <future>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/serving/ds_startup.h"
#include "engine/serving/engine_impl.h"
#include "engine/serving/thread_name.h"
#include "engine/status_macros.h"

namespace sieve::engine {
namespace {

// config.json's EOS ids, then the tokenizer's, without repeats: what every request stops on.
std::vector<int32_t> EosIds(const ModelConfig& model, const Tokenizer& tokenizer) {
  std::vector<int32_t> ids;
  for (int64_t id : model.eos_token_ids) ids.push_back(static_cast<int32_t>(id));
  for (int32_t id : tokenizer.eos_ids()) {
    if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
  }
  return ids;
}

}  // namespace

Engine::Impl::~Impl() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  watchdog_wake_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  if (thread_.joinable()) thread_.join();
  // Every request ended on the scheduler thread; the output threads deliver what is left.
  output_.reset();
  // Workers next (their step functions use the model workers), then the rest.
  pools_[0].reset();
  pools_[1].reset();
  model_workers_.clear();
}

absl::Status Engine::Impl::Init(const EngineConfig& config, EngineObserver* observer) {
  config_ = config;
  observer_ = observer;
  SIEVE_RETURN_IF_ERROR(config.Validate());
  // 0: the backend's break-even density (shown resolved in model_info().attention_policy).
  if (config_.attention.prefill.max_density == 0) {
    config_.attention.prefill.max_density = AutoPrefillMaxDensity(config.model.backend, config.attention.prefill.method);
  }
  const ServedModelConfig& model = config.model;
  SIEVE_ASSIGN_OR_RETURN(tokenizer_, Tokenizer::FromDirectory(model.tokenizer_directory.empty()
                                                                  ? model.directory
                                                                  : model.tokenizer_directory));
  if (!model.chat_template_file.empty()) {
    const std::string& dir =
        model.tokenizer_directory.empty() ? model.directory : model.tokenizer_directory;
    absl::StatusOr<std::unique_ptr<ChatTemplate>> chat =
        LoadChatTemplate(dir, model.chat_template_file);
    if (!chat.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.chat_template_file: ", chat.status().message()));
    }
    tokenizer_->SetChatTemplate(std::move(chat));
  }
  ModelRunnerOptions runner_options = RunnerOptionsFor(config);
  if (observer != nullptr) {
    runner_options.on_load_progress = [observer](const WeightLoadProgress& p) {
      return observer->OnLoadProgress(p);
    };
  }
  SIEVE_ASSIGN_OR_RETURN(runner_, ModelRunner::Load(model.directory, runner_options));
  scheduler_options_ = SchedulerOptionsFor(config, runner_->options().num_pages);
  if (config.attention.decode.method == "double_sparsity") {
    SIEVE_ASSIGN_OR_RETURN(DsCalibration calibration,
                           DoubleSparsityCalibrationFor(config, *runner_, *tokenizer_));
    SIEVE_RETURN_IF_ERROR(runner_->SetDsCalibration(calibration));
    const int32_t layers = static_cast<int32_t>(runner_->config().num_hidden_layers);
    const int64_t bytes = runner_->side_data_bytes_per_page();
    scheduler_options_.side_pools.push_back({"double_sparsity_labels", bytes / layers, layers});
  }
  if (runner_->options().quest_page_bounds) {
    const int32_t layers = static_cast<int32_t>(runner_->config().num_hidden_layers);
    const int64_t bytes = runner_->side_data_bytes_per_page();
    scheduler_options_.side_pools.push_back({"quest_page_bounds", bytes / layers, layers});
  }
  SIEVE_RETURN_IF_ERROR(scheduler_options_.Validate());
  const ModelConfig& mc = runner_->config();
  vocab_size_ = static_cast<int32_t>(mc.vocab_size);
  if (model.max_context_tokens > 0 && mc.max_position_embeddings > 0 &&
      model.max_context_tokens > mc.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.max_context_tokens (", model.max_context_tokens,
        ") exceeds the model's max_position_embeddings (", mc.max_position_embeddings, ")"));
  }
  context_limit_ = model.max_context_tokens > 0     ? model.max_context_tokens
                   : mc.max_position_embeddings > 0 ? mc.max_position_embeddings
                                                    : std::numeric_limits<int64_t>::max();
  eos_ids_ = EosIds(mc, *tokenizer_);

  // One ModelWorker per pool thread, created before any thread runs.
  std::vector<StepFunction> steps[2];
  const int32_t counts[2] = {config.pools.prefill_workers, config.pools.decode_workers};
  const StreamPriority decode_priority =
      config.pools.decode_priority == "normal" ? StreamPriority::kNormal : StreamPriority::kHigh;
  const StreamOptions stream_options[2] = {{.priority = StreamPriority::kNormal},
                                           {.priority = decode_priority}};
  // Each worker plans its attention with its own policy of its pool's method.
  const AttentionPhase phases[2] = {AttentionPhase::kPrefill, AttentionPhase::kDecode};
  const AttentionModelShape model_shape{.num_layers = static_cast<int32_t>(mc.num_hidden_layers),
                                        .num_q_heads = static_cast<int32_t>(mc.num_attention_heads),
                                        .page_size = config.kv_cache.page_size_tokens};
  for (int pool = 0; pool < 2; ++pool) {
    for (int32_t i = 0; i < counts[pool]; ++i) {
      SIEVE_ASSIGN_OR_RETURN(std::unique_ptr<AttentionPolicy> policy,
                             MakeAttentionPolicy(config_.attention, phases[pool], model_shape));
      SIEVE_ASSIGN_OR_RETURN(std::unique_ptr<ModelWorker> worker,
                             runner_->CreateWorker(stream_options[pool], std::move(policy)));
      ModelWorker* raw = worker.get();
      model_workers_.push_back(std::move(worker));
      EngineObserver* decode_observer = pool == 1 ? observer : nullptr;
      steps[pool].push_back(
          [raw, decode_observer](absl::Span<const SequenceStep> batch,
                                 std::vector<absl::StatusOr<SampledToken>>& sampled) {
            absl::Status st = raw->ForwardSample(batch, sampled);
            const DecodeAttentionStats a = raw->TakeDecodeStats();
            if (decode_observer != nullptr && st.ok() && a.dense_pairs > 0) {
              decode_observer->OnDecodeAttention(
                  static_cast<double>(a.read_pairs) / static_cast<double>(a.dense_pairs),
                  a.selection_seconds);
            }
            return st;
          });
    }
  }
  scheduler_ = std::make_unique<Scheduler>(scheduler_options_);
  OutputPool::Callbacks output_callbacks;
  output_callbacks.stop = [this](RequestId id, int32_t) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) return;  // the scheduler thread ends every request anyway
      output_stops_.push_back(id);
    }
    wake_.notify_one();
  };
  output_callbacks.delivered = [this] {
    std::lock_guard<std::mutex> lock(mu_);
    if (--live_ == 0) idle_.notify_all();
  };
  output_ = std::make_unique<OutputPool>(config.pools.output_workers, observer,
                                         std::move(output_callbacks));
  load_.kv_pages_free = scheduler_options_.num_pages;
  auto done = [this](std::unique_ptr<WorkerJob> job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_.push_back(std::move(job));
    }
    wake_.notify_one();
  };
  pools_[0] = std::make_unique<WorkerPool>(Pool::kPrefill, std::move(steps[0]), done);
  pools_[1] = std::make_unique<WorkerPool>(Pool::kDecode, std::move(steps[1]), done);
  thread_ = std::thread([this] { Loop(); });
  if (config.pools.step_timeout_s > 0) watchdog_ = std::thread([this] { WatchdogLoop(); });
  return absl::OkStatus();
}

void Engine::Impl::Reject(RejectReason reason) const {
  if (observer_ != nullptr) observer_->OnRejected(reason);
}

absl::Status Engine::Impl::Validate(const RequestSpec& spec) const {
  if (spec.sink == nullptr) return absl::InvalidArgumentError("request has no sink");
  if (spec.prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  for (size_t i = 0; i < spec.prompt.size(); ++i) {
    if (spec.prompt[i] < 0 || spec.prompt[i] >= vocab_size_) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token ", i, " has id ", spec.prompt[i],
                                                     " outside the vocabulary [0, ", vocab_size_,
                                                     ")"));
    }
  }
  SIEVE_RETURN_IF_ERROR(spec.sampling.Validate());
  SIEVE_RETURN_IF_ERROR(spec.stop.Validate(vocab_size_));
  const int64_t total = static_cast<int64_t>(spec.prompt.size()) + spec.stop.max_tokens;
  if (total > context_limit_) {
    return absl::OutOfRangeError(absl::StrCat(
        "prompt (", spec.prompt.size(), " tokens) + max_tokens (", spec.stop.max_tokens,
        ") = ", total, " exceeds the context limit of ", context_limit_, " tokens"));
  }
  const int64_t pool = int64_t{scheduler_options_.num_pages} * scheduler_options_.page_size;
  if (total > pool) {
    return absl::OutOfRangeError(absl::StrCat(
        "prompt (", spec.prompt.size(), " tokens) + max_tokens (", spec.stop.max_tokens,
        ") = ", total, " exceeds the KV cache of ", pool,
        " tokens (the limit comes from the KV cache: kv_cache.num_pages ",
        scheduler_options_.num_pages, " x kv_cache.page_size_tokens ",
        scheduler_options_.page_size, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<RequestId> Engine::Impl::Submit(RequestSpec spec) {
  absl::Status lost;  // copied under mu_
  const auto unavailable = [this, &lost] {
    Reject(RejectReason::kDraining);
    if (!lost.ok()) {
      return absl::UnavailableError(
          absl::StrCat("the engine stopped serving: ", lost.message()));
    }
    return absl::UnavailableError("the engine is draining or stopped");
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    lost = device_lost_;
    if (stop_ || draining_ || !lost.ok()) return unavailable();
  }
  if (absl::Status st = Validate(spec); !st.ok()) {
    Reject(RejectReason::kInvalid);
    return st;
  }
  const uint64_t seed =
      spec.sampling.seed.has_value() ? *spec.sampling.seed : NondeterministicSeed();
  const std::optional<absl::Time> deadline = spec.deadline;
  auto r = std::make_unique<ActiveRequest>(std::move(spec), eos_ids_, *tokenizer_, seed);
  r->prompt_tokens = static_cast<int32_t>(r->spec.prompt.size());
  r->spec.sink.reset();  // only the output side (r->output) calls the sink
  r->history.AddPrompt(r->spec.prompt);
  if (r->spec.export_prompt_kv) r->export_tokens = r->spec.prompt;
  r->arrival = EngineClock::now();
  if (deadline.has_value()) {
    // A monotonic deadline; one beyond a year counts as none.
    const absl::Duration left = std::max(*deadline - absl::Now(), absl::ZeroDuration());
    if (left < absl::Hours(24 * 365)) {
      r->deadline = r->arrival + std::chrono::duration_cast<EngineClock::duration>(
                                     absl::ToChronoNanoseconds(left));
    }
  }
  const SchedulerConfig& limits = config_.scheduler;
  RequestId id = 0;
  bool closed = false;
  std::string full;  // why the queue is full, if it is
  {
    std::lock_guard<std::mutex> lock(mu_);
    lost = device_lost_;
    if (stop_ || draining_ || !lost.ok()) {
      closed = true;
    } else if (queued_requests_ >= limits.max_queued_requests) {
      full =
          absl::StrCat(queued_requests_, " requests wait (limit ", limits.max_queued_requests, ")");
    } else if (queued_tokens_ + r->prompt_tokens > limits.max_queued_tokens) {
      full = absl::StrCat(queued_tokens_, " prompt tokens wait and this one has ", r->prompt_tokens,
                          " (limit ", limits.max_queued_tokens, ")");
    } else {
      id = next_id_++;
      r->id = id;
      r->output->id = id;
      ++queued_requests_;
      queued_tokens_ += r->prompt_tokens;
      ++live_;
      incoming_.push_back(std::move(r));
    }
  }
  if (closed) return unavailable();
  if (!full.empty()) {
    Reject(RejectReason::kQueueFull);
    return absl::ResourceExhaustedError(absl::StrCat("the queue is full: ", full));
  }
  wake_.notify_one();
  return id;
}

void Engine::Impl::Cancel(RequestId id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return;
    cancels_.push_back(id);
  }
  wake_.notify_one();
}

void Engine::Impl::StartDraining() {
  std::lock_guard<std::mutex> lock(mu_);
  draining_ = true;
}

bool Engine::Impl::WaitIdle(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return idle_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [this] { return live_ == 0; });
}

bool Engine::Impl::MarkFailed(const absl::Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!device_lost_.ok()) return false;
  device_lost_ = status;
  return true;
}

absl::Status Engine::Impl::FindStall(int64_t now_ns) const {
  const double timeout_s = config_.pools.step_timeout_s;
  const int64_t timeout_ns = static_cast<int64_t>(timeout_s * 1e9);
  const int64_t iteration = iteration_since_ns_.load();
  if (iteration != 0 && now_ns - iteration > timeout_ns) {
    return DeviceLostError(absl::StrCat(
        "the engine stalled: its scheduler thread has been in one iteration for more than ",
        timeout_s, " s (pools.step_timeout_s); a sink or the engine hangs"));
  }
  const int64_t output = output_->BusySinceNs();
  if (output != 0 && now_ns - output > timeout_ns) {
    return DeviceLostError(absl::StrCat(
        "the engine stalled: an output thread has been delivering one batch for more than ",
        timeout_s, " s (pools.step_timeout_s); a request sink blocks"));
  }
  return absl::OkStatus();
}

void Engine::Impl::WatchdogLoop() {
  NameThisThread("sieve-watchdog");
  const double timeout_s = config_.pools.step_timeout_s;
  // Check a few times per timeout, at most once a second.
  const auto period = std::chrono::duration_cast<EngineClock::duration>(
      std::chrono::duration<double>(std::min(1.0, timeout_s / 4)));
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    watchdog_wake_.wait_for(lock, period, [this] { return stop_; });
    if (stop_ || !device_lost_.ok()) continue;
    lock.unlock();
    const absl::Status stall = FindStall(EngineClock::now().time_since_epoch().count());
    // The scheduler thread may be the one that hangs: report from here. If it comes back, it
    // fails every request (Loop takes the failure from device_lost_).
    if (!stall.ok() && MarkFailed(stall)) {
      if (observer_ != nullptr) observer_->OnDeviceLost(stall);
      wake_.notify_one();
    }
    lock.lock();
  }
}

absl::Status Engine::Impl::health() const {
  std::lock_guard<std::mutex> lock(mu_);
  return device_lost_;
}

EngineLoad Engine::Impl::load() const {
  std::lock_guard<std::mutex> lock(mu_);
  return load_;
}

SchedulerThreadProfile Engine::Impl::scheduler_profile() const {
  std::lock_guard<std::mutex> lock(mu_);
  return profile_shared_;
}

ModelInfo Engine::Impl::model_info() const {
  const ModelConfig& mc = runner_->config();
  ModelInfo info;
  info.name = config_.model.name;
  info.architecture = std::string(ArchitectureName(mc.architecture));
  info.backend = std::string(runner_->backend_name());
  info.dtype = std::string(BackendDtype(info.backend));
  const int64_t pool = int64_t{scheduler_options_.num_pages} * scheduler_options_.page_size;
  info.context_tokens = static_cast<int32_t>(
      std::min<int64_t>({context_limit_, pool, std::numeric_limits<int32_t>::max()}));
  info.vocab_size = vocab_size_;
  info.num_layers = static_cast<int32_t>(mc.num_hidden_layers);
  info.num_q_heads = static_cast<int32_t>(mc.num_attention_heads);
  info.num_kv_heads = static_cast<int32_t>(mc.num_key_value_heads);
  info.head_dim = static_cast<int32_t>(mc.head_dim);
  info.attention_policy = config_.attention.Describe();
  info.eos_token_ids = eos_ids_;
  info.kv_pages = scheduler_options_.num_pages;
  info.page_size = scheduler_options_.page_size;
  info.kv_page_bytes = runner_->kv_page_bytes();
  return info;
}

absl::Status Engine::Impl::RunOnSchedulerThread(KvOp op) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return absl::UnavailableError("the engine is stopped");
    kv_ops_.push_back(std::move(op));
  }
  wake_.notify_one();
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineConfig& config,
                                                       EngineObserver* observer) {
  auto impl = std::make_unique<Impl>();
  SIEVE_RETURN_IF_ERROR(impl->Init(config, observer));
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

absl::StatusOr<RequestId> Engine::Submit(RequestSpec spec) {
  return impl_->Submit(std::move(spec));
}
void Engine::Cancel(RequestId id) { impl_->Cancel(id); }
void Engine::StartDraining() { impl_->StartDraining(); }
bool Engine::WaitIdle(absl::Duration timeout) { return impl_->WaitIdle(timeout); }
absl::StatusOr<KvImport> Engine::BeginKvImport(std::vector<int32_t> tokens) {
  std::promise<absl::StatusOr<KvImport>> result;
  std::future<absl::StatusOr<KvImport>> done = result.get_future();
  // The op always runs once queued (RunOnSchedulerThread), so the references stay valid.
  SIEVE_RETURN_IF_ERROR(impl_->RunOnSchedulerThread(
      [&tokens, &result](KvCacheManager& kv) { result.set_value(kv.BeginImport(tokens)); }));
  return done.get();
}

absl::Status Engine::CommitKvImport(int64_t id) {
  return impl_->RunOnSchedulerThread(
      [id](KvCacheManager& kv) { (void)kv.CommitImport(id); });
}

absl::Status Engine::AbortKvImport(int64_t id) {
  return impl_->RunOnSchedulerThread(
      [id](KvCacheManager& kv) { (void)kv.AbortImport(id); });
}

absl::Status Engine::EndKvExport(int64_t id) {
  return impl_->RunOnSchedulerThread(
      [id](KvCacheManager& kv) { (void)kv.EndExport(id); });
}

absl::Status Engine::ReadKvPages(absl::Span<const int32_t> pages, absl::Span<uint8_t> out) const {
  return impl_->runner_->ReadKvPages(pages, out);
}

absl::Status Engine::WriteKvPages(absl::Span<const int32_t> pages,
                                  absl::Span<const uint8_t> data) {
  return impl_->runner_->WriteKvPages(pages, data);
}

const Tokenizer& Engine::tokenizer() const { return *impl_->tokenizer_; }
const ModelConfig& Engine::model_config() const { return impl_->runner_->config(); }
ModelInfo Engine::model_info() const { return impl_->model_info(); }
EngineLoad Engine::load() const { return impl_->load(); }
SchedulerThreadProfile Engine::scheduler_profile() const { return impl_->scheduler_profile(); }
absl::Status Engine::health() const { return impl_->health(); }

}  // namespace sieve::engine
