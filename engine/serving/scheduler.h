// Scheduler: the continuous-batching policy of the engine, as a plain object with no threads and
// no device. It owns every sequence's scheduling state (queues, phases, budgets, the choice of
// preemption victims, packing) and a KvCacheManager (kv_cache_manager.h) that does the page
// mechanics: page allocator, page tables, prefix cache, eviction. The Engine's scheduler thread
// feeds it requests and results and dispatches the batches it plans. engine/README.md has the
// big picture.
//
// One step, Schedule(prefill_idle, decode_idle), plans work for whichever pool is idle:
//   1. Decodes first (decode pool idle): every running sequence in the decode phase whose last
//      token is not computed yet gets one token, most important first. A sequence that cannot get
//      a page for that token preempts the least important running sequence that is not in flight
//      (itself, if it is the least important: then it waits in the queue instead).
//   2. Prefill chunks (prefill pool idle): running prefills continue, then queued requests are
//      admitted in order (priority, then preempted before new, then arrival). All share the
//      token budget max_batch_tokens minus one token reserved for each decoding sequence, so a
//      long prompt never takes the tokens that decodes need; a request gets at most
//      prefill_chunk_tokens per step. A request is admitted only if the pages of its first chunk
//      fit (after evicting cached pages) and fewer than max_running_requests run; a prefix-cache
//      match covers part of its prompt, which is then not computed. Admission stops at the first
//      request that does not fit, so priorities are never overtaken.
//   3. The chosen items are packed into one batch per worker of each pool, within the runner's
//      per-step limits (max_worker_tokens, max_worker_sequences).
// Importance: higher priority first, then earlier arrival. Preemption is by recompute: the victim's
// pages are released (full pages stay in the prefix cache), its computed count drops to 0, and it
// is queued ahead of new arrivals of its priority to recompute prompt + generated tokens.
//
// A planned item is "in flight" until Complete() reports its batch done: its tokens and page
// table then stay unchanged (workers read them), it is never preempted, and Remove() defers the
// release of its pages to Complete(). Pages shared through the prefix cache are full and
// read-only; every page a batch writes belongs to exactly one sequence, so concurrent batches
// write disjoint pages.
//
// Page invariant (CheckInvariants, through KvCacheManager::CheckInvariants): every page is free,
// or its reference count equals the number of live page tables listing it plus one if the prefix
// cache holds it.
//
// Thread safety: none. One thread (the engine's scheduler thread, or a test) owns the object.
#ifndef SIEVE_ENGINE_SERVING_SCHEDULER_H_
#define SIEVE_ENGINE_SERVING_SCHEDULER_H_

#include <cstdint>
#include <memory>
#include <set>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "engine/serving/kv_cache.h"
#include "engine/serving/kv_cache_manager.h"
#include "engine/serving/observer.h"
#include "engine/serving/prefix_cache.h"
#include "engine/serving/request.h"

namespace sieve::engine {

// Capacity and budgets of the scheduler.
struct SchedulerOptions {
  int32_t page_size = 16;              // tokens per KV page
  int32_t num_pages = 1024;            // KV pages in the pool
  int32_t max_batch_tokens = 2048;     // tokens in flight over both pools, prefill + decode
  int32_t prefill_chunk_tokens = 512;  // most prompt tokens of one request in one step
  int32_t max_running_requests = 64;   // admitted (prefilling + decoding) requests
  int32_t prefill_workers = 1;         // batches per prefill step
  int32_t decode_workers = 1;          // batches per decode step
  int32_t max_worker_tokens = 2048;    // most tokens in one worker batch (runner max_step_tokens)
  int32_t max_worker_sequences = 256;  // most sequences in one worker batch (max_step_logits)
  bool enable_prefix_caching = true;
  // Side pools of the sparse decode method (e.g. Quest's page bounds), registered with the
  // KvCacheManager before any page is used; their bytes are already in the pool's sizing.
  std::vector<SidePoolSpec> side_pools;

  // Returns InvalidArgument naming the first field that is not positive (or side pool that is
  // unnamed or empty).
  absl::Status Validate() const;
};

// Where a sequence is.
enum class SequencePhase {
  kWaiting,  // queued (new or preempted); holds no pages
  kPrefill,  // admitted; computing prompt (or, after preemption, prompt + generated) tokens
  kDecode,   // admitted; one sampled token to compute per step
};

// The scheduler's state of one request. Read-only outside the Scheduler.
struct Sequence {
  // Binds the sequence to its page table, owned by the scheduler's KvCacheManager.
  explicit Sequence(const PageTable& table) : pages(table) {}

  RequestId id = 0;
  int32_t priority = 0;
  uint64_t arrival = 0;          // order of Add calls
  std::vector<int32_t> tokens;   // prompt followed by the generated ids
  int32_t prompt_len = 0;        // tokens
  int32_t max_total_tokens = 0;  // prompt_len + the most tokens it may generate
  int32_t num_computed = 0;      // leading tokens whose KV is written
  int32_t in_flight_tokens = 0;  // tokens a worker computes now; 0 when not in flight
  SequencePhase phase = SequencePhase::kWaiting;
  bool preempted = false;       // waiting after a preemption (queued ahead of new arrivals)
  bool remove_pending = false;  // Remove() called while in flight
  bool admitted_once = false;
  int32_t preemptions = 0;
  int32_t cached_tokens = 0;  // prompt tokens served by the prefix cache at first admission
  const PageTable& pages;     // slots of tokens [0, num_computed + in_flight_tokens)

  bool in_flight() const { return in_flight_tokens > 0; }
  // Tokens not computed yet (0 after a chunk that produced logits, until AppendToken).
  int32_t pending() const { return static_cast<int32_t>(tokens.size()) - num_computed; }
};

// One sequence's share of a worker batch: compute tokens[start, start + num_tokens).
struct WorkItem {
  RequestId id = 0;
  int32_t start = 0;         // == the sequence's num_computed when planned
  int32_t num_tokens = 0;    // >= 1
  bool want_logits = false;  // the chunk reaches the last token: sample the next one
};

// The work of one worker of one pool for one step.
struct WorkerBatch {
  Pool pool = Pool::kPrefill;
  int32_t worker = 0;  // index within the pool
  std::vector<WorkItem> items;
  int32_t num_tokens = 0;  // sum of the items' num_tokens
};

// The decisions of one step.
struct StepPlan {
  std::vector<RequestId> admitted;   // newly admitted (or re-admitted after preemption)
  std::vector<RequestId> preempted;  // preempted this step, in order
  std::vector<WorkerBatch> batches;  // non-empty batches; prefill ones first
  bool empty() const { return admitted.empty() && preempted.empty() && batches.empty(); }
  // Returns the tokens of all batches of `pool`.
  int32_t num_tokens(Pool pool) const;
};

// Counters since construction.
struct SchedulerStats {
  int64_t prefix_query_tokens = 0;  // prompt tokens looked up at first admission
  int64_t prefix_hit_tokens = 0;    // of those, served by the prefix cache
  int64_t preemptions = 0;
  int64_t admissions = 0;  // first admissions
};

class Scheduler {
 public:
  // `options` must pass Validate() (a broken one aborts: it is a programming error).
  explicit Scheduler(const SchedulerOptions& options);
  // Releases every sequence's pages and the prefix cache (the KvCacheManager does).
  ~Scheduler();

  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a new request that may generate up to `max_new_tokens` (>= 1) tokens. InvalidArgument
  // (and no change) for a duplicate id, an empty prompt, max_new_tokens < 1, or prompt +
  // max_new_tokens beyond the whole pool (it could never run).
  absl::Status Add(RequestId id, int32_t priority, std::vector<int32_t> prompt,
                   int32_t max_new_tokens);

  // Plans one step for the idle pools (see the file comment) and marks the planned items in
  // flight. Returns an empty plan when there is nothing to do.
  StepPlan Schedule(bool prefill_pool_idle, bool decode_pool_idle);

  // Reports that `batch` (from a plan) finished. With `ok`, its items' tokens count as computed
  // and newly full pages go to the prefix cache; without, nothing counts (the caller should
  // Remove those requests). Returns the ids whose Remove() was deferred and that are now gone.
  std::vector<RequestId> Complete(const WorkerBatch& batch, bool ok);

  // Appends the token sampled after an item with want_logits; the sequence then decodes.
  // FailedPrecondition if it is in flight, has tokens pending, or would exceed its
  // max_total_tokens; NotFound for an unknown id.
  absl::Status AppendToken(RequestId id, int32_t token);

  // Forgets a request: its pages are released now (returns true; also for an unknown id) or,
  // when it is in flight, at the Complete() of its batch (returns false).
  bool Remove(RequestId id);

  // Returns the sequence `id`, or null. Valid until it is removed.
  const Sequence* Find(RequestId id) const;

  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  // Tokens the waiting requests would compute (prompt, plus generated ones after preemption).
  int64_t waiting_tokens() const { return waiting_tokens_; }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int32_t num_in_phase(SequencePhase phase) const;
  int32_t num_sequences() const { return static_cast<int32_t>(seqs_.size()); }
  const SchedulerStats& stats() const { return stats_; }
  const SchedulerOptions& options() const { return options_; }
  // Returns the owner of the KV pages, page tables and prefix cache of every sequence.
  const KvCacheManager& kv_cache() const { return kv_; }
  // The same, for the KV imports and exports of disaggregated serving (KvCacheManager's
  // BeginImport ... EndExport), which hold pages apart from any sequence.
  KvCacheManager& mutable_kv_cache() { return kv_; }
  // Returns the page allocator (page counts), as kv_cache().allocator().
  const PageAllocator& allocator() const { return kv_.allocator(); }
  // Returns the prefix cache (its counters), as kv_cache().prefix_cache().
  const PrefixCache& prefix_cache() const { return kv_.prefix_cache(); }
  // Pages listed by at least one live page table (requests' pages, shared ones counted once).
  int32_t held_pages() const { return kv_.held_pages(); }
  // Pages in use only because the prefix cache holds them.
  int32_t cached_only_pages() const { return kv_.cached_only_pages(); }

  // Recomputes every invariant (page references, phases, queues, budgets of in-flight work,
  // the prefix cache's own) and returns Internal naming the first violation. For tests;
  // O(pages + tokens).
  absl::Status CheckInvariants() const;

 private:
  // Orders sequences: most important first.
  using RunKey = std::tuple<int64_t, uint64_t, RequestId>;         // (-priority, arrival, id)
  using WaitKey = std::tuple<int64_t, bool, uint64_t, RequestId>;  // (-priority, !preempted, ...)
  struct Packer;

  static RunKey RunKeyOf(const Sequence& s) { return {-int64_t{s.priority}, s.arrival, s.id}; }
  static WaitKey WaitKeyOf(const Sequence& s) {
    return {-int64_t{s.priority}, !s.preempted, s.arrival, s.id};
  }
  Sequence* Get(RequestId id) const;

  void ScheduleDecodes(StepPlan& plan, Packer& packer);
  void ScheduleRunningPrefills(StepPlan& plan, Packer& packer, int32_t& budget);
  void AdmitWaiting(StepPlan& plan, Packer& packer, int32_t& budget);
  // The one preempt/evict path of running sequences: reserves up to `want` more tokens for the
  // idle running sequence `s`, preempting the least important idle sequence while nothing fits.
  // When `s` is itself the least important, it waits if a less important one is in flight, drops
  // the prefix cache once if it runs alone, else preempts itself when `may_preempt_self` (a
  // decode) or waits (a prefill). Returns the tokens reserved; 0: not this step.
  int32_t ReserveOrPreempt(Sequence& s, int32_t want, bool may_preempt_self, StepPlan& plan);
  // The least important running sequence not in flight, or null.
  Sequence* LeastImportantIdle();
  // Whether a running sequence less important than `s` is in flight.
  bool LessImportantInFlight(const Sequence& s) const;
  // Returns the leading tokens of `s` whose KV is written.
  static absl::Span<const int32_t> Computed(const Sequence& s) {
    return absl::MakeConstSpan(s.tokens).first(s.num_computed);
  }
  // Preempts `s`, the victim the policy chose: KvCacheManager::Release drops its pages (the
  // computed full ones stay cached) and it is queued ahead of new arrivals of its priority.
  void Preempt(Sequence& s, StepPlan& plan);
  // Forgets `s`: releases its pages, then drops it and its page table.
  void ReleaseAndErase(Sequence& s);

  SchedulerOptions options_;
  KvCacheManager kv_;  // before seqs_: each Sequence refers to its table in kv_
  absl::flat_hash_map<RequestId, std::unique_ptr<Sequence>> seqs_;
  std::set<WaitKey> waiting_;
  std::set<RunKey> running_;
  int64_t waiting_tokens_ = 0;
  uint64_t next_arrival_ = 0;
  SchedulerStats stats_;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_SCHEDULER_H_
