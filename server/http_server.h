// HttpServer: the daemon's OpenAI-compatible HTTP API (docs/http.md) on cpp-httplib, served
// when http.listen_address is set:
//   POST /v1/completions, POST /v1/chat/completions   unstreamed JSON or server-sent events
//   GET  /v1/models                                   the served model
//   GET  /health                                      200 while serving, else 503
//
// A generation request takes the gRPC service's engine path (server/request_gate.h): the JSON
// body becomes a v1::GenerateRequest (server/openai_api.h), which the gate validates, converts
// and submits; errors become OpenAI-shaped error objects with the matching HTTP status.
//
// Threads: cpp-httplib serves each connection on one thread of its pool (http.threads); a
// request's handler thread waits for its output, which the engine's scheduler thread hands to
// the request's sink (a mutex-guarded buffer and a condition variable; the sink never blocks).
// A streamed response is written by the same thread, one SSE event per batch of new output.
//
// Cancellation: a streamed response whose client went away (a write fails; while no token
// comes, a comment line is written every second to find out) cancels its engine request, whose
// KV pages the engine frees within one scheduler step. An unstreamed request runs to its end.
//
// Lifecycle: requests get 503 until the gate has an engine and again once it drains. Stop()
// (or the destructor) closes the listener, cancels what still runs and joins the threads; the
// engine must outlive it.
//
// Thread-safety: every public method may be called from any thread.
#ifndef SIEVE_SERVER_HTTP_SERVER_H_
#define SIEVE_SERVER_HTTP_SERVER_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/auth.h"
#include "server/openai_api.h"
#include "server/request_gate.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace sieve::server {

// The routes the API serves; every other path counts as "other" in the metrics.
inline constexpr std::string_view kHttpRoutes[] = {"/v1/completions", "/v1/chat/completions",
                                                   "/v1/models", "/health"};

struct HttpServerOptions {
  // "host:port"; port 0 picks a free port (see address()).
  std::string listen_address;
  // Largest request body accepted, in bytes; larger ones get 413.
  int64_t max_request_bytes = 16 << 20;
  // Connections served at once (one thread each); further ones wait for a thread.
  int threads = 64;
  // Called once per answered request with its route (one of kHttpRoutes or "other"), the HTTP
  // status sent and the seconds from arrival to the last byte handed to the socket. Called on
  // the connection's thread; must be cheap. May be empty.
  std::function<void(std::string_view route, int status, double seconds)> on_request_done;
  // The gRPC port's bearer tokens (server.auth.tokens_file): /v1/* then needs
  // `Authorization: Bearer <token>` (401 otherwise); /health stays open. Null: no check.
  const Authenticator* authenticator = nullptr;
};

class HttpServer {
 public:
  // Binds the listener and starts serving through `gate`, which must outlive the server.
  // Unavailable when the address cannot be bound, InvalidArgument when it is malformed.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(HttpServerOptions options,
                                                           RequestGate* gate);

  // Stop().
  ~HttpServer();

  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // The listen address with the bound port, e.g. "127.0.0.1:43121".
  const std::string& address() const { return address_; }

  // Cancels the engine requests of every generation in flight (each ends as its endpoint says
  // for a server-cancelled request: finish_reason "cancelled").
  void CancelAll();

  // Blocks until no generation is in flight or `timeout` passes; true if none is.
  bool WaitForNoActiveRequests(absl::Duration timeout);

  // Generations in flight.
  int active_requests() const;

  // Closes the listener, cancels the generations still in flight and joins the threads.
  // Idempotent.
  void Stop();

 private:
  struct Exchange;
  class ExchangeSink;

  HttpServer(HttpServerOptions options, RequestGate* gate);
  // POST /v1/completions (chat false) and /v1/chat/completions (chat true); `body` is the
  // request's body, read within http.max_request_bytes.
  void Handle(const httplib::Request& req, const std::string& body, httplib::Response& res,
              bool chat);
  // Registers an exchange for `spec`, submits it through the gate and waits for its placement;
  // the submission's error (unregistered again) if it failed.
  absl::StatusOr<std::shared_ptr<Exchange>> Submit(engine::Engine& engine,
                                                   engine::RequestSpec spec);
  // Answers with the request's server-sent events, written as its output arrives.
  void Stream(std::shared_ptr<Exchange> exchange, std::shared_ptr<openai::ResponseBuilder> builder,
              openai::Endpoint endpoint, absl::Time start, httplib::Response& res);
  void HandleModels(httplib::Response& res);
  // OK, or UNAUTHENTICATED when tokens are configured and the request has none of them.
  absl::Status Authenticate(const httplib::Request& req) const;
  void HandleHealth(httplib::Response& res);
  void Done(std::string_view route, int status, absl::Time start) const;
  void Register(const std::shared_ptr<Exchange>& exchange);
  void Unregister(Exchange* exchange);

  const HttpServerOptions options_;
  RequestGate* const gate_;
  const int64_t created_unix_s_;  // what /v1/models reports as the model's `created`
  std::unique_ptr<httplib::Server> server_;
  std::thread listener_;
  std::string address_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<bool> stopping_{false};

  // std::mutex: ThreadSanitizer sees it (Debian's Abseil is uninstrumented; scripts/sanitize.sh).
  mutable std::mutex mu_;
  std::condition_variable exchanges_changed_;  // notified when exchanges_ shrinks
  // Generations in flight, from registration (before Submit) to their response's end. Guarded by
  // mu_.
  absl::flat_hash_map<Exchange*, std::shared_ptr<Exchange>> exchanges_;
};

}  // namespace sieve::server

#endif  // SIEVE_SERVER_HTTP_SERVER_H_
