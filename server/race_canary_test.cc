// Checks that ThreadSanitizer, with scripts/sanitize/tsan.supp, still reports a data race in our
// own gRPC callback code (issue 15, item 6). The suppressions silence races whose top frame lies
// inside Debian's uninstrumented gRPC and Abseil; a race on our own memory, written from a gRPC
// callback and from a thread of ours, has our functions at the top of both stacks and must fail.
//
// The racy program runs in a child process (this binary again, RaceCanaryChild.Scenario, with
// SIEVE_RACE_CANARY=unguarded and TSAN_OPTIONS naming the suppressions file), like a death test:
// the parent expects the report. The same program with the int behind a std::mutex must be
// clean, so the check also fails if the suppressions stop hiding gRPC's own synchronization.
//
// The same pair runs with the write in a reactor of ours that declares gRPC's hand-off the way
// the daemon's reactors do (server/tsan_handoff.h: TsanHandOff before handing the reactor to
// gRPC, TsanTakeOver first thing in OnDone): the declared ordering must not hide a race between
// the callback and a thread of ours that never handed the reactor over.
//
// In builds without ThreadSanitizer every child must simply run to the end (exit 0); the
// report is checked where it can exist: scripts/sanitize.sh tsan.
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/tsan_handoff.h"
#include "sieve/v1/sieve.grpc.pb.h"

extern char** environ;

#if defined(__SANITIZE_THREAD__)
#define SIEVE_RACE_CANARY_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SIEVE_RACE_CANARY_TSAN 1
#endif
#endif
#ifndef SIEVE_RACE_CANARY_TSAN
#define SIEVE_RACE_CANARY_TSAN 0
#endif

namespace sieve::server {
namespace {

constexpr int kCalls = 40;

// The shared state: a plain int, and whether the writers take `mu` around it.
int g_shared = 0;
std::mutex g_mu;
bool g_guarded = true;  // set before any thread starts
bool g_in_reactor = false;  // the write runs in CanaryReactor::OnDone instead of the handler
std::atomic<int> g_callbacks{0};

// Named so that the reports below can be recognized; noinline keeps them in the stacks.
__attribute__((noinline)) void RaceCanaryWriteFromCallback() {
  if (g_guarded) {
    std::lock_guard<std::mutex> lock(g_mu);
    g_shared = g_shared + 1;
  } else {
    g_shared = g_shared + 1;
  }
  asm volatile("" ::: "memory");
}

__attribute__((noinline)) void RaceCanaryWriteFromOurThread() {
  if (g_guarded) {
    std::lock_guard<std::mutex> lock(g_mu);
    g_shared = g_shared + 1;
  } else {
    g_shared = g_shared + 1;
  }
  asm volatile("" ::: "memory");
}

// A unary reactor of ours, annotated like the daemon's: its OnDone (on a gRPC thread, after the
// call's status was sent) writes the shared int.
class CanaryReactor final : public grpc::ServerUnaryReactor {
 public:
  explicit CanaryReactor(grpc_call* call) : call_(call) { TsanHandOff(this); }
  void OnDone() override {
    TsanTakeOver(this, call_);
    RaceCanaryWriteFromCallback();
    g_callbacks.fetch_add(1);
    delete this;
  }

 private:
  grpc_call* const call_;
};

// A Sieve service whose Tokenize callback (on a gRPC thread) writes the shared int, or hands the
// call to a CanaryReactor that does.
class CanaryService final : public v1::Sieve::CallbackService {
 public:
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* /*request*/,
                                     v1::TokenizeResponse* /*response*/) override {
    if (g_in_reactor) {
      auto* reactor = new CanaryReactor(context->c_call());
      TsanHandOff(reactor);
      reactor->Finish(grpc::Status::OK);
      return reactor;
    }
    RaceCanaryWriteFromCallback();
    g_callbacks.fetch_add(1);
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
};

// Serves CanaryService on loopback and calls Tokenize kCalls times while a thread of ours
// writes the shared int. Returns the number of calls that succeeded.
int RunScenario(bool guarded, bool in_reactor) {
  g_guarded = guarded;
  g_in_reactor = in_reactor;
  CanaryService service;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) return -1;

  std::atomic<bool> stop{false};
  std::thread writer([&stop] {
    while (!stop.load()) {
      RaceCanaryWriteFromOurThread();
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  auto stub = v1::Sieve::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  int ok = 0;
  for (int i = 0; i < kCalls; ++i) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::TokenizeRequest request;
    v1::TokenizeResponse response;
    if (stub->Tokenize(&context, request, &response).ok()) ++ok;
  }
  // A reactor's OnDone may run after its call returned to the client.
  for (int i = 0; i < 1000 && g_callbacks.load() < kCalls; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  stop.store(true);
  writer.join();
  server->Shutdown();
  return ok;
}

// The child's side. Without SIEVE_RACE_CANARY (a plain test run) it runs the guarded program.
TEST(RaceCanaryChild, Scenario) {
  const char* mode = std::getenv("SIEVE_RACE_CANARY");
  const std::string m = mode == nullptr ? "guarded" : mode;
  const bool guarded = m.rfind("unguarded", 0) != 0;
  const bool in_reactor = m.find("-reactor") != std::string::npos;
  const int ok = RunScenario(guarded, in_reactor);
  EXPECT_EQ(ok, kCalls);
  EXPECT_EQ(g_callbacks.load(), kCalls);
  std::printf("race canary: %d calls, %d callbacks\n", ok, g_callbacks.load());
}

// What the child prints when every call went through.
std::string CompletedLine() {
  return "race canary: " + std::to_string(kCalls) + " calls, " + std::to_string(kCalls) +
         " callbacks";
}

std::string SourceDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return root != nullptr ? root : ".";
}

struct ChildResult {
  int exit_code = -1;  // -1: did not exit normally
  std::string output;  // stdout and stderr
};

// Runs this binary's RaceCanaryChild.Scenario in `mode` with the repository's TSan suppressions.
ChildResult RunChild(const std::string& mode) {
  const std::string supp = SourceDir() + "/scripts/sanitize/tsan.supp";
  const std::string out_path = testing::TempDir() + "race_canary_" + mode + ".log";
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string var(*e);
    if (var.rfind("TSAN_OPTIONS=", 0) == 0 || var.rfind("SIEVE_RACE_CANARY=", 0) == 0 ||
        var.rfind("GTEST_", 0) == 0) {
      continue;
    }
    env.push_back(var);
  }
  env.push_back("SIEVE_RACE_CANARY=" + mode);
  env.push_back("TSAN_OPTIONS=halt_on_error=1:exitcode=66:suppressions=" + supp);
  std::vector<char*> envp;
  for (std::string& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);

  std::string exe = "/proc/self/exe";
  std::string filter = "--gtest_filter=RaceCanaryChild.Scenario";
  std::vector<char*> argv = {exe.data(), filter.data(), nullptr};
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, exe.c_str(), &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  ChildResult result;
  if (rc != 0) {
    result.output = "posix_spawn failed: " + std::to_string(rc);
    return result;
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
  std::ifstream in(out_path);
  std::stringstream text;
  text << in.rdbuf();
  result.output = text.str();
  return result;
}

// The racy child must stop at the race between our two writers (or, without TSan, run to its
// end).
void ExpectRaceReported(const ChildResult& child) {
  if (SIEVE_RACE_CANARY_TSAN) {
    // halt_on_error: the first report ends the child with TSan's exit code.
    EXPECT_EQ(child.exit_code, 66) << child.output;
    EXPECT_THAT(child.output, testing::HasSubstr("WARNING: ThreadSanitizer: data race"));
    // Both accesses are ours, the callback's under gRPC's frames.
    EXPECT_THAT(child.output, testing::HasSubstr("RaceCanaryWriteFromCallback"));
    EXPECT_THAT(child.output, testing::HasSubstr("RaceCanaryWriteFromOurThread"));
    EXPECT_THAT(child.output,
                testing::ContainsRegex("SUMMARY: ThreadSanitizer: data race [^\n]*RaceCanaryWrite"));
  } else {
    // Nothing reports without TSan: the program must just run to its end.
    EXPECT_EQ(child.exit_code, 0) << child.output;
    EXPECT_THAT(child.output, testing::HasSubstr(CompletedLine()));
  }
}

void ExpectClean(const ChildResult& child) {
  EXPECT_EQ(child.exit_code, 0) << child.output;
  EXPECT_THAT(child.output, testing::Not(testing::HasSubstr("ThreadSanitizer")));
  EXPECT_THAT(child.output, testing::HasSubstr(CompletedLine()));
}

TEST(RaceCanaryTest, RaceInOurCallbackIsReportedWithTheSuppressions) {
  ExpectRaceReported(RunChild("unguarded"));
}

TEST(RaceCanaryTest, GuardedProgramIsCleanWithTheSuppressions) { ExpectClean(RunChild("guarded")); }

// TsanTakeOver in OnDone orders the callback after the hand-offs of its reactor only: our
// writer thread's accesses stay unordered with it and must still be reported.
TEST(RaceCanaryTest, RaceInOurReactorIsReportedDespiteTheHandOff) {
  ExpectRaceReported(RunChild("unguarded-reactor"));
}

TEST(RaceCanaryTest, GuardedReactorIsCleanWithTheHandOff) {
  ExpectClean(RunChild("guarded-reactor"));
}

}  // namespace
}  // namespace sieve::server
