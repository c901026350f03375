// `sieve generate --model DIR`: generation in-process from a checkpoint directory, without a
// daemon (CPU backend, one request, the engine's offline Generator).
#ifndef SIEVE_CLI_LOCAL_H_
#define SIEVE_CLI_LOCAL_H_

#include "cli/options.h"

namespace sieve::cli {

// Streams the continuation of options.prompt to stdout and a summary (finish reason, token
// counts, timings) to stderr. Returns the process exit code: 0 on success, 1 on failure (the
// error is printed).
int RunLocalGenerate(const GenerateOptions& options);

}  // namespace sieve::cli

#endif  // SIEVE_CLI_LOCAL_H_
