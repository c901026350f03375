// The `sieve` subcommands that talk to a running `sieved` over gRPC (sieve.v1.Sieve and
// grpc.health.v1.Health). Each returns the process exit code: 0 on success, 1 when the call
// fails (the gRPC status is printed), 2 for a bad command line; `health` returns 1 when the
// server is not SERVING.
//
// Security (server.auth.*, server.tls.* of the daemon) comes from the environment, so that
// tokens stay off command lines: SIEVE_TOKEN (sent as "authorization: Bearer ..."),
// SIEVE_TLS_CA_FILE (the CA bundle to trust; turns TLS on), SIEVE_TLS_CERT_FILE and
// SIEVE_TLS_KEY_FILE (a client certificate for mutual TLS).
#ifndef SIEVE_CLI_REMOTE_H_
#define SIEVE_CLI_REMOTE_H_

#include "cli/options.h"

namespace sieve::cli {

// `sieve generate PROMPT`: streams the completion's text to stdout as it arrives, then prints
// the finish reason, token counts and per-phase timings to stderr.
int RunRemoteGenerate(const GenerateOptions& options);

// `sieve health [--target ADDR] [--service NAME]`: prints the serving status.
int RunHealth(int argc, char** argv);

// `sieve tokenize [--target ADDR] [--no-bos] [--pieces] TEXT`: prints the token ids (and, with
// --pieces, each token's piece).
int RunTokenize(int argc, char** argv);

// `sieve models [--target ADDR]`: lists the served models with their shape and settings.
int RunModels(int argc, char** argv);

}  // namespace sieve::cli

#endif  // SIEVE_CLI_REMOTE_H_
