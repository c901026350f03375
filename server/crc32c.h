// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of each KV page chunk of a
// transfer between daemons (proto/sieve/kv/v1/kv_transfer.proto). Debian 12's Abseil predates
// absl::crc32c, so this is a table-driven software version (slicing by one byte: about 0.5 GB/s,
// small next to a network transfer of the same bytes). Thread-safe.
#ifndef SIEVE_SERVER_CRC32C_H_
#define SIEVE_SERVER_CRC32C_H_

#include <cstdint>

#include "absl/types/span.h"

namespace sieve::server {

// Returns the CRC32C of `data`, continuing from `crc` (the CRC of the bytes before it; 0 to
// start). Crc32c("123456789") == 0xE3069283.
uint32_t Crc32c(absl::Span<const uint8_t> data, uint32_t crc = 0);

}  // namespace sieve::server

#endif  // SIEVE_SERVER_CRC32C_H_
