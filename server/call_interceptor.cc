#include "server/call_interceptor.h"

#include <google/protobuf/stubs/logging.h>

#include <atomic>
#include <cstdio>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/convert.h"
#include "server/log.h"
#include "server/metrics.h"
#include "server/tsan_handoff.h"
#include "sieve/v1/sieve.pb.h"

namespace sieve::server {
namespace {

using grpc::experimental::InterceptionHookPoints;
using grpc::experimental::ServerRpcInfo;

// The last libprotobuf log message of this thread (a failed parse logs its reason here on the
// thread that then runs the POST_RECV_MESSAGE hook).
thread_local std::string t_last_protobuf_message;

void OnProtobufLog(google::protobuf::LogLevel level, const char* /*filename*/, int /*line*/,
                   const std::string& message) {
  t_last_protobuf_message = message;
  // Parse errors are reported with their request (as INVALID_ARGUMENT, at warning); the raw
  // line is for debugging. A fatal one is about to abort the process: say so at error.
  Log(level >= google::protobuf::LOGLEVEL_FATAL ? LogLevel::kError : LogLevel::kDebug, absl::StrCat("libprotobuf: ", EscapeForLog(message)));
}

absl::string_view ShortMethod(absl::string_view method) {
  const size_t slash = method.rfind('/');
  return slash == absl::string_view::npos ? method : method.substr(slash + 1);
}

class CallInterceptor final : public grpc::experimental::Interceptor {
 public:
  CallInterceptor(ServerRpcInfo* info, const CallInterceptorOptions& options)
      : info_(info), options_(options), access_log_(options.access_log),
        method_(info->method() ? info->method() : ""),
        start_(absl::Now()),
        call_(info->server_context() != nullptr ? info->server_context()->c_call() : nullptr) {
    TsanHandOff(this);  // server/tsan_handoff.h: gRPC runs the hooks on its other threads
  }

  ~CallInterceptor() override {
    TsanTakeOver(this, call_);
    if (access_log_) WriteAccessLog();
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    TsanTakeOver(this, call_);
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_INITIAL_METADATA)) {
      CheckAuthentication(*methods->GetRecvInitialMetadata());
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE)) {
      OnReceived(methods->GetRecvMessage());
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_MESSAGE)) {
      OnSend(methods);
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      OnSendStatus(methods);
    }
    // Proceed hands the call on (to the handler, to gRPC's core): declared on the call too.
    TsanHandOff(this);
    if (call_ != nullptr) TsanHandOff(call_);
    methods->Proceed();
  }

 private:
  // Services outside sieve.* (health, reflection) get the gate; Sieve's check for themselves.
  void CheckAuthentication(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) {
    if (options_.authenticator == nullptr || absl::StartsWith(method_, "/sieve.")) return;
    if (options_.exempt_health && absl::StartsWith(method_, "/grpc.health.v1.Health/")) return;
    if (options_.exempt_reflection && absl::StartsWith(method_, "/grpc.reflection.")) return;
    auto it = metadata.find("authorization");
    const absl::Status status =
        it == metadata.end()
            ? absl::UnauthenticatedError("this server requires a bearer token: send the metadata "
                                         "'authorization: Bearer <token>'")
            : options_.authenticator->CheckAuthorization(
                  std::string_view(it->second.data(), it->second.size()));
    if (!status.ok()) denied_ = status;
  }

  void OnReceived(void* message) {
    const ServerRpcInfo::Type type = info_->type();
    if (message != nullptr ||
        (type != ServerRpcInfo::Type::UNARY && type != ServerRpcInfo::Type::SERVER_STREAMING)) {
      t_last_protobuf_message.clear();
      return;
    }
    std::string reason = std::move(t_last_protobuf_message);
    t_last_protobuf_message.clear();
    if (reason.empty()) reason = "the bytes are not a valid protobuf encoding of the message";
    unparseable_ = absl::StrCat("the request message of ", ShortMethod(method_),
                                " could not be parsed: ", reason);
    Log(LogLevel::kWarning, absl::StrCat(method_, " rejected: ", EscapeForLog(*unparseable_),
                                         " (peer ", EscapeForLog(Peer()), ")"));
    if (options_.on_unparseable) {
      const absl::string_view name = ShortMethod(method_);
      options_.on_unparseable(std::string_view(name.data(), name.size()));
    }
  }

  void OnSend(grpc::experimental::InterceptorBatchMethods* methods) {
    if (!first_message_.has_value()) first_message_ = absl::Now();
    if (denied_.has_value()) {
      // Nothing of a gated service's answer reaches an unauthenticated caller.
      if (grpc::ByteBuffer* bytes = methods->GetSerializedSendMessage(); bytes != nullptr) {
        grpc::Slice empty;
        *bytes = grpc::ByteBuffer(&empty, 1);
      }
      return;
    }
    if (!options_.access_log) return;
    const void* message = methods->GetSendMessage();
    if (message == nullptr) return;
    if (method_ == "/sieve.v1.Sieve/Generate") {
      const auto& response = *static_cast<const v1::GenerateResponse*>(message);
      if (request_id_.empty()) request_id_ = response.request_id();
      if (response.has_complete()) {
        prompt_tokens_ = response.complete().usage().prompt_tokens();
        generated_tokens_ = response.complete().usage().generated_tokens();
      }
    } else if (method_ == "/sieve.v1.Sieve/Tokenize") {
      prompt_tokens_ = static_cast<const v1::TokenizeResponse*>(message)->token_ids_size();
    }
  }

  void OnSendStatus(grpc::experimental::InterceptorBatchMethods* methods) {
    if (unparseable_.has_value()) {
      methods->ModifySendStatus(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, *unparseable_));
    } else if (denied_.has_value()) {
      methods->ModifySendStatus(ToGrpcStatus(*denied_));
    }
    code_ = methods->GetSendStatus().error_code();
  }

  std::string Peer() const {
    return info_->server_context() != nullptr ? info_->server_context()->peer() : std::string();
  }

  void WriteAccessLog() const {
    if (!LogEnabled(LogLevel::kInfo)) return;
    const absl::Time end = absl::Now();
    const std::string code = code_.has_value()
                                 ? std::string(GrpcStatusCodeName(static_cast<int>(*code_)))
                                 : std::string("CANCELLED");
    std::string line = absl::StrCat(
        "access: id=", request_id_.empty() ? "-" : EscapeForLog(request_id_),
        " method=", EscapeForLog(method_), " status=", code);
    if (prompt_tokens_ >= 0) absl::StrAppend(&line, " prompt_tokens=", prompt_tokens_);
    if (generated_tokens_ >= 0) absl::StrAppend(&line, " generated_tokens=", generated_tokens_);
    if (first_message_.has_value()) {
      absl::StrAppend(&line, " first_message_s=",
                      absl::ToDoubleSeconds(*first_message_ - start_));
    }
    absl::StrAppend(&line, " total_s=", absl::ToDoubleSeconds(end - start_), " peer=",
                    EscapeForLog(Peer()));
    Log(LogLevel::kInfo, line);
  }

  ServerRpcInfo* const info_;
  const CallInterceptorOptions& options_;  // the factory's: read only while the call runs
  // The destructor reads the call's own members only: gRPC destroys a call's interceptors with
  // its context on its own thread as the call is released, which can be while ~Server is
  // destroying the factory (ordered by gRPC's uninstrumented internals; TSan reported the read
  // of options_.access_log against the factory's deletion in the daemon's shutdown).
  const bool access_log_;
  const std::string method_;
  const absl::Time start_;
  grpc_call* const call_;  // for the TSan hand-off only (server/tsan_handoff.h)
  std::optional<absl::Time> first_message_;
  std::optional<std::string> unparseable_;  // the INVALID_ARGUMENT message, once known
  std::optional<absl::Status> denied_;      // the gate's UNAUTHENTICATED status
  std::optional<grpc::StatusCode> code_;
  std::string request_id_;
  int64_t prompt_tokens_ = -1;
  int64_t generated_tokens_ = -1;
};

}  // namespace

grpc::experimental::Interceptor* CallInterceptorFactory::CreateServerInterceptor(
    ServerRpcInfo* info) {
  return new CallInterceptor(info, options_);
}

void InstallProtobufLogHandler() {
  static std::atomic<bool> installed{false};
  if (!installed.exchange(true)) google::protobuf::SetLogHandler(&OnProtobufLog);
}

}  // namespace sieve::server
