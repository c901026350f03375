// `sieve calibrate --method double-sparsity`: the DoubleSparsity channel calibration of a model
// (SPARSE_ATTENTION.md section 4.2), written as the JSON file that
// attention.decode.double_sparsity.calibration_file names (format:
// engine/attention/double_sparsity_calibration.h).
#ifndef SIEVE_CLI_CALIBRATE_DOUBLE_SPARSITY_H_
#define SIEVE_CLI_CALIBRATE_DOUBLE_SPARSITY_H_

namespace sieve::cli {

// The command's usage text.
extern const char kCalibrateDoubleSparsityUsage[];

// Runs the command on the arguments after `calibrate` (including --method). Returns the exit
// code: 0 on success, 1 on failure (printed), 2 for bad arguments.
int RunCalibrateDoubleSparsity(int argc, char** argv);

}  // namespace sieve::cli

#endif  // SIEVE_CLI_CALIBRATE_DOUBLE_SPARSITY_H_
