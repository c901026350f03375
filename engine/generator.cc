#include "engine/generator.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <random>

#include "absl/strings/str_cat.h"
#include "engine/kv_cache.h"
#include "engine/status_macros.h"
#include "engine/stop_checker.h"

namespace sieve::engine {
namespace {

// The state of one request while it runs.
struct Sequence {
  const GenerationRequest* request = nullptr;
  std::vector<int32_t> tokens;  // prompt followed by generated ids
  int32_t prompt_len = 0;
  int32_t num_cached = 0;       // tokens whose KV is in the cache
  std::unique_ptr<PageTable> pages;
  std::unique_ptr<StopChecker> stop;
  std::unique_ptr<IncrementalDecoder> decoder;
  TokenHistory history;
  SamplerRng rng{0};
  GenerationResult result;
  bool done = false;
};

}  // namespace

Generator::Generator(ModelRunner& runner, const Tokenizer& tokenizer)
    : runner_(runner), tokenizer_(tokenizer) {
  for (int64_t id : runner.config().eos_token_ids) eos_ids_.push_back(static_cast<int32_t>(id));
  for (int32_t id : tokenizer.eos_ids()) {
    if (std::find(eos_ids_.begin(), eos_ids_.end(), id) == eos_ids_.end()) eos_ids_.push_back(id);
  }
}

int32_t Generator::pages_in_use() const { return pages_in_use_; }

absl::StatusOr<std::vector<GenerationResult>> Generator::Generate(
    absl::Span<const GenerationRequest> requests, const TextCallback& on_text) {
  const ModelRunnerOptions& opt = runner_.options();
  const int32_t vocab = static_cast<int32_t>(runner_.config().vocab_size);
  const int64_t capacity = int64_t{opt.num_pages} * opt.page_size;
  PageAllocator allocator(opt.num_pages);
  std::vector<Sequence> seqs(requests.size());
  std::random_device entropy;
  for (size_t i = 0; i < requests.size(); ++i) {
    const GenerationRequest& r = requests[i];
    if (r.prompt.empty()) return absl::InvalidArgumentError(absl::StrCat("request ", i, ": empty prompt"));
    SIEVE_RETURN_IF_ERROR(r.sampling.Validate());
    SIEVE_RETURN_IF_ERROR(r.stop.Validate(vocab));
    for (int32_t id : r.prompt) {
      if (id < 0 || id >= vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat("request ", i, ": prompt token id ", id, " outside the vocabulary"));
      }
    }
    if (static_cast<int64_t>(r.prompt.size()) + r.stop.max_tokens > capacity) {
      return absl::InvalidArgumentError(absl::StrCat(
          "request ", i, ": prompt (", r.prompt.size(), ") + max_tokens (", r.stop.max_tokens,
          ") exceeds the KV cache capacity of ", capacity, " tokens"));
    }
    Sequence& s = seqs[i];
    s.request = &r;
    s.tokens = r.prompt;
    s.prompt_len = static_cast<int32_t>(r.prompt.size());
    s.pages = std::make_unique<PageTable>(opt.page_size);
    s.stop = std::make_unique<StopChecker>(r.stop, eos_ids_);
    s.decoder = std::make_unique<IncrementalDecoder>(tokenizer_, /*skip_special_tokens=*/true);
    s.history.AddPrompt(r.prompt);
    s.rng = SamplerRng(r.sampling.seed.has_value()
                           ? *r.sampling.seed
                           : (static_cast<uint64_t>(entropy()) << 32) ^ entropy());
  }

  // Frees every page on every exit path.
  struct Releaser {
    std::vector<Sequence>& seqs;
    PageAllocator& allocator;
    int32_t& in_use;
    ~Releaser() {
      for (Sequence& s : seqs) {
        if (s.pages) s.pages->Release(allocator);
      }
      in_use = allocator.num_used();
    }
  } releaser{seqs, allocator, pages_in_use_};

  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&start] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  std::vector<float> logits;
  std::vector<SequenceStep> step;
  std::vector<Sequence*> stepped;
  while (true) {
    step.clear();
    stepped.clear();
    int64_t budget = opt.max_step_tokens;
    for (Sequence& s : seqs) {
      if (s.done || budget == 0) continue;
      const int32_t pending = static_cast<int32_t>(s.tokens.size()) - s.num_cached;
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(pending, budget));
      SIEVE_RETURN_IF_ERROR(s.pages->Append(n, allocator).status());
      budget -= n;
      SequenceStep st;
      st.tokens = absl::MakeConstSpan(s.tokens).subspan(s.num_cached, n);
      st.num_cached = s.num_cached;
      st.pages = s.pages->pages();
      st.want_logits = (n == pending);
      step.push_back(st);
      stepped.push_back(&s);
    }
    if (step.empty()) break;
    pages_in_use_ = allocator.num_used();
    logits.clear();
    SIEVE_RETURN_IF_ERROR(runner_.Forward(step, logits));
    size_t row = 0;
    for (size_t k = 0; k < step.size(); ++k) {
      Sequence& s = *stepped[k];
      s.num_cached += static_cast<int32_t>(step[k].tokens.size());
      if (!step[k].want_logits) continue;
      absl::Span<float> row_logits = absl::MakeSpan(logits).subspan(row * vocab, vocab);
      ++row;
      SIEVE_ASSIGN_OR_RETURN(SampledToken tok,
                             SampleToken(row_logits, s.request->sampling, s.history, s.rng));
      s.tokens.push_back(tok.id);
      s.history.AddGenerated(tok.id);
      s.result.tokens.push_back(tok.id);
      s.result.total_s = elapsed();
      if (s.result.tokens.size() == 1) s.result.time_to_first_token_s = s.result.total_s;
      if (s.request->sampling.return_logprob) s.result.logprobs.push_back(tok.logprob);
      SIEVE_ASSIGN_OR_RETURN(std::string delta, s.decoder->Push(tok.id));
      StopChecker::Step out = s.stop->Push(tok.id, delta);
      if (out.finish != FinishReason::kNone) {
        // The decoder may hold the first bytes of a character the stream ended inside.
        out.emit += s.stop->Flush();
        if (out.finish == FinishReason::kLength) out.emit += s.decoder->Flush();
        s.result.finish = out.finish;
        s.done = true;
        s.pages->Release(allocator);
      }
      if (!out.emit.empty()) {
        s.result.text += out.emit;
        if (on_text) on_text(static_cast<size_t>(&s - seqs.data()), out.emit);
      }
    }
  }
  std::vector<GenerationResult> results;
  results.reserve(seqs.size());
  for (Sequence& s : seqs) results.push_back(std::move(s.result));
  return results;
}

}  // namespace sieve::engine
