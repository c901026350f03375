// Helpers shared by the DoubleSparsity reference (double_sparsity.cc) and the fast selection
// (double_sparsity_cpu.cc); not part of the library's interface.
#ifndef SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_INTERNAL_H_
#define SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_INTERNAL_H_

#include <cstdint>

#include "kernels/sparse/double_sparsity.h"

namespace sieve::kernels::ds_internal {

// Code bytes per channel of a 4-bit label block: slots j and j + half share byte j.
inline int HalfOf(int page_size) { return (page_size + 1) / 2; }

// float -> IEEE binary16, round to nearest even (kernels::FloatToF16 of kernels/cpu/half.h).
uint16_t FloatToF16(float f);

// Sizes out.query_block_start, row_start, column_start (min(k, L) per row) and columns.
void LayOutSelection(const DoubleSparsityShape& s, const DsSelectParams& p, DsSelection& out);

}  // namespace sieve::kernels::ds_internal

#endif  // SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_INTERNAL_H_
