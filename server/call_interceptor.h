// CallInterceptor: what the daemon does around every gRPC call, whichever service serves it.
//
//   * Unparseable requests. gRPC's callback API answers a request message that cannot be parsed
//     (invalid UTF-8 in a string field, random bytes) with UNIMPLEMENTED and an empty message,
//     and libprotobuf prints its own line to stderr. The interceptor sees the failed parse
//     (POST_RECV_MESSAGE without a message on a unary or server-streaming call) and rewrites the
//     status to INVALID_ARGUMENT with libprotobuf's reason, logs it in the daemon's format and
//     reports it (on_unparseable: the rejection and request metrics). InstallProtobufLogHandler
//     routes libprotobuf's log lines into the daemon's log and keeps each thread's last one for
//     that message.
//   * The access log: one info line per call when it ends: request id (control characters
//     escaped), method, status, tokens, time to first message and total, peer. Never the prompt.
//   * The authentication gate for services that are not Sieve's own (health, reflection): their
//     handlers cannot check tokens, so for an unauthenticated, non-exempt call the interceptor
//     empties every message they send and ends the call UNAUTHENTICATED. Sieve's services check
//     tokens themselves before doing any work (server/auth.h).
//
// Thread-safety: the factory is shared by all calls; each call's interceptor is used by one
// call's operations, which gRPC serializes.
#ifndef SIEVE_SERVER_CALL_INTERCEPTOR_H_
#define SIEVE_SERVER_CALL_INTERCEPTOR_H_

#include <functional>
#include <string>
#include <string_view>

#include <grpcpp/support/server_interceptor.h>

#include "server/auth.h"

namespace sieve::server {

struct CallInterceptorOptions {
  // Write the access log line of every call (logging.access_log).
  bool access_log = true;
  // Null: no authentication. Else calls to services outside sieve.* need a token unless exempt.
  const Authenticator* authenticator = nullptr;
  bool exempt_health = true;
  bool exempt_reflection = false;
  // Called once per call whose request could not be parsed, with the method's short name
  // ("Generate"); may be empty. Any gRPC thread.
  std::function<void(std::string_view method)> on_unparseable;
};

class CallInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit CallInterceptorFactory(CallInterceptorOptions options) : options_(std::move(options)) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;

 private:
  const CallInterceptorOptions options_;
};

// Routes libprotobuf's log lines into the daemon's log (server/log.h) at debug level (errors that
// are not about a request at warning), remembering each thread's last message for the
// interceptor. Idempotent.
void InstallProtobufLogHandler();


}  // namespace sieve::server

#endif  // SIEVE_SERVER_CALL_INTERCEPTOR_H_
