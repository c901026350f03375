#include "engine/model/kv_budget.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <optional>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace sieve::engine {
namespace {

// The first line of `path` as an integer, if it is one ("max" in memory.max is not).
std::optional<int64_t> ReadInteger(const char* path) {
  std::ifstream in(path);
  std::string line;
  int64_t v = 0;
  if (!in || !std::getline(in, line) || !absl::SimpleAtoi(line, &v)) return std::nullopt;
  return v;
}

// MemAvailable from /proc/meminfo, in bytes.
std::optional<int64_t> MemAvailable() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (in >> key >> kib) {
    std::getline(in, unit);
    if (key == "MemAvailable:") return kib * 1024;
  }
  return std::nullopt;
}

}  // namespace

absl::Status CheckKvPagesFitMemory(int64_t num_pages, int64_t page_bytes, int64_t available_bytes,
                                   std::string_view backend_name) {
  if (num_pages <= 0 || page_bytes <= 0) return absl::OkStatus();
  // Compared in double: num_pages * page_bytes may overflow int64 for absurd configs.
  const double needed = static_cast<double>(num_pages) * static_cast<double>(page_bytes);
  if (needed <= static_cast<double>(available_bytes)) return absl::OkStatus();
  const int64_t fits = std::max<int64_t>(0, available_bytes) / page_bytes;
  constexpr double kMiB = 1024.0 * 1024.0;
  return absl::ResourceExhaustedError(absl::StrCat(
      "kv_cache.num_pages ", num_pages, " needs ", static_cast<int64_t>(needed / kMiB),
      " MiB of KV cache (", page_bytes, " bytes per page), but the ",
      absl::string_view(backend_name.data(), backend_name.size()), " backend has ",
      static_cast<int64_t>(static_cast<double>(available_bytes) / kMiB),
      " MiB available after loading the weights; set kv_cache.num_pages to at most ", fits,
      ", or to 0 to size the pool from kv_cache.memory_fraction"));
}

absl::StatusOr<int32_t> KvPagesForMemory(int64_t available_bytes, double memory_fraction,
                                         int64_t page_bytes, int64_t max_pages) {
  if (!(memory_fraction > 0 && memory_fraction <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_cache.memory_fraction must be in (0, 1], got ", memory_fraction));
  }
  if (page_bytes <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("a KV page of ", page_bytes, " bytes"));
  }
  const int64_t available = std::max<int64_t>(0, available_bytes);
  const double budget = memory_fraction * static_cast<double>(available);
  int64_t pages = static_cast<int64_t>(budget / static_cast<double>(page_bytes));
  pages = std::min(pages, kMaxKvPages);
  if (max_pages > 0) pages = std::min(pages, max_pages);
  if (pages < 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "kv_cache.num_pages = 0: kv_cache.memory_fraction ", memory_fraction, " of the ",
        available_bytes, " bytes free after loading the weights holds no KV page of ", page_bytes,
        " bytes; set kv_cache.num_pages, or raise kv_cache.memory_fraction"));
  }
  return static_cast<int32_t>(pages);
}

absl::StatusOr<int64_t> HostAvailableMemoryBytes() {
  std::optional<int64_t> available = MemAvailable();
  if (!available) {
    const long pages = sysconf(_SC_AVPHYS_PAGES);
    const long page = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0) {
      return absl::UnavailableError("cannot read the host's available memory");
    }
    available = int64_t{pages} * page;
  }
  const std::optional<int64_t> limit = ReadInteger("/sys/fs/cgroup/memory.max");
  const std::optional<int64_t> used = ReadInteger("/sys/fs/cgroup/memory.current");
  if (limit && used) available = std::min(*available, std::max<int64_t>(0, *limit - *used));
  return *available;
}

}  // namespace sieve::engine
