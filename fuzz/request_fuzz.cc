// libFuzzer target for request validation and conversion (server/convert.h) on hostile input:
// sieve.v1 messages parsed from fuzz bytes, as gRPC parses them off the wire, then validated
// and converted exactly as the service does, with the embedded model's tokenizer.
//
// The first byte picks the path, the rest is its input:
//   0: GenerateRequest (wire bytes) -> ToRequestSpec; an accepted request's prompt is then
//      streamed back through the engine's output path (IncrementalDecoder, StopChecker,
//      AppendDelta) as if the model had generated it;
//   1: TokenizeRequest (wire bytes) -> Encode, pieces;
//   2: DetokenizeRequest (wire bytes) -> CheckTokenIds, Decode, and the same ids streamed;
//   3: raw bytes as GenerateRequest.text and TokenizeRequest.text (set in memory: the wire
//      parser already refuses invalid UTF-8 in a proto3 string, so this reaches the
//      validation behind it).
// Checked on every input (any violation traps):
//   - a rejection is INVALID_ARGUMENT, OUT_OF_RANGE or UNIMPLEMENTED with a message, and maps
//     to the gRPC code of the same meaning;
//   - an accepted GenerateRequest is within the limits: a non-empty prompt of ids in the
//     vocabulary, prompt + max_tokens within the context, sampling and stop criteria valid,
//     a text prompt valid UTF-8 and tokenized as Tokenize would;
//   - invalid UTF-8 text is rejected (Generate and Tokenize);
//   - every text the output path streams is valid UTF-8 (a character split across tokens is
//     held back, never sent broken), and so is every Detokenize answer.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "engine/model/model_config.h"
#include "engine/serving/stop_checker.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/unicode.h"
#include "google/protobuf/stubs/logging.h"
#include "server/convert.h"
#include "sieve/v1/sieve.pb.h"

namespace {

using sieve::engine::FinishReason;
using sieve::engine::IncrementalDecoder;
using sieve::engine::StopChecker;
using sieve::engine::Tokenizer;
namespace v1 = sieve::v1;

struct Fixture {
  std::unique_ptr<Tokenizer> tokenizer;
  sieve::server::RequestLimits limits;
};

const Fixture& GetFixture() {
  static const Fixture* const kFixture = [] {
    auto* f = new Fixture;
    const std::string dir = std::string(SIEVE_SOURCE_DIR) + "/models/embedded";
    auto tokenizer = Tokenizer::FromDirectory(dir);
    auto config = sieve::engine::ModelConfig::FromFile(dir + "/config.json");
    if (!tokenizer.ok() || !config.ok()) std::abort();
    f->tokenizer = *std::move(tokenizer);
    f->limits.vocab_size = static_cast<int32_t>(config->vocab_size);
    f->limits.context_tokens = 2048;  // small, so that the out-of-range paths are reachable
    f->limits.default_max_tokens = 256;
    f->limits.max_stop_strings = 16;
    return f;
  }();
  return *kFixture;
}

bool ValidUtf8(std::string_view s) { return !sieve::engine::unicode::FindInvalidUtf8(s); }

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

// A rejection must carry a code a client can act on, a message, and the same code on the wire.
void CheckRejection(const absl::Status& status) {
  Check(!status.ok());
  const absl::StatusCode code = status.code();
  Check(code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kOutOfRange ||
        code == absl::StatusCode::kUnimplemented);
  Check(!status.message().empty());
  const grpc::Status wire = sieve::server::ToGrpcStatus(status);
  Check(wire.error_code() == sieve::server::ToGrpcCode(code));
  Check(wire.error_code() != grpc::StatusCode::OK && wire.error_code() != grpc::StatusCode::UNKNOWN);
}

// Streams `ids` through the engine's output path (engine_loop.cc HandleToken: the incremental
// decoder, then the stop checker, both flushed when generation ends) into stream messages; every
// text sent must be valid UTF-8.
void StreamOut(const std::vector<int32_t>& ids, const sieve::engine::StopCriteria& stop,
               bool skip_special) {
  const Tokenizer& tokenizer = *GetFixture().tokenizer;
  IncrementalDecoder decoder(tokenizer, skip_special);
  const std::vector<int32_t> eos = tokenizer.eos_ids();
  StopChecker checker(stop, eos);
  v1::GenerateResponse message;
  for (int32_t id : ids) {
    absl::StatusOr<std::string> piece = decoder.Push(id);
    const std::string text = piece.ok() ? *std::move(piece) : std::string();
    Check(ValidUtf8(text));
    StopChecker::Step step = checker.Push(id, text);
    if (step.finish != FinishReason::kNone) {
      step.emit += checker.Flush();
      if (step.finish == FinishReason::kLength) step.emit += decoder.Flush();
    }
    sieve::engine::TokenDelta delta;
    delta.token_ids.push_back(id);
    delta.text = std::move(step.emit);
    Check(ValidUtf8(delta.text));
    sieve::server::AppendDelta(delta, tokenizer, &message);
    Check(ValidUtf8(message.text()));
    if (step.finish != FinishReason::kNone) break;
  }
  std::string wire;
  Check(message.SerializeToString(&wire));
}

void Generate(const v1::GenerateRequest& request) {
  const Fixture& f = GetFixture();
  absl::StatusOr<sieve::engine::RequestSpec> spec =
      sieve::server::ToRequestSpec(request, *f.tokenizer, f.limits);
  const bool text_prompt = request.prompt_case() == v1::GenerateRequest::kText;
  if (text_prompt && !ValidUtf8(request.text())) {
    Check(!spec.ok() && spec.status().code() == absl::StatusCode::kInvalidArgument);
  }
  if (!spec.ok()) {
    CheckRejection(spec.status());
    return;
  }
  Check(!spec->prompt.empty());
  for (int32_t id : spec->prompt) Check(id >= 0 && id < f.limits.vocab_size);
  Check(spec->stop.max_tokens >= 1);
  Check(static_cast<int64_t>(spec->prompt.size()) + spec->stop.max_tokens <=
        f.limits.context_tokens);
  Check(static_cast<int>(spec->stop.stop_strings.size()) <= f.limits.max_stop_strings);
  Check(spec->sampling.Validate().ok());
  Check(spec->stop.Validate(f.limits.vocab_size).ok());
  Check(spec->client_request_id.size() <= sieve::server::kMaxRequestIdBytes);
  if (text_prompt) {
    const bool add_special = !request.has_add_special_tokens() || request.add_special_tokens();
    absl::StatusOr<std::vector<int32_t>> again = f.tokenizer->Encode(request.text(), add_special);
    Check(again.ok() && *again == spec->prompt);
  }
  StreamOut(spec->prompt, spec->stop, /*skip_special=*/true);
}

void Tokenize(const v1::TokenizeRequest& request) {
  const Tokenizer& tokenizer = *GetFixture().tokenizer;
  const bool add_special = !request.has_add_special_tokens() || request.add_special_tokens();
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(request.text(), add_special);
  if (!ValidUtf8(request.text())) {
    Check(!ids.ok() && ids.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  Check(ids.ok());
  for (int32_t id : *ids) {
    Check(id >= 0 && id < tokenizer.vocab_size());
    Check(tokenizer.TokenBytes(id).ok());
  }
}

void Detokenize(const v1::DetokenizeRequest& request) {
  const Fixture& f = GetFixture();
  const auto& wire_ids = request.token_ids();
  absl::Status valid = sieve::server::CheckTokenIds(wire_ids, f.limits.vocab_size, "token_ids");
  if (!valid.ok()) {
    CheckRejection(valid);
    return;
  }
  const bool skip = !request.has_skip_special_tokens() || request.skip_special_tokens();
  const std::vector<int32_t> ids(wire_ids.begin(), wire_ids.end());
  absl::StatusOr<std::string> text = f.tokenizer->Decode(ids, skip);
  Check(text.ok() && ValidUtf8(*text));
  sieve::engine::StopCriteria stop;
  stop.max_tokens = 1 << 30;
  stop.ignore_eos = true;
  StreamOut(ids, stop, skip);
}

}  // namespace

// The wire parser logs each proto3 string with invalid UTF-8 it refuses; that is expected here.
extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  google::protobuf::SetLogHandler(nullptr);
  GetFixture();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t selector = data[0] % 4;
  const char* body = reinterpret_cast<const char*>(data + 1);
  const int body_size = static_cast<int>(size - 1);
  switch (selector) {
    case 0: {
      v1::GenerateRequest request;
      if (request.ParseFromArray(body, body_size)) Generate(request);
      break;
    }
    case 1: {
      v1::TokenizeRequest request;
      if (request.ParseFromArray(body, body_size)) Tokenize(request);
      break;
    }
    case 2: {
      v1::DetokenizeRequest request;
      if (request.ParseFromArray(body, body_size)) Detokenize(request);
      break;
    }
    default: {
      v1::GenerateRequest generate;
      generate.set_text(std::string(body, body_size));
      Generate(generate);
      v1::TokenizeRequest tokenize;
      tokenize.set_text(std::string(body, body_size));
      Tokenize(tokenize);
      break;
    }
  }
  return 0;
}
