#include "engine/serving/scheduler.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace sieve::engine {

absl::Status SchedulerOptions::Validate() const {
  const std::pair<const char*, int32_t> fields[] = {
      {"page_size", page_size},
      {"num_pages", num_pages},
      {"max_batch_tokens", max_batch_tokens},
      {"prefill_chunk_tokens", prefill_chunk_tokens},
      {"max_running_requests", max_running_requests},
      {"prefill_workers", prefill_workers},
      {"decode_workers", decode_workers},
      {"max_worker_tokens", max_worker_tokens},
      {"max_worker_sequences", max_worker_sequences},
  };
  for (const auto& [name, value] : fields) {
    if (value <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("scheduler: ", name, " must be > 0, got ", value));
    }
  }
  for (const SidePoolSpec& p : side_pools) {
    if (p.name.empty() || p.bytes_per_page_per_layer <= 0 || p.num_layers <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("scheduler: side pool '", p.name, "' needs a name, bytes and layers"));
    }
  }
  return absl::OkStatus();
}

int32_t StepPlan::num_tokens(Pool pool) const {
  int32_t n = 0;
  for (const WorkerBatch& b : batches) {
    if (b.pool == pool) n += b.num_tokens;
  }
  return n;
}

// Fills one batch per worker of a pool, within the per-worker limits, spreading the load.
struct Scheduler::Packer {
  Packer(Pool pool, int32_t workers, const SchedulerOptions& o)
      : max_tokens(o.max_worker_tokens), max_sequences(o.max_worker_sequences) {
    batches.resize(workers);
    for (int32_t w = 0; w < workers; ++w) {
      batches[w].pool = pool;
      batches[w].worker = w;
    }
  }

  // Returns the worker with the most token room that can take one more sequence, or -1.
  int32_t BestWorker() const {
    int32_t best = -1;
    for (int32_t w = 0; w < static_cast<int32_t>(batches.size()); ++w) {
      if (static_cast<int32_t>(batches[w].items.size()) >= max_sequences || Room(w) == 0) continue;
      if (best < 0 || Room(w) > Room(best)) best = w;
    }
    return best;
  }
  int32_t Room(int32_t w) const { return max_tokens - batches[w].num_tokens; }
  void Add(int32_t w, const WorkItem& item) {
    batches[w].items.push_back(item);
    batches[w].num_tokens += item.num_tokens;
  }
  void MoveInto(std::vector<WorkerBatch>& out) {
    for (WorkerBatch& b : batches) {
      if (!b.items.empty()) out.push_back(std::move(b));
    }
  }

  int32_t max_tokens;
  int32_t max_sequences;
  std::vector<WorkerBatch> batches;
};

namespace {

// Returns the KV cache options of `options` after checking them all; a broken one aborts.
KvCacheOptions KvOptionsOf(const SchedulerOptions& options) {
  const absl::Status valid = options.Validate();
  if (!valid.ok()) internal::KvInvariantFailure(valid.message());
  KvCacheOptions kv;
  kv.page_size = options.page_size;
  kv.num_pages = options.num_pages;
  kv.enable_prefix_caching = options.enable_prefix_caching;
  return kv;
}

}  // namespace

Scheduler::Scheduler(const SchedulerOptions& options)
    : options_(options), kv_(KvOptionsOf(options)) {
  for (const SidePoolSpec& spec : options.side_pools) {
    // No page is in use yet; a bad spec is a caller's bug (Validate rejects it).
    const absl::Status st = kv_.RegisterSidePool(spec, nullptr);
    if (!st.ok()) internal::KvInvariantFailure(st.message());
  }
}

Scheduler::~Scheduler() = default;

Sequence* Scheduler::Get(RequestId id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? nullptr : it->second.get();
}

const Sequence* Scheduler::Find(RequestId id) const { return Get(id); }

int32_t Scheduler::num_in_phase(SequencePhase phase) const {
  int32_t n = 0;
  for (const auto& [id, s] : seqs_) n += s->phase == phase ? 1 : 0;
  return n;
}

absl::Status Scheduler::Add(RequestId id, int32_t priority, std::vector<int32_t> prompt,
                            int32_t max_new_tokens) {
  if (seqs_.contains(id)) return absl::InvalidArgumentError(absl::StrCat("duplicate id ", id));
  if (prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  if (max_new_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_new_tokens ", max_new_tokens, " < 1"));
  }
  const int64_t total = static_cast<int64_t>(prompt.size()) + max_new_tokens;
  const int64_t capacity = int64_t{options_.num_pages} * options_.page_size;
  if (total > capacity) {
    return absl::InvalidArgumentError(absl::StrCat("prompt + max_new_tokens = ", total,
                                                   " tokens exceed the KV pool of ", capacity));
  }
  auto s = std::make_unique<Sequence>(kv_.AddSequence(id));
  s->id = id;
  s->priority = priority;
  s->arrival = next_arrival_++;
  s->prompt_len = static_cast<int32_t>(prompt.size());
  s->max_total_tokens = static_cast<int32_t>(total);
  s->tokens = std::move(prompt);
  waiting_.insert(WaitKeyOf(*s));
  waiting_tokens_ += static_cast<int64_t>(s->tokens.size());
  seqs_.emplace(id, std::move(s));
  return absl::OkStatus();
}

StepPlan Scheduler::Schedule(bool prefill_pool_idle, bool decode_pool_idle) {
  StepPlan plan;
  Packer decode(Pool::kDecode, options_.decode_workers, options_);
  Packer prefill(Pool::kPrefill, options_.prefill_workers, options_);
  if (decode_pool_idle) ScheduleDecodes(plan, decode);
  if (prefill_pool_idle) {
    // Every decoding sequence keeps one token of the budget, whether it runs now or not.
    const int32_t reserved =
        std::min(options_.max_batch_tokens, num_in_phase(SequencePhase::kDecode));
    int32_t budget = options_.max_batch_tokens - reserved;
    ScheduleRunningPrefills(plan, prefill, budget);
    AdmitWaiting(plan, prefill, budget);
  }
  prefill.MoveInto(plan.batches);
  decode.MoveInto(plan.batches);
  return plan;
}

void Scheduler::ScheduleDecodes(StepPlan& plan, Packer& packer) {
  int32_t budget = options_.max_batch_tokens;
  std::vector<RequestId> order;
  for (const RunKey& k : running_) order.push_back(std::get<2>(k));
  for (RequestId id : order) {
    if (budget == 0) break;
    Sequence* s = Get(id);
    if (s->phase != SequencePhase::kDecode || s->in_flight() || s->pending() != 1) continue;
    const int32_t w = packer.BestWorker();
    if (w < 0) break;
    if (ReserveOrPreempt(*s, 1, /*may_preempt_self=*/true, plan) == 0) continue;
    packer.Add(w, WorkItem{id, s->num_computed, 1, /*want_logits=*/true});
    s->in_flight_tokens = 1;
    --budget;
  }
}

int32_t Scheduler::ReserveOrPreempt(Sequence& s, int32_t want, bool may_preempt_self,
                                    StepPlan& plan) {
  bool cleared = false;
  int32_t n = kv_.TokensThatFit(s.id, want);
  while (n == 0) {
    Sequence* victim = LeastImportantIdle();  // `s` is idle, so there is one
    if (victim != &s) {
      Preempt(*victim, plan);  // less important than `s`
    } else if (LessImportantInFlight(s)) {
      return 0;  // preempt that one once it is back
    } else if (running_.size() == 1 && !cleared) {
      // Alone and still short: the prefix cache holds pages it cannot evict leaf-first (parents
      // of pages this sequence computed itself). Drop the cache rather than stall.
      kv_.ClearPrefixCache();
      cleared = true;
    } else {
      if (may_preempt_self) Preempt(s, plan);
      return 0;  // wait for more important sequences to finish or free pages
    }
    n = kv_.TokensThatFit(s.id, want);
  }
  if (!kv_.Reserve(s.id, n).ok()) {
    internal::KvInvariantFailure("scheduler: pages that fit could not be reserved");
  }
  return n;
}

Sequence* Scheduler::LeastImportantIdle() {
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
    Sequence* s = Get(std::get<2>(*it));
    if (!s->in_flight()) return s;
  }
  return nullptr;
}

bool Scheduler::LessImportantInFlight(const Sequence& s) const {
  for (auto it = running_.rbegin(); it != running_.rend() && *it != RunKeyOf(s); ++it) {
    if (Get(std::get<2>(*it))->in_flight()) return true;
  }
  return false;
}

void Scheduler::ScheduleRunningPrefills(StepPlan& plan, Packer& packer, int32_t& budget) {
  std::vector<RequestId> order;
  for (const RunKey& k : running_) order.push_back(std::get<2>(k));
  for (RequestId id : order) {
    if (budget <= 0) break;
    Sequence* s = Get(id);
    if (s->phase != SequencePhase::kPrefill || s->in_flight() || s->pending() == 0) continue;
    const int32_t w = packer.BestWorker();
    if (w < 0) break;
    const int32_t want =
        std::min({s->pending(), options_.prefill_chunk_tokens, budget, packer.Room(w)});
    const int32_t n = ReserveOrPreempt(*s, want, /*may_preempt_self=*/false, plan);
    if (n == 0) continue;
    packer.Add(w, WorkItem{id, s->num_computed, n, /*want_logits=*/n == s->pending()});
    s->in_flight_tokens = n;
    budget -= n;
  }
}

void Scheduler::AdmitWaiting(StepPlan& plan, Packer& packer, int32_t& budget) {
  std::vector<RequestId> order;
  for (const WaitKey& k : waiting_) order.push_back(std::get<3>(k));
  for (RequestId id : order) {
    if (budget <= 0 || num_running() >= options_.max_running_requests) break;
    const int32_t w = packer.BestWorker();
    if (w < 0) break;
    Sequence* s = Get(id);
    if (std::find(plan.preempted.begin(), plan.preempted.end(), id) != plan.preempted.end()) {
      break;  // preempted this step: it would only take its pages back; nothing overtakes it
    }
    const int32_t matched = kv_.MatchPrefix(id, s->tokens);  // 0 with prefix caching off
    const int32_t pending = static_cast<int32_t>(s->tokens.size()) - matched;
    const int32_t n = std::min({pending, options_.prefill_chunk_tokens, budget, packer.Room(w)});
    if (kv_.TokensThatFit(id, n) < n) {
      kv_.Release(id);  // gives the matched pages back to the cache
      break;            // strict order: nothing behind it overtakes
    }
    waiting_.erase(WaitKeyOf(*s));
    waiting_tokens_ -= static_cast<int64_t>(s->tokens.size());
    s->num_computed = matched;
    if (!kv_.Reserve(id, n).ok()) {
      internal::KvInvariantFailure("scheduler: admitted pages could not be reserved");
    }
    if (!s->admitted_once) {
      s->admitted_once = true;
      s->cached_tokens = matched;
      ++stats_.admissions;
      stats_.prefix_query_tokens += options_.enable_prefix_caching ? s->prompt_len : 0;
      stats_.prefix_hit_tokens += matched;
    }
    s->phase = SequencePhase::kPrefill;
    s->preempted = false;
    running_.insert(RunKeyOf(*s));
    packer.Add(w, WorkItem{id, s->num_computed, n, /*want_logits=*/n == pending});
    s->in_flight_tokens = n;
    budget -= n;
    plan.admitted.push_back(id);
  }
}

void Scheduler::Preempt(Sequence& s, StepPlan& plan) {
  running_.erase(RunKeyOf(s));
  kv_.Release(s.id, Computed(s));  // full computed pages stay in the prefix cache
  s.num_computed = 0;
  s.phase = SequencePhase::kWaiting;
  s.preempted = true;
  ++s.preemptions;
  ++stats_.preemptions;
  waiting_.insert(WaitKeyOf(s));
  waiting_tokens_ += static_cast<int64_t>(s.tokens.size());
  plan.preempted.push_back(s.id);
}

std::vector<RequestId> Scheduler::Complete(const WorkerBatch& batch, bool ok) {
  std::vector<RequestId> removed;
  for (const WorkItem& item : batch.items) {
    Sequence* s = Get(item.id);
    if (s == nullptr || s->in_flight_tokens != item.num_tokens || s->num_computed != item.start) {
      internal::KvInvariantFailure(
          absl::StrCat("scheduler: Complete of request ", item.id, " that is not in flight"));
    }
    s->in_flight_tokens = 0;
    if (ok) {
      s->num_computed += item.num_tokens;
      kv_.Offer(s->id, Computed(*s));
    } else {
      s->num_computed = kv_.Truncate(s->id, s->num_computed);
    }
    if (s->remove_pending) {
      removed.push_back(item.id);
      ReleaseAndErase(*s);
    }
  }
  return removed;
}

absl::Status Scheduler::AppendToken(RequestId id, int32_t token) {
  Sequence* s = Get(id);
  if (s == nullptr) return absl::NotFoundError(absl::StrCat("no request ", id));
  if (s->in_flight() || s->pending() != 0 || s->phase == SequencePhase::kWaiting) {
    return absl::FailedPreconditionError(
        absl::StrCat("request ", id, " is not waiting for a sampled token"));
  }
  if (static_cast<int32_t>(s->tokens.size()) >= s->max_total_tokens) {
    return absl::FailedPreconditionError(
        absl::StrCat("request ", id, " reached its ", s->max_total_tokens, " tokens"));
  }
  s->tokens.push_back(token);
  s->phase = SequencePhase::kDecode;
  return absl::OkStatus();
}

bool Scheduler::Remove(RequestId id) {
  Sequence* s = Get(id);
  if (s == nullptr) return true;
  if (s->in_flight()) {
    s->remove_pending = true;
    return false;
  }
  ReleaseAndErase(*s);
  return true;
}

void Scheduler::ReleaseAndErase(Sequence& s) {
  if (s.phase == SequencePhase::kWaiting) {
    waiting_.erase(WaitKeyOf(s));
    waiting_tokens_ -= static_cast<int64_t>(s.tokens.size());
  } else {
    running_.erase(RunKeyOf(s));
  }
  const RequestId id = s.id;
  kv_.Release(id, Computed(s));
  seqs_.erase(id);  // destroys `s`, which refers to the table: forget the table after it
  kv_.RemoveSequence(id);
}

absl::Status Scheduler::CheckInvariants() const {
  int64_t waiting_tokens = 0;
  int32_t waiting = 0, running = 0;
  for (const auto& [id, sp] : seqs_) {
    const Sequence& s = *sp;
    const std::string who = absl::StrCat("request ", id, ": ");
    if (kv_.Find(id) != &s.pages) return absl::InternalError(who + "not bound to its page table");
    if (s.pages.num_tokens() != s.num_computed + s.in_flight_tokens) {
      return absl::InternalError(absl::StrCat(who, "page table holds ", s.pages.num_tokens(),
                                              " tokens, computed ", s.num_computed, " + in flight ",
                                              s.in_flight_tokens));
    }
    if (s.num_computed + s.in_flight_tokens > static_cast<int32_t>(s.tokens.size()) ||
        static_cast<int32_t>(s.tokens.size()) > s.max_total_tokens) {
      return absl::InternalError(absl::StrCat(who, "token counts out of range"));
    }
    if (s.phase == SequencePhase::kWaiting) {
      ++waiting;
      waiting_tokens += static_cast<int64_t>(s.tokens.size());
      if (!s.pages.empty() || s.in_flight() || s.num_computed != 0 ||
          !waiting_.contains(WaitKeyOf(s))) {
        return absl::InternalError(absl::StrCat(who, "waiting but holds state or is unqueued"));
      }
    } else {
      ++running;
      if (!running_.contains(RunKeyOf(s))) return absl::InternalError(who + "not in running set");
      if (s.phase == SequencePhase::kDecode && s.pending() > 1) {
        return absl::InternalError(absl::StrCat(who, "decoding with ", s.pending(), " pending"));
      }
    }
    if (s.remove_pending && !s.in_flight()) return absl::InternalError(who + "removal stuck");
  }
  if (waiting != static_cast<int32_t>(waiting_.size()) ||
      running != static_cast<int32_t>(running_.size()) || waiting_tokens != waiting_tokens_) {
    return absl::InternalError("queue sizes or waiting tokens disagree with the sequences");
  }
  if (running > options_.max_running_requests) {
    return absl::InternalError(absl::StrCat(running, " running requests exceed the limit"));
  }
  if (kv_.num_sequences() != static_cast<int32_t>(seqs_.size()) || kv_.num_imports() != 0) {
    return absl::InternalError(absl::StrCat("the KV cache has ", kv_.num_sequences(),
                                            " sequences and ", kv_.num_imports(),
                                            " imports; the scheduler has ", seqs_.size()));
  }
  return kv_.CheckInvariants();
}

}  // namespace sieve::engine
