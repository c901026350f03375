// Device helpers shared by the paged prefill kernels (internal to paged_prefill.cu): the kernel
// argument block, per-tile bookkeeping, and thin wrappers over the PTX instructions they use
// (cp.async, ldmatrix, mma.sync, mbarrier, wgmma).
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_DEVICE_CUH_
#define SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_DEVICE_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#ifndef SIEVE_PREFILL_WATCHDOG
#define SIEVE_PREFILL_WATCHDOG 0
#endif

namespace sieve::kernels::prefill_detail {

using bf16 = __nv_bfloat16;

// Everything a prefill kernel reads, by value (see PagedAttentionParams for the layout).
struct PrefillArgs {
  const bf16* q;
  const bf16* k_cache;
  const bf16* v_cache;
  bf16* out;
  const int32_t* page_table;
  const int32_t* kv_lens;
  const int32_t* query_start;
  int32_t page_table_stride;
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t group;        // num_q_heads / num_kv_heads
  int32_t page_shift;   // log2(page_size)
  float scale_log2;     // softmax scale * log2(e): scores live in the exp2 domain
};

// One (sequence, query head) of a block and the tiles it owns.
struct SeqInfo {
  int32_t q_begin;   // first packed query row of the sequence
  int32_t q_len;     // query rows of the sequence
  int32_t kv_len;    // keys of the sequence
  int32_t q_off;     // position of query row 0: kv_len - q_len
  int32_t m_tiles;   // query tiles of block_m rows
};

__device__ __forceinline__ SeqInfo LoadSeqInfo(const PrefillArgs& a, int s, int block_m) {
  SeqInfo si;
  si.q_begin = a.query_start[s];
  si.q_len = a.query_start[s + 1] - si.q_begin;
  si.kv_len = a.kv_lens[s];
  si.q_off = si.kv_len - si.q_len;
  si.m_tiles = si.q_len > 0 ? (si.q_len + block_m - 1) / block_m : 0;
  return si;
}

// Element offset of key `token` of KV head `kv_head` in the cache (head_dim D).
template <int D>
__device__ __forceinline__ int64_t KvRowOffset(const PrefillArgs& a, const int32_t* pages,
                                               int token, int kv_head) {
  const int64_t page = pages[token >> a.page_shift];
  const int64_t slot = (page << a.page_shift) | (token & ((1 << a.page_shift) - 1));
  return (slot * a.num_kv_heads + kv_head) * D;
}

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous global -> shared copy; copies zeros when !valid (src is then not read).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one m16n8k16 bf16 tile with fp32 accumulators.
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as packed bf16 (lo in the low half).
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- mbarrier -------------------------------------------------------------------------------

__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` once every cp.async this thread issued so far has landed (no count increment:
// the barrier's expected count includes this arrival).
__device__ __forceinline__ void MbarArriveOnCpAsync(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of `bar` with the given parity has completed. Built with
// -DSIEVE_PREFILL_WATCHDOG=1, a wait that lasts about 2^32 cycles traps (a protocol bug then
// fails the launch instead of hanging the device).
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
#if SIEVE_PREFILL_WATCHDOG
  const long long start = clock64();
#endif
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
#if SIEVE_PREFILL_WATCHDOG
    if (!done && clock64() - start > (1ll << 32)) __trap();
#endif
  } while (!done);
}

// Makes this thread's view of shared memory written through the generic proxy (cp.async,
// st.shared) visible to the async proxy (wgmma operands), and vice versa.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void NamedBarrierSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void NamedBarrierArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace sieve::kernels::prefill_detail

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_DEVICE_CUH_
