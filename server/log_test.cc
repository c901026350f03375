#include "server/log.h"

#include <algorithm>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::server {
namespace {

TEST(EscapeForLogTest, KeepsPrintableTextAndValidUtf8) {
  EXPECT_EQ(EscapeForLog("request req-1 accepted: 12 tokens"),
            "request req-1 accepted: 12 tokens");
  // Two-, three- and four-byte characters, and a backslash, pass unchanged.
  const std::string utf8 = "caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x98\x80 C:\\dir";
  EXPECT_EQ(EscapeForLog(utf8), utf8);
  EXPECT_EQ(EscapeForLog(""), "");
}

TEST(EscapeForLogTest, EscapesC0ControlsAndDel) {
  EXPECT_EQ(EscapeForLog("a\nb\rc\td"), "a\\nb\\rc\\td");
  // ESC would start a terminal control sequence; NUL, BEL and DEL are escaped as bytes.
  EXPECT_EQ(EscapeForLog("\x1B[31mred"), "\\x1b[31mred");
  EXPECT_EQ(EscapeForLog(std::string("a\0b", 3)), "a\\x00b");
  EXPECT_EQ(EscapeForLog("\x07\x7F\x1F"), "\\x07\\x7f\\x1f");
}

TEST(EscapeForLogTest, EscapesC1ControlsAndInvalidUtf8ByteByByte) {
  // U+009B (CSI) encoded in UTF-8, and U+00A0 just past the C1 range.
  EXPECT_EQ(EscapeForLog("\xC2\x9B" "1m"), "\\xc2\\x9b1m");
  EXPECT_EQ(EscapeForLog("\xC2\xA0"), "\xC2\xA0");
  // A raw 8-bit CSI, a stray continuation byte, an overlong '/', a surrogate, a cut character.
  EXPECT_EQ(EscapeForLog("\x9B"), "\\x9b");
  EXPECT_EQ(EscapeForLog("a\x80z"), "a\\x80z");
  EXPECT_EQ(EscapeForLog("\xC0\xAF"), "\\xc0\\xaf");
  EXPECT_EQ(EscapeForLog("\xED\xA0\x80"), "\\xed\\xa0\\x80");
  EXPECT_EQ(EscapeForLog("ok \xE2\x82"), "ok \\xe2\\x82");
  EXPECT_EQ(EscapeForLog("\xF4\x90\x80\x80"), "\\xf4\\x90\\x80\\x80");  // past U+10FFFF
}

TEST(LogTest, WritesOneEscapedLinePerMessage) {
  SetLogLevel(LogLevel::kDebug);
  testing::internal::CaptureStderr();
  // A client-chosen request id trying to forge a second line and colour the terminal.
  Log(LogLevel::kDebug,
      "request evil\n2026-01-01 00:00:00.000 E sieved: forged\x1B[2J accepted");
  const std::string out = testing::internal::GetCapturedStderr();
  SetLogLevel(LogLevel::kInfo);
  EXPECT_THAT(out, testing::EndsWith(
                       " D sieved: request evil\\n2026-01-01 00:00:00.000 E sieved: forged"
                       "\\x1b[2J accepted\n"));
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1);
  EXPECT_EQ(out.find('\x1B'), std::string::npos);
}

}  // namespace
}  // namespace sieve::server
