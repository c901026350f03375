#include "engine/tokenizer/unicode.h"

#include <random>
#include <string>

#include "gtest/gtest.h"

namespace sieve::engine::unicode {
namespace {

const std::string kFffd = "\xEF\xBF\xBD";

TEST(UnicodeClassesTest, LettersNumbersWhitespace) {
  EXPECT_TRUE(IsLetter('a'));
  EXPECT_TRUE(IsLetter(0x4E2D));   // CJK ideograph (Lo).
  EXPECT_TRUE(IsLetter(0x01C5));   // Dž (Lt).
  EXPECT_TRUE(IsLetter(0x1D400));  // Mathematical bold A (Lu, outside the BMP).
  EXPECT_TRUE(IsLetter(0x1C89));   // Assigned in Unicode 16: added to the tables.
  EXPECT_FALSE(IsLetter(0x0301));  // Combining acute (Mn).
  EXPECT_FALSE(IsLetter('1'));
  EXPECT_TRUE(IsNumber('7'));
  EXPECT_TRUE(IsNumber(0x0663));  // Arabic-Indic digit three (Nd).
  EXPECT_TRUE(IsNumber(0x216B));  // Roman numeral twelve (Nl).
  EXPECT_TRUE(IsNumber(0x00BD));  // ½ (No).
  EXPECT_FALSE(IsNumber('x'));
  for (char32_t ws : {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, 0x2000, 0x200A,
                      0x2028, 0x2029, 0x202F, 0x205F, 0x3000}) {
    EXPECT_TRUE(IsWhitespace(ws)) << static_cast<uint32_t>(ws);
  }
  EXPECT_FALSE(IsWhitespace(0x200B));  // Zero width space is not White_Space.
  EXPECT_FALSE(IsWhitespace(0x180E));
  EXPECT_FALSE(IsWhitespace('x'));
  EXPECT_EQ(ClassesOf(0x1F600), 0);  // Emoji: none of the classes.
  EXPECT_EQ(ClassesOf(0x110000), 0);
}

TEST(UnicodeClassesTest, WordCharacters) {
  EXPECT_TRUE(IsWordChar('a'));
  EXPECT_TRUE(IsWordChar('_'));
  EXPECT_TRUE(IsWordChar('5'));
  EXPECT_TRUE(IsWordChar(0x0301));  // Marks are word characters.
  EXPECT_TRUE(IsWordChar(0x24D0));  // Circled small a (Other_Alphabetic).
  EXPECT_TRUE(IsWordChar(0x200D));  // Join_Control.
  EXPECT_FALSE(IsWordChar('-'));
  EXPECT_FALSE(IsWordChar(' '));
  EXPECT_FALSE(IsWordChar(0x00BD));  // No is not \w.
}

TEST(Utf8Test, FindInvalid) {
  EXPECT_EQ(FindInvalidUtf8("plain ascii"), std::nullopt);
  EXPECT_EQ(FindInvalidUtf8("\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x98\x80"), std::nullopt);
  EXPECT_EQ(FindInvalidUtf8("\xF4\x8F\xBF\xBF"), std::nullopt);  // U+10FFFF.
  EXPECT_EQ(FindInvalidUtf8("ab\x80"), 2u);                      // Lone continuation.
  EXPECT_EQ(FindInvalidUtf8("\xC0\x80"), 0u);                    // Overlong NUL.
  EXPECT_EQ(FindInvalidUtf8("\xE0\x80\xAF"), 0u);                // Overlong.
  EXPECT_EQ(FindInvalidUtf8("x\xED\xA0\x80"), 1u);               // Surrogate U+D800.
  EXPECT_EQ(FindInvalidUtf8("\xF4\x90\x80\x80"), 0u);            // Above U+10FFFF.
  EXPECT_EQ(FindInvalidUtf8("\xF5\x80\x80\x80"), 0u);
  EXPECT_EQ(FindInvalidUtf8("ok\xF0\x9F\x98"), 2u);  // Truncated.
  EXPECT_EQ(FindInvalidUtf8(std::string("a\0b", 3)), std::nullopt);
}

TEST(Utf8Test, LossyReplacesMaximalSubparts) {
  EXPECT_EQ(Utf8Lossy("valid \xC3\xA9"), "valid \xC3\xA9");
  // The example of Unicode chapter 3 ("U+FFFD substitution of maximal subparts").
  EXPECT_EQ(Utf8Lossy("\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64"),
            "a" + kFffd + kFffd + kFffd + "b" + kFffd + "c" + kFffd + kFffd + "d");
  EXPECT_EQ(Utf8Lossy("\xED\xA0\x80"), kFffd + kFffd + kFffd);  // Surrogate: 3 subparts.
  EXPECT_EQ(Utf8Lossy("\xF0\x9F\x98"), kFffd);                  // Truncated: one.
  EXPECT_EQ(Utf8Lossy("\xC0\xAF"), kFffd + kFffd);
  EXPECT_EQ(Utf8Lossy(""), "");
}

TEST(Utf8Test, IncompleteSuffix) {
  EXPECT_EQ(IncompleteUtf8Suffix(""), 0u);
  EXPECT_EQ(IncompleteUtf8Suffix("abc"), 0u);
  EXPECT_EQ(IncompleteUtf8Suffix("a\xF0"), 1u);
  EXPECT_EQ(IncompleteUtf8Suffix("a\xF0\x9F"), 2u);
  EXPECT_EQ(IncompleteUtf8Suffix("a\xF0\x9F\x98"), 3u);
  EXPECT_EQ(IncompleteUtf8Suffix("a\xF0\x9F\x98\x80"), 0u);  // Complete.
  EXPECT_EQ(IncompleteUtf8Suffix("a\xC3"), 1u);
  EXPECT_EQ(IncompleteUtf8Suffix("a\xED\xA0"), 0u);  // Already invalid: nothing to wait for.
  EXPECT_EQ(IncompleteUtf8Suffix("a\x80"), 0u);
  EXPECT_EQ(IncompleteUtf8Suffix("\xF5"), 0u);
  EXPECT_EQ(IncompleteUtf8Suffix("\x9F\x98\x80"), 0u);
}

TEST(Utf8Test, EncodeDecodeRoundTrip) {
  std::mt19937 rng(42);
  std::uniform_int_distribution<uint32_t> dist(0, 0x10FFFF);
  std::vector<char32_t> cps;
  for (int i = 0; i < 5000; ++i) {
    char32_t cp = dist(rng);
    if (cp >= 0xD800 && cp <= 0xDFFF) continue;
    cps.push_back(cp);
  }
  cps.push_back(0x7F);
  cps.push_back(0x80);
  cps.push_back(0x7FF);
  cps.push_back(0x800);
  cps.push_back(0xFFFF);
  cps.push_back(0x10000);
  std::string encoded;
  for (char32_t cp : cps) AppendUtf8(cp, &encoded);
  EXPECT_EQ(FindInvalidUtf8(encoded), std::nullopt);
  EXPECT_EQ(DecodeUtf8(encoded), cps);
  EXPECT_EQ(Utf8Lossy(encoded), encoded);
}

TEST(NfcTest, ComposesAndReorders) {
  EXPECT_EQ(NfcNormalize("plain"), "plain");
  EXPECT_EQ(NfcNormalize("e\u0301"), "\u00e9");
  EXPECT_EQ(NfcNormalize("cafe\u0301s"), "caf\u00e9s");
  EXPECT_EQ(NfcNormalize("\u212b"), "\u00c5");  // Singleton Angstrom sign.
  EXPECT_EQ(NfcNormalize("A\u030a"), "\u00c5");
  EXPECT_EQ(NfcNormalize("\u1e9b\u0323"), "\u1e9b\u0323");    // Unicode's UAX #15 example.
  EXPECT_EQ(NfcNormalize("q\u0307\u0323"), "q\u0323\u0307");  // Reordered by class.
  EXPECT_EQ(NfcNormalize("a\u0301\u0316"), "\u00e1\u0316");   // Composes past a lower class.
  EXPECT_EQ(NfcNormalize("\u1100\u1161\u11a8"), "\uac01");    // Hangul L V T.
  EXPECT_EQ(NfcNormalize("\uac00\u11a8"), "\uac01");          // Hangul LV + T.
  EXPECT_EQ(NfcNormalize("\u0344"), "\u0308\u0301");          // Excluded from composition.
  EXPECT_EQ(NfcNormalize("\u0958"), "\u0915\u093c");          // Composition exclusion.
  EXPECT_EQ(NfcNormalize("\xF0\x9F\x98\x80"), "\xF0\x9F\x98\x80");
}

TEST(NfcTest, MatchesHuggingFaceUnicode9Tables) {
  // Hugging Face's NFC treats marks assigned after Unicode 9.0 as starters: U+1DF8 (ccc 228
  // in Unicode 14) blocks the composition of e + U+0301 there, and so it does here.
  EXPECT_EQ(NfcNormalize("e\u1df8\u0301"), "e\u1df8\u0301");
  EXPECT_EQ(NfcNormalize("x\u0301\U00010F50"), "x\u0301\U00010F50");
  EXPECT_EQ(CombiningClass(0x1DF8), 0);
  EXPECT_EQ(CombiningClass(0x0301), 230);
  EXPECT_EQ(CombiningClass(0x0316), 220);
  // U+11938 (Unicode 13) is neither decomposed nor composed.
  EXPECT_EQ(NfcNormalize("\U00011938"), "\U00011938");
  EXPECT_EQ(NfcNormalize("\U00011935\U00011930"), "\U00011935\U00011930");
}

}  // namespace
}  // namespace sieve::engine::unicode
