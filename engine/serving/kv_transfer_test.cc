// KV transfers between two engines in one process, as a prefill daemon and a decode daemon do
// them over the network: the prefill engine exports a prompt's pages (RequestSpec::
// export_prompt_kv), the decode engine imports them (BeginKvImport, WriteKvPages,
// CommitKvImport) and then runs the request as a prefix-cache hit. Its greedy and seeded output
// must equal a fresh engine's; with corrupted page contents it must not (so the imported KV is
// what the decode engine attends to); aborted imports and ended exports leave no page held. With
// a sparse decode method the import rebuilds the pages' side data, so the decode engine selects
// as one that prefilled the prompt itself.
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <utility>

#include "engine/serving/engine.h"
#include "engine/testing/recording_sink.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

constexpr absl::Duration kWait = absl::Seconds(60);

std::string ModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

EngineConfig Config() {
  EngineConfig c;
  c.model.directory = ModelDir();
  c.model.name = "embedded";
  c.model.cpu_threads = 1;
  c.kv_cache.page_size_tokens = 16;
  c.kv_cache.num_pages = 128;
  c.scheduler.max_batch_tokens = 256;
  c.scheduler.prefill_chunk_tokens = 64;
  return c;
}

// Config() decoding with `method` (quest, double_sparsity) under a budget of `budget` tokens:
// sparse from the first decode token, layer 0 dense.
EngineConfig SparseDecodeConfig(const std::string& method, int32_t budget) {
  EngineConfig c = Config();
  c.attention.decode.method = method;
  c.attention.decode.sparse_min_tokens = 0;
  c.attention.decode.dense_layers = 1;
  c.attention.decode.token_budget = budget;
  if (method == "double_sparsity") c.attention.decode.double_sparsity.channels = 8;
  return c;
}

std::unique_ptr<Engine> Make(const EngineConfig& config = Config()) {
  auto e = Engine::Create(config, nullptr);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

// The longest prompt of the embedded model's golden file, cut to `n` tokens.
std::vector<int32_t> Prompt(size_t n) {
  std::ifstream in(ModelDir() + "/golden.json");
  std::stringstream ss;
  ss << in.rdbuf();
  const nlohmann::json golden = nlohmann::json::parse(ss.str(), nullptr, false);
  EXPECT_FALSE(golden.is_discarded());
  std::vector<int32_t> ids = golden["logits"].back()["ids"].get<std::vector<int32_t>>();
  EXPECT_GE(ids.size(), n);
  ids.resize(std::min(ids.size(), n));
  return ids;
}

RequestSpec Spec(const std::vector<int32_t>& prompt, int32_t max_tokens, bool seeded,
                 std::shared_ptr<testing::RecordingSink> sink) {
  RequestSpec s;
  s.prompt = prompt;
  s.sampling.temperature = seeded ? 0.9f : 0.0f;
  if (seeded) s.sampling.seed = 1234;
  s.stop.max_tokens = max_tokens;
  s.stop.ignore_eos = true;
  s.sink = std::move(sink);
  return s;
}

// Runs one request to the end; returns its sink.
std::shared_ptr<testing::RecordingSink> RunToEnd(Engine& e, RequestSpec spec) {
  auto sink = std::static_pointer_cast<testing::RecordingSink>(spec.sink);
  auto id = e.Submit(std::move(spec));
  EXPECT_TRUE(id.ok()) << id.status();
  EXPECT_TRUE(sink->WaitFinished(kWait));
  return sink;
}

// Pages held by requests, imports or exports (used pages the prefix cache alone does not hold),
// once the engine has published a load with none queued or running.
int32_t HeldPages(const Engine& e) {
  EngineLoad l;
  const absl::Time deadline = absl::Now() + kWait;
  do {
    l = e.load();
    if (l.running_prefill + l.running_decode + l.waiting == 0) break;
    absl::SleepFor(absl::Milliseconds(5));
  } while (absl::Now() < deadline);
  return l.kv_pages_used - l.kv_pages_cached;
}

// Waits until `e` holds no page (the queued import/export ops ran and a load was published).
bool NoPagesHeld(const Engine& e) {
  const absl::Time deadline = absl::Now() + kWait;
  while (HeldPages(e) != 0) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

// The prefill side: runs `prompt` for one token and returns the export of its pages, with their
// KV copied into `bytes`.
KvExport Prefill(Engine& e, const std::vector<int32_t>& prompt, std::vector<uint8_t>& bytes) {
  auto sink = std::make_shared<testing::RecordingSink>();
  RequestSpec spec = Spec(prompt, 1, /*seeded=*/false, sink);
  spec.export_prompt_kv = true;
  RunToEnd(e, std::move(spec));
  const RequestOutcome outcome = sink->outcome();
  EXPECT_EQ(outcome.finish, FinishReason::kLength);
  EXPECT_TRUE(outcome.kv_export.has_value());
  if (!outcome.kv_export.has_value()) return {};
  const KvExport& exp = *outcome.kv_export;
  bytes.assign(exp.pages.size() * e.model_info().kv_page_bytes, 0);
  EXPECT_TRUE(e.ReadKvPages(exp.pages, absl::MakeSpan(bytes)).ok());
  return exp;
}

// The decode side: imports the first `tokens` tokens' pages from `bytes` (all of them) and
// commits. Returns the tokens that were cached already.
int32_t Import(Engine& e, const std::vector<int32_t>& prompt, int32_t tokens,
               const std::vector<uint8_t>& bytes) {
  absl::StatusOr<KvImport> imp =
      e.BeginKvImport(std::vector<int32_t>(prompt.begin(), prompt.begin() + tokens));
  EXPECT_TRUE(imp.ok()) << imp.status();
  if (!imp.ok()) return -1;
  const int64_t page_bytes = e.model_info().kv_page_bytes;
  const int32_t first = imp->cached_tokens / e.model_info().page_size;
  absl::Span<const uint8_t> rest = absl::MakeConstSpan(bytes).subspan(first * page_bytes);
  EXPECT_EQ(rest.size(), imp->pages_to_fill.size() * page_bytes);
  EXPECT_TRUE(e.WriteKvPages(imp->pages_to_fill, rest).ok());
  EXPECT_TRUE(e.CommitKvImport(imp->id).ok());
  return imp->cached_tokens;
}

TEST(KvTransferTest, ImportedPromptDecodesAsAFreshEngineDoes) {
  const std::vector<int32_t> prompt = Prompt(301);
  auto prefill = Make(), decode = Make(), reference = Make();
  ASSERT_TRUE(prefill && decode && reference);
  std::vector<uint8_t> bytes;
  const KvExport exp = Prefill(*prefill, prompt, bytes);
  EXPECT_EQ(exp.num_tokens, 288);  // 18 full pages of 301 tokens
  EXPECT_EQ(exp.pages.size(), 18u);
  EXPECT_EQ(HeldPages(*prefill), 18);  // the export holds them
  EXPECT_EQ(bytes.size(), 18u * 2 * 4 * 16 * 2 * 64 * sizeof(float));  // layers 4, kv heads 2

  // The decode engine's prefix lookup can use (301 - 1) / 16 = 18 pages: all of them.
  EXPECT_EQ(Import(*decode, prompt, 288, bytes), 0);
  for (const bool seeded : {false, true}) {
    auto want = RunToEnd(*reference, Spec(prompt, 24, seeded, std::make_shared<testing::RecordingSink>()));
    auto got = RunToEnd(*decode, Spec(prompt, 24, seeded, std::make_shared<testing::RecordingSink>()));
    EXPECT_EQ(got->outcome().cached_tokens, 288) << "seeded " << seeded;
    EXPECT_EQ(got->tokens(), want->tokens()) << "seeded " << seeded;
    EXPECT_EQ(got->tokens().size(), 24u);
  }
  ASSERT_TRUE(prefill->EndKvExport(exp.id).ok());
  EXPECT_TRUE(NoPagesHeld(*prefill));
  EXPECT_TRUE(NoPagesHeld(*decode));
}

// A decode engine with a sparse decode method selects from side data (Quest page bounds,
// DoubleSparsity labels) that no step wrote for imported pages: the import rebuilds it from the
// imported keys. Its output must equal an engine of the same method that prefilled the prompt
// itself, under a budget small enough that the selection changes the output (checked against
// dense), and equal dense under a budget covering the context. The prefill engine decodes dense:
// it keeps no side data, so none could travel with the pages.
TEST(KvTransferTest, ImportedPromptDecodesSparseAsALocalPrefillDoes) {
  const std::vector<int32_t> prompt = Prompt(301);
  auto prefill = Make(), dense = Make();
  ASSERT_TRUE(prefill && dense);
  std::vector<uint8_t> bytes;
  const KvExport exp = Prefill(*prefill, prompt, bytes);
  ASSERT_EQ(exp.num_tokens, 288);
  auto dense_out = RunToEnd(*dense, Spec(prompt, 24, false, std::make_shared<testing::RecordingSink>()));
  ASSERT_EQ(dense_out->tokens().size(), 24u);
  // Budgets: two pages (Quest) and 48 of ~300 tokens (DoubleSparsity) change the greedy tokens;
  // 4096 covers the whole context.
  for (const auto& [method, small] : {std::pair<std::string, int32_t>{"quest", 32},
                                      std::pair<std::string, int32_t>{"double_sparsity", 48}}) {
    for (const int32_t budget : {small, 4096}) {
      SCOPED_TRACE(method + " budget " + std::to_string(budget));
      auto decode = Make(SparseDecodeConfig(method, budget));
      auto local = Make(SparseDecodeConfig(method, budget));
      ASSERT_TRUE(decode && local);
      EXPECT_EQ(Import(*decode, prompt, 288, bytes), 0);
      for (const bool seeded : {false, true}) {
        auto want = RunToEnd(*local, Spec(prompt, 24, seeded, std::make_shared<testing::RecordingSink>()));
        auto got = RunToEnd(*decode, Spec(prompt, 24, seeded, std::make_shared<testing::RecordingSink>()));
        EXPECT_EQ(got->outcome().cached_tokens, 288) << "seeded " << seeded;
        EXPECT_EQ(got->tokens(), want->tokens()) << "seeded " << seeded;
        ASSERT_EQ(got->tokens().size(), 24u);
        if (seeded) continue;
        if (budget == small) {
          EXPECT_NE(got->tokens(), dense_out->tokens()) << "the budget does not select";
        } else {
          EXPECT_EQ(got->tokens(), dense_out->tokens());
        }
      }
      EXPECT_TRUE(NoPagesHeld(*decode));
    }
  }
  ASSERT_TRUE(prefill->EndKvExport(exp.id).ok());
  EXPECT_TRUE(NoPagesHeld(*prefill));
}

TEST(KvTransferTest, CorruptedPagesChangeTheOutput) {
  // The same import with the bytes perturbed: if the decode engine did not attend to the
  // imported KV, its output could not change.
  const std::vector<int32_t> prompt = Prompt(200);
  auto prefill = Make(), decode = Make(), reference = Make();
  ASSERT_TRUE(prefill && decode && reference);
  std::vector<uint8_t> bytes;
  const KvExport exp = Prefill(*prefill, prompt, bytes);
  ASSERT_EQ(exp.num_tokens, 192);
  std::vector<float> values(bytes.size() / sizeof(float));
  std::memcpy(values.data(), bytes.data(), bytes.size());
  std::mt19937 rng(7);
  std::normal_distribution<float> noise(0.0f, 4.0f);
  for (float& v : values) v += noise(rng);
  std::memcpy(bytes.data(), values.data(), bytes.size());
  EXPECT_EQ(Import(*decode, prompt, 192, bytes), 0);
  auto want = RunToEnd(*reference, Spec(prompt, 24, false, std::make_shared<testing::RecordingSink>()));
  auto got = RunToEnd(*decode, Spec(prompt, 24, false, std::make_shared<testing::RecordingSink>()));
  EXPECT_EQ(got->outcome().cached_tokens, 192);
  EXPECT_NE(got->tokens(), want->tokens());
  ASSERT_TRUE(prefill->EndKvExport(exp.id).ok());
  EXPECT_TRUE(NoPagesHeld(*prefill));
}

TEST(KvTransferTest, ImportsReuseCachedPagesAndAbortsGiveThePagesBack) {
  const std::vector<int32_t> prompt = Prompt(160);
  auto e = Make();
  ASSERT_NE(e, nullptr);
  // Nothing cached yet: ten pages to fill, held until the import ends.
  absl::StatusOr<KvImport> imp =
      e->BeginKvImport(std::vector<int32_t>(prompt.begin(), prompt.begin() + 160));
  ASSERT_TRUE(imp.ok()) << imp.status();
  EXPECT_EQ(imp->pages_to_fill.size(), 10u);
  EXPECT_EQ(imp->cached_tokens, 0);
  ASSERT_TRUE(e->AbortKvImport(imp->id).ok());
  EXPECT_TRUE(NoPagesHeld(*e));
  EXPECT_EQ(e->load().kv_pages_used, 0);

  // After a local run the leading pages are cached: an import fills only the rest.
  RunToEnd(*e, Spec(std::vector<int32_t>(prompt.begin(), prompt.begin() + 65), 1, false,
               std::make_shared<testing::RecordingSink>()));
  imp = e->BeginKvImport(std::vector<int32_t>(prompt.begin(), prompt.begin() + 160));
  ASSERT_TRUE(imp.ok()) << imp.status();
  EXPECT_EQ(imp->cached_tokens, 64);
  EXPECT_EQ(imp->pages_to_fill.size(), 6u);
  ASSERT_TRUE(e->AbortKvImport(imp->id).ok());
  EXPECT_TRUE(NoPagesHeld(*e));

  // Page transfers check their sizes and page ids.
  std::vector<uint8_t> one(e->model_info().kv_page_bytes);
  const std::vector<int32_t> bad_page = {e->model_info().kv_pages};
  EXPECT_EQ(e->ReadKvPages(bad_page, absl::MakeSpan(one)).code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<int32_t> page0 = {0};
  EXPECT_EQ(e->WriteKvPages(page0, absl::MakeConstSpan(one).first(8)).code(),
            absl::StatusCode::kInvalidArgument);
  // A prompt shorter than a page has nothing to export.
  auto sink = std::make_shared<testing::RecordingSink>();
  RequestSpec short_spec = Spec(std::vector<int32_t>(prompt.begin(), prompt.begin() + 9), 1, false,
                                sink);
  short_spec.export_prompt_kv = true;
  RunToEnd(*e, std::move(short_spec));
  EXPECT_FALSE(sink->outcome().kv_export.has_value());
  EXPECT_TRUE(NoPagesHeld(*e));
}

}  // namespace
}  // namespace sieve::engine
