#include "server/auth.h"

#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::server {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(ConstantTimeEqualsTest, ComparesWholeStrings) {
  EXPECT_TRUE(ConstantTimeEquals("abc", "abc"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "ab"));
  EXPECT_FALSE(ConstantTimeEquals("ab", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("abcabc", "abc"));  // a's length is a multiple of b's
  EXPECT_FALSE(ConstantTimeEquals("", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("abc", ""));
  EXPECT_FALSE(ConstantTimeEquals(std::string("a\0c", 3), "abc"));
}

TEST(AuthenticatorTest, AcceptsOnlyConfiguredBearerTokens) {
  const Authenticator auth({"s3cret-token", "other"});
  EXPECT_TRUE(auth.CheckAuthorization("Bearer s3cret-token").ok());
  EXPECT_TRUE(auth.CheckAuthorization("bearer other").ok());
  EXPECT_TRUE(auth.CheckAuthorization("BEARER other").ok());
  for (const char* bad : {"", "Bearer", "Bearer ", "Bearer s3cret", "Bearer s3cret-token ",
                          "Basic s3cret-token", "s3cret-token", "Bearer  s3cret-token",
                          "Bearer s3cret-tokenX", "Bearer othe"}) {
    const absl::Status s = auth.CheckAuthorization(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated) << bad;
    EXPECT_THAT(std::string(s.message()), Not(HasSubstr("s3cret"))) << bad;
  }
}

TEST(AuthenticatorTest, ReadsTokensFileWithComments) {
  const std::string path = testing::TempDir() + "/auth_test_tokens";
  {
    std::ofstream out(path);
    out << "# first operator\n  alpha-1  \n\n#beta-commented\nbeta-2\r\n";
  }
  absl::StatusOr<std::unique_ptr<Authenticator>> auth = Authenticator::FromFile(path);
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_EQ((*auth)->num_tokens(), 2u);
  EXPECT_TRUE((*auth)->CheckAuthorization("Bearer alpha-1").ok());
  EXPECT_TRUE((*auth)->CheckAuthorization("Bearer beta-2").ok());
  EXPECT_FALSE((*auth)->CheckAuthorization("Bearer #beta-commented").ok());
}

TEST(AuthenticatorTest, FileErrorsNameTheKey) {
  absl::StatusOr<std::unique_ptr<Authenticator>> missing =
      Authenticator::FromFile(testing::TempDir() + "/no_such_tokens_file");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("server.auth.tokens_file"));
  const std::string path = testing::TempDir() + "/auth_test_empty";
  {
    std::ofstream out(path);
    out << "# only comments\n\n";
  }
  absl::StatusOr<std::unique_ptr<Authenticator>> empty = Authenticator::FromFile(path);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(empty.status().message()), HasSubstr("holds no token"));
}

}  // namespace
}  // namespace sieve::server
