// `sieve generate --model DIR`: generation in-process, without a daemon: the real Engine (the
// same scheduler, workers, sampling, EOS ids and limits as sieved), configured by the daemon's
// configuration loader (an optional --config file, then the --set overrides).
#ifndef SIEVE_CLI_LOCAL_H_
#define SIEVE_CLI_LOCAL_H_

#include "cli/options.h"

namespace sieve::cli {

// Streams the continuation of options.prompt to stdout and a summary (finish reason, token
// counts, timings) to stderr. Without --config and without an override of kv_cache.num_pages,
// the KV pool holds just this request (prompt + max_tokens) instead of the daemon's default
// pool. Returns the process exit code: 0 on success, 1 on failure (the error is printed), 2 for
// an invalid configuration.
int RunLocalGenerate(const GenerateOptions& options);

}  // namespace sieve::cli

#endif  // SIEVE_CLI_LOCAL_H_
