// The grpc_call_start_batch side of server/tsan_handoff.h, in ThreadSanitizer builds only.
//
// grpcpp's inline code (compiled into our binaries) starts every batch of a call's operations
// through grpc_call_start_batch in Debian's libgrpc, after it has serialized the messages and
// copied the status into the batch. Defining the function here interposes it for the binaries
// that link this object (the executable's definition comes first in the dynamic linker's
// search, for libgrpc++'s calls too): it releases on the call, then calls libgrpc's function
// (the next definition, from dlsym(RTLD_NEXT)). The release comes before the batch reaches
// gRPC's core, hence before any completion of it. It releases on the batch's tag as well, and
// grpc_completion_queue_next, wrapped the same way, acquires the tag of each completion it
// returns: libgrpc++'s callback threads take completions with it and then run grpcpp's inline
// completion code (deserializing a received message into the reactor's buffer) before calling
// us. A binary that never calls TsanTakeOver(object, call) does not link this object, hence
// neither wrapper (the integration tests' client code, for one).
#include "server/tsan_handoff.h"

#ifdef SIEVE_TSAN_HANDOFF

#include <dlfcn.h>
#include <grpc/grpc.h>

#include <cstdio>
#include <cstdlib>

namespace sieve::server {

void TsanAcquireCall(grpc_call* call) { __tsan_acquire(call); }

}  // namespace sieve::server

extern "C" grpc_call_error grpc_call_start_batch(grpc_call* call, const grpc_op* ops, size_t nops,
                                                 void* tag, void* reserved) {
  using StartBatch = grpc_call_error (*)(grpc_call*, const grpc_op*, size_t, void*, void*);
  static const StartBatch real =
      reinterpret_cast<StartBatch>(dlsym(RTLD_NEXT, "grpc_call_start_batch"));
  if (real == nullptr) {
    std::fprintf(stderr, "tsan_handoff: libgrpc's grpc_call_start_batch not found: %s\n",
                 dlerror());
    std::abort();
  }
  __tsan_release(call);
  __tsan_release(tag);
  return real(call, ops, nops, tag, reserved);
}

// The completion side: libgrpc++'s callback threads take each completion with
// grpc_completion_queue_next and then run the tag's callback code (deserializing a received
// message into the reactor's buffer, counting the call's callbacks down, ...) before any callback
// of ours can acquire. The completed batch's tag is the one grpc_call_start_batch released.
extern "C" grpc_event grpc_completion_queue_next(grpc_completion_queue* cq, gpr_timespec deadline,
                                                 void* reserved) {
  using Next = grpc_event (*)(grpc_completion_queue*, gpr_timespec, void*);
  static const Next real = reinterpret_cast<Next>(dlsym(RTLD_NEXT, "grpc_completion_queue_next"));
  if (real == nullptr) {
    std::fprintf(stderr, "tsan_handoff: libgrpc's grpc_completion_queue_next not found: %s\n",
                 dlerror());
    std::abort();
  }
  grpc_event event = real(cq, deadline, reserved);
  if (event.type == GRPC_OP_COMPLETE && event.tag != nullptr) __tsan_acquire(event.tag);
  return event;
}

#endif  // SIEVE_TSAN_HANDOFF
