// Declares gRPC's callback hand-off to ThreadSanitizer (issue 15, item 6; scripts/sanitize.sh).
//
// A server reactor (and the interceptor our factory creates) is built on one gRPC thread and
// called back on others: OnReadDone, OnWriteDone, OnCancel and OnDone run wherever gRPC's
// completion queue delivers the event. gRPC orders each callback after the code that started
// its operation, but through its own atomics and absl::Mutex in Debian's uninstrumented libgrpc,
// so TSan does not see the ordering: it reported callbacks reading members the constructor
// wrote, and OnDone freeing a message that gRPC's inline code had serialized on the thread that
// started the write (grpcpp serializes inside StartWrite, after our code returned to it).
//
// Under TSan the hand-off is declared where it happens, on two addresses:
//   - the reactor's: TsanHandOff(this) wherever our code hands the reactor to gRPC (the end of
//     its constructor, the handler's return, just before StartRead / StartWrite /
//     StartWriteAndFinish / Finish);
//   - the call's (grpc_call*): tsan_handoff.cc wraps grpc_call_start_batch, the one function
//     through which grpcpp's inline code hands a batch of operations to gRPC's core, with a
//     release on the call, so what the starting thread did up to the hand-off (serializing the
//     message included) is declared; it releases on the batch's tag too, which its wrapper of
//     grpc_completion_queue_next acquires on the thread that takes the completion, before
//     gRPC's inline completion code (deserializing into our message, counting down) runs;
// and TsanTakeOver(this, call) first thing in each On* callback acquires both. The declared
// order is the one gRPC provides: a callback comes after the hand-offs that started its
// operations. Nothing else is ordered by it: a race between a callback and a thread of ours that
// does not hand this call to gRPC (the engine's output thread writing a member without the
// stream's mutex, say) is still reported; server_race_canary_test checks that with a reactor
// using these calls. In other builds everything here compiles to nothing.
#pragma once

#if defined(__SANITIZE_THREAD__)
#define SIEVE_TSAN_HANDOFF 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SIEVE_TSAN_HANDOFF 1
#endif
#endif

#ifdef SIEVE_TSAN_HANDOFF
#include <sanitizer/tsan_interface.h>
#endif

struct grpc_call;

namespace sieve::server {

#ifdef SIEVE_TSAN_HANDOFF
// Acquires what grpc_call_start_batch released on `call` (tsan_handoff.cc, which also holds the
// wrapper: a reactor that calls this links it).
void TsanAcquireCall(grpc_call* call);
#endif

// The calling thread hands `object` to gRPC: everything it did so far happens before the
// callbacks that take the object over.
inline void TsanHandOff(const void* object) {
#ifdef SIEVE_TSAN_HANDOFF
  __tsan_release(const_cast<void*>(object));
#else
  (void)object;
#endif
}

// A gRPC callback takes `object` over: it runs after every hand-off of the object so far.
inline void TsanTakeOver(const void* object) {
#ifdef SIEVE_TSAN_HANDOFF
  __tsan_acquire(const_cast<void*>(object));
#else
  (void)object;
#endif
}

// The same, and after every batch of operations started on `call` (the context's c_call(),
// kept in a member of `object`: passed by reference, it is read only once `object` is taken
// over).
inline void TsanTakeOver(const void* object, grpc_call* const& call) {
  TsanTakeOver(object);
#ifdef SIEVE_TSAN_HANDOFF
  TsanAcquireCall(call);
#else
  (void)call;
#endif
}

}  // namespace sieve::server
