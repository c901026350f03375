#include "engine/scheduler.h"

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

Scheduler::Scheduler(const SchedulerOptions& options)
    : options_(options),
      alloc_(options.num_pages),
      cache_(options.page_size, alloc_),
      table_refs_(std::max(options.num_pages, 0), 0) {
  const absl::Status valid = options.Validate();
  if (!valid.ok()) internal::KvInvariantFailure(valid.message());
}

Scheduler::~Scheduler() {
  for (auto& [id, s] : seqs_) s->pages.Release(alloc_);
  cache_.Clear();
}

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
  auto s = std::make_unique<Sequence>(options_.page_size);
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
    if (!ReserveDecodeSlot(*s, plan)) continue;
    packer.Add(w, WorkItem{id, s->num_computed, 1, /*want_logits=*/true});
    s->in_flight_tokens = 1;
    --budget;
  }
}

bool Scheduler::ReserveDecodeSlot(Sequence& s, StepPlan& plan) {
  bool cleared = false;
  while (true) {
    if (AppendTokens(s, 1).ok()) return true;
    Sequence* victim = LeastImportantIdle();  // `s` is idle, so there is one
    if (victim != &s) {
      Preempt(*victim, plan);
      continue;
    }
    if (LessImportantInFlight(s)) return false;  // preempt that one once it is back
    if (running_.size() == 1 && !cleared) {
      // Alone and still short: the prefix cache holds pages it cannot evict leaf-first (parents
      // of pages this sequence computed itself). Drop the cache rather than stall.
      cache_.Clear();
      cleared = true;
      continue;
    }
    Preempt(s, plan);
    return false;
  }
}

int32_t Scheduler::TokensThatFit(Sequence& s, int32_t want) {
  const PageTable& t = s.pages;
  const int32_t room_in_last =
      static_cast<int32_t>(t.pages().size()) * t.page_size() - t.num_tokens();
  if (want <= room_in_last) return want;
  const int32_t need = t.PagesNeededFor(want);
  if (alloc_.num_free() < need) cache_.EvictUntilFree(need);
  const int64_t fit = room_in_last + int64_t{alloc_.num_free()} * t.page_size();
  return static_cast<int32_t>(std::min<int64_t>(want, fit));
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
    int32_t n = TokensThatFit(*s, want);
    bool cleared = false;
    while (n == 0) {
      Sequence* victim = LeastImportantIdle();
      if (victim != s) {  // less important than `s`, which is idle
        Preempt(*victim, plan);
      } else if (running_.size() == 1 && !cleared) {
        cache_.Clear();  // see ReserveDecodeSlot
        cleared = true;
      } else {
        break;  // wait for more important sequences to finish or free pages
      }
      n = TokensThatFit(*s, want);
    }
    if (n == 0) continue;
    if (!AppendTokens(*s, n).ok()) {
      internal::KvInvariantFailure("scheduler: pages that fit could not be appended");
    }
    packer.Add(w, WorkItem{id, s->num_computed, n, /*want_logits=*/n == s->pending()});
    s->in_flight_tokens = n;
    budget -= n;
  }
}

void Scheduler::AdmitWaiting(StepPlan& plan, Packer& packer, int32_t& budget) {
  std::vector<RequestId> order;
  for (const WaitKey& k : waiting_) order.push_back(std::get<3>(k));
  const int32_t ps = options_.page_size;
  for (RequestId id : order) {
    if (budget <= 0 || num_running() >= options_.max_running_requests) break;
    const int32_t w = packer.BestWorker();
    if (w < 0) break;
    Sequence* s = Get(id);
    if (std::find(plan.preempted.begin(), plan.preempted.end(), id) != plan.preempted.end()) {
      break;  // preempted this step: it would only take its pages back; nothing overtakes it
    }
    PrefixMatch match;
    if (options_.enable_prefix_caching) match = cache_.Match(s->tokens);
    const int32_t pending = static_cast<int32_t>(s->tokens.size()) - match.num_tokens;
    const int32_t n = std::min({pending, options_.prefill_chunk_tokens, budget, packer.Room(w)});
    const int32_t need =
        (match.num_tokens + n + ps - 1) / ps - static_cast<int32_t>(match.pages.size());
    if (alloc_.num_free() < need) cache_.EvictUntilFree(need);
    if (alloc_.num_free() < need) {
      for (int32_t page : match.pages) alloc_.DecRef(page);
      break;  // strict order: nothing behind it overtakes
    }
    waiting_.erase(WaitKeyOf(*s));
    waiting_tokens_ -= static_cast<int64_t>(s->tokens.size());
    AdoptPrefix(*s, match);
    s->num_computed = match.num_tokens;
    s->cached_pages = static_cast<int32_t>(match.pages.size());
    if (!AppendTokens(*s, n).ok()) {
      internal::KvInvariantFailure("scheduler: admitted pages could not be appended");
    }
    if (!s->admitted_once) {
      s->admitted_once = true;
      s->cached_tokens = match.num_tokens;
      ++stats_.admissions;
      stats_.prefix_query_tokens += options_.enable_prefix_caching ? s->prompt_len : 0;
      stats_.prefix_hit_tokens += match.num_tokens;
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

absl::Status Scheduler::AppendTokens(Sequence& s, int32_t n) {
  const size_t before = s.pages.pages().size();
  absl::Status st = AppendWithEviction(s.pages, n, alloc_, cache_).status();
  if (st.ok()) Track(s.pages.pages().subspan(before), +1);
  return st;
}

void Scheduler::AdoptPrefix(Sequence& s, const PrefixMatch& match) {
  s.pages.AdoptSharedPrefix(match.pages, match.num_tokens);
  Track(match.pages, +1);
}

void Scheduler::ReleasePages(Sequence& s) {
  Track(s.pages.pages(), -1);
  s.pages.Release(alloc_);
}

void Scheduler::TruncatePages(Sequence& s, int32_t num_tokens) {
  const std::vector<int32_t> before(s.pages.pages().begin(), s.pages.pages().end());
  s.pages.Truncate(num_tokens, alloc_);
  Track(absl::MakeConstSpan(before).subspan(s.pages.pages().size()), -1);
}

void Scheduler::Track(absl::Span<const int32_t> pages, int32_t delta) {
  for (int32_t p : pages) {
    if (delta > 0 && table_refs_[p]++ == 0) ++held_pages_;
    if (delta < 0 && --table_refs_[p] == 0) --held_pages_;
  }
}

void Scheduler::Preempt(Sequence& s, StepPlan& plan) {
  running_.erase(RunKeyOf(s));
  ReleasePages(s);
  s.num_computed = 0;
  s.cached_pages = 0;
  s.phase = SequencePhase::kWaiting;
  s.preempted = true;
  ++s.preemptions;
  ++stats_.preemptions;
  waiting_.insert(WaitKeyOf(s));
  waiting_tokens_ += static_cast<int64_t>(s.tokens.size());
  plan.preempted.push_back(s.id);
}

void Scheduler::OfferToCache(Sequence& s) {
  if (!options_.enable_prefix_caching) return;
  const int32_t full = s.num_computed / options_.page_size;
  if (full <= s.cached_pages) return;
  // Insert fails only for pages that are not this sequence's own, which would be a bug
  // elsewhere; the cache then simply does not learn these pages.
  (void)cache_.Insert(absl::MakeConstSpan(s.tokens).first(s.num_computed), s.pages.pages());
  s.cached_pages = full;
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
      OfferToCache(*s);
    } else {
      TruncatePages(*s, s->num_computed);
      s->num_computed = s->pages.num_tokens();
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
  ReleasePages(s);
  seqs_.erase(s.id);
}

absl::Status Scheduler::CheckInvariants() const {
  std::vector<int32_t> refs(options_.num_pages, 0);
  int64_t waiting_tokens = 0;
  int32_t waiting = 0, running = 0;
  for (const auto& [id, sp] : seqs_) {
    const Sequence& s = *sp;
    const std::string who = absl::StrCat("request ", id, ": ");
    for (int32_t p : s.pages.pages()) ++refs[p];
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
  int32_t held = 0;
  for (int32_t p = 0; p < options_.num_pages; ++p) {
    if (table_refs_[p] != refs[p]) {
      return absl::InternalError(absl::StrCat("page ", p, " is tracked in ", table_refs_[p],
                                              " tables but listed by ", refs[p]));
    }
    held += refs[p] > 0 ? 1 : 0;
    const int32_t want = refs[p] + (cache_.IsCached(p) ? 1 : 0);
    if (alloc_.ref_count(p) != want) {
      return absl::InternalError(absl::StrCat("page ", p, " has ", alloc_.ref_count(p),
                                              " references; tables and cache hold ", want));
    }
  }
  if (held != held_pages_) {
    return absl::InternalError(absl::StrCat("held pages ", held_pages_, " != ", held));
  }
  return cache_.CheckInvariants();
}

}  // namespace sieve::engine
