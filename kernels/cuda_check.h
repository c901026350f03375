// Error checking for CUDA runtime calls inside the kernels layer.
//
// Kernel launchers return cudaError_t (the kernels layer has no absl). The macro below returns the
// first failing call's code from the enclosing function and records where it failed, so that the
// engine's one wrapper can turn it into an absl::Status that names the expression, file and line.
#ifndef SIEVE_KERNELS_CUDA_CHECK_H_
#define SIEVE_KERNELS_CUDA_CHECK_H_

#include <cuda_runtime.h>

namespace sieve::kernels {

// Where the most recent failing SIEVE_CUDA_RETURN_IF_ERROR on this host thread failed.
// `expr` and `file` point to string literals; all fields are null / zero before any failure.
struct CudaErrorSite {
  cudaError_t error = cudaSuccess;
  const char* expr = nullptr;
  const char* file = nullptr;
  int line = 0;
};

// The calling thread's record of its last failure (thread-local, so launchers on different
// threads never see each other's errors).
inline CudaErrorSite& LastCudaErrorSite() {
  thread_local CudaErrorSite site;
  return site;
}

// Records a failure in the calling thread's CudaErrorSite and returns `error` unchanged.
inline cudaError_t RecordCudaError(cudaError_t error, const char* expr, const char* file,
                                   int line) {
  LastCudaErrorSite() = CudaErrorSite{error, expr, file, line};
  return error;
}

}  // namespace sieve::kernels

// Evaluates `expr` (a cudaError_t); if it is not cudaSuccess, records the site and returns the
// code from the enclosing function, which must return cudaError_t.
#define SIEVE_CUDA_RETURN_IF_ERROR(expr)                                                   \
  do {                                                                                     \
    const cudaError_t sieve_cuda_error_ = (expr);                                          \
    if (sieve_cuda_error_ != cudaSuccess) {                                                \
      return ::sieve::kernels::RecordCudaError(sieve_cuda_error_, #expr, __FILE__, __LINE__); \
    }                                                                                      \
  } while (0)

// Checks the launch just made (<<<...>>>) for a configuration error, as above. It does not
// synchronize, so faults inside the kernel show up at a later synchronizing call.
#define SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR() SIEVE_CUDA_RETURN_IF_ERROR(cudaGetLastError())

#endif  // SIEVE_KERNELS_CUDA_CHECK_H_
