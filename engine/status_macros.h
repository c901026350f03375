// Status propagation helpers used across the engine and the server.
#ifndef SIEVE_ENGINE_STATUS_MACROS_H_
#define SIEVE_ENGINE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define SIEVE_RETURN_IF_ERROR(expr)                 \
  do {                                              \
    ::absl::Status sieve_status_ = (expr);          \
    if (!sieve_status_.ok()) return sieve_status_;  \
  } while (0)

#define SIEVE_STATUS_CONCAT_INNER_(a, b) a##b
#define SIEVE_STATUS_CONCAT_(a, b) SIEVE_STATUS_CONCAT_INNER_(a, b)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status, else moves the value
// into `lhs`, which may be a declaration (`auto x`) or an existing variable.
#define SIEVE_ASSIGN_OR_RETURN(lhs, rexpr) \
  SIEVE_ASSIGN_OR_RETURN_IMPL_(SIEVE_STATUS_CONCAT_(sieve_statusor_, __LINE__), lhs, rexpr)

#define SIEVE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // SIEVE_ENGINE_STATUS_MACROS_H_
