#include "server/auth.h"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "absl/time/clock.h"
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

void WriteTokens(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
}

// A reload makes added tokens valid and removed ones invalid, and reports whether they changed.
TEST(AuthenticatorTest, ReloadAppliesAddedAndRemovedTokens) {
  const std::string path = testing::TempDir() + "/auth_test_reload";
  WriteTokens(path, "old-token\nkept-token\n");
  absl::StatusOr<std::unique_ptr<Authenticator>> auth = Authenticator::FromFile(path);
  ASSERT_TRUE(auth.ok()) << auth.status();
  absl::StatusOr<bool> changed = (*auth)->Reload();
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_FALSE(*changed);  // same file
  WriteTokens(path, "kept-token\n# rotated\nnew-token\n");
  changed = (*auth)->Reload();
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_TRUE(*changed);
  EXPECT_EQ((*auth)->num_tokens(), 2u);
  EXPECT_TRUE((*auth)->CheckAuthorization("Bearer new-token").ok());
  EXPECT_TRUE((*auth)->CheckAuthorization("Bearer kept-token").ok());
  EXPECT_EQ((*auth)->CheckAuthorization("Bearer old-token").code(),
            absl::StatusCode::kUnauthenticated);
}

// A file that cannot be used keeps the last good tokens; the error names the key and the problem
// and never a token.
TEST(AuthenticatorTest, ReloadErrorsKeepTheLastGoodTokens) {
  const std::string path = testing::TempDir() + "/auth_test_reload_errors";
  std::remove(path.c_str());
  rmdir(path.c_str());
  WriteTokens(path, "good-token\n");
  absl::StatusOr<std::unique_ptr<Authenticator>> auth = Authenticator::FromFile(path);
  ASSERT_TRUE(auth.ok()) << auth.status();
  const auto expect_still_good = [&](const char* what, const char* reason) {
    absl::StatusOr<bool> changed = (*auth)->Reload();
    EXPECT_EQ(changed.status().code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_THAT(std::string(changed.status().message()), HasSubstr("server.auth.tokens_file"));
    EXPECT_THAT(std::string(changed.status().message()), HasSubstr(reason)) << what;
    EXPECT_THAT(std::string(changed.status().message()), Not(HasSubstr("good-token")));
    EXPECT_TRUE((*auth)->CheckAuthorization("Bearer good-token").ok()) << what;
    EXPECT_EQ((*auth)->num_tokens(), 1u) << what;
  };
  WriteTokens(path, "# emptied while being rewritten\n");
  expect_still_good("no token", "holds no token");
  ASSERT_EQ(std::remove(path.c_str()), 0);
  expect_still_good("missing", "No such file");
  ASSERT_EQ(mkdir(path.c_str(), 0700), 0);
  expect_still_good("a directory", "not a regular file");
  ASSERT_EQ(rmdir(path.c_str()), 0);
  WriteTokens(path, "next-token\n");
  absl::StatusOr<bool> changed = (*auth)->Reload();
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_TRUE(*changed);
  EXPECT_TRUE((*auth)->CheckAuthorization("Bearer next-token").ok());
  EXPECT_FALSE((*auth)->CheckAuthorization("Bearer good-token").ok());
}

TEST(AuthenticatorTest, ReloadNeedsAFile) {
  Authenticator auth({"listed"});
  EXPECT_EQ(auth.Reload().status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(auth.CheckAuthorization("Bearer listed").ok());
}

// The reload thread applies a change within a few periods while checks run on other threads.
TEST(AuthenticatorTest, ReloadThreadAppliesChangesWhileCallsAreChecked) {
  const std::string path = testing::TempDir() + "/auth_test_reload_thread";
  WriteTokens(path, "first\n");
  absl::StatusOr<std::unique_ptr<Authenticator>> auth = Authenticator::FromFile(path);
  ASSERT_TRUE(auth.ok()) << auth.status();
  (*auth)->StartReloading(absl::Milliseconds(20));
  std::atomic<bool> stop{false};
  std::atomic<int64_t> checks{0};
  std::thread checker([&] {
    while (!stop.load()) {
      // Each check sees the old set or the new one: OK or UNAUTHENTICATED, nothing else (the
      // swap is one pointer under the lock; TSan runs this test too).
      for (const char* header : {"Bearer first", "Bearer second"}) {
        const absl::Status s = (*auth)->CheckAuthorization(header);
        EXPECT_TRUE(s.ok() || s.code() == absl::StatusCode::kUnauthenticated) << s;
      }
      checks.fetch_add(1);
    }
  });
  // Written to a temporary file and renamed over the path, as configuration tools do.
  WriteTokens(path + ".tmp", "second\n");
  ASSERT_EQ(std::rename((path + ".tmp").c_str(), path.c_str()), 0);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!(*auth)->CheckAuthorization("Bearer second").ok() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  stop.store(true);
  checker.join();
  EXPECT_TRUE((*auth)->CheckAuthorization("Bearer second").ok());
  EXPECT_FALSE((*auth)->CheckAuthorization("Bearer first").ok());
  EXPECT_GT(checks.load(), 0);
  auth->reset();  // stops and joins the reload thread
}

}  // namespace
}  // namespace sieve::server
