// Row-wise exact top-k for the decode selections (Quest's pages, quest_cuda.cu; DoubleSparsity's
// tokens, double_sparsity_cuda.cu), spread over a thread-block cluster per row.
//
// A decode step at batch 1 has few rows (8 to 32) of many keys (8K pages, 128K tokens). One block
// per row left most of the GPU idle and re-read the row from L2 in each radix pass: 27 us for
// Quest's 8 x 8,191 pages and 185 us for DoubleSparsity's 8 x 131,072 tokens on the H100
// (ncu, 2026-12-06). Here C blocks (a cluster, C in {1, 2, 4, 8}) share a row: each loads its
// contiguous slice of the keys once into shared memory, the four 8-bit radix passes add the
// blocks' histograms through distributed shared memory (each block sums the cluster's 256 bins
// itself, so every block finds the same threshold), and the ordered compaction places each
// block's picks after those of the lower-ranked blocks. The result is the same as one block's:
// every key above the k-th largest and the lowest positions equal to it, in increasing position
// (the CPU references' tie rule).
//
// A row policy P supplies, as const __device__ members:
//   bool Prepare(int row, int& n, int& keep)   n keys, keep < n of them to select; false when
//                                              the row takes everything (then n is the count)
//   void EmitAll(int row, int begin, int end, bool first)   every position of [begin, end)
//   uint32_t KeyAt(int row, int j)             the order key of position j (sparse_select::Key)
//   void Emit(int row, int at, int j)          j is the at-th selected position
//   void Finish(int row)                       once per row, after its selection
#ifndef SIEVE_KERNELS_SPARSE_CLUSTER_TOPK_CUDA_CUH_
#define SIEVE_KERNELS_SPARSE_CLUSTER_TOPK_CUDA_CUH_

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace sieve::kernels::sparse_select {

constexpr int kTopKThreads = 512;
constexpr int kTopKMaxCluster = 8;     // the portable cluster size
constexpr int kTopKSmemKeys = 16384;   // keys a block keeps in shared memory (64 KiB)

// Warp 0 only: over `nbins` bins of `hist` (counts of the keys matching `prefix`, binned by the
// bits at `shift`), from the highest bin down, finds the bin holding the remaining-th largest
// key; writes the extended prefix, what remains of k inside that bin, and the bin's count.
__device__ __forceinline__ void FindBin(const int* hist, int nbins, int remaining, uint32_t prefix,
                                        int shift, uint32_t* s_prefix, int* s_remaining,
                                        int* s_bin_count) {
  const int lane = threadIdx.x & 31;
  const int per_lane = nbins / 32;
  const int top = nbins - 1 - lane * per_lane;  // this lane's bins, top .. top - per_lane + 1
  int local = 0;
  for (int b = 0; b < per_lane; ++b) local += hist[top - b];
  int incl = local;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int x = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += x;
  }
  const int excl = incl - local;
  if (excl < remaining && remaining <= incl) {
    int cum = excl;
    for (int b = 0; b < per_lane; ++b) {
      const int c = hist[top - b];
      if (cum + c >= remaining) {
        *s_prefix = prefix | (static_cast<uint32_t>(top - b) << shift);
        *s_remaining = remaining - cum;
        *s_bin_count = c;
        break;
      }
      cum += c;
    }
  }
}

// grid = rows * C blocks of kTopKThreads, cluster (C, 1, 1); dynamic shared memory: cap keys.
// A block keeps its slice in shared memory when the slice fits `cap`, else reads it from global
// memory in each pass (uniform over the cluster: the slice size is).
template <typename P>
__global__ void __launch_bounds__(kTopKThreads) ClusterTopKKernel(const P pol, int cap) {
  namespace cg = cooperative_groups;
  constexpr int kWarps = kTopKThreads / 32;
  extern __shared__ uint32_t sm_keys[];
  __shared__ int sm_hist[2][256];
  __shared__ int sm_sum[256];
  __shared__ int sm_wgt[kWarps], sm_weq[kWarps];    // per warp: keys above, equal to the cut
  __shared__ int sm_wbase[kWarps], sm_wrem[kWarps];  // per warp: first output, equal keys taken
  __shared__ int sm_tot[2];  // this block's keys above and equal to the threshold
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining, s_bin_count;
  cg::cluster_group cluster = cg::this_cluster();
  const int csize = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int row = blockIdx.x / csize;
  const int tid = threadIdx.x, lane = tid & 31;
  int n = 0, keep = 0;
  const bool select = pol.Prepare(row, n, keep);  // the same in every block of the cluster
  const int per = (n + csize - 1) / csize;
  const int begin = min(n, rank * per);
  const int len = min(n, begin + per) - begin;
  if (!select) {
    pol.EmitAll(row, begin, begin + len, rank == 0);
    return;  // no block of this cluster touches another's shared memory
  }
  const bool in_smem = per <= cap;
  if (in_smem) {
    for (int i = tid; i < len; i += kTopKThreads) sm_keys[i] = pol.KeyAt(row, begin + i);
  }
  auto key = [&](int i) { return in_smem ? sm_keys[i] : pol.KeyAt(row, begin + i); };
  // Radix select of the keep-th largest key, 8 bits a pass from the top.
  uint32_t prefix = 0, mask = 0;
  int remaining = keep;
#pragma unroll 1
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    int* hist = sm_hist[pass & 1];  // the other buffer may still be read by the cluster
    for (int i = tid; i < 256; i += kTopKThreads) hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < len; i += kTopKThreads) {
      const uint32_t u = key(i);
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1);
    }
    cluster.sync();  // every block's histogram of this pass is complete
    if (tid < 256) {
      int s = 0;
      for (int r = 0; r < csize; ++r) s += cluster.map_shared_rank(hist, r)[tid];
      sm_sum[tid] = s;
    }
    __syncthreads();
    if (tid < 32) FindBin(sm_sum, 256, remaining, prefix, shift, &s_prefix, &s_remaining,
                          &s_bin_count);
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 255u << shift;
  }
  // Ordered compaction: each warp a contiguous segment of the block's slice, read 32 keys at a
  // time (lane i the i-th: no bank conflicts; a contiguous run per thread made every lane of a
  // warp hit one bank); ballots rank a warp's picks. The block's picks go after the lower-ranked
  // blocks' picks, and the first `remaining` keys equal to the threshold (in position order over
  // the whole row) are taken.
  const int warp = tid >> 5;
  const int seg = ((len + kWarps - 1) / kWarps + 31) & ~31;  // keys per warp, whole rounds
  const int wb = min(len, warp * seg), we = min(len, wb + seg);
  int gt = 0, eq = 0;
  for (int i = wb + lane; i < we; i += 32) {
    const uint32_t u = key(i);
    gt += u > prefix ? 1 : 0;
    eq += u == prefix ? 1 : 0;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    gt += __shfl_xor_sync(0xffffffffu, gt, off);
    eq += __shfl_xor_sync(0xffffffffu, eq, off);
  }
  if (lane == 0) {
    sm_wgt[warp] = gt;
    sm_weq[warp] = eq;
  }
  __syncthreads();
  if (tid == 0) {
    int g = 0, e = 0;
    for (int w = 0; w < kWarps; ++w) {
      g += sm_wgt[w];
      e += sm_weq[w];
    }
    sm_tot[0] = g;
    sm_tot[1] = e;
  }
  cluster.sync();  // every block's totals are written
  if (tid == 0) {
    int base = 0, eq_seen = 0;
    for (int r = 0; r < rank; ++r) {
      const int* t = cluster.map_shared_rank(sm_tot, r);
      const int e = t[1];
      base += t[0] + max(0, min(e, remaining - eq_seen));
      eq_seen += e;
    }
    // Each warp's first output and its share of the keys equal to the threshold.
    for (int w = 0; w < kWarps; ++w) {
      const int take = max(0, min(sm_weq[w], remaining - eq_seen));
      sm_wbase[w] = base;
      sm_wrem[w] = take;
      base += sm_wgt[w] + take;
      eq_seen += sm_weq[w];
    }
  }
  __syncthreads();
  int at = sm_wbase[warp];
  const int quota = sm_wrem[warp];
  const unsigned below = (1u << lane) - 1u;
  for (int i0 = wb, eq_seen = 0; i0 < we; i0 += 32) {
    const int i = i0 + lane;
    const uint32_t u = i < we ? key(i) : 0u;
    const bool g = i < we && u > prefix, e = i < we && u == prefix;
    const unsigned em = __ballot_sync(0xffffffffu, e);
    const bool take = g || (e && eq_seen + __popc(em & below) < quota);
    const unsigned tm = __ballot_sync(0xffffffffu, take);
    if (take) pol.Emit(row, at + __popc(tm & below), begin + i);
    at += __popc(tm);
    eq_seen += __popc(em);
  }
  cluster.sync();  // no block leaves while another may still read its shared memory
  if (rank == 0 && tid == 0) pol.Finish(row);
}

// Blocks per row for `rows` rows of at most max_n keys on `num_sms` multiprocessors: enough to
// give every multiprocessor about two blocks, and enough for a slice to fit shared memory, within
// the portable cluster size. `force` (1, 2, 4 or 8) overrides (tests).
inline int ClusterTopKBlocksPerRow(int64_t rows, int64_t max_n, int num_sms, int force) {
  if (force == 1 || force == 2 || force == 4 || force == 8) return force;
  int c = 1;
  while (c < kTopKMaxCluster && rows * c < 2 * static_cast<int64_t>(num_sms)) c *= 2;
  while (c < kTopKMaxCluster && (max_n + c - 1) / c > kTopKSmemKeys) c *= 2;
  return c;
}

// Launches the selection of `rows` rows (at most max_n keys each) on `stream`.
template <typename P>
cudaError_t LaunchClusterTopK(const P& pol, int64_t rows, int64_t max_n, int force,
                              cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  static std::atomic<uint64_t> done_devices{0};  // the shared-memory opt-in, once per device
  static std::atomic<int> sms_of[64];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = uint64_t{1} << (device & 63);
  if (!(done_devices.load(std::memory_order_acquire) & bit)) {
    int sms = 0;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    err = cudaFuncSetAttribute(ClusterTopKKernel<P>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               kTopKSmemKeys * static_cast<int>(sizeof(uint32_t)));
    if (err != cudaSuccess) return err;
    sms_of[device & 63].store(sms, std::memory_order_relaxed);
    done_devices.fetch_or(bit, std::memory_order_release);
  }
  const int c = ClusterTopKBlocksPerRow(rows, max_n, sms_of[device & 63].load(), force);
  if (rows * c > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t per = (max_n + c - 1) / c;
  const int cap = static_cast<int>(per < kTopKSmemKeys ? per : kTopKSmemKeys);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(rows * c));
  config.blockDim = dim3(kTopKThreads);
  config.dynamicSmemBytes = static_cast<size_t>(cap) * sizeof(uint32_t);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(c);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, ClusterTopKKernel<P>, pol, cap);
}

}  // namespace sieve::kernels::sparse_select

#endif  // SIEVE_KERNELS_SPARSE_CLUSTER_TOPK_CUDA_CUH_
