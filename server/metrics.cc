#include "server/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"

namespace sieve::server {
namespace {

// The `route` values of the HTTP metrics: server/http_server.h's kHttpRoutes and "other".
constexpr std::array<std::string_view, 5> kHttpRouteLabels = {
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "other"};
// The HTTP statuses the API answers with, each its own `code` value; any other is "other".
constexpr std::array<int, 13> kHttpCodes = {200, 400, 401, 403, 404, 408, 413,
                                            429, 431, 500, 501, 503, 504};

constexpr std::array<std::string_view, 17> kGrpcCodeNames = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

// Label values of sieve_requests_total, indexed by engine::FinishReason.
constexpr std::array<const char*, 6> kOutcomeNames = {"error",     "length", "stop", "eos",
                                                      "cancelled", "error"};
// Label values of sieve_rejections_total, indexed by engine::RejectReason.
constexpr std::array<const char*, 3> kRejectNames = {"queue_full", "invalid", "draining"};

// A `method` label value is accepted when it is a short identifier-like string.
bool IsPlainMethodName(std::string_view method) {
  if (method.empty() || method.size() > 64) return false;
  for (char c : method) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '.' && c != '/') {
      return false;
    }
  }
  return true;
}

// Turns "host:port" into civetweb's "ip:port", checking it. "localhost" becomes 127.0.0.1.
absl::StatusOr<std::string> CivetListenAddress(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics listen address \"", address, "\" is not host:port"));
  }
  std::string host = address.substr(0, colon);
  const std::string port_text = address.substr(colon + 1);
  int port = -1;
  if (!absl::SimpleAtoi(port_text, &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("metrics listen address \"", address,
                                                   "\": port must be a number in 0..65535"));
  }
  if (host == "localhost") host = "127.0.0.1";
  // civetweb binds IPv4 literals only (this build has no IPv6 listener).
  int dots = 0;
  bool ok = !host.empty();
  for (char c : host) {
    if (c == '.') {
      ++dots;
    } else if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) {
      ok = false;
    }
  }
  if (!ok || dots != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics listen address \"", address,
                     "\": host must be an IPv4 address (e.g. 0.0.0.0) or localhost"));
  }
  return absl::StrCat(host, ":", port);
}

// Opens and closes a TCP connection to ip:port (an IPv4 literal), ignoring failure.
void Poke(const std::string& ip, int port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, ip.c_str(), &addr.sin_addr) != 1) return;
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  close(fd);
}

}  // namespace

std::string_view GrpcStatusCodeName(int code) {
  if (code < 0 || code >= static_cast<int>(kGrpcCodeNames.size())) return "UNKNOWN";
  return kGrpcCodeNames[code];
}

const std::vector<double>& LatencyBucketsSeconds() {
  static const std::vector<double>* const kBuckets = [] {
    auto* b = new std::vector<double>;
    for (double decade = 0.001; decade < 1000; decade *= 10) {
      for (double m : {1.0, 2.0, 5.0}) b->push_back(decade * m);
    }
    b->push_back(600.0);
    return b;
  }();
  return *kBuckets;
}

Metrics::Metrics(const std::string& model, const std::string& role)
    : registry_(std::make_shared<prometheus::Registry>()) {
  const prometheus::Labels model_label = {{"model", model}, {"role", role}};
  RegisterRequestMetrics(model_label);
  RegisterEngineMetrics(model_label);
  RegisterDisaggregationMetrics(model_label);
}

void Metrics::RegisterDisaggregationMetrics(const prometheus::Labels& model_label) {
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  auto& bytes = BuildCounter()
                    .Name("sieve_kv_transfer_bytes_total")
                    .Help("KV page bytes of finished transfers, sent or received.")
                    .Labels(model_label)
                    .Register(*registry_);
  auto& seconds = prometheus::BuildHistogram()
                      .Name("sieve_kv_transfer_seconds")
                      .Help("Seconds of one KV transfer attempt (remote prefill and pages).")
                      .Labels(model_label)
                      .Register(*registry_);
  auto& in_flight = BuildGauge()
                        .Name("sieve_kv_transfers_in_flight")
                        .Help("KV transfers in progress.")
                        .Labels(model_label)
                        .Register(*registry_);
  auto& transfers = BuildCounter()
                        .Name("sieve_kv_transfers_total")
                        .Help("Finished KV transfer attempts by outcome.")
                        .Labels(model_label)
                        .Register(*registry_);
  for (int ucx = 0; ucx < 2; ++ucx) {
    const std::string transport = ucx ? "ucx" : "grpc";
    for (int sent = 0; sent < 2; ++sent) {
      const std::string direction = sent ? "sent" : "received";
      const int i = ucx * 2 + sent;
      kv_bytes_[i] = &bytes.Add({{"direction", direction}, {"transport", transport}});
      kv_seconds_[i] = &seconds.Add({{"direction", direction}, {"transport", transport}},
                                    LatencyBucketsSeconds());
      kv_in_flight_[i] = &in_flight.Add({{"direction", direction}, {"transport", transport}});
      for (int ok = 0; ok < 2; ++ok) {
        kv_transfers_[i * 2 + ok] = &transfers.Add({{"direction", direction},
                                                    {"outcome", ok ? "ok" : "failed"},
                                                    {"transport", transport}});
      }
    }
  }
  kv_retries_ = &BuildCounter()
                     .Name("sieve_kv_transfer_retries_total")
                     .Help("Remote prefill attempts retried after a failure.")
                     .Labels(model_label)
                     .Register(*registry_)
                     .Add({});
  auto& prefills = BuildCounter()
                       .Name("sieve_prefills_total")
                       .Help("Generate requests on a decode daemon by where their prompt was "
                             "prefilled.")
                       .Labels(model_label)
                       .Register(*registry_);
  prefills_[0] = &prefills.Add({{"location", "local"}});
  prefills_[1] = &prefills.Add({{"location", "remote"}});
  prefill_reachable_ = &BuildGauge()
                            .Name("sieve_prefill_daemons_reachable")
                            .Help("1 while a decode daemon can reach a prefill daemon, else 0.")
                            .Labels(model_label)
                            .Register(*registry_)
                            .Add({});
  request_transfer_s_ =
      &prometheus::BuildHistogram()
           .Name("sieve_request_transfer_seconds")
           .Help("Seconds a request spent before the local queue having its prompt prefilled "
                 "remotely and its KV transferred (decode daemons; part of its time to first "
                 "token).")
           .Labels(model_label)
           .Register(*registry_)
           .Add({}, LatencyBucketsSeconds());
}

void Metrics::OnKvTransfer(bool sent, bool ucx, int64_t bytes, double seconds, bool ok) {
  const int d = (ucx ? 2 : 0) + (sent ? 1 : 0);
  if (bytes > 0) kv_bytes_[d]->Increment(static_cast<double>(bytes));
  kv_seconds_[d]->Observe(seconds);
  kv_transfers_[d * 2 + (ok ? 1 : 0)]->Increment();
}

void Metrics::AddKvTransfersInFlight(bool sent, bool ucx, int delta) {
  kv_in_flight_[(ucx ? 2 : 0) + (sent ? 1 : 0)]->Increment(delta);
}

void Metrics::OnKvTransferRetry() { kv_retries_->Increment(); }

void Metrics::OnPrefillPlaced(bool remote) { prefills_[remote ? 1 : 0]->Increment(); }

void Metrics::SetPrefillDaemonsReachable(bool reachable) {
  prefill_reachable_->Set(reachable ? 1 : 0);
}

void Metrics::RegisterRequestMetrics(const prometheus::Labels& model_label) {
  using prometheus::BuildCounter;
  const auto& buckets = LatencyBucketsSeconds();
  auto histogram = [&](const char* name, const char* help) {
    return &prometheus::BuildHistogram()
                .Name(name)
                .Help(help)
                .Labels(model_label)
                .Register(*registry_)
                .Add({}, buckets);
  };
  auto counter = [&](const char* name, const char* help) {
    return &BuildCounter().Name(name).Help(help).Labels(model_label).Register(*registry_).Add({});
  };

  queue_s_ = histogram("sieve_request_queue_seconds",
                       "Seconds from arrival to first scheduling (first prefill chunk).");
  prefill_s_ = histogram("sieve_request_prefill_seconds",
                         "Seconds from first scheduling to the first token sampled.");
  ttft_s_ = histogram("sieve_request_time_to_first_token_seconds",
                      "Seconds from arrival to the first token sampled.");
  itl_s_ = histogram("sieve_request_inter_token_latency_seconds",
                     "Seconds between consecutive tokens of one request.");
  decode_s_ = histogram("sieve_request_decode_seconds",
                        "Seconds from the first token to the last token of a request.");
  e2e_s_ = histogram("sieve_request_e2e_latency_seconds",
                     "Seconds from arrival to finish of a request, any outcome.");
  auto& requests = BuildCounter()
                       .Name("sieve_requests_total")
                       .Help("Finished requests by outcome (finish reason).")
                       .Labels(model_label)
                       .Register(*registry_);
  for (size_t i = 0; i < kOutcomeNames.size(); ++i) {
    requests_by_outcome_[i] = &requests.Add({{"outcome", kOutcomeNames[i]}});
  }
  prompt_tokens_ = counter("sieve_prompt_tokens_total", "Prompt tokens of finished requests.");
  cached_tokens_ = counter("sieve_cached_prompt_tokens_total",
                           "Prompt tokens of finished requests served from the prefix cache.");
  generated_tokens_ =
      counter("sieve_generated_tokens_total", "Tokens generated by finished requests.");
  preemptions_ = counter("sieve_preemptions_total",
                         "Running requests preempted (KV pages freed, to be recomputed).");
  device_lost_ = counter("sieve_device_lost_total",
                         "Unrecoverable backend failures (the daemon then drains and exits).");
  auto& rejections = BuildCounter()
                         .Name("sieve_rejections_total")
                         .Help("Requests refused at submission, by reason.")
                         .Labels(model_label)
                         .Register(*registry_);
  for (size_t i = 0; i < kRejectNames.size(); ++i) {
    rejections_[i] = &rejections.Add({{"reason", kRejectNames[i]}});
  }
  grpc_requests_ = &BuildCounter()
                        .Name("sieve_grpc_requests_total")
                        .Help("Finished gRPC calls by method and status code.")
                        .Labels(model_label)
                        .Register(*registry_);
  http_requests_ = &BuildCounter()
                        .Name("sieve_http_requests_total")
                        .Help("Answered HTTP API requests by route and HTTP status.")
                        .Labels(model_label)
                        .Register(*registry_);
  http_seconds_ = &prometheus::BuildHistogram()
                       .Name("sieve_http_request_duration_seconds")
                       .Help("HTTP API requests from arrival to the last byte written, by route.")
                       .Labels(model_label)
                       .Register(*registry_);
  for (std::string_view route : kHttpRouteLabels) {
    http_requests_->Add({{"route", std::string(route)}, {"code", "200"}});
    http_seconds_->Add({{"route", std::string(route)}}, LatencyBucketsSeconds());
  }
}

void Metrics::RegisterEngineMetrics(const prometheus::Labels& model_label) {
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  auto counter = [&](const char* name, const char* help) {
    return &BuildCounter().Name(name).Help(help).Labels(model_label).Register(*registry_).Add({});
  };
  auto gauge = [&](const char* name, const char* help) {
    return &BuildGauge().Name(name).Help(help).Labels(model_label).Register(*registry_).Add({});
  };
  auto& running = BuildGauge()
                      .Name("sieve_running_requests")
                      .Help("Requests in the prefill or decode pool.")
                      .Labels(model_label)
                      .Register(*registry_);
  auto& step_s = prometheus::BuildHistogram()
                     .Name("sieve_step_seconds")
                     .Help("Seconds of one worker step of a pool.")
                     .Labels(model_label)
                     .Register(*registry_);
  auto& step_tokens = BuildCounter()
                          .Name("sieve_step_tokens_total")
                          .Help("Tokens processed by a pool's worker steps.")
                          .Labels(model_label)
                          .Register(*registry_);
  for (engine::Pool pool : {engine::Pool::kPrefill, engine::Pool::kDecode}) {
    const prometheus::Labels pool_label = {{"pool", std::string(engine::PoolName(pool))}};
    const int i = static_cast<int>(pool);
    running_[i] = &running.Add(pool_label);
    step_s_[i] = &step_s.Add(pool_label, LatencyBucketsSeconds());
    step_tokens_[i] = &step_tokens.Add(pool_label);
  }
  prefill_density_ = &prometheus::BuildHistogram()
                          .Name("sieve_prefill_attention_density")
                          .Help("Fraction of causal attention work a sparse prefill step computed.")
                          .Labels(model_label)
                          .Register(*registry_)
                          .Add({}, prometheus::Histogram::BucketBoundaries{
                                       0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 0.9, 1});
  prefill_index_s_ = &prometheus::BuildHistogram()
                          .Name("sieve_prefill_sparse_index_seconds")
                          .Help("Seconds a sparse prefill step spent building its sparse indices.")
                          .Labels(model_label)
                          .Register(*registry_)
                          .Add({}, LatencyBucketsSeconds());
  decode_kv_read_fraction_ =
      &prometheus::BuildHistogram()
           .Name("sieve_decode_kv_read_fraction")
           .Help("Per decode step: the fraction of the KV that dense attention would read that "
                 "the step's attention read (1 for dense).")
           .Labels(model_label)
           .Register(*registry_)
           .Add({}, prometheus::Histogram::BucketBoundaries{0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5,
                                                            0.75, 0.9, 0.99, 1.0});
  decode_selection_s_ =
      &prometheus::BuildHistogram()
           .Name("sieve_decode_selection_seconds")
           .Help("Host seconds one decode step spent choosing the keys sparse attention reads.")
           .Labels(model_label)
           .Register(*registry_)
           .Add({}, LatencyBucketsSeconds());
  waiting_ = gauge("sieve_waiting_requests", "Requests queued for admission.");
  waiting_tokens_ = gauge("sieve_waiting_tokens", "Prompt tokens of the queued requests.");
  kv_used_ = gauge("sieve_kv_pages_used",
                   "KV-cache pages in use, including those only the prefix cache holds.");
  kv_free_ = gauge("sieve_kv_pages_free", "KV-cache pages free.");
  kv_cached_ = gauge("sieve_kv_pages_cached",
                     "KV-cache pages held only by the prefix cache (evictable).");
  hit_ratio_ = gauge("sieve_prefix_cache_hit_ratio",
                     "Prefix-cache hit tokens / query tokens since start; 0 before any lookup.");
  prefix_query_tokens_ = counter("sieve_prefix_cache_query_tokens_total",
                                 "Prompt tokens looked up in the prefix cache.");
  prefix_hit_tokens_ = counter("sieve_prefix_cache_hit_tokens_total",
                               "Prompt tokens served from the prefix cache.");
}

Metrics::~Metrics() {
  // Stop serving before the registry goes away. civetweb's listener thread notices the stop
  // only when its poll() wakes, which without traffic takes up to 2 s; poking the port with
  // connections while it stops makes shutdown take milliseconds.
  std::atomic<bool> stopped{false};
  std::thread poke([this, &stopped] {
    while (!stopped.load()) {
      Poke(poke_ip_, port_);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  exposer_.reset();
  stopped = true;
  poke.join();
}

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(
    const std::string& listen_address, const std::string& model, const std::string& role,
    std::function<bool(std::string_view password)> accept_password) {
  absl::StatusOr<std::string> civet_address = CivetListenAddress(listen_address);
  if (!civet_address.ok()) return civet_address.status();
  std::unique_ptr<Metrics> metrics(new Metrics(model, role));
  try {
    metrics->exposer_ = std::make_unique<prometheus::Exposer>(*civet_address, /*num_threads=*/2);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen_address,
                                               " (is the port in use?): ", e.what()));
  }
  const std::vector<int> ports = metrics->exposer_->GetListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(
        absl::StrCat("metrics listener on ", listen_address, " reports no bound port"));
  }
  metrics->port_ = ports.front();
  metrics->poke_ip_ = civet_address->substr(0, civet_address->rfind(':'));
  if (metrics->poke_ip_ == "0.0.0.0") metrics->poke_ip_ = "127.0.0.1";
  if (accept_password) {
    metrics->exposer_->RegisterAuth(
        [accept = std::move(accept_password)](const std::string&, const std::string& password) {
          return accept(password);
        },
        "sieve metrics");
  }
  metrics->exposer_->RegisterCollectable(metrics->registry_);
  return metrics;
}

std::string Metrics::Render() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

prometheus::Counter& Metrics::GrpcCounter(std::string_view method, std::string_view code) {
  std::string method_label = IsPlainMethodName(method) ? std::string(method) : "other";
  std::string code_label = "UNKNOWN";
  for (std::string_view name : kGrpcCodeNames) {
    if (name == code) code_label = std::string(name);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (method_label != "other" && !grpc_methods_.contains(method_label)) {
      if (grpc_methods_.size() >= kMaxGrpcMethods) {
        method_label = "other";
      } else {
        grpc_methods_.insert(method_label);
      }
    }
  }
  // Family::Add returns the existing series for known labels; it locks internally.
  return grpc_requests_->Add({{"method", method_label}, {"code", code_label}});
}

void Metrics::OnGrpcRequest(std::string_view method, std::string_view grpc_code) {
  GrpcCounter(method, grpc_code).Increment();
}

void Metrics::OnHttpRequest(std::string_view route, int http_status, double seconds) {
  std::string route_label = "other";
  for (std::string_view r : kHttpRouteLabels) {
    if (r == route) route_label = std::string(r);
  }
  std::string code_label = "other";
  for (int code : kHttpCodes) {
    if (code == http_status) code_label = absl::StrCat(code);
  }
  // Family::Add returns the existing series for known labels; it locks internally.
  http_requests_->Add({{"route", route_label}, {"code", code_label}}).Increment();
  http_seconds_->Add({{"route", route_label}}, LatencyBucketsSeconds()).Observe(seconds);
}

void Metrics::OnRejected(engine::RejectReason reason) {
  const size_t i = static_cast<size_t>(reason);
  if (i < rejections_.size()) rejections_[i]->Increment();
}

void Metrics::OnFirstToken(const engine::RequestTimings& t) {
  queue_s_->Observe(t.queue_s);
  prefill_s_->Observe(t.prefill_s);
  ttft_s_->Observe(t.time_to_first_token_s);
  if (t.transfer_s > 0) request_transfer_s_->Observe(t.transfer_s);
}

void Metrics::OnInterTokenLatency(double seconds) { itl_s_->Observe(seconds); }

void Metrics::OnFinished(const engine::RequestOutcome& outcome) {
  size_t i = static_cast<size_t>(outcome.finish);
  if (i >= requests_by_outcome_.size()) i = 0;  // unknown values count as errors
  requests_by_outcome_[i]->Increment();
  if (outcome.prompt_tokens > 0) prompt_tokens_->Increment(outcome.prompt_tokens);
  if (outcome.cached_tokens > 0) cached_tokens_->Increment(outcome.cached_tokens);
  if (outcome.generated_tokens > 0) {
    generated_tokens_->Increment(outcome.generated_tokens);
    decode_s_->Observe(outcome.timings.decode_s);
  }
  e2e_s_->Observe(outcome.timings.total_s);
}

void Metrics::OnPreempted() { preemptions_->Increment(); }

void Metrics::OnDeviceLost(const absl::Status&) { device_lost_->Increment(); }

void Metrics::OnDecodeAttention(double kv_read_fraction, double selection_seconds) {
  decode_kv_read_fraction_->Observe(kv_read_fraction);
  decode_selection_s_->Observe(selection_seconds);
}

void Metrics::OnStep(engine::Pool pool, double seconds, int32_t tokens) {
  const int i = static_cast<int>(pool);
  if (i < 0 || i > 1) return;
  step_s_[i]->Observe(seconds);
  if (tokens > 0) step_tokens_[i]->Increment(tokens);
}

void Metrics::OnPrefillAttention(double density, double index_seconds) {
  prefill_density_->Observe(density);
  prefill_index_s_->Observe(index_seconds);
}

void Metrics::OnLoad(const engine::EngineLoad& load) {
  running_[static_cast<int>(engine::Pool::kPrefill)]->Set(load.running_prefill);
  running_[static_cast<int>(engine::Pool::kDecode)]->Set(load.running_decode);
  waiting_->Set(load.waiting);
  waiting_tokens_->Set(static_cast<double>(load.waiting_tokens));
  kv_used_->Set(load.kv_pages_used);
  kv_free_->Set(load.kv_pages_free);
  kv_cached_->Set(load.kv_pages_cached);
  hit_ratio_->Set(load.prefix_cache_query_tokens > 0
                      ? static_cast<double>(load.prefix_cache_hit_tokens) /
                            static_cast<double>(load.prefix_cache_query_tokens)
                      : 0.0);
  std::lock_guard<std::mutex> lock(mu_);
  // The engine reports running totals; a total that went down means it restarted counting.
  const int64_t query_delta = load.prefix_cache_query_tokens >= last_query_tokens_
                                  ? load.prefix_cache_query_tokens - last_query_tokens_
                                  : load.prefix_cache_query_tokens;
  const int64_t hit_delta = load.prefix_cache_hit_tokens >= last_hit_tokens_
                                ? load.prefix_cache_hit_tokens - last_hit_tokens_
                                : load.prefix_cache_hit_tokens;
  if (query_delta > 0) prefix_query_tokens_->Increment(static_cast<double>(query_delta));
  if (hit_delta > 0) prefix_hit_tokens_->Increment(static_cast<double>(hit_delta));
  last_query_tokens_ = load.prefix_cache_query_tokens;
  last_hit_tokens_ = load.prefix_cache_hit_tokens;
}

}  // namespace sieve::server
