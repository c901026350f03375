// cuBLASLt GEMM (bf16 operands, bf16 or fp32 output) with a per-shape algorithm cache (see gemm.h). Host code only; it is a .cu
// file so that it joins the kernels library only when the CUDA backend is built.
#include "kernels/cuda/gemm.h"

#include <array>
#include <map>
#include <utility>

namespace sieve::kernels {

namespace {

// The alignment (bytes, a power of two up to 256) cuBLASLt may assume for `p`.
int64_t AlignmentOf(const void* p) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  int64_t a = 256;
  while (a > 1 && u % static_cast<uintptr_t>(a) != 0) a /= 2;
  return a;
}

}  // namespace

// Descriptors and the chosen algorithm of one shape. The bias pointer is the only attribute set
// per call.
struct GemmPlanEntry {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo = {};

  void Destroy() {
    if (desc != nullptr) cublasLtMatmulDescDestroy(desc);
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
    if (c != nullptr) cublasLtMatrixLayoutDestroy(c);
    desc = nullptr;
    a = b = c = nullptr;
  }
};

// Key: m, n, k, has bias, alignments of x, w, y and bias, workspace bytes, fp32 output.
using GemmKey = std::array<int64_t, 10>;

struct BlasLtGemm::Cache {
  std::map<GemmKey, GemmPlanEntry> entries;
  ~Cache() {
    for (auto& [key, e] : entries) e.Destroy();
  }
};

#define SIEVE_CUBLAS_RETURN_IF_ERROR(expr)                  \
  do {                                                      \
    const cublasStatus_t sieve_cublas_status_ = (expr);     \
    if (sieve_cublas_status_ != CUBLAS_STATUS_SUCCESS) {    \
      entry.Destroy();                                      \
      return sieve_cublas_status_;                          \
    }                                                       \
  } while (0)

namespace {

// Builds the descriptors for one key and asks the heuristic for the best algorithm.
cublasStatus_t MakeEntry(cublasLtHandle_t handle, const GemmKey& key, GemmPlanEntry& entry) {
  const int64_t m = key[0], n = key[1], k = key[2];
  const bool has_bias = key[3] != 0;
  const size_t workspace_bytes = static_cast<size_t>(key[8]);
  const cudaDataType_t out_type = key[9] != 0 ? CUDA_R_32F : CUDA_R_16BF;
  SIEVE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&entry.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  SIEVE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      entry.desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof trans_a));
  SIEVE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      entry.desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof trans_b));
  const cublasLtEpilogue_t epilogue = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  SIEVE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      entry.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue));
  if (has_bias) {
    const cudaDataType_t bias_type = CUDA_R_16BF;
    SIEVE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        entry.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
  }
  // Column-major views: w is k x n (ld k) used transposed, x^T is k x m (ld k), y^T is n x m.
  SIEVE_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&entry.a, CUDA_R_16BF, k, n, k));
  SIEVE_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&entry.b, CUDA_R_16BF, k, m, k));
  SIEVE_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&entry.c, out_type, n, m, n));

  cublasLtMatmulPreference_t pref = nullptr;
  SIEVE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&pref));
  auto set_pref = [&](cublasLtMatmulPreferenceAttributes_t attr, const void* v, size_t size) {
    return cublasLtMatmulPreferenceSetAttribute(pref, attr, v, size);
  };
  const uint32_t align_x = static_cast<uint32_t>(key[4]), align_w = static_cast<uint32_t>(key[5]);
  const uint32_t align_y = static_cast<uint32_t>(key[6]);
  cublasStatus_t st = set_pref(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
                               sizeof workspace_bytes);
  if (st == CUBLAS_STATUS_SUCCESS) st = set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_w, 4);
  if (st == CUBLAS_STATUS_SUCCESS) st = set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_x, 4);
  if (st == CUBLAS_STATUS_SUCCESS) st = set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_y, 4);
  if (st == CUBLAS_STATUS_SUCCESS) st = set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_y, 4);
  cublasLtMatmulHeuristicResult_t result = {};
  int found = 0;
  if (st == CUBLAS_STATUS_SUCCESS) {
    st = cublasLtMatmulAlgoGetHeuristic(handle, entry.desc, entry.a, entry.b, entry.c, entry.c,
                                        pref, 1, &result, &found);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  SIEVE_CUBLAS_RETURN_IF_ERROR(st);
  if (found < 1 || result.state != CUBLAS_STATUS_SUCCESS) {
    entry.Destroy();
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  entry.algo = result.algo;
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

#undef SIEVE_CUBLAS_RETURN_IF_ERROR

BlasLtGemm::BlasLtGemm() : cache_(std::make_unique<Cache>()) {}

BlasLtGemm::~BlasLtGemm() {
  cache_.reset();  // descriptors first, then the handle
  if (handle_ != nullptr) cublasLtDestroy(handle_);
}

BlasLtGemm::BlasLtGemm(BlasLtGemm&& other) noexcept
    : handle_(std::exchange(other.handle_, nullptr)), cache_(std::move(other.cache_)) {}

BlasLtGemm& BlasLtGemm::operator=(BlasLtGemm&& other) noexcept {
  if (this != &other) {
    cache_.reset();
    if (handle_ != nullptr) cublasLtDestroy(handle_);
    handle_ = std::exchange(other.handle_, nullptr);
    cache_ = std::move(other.cache_);
  }
  return *this;
}

cublasStatus_t BlasLtGemm::Init() {
  if (handle_ != nullptr) return CUBLAS_STATUS_SUCCESS;
  if (cache_ == nullptr) cache_ = std::make_unique<Cache>();
  return cublasLtCreate(&handle_);
}

size_t BlasLtGemm::cached_shapes() const { return cache_ == nullptr ? 0 : cache_->entries.size(); }

cublasStatus_t BlasLtGemm::Run(const GemmArgs& g, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream) {
  if (handle_ == nullptr || cache_ == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  const bool f32_out = g.y_f32 != nullptr;
  if (g.m < 0 || g.n <= 0 || g.k <= 0 || g.x == nullptr || g.w == nullptr ||
      (g.y == nullptr) == (g.y_f32 == nullptr) || (f32_out && g.bias != nullptr) ||
      (workspace == nullptr && workspace_bytes != 0)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (g.m == 0) return CUBLAS_STATUS_SUCCESS;
  void* y = f32_out ? static_cast<void*>(g.y_f32) : static_cast<void*>(g.y);
  const GemmKey key = {g.m, g.n, g.k, g.bias != nullptr ? 1 : 0, AlignmentOf(g.x),
                       AlignmentOf(g.w), AlignmentOf(y),
                       g.bias != nullptr ? AlignmentOf(g.bias) : 0,
                       static_cast<int64_t>(workspace_bytes), f32_out ? 1 : 0};
  auto it = cache_->entries.find(key);
  if (it == cache_->entries.end()) {
    GemmPlanEntry entry;
    const cublasStatus_t st = MakeEntry(handle_, key, entry);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
    it = cache_->entries.emplace(key, entry).first;
  }
  GemmPlanEntry& e = it->second;
  if (g.bias != nullptr) {
    const void* bias = g.bias;
    const cublasStatus_t st = cublasLtMatmulDescSetAttribute(
        e.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
  }
  const float alpha = 1.0f, beta = 0.0f;
  return cublasLtMatmul(handle_, e.desc, &alpha, g.w, e.a, g.x, e.b, &beta, y, e.c, y, e.c,
                        &e.algo, workspace, workspace_bytes, stream);
}

const char* CublasStatusName(cublasStatus_t status) { return cublasLtGetStatusName(status); }

}  // namespace sieve::kernels
