// Test harness for the integration tests: runs the real `sieved` binary as a child process on
// loopback (ports picked by the kernel and read back from its log), talks to it over gRPC, reads
// its metrics endpoint with a plain HTTP GET, and runs the `sieve` CLI. Waiting is always
// polling with a deadline, never a fixed sleep.
#ifndef SIEVE_TESTS_SIEVED_HARNESS_H_
#define SIEVE_TESTS_SIEVED_HARNESS_H_

#include <signal.h>
#include <sys/types.h>

#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/time/time.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/support/metrics_text.h"
#include "sieve/v1/sieve.grpc.pb.h"

namespace sieve::test {

using ::grpc::health::v1::Health;
using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;

inline constexpr int kKvPages = 2048;          // the test config's kv_cache.num_pages
inline constexpr int kLongGeneration = 20000;  // tokens: longer than any test lets a stream run

// `timeout` times SIEVE_TEST_TIME_SCALE (a number >= 1, default 1). scripts/sanitize.sh sets it
// for its builds, whose daemon starts and runs several times slower: the waits below that give
// a daemon time to do something (start, answer, exit) scale by it; a deadline a test sets to
// make a request fail does not.
absl::Duration Scaled(absl::Duration timeout);

// Polls `done` every 10 ms until it holds or `timeout` (scaled) passes; returns its last value.
bool PollUntil(const std::function<bool()>& done, absl::Duration timeout = absl::Seconds(20));

// The base configuration every daemon starts from (the embedded model, kKvPages KV pages,
// loopback ports 0), written once to the test's temp dir.
std::string BaseConfigPath();

// Runs `binary args...` to completion; returns its exit code and its stdout + stderr.
std::pair<int, std::string> RunTool(const std::string& binary, std::vector<std::string> args);

// Test certificates made by the openssl CLI in `dir` (P-256 keys, valid one day); an openssl
// failure is a test failure. MakeTestCa: a self-signed CA `name`.pem / `name`.key (CN `name`).
// MakeTestLeaf: `name`.pem / `name`.key for the subject alternative names `san`, signed by the
// CA `ca`, with common name `cn` (empty: `name`).
void MakeTestCa(const std::string& dir, const std::string& name);
void MakeTestLeaf(const std::string& dir, const std::string& name, const std::string& ca,
                  const std::string& san = "DNS:localhost,IP:127.0.0.1",
                  const std::string& cn = "");

// A `sieved` child process. Its stdout and stderr are collected (shown when a test fails).
class Sieved {
 public:
  // Spawns sieved with `args` (after `--config BaseConfigPath()` unless `with_config` is
  // false). Does not wait for anything. The daemon is killed (SIGKILL) when the calling thread
  // ends, so spawn from a thread that outlives it (the test's own).
  static std::unique_ptr<Sieved> Spawn(std::vector<std::string> args, bool with_config = true);

  // Spawns and waits (as test expectations) until it listens and health is SERVING.
  static std::unique_ptr<Sieved> StartServing(std::vector<std::string> args = {});

  // SIGKILLs the process if it still runs.
  ~Sieved();

  // Waits for the "gRPC listening on" log line and reads both ports from it.
  bool WaitListening(absl::Duration timeout = absl::Seconds(20));

  // "127.0.0.1:<port>", once WaitListening() succeeded.
  const std::string& target() const { return target_; }
  int metrics_port() const { return metrics_port_; }

  // One channel to the daemon, shared by the test's stubs.
  std::shared_ptr<grpc::Channel> channel();
  std::unique_ptr<v1::Sieve::Stub> stub() { return v1::Sieve::NewStub(channel()); }

  // The health status of `service`, or UNKNOWN when the call fails (its status in `status`).
  HealthCheckResponse::ServingStatus HealthStatus(const std::string& service,
                                                  grpc::Status* status = nullptr);

  // Reads and parses /metrics (failures are test expectations).
  test_support::ParsedMetrics Metrics();

  void Signal(int sig) { kill(pid_, sig); }

  // The process id (for /proc).
  pid_t pid() const { return pid_; }

  // Waits up to `timeout` (scaled) for the process to exit; returns its exit code (128 + signal when
  // killed), or nullopt while it runs.
  std::optional<int> WaitExit(absl::Duration timeout);

  // Everything the process has written so far.
  std::string logs() const;

 private:
  Sieved() = default;
  void Launch(const std::vector<std::string>& args);

  pid_t pid_ = -1;
  std::optional<int> exit_code_;
  std::string target_;
  int metrics_port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
  std::thread reader_;
  // std::mutex here and below: ThreadSanitizer sees it (Debian's Abseil is uninstrumented;
  // scripts/sanitize.sh).
  mutable std::mutex mu_;
  std::string log_;  // guarded by mu_
};

// What one Generate stream delivered.
struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> ids;
  std::string text;
  int messages = 0;
  std::set<std::string> request_ids;
  std::optional<v1::Completion> completion;
};

// Reads `reader` to the end.
StreamResult Drain(grpc::ClientReader<v1::GenerateResponse>& reader);

// Runs one Generate call to the end (deadline `timeout`, default 60 s scaled).
StreamResult Generate(v1::Sieve::Stub& stub, const v1::GenerateRequest& request,
                      std::optional<absl::Duration> timeout = std::nullopt);

// A greedy request for `ids` that generates exactly `max_tokens` tokens.
v1::GenerateRequest Greedy(const std::vector<int32_t>& ids, int max_tokens);
// A prompt of `n` token ids drawn from the embedded model's vocabulary (4096 ids; 0 and 1 are
// BOS and EOS), reproducible from `seed`.
std::vector<int32_t> RandomPrompt(size_t n, uint32_t seed);

// The same with a text prompt.
v1::GenerateRequest GreedyText(const std::string& text, int max_tokens);

// A stream kept open by the test (for cancellation, drain and overflow).
struct OpenStream {
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;
  v1::GenerateResponse first;
  bool got_first = false;

  OpenStream(v1::Sieve::Stub& stub, const v1::GenerateRequest& request,
             std::optional<absl::Duration> timeout = std::nullopt) {
    if (timeout) {
      context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(*timeout));
    }
    reader = stub.Generate(&context, request);
  }
  // Blocks until the first message; false if the stream ended instead.
  bool ReadFirst() { return got_first = reader->Read(&first); }
};

// Engine load as the metrics report it.
struct Load {
  double running = 0, waiting = 0, kv_used = 0, kv_free = 0, kv_cached = 0;
};

// Reads the load gauges from `d`'s metrics.
Load ReadLoad(Sieved& d);

// True once no request runs or waits and the pages held by requests (used minus those only
// the prefix cache holds) are back to `baseline`'s.
bool AtBaseline(Sieved& d, const Load& baseline);

// Server reflection (grpc.reflection.v1alpha) spoken with hand-encoded messages: Debian ships
// the reflection library but not its generated headers. `request` is an encoded
// ServerReflectionRequest; returns the encoded first response.
std::string Reflect(grpc::Channel& channel, const std::string& request);

// Returns the length-delimited fields numbered `field` of the encoded message `bytes`.
std::vector<std::string> Fields(const std::string& bytes, int field);

// The metric names and types documented in the table of server/metrics.h.
std::vector<std::pair<std::string, std::string>> DocumentedMetrics();

// Collects the distinct successive statuses of a health Watch("") stream on its own thread.
class HealthWatch {
 public:
  // Starts watching (waiting for the server to be reachable).
  explicit HealthWatch(std::shared_ptr<grpc::Channel> channel);
  // Cancels the watch and joins its thread.
  ~HealthWatch();

  // The statuses seen so far, consecutive duplicates removed.
  std::vector<HealthCheckResponse::ServingStatus> seen() const;

 private:
  std::unique_ptr<Health::Stub> stub_;
  grpc::ClientContext context_;
  std::thread thread_;
  mutable std::mutex mu_;
  std::vector<HealthCheckResponse::ServingStatus> seen_;  // guarded by mu_
};

}  // namespace sieve::test

#endif  // SIEVE_TESTS_SIEVED_HARNESS_H_
