#include "server/http_server.h"

#include <dirent.h>
#include <netdb.h>
#include <signal.h>
#include <sys/socket.h>

#include <cerrno>

#include <optional>
#include <utility>
#include <vector>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/log.h"
#include "server/openai_api.h"

namespace sieve::server {
namespace {

using openai::Endpoint;

// Seconds a streamed response may go without output before a comment line checks that the
// client is still there.
constexpr absl::Duration kHeartbeat = absl::Seconds(1);

void SendJson(httplib::Response& res, int status, const std::string& body) {
  res.status = status;
  res.set_content(body, "application/json");
}

void SendError(httplib::Response& res, const openai::ApiError& error) {
  SendJson(res, error.http_status, openai::ErrorBody(error));
}

std::string_view RouteOf(const std::string& path) {
  for (std::string_view route : kHttpRoutes) {
    if (path == route) return route;
  }
  return "other";
}

// The socket of `req`'s connection, found by its two ends (cpp-httplib 0.11 does not expose it;
// later versions have Request::is_connection_closed); -1 if not found. The handler's thread owns
// the connection, so the descriptor stays this socket while the handler runs.
int ClientSocket(const httplib::Request& req) {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int found = -1;
  const std::string remote_port = absl::StrCat(req.remote_port);
  const std::string local_port = absl::StrCat(req.local_port);
  while (const dirent* entry = readdir(dir)) {
    int fd = -1;
    sockaddr_storage peer{}, local{};
    socklen_t peer_len = sizeof(peer), local_len = sizeof(local);
    char host[NI_MAXHOST], port[NI_MAXSERV], own_port[NI_MAXSERV];
    if (!absl::SimpleAtoi(entry->d_name, &fd) ||
        getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
        getnameinfo(reinterpret_cast<sockaddr*>(&peer), peer_len, host, sizeof(host), port,
                    sizeof(port), NI_NUMERICHOST | NI_NUMERICSERV) != 0 ||
        getnameinfo(reinterpret_cast<sockaddr*>(&local), local_len, nullptr, 0, own_port,
                    sizeof(own_port), NI_NUMERICSERV) != 0) {
      continue;
    }
    if (req.remote_addr == host && remote_port == port && local_port == own_port) {
      found = fd;
      break;
    }
  }
  closedir(dir);
  return found;
}

// Whether the client closed or reset the connection: a peek reads end-of-stream or fails. (A
// client that only shuts down its sending side counts as gone too.)
bool ClientLeft(int fd) {
  char c;
  const ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

// Splits "host:port" / "[v6]:port"; nullopt when malformed.
std::optional<std::pair<std::string, int>> SplitHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) return std::nullopt;
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  int port = 0;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return std::nullopt;
  }
  return std::make_pair(host, port);
}

}  // namespace

// What one generation shares between its handler thread and its sink (the engine's scheduler
// thread). Outlives both: the engine may hold the sink after the response is done.
struct HttpServer::Exchange {
  engine::Engine* engine = nullptr;  // set before the exchange is shared

  // std::mutex, not absl::Mutex, here and in HttpServer: ThreadSanitizer sees pthread locking
  // but not the locking inside Debian's uninstrumented Abseil (scripts/sanitize.sh).
  std::mutex mu;  // guards the members marked "mu"
  std::condition_variable changed;  // notified on every change below
  bool submitted = false;           // mu
  absl::Status submit_error;        // mu
  std::optional<engine::RequestId> id;              // mu
  std::shared_ptr<TransferCancellation> transfer;   // mu
  // Output not yet taken by the handler thread.
  engine::TokenDelta pending;       // mu
  bool has_pending = false;         // mu
  std::optional<engine::RequestOutcome> outcome;    // mu
  bool cancelled = false;           // mu

  // Cancels the engine request (or the remote prefill before it); idempotent.
  void Cancel() {
    std::optional<engine::RequestId> cancel;
    std::shared_ptr<TransferCancellation> t;
    {
      std::lock_guard<std::mutex> lock(mu);
      cancelled = true;
      cancel = id;
      t = transfer;
    }
    if (t) t->Cancel();
    if (cancel.has_value()) engine->Cancel(*cancel);
  }

  // Blocks until there is new output or an outcome, or `timeout` passes. Moves the new output
  // to `delta` (true if there was some) and copies the outcome once there is one.
  bool Take(absl::Duration timeout, engine::TokenDelta* delta,
            std::optional<engine::RequestOutcome>* out) {
    std::unique_lock<std::mutex> lock(mu);
    changed.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                     [this] { return has_pending || outcome.has_value(); });
    const bool had = has_pending;
    if (had) {
      *delta = std::move(pending);
      pending = engine::TokenDelta();
      has_pending = false;
    }
    if (outcome.has_value()) *out = outcome;
    return had;
  }
};

// Receives a request's output on the engine thread; only appends and signals.
class HttpServer::ExchangeSink final : public engine::RequestSink {
 public:
  explicit ExchangeSink(std::shared_ptr<Exchange> exchange) : exchange_(std::move(exchange)) {}

  void OnTokens(const engine::TokenDelta& delta) override {
    std::lock_guard<std::mutex> lock(exchange_->mu);
    engine::TokenDelta& p = exchange_->pending;
    p.text += delta.text;
    p.token_ids.insert(p.token_ids.end(), delta.token_ids.begin(), delta.token_ids.end());
    p.logprobs.insert(p.logprobs.end(), delta.logprobs.begin(), delta.logprobs.end());
    exchange_->has_pending = true;
    exchange_->changed.notify_all();
  }

  void OnFinish(const engine::RequestOutcome& outcome) override {
    std::lock_guard<std::mutex> lock(exchange_->mu);
    exchange_->outcome = outcome;
    exchange_->changed.notify_all();
  }

 private:
  const std::shared_ptr<Exchange> exchange_;
};

HttpServer::HttpServer(HttpServerOptions options, RequestGate* gate)
    : options_(std::move(options)),
      gate_(gate),
      created_unix_s_(absl::ToUnixSeconds(absl::Now())),
      server_(std::make_unique<httplib::Server>()) {}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(HttpServerOptions options,
                                                              RequestGate* gate) {
  const std::optional<std::pair<std::string, int>> host_port =
      SplitHostPort(options.listen_address);
  if (!host_port.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat("http.listen_address '",
                                                   options.listen_address,
                                                   "' is not host:port"));
  }
  // A write to a client that went away must fail with EPIPE, not end the process (cpp-httplib
  // sends without MSG_NOSIGNAL).
  signal(SIGPIPE, SIG_IGN);
  std::unique_ptr<HttpServer> http(new HttpServer(std::move(options), gate));
  httplib::Server& s = *http->server_;
  HttpServer* self = http.get();
  const int threads = std::max(1, self->options_.threads);
  s.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  s.set_payload_max_length(static_cast<size_t>(self->options_.max_request_bytes));
  s.set_keep_alive_max_count(1000);
  // A second daemon on the same port must fail to start: SO_REUSEADDR only, no SO_REUSEPORT.
  s.set_socket_options([](int sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  // The body is read here, not by cpp-httplib: 0.11 applies set_payload_max_length to
  // Content-Length bodies only and would read a chunked body of any size into memory. Past the
  // limit the rest is read and dropped (as cpp-httplib skips a too long Content-Length body), so
  // the connection stays usable.
  auto post = [self](bool chat) {
    return [self, chat](const httplib::Request& req, httplib::Response& res,
                        const httplib::ContentReader& content) {
      const size_t limit = static_cast<size_t>(self->options_.max_request_bytes);
      std::string body;
      bool too_large = false;
      // Without Content-Length or Transfer-Encoding a request has no body (RFC 9112 6.3).
      const bool has_body = req.has_header("Content-Length") ||
                            req.has_header("Transfer-Encoding");
      const bool read = !has_body || content([&](const char* data, size_t n) {
        too_large = too_large || body.size() + n > limit;
        if (!too_large) body.append(data, n);
        return true;
      });
      if (!read || too_large) {
        openai::ApiError e;
        e.http_status = too_large || res.status == 413 ? 413 : 400;
        e.type = "invalid_request_error";
        e.message = e.http_status == 413
                        ? absl::StrCat("the request body exceeds http.max_request_bytes (", limit,
                                       " bytes)")
                        : "the request body could not be read";
        SendError(res, e);
        self->Done(RouteOf(req.path), e.http_status, absl::Now());
        return;
      }
      self->Handle(req, body, res, chat);
    };
  };
  s.Post("/v1/completions", post(/*chat=*/false));
  s.Post("/v1/chat/completions", post(/*chat=*/true));
  s.Get("/v1/models", [self](const httplib::Request& req, httplib::Response& res) {
    const absl::Time start = absl::Now();
    if (absl::Status auth = self->Authenticate(req); !auth.ok()) {
      SendError(res, openai::ToApiError(auth, Endpoint::kCompletions));
      self->Done("/v1/models", res.status, start);
      return;
    }
    self->HandleModels(res);
    self->Done("/v1/models", res.status, start);
  });
  s.Get("/health", [self](const httplib::Request&, httplib::Response& res) {
    const absl::Time start = absl::Now();
    self->HandleHealth(res);
    self->Done("/health", res.status, start);
  });
  // Errors cpp-httplib answers itself (unknown route 404, body too large 413, malformed request
  // 400) get an OpenAI-shaped body; the handlers' own errors already have one.
  s.set_error_handler(httplib::Server::HandlerWithResponse([self](const httplib::Request& req,
                                                                 httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    openai::ApiError e;
    e.http_status = res.status;
    e.type = "invalid_request_error";
    if (res.status == 404) {
      e.message = absl::StrCat("no route ", req.method, " ", req.path);
      e.code = "unknown_url";
    } else if (res.status == 413) {
      e.message = absl::StrCat("the request body exceeds http.max_request_bytes (",
                               self->options_.max_request_bytes, " bytes)");
    } else {
      e.message = absl::StrCat("HTTP ", res.status);
    }
    SendError(res, e);
    self->Done(RouteOf(req.path), e.http_status, absl::Now());
    return httplib::Server::HandlerResponse::Handled;
  }));
  s.set_exception_handler([self](const httplib::Request& req, httplib::Response& res,
                                 std::exception_ptr) {
    openai::ApiError e;
    e.message = "internal error";
    e.type = "server_error";
    SendError(res, e);
    self->Done(RouteOf(req.path), 500, absl::Now());
  });

  const auto& [host, port] = *host_port;
  int bound = port;
  if (port == 0) {
    bound = s.bind_to_any_port(host);
  } else if (!s.bind_to_port(host, port)) {
    bound = -1;
  }
  if (bound <= 0) {
    return absl::UnavailableError(absl::StrCat("cannot serve HTTP on http.listen_address '",
                                               self->options_.listen_address,
                                               "' (malformed host, or the port is in use)"));
  }
  http->address_ = absl::StrCat(host.find(':') != std::string::npos ? absl::StrCat("[", host, "]")
                                                                    : host,
                                ":", bound);
  http->listener_ = std::thread([self] { self->server_->listen_after_bind(); });
  return http;
}

HttpServer::~HttpServer() { Stop(); }

void HttpServer::Stop() {
  if (stopping_.exchange(true)) return;
  // Generations end (kCancelled) so that no handler thread waits for the engine, then the
  // listener and the pool's threads stop.
  CancelAll();
  server_->stop();
  if (listener_.joinable()) listener_.join();
}

void HttpServer::CancelAll() {
  std::vector<std::shared_ptr<Exchange>> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [raw, exchange] : exchanges_) all.push_back(exchange);
  }
  for (const std::shared_ptr<Exchange>& exchange : all) exchange->Cancel();
}

bool HttpServer::WaitForNoActiveRequests(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  auto none = [this] { return exchanges_.empty(); };
  if (timeout == absl::InfiniteDuration()) {
    exchanges_changed_.wait(lock, none);
    return true;
  }
  return exchanges_changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout), none);
}

int HttpServer::active_requests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(exchanges_.size());
}

void HttpServer::Register(const std::shared_ptr<Exchange>& exchange) {
  std::lock_guard<std::mutex> lock(mu_);
  exchanges_.emplace(exchange.get(), exchange);
}

void HttpServer::Unregister(Exchange* exchange) {
  std::lock_guard<std::mutex> lock(mu_);
  exchanges_.erase(exchange);
  exchanges_changed_.notify_all();
}

void HttpServer::Done(std::string_view route, int status, absl::Time start) const {
  if (options_.on_request_done) {
    options_.on_request_done(route, status, absl::ToDoubleSeconds(absl::Now() - start));
  }
}

void HttpServer::HandleHealth(httplib::Response& res) {
  absl::StatusOr<engine::Engine*> engine = gate_->Available();
  absl::Status status = engine.ok() ? (*engine)->health() : engine.status();
  if (status.ok()) {
    SendJson(res, 200, R"({"status":"serving"})");
    return;
  }
  openai::ApiError e;
  e.http_status = 503;
  e.message = std::string(status.message());
  e.type = "server_error";
  e.code = "service_unavailable";
  SendError(res, e);
}

absl::Status HttpServer::Authenticate(const httplib::Request& req) const {
  if (options_.authenticator == nullptr) return absl::OkStatus();
  return options_.authenticator->CheckAuthorization(req.get_header_value("Authorization"));
}

void HttpServer::HandleModels(httplib::Response& res) {
  absl::StatusOr<engine::Engine*> engine = gate_->Available();
  if (!engine.ok()) {
    SendError(res, openai::ToApiError(engine.status(), Endpoint::kCompletions));
    return;
  }
  nlohmann::ordered_json model;
  model["id"] = gate_->model_name();
  model["object"] = "model";
  model["created"] = created_unix_s_;
  model["owned_by"] = "sieve";
  model["max_model_len"] = gate_->limits().context_tokens;
  nlohmann::ordered_json list;
  list["object"] = "list";
  list["data"] = nlohmann::ordered_json::array({std::move(model)});
  SendJson(res, 200, list.dump());
}

void HttpServer::Handle(const httplib::Request& req, const std::string& body,
                        httplib::Response& res, bool chat) {
  const absl::Time start = absl::Now();
  const Endpoint endpoint = chat ? Endpoint::kChatCompletions : Endpoint::kCompletions;
  const std::string_view route = chat ? kHttpRoutes[1] : kHttpRoutes[0];
  auto fail = [&](const absl::Status& status) {
    const openai::ApiError e = openai::ToApiError(status, endpoint);
    Log(LogLevel::kDebug, absl::StrCat("HTTP ", std::string(route), " rejected (", e.http_status,
                                       "): ", e.message));
    SendError(res, e);
    Done(route, e.http_status, start);
  };
  // Authentication (the gRPC port's tokens) first: every generation request passes this point.
  if (absl::Status auth = Authenticate(req); !auth.ok()) return fail(auth);

  absl::StatusOr<openai::ParsedRequest> parsed = openai::ParseRequest(body, endpoint);
  if (!parsed.ok()) return fail(parsed.status());
  absl::StatusOr<engine::Engine*> engine = gate_->Available();
  if (!engine.ok()) return fail(engine.status());
  v1::GenerateRequest& request = parsed->request;
  if (absl::Status s = gate_->CheckModel(request.model()); !s.ok()) return fail(s);
  const std::string id = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", next_id_.fetch_add(1));
  request.set_request_id(id);
  absl::StatusOr<engine::RequestSpec> spec = gate_->Prepare(request, **engine);
  if (!spec.ok()) return fail(spec.status());
  absl::StatusOr<std::shared_ptr<Exchange>> exchange = Submit(**engine, *std::move(spec));
  if (!exchange.ok()) return fail(exchange.status());

  const std::string model = request.model().empty() ? gate_->model_name() : request.model();
  auto builder = std::make_shared<openai::ResponseBuilder>(
      endpoint, id, absl::ToUnixSeconds(start), model, *parsed, (*engine)->tokenizer());
  if (parsed->stream) return Stream(*exchange, builder, endpoint, start, res);

  // Unstreamed: wait for the whole output, checking every second that the client is there.
  std::optional<engine::RequestOutcome> outcome;
  int client = ClientSocket(req);
  absl::Time next_check = absl::Now() + kHeartbeat;
  while (!outcome.has_value()) {
    engine::TokenDelta delta;
    if ((*exchange)->Take(kHeartbeat, &delta, &outcome)) builder->Append(delta);
    if (client >= 0 && !outcome.has_value() && absl::Now() >= next_check) {
      next_check = absl::Now() + kHeartbeat;
      if (ClientLeft(client)) {
        (*exchange)->Cancel();  // the outcome (cancelled) follows
        client = -1;
      }
    }
  }
  Unregister(exchange->get());
  if (outcome->finish == engine::FinishReason::kError ||
      outcome->finish == engine::FinishReason::kNone) {
    return fail(outcome->status.ok() ? absl::InternalError("the request ended without a reason")
                                     : outcome->status);
  }
  SendJson(res, 200, builder->Complete(*outcome));
  Done(route, 200, start);
}

absl::StatusOr<std::shared_ptr<HttpServer::Exchange>> HttpServer::Submit(
    engine::Engine& engine, engine::RequestSpec spec) {
  auto exchange = std::make_shared<Exchange>();
  exchange->engine = &engine;
  spec.sink = std::make_shared<ExchangeSink>(exchange);
  Register(exchange);
  std::shared_ptr<TransferCancellation> transfer = gate_->Submit(
      engine, std::move(spec), absl::InfiniteFuture(),
      [exchange](absl::StatusOr<engine::RequestId> submitted, double /*transfer_s*/) {
        bool cancelled;
        {
          std::lock_guard<std::mutex> lock(exchange->mu);
          exchange->submitted = true;
          if (submitted.ok()) {
            exchange->id = *submitted;
          } else {
            exchange->submit_error = submitted.status();
          }
          cancelled = exchange->cancelled;
          exchange->changed.notify_all();
        }
        // Cancel may have run before the id was known.
        if (cancelled && submitted.ok()) exchange->engine->Cancel(*submitted);
      });
  absl::Status submit_error;
  {
    std::unique_lock<std::mutex> lock(exchange->mu);
    exchange->transfer = transfer;
    // Placement is known at once unless a remote prefill runs; then its end (or failure) is.
    exchange->changed.wait(lock, [&exchange] { return exchange->submitted; });
    submit_error = exchange->submit_error;
  }
  if (!submit_error.ok()) {
    Unregister(exchange.get());
    return submit_error;
  }
  return exchange;
}

void HttpServer::Stream(std::shared_ptr<Exchange> exchange,
                        std::shared_ptr<openai::ResponseBuilder> builder, Endpoint endpoint,
                        absl::Time start, httplib::Response& res) {
  const std::string_view route =
      endpoint == Endpoint::kChatCompletions ? kHttpRoutes[1] : kHttpRoutes[0];
  res.status = 200;
  res.set_header("Cache-Control", "no-cache");
  auto finished = std::make_shared<bool>(false);
  // Called by this connection's thread until it returns false or calls sink.done(): each call
  // writes what arrived (or, after a quiet second, a comment line that checks the client).
  res.set_chunked_content_provider(
      "text/event-stream",
      [exchange, builder, finished, endpoint](size_t, httplib::DataSink& sink) {
        engine::TokenDelta delta;
        std::optional<engine::RequestOutcome> outcome;
        if (exchange->Take(kHeartbeat, &delta, &outcome)) builder->Append(delta);
        std::string events = builder->TakeEvents();
        if (outcome.has_value()) {
          if (outcome->finish == engine::FinishReason::kError ||
              outcome->finish == engine::FinishReason::kNone) {
            // The status line is out: the error goes in the stream, as OpenAI's do.
            const absl::Status error =
                outcome->status.ok() ? absl::InternalError("the request ended without a reason")
                                     : outcome->status;
            absl::StrAppend(&events, "data: ",
                            openai::ErrorBody(openai::ToApiError(error, endpoint)), "\n\n",
                            "data: [DONE]\n\n");
          } else {
            absl::StrAppend(&events, builder->FinalEvents(*outcome));
          }
          *finished = true;
          const bool ok = sink.write(events.data(), events.size());
          sink.done();
          return ok;
        }
        if (events.empty()) events = ": keep-alive\n\n";
        if (!sink.write(events.data(), events.size())) {
          exchange->Cancel();  // the client went away
          return false;
        }
        return true;
      },
      [this, exchange, finished, route, start](bool success) {
        if (!*finished || !success) exchange->Cancel();
        Unregister(exchange.get());
        Done(route, 200, start);
      });
}

}  // namespace sieve::server
