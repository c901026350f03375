#include "engine/serving/stop_checker.h"

#include <cstdint>
#include <string>
#include <vector>

#include "engine/sampling/sampling.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

constexpr int32_t kEos = 2;
constexpr int32_t kText = 100;  // Any ordinary token id.

StopCriteria WithStops(std::vector<std::string> stops, int32_t max_tokens = 1000) {
  StopCriteria c;
  c.max_tokens = max_tokens;
  c.stop_strings = std::move(stops);
  return c;
}

// Pushes each delta as an ordinary token and returns the emits; stops at a finish.
struct PushResult {
  std::vector<std::string> emits;
  FinishReason finish = FinishReason::kNone;
  std::string Joined() const {
    std::string out;
    for (const std::string& e : emits) out += e;
    return out;
  }
};

PushResult PushAll(StopChecker& checker, const std::vector<std::string>& deltas) {
  PushResult run;
  for (const std::string& d : deltas) {
    StopChecker::Step step = checker.Push(kText, d);
    run.emits.push_back(step.emit);
    run.finish = step.finish;
    if (step.finish != FinishReason::kNone) break;
  }
  return run;
}

TEST(StopCheckerTest, PlainTextIsEmittedAtOnce) {
  StopChecker checker(StopCriteria(), {kEos});
  PushResult run = PushAll(checker, {"Hello", ", ", "world"});
  EXPECT_EQ(run.emits, (std::vector<std::string>{"Hello", ", ", "world"}));
  EXPECT_EQ(run.finish, FinishReason::kNone);
  EXPECT_EQ(checker.num_tokens(), 3);
  EXPECT_EQ(checker.Flush(), "");
}

TEST(StopCheckerTest, StopStringAcrossThreeDeltas) {
  StopChecker checker(WithStops({"STOP"}), {kEos});
  PushResult run = PushAll(checker, {"hello ST", "O", "P and more"});
  EXPECT_EQ(run.emits, (std::vector<std::string>{"hello ", "", ""}));
  EXPECT_EQ(run.finish, FinishReason::kStop);
  EXPECT_EQ(checker.finish_reason(), FinishReason::kStop);
  EXPECT_EQ(checker.Flush(), "");  // The stop string and what followed it are dropped.
}

TEST(StopCheckerTest, HeldPrefixIsReleasedWhenItDiverges) {
  StopChecker checker(WithStops({"abc"}), {kEos});
  EXPECT_EQ(checker.Push(kText, "xa").emit, "x");
  EXPECT_EQ(checker.held_bytes(), 1u);
  EXPECT_EQ(checker.Push(kText, "b").emit, "");
  EXPECT_EQ(checker.held_bytes(), 2u);
  StopChecker::Step step = checker.Push(kText, "d");
  EXPECT_EQ(step.emit, "abd");
  EXPECT_EQ(step.finish, FinishReason::kNone);
  // After a divergence, a shorter tail that may begin the stop string again stays held.
  step = checker.Push(kText, "aba");
  EXPECT_EQ(step.emit, "ab");
  EXPECT_EQ(checker.Flush(), "a");
}

TEST(StopCheckerTest, OverlappingCandidates) {
  {
    StopChecker checker(WithStops({"abc", "ab"}), {kEos});
    PushResult run = PushAll(checker, {"xa", "bc"});
    EXPECT_EQ(run.Joined(), "x");
    EXPECT_EQ(run.finish, FinishReason::kStop);
  }
  {
    // "ab" is complete as soon as "b" arrives, before "abc" could be.
    StopChecker checker(WithStops({"abc", "ab"}), {kEos});
    PushResult run = PushAll(checker, {"xab"});
    EXPECT_EQ(run.Joined(), "x");
    EXPECT_EQ(run.finish, FinishReason::kStop);
  }
  {
    // The string completed first wins, however the text is split: "bc" ends before "abcd".
    for (const std::vector<std::string>& deltas :
         {std::vector<std::string>{"abcd"}, std::vector<std::string>{"a", "b", "c", "d"},
          std::vector<std::string>{"ab", "cd"}}) {
      StopChecker checker(WithStops({"abcd", "bc"}), {kEos});
      PushResult run = PushAll(checker, deltas);
      EXPECT_EQ(run.Joined(), "a");
      EXPECT_EQ(run.finish, FinishReason::kStop);
    }
  }
  {
    // Holding back uses the longest candidate prefix over all strings.
    StopChecker checker(WithStops({"xyz", "abcd"}), {kEos});
    EXPECT_EQ(checker.Push(kText, "..abc").emit, "..");
    EXPECT_EQ(checker.Push(kText, "x").emit, "abc");
    EXPECT_EQ(checker.held_bytes(), 1u);
  }
}

TEST(StopCheckerTest, StopStringAtTheVeryStart) {
  StopChecker checker(WithStops({"###"}), {kEos});
  StopChecker::Step step = checker.Push(kText, "### heading");
  EXPECT_EQ(step.emit, "");
  EXPECT_EQ(step.finish, FinishReason::kStop);
  EXPECT_EQ(checker.num_tokens(), 1);
}

TEST(StopCheckerTest, EarliestOccurrenceInOneDelta) {
  StopChecker checker(WithStops({"C", "B"}), {kEos});
  StopChecker::Step step = checker.Push(kText, "xxBxxC");
  EXPECT_EQ(step.emit, "xx");
  EXPECT_EQ(step.finish, FinishReason::kStop);
}

TEST(StopCheckerTest, EosFinishesWithoutItsTextAndFlushesHeldText) {
  StopChecker checker(WithStops({"abc"}), {7, kEos});
  EXPECT_EQ(checker.Push(kText, "xa").emit, "x");
  StopChecker::Step step = checker.Push(kEos, "</s>");
  EXPECT_EQ(step.emit, "a");
  EXPECT_EQ(step.finish, FinishReason::kEos);
  EXPECT_EQ(checker.num_tokens(), 2);
  // Pushing after the finish changes nothing.
  step = checker.Push(kText, "more");
  EXPECT_EQ(step.emit, "");
  EXPECT_EQ(step.finish, FinishReason::kEos);
  EXPECT_EQ(checker.num_tokens(), 2);
  EXPECT_EQ(checker.Flush(), "");
}

TEST(StopCheckerTest, IgnoreEosTreatsEosAsText) {
  StopCriteria c;
  c.ignore_eos = true;
  StopChecker checker(c, {kEos});
  StopChecker::Step step = checker.Push(kEos, "</s>");
  EXPECT_EQ(step.emit, "</s>");
  EXPECT_EQ(step.finish, FinishReason::kNone);
}

TEST(StopCheckerTest, IgnoreEosKeepsStopTokenIds) {
  StopCriteria c;
  c.ignore_eos = true;
  c.stop_token_ids = {kEos};
  StopChecker checker(c, {kEos});
  EXPECT_EQ(checker.Push(kEos, "</s>").finish, FinishReason::kStop);
}

TEST(StopCheckerTest, StopTokenIdFinishesWithoutItsText) {
  StopCriteria c = WithStops({"zz"});
  c.stop_token_ids = {42};
  StopChecker checker(c, {kEos});
  EXPECT_EQ(checker.Push(kText, "ok z").emit, "ok ");
  StopChecker::Step step = checker.Push(42, "<|im_end|>");
  EXPECT_EQ(step.emit, "z");
  EXPECT_EQ(step.finish, FinishReason::kStop);
}

TEST(StopCheckerTest, MaxTokensEmitsLastTokenAndHeldText) {
  StopChecker checker(WithStops({"abc"}, /*max_tokens=*/3), {kEos});
  EXPECT_EQ(checker.Push(kText, "1").finish, FinishReason::kNone);
  EXPECT_EQ(checker.Push(kText, "2a").emit, "2");
  StopChecker::Step step = checker.Push(kText, "b");
  EXPECT_EQ(step.emit, "ab");
  EXPECT_EQ(step.finish, FinishReason::kLength);
  EXPECT_EQ(checker.num_tokens(), 3);
}

TEST(StopCheckerTest, StopStringOnTheLastAllowedTokenIsAStop) {
  StopChecker checker(WithStops({"abc"}, /*max_tokens=*/2), {kEos});
  EXPECT_EQ(checker.Push(kText, "ab").emit, "");
  StopChecker::Step step = checker.Push(kText, "c!");
  EXPECT_EQ(step.emit, "");
  EXPECT_EQ(step.finish, FinishReason::kStop);
}

TEST(StopCheckerTest, MaxTokensOneAndEosBeatsLength) {
  StopChecker a(WithStops({}, /*max_tokens=*/1), {kEos});
  StopChecker::Step step = a.Push(kText, "x");
  EXPECT_EQ(step.emit, "x");
  EXPECT_EQ(step.finish, FinishReason::kLength);
  StopChecker b(WithStops({}, /*max_tokens=*/1), {kEos});
  EXPECT_EQ(b.Push(kEos, "").finish, FinishReason::kEos);
}

TEST(StopCheckerTest, MultiByteUtf8Deltas) {
  {
    StopChecker checker(WithStops({"日本"}), {kEos});
    EXPECT_EQ(checker.Push(kText, "今日").emit, "今");  // "日" may begin "日本".
    EXPECT_EQ(checker.Push(kText, "は").emit, "日は");
  }
  {
    StopChecker checker(WithStops({"é!"}), {kEos});
    PushResult run = PushAll(checker, {"caf", "\xC3\xA9", "!", "tail"});
    EXPECT_EQ(run.emits, (std::vector<std::string>{"caf", "", ""}));
    EXPECT_EQ(run.finish, FinishReason::kStop);
  }
  {
    // A stop string that shares a lead byte with the text never splits a character.
    StopChecker checker(WithStops({"\xC3\xA8"}), {kEos});  // "è"
    EXPECT_EQ(checker.Push(kText, "\xC3\xA9").emit, "\xC3\xA9");  // "é" is released whole.
    EXPECT_EQ(checker.Push(kText, "🙂\xC3").emit, "🙂");  // Held: a bare lead byte.
  }
}

TEST(StopCheckerTest, EmptyStopStringsAreIgnored) {
  StopChecker checker(WithStops({"", "x"}), {kEos});
  EXPECT_EQ(checker.Push(kText, "abc").emit, "abc");
  EXPECT_EQ(checker.Push(kText, "x").finish, FinishReason::kStop);
}

TEST(StopCheckerTest, FlushReturnsHeldTextOnce) {
  StopChecker checker(WithStops({"</answer>"}), {kEos});
  EXPECT_EQ(checker.Push(kText, "42</ans").emit, "42");
  EXPECT_EQ(checker.Flush(), "</ans");
  EXPECT_EQ(checker.Flush(), "");
}

// Reference: the text before the first stop string to be completed (earliest end, then earliest
// start), or all of it.
std::string ReferenceOutput(const std::string& text, const std::vector<std::string>& stops,
                            bool* stopped) {
  for (size_t end = 1; end <= text.size(); ++end) {
    size_t best = std::string::npos;
    for (const std::string& s : stops) {
      if (s.size() <= end && text.compare(end - s.size(), s.size(), s) == 0) {
        best = std::min(best, end - s.size());
      }
    }
    if (best != std::string::npos) {
      *stopped = true;
      return text.substr(0, best);
    }
  }
  *stopped = false;
  return text;
}

TEST(StopCheckerTest, RandomSplitsMatchReference) {
  const std::vector<std::string> stops = {"ab", "bca", "cc", "abcab"};
  SamplerRng rng(2024);
  int stopped_runs = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::string text;
    const int len = 1 + static_cast<int>(rng.NextUniform() * 12);
    for (int i = 0; i < len; ++i) text += "abcd"[static_cast<int>(rng.NextUniform() * 4)];
    std::vector<std::string> deltas;
    for (size_t i = 0; i < text.size();) {
      const size_t n = static_cast<size_t>(rng.NextUniform() * 4);  // Empty deltas too.
      deltas.push_back(text.substr(i, n));
      i += n;
    }
    StopChecker checker(WithStops(stops), {kEos});
    PushResult run = PushAll(checker, deltas);
    std::string got = run.Joined();
    if (run.finish == FinishReason::kNone) got += checker.Flush();
    bool stopped = false;
    ASSERT_EQ(got, ReferenceOutput(text, stops, &stopped)) << "text " << text;
    ASSERT_EQ(run.finish == FinishReason::kStop, stopped) << "text " << text;
    stopped_runs += stopped;
  }
  EXPECT_GT(stopped_runs, 1000);
  EXPECT_LT(stopped_runs, 3000);
}

}  // namespace
}  // namespace sieve::engine
