// `sieved`: the Sieve serving daemon.
//
//   sieved --config configs/default.yaml [--set section.key=value ...] [--listen ADDR] ...
//
// Loads the configuration (file, then overrides in command-line order), starts the metrics and
// gRPC listeners, loads the model, serves until SIGTERM or SIGINT, then drains (see
// server/daemon.h) and exits 0. A second signal during the drain cuts the grace period short.
// Exit codes: 0 after a clean drain, 1 when start-up fails, 2 for a bad command line or config,
// 3 after the backend failed for good (health turned NOT_SERVING, then a drain).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <iostream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "engine/testing/async_backend.h"
#include "server/config.h"
#include "server/config_docs.h"
#include "server/daemon.h"
#include "server/log.h"

namespace sieve::server {
namespace {

constexpr char kUsage[] = R"(usage: sieved [--config FILE] [options]

Sieve's serving daemon: streams completions over gRPC (sieve.v1.Sieve, grpc.health.v1.Health,
server reflection) and exports Prometheus metrics over HTTP. SIGTERM or SIGINT drains: health
turns NOT_SERVING, new calls get UNAVAILABLE, in-flight requests finish (up to
server.drain_grace_period_s), then it exits 0. When the backend fails for good (a sticky CUDA
error), health turns NOT_SERVING, every request fails with UNAVAILABLE, and it drains and exits 3.

options:
  --config FILE          YAML configuration (e.g. configs/default.yaml); without it every key
                         takes its default
  --set KEY=VALUE        override one configuration key (repeatable), e.g.
                         --set scheduler.max_batch_tokens=4096 --set model.devices=1
  --listen ADDR          same as --set server.listen_address=ADDR
  --metrics-listen ADDR  same as --set metrics.listen_address=ADDR
  --model-dir DIR        same as --set model.directory=DIR
  --backend NAME         same as --set model.backend=NAME (cpu or cuda)
  --log-level LEVEL      same as --set logging.level=LEVEL
  --print-config         print the effective configuration as YAML, every key with its doc,
                         and exit (with no --config or --set: configs/default.yaml)
  --help                 print this help, with every configuration key, and exit
  --version              print the version and exit

Overrides apply after the file, in command-line order.
)";

// Testing only: seconds to wait before loading the model, so that tests can watch health
// report NOT_SERVING first. Not a configuration key.
constexpr std::string_view kTestLoadDelayFlag = "--testing-load-delay-s";

// Testing only: serve on the asynchronous test backend (engine/testing/async_backend.h) and lose
// the device at its N-th operator, so that tests can watch health, the failed requests and the
// exit status. Not a configuration key; ignores model.backend.
constexpr std::string_view kTestDeviceLostFlag = "--testing-device-lost-after-ops";
// Testing only: as above, but the N-th operator hangs forever (the step watchdog's case).
constexpr std::string_view kTestHangFlag = "--testing-hang-after-ops";
// Testing only: a prefill daemon waits this many milliseconds before each KV page chunk it
// streams (server/kv_transfer_service.h), so that tests can act while transfers are in flight.
constexpr std::string_view kTestKvChunkDelayFlag = "--testing-kv-chunk-delay-ms";
// Testing only: the model load sleeps this many milliseconds after each weight tensor, so that
// tests can signal the daemon mid-load.
constexpr std::string_view kTestLoadTensorDelayFlag = "--testing-load-tensor-delay-ms";

struct CommandLine {
  std::string config_path;
  std::vector<std::string> overrides;
  bool print_config = false;
  double test_load_delay_s = 0;
  int64_t test_device_lost_after_ops = 0;  // 0: off
  int64_t test_hang_after_ops = 0;         // 0: off
  int64_t test_kv_chunk_delay_ms = 0;      // 0: off
  int64_t test_load_tensor_delay_ms = 0;   // 0: off
};

// Parses argv; returns an exit code to leave with (help printed, or a usage error), or -1.
int ParseCommandLine(int argc, char** argv, CommandLine& out) {
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    std::string_view name = arg;
    std::string value;
    bool has_value = false;
    if (const size_t eq = arg.find('='); arg.starts_with("--") && eq != arg.npos) {
      name = arg.substr(0, eq);
      value = std::string(arg.substr(eq + 1));
      has_value = true;
    }
    auto take = [&]() -> bool {
      if (has_value) return true;
      if (i + 1 >= argc) {
        std::cerr << "sieved: " << name << " needs a value\n";
        return false;
      }
      value = argv[++i];
      return true;
    };
    auto key_override = [&](std::string_view key) {
      out.overrides.push_back(absl::StrCat(std::string(key), "=", value));
    };
    if (name == "--version") {
      std::cout << "sieved " << SIEVE_VERSION << "\n";
      return 0;
    } else if (name == "--help" || name == "-h") {
      std::cout << kUsage << "\nconfiguration keys:\n\n" << FormatConfigHelp();
      return 0;
    } else if (name == "--print-config") {
      out.print_config = true;
    } else if (name == "--config") {
      if (!take()) return 2;
      out.config_path = value;
    } else if (name == "--set") {
      if (!take()) return 2;
      out.overrides.push_back(value);
    } else if (name == "--listen") {
      if (!take()) return 2;
      key_override("server.listen_address");
    } else if (name == "--metrics-listen") {
      if (!take()) return 2;
      key_override("metrics.listen_address");
    } else if (name == "--model-dir") {
      if (!take()) return 2;
      key_override("model.directory");
    } else if (name == "--backend") {
      if (!take()) return 2;
      key_override("model.backend");
    } else if (name == "--log-level") {
      if (!take()) return 2;
      key_override("logging.level");
    } else if (name == kTestLoadDelayFlag) {
      if (!take()) return 2;
      if (!absl::SimpleAtod(value, &out.test_load_delay_s) || out.test_load_delay_s < 0) {
        std::cerr << "sieved: " << name << ": not a duration in seconds: " << value << "\n";
        return 2;
      }
    } else if (name == kTestLoadTensorDelayFlag) {
      if (!take()) return 2;
      if (!absl::SimpleAtoi(value, &out.test_load_tensor_delay_ms) ||
          out.test_load_tensor_delay_ms < 0) {
        std::cerr << "sieved: " << name << ": not a count of milliseconds: " << value << "\n";
        return 2;
      }
    } else if (name == kTestKvChunkDelayFlag) {
      if (!take()) return 2;
      if (!absl::SimpleAtoi(value, &out.test_kv_chunk_delay_ms) || out.test_kv_chunk_delay_ms < 0) {
        std::cerr << "sieved: " << name << ": not a count of milliseconds: " << value << "\n";
        return 2;
      }
    } else if (name == kTestDeviceLostFlag || name == kTestHangFlag) {
      if (!take()) return 2;
      int64_t& n = name == kTestHangFlag ? out.test_hang_after_ops : out.test_device_lost_after_ops;
      if (!absl::SimpleAtoi(value, &n) || n < 1) {
        std::cerr << "sieved: " << name << ": not a positive count: " << value << "\n";
        return 2;
      }
    } else {
      std::cerr << "sieved: unknown argument '" << arg << "' (see sieved --help)\n";
      return 2;
    }
  }
  return -1;
}

// The write end of the signal pipe (see SignalWatcher); -1 before it exists.
std::atomic<int> g_signal_pipe{-1};

// Async-signal-safe: records the signal number in the pipe and returns.
extern "C" void OnTerminationSignal(int sig) {
  const int fd = g_signal_pipe.load();
  if (fd < 0) return;
  const unsigned char byte = static_cast<unsigned char>(sig);
  const int saved = errno;
  (void)!write(fd, &byte, 1);
  errno = saved;
}

// Turns SIGTERM / SIGINT into notifications on its own thread: the first notifies `drain`, the
// second `cut_short`. The handler only writes the signal number into a pipe (self-pipe), so all
// work stays out of signal handlers; and since a handler runs on whichever thread the kernel
// picks, it also works when libraries start threads before main (OpenBLAS does, in its library
// constructor, so blocking the signals in main could not cover its threads).
class SignalWatcher {
 public:
  SignalWatcher() {
    if (pipe2(fds_, O_CLOEXEC | O_NONBLOCK) == 0) {
      g_signal_pipe.store(fds_[1]);
      struct sigaction action = {};
      action.sa_handler = OnTerminationSignal;
      sigemptyset(&action.sa_mask);
      action.sa_flags = SA_RESTART;
      sigaction(SIGTERM, &action, nullptr);
      sigaction(SIGINT, &action, nullptr);
    }
    thread_ = std::thread([this] { Run(); });
  }
  ~SignalWatcher() {
    stop_.store(true);
    thread_.join();
  }

  absl::Notification drain;
  absl::Notification cut_short;

 private:
  void Run() {
    int received = 0;
    while (!stop_.load() && received < 2) {
      pollfd pfd = {fds_[0], POLLIN, 0};
      if (poll(&pfd, 1, 200) <= 0) continue;  // timeout or EINTR
      unsigned char byte = 0;
      if (read(fds_[0], &byte, 1) != 1) continue;
      ++received;
      Log(LogLevel::kInfo, absl::StrCat("received ", byte == SIGTERM ? "SIGTERM" : "SIGINT",
                                        received == 1 ? "; draining" : "; cutting the drain short"));
      (received == 1 ? drain : cut_short).Notify();
    }
  }

  int fds_[2] = {-1, -1};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

int Run(int argc, char** argv) {
  CommandLine cmd;
  if (int code = ParseCommandLine(argc, argv, cmd); code >= 0) return code;
  absl::StatusOr<ServerConfig> config =
      cmd.config_path.empty() ? LoadConfigString("", "<defaults>", cmd.overrides)
                              : LoadConfigFile(cmd.config_path, cmd.overrides);
  if (!config.ok()) {
    std::cerr << "sieved: invalid configuration:\n" << config.status().message() << "\n";
    return 2;
  }
  if (cmd.print_config) {
    std::cout << ConfigToYaml(*config);
    return 0;
  }
  if (absl::StatusOr<LogLevel> level = ParseLogLevel(config->logging.level); level.ok()) {
    SetLogLevel(*level);
  }

  if (cmd.test_device_lost_after_ops > 0 || cmd.test_hang_after_ops > 0) {
    std::shared_ptr<engine::testing::AsyncBackendControl> control =
        engine::testing::RegisterAsyncBackend("testing-async", {});
    if (cmd.test_hang_after_ops > 0) {
      control->InjectFault(cmd.test_hang_after_ops, engine::testing::FaultKind::kHang);
    } else {
      control->InjectFault(cmd.test_device_lost_after_ops, engine::testing::FaultKind::kFatal);
    }
    config->engine.model.backend = "testing-async";
  }

  if (cmd.test_load_tensor_delay_ms > 0) {
    SetLoadTensorDelayForTesting(absl::Milliseconds(cmd.test_load_tensor_delay_ms));
  }
  if (cmd.test_kv_chunk_delay_ms > 0) {
    SetKvChunkDelayForTesting(absl::Milliseconds(cmd.test_kv_chunk_delay_ms));
  }

  SignalWatcher signals;
  Log(LogLevel::kInfo, absl::StrCat("starting: config ",
                                    cmd.config_path.empty() ? "<defaults>" : cmd.config_path,
                                    ", model ", config->engine.model.directory, ", backend ",
                                    config->engine.model.backend));
  absl::StatusOr<std::unique_ptr<Daemon>> daemon = Daemon::Start(*config);
  if (!daemon.ok()) {
    Log(LogLevel::kError, absl::StrCat("cannot start: ", daemon.status().ToString()));
    return 1;
  }
  if (cmd.test_load_delay_s > 0) {
    signals.drain.WaitForNotificationWithTimeout(absl::Seconds(cmd.test_load_delay_s));
  }
  // A signal before or during the load stops it (at the next weight tensor) and exits 0: there
  // is nothing to drain yet.
  absl::Status loaded = signals.drain.HasBeenNotified()
                            ? absl::CancelledError("a signal arrived before the model load")
                            : (*daemon)->LoadModel(&signals.drain);
  if (!loaded.ok()) {
    const bool stopped = signals.drain.HasBeenNotified();
    Log(stopped ? LogLevel::kInfo : LogLevel::kError,
        stopped ? absl::StrCat("model load stopped (", loaded.message(), "); exiting")
                : absl::StrCat("cannot load the model: ", loaded.ToString()));
    (*daemon)->Drain();
    return stopped ? 0 : 1;
  }
  // Serve until a signal, or until the backend fails for good.
  while (!signals.drain.WaitForNotificationWithTimeout(absl::Milliseconds(100))) {
    if ((*daemon)->device_lost()) break;
  }
  (*daemon)->Drain(&signals.cut_short);
  if ((*daemon)->abandoned()) std::_Exit(3);  // threads of a hung engine are still running
  return (*daemon)->device_lost() ? 3 : 0;
}

}  // namespace
}  // namespace sieve::server

int main(int argc, char** argv) { return sieve::server::Run(argc, argv); }
