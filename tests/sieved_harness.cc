#include "tests/sieved_harness.h"

#include <fcntl.h>
#include <linux/close_range.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/impl/rpc_method.h>
#include <grpcpp/support/sync_stream.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/support/http_get.h"

extern char** environ;

namespace sieve::test {

absl::Duration Scaled(absl::Duration timeout) {
  static const double scale = [] {
    const char* text = getenv("SIEVE_TEST_TIME_SCALE");
    double value = 1;
    if (text != nullptr && (!absl::SimpleAtod(text, &value) || !(value >= 1))) {
      ADD_FAILURE() << "SIEVE_TEST_TIME_SCALE=" << text << ": expected a number >= 1";
      value = 1;
    }
    return value;
  }();
  return timeout * scale;
}

// Polls `done` every 10 ms until it holds or `timeout` (scaled) passes; returns its last value.
bool PollUntil(const std::function<bool()>& done, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + Scaled(timeout);
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

// The base configuration every daemon starts from, written once to the test's temp dir. The
// name carries the process id: test binaries run in parallel share /tmp, and one truncating the
// file while another's daemon reads it left that daemon on the defaults (metrics on :9090).
std::string BaseConfigPath() {
  static const std::string path = [] {
    const std::string p =
        testing::TempDir() + "/sieved_integration_" + std::to_string(getpid()) + ".yaml";
    std::ofstream out(p);
    // The drain's grace period lets in-flight streams finish (scaled: a test's streams of a few
    // hundred tokens outlasted 30 s in the ASan build on a loaded machine).
    out << "server:\n  listen_address: \"127.0.0.1:0\"\n  drain_grace_period_s: "
        << absl::ToInt64Seconds(Scaled(absl::Seconds(30))) << "\n"
        << "metrics:\n  listen_address: \"127.0.0.1:0\"\n"
        << "model:\n  directory: \"" << SIEVE_SOURCE_DIR << "/models/embedded\"\n"
        << "kv_cache:\n  num_pages: " << kKvPages << "\n"
        << "scheduler:\n  max_batch_tokens: 1024\n  prefill_chunk_tokens: 256\n"
        << "logging:\n  level: info\n";
    return p;
  }();
  return path;
}

namespace {
void Openssl(std::vector<std::string> args) {
  auto [code, out] = RunTool("/usr/bin/openssl", std::move(args));
  ASSERT_EQ(code, 0) << out;
}
}  // namespace

void MakeTestCa(const std::string& dir, const std::string& name) {
  const std::string p = dir + "/" + name;
  Openssl({"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-keyout", p + ".key", "-out", p + ".pem", "-days", "1", "-subj", "/CN=" + name});
}

void MakeTestLeaf(const std::string& dir, const std::string& name, const std::string& ca,
                  const std::string& san, const std::string& cn) {
  const std::string p = dir + "/" + name, c = dir + "/" + ca;
  std::ofstream(p + ".cnf") << "subjectAltName=" << san << "\n";
  Openssl({"req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-keyout", p + ".key", "-out", p + ".csr", "-subj", "/CN=" + (cn.empty() ? name : cn)});
  Openssl({"x509", "-req", "-in", p + ".csr", "-CA", c + ".pem", "-CAkey", c + ".key",
           "-CAcreateserial", "-out", p + ".pem", "-days", "1", "-extfile", p + ".cnf"});
}

// A sanitizer's report in a child's output (scripts/sanitize.sh builds sieved and sieve with
// ASan + UBSan or TSan) fails the test: LeakSanitizer reports only at exit, with exit code 23,
// which a test that SIGTERMs the daemon without checking the code, or expects another non-zero
// code from a tool, would not notice.
namespace {
void ExpectNoSanitizerReport(const std::string& who, const std::string& output) {
  for (const char* marker : {"ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error: ",
                             "WARNING: ThreadSanitizer"}) {
    const size_t at = output.find(marker);
    if (at == std::string::npos) continue;
    ADD_FAILURE() << who << " printed a sanitizer report:\n"
                  << output.substr(at > 2048 ? at - 2048 : 0, 16384);
    return;
  }
}
}  // namespace

// Runs `binary args...` to completion; returns its exit code and its stdout + stderr.
std::pair<int, std::string> RunTool(const std::string& binary, std::vector<std::string> args) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return {-1, "pipe failed"};
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDERR_FILENO);
  args.insert(args.begin(), binary);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, binary.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  std::string output;
  char buffer[4096];
  ssize_t n;
  while ((n = read(fds[0], buffer, sizeof(buffer))) > 0) output.append(buffer, n);
  close(fds[0]);
  if (rc != 0) return {-1, "cannot start " + binary};
  int status = 0;
  waitpid(pid, &status, 0);
  ExpectNoSanitizerReport(binary, output);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), output};
}

// Reads `reader` to the end.
StreamResult Drain(grpc::ClientReader<v1::GenerateResponse>& reader) {
  StreamResult out;
  v1::GenerateResponse response;
  while (reader.Read(&response)) {
    ++out.messages;
    out.request_ids.insert(response.request_id());
    out.ids.insert(out.ids.end(), response.token_ids().begin(), response.token_ids().end());
    out.text += response.text();
    if (response.has_complete()) out.completion = response.complete();
  }
  out.status = reader.Finish();
  return out;
}

StreamResult Generate(v1::Sieve::Stub& stub, const v1::GenerateRequest& request,
                      std::optional<absl::Duration> timeout) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       absl::ToChronoMilliseconds(timeout.value_or(Scaled(absl::Seconds(60)))));
  auto reader = stub.Generate(&context, request);
  return Drain(*reader);
}

// A greedy request for `ids` that generates exactly `max_tokens` tokens.
v1::GenerateRequest Greedy(const std::vector<int32_t>& ids, int max_tokens) {
  v1::GenerateRequest request;
  for (int32_t id : ids) request.mutable_token_ids()->add_ids(id);
  request.mutable_sampling()->set_temperature(0);
  request.mutable_stop()->set_max_tokens(max_tokens);
  request.mutable_stop()->set_ignore_eos(true);
  return request;
}

std::vector<int32_t> RandomPrompt(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(2, 4095);
  std::vector<int32_t> ids(n);
  for (int32_t& t : ids) t = id(rng);
  return ids;
}

v1::GenerateRequest GreedyText(const std::string& text, int max_tokens) {
  v1::GenerateRequest request;
  request.set_text(text);
  request.mutable_sampling()->set_temperature(0);
  request.mutable_stop()->set_max_tokens(max_tokens);
  request.mutable_stop()->set_ignore_eos(true);
  return request;
}

Load ReadLoad(Sieved& d) {
  test_support::ParsedMetrics m = d.Metrics();
  Load l;
  l.running = m.Sum("sieve_running_requests");
  l.waiting = m.Sum("sieve_waiting_requests");
  l.kv_used = m.Sum("sieve_kv_pages_used");
  l.kv_free = m.Sum("sieve_kv_pages_free");
  l.kv_cached = m.Sum("sieve_kv_pages_cached");
  return l;
}

// True once no request runs or waits and the pages held by requests (used minus those only
// the prefix cache holds) are back to `baseline`'s.
bool AtBaseline(Sieved& d, const Load& baseline) {
  const Load l = ReadLoad(d);
  return l.running == 0 && l.waiting == 0 &&
         l.kv_used - l.kv_cached == baseline.kv_used - baseline.kv_cached &&
         l.kv_used + l.kv_free == kKvPages;
}

// Returns the length-delimited fields numbered `field` of the message `bytes`.
std::vector<std::string> Fields(const std::string& bytes, int field) {
  std::vector<std::string> out;
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(bytes.data()),
                                            static_cast<int>(bytes.size()));
  while (uint32_t tag = in.ReadTag()) {
    if ((tag & 7) == 2) {
      uint32_t length = 0;
      std::string value;
      if (!in.ReadVarint32(&length) || !in.ReadString(&value, static_cast<int>(length))) break;
      if (static_cast<int>(tag >> 3) == field) out.push_back(std::move(value));
    } else if (!google::protobuf::internal::WireFormatLite::SkipField(&in, tag)) {
      break;
    }
  }
  return out;
}

// One reflection request/response exchange; `request` is an encoded ServerReflectionRequest.
std::string Reflect(grpc::Channel& channel, const std::string& request) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  const grpc::internal::RpcMethod method(
      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
      grpc::internal::RpcMethod::BIDI_STREAMING);
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          &channel, method, &context));
  grpc::Slice slice(request);
  grpc::ByteBuffer out(&slice, 1);
  EXPECT_TRUE(stream->Write(out));
  stream->WritesDone();
  grpc::ByteBuffer in;
  std::string response;
  if (stream->Read(&in)) {
    std::vector<grpc::Slice> slices;
    EXPECT_TRUE(in.Dump(&slices).ok());
    for (const grpc::Slice& s : slices) response.append(s.begin(), s.end());
  }
  EXPECT_TRUE(stream->Finish().ok());
  return response;
}

// The metric names and types documented in server/metrics.h's table.
std::vector<std::pair<std::string, std::string>> DocumentedMetrics() {
  std::ifstream in(std::string(SIEVE_SOURCE_DIR) + "/server/metrics.h");
  std::vector<std::pair<std::string, std::string>> out;
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> cells = absl::StrSplit(line, '|');
    if (cells.size() < 4) continue;
    std::string name(absl::StripAsciiWhitespace(cells[1]));
    std::string type(absl::StripAsciiWhitespace(cells[2]));
    if (absl::StartsWith(name, "sieve_")) out.emplace_back(name, type);
  }
  return out;
}

std::unique_ptr<Sieved> Sieved::Spawn(std::vector<std::string> args, bool with_config) {
  std::unique_ptr<Sieved> d(new Sieved());
  if (with_config) args.insert(args.begin(), {"--config", BaseConfigPath()});
  d->Launch(args);
  return d;
}

std::unique_ptr<Sieved> Sieved::StartServing(std::vector<std::string> args) {
  std::unique_ptr<Sieved> d = Spawn(std::move(args));
  if (!d->WaitListening()) {
    ADD_FAILURE() << "sieved did not start listening:\n" << d->logs();
    return d;
  }
  EXPECT_TRUE(PollUntil([&] { return d->HealthStatus("") == HealthCheckResponse::SERVING; }))
      << d->logs();
  return d;
}

Sieved::~Sieved() {
  if (pid_ > 0 && !WaitExit(absl::ZeroDuration()).has_value()) {
    kill(pid_, SIGKILL);
    WaitExit(absl::Seconds(10));
  }
  if (reader_.joinable()) reader_.join();
  ExpectNoSanitizerReport("sieved (pid " + std::to_string(pid_) + ")", logs());
}

bool Sieved::WaitListening(absl::Duration timeout) {
  // A daemon that never started or has exited ends the wait at once.
  auto listening = [&] { return absl::StrContains(logs(), "metrics on port"); };
  bool exited = false;
  PollUntil([&] {
    exited = !listening() && (pid_ <= 0 || WaitExit(absl::ZeroDuration()).has_value());
    return exited || listening();
  }, timeout);
  if (exited && reader_.joinable()) reader_.join();  // the log to its end
  if (!listening()) return false;
  const std::string text = logs();
  const size_t at = text.find("gRPC listening on ") + strlen("gRPC listening on ");
  target_ = text.substr(at, text.find(',', at) - at);
  const size_t m = text.find("metrics on port ") + strlen("metrics on port ");
  return absl::SimpleAtoi(text.substr(m, text.find(' ', m) - m), &metrics_port_);
}

std::shared_ptr<grpc::Channel> Sieved::channel() {
  if (!channel_) channel_ = grpc::CreateChannel(target_, grpc::InsecureChannelCredentials());
  return channel_;
}

HealthCheckResponse::ServingStatus Sieved::HealthStatus(const std::string& service,
                                                        grpc::Status* status) {
  auto health = Health::NewStub(channel());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  HealthCheckRequest request;
  request.set_service(service);
  HealthCheckResponse response;
  grpc::Status s = health->Check(&context, request, &response);
  if (status) *status = s;
  return s.ok() ? response.status() : HealthCheckResponse::UNKNOWN;
}

test_support::ParsedMetrics Sieved::Metrics() {
  absl::StatusOr<std::string> body =
      test_support::HttpGet("127.0.0.1", metrics_port_, "/metrics", absl::Seconds(5));
  EXPECT_TRUE(body.ok()) << body.status();
  if (!body.ok()) return {};
  absl::StatusOr<test_support::ParsedMetrics> parsed = test_support::ParseMetricsText(*body);
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  return parsed.ok() ? *std::move(parsed) : test_support::ParsedMetrics();
}

std::optional<int> Sieved::WaitExit(absl::Duration timeout) {
  if (exit_code_.has_value()) return exit_code_;
  const absl::Time deadline = absl::Now() + Scaled(timeout);
  while (true) {
    int status = 0;
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      return exit_code_;
    }
    if (absl::Now() >= deadline) return std::nullopt;
    absl::SleepFor(absl::Milliseconds(10));
  }
}

std::string Sieved::logs() const {
  std::lock_guard<std::mutex> lock(mu_);
  return log_;
}

void Sieved::Launch(const std::vector<std::string>& args) {
  int fds[2];
  ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
  std::vector<std::string> argv_storage = {SIEVED_PATH};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  // fork + exec instead of posix_spawn, for PR_SET_PDEATHSIG: the daemon gets SIGKILL when the
  // thread that launched it ends, so a test process that dies without running ~Sieved (a CTest
  // timeout, a crash, an abort) leaves no daemon behind holding a port and two cores. Between
  // fork and exec the child makes only async-signal-safe calls; what fails there comes back as
  // an errno on `err` (close-on-exec: a successful exec closes it and the read sees EOF).
  int err[2];
  if (pipe2(err, O_CLOEXEC) != 0) {
    close(fds[0]);
    close(fds[1]);
    FAIL() << "cannot start " << SIEVED_PATH << ": pipe2 failed";
  }
  const pid_t parent = getpid();
  pid_ = fork();
  const int fork_errno = errno;
  if (pid_ == 0) {
    auto fail = [&](int e) {
      (void)!write(err[1], &e, sizeof(e));
      _exit(127);
    };
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) fail(errno);
    if (getppid() != parent) _exit(127);  // the test process is already gone
    if (dup2(fds[1], STDOUT_FILENO) < 0 || dup2(fds[1], STDERR_FILENO) < 0) fail(errno);
    // Nothing else of the test process's reaches the daemon (gRPC sockets, a death test's
    // status pipe, which its parent reads to the end): best effort, kernels before 5.11 refuse.
    (void)close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
    execve(SIEVED_PATH, argv.data(), environ);
    fail(errno);
  }
  close(fds[1]);
  close(err[1]);
  if (pid_ < 0) {
    close(fds[0]);
    close(err[0]);
    pid_ = -1;
    FAIL() << "cannot start " << SIEVED_PATH << ": fork failed: " << std::strerror(fork_errno);
  }
  int child_errno = 0;
  ssize_t got;
  while ((got = read(err[0], &child_errno, sizeof(child_errno))) < 0 && errno == EINTR) {
  }
  close(err[0]);
  if (got == static_cast<ssize_t>(sizeof(child_errno))) {
    close(fds[0]);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
    FAIL() << "cannot start " << SIEVED_PATH << ": " << std::strerror(child_errno);
  }
  reader_ = std::thread([this, fd = fds[0]] {
    char buffer[4096];
    ssize_t n;
    while ((n = read(fd, buffer, sizeof(buffer))) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      log_.append(buffer, static_cast<size_t>(n));
    }
    close(fd);
  });
}

HealthWatch::HealthWatch(std::shared_ptr<grpc::Channel> channel)
    : stub_(Health::NewStub(channel)) {
  context_.set_wait_for_ready(true);
  thread_ = std::thread([this] {
    HealthCheckRequest request;
    auto reader = stub_->Watch(&context_, request);
    HealthCheckResponse response;
    while (reader->Read(&response)) {
      std::lock_guard<std::mutex> lock(mu_);
      if (seen_.empty() || seen_.back() != response.status()) seen_.push_back(response.status());
    }
    reader->Finish();
  });
}

HealthWatch::~HealthWatch() {
  context_.TryCancel();
  thread_.join();
}

std::vector<HealthCheckResponse::ServingStatus> HealthWatch::seen() const {
  std::lock_guard<std::mutex> lock(mu_);
  return seen_;
}

}  // namespace sieve::test
