// Sizing the KV page pool from a memory budget (kv_cache.num_pages 0): how many pages of a given
// size fit in a fraction of the memory a backend has left once the weights are loaded.
// ModelRunner::Load calls it with Backend::AvailableMemoryBytes and Backend::KvPageBytes.
//
// Thread-safety: pure functions, except that HostAvailableMemoryBytes reads /proc and /sys.
#ifndef SIEVE_ENGINE_MODEL_KV_BUDGET_H_
#define SIEVE_ENGINE_MODEL_KV_BUDGET_H_

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sieve::engine {

// The most KV pages a derived pool gets (also the largest kv_cache.num_pages a config may set).
inline constexpr int64_t kMaxKvPages = int64_t{1} << 24;

// floor(memory_fraction * available_bytes / page_bytes) pages, at most max_pages (when > 0) and
// kMaxKvPages. FailedPrecondition, naming the numbers, when not even one page fits;
// InvalidArgument for a fraction outside (0, 1] or a page of no bytes.
absl::StatusOr<int32_t> KvPagesForMemory(int64_t available_bytes, double memory_fraction,
                                         int64_t page_bytes, int64_t max_pages);

// Checks an explicitly configured pool (kv_cache.num_pages > 0) against the memory the backend
// reports before anything is allocated: ResourceExhausted, naming kv_cache.num_pages, the bytes
// the pool needs (num_pages * page_bytes), the bytes `backend_name` has available and the
// largest count that fits, when the pool does not fit in `available_bytes`.
absl::Status CheckKvPagesFitMemory(int64_t num_pages, int64_t page_bytes, int64_t available_bytes,
                                   std::string_view backend_name);

// Bytes of host memory a process could still allocate: MemAvailable of /proc/meminfo (else the
// free physical pages), lowered to what the cgroup's memory.max leaves, if one is set.
absl::StatusOr<int64_t> HostAvailableMemoryBytes();

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_MODEL_KV_BUDGET_H_
