// Credentials between a decode daemon and its prefill daemons (docs/disaggregation.md,
// docs/reliability.md): the decode daemon presents disaggregation.token_file's bearer token and,
// with disaggregation.tls.*, dials over TLS or mutual TLS; prefill daemons check them with their
// server.auth.* and server.tls.*. Real `sieved` processes on loopback; certificates are made at
// run time with the openssl CLI in the test's temp dir (as tests/reliability_test.cc does).
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/sieved_harness.h"

namespace sieve::test {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The port of "127.0.0.1:<port>".
std::string PortOf(const std::string& target) { return target.substr(target.rfind(':') + 1); }

bool NoPagesHeld(Sieved& d) {
  return PollUntil([&] { return AtBaseline(d, Load{}); }, absl::Seconds(30));
}

class DisaggregationSecurityTest : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempDir() + "/disagg_security_" + std::to_string(getpid()) + "_" +
           testing::UnitTest::GetInstance()->current_test_info()->name();
    mkdir(dir_.c_str(), 0700);
  }
  void TearDown() override {
    if (!HasFailure()) return;
    for (const auto& d : daemons_) std::cerr << "--- sieved " << d->target() << " ---\n" << d->logs();
  }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  void MakeCa(const std::string& name) { MakeTestCa(dir_, name); }
  void MakeLeaf(const std::string& name, const std::string& ca,
                const std::string& san = "DNS:localhost,IP:127.0.0.1") {
    MakeTestLeaf(dir_, name, ca, san);
  }

  Sieved* Keep(std::unique_ptr<Sieved> d) {
    daemons_.push_back(std::move(d));
    return daemons_.back().get();
  }

  // A prefill daemon serving mutual TLS with `cert` (signed by "ca"), accepting clients of the
  // "clients" CA and the bearer token "prefill-token"; waits until its health (over TLS, with
  // the client certificate "decode", checking the certificate for `host`) says SERVING.
  Sieved* StartTlsPrefill(const std::string& cert, const std::string& host = "localhost") {
    WriteFile(Path("accepted-tokens"), "# decode daemons\nprefill-token\n");
    Sieved* p = Keep(Sieved::Spawn({"--set", "server.role=prefill", "--set",
                                    "server.auth.tokens_file=" + Path("accepted-tokens"),
                                    "--set", "server.tls.cert_file=" + Path(cert + ".pem"),
                                    "--set", "server.tls.key_file=" + Path(cert + ".key"),
                                    "--set", "server.tls.client_ca_file=" + Path("clients.pem")}));
    EXPECT_TRUE(p->WaitListening()) << p->logs();
    grpc::SslCredentialsOptions tls;
    tls.pem_root_certs = ReadFile(Path("ca.pem"));
    tls.pem_private_key = ReadFile(Path("decode.key"));
    tls.pem_cert_chain = ReadFile(Path("decode.pem"));
    grpc::ChannelArguments args;
    args.SetSslTargetNameOverride(host);
    auto health = Health::NewStub(
        grpc::CreateCustomChannel(p->target(), grpc::SslCredentials(tls), args));
    EXPECT_TRUE(PollUntil([&] {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      HealthCheckResponse response;
      return health->Check(&context, HealthCheckRequest(), &response).ok() &&
             response.status() == HealthCheckResponse::SERVING;
    })) << p->logs();
    return p;
  }

  // The --set flags of a decode daemon in front of `target`.
  std::vector<std::string> DecodeFlags(const std::string& target, const std::string& fallback) {
    return {"--set", "server.role=decode", "--set", "disaggregation.prefill_target=" + target,
            "--set", "disaggregation.local_prefill_below_tokens=64", "--set",
            "disaggregation.fallback=" + fallback};
  }

  static std::vector<std::string> With(std::vector<std::string> a,
                                       const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }

  std::string dir_;
  std::vector<std::unique_ptr<Sieved>> daemons_;
};

// Mutual TLS and a bearer token from the decode daemon to a prefill daemon that requires both:
// the decode daemon dials the prefill daemon by host name (dns:///localhost:<port>), checks its
// certificate against the CA and the name, presents its own certificate and the token, and serves
// what a `both` daemon serves. A prefill daemon whose certificate names another host is refused.
TEST_F(DisaggregationSecurityTest, MutualTlsAndABearerTokenServe) {
  MakeCa("ca");
  MakeLeaf("prefill", "ca");
  MakeLeaf("impostor", "ca", "DNS:elsewhere.example");
  MakeCa("clients");
  MakeLeaf("decode", "clients");
  WriteFile(Path("token"), "# the decode daemons' token\n\n  prefill-token  \n");
  Sieved* prefill = StartTlsPrefill("prefill");
  Sieved* impostor = StartTlsPrefill("impostor", "elsewhere.example");
  Sieved* both = Keep(Sieved::StartServing());
  const std::vector<std::string> credentials = {
      "--set", "disaggregation.token_file=" + Path("token"),
      "--set", "disaggregation.tls.ca_file=" + Path("ca.pem"),
      "--set", "disaggregation.tls.cert_file=" + Path("decode.pem"),
      "--set", "disaggregation.tls.key_file=" + Path("decode.key")};
  Sieved* decode = Keep(Sieved::StartServing(With(
      DecodeFlags("dns:///localhost:" + PortOf(prefill->target()), "fail"), credentials)));
  Sieved* fooled = Keep(Sieved::StartServing(With(
      DecodeFlags("dns:///localhost:" + PortOf(impostor->target()), "fail"), credentials)));
  ASSERT_FALSE(HasFailure());

  for (uint32_t seed : {1u, 2u}) {
    const v1::GenerateRequest request = Greedy(RandomPrompt(300 + 111 * seed, seed), 8);
    const StreamResult got = Generate(*decode->stub(), request);
    ASSERT_TRUE(got.status.ok()) << got.status.error_message();
    ASSERT_TRUE(got.completion.has_value());
    EXPECT_GT(got.completion->timings().kv_transfer_seconds(), 0);
    EXPECT_EQ(got.ids, Generate(*both->stub(), request).ids);
  }
  // (A prefill daemon counts a transfer when its call is done, just after the last message.)
  EXPECT_TRUE(PollUntil([&] {
    return prefill->Metrics().Sum("sieve_kv_transfers_total",
                                  {{"direction", "sent"}, {"outcome", "ok"}}) == 2;
  }));
  EXPECT_THAT(decode->logs(), HasSubstr("mutual TLS, bearer token"));
  EXPECT_THAT(decode->logs(), Not(HasSubstr("prefill-token")));

  // The impostor's certificate chains to the CA but names another host: the handshake fails,
  // the prefill daemon never runs a prefill, and the request fails (fallback fail).
  const StreamResult refused = Generate(*fooled->stub(), Greedy(RandomPrompt(400, 3), 4));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << refused.status.error_message();
  EXPECT_EQ(impostor->Metrics().Sum("sieve_kv_transfers_total"), 0);
  EXPECT_EQ(fooled->Metrics().Sum("sieve_prefill_daemons_reachable"), 0);
  for (Sieved* d : {prefill, impostor, decode, fooled}) EXPECT_TRUE(NoPagesHeld(*d)) << d->target();
}

// A prefill daemon that requires a bearer token refuses a decode daemon with a wrong one or none:
// with fallback fail the request fails with FAILED_PRECONDITION naming disaggregation.token_file
// (the client's own credentials were fine); with fallback local it is prefilled on the decode
// daemon and served. No page stays held anywhere.
TEST_F(DisaggregationSecurityTest, AWrongTokenFailsOrFallsBackLocally) {
  WriteFile(Path("accepted"), "right-token\n");
  WriteFile(Path("wrong"), "wrong-token\n");
  Sieved* prefill = Keep(Sieved::StartServing(
      {"--set", "server.role=prefill", "--set", "server.auth.tokens_file=" + Path("accepted")}));
  Sieved* both = Keep(Sieved::StartServing());
  const std::string target = "ipv4:" + prefill->target();
  Sieved* failing = Keep(Sieved::StartServing(
      With(DecodeFlags(target, "fail"), {"--set", "disaggregation.token_file=" + Path("wrong")})));
  Sieved* local = Keep(Sieved::StartServing(DecodeFlags(target, "local")));  // no token at all
  ASSERT_FALSE(HasFailure());
  const v1::GenerateRequest request = Greedy(RandomPrompt(500, 11), 6);

  const StreamResult refused = Generate(*failing->stub(), request);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("disaggregation.token_file"));
  EXPECT_THAT(refused.status.error_message(), HasSubstr("bearer token is not accepted"));
  EXPECT_THAT(refused.status.error_message(), Not(HasSubstr("wrong-token")));

  const StreamResult served = Generate(*local->stub(), request);
  ASSERT_TRUE(served.status.ok()) << served.status.error_message();
  EXPECT_EQ(served.ids, Generate(*both->stub(), request).ids);
  const test_support::ParsedMetrics lm = local->Metrics();
  EXPECT_EQ(lm.Sum("sieve_prefills_total", {{"location", "local"}}), 1);
  EXPECT_EQ(lm.Sum("sieve_prefills_total", {{"location", "remote"}}), 0);
  EXPECT_GE(lm.Sum("sieve_kv_transfers_total", {{"outcome", "failed"}}), 1);
  // Every attempt reached the prefill daemon's authentication and stopped there.
  const test_support::ParsedMetrics pm = prefill->Metrics();
  EXPECT_GE(pm.Sum("sieve_grpc_requests_total", {{"method", "Prefill"}, {"code", "UNAUTHENTICATED"}}),
            2);
  EXPECT_EQ(pm.Sum("sieve_kv_transfers_total"), 0);
  for (Sieved* d : {prefill, failing, local}) EXPECT_TRUE(NoPagesHeld(*d)) << d->target();
}

// Rotating the decode side's token without a restart: the decode daemon re-reads
// disaggregation.token_file every server.auth.reload_interval_s (1 s here). The prefill daemon
// first accepts both the old and the new token, the decode daemon's file is switched to the new
// one, then the prefill daemon drops the old one: once it has, only a decode daemon that re-read
// its file can still prefill remotely (fallback fail, so a refused token fails the request). A
// file made unusable keeps the last good token in force.
TEST_F(DisaggregationSecurityTest, ARotatedTokenFileIsReReadWithoutARestart) {
  WriteFile(Path("accepted"), "old-token\nnew-token\n");
  WriteFile(Path("token"), "old-token\n");
  Sieved* prefill = Keep(Sieved::StartServing(
      {"--set", "server.role=prefill", "--set", "server.auth.tokens_file=" + Path("accepted"),
       "--set", "server.auth.reload_interval_s=1"}));
  Sieved* decode = Keep(Sieved::StartServing(
      With(DecodeFlags("ipv4:" + prefill->target(), "fail"),
           {"--set", "disaggregation.token_file=" + Path("token"), "--set",
            "server.auth.reload_interval_s=1"})));
  ASSERT_FALSE(HasFailure());
  uint32_t seed = 40;
  auto remote_ok = [&] {
    const StreamResult r = Generate(*decode->stub(), Greedy(RandomPrompt(300, seed++), 2));
    return r.status.ok() && r.completion.has_value() &&
           r.completion->timings().kv_transfer_seconds() > 0;
  };
  EXPECT_TRUE(remote_ok());

  WriteFile(Path("token"), "# rotated\nnew-token\n");
  EXPECT_TRUE(PollUntil([&] { return decode->logs().find("changed: its new token") !=
                                     std::string::npos; }, absl::Seconds(10)));
  WriteFile(Path("accepted"), "new-token\n");
  EXPECT_TRUE(PollUntil([&] { return prefill->logs().find("1 tokens accepted") !=
                                     std::string::npos; }, absl::Seconds(10)))
      << prefill->logs();
  EXPECT_TRUE(remote_ok());
  EXPECT_TRUE(remote_ok());

  // An unusable file (no token) keeps the new token in force, and says so once.
  WriteFile(Path("token"), "# being rewritten\n");
  EXPECT_TRUE(PollUntil([&] { return decode->logs().find("the token read before is still sent") !=
                                     std::string::npos; }, absl::Seconds(10)));
  EXPECT_TRUE(remote_ok());
  EXPECT_THAT(decode->logs(), Not(HasSubstr("new-token")));
  EXPECT_THAT(decode->logs(), Not(HasSubstr("old-token")));
  EXPECT_EQ(decode->Metrics().Sum("sieve_kv_transfers_total", {{"outcome", "failed"}}), 0);
  for (Sieved* d : {prefill, decode}) EXPECT_TRUE(NoPagesHeld(*d)) << d->target();
}

// Unreadable credential files stop a decode daemon at start with a message naming the key.
TEST_F(DisaggregationSecurityTest, UnreadableCredentialFilesNameTheirKey) {
  WriteFile(Path("not-pem"), "just text\n");
  WriteFile(Path("comments-only"), "# no token here\n\n");
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--set", "disaggregation.token_file=" + Path("missing")}, "disaggregation.token_file"},
      {{"--set", "disaggregation.token_file=" + Path("comments-only")},
       "disaggregation.token_file"},
      {{"--set", "disaggregation.tls.ca_file=" + Path("missing.pem")},
       "disaggregation.tls.ca_file"},
      {{"--set", "disaggregation.tls.ca_file=" + Path("not-pem")}, "disaggregation.tls.ca_file"},
      {{"--set", "disaggregation.tls.cert_file=" + Path("missing.pem"), "--set",
        "disaggregation.tls.key_file=" + Path("missing.key")},
       "disaggregation.tls.cert_file"},
      {{"--set", "disaggregation.prefill_target=ipv4:127.0.0.1"},
       "disaggregation.prefill_target"},
  };
  for (const auto& [flags, key] : cases) {
    std::vector<std::string> args = {"--config", BaseConfigPath(), "--set", "server.role=decode",
                                     "--set", "disaggregation.prefill_target=ipv4:127.0.0.1:9"};
    args.insert(args.end(), flags.begin(), flags.end());
    auto [code, out] = RunTool(SIEVED_PATH, args);
    EXPECT_EQ(code, 1) << key << ": " << out;
    EXPECT_THAT(out, HasSubstr(key));
  }
}

}  // namespace
}  // namespace sieve::test
