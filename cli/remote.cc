#include "cli/remote.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <iterator>

#include <grpcpp/grpcpp.h>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "sieve/v1/sieve.grpc.pb.h"

namespace sieve::cli {
namespace {

// Largest message the client accepts, in bytes (the server's default limit).
constexpr int kMaxMessageBytes = 16 * 1024 * 1024;

// The contents of the file named by environment variable `name`, or "" when unset. A file that
// cannot be read ends the process with a message naming the variable.
std::string ReadFileFromEnv(const char* name) {
  const char* path = std::getenv(name);
  if (path == nullptr || *path == '\0') return std::string();
  std::ifstream in(path);
  if (!in) {
    std::cerr << "sieve: " << name << ": cannot read '" << path << "'\n";
    std::exit(2);
  }
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Plaintext, or TLS when SIEVE_TLS_CA_FILE names the CA bundle to trust (server.tls.*), with a
// client certificate from SIEVE_TLS_CERT_FILE and SIEVE_TLS_KEY_FILE for mutual TLS.
std::shared_ptr<grpc::ChannelCredentials> CredentialsFromEnv() {
  grpc::SslCredentialsOptions tls;
  tls.pem_root_certs = ReadFileFromEnv("SIEVE_TLS_CA_FILE");
  if (tls.pem_root_certs.empty()) return grpc::InsecureChannelCredentials();
  tls.pem_cert_chain = ReadFileFromEnv("SIEVE_TLS_CERT_FILE");
  tls.pem_private_key = ReadFileFromEnv("SIEVE_TLS_KEY_FILE");
  return grpc::SslCredentials(tls);
}

std::shared_ptr<grpc::Channel> Connect(const std::string& target) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  return grpc::CreateCustomChannel(target, CredentialsFromEnv(), args);
}

// Sends "authorization: Bearer $SIEVE_TOKEN" when SIEVE_TOKEN is set (server.auth.tokens_file).
void AddToken(grpc::ClientContext& context) {
  const char* token = std::getenv("SIEVE_TOKEN");
  if (token != nullptr && *token != '\0') {
    context.AddMetadata("authorization", absl::StrCat("Bearer ", token));
  }
}

// The upper-case name of a gRPC status code, e.g. "UNAVAILABLE".
std::string StatusCodeName(grpc::StatusCode code) {
  static constexpr const char* kNames[] = {
      "OK",           "CANCELLED",          "UNKNOWN",
      "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
      "FAILED_PRECONDITION", "ABORTED",     "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",          "UNAVAILABLE",
      "DATA_LOSS",    "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? kNames[i] : absl::StrCat("CODE_", i);
}

// Prints a failed call's status; returns the exit code 1.
int CallFailed(const std::string& target, const grpc::Status& status) {
  std::cerr << "sieve: " << target << ": " << StatusCodeName(status.error_code()) << ": "
            << status.error_message() << "\n";
  return 1;
}

int UsageError(const absl::Status& status, const char* usage) {
  std::cerr << "sieve: " << status.message() << "\n" << usage;
  return 2;
}

// Milliseconds with one decimal, e.g. "12.5 ms".
std::string Ms(double seconds) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.1f ms", seconds * 1e3);
  return buffer;
}

std::string FinishReasonName(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_EOS:
      return "eos";
    case v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    default:
      return "unspecified";
  }
}

v1::GenerateRequest ToRequest(const GenerateOptions& o) {
  v1::GenerateRequest request;
  request.set_model(o.model_name);
  request.set_text(o.prompt);
  request.set_add_special_tokens(o.add_special_tokens);
  request.set_priority(o.priority);
  if (!o.request_id.empty()) request.set_request_id(o.request_id);
  v1::SamplingParams* s = request.mutable_sampling();
  s->set_temperature(o.temperature);
  if (o.top_k) s->set_top_k(*o.top_k);
  if (o.top_p) s->set_top_p(*o.top_p);
  if (o.min_p) s->set_min_p(*o.min_p);
  if (o.repetition_penalty) s->set_repetition_penalty(*o.repetition_penalty);
  if (o.seed) s->set_seed(*o.seed);
  v1::StopCriteria* stop = request.mutable_stop();
  stop->set_max_tokens(static_cast<uint32_t>(std::max(0, o.max_tokens)));
  for (const std::string& text : o.stop) stop->add_stop_strings(text);
  stop->set_ignore_eos(o.ignore_eos);
  return request;
}

// One line summarizing a finished completion, e.g. "[sieve] finish: length | prompt 9 tokens
// (0 cached), generated 64 | queue 0.1 ms, prefill 2.0 ms, time to first token 2.2 ms,
// decode 80.3 ms (1.3 ms/token) | total 82.6 ms".
std::string Summary(const v1::Completion& c) {
  const v1::Usage& u = c.usage();
  const v1::Timings& t = c.timings();
  std::string line = absl::StrCat("[sieve] finish: ", FinishReasonName(c.finish_reason()));
  if (c.matched_stop_case() == v1::Completion::kStopString) {
    absl::StrAppend(&line, " (\"", absl::CEscape(c.stop_string()), "\")");
  } else if (c.matched_stop_case() == v1::Completion::kStopTokenId) {
    absl::StrAppend(&line, " (token ", c.stop_token_id(), ")");
  }
  absl::StrAppend(&line, " | prompt ", u.prompt_tokens(), " tokens (", u.cached_prompt_tokens(),
                  " cached), generated ", u.generated_tokens());
  if (u.preemptions() > 0) absl::StrAppend(&line, ", preempted ", u.preemptions(), "x");
  absl::StrAppend(&line, " | queue ", Ms(t.queue_seconds()), ", prefill ",
                  Ms(t.prefill_seconds()), ", time to first token ",
                  Ms(t.time_to_first_token_seconds()), ", decode ", Ms(t.decode_seconds()));
  if (u.generated_tokens() > 1) {
    absl::StrAppend(&line, " (", Ms(t.decode_seconds() / (u.generated_tokens() - 1)),
                    "/token)");
  }
  absl::StrAppend(&line, " | total ", Ms(t.total_seconds()));
  return line;
}

}  // namespace

int RunRemoteGenerate(const GenerateOptions& o) {
  auto stub = v1::Sieve::NewStub(Connect(o.target));
  grpc::ClientContext context;
  AddToken(context);
  if (o.timeout_s) {
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::microseconds(static_cast<int64_t>(*o.timeout_s * 1e6)));
  }
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub->Generate(&context, ToRequest(o));
  if (o.echo) std::cout << o.prompt << std::flush;
  v1::GenerateResponse response;
  std::optional<v1::Completion> completion;
  while (reader->Read(&response)) {
    std::cout << response.text() << std::flush;
    if (response.has_complete()) completion = response.complete();
  }
  std::cout << "\n";
  grpc::Status status = reader->Finish();
  if (!status.ok()) return CallFailed(o.target, status);
  if (completion) std::cerr << Summary(*completion) << "\n";
  return 0;
}

int RunHealth(int argc, char** argv) {
  static constexpr char kUsage[] =
      "usage: sieve health [--target ADDR] [--service NAME]\n"
      "Prints the server's health (grpc.health.v1): SERVING (exit 0) or NOT_SERVING (exit 1).\n";
  std::string target = kDefaultTarget, service;
  Args args(argc, argv);
  while (args.more()) {
    const std::string name(args.Next());
    absl::StatusOr<std::string> value;
    if (name == "--help" || name == "-h") {
      std::cout << kUsage;
      return 0;
    } else if (name == "--target" && (value = args.Value(name)).ok()) {
      target = *value;
    } else if (name == "--service" && (value = args.Value(name)).ok()) {
      service = *value;
    } else {
      return UsageError(value.ok() ? absl::InvalidArgumentError("unknown argument " + name)
                                   : value.status(),
                        kUsage);
    }
  }
  auto stub = grpc::health::v1::Health::NewStub(Connect(target));
  grpc::ClientContext context;
  AddToken(context);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return CallFailed(target, status);
  std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status())
            << "\n";
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

int RunTokenize(int argc, char** argv) {
  static constexpr char kUsage[] =
      "usage: sieve tokenize [--target ADDR] [--model-name NAME] [--no-bos] [--pieces] TEXT\n"
      "Prints the token ids of TEXT under the served model's tokenizer.\n";
  std::string target = kDefaultTarget;
  v1::TokenizeRequest request;
  bool have_text = false;
  Args args(argc, argv);
  while (args.more()) {
    const std::string name(args.Next());
    absl::StatusOr<std::string> value;
    if (name == "--help" || name == "-h") {
      std::cout << kUsage;
      return 0;
    } else if (name == "--target" && (value = args.Value(name)).ok()) {
      target = *value;
    } else if (name == "--model-name" && (value = args.Value(name)).ok()) {
      request.set_model(*value);
    } else if (name == "--no-bos") {
      request.set_add_special_tokens(false);
    } else if (name == "--pieces") {
      request.set_return_pieces(true);
    } else if (!name.starts_with("--") && !have_text) {
      request.set_text(name);
      have_text = true;
    } else {
      return UsageError(value.ok() ? absl::InvalidArgumentError("unexpected argument " + name)
                                   : value.status(),
                        kUsage);
    }
  }
  if (!have_text) return UsageError(absl::InvalidArgumentError("no text given"), kUsage);
  auto stub = v1::Sieve::NewStub(Connect(target));
  grpc::ClientContext context;
  AddToken(context);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::TokenizeResponse response;
  grpc::Status status = stub->Tokenize(&context, request, &response);
  if (!status.ok()) return CallFailed(target, status);
  std::cout << absl::StrJoin(response.token_ids(), " ") << "\n";
  for (int i = 0; i < response.pieces_size(); ++i) {
    std::cout << response.token_ids(i) << "\t\"" << absl::CEscape(response.pieces(i)) << "\"\n";
  }
  std::cerr << "[sieve] " << response.token_ids_size() << " tokens\n";
  return 0;
}

int RunModels(int argc, char** argv) {
  static constexpr char kUsage[] =
      "usage: sieve models [--target ADDR]\nLists the models the server serves.\n";
  std::string target = kDefaultTarget;
  Args args(argc, argv);
  while (args.more()) {
    const std::string name(args.Next());
    absl::StatusOr<std::string> value;
    if (name == "--help" || name == "-h") {
      std::cout << kUsage;
      return 0;
    } else if (name == "--target" && (value = args.Value(name)).ok()) {
      target = *value;
    } else {
      return UsageError(value.ok() ? absl::InvalidArgumentError("unknown argument " + name)
                                   : value.status(),
                        kUsage);
    }
  }
  auto stub = v1::Sieve::NewStub(Connect(target));
  grpc::ClientContext context;
  AddToken(context);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ListModelsResponse response;
  grpc::Status status = stub->ListModels(&context, v1::ListModelsRequest(), &response);
  if (!status.ok()) return CallFailed(target, status);
  for (const v1::ModelInfo& m : response.models()) {
    std::cout << m.name() << "\n"
              << "  architecture " << m.architecture() << ", " << m.num_layers() << " layers, "
              << "hidden " << m.hidden_size() << ", " << m.num_attention_heads()
              << " query heads / " << m.num_kv_heads() << " KV heads of " << m.head_dim()
              << "\n"
              << "  vocabulary " << m.vocab_size() << ", context " << m.context_length()
              << " tokens, eos [" << absl::StrJoin(m.eos_token_ids(), ", ") << "]"
              << (m.has_bos_token_id() ? absl::StrCat(", bos ", m.bos_token_id()) : "") << "\n"
              << "  backend " << m.backend() << " (" << m.dtype() << "), KV cache "
              << m.kv_num_pages() << " pages x " << m.kv_page_size_tokens() << " tokens\n"
              << "  attention: " << m.attention().description() << "\n";
  }
  return 0;
}

}  // namespace sieve::cli
