#include "server/prefill_target.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::server {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Kind = PrefillTarget::Kind;

TEST(PrefillTargetTest, Ipv4AndIpv6ListsAreOneAddressEach) {
  absl::StatusOr<PrefillTarget> t = ParsePrefillTarget("ipv4:127.0.0.1:50061,10.0.0.6:7");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->kind, Kind::kStatic);
  EXPECT_THAT(t->addresses, ElementsAre("ipv4:127.0.0.1:50061", "ipv4:10.0.0.6:7"));
  EXPECT_EQ(t->authority, "");
  t = ParsePrefillTarget("ipv6:[::1]:50061,[fe80::1]:9");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(t->addresses, ElementsAre("ipv6:[::1]:50061", "ipv6:[fe80::1]:9"));
  // Duplicates collapse.
  t = ParsePrefillTarget("ipv4:127.0.0.1:1,127.0.0.1:1");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->addresses.size(), 1u);
}

TEST(PrefillTargetTest, MalformedListsNameTheKey) {
  for (const char* bad : {"ipv4:127.0.0.1", "ipv4:127.0.0.1:0", "ipv4:localhost:5",
                          "ipv4:1.2.3.4:5,", "ipv6:::1:5", "ipv6:[::1]:x", "", "dns://"}) {
    absl::StatusOr<PrefillTarget> t = ParsePrefillTarget(bad);
    EXPECT_FALSE(t.ok()) << bad;
    EXPECT_THAT(t.status().message(), HasSubstr("disaggregation.prefill_target")) << bad;
  }
}

TEST(PrefillTargetTest, DnsTargetsKeepTheirHostAsAuthority) {
  struct Case {
    const char* target;
    const char* host;
    const char* port;
  };
  for (const Case& c : {Case{"dns:///sieve-prefill:50051", "sieve-prefill", "50051"},
                        Case{"dns://8.8.8.8/sieve-prefill.ns.svc:7", "sieve-prefill.ns.svc", "7"},
                        Case{"dns:localhost:9", "localhost", "9"},
                        Case{"localhost:9", "localhost", "9"},
                        Case{"sieve-prefill", "sieve-prefill", "443"},
                        Case{"[::1]:5", "::1", "5"}}) {
    absl::StatusOr<PrefillTarget> t = ParsePrefillTarget(c.target);
    ASSERT_TRUE(t.ok()) << c.target << ": " << t.status();
    EXPECT_EQ(t->kind, Kind::kDns) << c.target;
    EXPECT_EQ(t->host, c.host) << c.target;
    EXPECT_EQ(t->port, c.port) << c.target;
  }
  EXPECT_EQ(ParsePrefillTarget("dns:///sieve-prefill:50051")->authority, "sieve-prefill:50051");
}

TEST(PrefillTargetTest, SchemesGrpcResolvesStayOpaque) {
  for (const char* target : {"unix:/tmp/prefill.sock", "unix-abstract:prefill", "xds:///prefill",
                             "custom://x/y"}) {
    absl::StatusOr<PrefillTarget> t = ParsePrefillTarget(target);
    ASSERT_TRUE(t.ok()) << target;
    EXPECT_EQ(t->kind, Kind::kOpaque) << target;
    EXPECT_THAT(t->addresses, ElementsAre(target));
  }
}

TEST(PrefillTargetTest, LocalhostResolvesToLoopbackAddresses) {
  absl::StatusOr<PrefillTarget> t = ParsePrefillTarget("dns:///localhost:50099");
  ASSERT_TRUE(t.ok());
  absl::StatusOr<std::vector<std::string>> addresses = ResolveDnsTarget(*t);
  ASSERT_TRUE(addresses.ok()) << addresses.status();
  ASSERT_FALSE(addresses->empty());
  for (const std::string& a : *addresses) {
    EXPECT_TRUE(a == "ipv4:127.0.0.1:50099" || a == "ipv6:[::1]:50099") << a;
  }
  // An IP literal resolves to itself.
  t = ParsePrefillTarget("10.1.2.3:8");
  ASSERT_TRUE(t.ok());
  EXPECT_THAT(*ResolveDnsTarget(*t), ElementsAre("ipv4:10.1.2.3:8"));
  // A name that cannot exist (RFC 6761 .invalid) fails Unavailable, naming it.
  t = ParsePrefillTarget("dns:///no-such-host.invalid:5");
  ASSERT_TRUE(t.ok());
  absl::StatusOr<std::vector<std::string>> none = ResolveDnsTarget(*t);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(none.status().message(), HasSubstr("no-such-host.invalid"));
}

}  // namespace
}  // namespace sieve::server
