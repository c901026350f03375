// Disaggregated serving on loopback: real `sieved` processes in the roles prefill, decode and
// both (docs/disaggregation.md). One decode daemon in front of two prefill daemons must stream
// token-for-token what one `both` daemon streams, greedy and seeded, with and without prefix-cache
// hits, and with Quest decoding on the decode side; killing a prefill daemon while transfers run
// must lose no request (they are retried on the other) and leave no page held on any daemon; a
// prefill daemon of another model is refused. Every test of DisaggregationTest runs once per KV
// transport the build has: grpc (pages in the KvTransfer stream) and, built with UCX, ucx (the
// stream carries the control messages; the pages go over UCX, on whichever of its transports it
// picks on loopback: shared memory or tcp; set UCX_TLS to force one).
#include <signal.h>

#include <atomic>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/sieved_harness.h"

namespace sieve::test {
namespace {

using ::testing::HasSubstr;

std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

v1::GenerateRequest Seeded(const std::vector<int32_t>& ids, int max_tokens, uint64_t seed) {
  v1::GenerateRequest r = Greedy(ids, max_tokens);
  r.mutable_sampling()->set_temperature(0.9f);
  r.mutable_sampling()->set_seed(seed);
  return r;
}

std::string Target(const std::vector<Sieved*>& prefill) {
  std::string out = "ipv4:";
  for (size_t i = 0; i < prefill.size(); ++i) {
    absl::StrAppend(&out, i ? "," : "", prefill[i]->target());
  }
  return out;
}

// Held pages (used minus cached) on `d` are back to zero with nothing running.
bool NoPagesHeld(Sieved& d) {
  return PollUntil([&] { return AtBaseline(d, Load{}); }, absl::Seconds(30));
}

// The transports under test: grpc, and ucx when this build has it.
std::vector<std::string> Transports() {
  std::vector<std::string> t = {"grpc"};
  if (SIEVE_TEST_HAVE_UCX) t.push_back("ucx");
  return t;
}

class DisaggregationTest : public testing::TestWithParam<std::string> {
 protected:
  // A decode daemon's flags: `flags` and the transport under test.
  std::vector<std::string> Decode(std::vector<std::string> flags) const {
    flags.insert(flags.end(), {"--set", "server.role=decode", "--set",
                               "disaggregation.transport=" + GetParam()});
    return flags;
  }

  void TearDown() override {
    if (!HasFailure()) return;
    for (Sieved* d : all_) std::cerr << "--- sieved " << d->target() << " ---\n" << d->logs();
  }
  Sieved* Keep(std::unique_ptr<Sieved> d) {
    all_.push_back(d.get());
    owned_.push_back(std::move(d));
    return all_.back();
  }

  std::vector<Sieved*> all_;
  std::vector<std::unique_ptr<Sieved>> owned_;
};

TEST_P(DisaggregationTest, OneDecodeAndTwoPrefillDaemonsMatchABothDaemon) {
  Sieved* p1 = Keep(Sieved::StartServing({"--set", "server.role=prefill"}));
  Sieved* p2 = Keep(Sieved::StartServing({"--set", "server.role=prefill"}));
  Sieved* both = Keep(Sieved::StartServing());
  Sieved* decode = Keep(Sieved::StartServing(Decode(
      {"--set",
       absl::StrCat("disaggregation.prefill_target=", Target({p1, p2})), "--set",
       "disaggregation.local_prefill_below_tokens=64", "--set", "disaggregation.fallback=fail"})));
  ASSERT_FALSE(HasFailure());
  auto d = decode->stub();
  auto b = both->stub();

  // Distinct prompts (no cache hit), a prompt extending an earlier one (a partial hit: only the
  // new pages travel), the same prompt again (every page cached on the decode side: nothing
  // travels), and a short one (below the threshold: local).
  const std::vector<int32_t> base = RandomPrompt(700, 1);
  const std::vector<std::vector<int32_t>> prompts = {
      RandomPrompt(300, 2), RandomPrompt(1601, 3), base, Concat(base, RandomPrompt(333, 4)),
      base, RandomPrompt(32, 5), RandomPrompt(129, 6)};
  int remote_expected = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    for (const bool seeded : {false, true}) {
      const v1::GenerateRequest request =
          seeded ? Seeded(prompts[i], 16, 100 + i) : Greedy(prompts[i], 16);
      const StreamResult want = Generate(*b, request);
      const StreamResult got = Generate(*d, request);
      ASSERT_TRUE(want.status.ok()) << want.status.error_message();
      ASSERT_TRUE(got.status.ok()) << "prompt " << i << ": " << got.status.error_message();
      EXPECT_EQ(got.ids, want.ids) << "prompt " << i << (seeded ? " seeded" : " greedy");
      EXPECT_EQ(got.ids.size(), 16u);
      ASSERT_TRUE(got.completion.has_value());
      const bool remote = got.completion->timings().kv_transfer_seconds() > 0;
      // The first run of each long prompt goes remote; a repeat finds every page cached.
      const bool want_remote = !seeded && i != 4 && i != 5;
      EXPECT_EQ(remote, want_remote) << "prompt " << i << (seeded ? " seeded" : " greedy");
      remote_expected += want_remote ? 1 : 0;
      if (remote) {
        EXPECT_GE(got.completion->timings().time_to_first_token_seconds(),
                  got.completion->timings().kv_transfer_seconds());
        EXPECT_GE(got.completion->usage().cached_prompt_tokens(),
                  (prompts[i].size() - 1) / 16 * 16);
      }
    }
  }

  // Concurrent requests on the decode daemon, each transferred, still equal the reference.
  std::vector<std::vector<int32_t>> fresh;
  for (uint32_t i = 0; i < 6; ++i) fresh.push_back(RandomPrompt(200 + 97 * i, 50 + i));
  std::vector<StreamResult> got(fresh.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < fresh.size(); ++i) {
    threads.emplace_back([&, i] { got[i] = Generate(*decode->stub(), Greedy(fresh[i], 12)); });
  }
  for (std::thread& t : threads) t.join();
  for (size_t i = 0; i < fresh.size(); ++i) {
    ASSERT_TRUE(got[i].status.ok()) << got[i].status.error_message();
    EXPECT_EQ(got[i].ids, Generate(*b, Greedy(fresh[i], 12)).ids) << "concurrent " << i;
  }
  remote_expected += static_cast<int>(fresh.size());

  // Both prefill daemons served (round-robin), the decode daemon counted its placements, and no
  // daemon holds a page.
  const test_support::ParsedMetrics dm = decode->Metrics();
  EXPECT_EQ(dm.Sum("sieve_prefills_total", {{"location", "remote"}}), remote_expected);
  EXPECT_GE(dm.Sum("sieve_prefills_total", {{"location", "local"}}), 4);
  EXPECT_GT(dm.Sum("sieve_kv_transfer_bytes_total", {{"direction", "received"}}), 0);
  EXPECT_EQ(dm.Sum("sieve_kv_transfers_total", {{"outcome", "failed"}}), 0);
  EXPECT_EQ(dm.Sum("sieve_prefill_daemons_reachable"), 1);
  EXPECT_EQ(dm.Sum("sieve_kv_pages_used", {{"role", "decode"}}),
            dm.Sum("sieve_kv_pages_used"));  // every series carries the role
  double sent = 0;
  for (Sieved* p : {p1, p2}) {
    const test_support::ParsedMetrics pm = p->Metrics();
    const double bytes = pm.Sum("sieve_kv_transfer_bytes_total", {{"direction", "sent"}});
    EXPECT_GT(bytes, 0) << p->target() << " served no transfer";
    sent += bytes;
  }
  EXPECT_EQ(sent, dm.Sum("sieve_kv_transfer_bytes_total", {{"direction", "received"}}));
  // Every byte went over the transport under test, and the metrics say which.
  EXPECT_EQ(dm.Sum("sieve_kv_transfer_bytes_total",
                   {{"direction", "received"}, {"transport", GetParam()}}),
            sent);
  for (Sieved* p : {p1, p2}) {
    EXPECT_EQ(p->Metrics().Sum("sieve_kv_transfer_bytes_total",
                               {{"direction", "sent"}, {"transport", GetParam()}}),
              p->Metrics().Sum("sieve_kv_transfer_bytes_total", {{"direction", "sent"}}));
  }
  for (Sieved* x : all_) EXPECT_TRUE(NoPagesHeld(*x)) << x->target();
}

// A decode daemon running Quest selects pages from bounds it rebuilt for the imported KV (the
// prefill daemon decodes dense and keeps none): with a two-page budget, small enough that the
// tokens differ from dense decoding, it must stream what a `both` daemon running the same Quest
// streams, and its metrics must show the fraction of KV its decode steps read.
TEST_P(DisaggregationTest, QuestDecodeDaemonOnImportedPromptsMatchesABothDaemon) {
  const std::vector<std::string> quest = {
      "--set", "attention.decode.method=quest", "--set", "attention.decode.token_budget=32",
      "--set", "attention.decode.sparse_min_tokens=0", "--set", "attention.decode.dense_layers=1"};
  auto with = [](std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  Sieved* prefill = Keep(Sieved::StartServing({"--set", "server.role=prefill"}));
  Sieved* dense = Keep(Sieved::StartServing());
  Sieved* both = Keep(Sieved::StartServing(quest));
  Sieved* decode = Keep(Sieved::StartServing(Decode(with(
      {"--set",
       absl::StrCat("disaggregation.prefill_target=", Target({prefill})), "--set",
       "disaggregation.local_prefill_below_tokens=64", "--set", "disaggregation.fallback=fail"},
      quest))));
  ASSERT_FALSE(HasFailure());
  auto d = decode->stub();
  auto b = both->stub();
  auto x = dense->stub();
  int differs_from_dense = 0;
  for (const auto& [n, seed] : {std::pair<size_t, uint32_t>{300, 21}, {700, 22}, {1100, 23}}) {
    const v1::GenerateRequest request = Greedy(RandomPrompt(n, seed), 16);
    const StreamResult want = Generate(*b, request);
    const StreamResult got = Generate(*d, request);
    const StreamResult dense_out = Generate(*x, request);
    ASSERT_TRUE(want.status.ok() && got.status.ok() && dense_out.status.ok())
        << want.status.error_message() << got.status.error_message();
    ASSERT_TRUE(got.completion.has_value());
    EXPECT_GT(got.completion->timings().kv_transfer_seconds(), 0) << "prompt of " << n;
    EXPECT_EQ(got.ids, want.ids) << "prompt of " << n;
    EXPECT_EQ(got.ids.size(), 16u);
    differs_from_dense += got.ids != dense_out.ids ? 1 : 0;
  }
  EXPECT_GT(differs_from_dense, 0) << "a two-page budget never changed the tokens: no selection";
  const test_support::ParsedMetrics m = decode->Metrics();
  const double steps = m.Sum("sieve_decode_kv_read_fraction_count");
  EXPECT_GT(steps, 0);
  EXPECT_LT(m.Sum("sieve_decode_kv_read_fraction_sum") / steps, 1.0);
  EXPECT_TRUE(NoPagesHeld(*decode));
  EXPECT_TRUE(NoPagesHeld(*prefill));
}

TEST_P(DisaggregationTest, KillingAPrefillDaemonMidTransferLosesNoRequestAndLeaksNoPage) {
  // One page per chunk and a pause before each: a 40-page prompt streams for about a second.
  const std::vector<std::string> slow = {"--set", "server.role=prefill", "--set",
                                         "disaggregation.chunk_bytes=65536",
                                         "--testing-kv-chunk-delay-ms", "25"};
  Sieved* p1 = Keep(Sieved::StartServing(slow));
  Sieved* p2 = Keep(Sieved::StartServing(slow));
  Sieved* both = Keep(Sieved::StartServing());
  Sieved* decode = Keep(Sieved::StartServing(Decode(
      {"--set",
       absl::StrCat("disaggregation.prefill_target=", Target({p1, p2})), "--set",
       "disaggregation.fallback=fail", "--set", "disaggregation.max_attempts=4", "--set",
       "disaggregation.stall_timeout_s=5"})));
  ASSERT_FALSE(HasFailure());

  constexpr int kRequests = 8;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kRequests; ++i) prompts.push_back(RandomPrompt(640 + 16 * i, 200 + i));
  std::vector<StreamResult> got(kRequests);
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] { got[i] = Generate(*decode->stub(), Greedy(prompts[i], 8)); });
  }
  // Kill the first prefill daemon once most transfers are under way.
  EXPECT_TRUE(PollUntil([&] {
    return decode->Metrics().Sum("sieve_kv_transfers_in_flight", {{"direction", "received"}}) >=
           kRequests / 2 + 1;
  }));
  p1->Signal(SIGKILL);
  for (std::thread& t : threads) t.join();

  auto b = both->stub();
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_TRUE(got[i].status.ok()) << "request " << i << ": " << got[i].status.error_message();
    EXPECT_EQ(got[i].ids, Generate(*b, Greedy(prompts[i], 8)).ids) << "request " << i;
  }
  const test_support::ParsedMetrics dm = decode->Metrics();
  EXPECT_GE(dm.Sum("sieve_kv_transfer_retries_total"), 1);
  EXPECT_GE(dm.Sum("sieve_kv_transfers_total", {{"outcome", "failed"}}), 1);
  EXPECT_EQ(dm.Sum("sieve_prefills_total", {{"location", "remote"}}), kRequests);
  EXPECT_TRUE(NoPagesHeld(*decode));
  EXPECT_TRUE(NoPagesHeld(*p2));
  EXPECT_EQ(p1->WaitExit(absl::Seconds(10)), 128 + SIGKILL);
}

TEST_P(DisaggregationTest, CancellationAndDeadlinesReachThePrefillDaemon) {
  // One page per chunk, 100 ms apart: a 99-page transfer would stream for about 10 s.
  Sieved* p = Keep(Sieved::StartServing({"--set", "server.role=prefill", "--set",
                                         "disaggregation.chunk_bytes=65536",
                                         "--testing-kv-chunk-delay-ms", "100"}));
  Sieved* decode = Keep(Sieved::StartServing(Decode(
      {"--set",
       absl::StrCat("disaggregation.prefill_target=", Target({p})), "--set",
       "disaggregation.fallback=fail"})));
  ASSERT_FALSE(HasFailure());
  auto d = decode->stub();
  auto sent_in_flight = [&] {
    return p->Metrics().Sum("sieve_kv_transfers_in_flight", {{"direction", "sent"}});
  };
  auto sent_bytes = [&] {
    return p->Metrics().Sum("sieve_kv_transfer_bytes_total", {{"direction", "sent"}});
  };
  {
    OpenStream stream(*d, Greedy(RandomPrompt(1600, 31), 8));
    ASSERT_TRUE(PollUntil([&] { return sent_in_flight() >= 1; }));
    const absl::Time cancelled = absl::Now();
    stream.context.TryCancel();
    EXPECT_EQ(stream.reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
    // The prefill daemon's call ends long before its transfer would have.
    EXPECT_TRUE(PollUntil([&] { return sent_in_flight() == 0; }, absl::Seconds(8)));
    EXPECT_LT(absl::Now() - cancelled, absl::Seconds(8));
  }
  EXPECT_EQ(sent_bytes(), 0);  // the transfer never completed
  EXPECT_GE(p->Metrics().Sum("sieve_kv_transfers_total", {{"direction", "sent"},
                                                          {"outcome", "failed"}}),
            1);
  EXPECT_TRUE(NoPagesHeld(*p));
  EXPECT_TRUE(NoPagesHeld(*decode));

  // A client deadline shorter than the transfer: the call ends DEADLINE_EXCEEDED and the
  // prefill daemon's call ends with it (the deadline travels with the remote call).
  const StreamResult late =
      Generate(*d, Greedy(RandomPrompt(1600, 32), 8), absl::Milliseconds(2500));
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(PollUntil([&] { return sent_in_flight() == 0; }, absl::Seconds(8)));
  EXPECT_EQ(sent_bytes(), 0);
  EXPECT_TRUE(NoPagesHeld(*p));
  EXPECT_TRUE(NoPagesHeld(*decode));
}

TEST_P(DisaggregationTest, DrainingDecodeDaemonFinishesARequestWhoseKvIsOnItsWay) {
  Sieved* p = Keep(Sieved::StartServing({"--set", "server.role=prefill", "--set",
                                         "disaggregation.chunk_bytes=65536",
                                         "--testing-kv-chunk-delay-ms", "40"}));
  Sieved* decode = Keep(Sieved::StartServing(Decode(
      {"--set",
       absl::StrCat("disaggregation.prefill_target=", Target({p})), "--set",
       "disaggregation.fallback=fail"})));
  ASSERT_FALSE(HasFailure());
  auto d = decode->stub();
  OpenStream stream(*d, Greedy(RandomPrompt(960, 41), 6));
  ASSERT_TRUE(PollUntil([&] {
    return decode->Metrics().Sum("sieve_kv_transfers_in_flight", {{"direction", "received"}}) >= 1;
  }));
  decode->Signal(SIGTERM);
  const StreamResult r = Drain(*stream.reader);
  EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids.size(), 6u);
  EXPECT_EQ(decode->WaitExit(absl::Seconds(30)), 0);
  EXPECT_TRUE(NoPagesHeld(*p));
}

TEST_P(DisaggregationTest, APrefillDaemonOfAnotherModelIsRefused) {
  Sieved* other = Keep(Sieved::StartServing(
      {"--set", "server.role=prefill", "--set", "model.name=another-model"}));
  Sieved* decode = Keep(Sieved::StartServing(Decode(
      {"--set",
       absl::StrCat("disaggregation.prefill_target=", Target({other})), "--set",
       "disaggregation.local_prefill_below_tokens=100"})));
  ASSERT_FALSE(HasFailure());
  auto d = decode->stub();
  // Refused even with fallback local: a mismatch is a deployment error to surface, not a fault.
  const StreamResult refused = Generate(*d, Greedy(RandomPrompt(400, 9), 4));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("KV layout mismatch"));
  EXPECT_THAT(refused.status.error_message(), HasSubstr("another-model"));
  // Short prompts are prefilled locally and still served.
  const StreamResult local = Generate(*d, Greedy(RandomPrompt(40, 10), 4));
  EXPECT_TRUE(local.status.ok()) << local.status.error_message();
  EXPECT_EQ(local.ids.size(), 4u);
  EXPECT_EQ(decode->Metrics().Sum("sieve_kv_transfers_total", {{"outcome", "failed"}}), 1);
  for (Sieved* x : all_) EXPECT_TRUE(NoPagesHeld(*x)) << x->target();
}

// Load-aware choice of the prefill daemon. One prefill daemon pauses 250 ms before each of the
// 40 one-page chunks of a 641-token prompt: once it holds a transfer for the decode daemon, it
// keeps it for at least 10 s. While it does, the decode daemon counts 641 tokens in flight there
// and none on the other, so every request it sends meanwhile must go to the other; plain
// round-robin would send every other one to the busy daemon. Requests are sent one at a time,
// each only after checking (on the busy daemon's metrics) that its transfer still runs and within
// 5 s of first seeing it run, which leaves 5 s of margin before it can end.
TEST_P(DisaggregationTest, RequestsAvoidAPrefillDaemonBusyWithATransfer) {
  Sieved* slow = Keep(Sieved::StartServing({"--set", "server.role=prefill", "--set",
                                            "disaggregation.chunk_bytes=65536",
                                            "--testing-kv-chunk-delay-ms", "250"}));
  Sieved* fast = Keep(Sieved::StartServing({"--set", "server.role=prefill"}));
  Sieved* decode = Keep(Sieved::StartServing(Decode(
      {"--set",
       absl::StrCat("disaggregation.prefill_target=", Target({slow, fast})), "--set",
       "disaggregation.local_prefill_below_tokens=64", "--set", "disaggregation.fallback=fail"})));
  ASSERT_FALSE(HasFailure());
  auto in_flight = [](Sieved* p) {
    return p->Metrics().Sum("sieve_kv_transfers_in_flight", {{"direction", "sent"}});
  };
  auto served = [](Sieved* p) {
    return p->Metrics().Sum("sieve_kv_transfers_total", {{"direction", "sent"}, {"outcome", "ok"}});
  };
  // Background requests until one is on the slow daemon (idle daemons tie: round-robin, so this
  // takes one or two).
  std::vector<std::thread> background;
  std::atomic<int> background_failed{0};
  uint32_t seed = 500;
  for (int i = 0; i < 6 && in_flight(slow) == 0; ++i) {
    background.emplace_back([&, s = seed++] {
      if (!Generate(*decode->stub(), Greedy(RandomPrompt(641, s), 2)).status.ok()) {
        ++background_failed;
      }
    });
    PollUntil([&] { return in_flight(slow) > 0 || served(fast) > i; }, absl::Seconds(10));
  }
  ASSERT_TRUE(PollUntil([&] { return in_flight(slow) == 1; }));
  const absl::Time busy_seen = absl::Now();
  ASSERT_TRUE(PollUntil([&] { return in_flight(fast) == 0; }));
  const double fast_before = served(fast);

  int sent = 0;
  while (sent < 8 && absl::Now() - busy_seen < absl::Seconds(5) && in_flight(slow) == 1) {
    const StreamResult r = Generate(*decode->stub(), Greedy(RandomPrompt(641, seed++), 2));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    ++sent;
  }
  std::cerr << sent << " requests sent while the slow prefill daemon was busy\n";
  EXPECT_GE(sent, 2) << "too few requests fit the window to tell the choice from round-robin";
  // (A prefill daemon counts a transfer when its call is done, just after the last message.)
  PollUntil([&] { return served(fast) - fast_before >= sent; }, absl::Seconds(5));
  EXPECT_EQ(served(fast) - fast_before, sent) << "a request went to the busy prefill daemon";
  EXPECT_EQ(in_flight(slow), 1);  // still busy: every request above saw it so

  for (std::thread& t : background) t.join();
  EXPECT_EQ(background_failed.load(), 0);
  EXPECT_TRUE(PollUntil([&] { return served(slow) == 1; }, absl::Seconds(5))) << served(slow);
  EXPECT_EQ(decode->Metrics().Sum("sieve_kv_transfer_retries_total"), 0);
  for (Sieved* x : all_) EXPECT_TRUE(NoPagesHeld(*x)) << x->target();
}

// The transfer is a phase of the request on a decode daemon: its Completion's
// kv_transfer_seconds, its time to first token and the daemon's TTFT histogram include it. The
// prefill daemon pauses 25 ms before each of 40 one-page chunks, so the transfer phase lasts at
// least 40 x 25 ms = 1 s (each pause is a sleep of at least that long, and the last page lands
// after the last pause).
TEST_P(DisaggregationTest, TransferPhaseIsPartOfTimeToFirstToken) {
  Sieved* p = Keep(Sieved::StartServing({"--set", "server.role=prefill", "--set",
                                         "disaggregation.chunk_bytes=65536",
                                         "--testing-kv-chunk-delay-ms", "25"}));
  Sieved* decode = Keep(Sieved::StartServing(Decode(
      {"--set",
       absl::StrCat("disaggregation.prefill_target=", Target({p})), "--set",
       "disaggregation.local_prefill_below_tokens=64", "--set", "disaggregation.fallback=fail"})));
  ASSERT_FALSE(HasFailure());
  const StreamResult r = Generate(*decode->stub(), Greedy(RandomPrompt(641, 77), 4));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_TRUE(r.completion.has_value());
  const v1::Timings& t = r.completion->timings();
  EXPECT_GE(t.kv_transfer_seconds(), 1.0);
  // The engine's phases follow the transfer: TTFT = transfer + queue + prefill (to the 1e-6 of
  // summing doubles), and the total covers all.
  EXPECT_NEAR(t.time_to_first_token_seconds(),
              t.kv_transfer_seconds() + t.queue_seconds() + t.prefill_seconds(), 1e-6);
  EXPECT_GE(t.total_seconds(), t.time_to_first_token_seconds());
  // The metrics saw the same: one transfer phase, and a TTFT observation that contains it. The
  // histograms' sums are printed with at least 1e-9 precision.
  // (The engine reports a request's end to the metrics just after its stream's last message.)
  EXPECT_TRUE(PollUntil(
      [&] { return decode->Metrics().Sum("sieve_request_e2e_latency_seconds_count") == 1; }));
  const test_support::ParsedMetrics m = decode->Metrics();
  EXPECT_EQ(m.Sum("sieve_request_transfer_seconds_count"), 1);
  EXPECT_NEAR(m.Sum("sieve_request_transfer_seconds_sum"), t.kv_transfer_seconds(), 1e-6);
  EXPECT_EQ(m.Sum("sieve_request_time_to_first_token_seconds_count"), 1);
  EXPECT_NEAR(m.Sum("sieve_request_time_to_first_token_seconds_sum"),
              t.time_to_first_token_seconds(), 1e-6);
  EXPECT_GE(m.Sum("sieve_request_e2e_latency_seconds_sum"), t.kv_transfer_seconds());
  // A local prefill (short prompt) has no transfer phase.
  const StreamResult local = Generate(*decode->stub(), Greedy(RandomPrompt(40, 78), 4));
  ASSERT_TRUE(local.status.ok() && local.completion.has_value());
  EXPECT_EQ(local.completion->timings().kv_transfer_seconds(), 0);
  EXPECT_EQ(decode->Metrics().Sum("sieve_request_transfer_seconds_count"), 1);
}

INSTANTIATE_TEST_SUITE_P(Transports, DisaggregationTest, testing::ValuesIn(Transports()),
                         [](const testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

TEST(DisaggregationConfigTest, ADecodeDaemonWithoutPrefillTargetDoesNotStart) {
  auto [code, out] = RunTool(SIEVED_PATH, {"--config", BaseConfigPath(), "--set",
                                           "server.role=decode"});
  EXPECT_EQ(code, 2) << out;
  EXPECT_THAT(out, HasSubstr("disaggregation.prefill_target"));
}

TEST(DisaggregationConfigTest, AnUnknownTransportIsRefusedNamingTheKey) {
  auto [code, out] = RunTool(
      SIEVED_PATH, {"--config", BaseConfigPath(), "--set", "server.role=decode", "--set",
                    "disaggregation.prefill_target=ipv4:127.0.0.1:1", "--set",
                    "disaggregation.transport=rdma"});
  EXPECT_EQ(code, 2) << out;
  EXPECT_THAT(out, HasSubstr("disaggregation.transport"));
}

#if !SIEVE_TEST_HAVE_UCX
// Built without UCX (no libucx-dev, or -DSIEVE_UCX=OFF), asking for it stops a decode daemon
// with a message naming the key and the way out.
TEST(DisaggregationConfigTest, UcxTransportWithoutUcxInTheBuildNamesTheKey) {
  auto [code, out] = RunTool(
      SIEVED_PATH, {"--config", BaseConfigPath(), "--set", "server.role=decode", "--set",
                    "disaggregation.prefill_target=ipv4:127.0.0.1:1", "--set",
                    "disaggregation.transport=ucx"});
  EXPECT_NE(code, 0) << out;
  EXPECT_THAT(out, HasSubstr("disaggregation.transport is ucx but this sieved was built "
                             "without UCX"));
}
#endif

}  // namespace
}  // namespace sieve::test
