// cuBLASLt, loaded with dlopen on first use instead of linked.
//
// Why: libcublasLt.so has a 92 KiB static TLS segment. A library linked at start-up puts its
// static TLS into every thread's stack, and civetweb (prometheus-cpp's HTTP server) starts its
// threads with small fixed stacks, so in a process linking cuBLASLt civetweb's pthread_create
// fails and the metrics endpoint cannot start. A dlopen'ed library's TLS is allocated
// dynamically instead. It also keeps the 500 MB library out of processes that never use the
// CUDA backend (the CPU daemon, every CPU test).
//
// The functions below have the exact prototypes of <cublasLt.h>, so gemm.cu calls cuBLASLt as
// usual; each forwards to the real symbol, or fails with CUBLAS_STATUS_NOT_INITIALIZED when the
// library cannot be loaded.
#include <cublasLt.h>
#include <dlfcn.h>

namespace {

void* Library() {
  static void* handle = [] {
    void* h = dlopen("libcublasLt.so.13", RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) h = dlopen("libcublasLt.so", RTLD_NOW | RTLD_LOCAL);
    return h;
  }();
  return handle;
}

template <typename Fn>
Fn* Symbol(const char* name) {
  void* lib = Library();
  return lib == nullptr ? nullptr : reinterpret_cast<Fn*>(dlsym(lib, name));
}

}  // namespace

// Forwards cuBLASLt function `name` (a declared prototype) with the arguments `args`.
#define SIEVE_CUBLASLT_FORWARD(name, ...)                                        \
  static auto* fn = Symbol<decltype(name)>(#name);                               \
  return fn == nullptr ? CUBLAS_STATUS_NOT_INITIALIZED : fn(__VA_ARGS__)

extern "C" {

cublasStatus_t CUBLASWINAPI cublasLtCreate(cublasLtHandle_t* handle) {
  SIEVE_CUBLASLT_FORWARD(cublasLtCreate, handle);
}

cublasStatus_t CUBLASWINAPI cublasLtDestroy(cublasLtHandle_t handle) {
  SIEVE_CUBLASLT_FORWARD(cublasLtDestroy, handle);
}

const char* CUBLASWINAPI cublasLtGetStatusName(cublasStatus_t status) {
  static auto* fn = Symbol<decltype(cublasLtGetStatusName)>("cublasLtGetStatusName");
  return fn == nullptr ? "CUBLAS_STATUS_NOT_INITIALIZED (libcublasLt not found)" : fn(status);
}

cublasStatus_t CUBLASWINAPI cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                           const void* alpha, const void* a,
                                           cublasLtMatrixLayout_t a_desc, const void* b,
                                           cublasLtMatrixLayout_t b_desc, const void* beta,
                                           const void* c, cublasLtMatrixLayout_t c_desc, void* d,
                                           cublasLtMatrixLayout_t d_desc,
                                           const cublasLtMatmulAlgo_t* algo, void* workspace,
                                           size_t workspace_bytes, cudaStream_t stream) {
  SIEVE_CUBLASLT_FORWARD(cublasLtMatmul, handle, desc, alpha, a, a_desc, b, b_desc, beta, c,
                         c_desc, d, d_desc, algo, workspace, workspace_bytes, stream);
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout,
                                                       cudaDataType type, uint64_t rows,
                                                       uint64_t cols, int64_t ld) {
  SIEVE_CUBLASLT_FORWARD(cublasLtMatrixLayoutCreate, layout, type, rows, cols, ld);
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  SIEVE_CUBLASLT_FORWARD(cublasLtMatrixLayoutDestroy, layout);
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc,
                                                     cublasComputeType_t compute,
                                                     cudaDataType_t scale) {
  SIEVE_CUBLASLT_FORWARD(cublasLtMatmulDescCreate, desc, compute, scale);
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  SIEVE_CUBLASLT_FORWARD(cublasLtMatmulDescDestroy, desc);
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                                           cublasLtMatmulDescAttributes_t attr,
                                                           const void* buf, size_t bytes) {
  SIEVE_CUBLASLT_FORWARD(cublasLtMatmulDescSetAttribute, desc, attr, buf, bytes);
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  SIEVE_CUBLASLT_FORWARD(cublasLtMatmulPreferenceCreate, pref);
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  SIEVE_CUBLASLT_FORWARD(cublasLtMatmulPreferenceDestroy, pref);
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceSetAttribute(
    cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
    size_t bytes) {
  SIEVE_CUBLASLT_FORWARD(cublasLtMatmulPreferenceSetAttribute, pref, attr, buf, bytes);
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulAlgoGetHeuristic(
    cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a_desc,
    cublasLtMatrixLayout_t b_desc, cublasLtMatrixLayout_t c_desc, cublasLtMatrixLayout_t d_desc,
    cublasLtMatmulPreference_t pref, int requested, cublasLtMatmulHeuristicResult_t results[],
    int* returned) {
  SIEVE_CUBLASLT_FORWARD(cublasLtMatmulAlgoGetHeuristic, handle, desc, a_desc, b_desc, c_desc,
                         d_desc, pref, requested, results, returned);
}

}  // extern "C"
