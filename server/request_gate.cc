#include "server/request_gate.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace sieve::server {

void RequestGate::SetEngine(engine::Engine* engine) {
  const engine::ModelInfo info = engine->model_info();
  RequestLimits limits;
  limits.vocab_size = static_cast<int32_t>(engine->model_config().vocab_size);
  const int64_t kv_tokens = int64_t{info.kv_pages} * info.page_size;
  limits.context_tokens = static_cast<int32_t>(
      info.context_tokens > 0 ? std::min<int64_t>(info.context_tokens, kv_tokens) : kv_tokens);
  // ModelInfo's context is already the smaller of the model's and the KV pool's: say which.
  const int64_t model_context = engine->model_config().max_position_embeddings;
  if (limits.context_tokens == kv_tokens && (model_context <= 0 || kv_tokens < model_context)) {
    limits.context_limited_by = absl::StrCat(
        "the KV cache: kv_cache.num_pages ", info.kv_pages, " x kv_cache.page_size_tokens ",
        info.page_size, "; the model's context is ", model_context, " tokens");
  }
  limits.default_max_tokens = options_.default_max_tokens;
  limits.max_stop_strings = std::min(options_.max_stop_strings, engine::kMaxStopStrings);
  limits_ = limits;
  engine_.store(engine, std::memory_order_release);
}

absl::StatusOr<engine::Engine*> RequestGate::Available() const {
  if (draining_.load()) {
    return absl::UnavailableError("the server is draining (shutting down); retry elsewhere");
  }
  engine::Engine* engine = engine_.load(std::memory_order_acquire);
  if (engine == nullptr) {
    return absl::UnavailableError("the model is still loading; retry shortly");
  }
  return engine;
}

absl::Status RequestGate::CheckModel(const std::string& name) const {
  if (name.empty() || name == options_.model_name) return absl::OkStatus();
  return absl::NotFoundError(absl::StrCat("unknown model '", name, "'; this server serves '",
                                          options_.model_name, "'"));
}

absl::StatusOr<engine::RequestSpec> RequestGate::Prepare(const v1::GenerateRequest& request,
                                                         const engine::Engine& engine) const {
  return ToRequestSpec(request, engine.tokenizer(), limits_);
}

std::shared_ptr<TransferCancellation> RequestGate::Submit(engine::Engine& engine,
                                                          engine::RequestSpec spec,
                                                          absl::Time deadline, Submitted done) {
  RemotePrefill* remote = options_.remote_prefill;
  if (remote != nullptr && remote->Wants(spec.prompt.size())) {
    // Prefill elsewhere first; the request is submitted when the KV is here (or must not be).
    auto prepared = std::make_shared<engine::RequestSpec>(std::move(spec));
    engine::Engine* target = &engine;
    return remote->Start(prepared->prompt, deadline,
                         [target, prepared, done = std::move(done)](absl::Status placed,
                                                                    double transfer_s) {
                           // The transfer phase counts in the request's timings (TTFT).
                           prepared->kv_transfer_s = transfer_s;
                           absl::StatusOr<engine::RequestId> id =
                               placed.ok() ? target->Submit(std::move(*prepared))
                                           : absl::StatusOr<engine::RequestId>(placed);
                           done(std::move(id), transfer_s);
                         });
  }
  if (remote != nullptr) remote->CountLocal();
  done(engine.Submit(std::move(spec)), 0);
  return nullptr;
}

}  // namespace sieve::server
