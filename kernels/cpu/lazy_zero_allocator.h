// LazyZeroAllocator: an allocator for large zero-filled buffers (KV caches) that stay untouched
// until written: calloc'd memory (fresh pages from the kernel for large sizes), with default
// construction left as a no-op, so a KV pool costs resident memory only as its pages fill.
//
// Buffers of kHugePageMin bytes and more are also advised for transparent huge pages
// (madvise MADV_HUGEPAGE on their 2 MiB-aligned interior; `huge` false: not advised). With 4 KiB
// pages the paged KV layout costs a TLB miss per row: a token's row of one KV head is 512 bytes
// (fp32, d 128) and consecutive tokens are Hkv * d * 4 = 4 KiB apart, so attention over one KV
// head touches a new 4 KiB page per key; 2 MiB pages make that one TLB entry per 512 rows.
// Where the kernel's THP mode is `never` the advice is a no-op; memory becomes resident in
// 2 MiB steps instead of 4 KiB ones as the pool fills.
//
// Thread safety: stateless apart from the flag; usable from any thread.
#ifndef SIEVE_KERNELS_CPU_LAZY_ZERO_ALLOCATOR_H_
#define SIEVE_KERNELS_CPU_LAZY_ZERO_ALLOCATOR_H_

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <utility>

namespace sieve::kernels {

inline constexpr size_t kHugePageBytes = size_t{2} << 20;
inline constexpr size_t kHugePageMin = size_t{8} << 20;

// Advises [p, p + bytes)'s whole 2 MiB-aligned pages for transparent huge pages.
inline void AdviseHugePages(void* p, size_t bytes) {
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHugePageBytes - 1) &
                          ~(kHugePageBytes - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHugePageBytes - 1);
  if (end > begin) {
    // Advice only: a kernel without THP refuses it, and the buffer works the same.
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
}

template <typename T>
struct LazyZeroAllocator {
  using value_type = T;
  bool huge = true;  // advise buffers of kHugePageMin bytes or more for huge pages

  LazyZeroAllocator() = default;
  explicit LazyZeroAllocator(bool huge_pages) : huge(huge_pages) {}
  template <typename U>
  LazyZeroAllocator(const LazyZeroAllocator<U>& o) : huge(o.huge) {}
  T* allocate(size_t n) {
    void* p = std::calloc(n, sizeof(T));
    if (p == nullptr) throw std::bad_alloc();
    if (huge && n * sizeof(T) >= kHugePageMin) AdviseHugePages(p, n * sizeof(T));
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    if constexpr (sizeof...(Args) > 0) ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const LazyZeroAllocator<U>& o) const { return huge == o.huge; }
};

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_CPU_LAZY_ZERO_ALLOCATOR_H_
