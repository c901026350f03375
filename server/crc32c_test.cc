#include "server/crc32c.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace sieve::server {
namespace {

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

TEST(Crc32cTest, KnownVectors) {
  // The check value of CRC-32C and the iSCSI test patterns of RFC 3720, appendix B.4.
  EXPECT_EQ(Crc32c(Bytes("123456789")), 0xE3069283u);
  EXPECT_EQ(Crc32c(Bytes("")), 0u);
  EXPECT_EQ(Crc32c(std::vector<uint8_t>(32, 0)), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(std::vector<uint8_t>(32, 0xFF)), 0x62A8AB43u);
  std::vector<uint8_t> ascending(32);
  for (int i = 0; i < 32; ++i) ascending[i] = static_cast<uint8_t>(i);
  EXPECT_EQ(Crc32c(ascending), 0x46DD794Eu);
}

TEST(Crc32cTest, ContinuesAcrossPiecesAndSeesEveryBitFlip) {
  std::mt19937 rng(11);
  std::vector<uint8_t> data(4099);
  for (uint8_t& b : data) b = static_cast<uint8_t>(rng());
  const uint32_t whole = Crc32c(data);
  const absl::Span<const uint8_t> all(data);
  EXPECT_EQ(Crc32c(all.subspan(1000), Crc32c(all.first(1000))), whole);
  for (int trial = 0; trial < 64; ++trial) {
    const size_t at = rng() % data.size();
    const uint8_t bit = static_cast<uint8_t>(1u << (rng() % 8));
    data[at] ^= bit;
    EXPECT_NE(Crc32c(data), whole) << "byte " << at;
    data[at] ^= bit;
  }
}

}  // namespace
}  // namespace sieve::server
