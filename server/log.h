// A minimal leveled logger for the daemon: one line per message on stderr, prefixed by the
// wall-clock time and the level, e.g. "2024-05-01 12:00:00.123 I sieved: listening on ...".
//
// Abseil 20220623 (Debian's) has no absl/log, so this is the daemon's only logging facility.
// Request logs carry the client's request id, which is never used anywhere else (in particular
// never as a metric label).
//
// Messages are escaped before they are written (EscapeForLog), so text from clients (request
// ids, status messages quoting a field) can neither start a forged line nor send terminal
// control sequences.
//
// Thread-safety: every function may be called from any thread; lines never interleave.
#ifndef SIEVE_SERVER_LOG_H_
#define SIEVE_SERVER_LOG_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace sieve::server {

// Severity of a log line, least severe first.
enum class LogLevel { kDebug, kInfo, kWarning, kError };

// Parses "debug", "info", "warning" or "error" (the config's logging.level values).
absl::StatusOr<LogLevel> ParseLogLevel(std::string_view name);

// Sets the least severe level that is written; the default is kInfo.
void SetLogLevel(LogLevel level);

// Returns true if a line of `level` would be written (to skip building costly messages).
bool LogEnabled(LogLevel level);

// Writes `message`, escaped by EscapeForLog(), as one line if `level` is enabled.
void Log(LogLevel level, std::string_view message);

// Returns `text` fit for one log line: newline, carriage return and tab become \n, \r and \t;
// the other control characters (U+0000..U+001F, U+007F and the C1 controls U+0080..U+009F)
// and bytes that are not part of valid UTF-8 become \xNN (one per byte). Valid UTF-8 outside
// the controls, backslashes included, is kept as is.
std::string EscapeForLog(std::string_view text);

}  // namespace sieve::server

#endif  // SIEVE_SERVER_LOG_H_
