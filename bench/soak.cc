// sieve_soak: a bounded soak test of the CPU daemon. Spawns `sieved` on the embedded model
// (loopback, ports picked by the kernel), drives it for --minutes with mixed load and churn from
// --clients threads, and samples the daemon's resident memory, open file descriptors and
// threads every --interval-s seconds from /proc into a CSV. At the end it lets the daemon go
// idle, compares, and prints a verdict: FLAT or GROWING (exit code 0 or 1).
//
// The load, per request, drawn at random:
//   55% a greedy or sampled Generate read to the end (prompt 4..384 tokens, 1..48 new tokens,
//       text or token ids, sometimes stop strings and logprobs);
//   15% a Generate cancelled by the client after 0..8 messages;
//   10% a Generate with a deadline of 1..300 ms (expires queued, prefilling or decoding);
//   10% an invalid request (bad sampling value, out-of-vocabulary id, too long a request id);
//   10% Tokenize / Detokenize / GetModelInfo.
//
// Verdict (thresholds derived from what a leak would do over the run, not from measurements):
//   - fds and threads with the daemon idle after the first load phase (the warm-up, a tenth of
//     the run, at least 30 s) and idle at the end: equal within +2 (gRPC may keep a spare
//     worker thread or a listening socket's accepted connection pending close);
//   - RSS: the median of the last quarter of load samples against the median of the second
//     quarter: growth under max(8 MiB, 5%). A leak of one page per request at ~20 requests/s
//     would add ~80 MiB per 10 minutes; allocator caches settle within the warm-up.
//
//   sieve_soak --sieved build/server/sieved --minutes 10 --csv bench/results/soak.csv
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "sieve/v1/sieve.grpc.pb.h"

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string sieved;
  double minutes = 10;
  double interval_s = 5;
  int clients = 8;
  std::string csv = "soak.csv";
  uint64_t seed = 1;
};

struct Sample {
  double t_s = 0;
  long rss_kb = 0;
  int fds = 0;
  int threads = 0;
  bool idle = false;  // taken with no load running
};

// The daemon child process, its log collected by a reader thread.
class Daemon {
 public:
  bool Start(const std::string& binary) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return false;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDERR_FILENO);
    std::vector<std::string> args = {
        binary,
        "--set", "server.listen_address=127.0.0.1:0",
        "--set", "metrics.listen_address=127.0.0.1:0",
        "--set", std::string("model.directory=") + SIEVE_SOURCE_DIR + "/models/embedded",
        "--set", "kv_cache.num_pages=1024",
        "--set", "scheduler.max_batch_tokens=1024",
        "--set", "scheduler.prefill_chunk_tokens=256",
        "--set", "scheduler.max_queued_requests=64",
        "--set", "server.drain_grace_period_s=5"};
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const int rc = posix_spawn(&pid_, binary.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    if (rc != 0) {
      close(fds[0]);
      return false;
    }
    reader_ = std::thread([this, fd = fds[0]] {
      char buf[4096];
      ssize_t n;
      while ((n = read(fd, buf, sizeof(buf))) > 0) {
        std::lock_guard<std::mutex> lock(mu_);
        log_.append(buf, static_cast<size_t>(n));
      }
      close(fd);
    });
    return true;
  }

  // Waits for "gRPC listening on HOST:PORT," and returns HOST:PORT ("" on timeout or exit).
  std::string WaitListening(double timeout_s) {
    const auto end = Clock::now() + std::chrono::duration<double>(timeout_s);
    while (Clock::now() < end) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        const size_t at = log_.find("gRPC listening on ");
        if (at != std::string::npos) {
          const size_t from = at + std::strlen("gRPC listening on ");
          const size_t comma = log_.find(',', from);
          if (comma != std::string::npos) return log_.substr(from, comma - from);
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return "";
  }

  // SIGTERM, then waits for the exit; returns the exit status (128 + signal when killed).
  int Stop() {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    if (reader_.joinable()) reader_.join();
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  ~Daemon() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (reader_.joinable()) reader_.join();
  }

  pid_t pid() const { return pid_; }
  std::string log() const {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }

 private:
  pid_t pid_ = -1;
  std::thread reader_;
  mutable std::mutex mu_;
  std::string log_;
};

Sample Measure(pid_t pid, double t_s, bool idle) {
  Sample s;
  s.t_s = t_s;
  s.idle = idle;
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) s.rss_kb = std::strtol(line.c_str() + 6, nullptr, 10);
    if (line.rfind("Threads:", 0) == 0) s.threads = std::atoi(line.c_str() + 8);
  }
  if (DIR* dir = opendir(("/proc/" + std::to_string(pid) + "/fd").c_str())) {
    while (dirent* e = readdir(dir)) s.fds += e->d_name[0] != '.';
    closedir(dir);
  }
  return s;
}

// What the clients did, by outcome.
struct Counts {
  std::atomic<long> sent{0}, ok{0}, cancelled{0}, deadline{0}, invalid{0}, exhausted{0},
      other{0};
};

void CountStatus(const grpc::Status& status, bool expect_invalid, Counts* counts) {
  switch (status.error_code()) {
    case grpc::StatusCode::OK: ++counts->ok; break;
    case grpc::StatusCode::CANCELLED: ++counts->cancelled; break;
    case grpc::StatusCode::DEADLINE_EXCEEDED: ++counts->deadline; break;
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
      ++(expect_invalid ? counts->invalid : counts->other);
      break;
    case grpc::StatusCode::RESOURCE_EXHAUSTED: ++counts->exhausted; break;
    default:
      ++counts->other;
      std::cerr << "soak: unexpected status " << status.error_code() << ": "
                << status.error_message() << "\n";
  }
}

void ClientLoop(sieve::v1::Sieve::Stub* stub, uint64_t seed, const std::atomic<bool>* stop,
                Counts* counts) {
  std::mt19937_64 rng(seed);
  auto uniform = [&rng](int lo, int hi) {
    return std::uniform_int_distribution<int>(lo, hi)(rng);
  };
  const char* const kWords[] = {"the", " cat", " sat", " on", " a", " mat", " caf\xC3\xA9",
                                " \xE6\x97\xA5\xE6\x9C\xAC", " \xF0\x9F\x98\x80", "\n", " 42"};
  while (!stop->load()) {
    const int kind = uniform(0, 99);
    ++counts->sent;
    if (kind >= 90) {  // unary calls
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
      grpc::Status status;
      if (kind < 94) {
        sieve::v1::TokenizeRequest req;
        req.set_text("soak test \xF0\x9F\x98\x80 text");
        req.set_return_pieces(true);
        sieve::v1::TokenizeResponse resp;
        status = stub->Tokenize(&ctx, req, &resp);
      } else if (kind < 98) {
        sieve::v1::DetokenizeRequest req;
        for (int i = uniform(1, 64); i > 0; --i) req.add_token_ids(uniform(0, 4095));
        sieve::v1::DetokenizeResponse resp;
        status = stub->Detokenize(&ctx, req, &resp);
      } else {
        sieve::v1::GetModelInfoRequest req;
        sieve::v1::ModelInfo resp;
        status = stub->GetModelInfo(&ctx, req, &resp);
      }
      CountStatus(status, false, counts);
      continue;
    }
    sieve::v1::GenerateRequest req;
    if (uniform(0, 1) == 0) {
      std::string text;
      for (int i = uniform(2, 120); i > 0; --i) text += kWords[uniform(0, 10)];
      req.set_text(text);
    } else {
      for (int i = uniform(4, 384); i > 0; --i) req.mutable_token_ids()->add_ids(uniform(3, 4095));
    }
    req.mutable_stop()->set_max_tokens(uniform(1, 48));
    req.mutable_stop()->set_ignore_eos(true);
    if (uniform(0, 1) == 0) req.mutable_sampling()->set_temperature(0);
    req.mutable_sampling()->set_seed(rng());
    if (uniform(0, 4) == 0) req.mutable_stop()->add_stop_strings(" mat");
    if (uniform(0, 4) == 0) {
      req.set_logprobs(true);
      req.set_top_logprobs(uniform(0, 5));
    }
    const bool invalid = kind >= 80;
    if (invalid) {
      switch (uniform(0, 2)) {
        case 0: req.mutable_sampling()->set_top_p(1.5f); break;
        case 1: req.mutable_token_ids()->add_ids(1 << 20); break;
        default: req.set_request_id(std::string(200, 'x')); break;
      }
    }
    grpc::ClientContext ctx;
    const bool short_deadline = kind >= 70 && kind < 80;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     (short_deadline ? std::chrono::milliseconds(uniform(1, 300))
                                     : std::chrono::milliseconds(120000)));
    const bool cancel = kind >= 55 && kind < 70;
    const int cancel_after = uniform(0, 8);
    std::unique_ptr<grpc::ClientReader<sieve::v1::GenerateResponse>> reader =
        stub->Generate(&ctx, req);
    sieve::v1::GenerateResponse msg;
    int received = 0;
    if (cancel && cancel_after == 0) ctx.TryCancel();
    while (reader->Read(&msg)) {
      if (cancel && ++received >= cancel_after) ctx.TryCancel();
    }
    CountStatus(reader->Finish(), invalid, counts);
  }
}

double Median(std::vector<long> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

bool ParseFlags(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) {
      std::cerr << "soak: " << flag << " needs a value\n";
      return false;
    }
    const std::string value = argv[++i];
    if (flag == "--sieved") o->sieved = value;
    else if (flag == "--minutes") o->minutes = std::atof(value.c_str());
    else if (flag == "--interval-s") o->interval_s = std::atof(value.c_str());
    else if (flag == "--clients") o->clients = std::atoi(value.c_str());
    else if (flag == "--csv") o->csv = value;
    else if (flag == "--seed") o->seed = std::strtoull(value.c_str(), nullptr, 10);
    else {
      std::cerr << "soak: unknown flag " << flag << "\n";
      return false;
    }
  }
  if (o->sieved.empty() || !(o->minutes > 0) || !(o->interval_s > 0) || o->clients < 1) {
    std::cerr << "usage: sieve_soak --sieved PATH [--minutes 10] [--interval-s 5] "
                 "[--clients 8] [--csv soak.csv] [--seed 1]\n";
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  if (!ParseFlags(argc, argv, &opt)) return 2;
  Daemon daemon;
  if (!daemon.Start(opt.sieved)) {
    std::cerr << "soak: cannot start " << opt.sieved << "\n";
    return 2;
  }
  const std::string target = daemon.WaitListening(120);
  if (target.empty()) {
    std::cerr << "soak: the daemon did not start listening:\n" << daemon.log();
    return 2;
  }
  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  auto stub = sieve::v1::Sieve::NewStub(channel);
  // Serving once GetModelInfo answers (the model loads after the port opens).
  for (const auto give_up = Clock::now() + std::chrono::minutes(5);;) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    sieve::v1::ModelInfo info;
    if (stub->GetModelInfo(&ctx, sieve::v1::GetModelInfoRequest(), &info).ok()) break;
    if (Clock::now() > give_up) {
      std::cerr << "soak: the daemon never served:\n" << daemon.log();
      return 2;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  std::ofstream csv(opt.csv);
  csv << "t_s,phase,rss_kb,fds,threads,sent,ok,cancelled,deadline_exceeded,invalid,"
         "resource_exhausted,other_errors\n";
  Counts counts;
  std::vector<Sample> samples;
  const auto t0 = Clock::now();
  auto now_s = [&t0] { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  auto record = [&](bool idle, const char* phase) {
    Sample s = Measure(daemon.pid(), now_s(), idle);
    samples.push_back(s);
    csv << s.t_s << "," << phase << "," << s.rss_kb << "," << s.fds << "," << s.threads << ","
        << counts.sent << "," << counts.ok << "," << counts.cancelled << "," << counts.deadline
        << "," << counts.invalid << "," << counts.exhausted << "," << counts.other << "\n";
    csv.flush();
    return s;
  };
  // Runs the clients for `seconds`, sampling as it goes; then waits until the daemon is idle.
  auto load_phase = [&](double seconds, uint64_t seed) {
    std::atomic<bool> stop{false};
    std::vector<std::thread> clients;
    for (int c = 0; c < opt.clients; ++c) {
      clients.emplace_back(ClientLoop, stub.get(), seed * 1000 + c, &stop, &counts);
    }
    const double end = now_s() + seconds;
    while (now_s() < end) {
      std::this_thread::sleep_for(std::chrono::duration<double>(
          std::min(opt.interval_s, std::max(0.0, end - now_s()))));
      record(false, "load");
    }
    stop = true;
    for (std::thread& t : clients) t.join();
    // Cancelled streams finish within a step; give gRPC a moment to close them.
    std::this_thread::sleep_for(std::chrono::seconds(3));
  };
  const Sample start = record(true, "start");
  const double total_s = opt.minutes * 60;
  const double warmup_s = std::max(30.0, total_s / 10);
  load_phase(warmup_s, opt.seed);
  const Sample warm_idle = record(true, "idle-after-warmup");
  load_phase(total_s - warmup_s, opt.seed + 1);
  const Sample end_idle = record(true, "idle-at-end");
  const int exit_code = daemon.Stop();

  // RSS under load: second quarter against last quarter of the load samples after warm-up.
  std::vector<long> load_rss;
  for (const Sample& s : samples) {
    if (!s.idle && s.t_s > warm_idle.t_s) load_rss.push_back(s.rss_kb);
  }
  const size_t n = load_rss.size();
  const double early = Median(std::vector<long>(load_rss.begin() + n / 4, load_rss.begin() + n / 2));
  const double late = Median(std::vector<long>(load_rss.begin() + 3 * n / 4, load_rss.end()));
  const double rss_allow_kb = std::max(8.0 * 1024, 0.05 * early);
  const bool rss_flat = n >= 8 && late - early < rss_allow_kb;
  const bool fds_flat = end_idle.fds <= warm_idle.fds + 2;
  const bool threads_flat = end_idle.threads <= warm_idle.threads + 2;
  const bool clean_exit = exit_code == 0;
  const bool no_errors = counts.other == 0;
  std::printf(
      "soak: %.1f min, %d clients, %ld requests (ok %ld, cancelled %ld, deadline %ld, invalid "
      "%ld, resource_exhausted %ld, unexpected %ld)\n",
      now_s() / 60, opt.clients, counts.sent.load(), counts.ok.load(), counts.cancelled.load(),
      counts.deadline.load(), counts.invalid.load(), counts.exhausted.load(),
      counts.other.load());
  std::printf("soak: start rss %ld KiB fds %d threads %d\n", start.rss_kb, start.fds,
              start.threads);
  std::printf("soak: idle after warm-up: rss %ld KiB, fds %d, threads %d; idle at end: rss %ld "
              "KiB, fds %d, threads %d\n",
              warm_idle.rss_kb, warm_idle.fds, warm_idle.threads, end_idle.rss_kb, end_idle.fds,
              end_idle.threads);
  std::printf("soak: load rss median 2nd quarter %.0f KiB, last quarter %.0f KiB (allowed +%.0f)\n",
              early, late, rss_allow_kb);
  std::printf("soak: rss %s, fds %s, threads %s, daemon exit %d, unexpected errors %ld\n",
              rss_flat ? "flat" : "GROWING", fds_flat ? "flat" : "GROWING",
              threads_flat ? "flat" : "GROWING", exit_code, counts.other.load());
  const bool flat = rss_flat && fds_flat && threads_flat && clean_exit && no_errors;
  std::printf("soak: verdict %s\n", flat ? "FLAT" : "NOT FLAT");
  return flat ? 0 : 1;
}
