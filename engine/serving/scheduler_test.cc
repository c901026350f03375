// The scheduler's policies without a model: budgets, chunking, priorities, admission by pages,
// preemption, prefix-cache reuse, removal, worker packing, and a randomized stress test that
// checks every invariant after every step.
#include "engine/serving/scheduler.h"

#include <algorithm>
#include <iostream>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

SchedulerOptions Options(int32_t page_size, int32_t num_pages) {
  SchedulerOptions o;
  o.page_size = page_size;
  o.num_pages = num_pages;
  o.max_batch_tokens = 1024;
  o.prefill_chunk_tokens = 1024;
  o.max_running_requests = 64;
  return o;
}

std::vector<int32_t> Prompt(int32_t n, int32_t seed = 0) {
  std::vector<int32_t> p(n);
  for (int32_t i = 0; i < n; ++i) p[i] = (seed * 7919 + i * 13) % 1000;
  return p;
}

// The token a fake model "samples" for request `id` at position `pos`.
int32_t FakeToken(RequestId id, size_t pos) { return static_cast<int32_t>((id * 31 + pos) % 997); }

// Pages not free and not held only by the prefix cache: the pages live requests hold.
int32_t PagesHeld(const Scheduler& s) { return s.allocator().num_used() - s.cached_only_pages(); }

// Checks what every plan must satisfy, given the scheduler's state right after Schedule().
void CheckPlan(const Scheduler& s, const StepPlan& plan) {
  const SchedulerOptions& o = s.options();
  std::set<RequestId> seen;
  int32_t total = 0;
  for (const WorkerBatch& b : plan.batches) {
    EXPECT_FALSE(b.items.empty());
    EXPECT_LE(b.num_tokens, o.max_worker_tokens);
    EXPECT_LE(static_cast<int32_t>(b.items.size()), o.max_worker_sequences);
    EXPECT_LT(b.worker, b.pool == Pool::kPrefill ? o.prefill_workers : o.decode_workers);
    int32_t sum = 0;
    for (const WorkItem& it : b.items) {
      EXPECT_TRUE(seen.insert(it.id).second) << "request " << it.id << " in two batches";
      const Sequence* q = s.Find(it.id);
      ASSERT_NE(q, nullptr);
      EXPECT_EQ(q->num_computed, it.start);
      EXPECT_EQ(q->in_flight_tokens, it.num_tokens);
      EXPECT_GE(it.num_tokens, 1);
      EXPECT_LE(it.start + it.num_tokens, static_cast<int32_t>(q->tokens.size()));
      EXPECT_EQ(it.want_logits, it.start + it.num_tokens == static_cast<int32_t>(q->tokens.size()));
      EXPECT_GE(static_cast<int64_t>(q->pages.pages().size()) * o.page_size,
                it.start + it.num_tokens);
      if (b.pool == Pool::kDecode) {
        EXPECT_EQ(it.num_tokens, 1);
        EXPECT_EQ(q->phase, SequencePhase::kDecode);
      } else {
        EXPECT_LE(it.num_tokens, o.prefill_chunk_tokens);
      }
      sum += it.num_tokens;
    }
    EXPECT_EQ(sum, b.num_tokens);
    total += sum;
  }
  EXPECT_LE(total, o.max_batch_tokens);
  for (RequestId id : plan.admitted) EXPECT_TRUE(seen.contains(id));
}

// Drives a Scheduler as the engine does, with a fake model that samples FakeToken.
class Sim {
 public:
  explicit Sim(const SchedulerOptions& o) : sched(o) {}

  void Add(RequestId id, int32_t prompt_len, int32_t max_new, int32_t priority = 0,
           int32_t seed = -1) {
    ASSERT_TRUE(sched.Add(id, priority, Prompt(prompt_len, seed < 0 ? id : seed), max_new).ok());
    max_new_[id] = max_new;
  }

  // Schedules the idle pools and checks the plan and the invariants.
  StepPlan Schedule(bool prefill_idle = true, bool decode_idle = true) {
    StepPlan plan = sched.Schedule(prefill_idle, decode_idle);
    CheckPlan(sched, plan);
    EXPECT_TRUE(sched.CheckInvariants().ok()) << sched.CheckInvariants();
    preemptions += static_cast<int32_t>(plan.preempted.size());
    return plan;
  }

  // Completes `b`: sampled tokens are appended, or the request finishes at max_new.
  void Complete(const WorkerBatch& b) {
    for (RequestId id : sched.Complete(b, /*ok=*/true)) removed.push_back(id);
    for (const WorkItem& it : b.items) {
      const Sequence* q = sched.Find(it.id);
      if (q == nullptr || !it.want_logits) continue;
      const int32_t token = FakeToken(it.id, q->tokens.size());
      if (static_cast<int32_t>(q->tokens.size()) - q->prompt_len + 1 >= max_new_[it.id]) {
        std::vector<int32_t> out(q->tokens.begin() + q->prompt_len, q->tokens.end());
        out.push_back(token);
        finished[it.id] = out;
        EXPECT_TRUE(sched.Remove(it.id));
      } else {
        ASSERT_TRUE(sched.AppendToken(it.id, token).ok());
      }
    }
    EXPECT_TRUE(sched.CheckInvariants().ok()) << sched.CheckInvariants();
  }

  // One synchronous step: plan for both pools and complete everything.
  StepPlan Step() {
    StepPlan plan = Schedule();
    for (const WorkerBatch& b : plan.batches) Complete(b);
    return plan;
  }

  // Steps until nothing is left (at most `max_steps`); returns the steps taken.
  int RunToEnd(int max_steps = 10000) {
    int steps = 0;
    while (sched.num_sequences() > 0 && steps < max_steps) {
      Step();
      ++steps;
    }
    EXPECT_EQ(sched.num_sequences(), 0) << "stalled";
    return steps;
  }

  // The generated tokens request `id` must end with.
  std::vector<int32_t> Expected(RequestId id, int32_t prompt_len) const {
    std::vector<int32_t> out;
    for (int32_t i = 0; i < max_new_.at(id); ++i) out.push_back(FakeToken(id, prompt_len + i));
    return out;
  }

  Scheduler sched;
  std::map<RequestId, std::vector<int32_t>> finished;
  std::vector<RequestId> removed;
  int32_t preemptions = 0;

 private:
  std::map<RequestId, int32_t> max_new_;
};

// Items of `plan` in `pool`, as (id, start, num_tokens).
std::vector<std::tuple<RequestId, int32_t, int32_t>> Items(const StepPlan& plan, Pool pool) {
  std::vector<std::tuple<RequestId, int32_t, int32_t>> out;
  for (const WorkerBatch& b : plan.batches) {
    if (b.pool != pool) continue;
    for (const WorkItem& it : b.items) out.emplace_back(it.id, it.start, it.num_tokens);
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST(SchedulerOptionsTest, ValidateNamesTheField) {
  EXPECT_TRUE(SchedulerOptions().Validate().ok());
  for (int field = 0; field < 9; ++field) {
    SchedulerOptions o;
    int32_t* f[] = {&o.page_size,
                    &o.num_pages,
                    &o.max_batch_tokens,
                    &o.prefill_chunk_tokens,
                    &o.max_running_requests,
                    &o.prefill_workers,
                    &o.decode_workers,
                    &o.max_worker_tokens,
                    &o.max_worker_sequences};
    *f[field] = field % 2 == 0 ? 0 : -3;
    const absl::Status st = o.Validate();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(std::string(st.message()), HasSubstr("must be > 0"));
  }
  SchedulerOptions o;
  o.prefill_chunk_tokens = 0;
  EXPECT_THAT(std::string(o.Validate().message()), HasSubstr("prefill_chunk_tokens"));
}

TEST(SchedulerTest, AddRejectsBadRequests) {
  Scheduler s(Options(4, 8));
  EXPECT_EQ(s.Add(1, 0, {}, 4).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.Add(1, 0, Prompt(3), 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.Add(1, 0, Prompt(30), 3).code(), absl::StatusCode::kInvalidArgument);  // 33 > 32
  EXPECT_TRUE(s.Add(1, 0, Prompt(30), 2).ok());                                      // 32 fits
  EXPECT_EQ(s.Add(1, 0, Prompt(3), 2).code(), absl::StatusCode::kInvalidArgument);   // duplicate
  EXPECT_EQ(s.num_waiting(), 1);
  EXPECT_EQ(s.waiting_tokens(), 30);
  EXPECT_TRUE(s.CheckInvariants().ok());
}

TEST(SchedulerTest, OneRequestPrefillsThenDecodesThenFreesEverything) {
  SchedulerOptions o = Options(4, 16);
  o.enable_prefix_caching = false;
  Sim sim(o);
  sim.Add(1, 10, 3);
  StepPlan p = sim.Schedule();
  EXPECT_THAT(p.admitted, ElementsAre(1));
  EXPECT_THAT(Items(p, Pool::kPrefill), ElementsAre(std::make_tuple(1, 0, 10)));
  EXPECT_THAT(Items(p, Pool::kDecode), IsEmpty());
  EXPECT_EQ(sim.sched.allocator().num_used(), 3);
  EXPECT_EQ(sim.sched.num_in_phase(SequencePhase::kPrefill), 1);
  // Nothing more to plan while the prefill is in flight.
  EXPECT_TRUE(sim.sched.Schedule(true, true).empty());
  sim.Complete(p.batches[0]);
  EXPECT_EQ(sim.sched.num_in_phase(SequencePhase::kDecode), 1);
  p = sim.Schedule();
  EXPECT_THAT(Items(p, Pool::kDecode), ElementsAre(std::make_tuple(1, 10, 1)));
  EXPECT_EQ(sim.sched.allocator().num_used(), 3);
  sim.Complete(p.batches[0]);
  p = sim.Step();  // third token: position 11, still page 2
  EXPECT_THAT(Items(p, Pool::kDecode), ElementsAre(std::make_tuple(1, 11, 1)));
  EXPECT_EQ(sim.finished[1], sim.Expected(1, 10));
  EXPECT_EQ(sim.sched.num_sequences(), 0);
  EXPECT_EQ(sim.sched.allocator().num_used(), 0);
}

TEST(SchedulerTest, LongPromptIsChunked) {
  SchedulerOptions o = Options(4, 64);
  o.prefill_chunk_tokens = 32;
  Sim sim(o);
  sim.Add(1, 100, 1);
  std::vector<std::tuple<RequestId, int32_t, int32_t>> chunks;
  std::vector<bool> logits;
  while (sim.sched.num_sequences() > 0) {
    StepPlan p = sim.Schedule();
    for (const auto& it : Items(p, Pool::kPrefill)) chunks.push_back(it);
    for (const WorkerBatch& b : p.batches) {
      for (const WorkItem& it : b.items) logits.push_back(it.want_logits);
      sim.Complete(b);
    }
  }
  EXPECT_THAT(chunks, ElementsAre(std::make_tuple(1, 0, 32), std::make_tuple(1, 32, 32),
                                  std::make_tuple(1, 64, 32), std::make_tuple(1, 96, 4)));
  EXPECT_THAT(logits, ElementsAre(false, false, false, true));
  EXPECT_EQ(PagesHeld(sim.sched), 0);
}

TEST(SchedulerTest, DecodesComeFirstAndALongPromptNeverStallsThem) {
  SchedulerOptions o = Options(4, 256);
  o.max_batch_tokens = 20;
  o.prefill_chunk_tokens = 64;
  Sim sim(o);
  for (RequestId id = 1; id <= 3; ++id) sim.Add(id, 5, 40);
  sim.Step();  // three prefills of 5 tokens
  sim.Add(9, 200, 2);
  int prefill_steps = 0;
  int32_t left = 200;
  while (sim.sched.Find(9) != nullptr && sim.sched.Find(9)->phase != SequencePhase::kDecode) {
    StepPlan p = sim.Step();
    // Every decoding request gets its token in every step while the long prompt prefills.
    EXPECT_EQ(Items(p, Pool::kDecode).size(), 3u);
    EXPECT_EQ(p.num_tokens(Pool::kPrefill), std::min(left, 17));  // 20 - a token per decode
    left -= p.num_tokens(Pool::kPrefill);
    ++prefill_steps;
  }
  EXPECT_EQ(left, 0);
  EXPECT_EQ(prefill_steps, (200 + 16) / 17);
  sim.RunToEnd();
  for (RequestId id = 1; id <= 3; ++id) EXPECT_EQ(sim.finished[id], sim.Expected(id, 5));
  EXPECT_EQ(PagesHeld(sim.sched), 0);
}

TEST(SchedulerTest, DecodesMayTakeTheWholeBudget) {
  SchedulerOptions o = Options(4, 64);
  o.max_batch_tokens = 2;
  Sim sim(o);
  sim.Add(1, 1, 5);
  sim.Add(2, 1, 5);
  sim.Step();  // both prompts: 1 token each
  sim.Add(3, 4, 1);
  for (int i = 0; i < 4; ++i) {
    StepPlan p = sim.Step();
    EXPECT_EQ(p.num_tokens(Pool::kDecode), 2);
    EXPECT_EQ(p.num_tokens(Pool::kPrefill), 0);
  }
  EXPECT_EQ(sim.sched.Find(3)->phase, SequencePhase::kWaiting);
  sim.RunToEnd();
  EXPECT_EQ(sim.finished.size(), 3u);
}

TEST(SchedulerTest, AdmitsByPriorityThenArrival) {
  SchedulerOptions o = Options(4, 64);
  o.max_running_requests = 1;
  Sim sim(o);
  sim.Add(1, 4, 1, /*priority=*/0);
  sim.Add(2, 4, 1, /*priority=*/5);
  sim.Add(3, 4, 1, /*priority=*/1);
  sim.Add(4, 4, 1, /*priority=*/5);
  std::vector<RequestId> order;
  while (sim.sched.num_sequences() > 0) {
    StepPlan p = sim.Step();
    EXPECT_LE(sim.sched.num_running(), 1);
    order.insert(order.end(), p.admitted.begin(), p.admitted.end());
  }
  EXPECT_THAT(order, ElementsAre(2, 4, 3, 1));
}

TEST(SchedulerTest, ExtremePrioritiesOrderCorrectly) {
  SchedulerOptions o = Options(4, 64);
  o.max_running_requests = 1;
  Sim sim(o);
  sim.Add(1, 4, 1, std::numeric_limits<int32_t>::min());
  sim.Add(2, 4, 1, 0);
  sim.Add(3, 4, 1, std::numeric_limits<int32_t>::max());
  std::vector<RequestId> order;
  while (sim.sched.num_sequences() > 0) {
    StepPlan p = sim.Step();
    order.insert(order.end(), p.admitted.begin(), p.admitted.end());
  }
  EXPECT_THAT(order, ElementsAre(3, 2, 1));
}

TEST(SchedulerTest, AdmissionWaitsUntilTheFirstChunkFits) {
  SchedulerOptions o = Options(4, 8);
  o.enable_prefix_caching = false;
  Sim sim(o);
  sim.Add(1, 20, 4);  // 5 pages, 6 with its tokens
  sim.Add(2, 20, 4);  // its 5 pages do not fit next to request 1
  sim.Add(3, 2, 2);   // would fit, but must not overtake request 2
  StepPlan p = sim.Step();
  EXPECT_THAT(p.admitted, ElementsAre(1));
  while (sim.sched.Find(1) != nullptr) {
    p = sim.Step();
    EXPECT_THAT(p.admitted, IsEmpty());
  }
  p = sim.Step();
  EXPECT_THAT(p.admitted, ElementsAre(2, 3));
  sim.RunToEnd();
  EXPECT_EQ(sim.preemptions, 0);
}

TEST(SchedulerTest, SmallChunksLetAdmissionProceedAndPreemptionResolvesTheShortage) {
  SchedulerOptions o = Options(4, 8);
  o.enable_prefix_caching = false;
  o.prefill_chunk_tokens = 8;
  Sim sim(o);
  sim.Add(1, 20, 6, /*priority=*/1);
  sim.Add(2, 20, 6);
  StepPlan p = sim.Step();
  EXPECT_THAT(p.admitted, ElementsAre(1, 2));  // first chunks: 2 pages each
  sim.RunToEnd();
  EXPECT_GT(sim.preemptions, 0);
  EXPECT_EQ(sim.finished[1], sim.Expected(1, 20));
  EXPECT_EQ(sim.finished[2], sim.Expected(2, 20));
  EXPECT_EQ(sim.sched.allocator().num_used(), 0);
  EXPECT_EQ(sim.sched.stats().preemptions, sim.preemptions);
}

TEST(SchedulerTest, RunningLimitCapsAdmission) {
  SchedulerOptions o = Options(4, 64);
  o.max_running_requests = 2;
  Sim sim(o);
  for (RequestId id = 1; id <= 5; ++id) sim.Add(id, 3, 3);
  StepPlan p = sim.Step();
  EXPECT_EQ(p.admitted.size(), 2u);
  EXPECT_EQ(sim.sched.num_waiting(), 3);
  EXPECT_EQ(sim.sched.waiting_tokens(), 9);
  sim.RunToEnd();
  EXPECT_EQ(sim.finished.size(), 5u);
}

// Three requests decode in a pool that cannot hold them all: the least important running
// request is preempted, requeued ahead of new arrivals of its priority, and recomputes its
// prompt and generated tokens.
TEST(SchedulerTest, PreemptsTheLeastImportantAndRequeuesItFirst) {
  SchedulerOptions o = Options(4, 6);
  o.enable_prefix_caching = false;
  Sim sim(o);
  sim.Add(1, 4, 8, /*priority=*/2);
  sim.Add(2, 4, 8, /*priority=*/1);
  sim.Add(3, 4, 8, /*priority=*/1);  // same priority as 2, later: the first victim
  StepPlan p = sim.Step();
  EXPECT_EQ(p.admitted.size(), 3u);  // 3 pages used, 3 free
  sim.Add(4, 4, 1, /*priority=*/1);  // arrives after 3
  p = sim.Step();  // every request needs a 2nd page: 3 free pages, request 4 waits
  EXPECT_THAT(p.preempted, IsEmpty());
  // Tokens at positions 5..7 fit in the second pages; position 8 needs a third page each.
  for (int i = 0; i < 3; ++i) sim.Step();
  p = sim.Schedule();
  EXPECT_THAT(p.preempted, ElementsAre(3));
  EXPECT_THAT(Items(p, Pool::kDecode),
              ElementsAre(std::make_tuple(1, 8, 1), std::make_tuple(2, 8, 1)));
  const Sequence* three = sim.sched.Find(3);
  EXPECT_EQ(three->phase, SequencePhase::kWaiting);
  EXPECT_EQ(three->num_computed, 0);
  EXPECT_TRUE(three->pages.empty());
  EXPECT_EQ(three->tokens.size(), 9u);  // prompt + 5 generated are kept
  EXPECT_EQ(three->preemptions, 1);
  for (const WorkerBatch& b : p.batches) sim.Complete(b);
  // Both 3 (preempted) and 4 (new) have priority 1: 3 goes first, recomputing 9 tokens.
  std::vector<RequestId> admitted;
  std::vector<std::tuple<RequestId, int32_t, int32_t>> prefills;
  while (sim.sched.num_sequences() > 0) {
    p = sim.Step();
    admitted.insert(admitted.end(), p.admitted.begin(), p.admitted.end());
    for (const auto& it : Items(p, Pool::kPrefill)) prefills.push_back(it);
  }
  ASSERT_GE(admitted.size(), 2u);
  EXPECT_EQ(admitted[0], 3u);
  EXPECT_EQ(prefills[0], std::make_tuple(RequestId{3}, 0, 9));
  for (RequestId id = 1; id <= 3; ++id) EXPECT_EQ(sim.finished[id], sim.Expected(id, 4)) << id;
  EXPECT_EQ(sim.sched.allocator().num_used(), 0);
}

TEST(SchedulerTest, TheLeastImportantRequestPreemptsItself) {
  SchedulerOptions o = Options(2, 3);
  o.enable_prefix_caching = false;
  Sim sim(o);
  sim.Add(1, 2, 4, /*priority=*/1);
  sim.Add(2, 2, 4, /*priority=*/0);
  sim.Step();  // one page each, 1 free
  // Step 2: request 1 takes the free page for position 2; request 2 needs one too, and as the
  // least important it preempts itself.
  StepPlan p = sim.Step();
  EXPECT_THAT(p.preempted, ElementsAre(2));
  EXPECT_THAT(Items(p, Pool::kDecode), ElementsAre(std::make_tuple(1, 2, 1)));
  sim.RunToEnd();
  EXPECT_EQ(sim.finished[1], sim.Expected(1, 2));
  EXPECT_EQ(sim.finished[2], sim.Expected(2, 2));
}

TEST(SchedulerTest, AMoreImportantDecodePreemptsAnIdleLessImportantOne) {
  SchedulerOptions o = Options(2, 4);
  o.enable_prefix_caching = false;
  Sim sim(o);
  sim.Add(1, 2, 4, /*priority=*/1);
  sim.Add(2, 2, 4, /*priority=*/0);
  sim.Step();
  sim.Step();  // both computed position 2: two pages each, the pool is full
  // Position 3 fits in the second pages; only the decode pool is asked for work.
  StepPlan p = sim.Schedule(/*prefill_idle=*/false, /*decode_idle=*/true);
  ASSERT_EQ(p.batches.size(), 1u);
  EXPECT_EQ(Items(p, Pool::kDecode).size(), 2u);
  sim.Complete(p.batches[0]);
  // Position 4 needs a third page each: request 1 takes request 2's pages.
  p = sim.Schedule();
  EXPECT_THAT(p.preempted, ElementsAre(2));
  EXPECT_THAT(Items(p, Pool::kDecode), ElementsAre(std::make_tuple(1, 4, 1)));
  sim.Complete(p.batches[0]);
  sim.RunToEnd();
  EXPECT_EQ(sim.finished[1], sim.Expected(1, 2));
  EXPECT_EQ(sim.finished[2], sim.Expected(2, 2));
}

TEST(SchedulerTest, AMoreImportantRequestWaitsForAnInFlightVictim) {
  SchedulerOptions o = Options(2, 4);
  o.enable_prefix_caching = false;
  o.prefill_chunk_tokens = 2;
  Sim sim(o);
  sim.Add(1, 2, 6, /*priority=*/1);
  sim.Add(2, 5, 1, /*priority=*/0);
  StepPlan p = sim.Schedule();  // 1: page 0; 2: chunk [0,2) page 1
  ASSERT_EQ(p.batches.size(), 1u);
  sim.Complete(p.batches[0]);
  p = sim.Schedule();  // 1 decodes at 2 (page 2); 2 prefills [2,4) (page 3): pool full
  ASSERT_EQ(p.batches.size(), 2u);
  const WorkerBatch prefill = p.batches[0], decode = p.batches[1];
  ASSERT_EQ(prefill.pool, Pool::kPrefill);
  sim.Complete(decode);
  // Request 1 needs position 3: room in page 2. Then position 4 needs a page while request 2's
  // chunk is in flight: request 1 waits rather than preempting itself.
  sim.Complete(sim.Schedule(false, true).batches.at(0));
  p = sim.Schedule(false, true);
  EXPECT_TRUE(p.empty());
  EXPECT_EQ(sim.sched.Find(1)->phase, SequencePhase::kDecode);
  sim.Complete(prefill);
  p = sim.Schedule(false, true);
  EXPECT_THAT(p.preempted, ElementsAre(2));
  sim.Complete(p.batches.at(0));
  sim.RunToEnd();
  EXPECT_EQ(sim.finished[1], sim.Expected(1, 2));
  EXPECT_EQ(sim.finished[2], sim.Expected(2, 5));
}

TEST(SchedulerTest, PrefixCacheServesRepeatedPrompts) {
  Sim sim(Options(4, 32));
  sim.Add(1, 14, 2, 0, /*seed=*/5);
  sim.RunToEnd();
  // 14 prompt tokens + 1 computed generated token: 3 full pages are cached.
  EXPECT_EQ(sim.sched.prefix_cache().stats().cached_pages, 3);
  EXPECT_EQ(sim.sched.cached_only_pages(), 3);
  EXPECT_EQ(PagesHeld(sim.sched), 0);
  sim.Add(2, 14, 2, 0, /*seed=*/5);  // same prompt
  StepPlan p = sim.Schedule();
  EXPECT_THAT(Items(p, Pool::kPrefill), ElementsAre(std::make_tuple(2, 12, 2)));
  EXPECT_EQ(sim.sched.Find(2)->cached_tokens, 12);
  EXPECT_EQ(sim.sched.allocator().num_used(), 4);  // 3 shared + 1 new
  EXPECT_EQ(sim.sched.cached_only_pages(), 0);     // all three are in use again
  for (const WorkerBatch& b : p.batches) sim.Complete(b);
  sim.RunToEnd();
  EXPECT_EQ(sim.finished[2], sim.Expected(2, 14));
  EXPECT_EQ(sim.sched.stats().prefix_query_tokens, 28);
  EXPECT_EQ(sim.sched.stats().prefix_hit_tokens, 12);
  // A different prompt shares nothing.
  sim.Add(3, 14, 1, 0, /*seed=*/6);
  p = sim.Schedule();
  EXPECT_THAT(Items(p, Pool::kPrefill), ElementsAre(std::make_tuple(3, 0, 14)));
}

TEST(SchedulerTest, PrefixCachingCanBeTurnedOff) {
  SchedulerOptions o = Options(4, 32);
  o.enable_prefix_caching = false;
  Sim sim(o);
  sim.Add(1, 14, 2, 0, 5);
  sim.RunToEnd();
  sim.Add(2, 14, 2, 0, 5);
  StepPlan p = sim.Schedule();
  EXPECT_THAT(Items(p, Pool::kPrefill), ElementsAre(std::make_tuple(2, 0, 14)));
  EXPECT_EQ(sim.sched.prefix_cache().stats().cached_pages, 0);
  EXPECT_EQ(sim.sched.stats().prefix_query_tokens, 0);
}

TEST(SchedulerTest, CachedPagesAreEvictedForNewWork) {
  Sim sim(Options(4, 8));
  sim.Add(1, 24, 1, 0, 1);
  sim.RunToEnd();
  EXPECT_EQ(sim.sched.cached_only_pages(), 6);
  sim.Add(2, 24, 1, 0, 2);  // a different prompt needs 6 pages: 2 free + 4 evicted
  StepPlan p = sim.Step();
  EXPECT_THAT(p.admitted, ElementsAre(2));
  EXPECT_GE(sim.sched.prefix_cache().stats().evictions, 4);
  sim.RunToEnd();
  EXPECT_EQ(PagesHeld(sim.sched), 0);
}

TEST(SchedulerTest, RemoveFreesPagesInEveryState) {
  Sim sim(Options(4, 32));
  sim.Add(1, 10, 5);
  sim.Add(2, 10, 5);
  sim.Add(3, 10, 5);
  StepPlan p = sim.Schedule();
  // All three in flight: removal is deferred to Complete.
  EXPECT_FALSE(sim.sched.Remove(2));
  EXPECT_TRUE(sim.sched.CheckInvariants().ok());
  sim.Complete(p.batches[0]);
  EXPECT_THAT(sim.removed, ElementsAre(2));
  EXPECT_EQ(sim.sched.Find(2), nullptr);
  // Idle running request: freed at once.
  EXPECT_TRUE(sim.sched.Remove(1));
  // Waiting request and unknown ids.
  sim.Add(4, 10, 5);
  EXPECT_TRUE(sim.sched.Remove(4));
  EXPECT_TRUE(sim.sched.Remove(12345));
  EXPECT_EQ(sim.sched.num_waiting(), 0);
  EXPECT_EQ(sim.sched.waiting_tokens(), 0);
  EXPECT_TRUE(sim.sched.Remove(3));
  EXPECT_EQ(PagesHeld(sim.sched), 0);
  EXPECT_TRUE(sim.sched.CheckInvariants().ok());
}

TEST(SchedulerTest, FailedBatchComputesNothing) {
  Sim sim(Options(4, 32));
  sim.Add(1, 10, 5);
  StepPlan p = sim.Schedule();
  EXPECT_TRUE(sim.sched.Complete(p.batches[0], /*ok=*/false).empty());
  const Sequence* s = sim.sched.Find(1);
  EXPECT_EQ(s->num_computed, 0);
  EXPECT_FALSE(s->in_flight());
  EXPECT_TRUE(sim.sched.CheckInvariants().ok());
  EXPECT_EQ(sim.sched.AppendToken(1, 5).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(sim.sched.Remove(1));
  EXPECT_EQ(sim.sched.allocator().num_used(), 0);
}

TEST(SchedulerTest, AppendTokenChecksTheProtocol) {
  Sim sim(Options(4, 32));
  EXPECT_EQ(sim.sched.AppendToken(7, 1).code(), absl::StatusCode::kNotFound);
  sim.Add(1, 3, 1);
  EXPECT_EQ(sim.sched.AppendToken(1, 1).code(), absl::StatusCode::kFailedPrecondition);  // queued
  StepPlan p = sim.Schedule();
  EXPECT_EQ(sim.sched.AppendToken(1, 1).code(), absl::StatusCode::kFailedPrecondition);  // flight
  EXPECT_TRUE(sim.sched.Complete(p.batches[0], true).empty());
  ASSERT_TRUE(sim.sched.AppendToken(1, 1).ok());  // the one allowed token
  EXPECT_EQ(sim.sched.AppendToken(1, 1).code(), absl::StatusCode::kFailedPrecondition);  // pending
  p = sim.Schedule();
  EXPECT_TRUE(sim.sched.Complete(p.batches[0], true).empty());
  // A second generated token would exceed max_new_tokens = 1.
  EXPECT_EQ(sim.sched.AppendToken(1, 1).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(sim.sched.Remove(1));
}

TEST(SchedulerTest, PacksBatchesPerWorkerWithinTheirLimits) {
  SchedulerOptions o = Options(4, 256);
  o.decode_workers = 2;
  o.prefill_workers = 3;
  o.max_worker_sequences = 2;
  o.max_worker_tokens = 16;
  Sim sim(o);
  for (RequestId id = 1; id <= 5; ++id) sim.Add(id, 20, 10);
  StepPlan p = sim.Schedule();
  // Three prefill workers of 16 tokens: each takes a first chunk of 16 tokens; two wait.
  int32_t prefill_batches = 0;
  for (const WorkerBatch& b : p.batches) prefill_batches += b.pool == Pool::kPrefill;
  EXPECT_EQ(prefill_batches, 3);
  EXPECT_EQ(p.num_tokens(Pool::kPrefill), 48);
  for (const WorkerBatch& b : p.batches) sim.Complete(b);
  sim.RunToEnd();
  EXPECT_EQ(sim.finished.size(), 5u);
  // With all five decoding, a decode step uses both workers with at most 2 sequences each.
  for (RequestId id = 11; id <= 15; ++id) sim.Add(id, 2, 10);
  sim.Step();
  p = sim.Schedule();
  EXPECT_EQ(Items(p, Pool::kDecode).size(), 4u);
  for (const WorkerBatch& b : p.batches) sim.Complete(b);
  sim.RunToEnd();
}

// Random workloads with shared prefixes, priorities, cancellations and pools that finish their
// batches out of step; every invariant is checked after every call, and at the end every page
// is free or cached and every request that was not cancelled produced its exact tokens.
TEST(SchedulerStressTest, RandomWorkloadsKeepEveryInvariant) {
  int64_t total_preemptions = 0, total_hits = 0, deferred_removals = 0, async_steps = 0;
  for (uint32_t seed = 1; seed <= 40; ++seed) {
    std::mt19937 rng(seed);
    auto uniform = [&rng](int lo, int hi) {
      return std::uniform_int_distribution<int>(lo, hi)(rng);
    };
    SchedulerOptions o;
    o.page_size = uniform(1, 8);
    o.num_pages = uniform(24, 80);
    o.max_batch_tokens = uniform(8, 96);
    o.prefill_chunk_tokens = uniform(1, 48);
    o.max_running_requests = uniform(1, 12);
    o.prefill_workers = uniform(1, 3);
    o.decode_workers = uniform(1, 3);
    o.max_worker_tokens = uniform(4, 64);
    o.max_worker_sequences = uniform(1, 8);
    o.enable_prefix_caching = seed % 3 != 0;
    SCOPED_TRACE(testing::Message()
                 << "seed " << seed << " page_size " << o.page_size << " pages " << o.num_pages);
    Sim sim(o);
    const int32_t capacity = o.num_pages * o.page_size;
    std::map<RequestId, int32_t> prompt_len;
    std::set<RequestId> cancelled;
    std::vector<WorkerBatch> in_flight[2];
    RequestId next_id = 1;
    for (int step = 0; step < 20000; ++step) {
      if (next_id <= 60 && uniform(0, 2) == 0) {
        const int32_t len = uniform(1, std::min(60, capacity / 2));
        const int32_t max_new = uniform(1, std::min(30, capacity - len));
        prompt_len[next_id] = len;
        // A few shared prompt families so the prefix cache has something to match.
        sim.Add(next_id, len, max_new, uniform(0, 2), uniform(0, 3));
        ++next_id;
      }
      if (uniform(0, 15) == 0 && next_id > 1) {
        const RequestId victim = uniform(1, static_cast<int>(next_id - 1));
        if (sim.sched.Find(victim) != nullptr && !sim.finished.contains(victim)) {
          cancelled.insert(victim);
          sim.sched.Remove(victim);
          EXPECT_TRUE(sim.sched.CheckInvariants().ok()) << sim.sched.CheckInvariants();
        }
      }
      const bool prefill_idle = in_flight[0].empty(), decode_idle = in_flight[1].empty();
      async_steps += prefill_idle != decode_idle;
      StepPlan p = sim.Schedule(prefill_idle, decode_idle);
      for (WorkerBatch& b : p.batches) in_flight[b.pool == Pool::kDecode].push_back(b);
      // Each pool finishes its step with some probability: pools run out of step.
      for (auto& pool : in_flight) {
        if (!pool.empty() && uniform(0, 2) != 0) {
          for (const WorkerBatch& b : pool) sim.Complete(b);
          pool.clear();
        }
      }
      if (next_id > 60 && sim.sched.num_sequences() == 0) break;
    }
    total_preemptions += sim.preemptions;
    total_hits += sim.sched.stats().prefix_hit_tokens;
    deferred_removals += static_cast<int64_t>(sim.removed.size());
    EXPECT_EQ(sim.sched.num_sequences(), 0) << "requests left: stalled";
    EXPECT_EQ(PagesHeld(sim.sched), 0);
    EXPECT_TRUE(sim.sched.CheckInvariants().ok());
    for (const auto& [id, len] : prompt_len) {
      if (cancelled.contains(id) && !sim.finished.contains(id)) continue;
      EXPECT_EQ(sim.finished[id], sim.Expected(id, len)) << "request " << id;
    }
  }
  // The workloads exercised what they are meant to.
  EXPECT_GT(total_preemptions, 50);
  EXPECT_GT(total_hits, 100);
  EXPECT_GT(deferred_removals, 5);
  EXPECT_GT(async_steps, 1000);
  std::cout << "preemptions " << total_preemptions << ", prefix hit tokens " << total_hits
            << ", deferred removals " << deferred_removals << "\n";
}

}  // namespace
}  // namespace sieve::engine
