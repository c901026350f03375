// Tokenizer speed on a long prompt: for each tokenizer.json given (default: those under
// tests/data/tokenizers and the embedded model's), builds a text of at least --tokens tokens
// from tests/data/tokenizers/corpus.json (its strings joined by newlines, repeated) and times
// Encode, Decode and streaming decode (IncrementalDecoder) over it; best and median of --runs.
//
//   build/bench/tokenizer_bench [--tokens=131072] [--runs=5] [NAME=PATH/tokenizer.json ...]
//
// Run from the source root (or set SIEVE_SOURCE_DIR). A tokenizer that fails to load is
// reported and skipped, so the same program measures an older tokenizer on the files it knows.
#include <algorithm>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace {

using sieve::engine::IncrementalDecoder;
using sieve::engine::Tokenizer;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

// This thread's CPU time in ms: on a shared machine it is far steadier than the wall clock.
double ThreadCpuMs() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

template <typename F>
std::pair<double, double> TimeMs(int runs, F f) {
  std::vector<double> ms;
  for (int r = 0; r < runs; ++r) {
    const double start = ThreadCpuMs();
    f();
    ms.push_back(ThreadCpuMs() - start);
  }
  std::sort(ms.begin(), ms.end());
  return {ms.front(), ms[ms.size() / 2]};
}

}  // namespace

int main(int argc, char** argv) {
  const char* env = std::getenv("SIEVE_SOURCE_DIR");
  const std::string root = env != nullptr ? std::string(env) + "/" : "";
  size_t target_tokens = 131072;
  int runs = 5;
  std::vector<std::pair<std::string, std::string>> files;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--tokens=", 0) == 0) {
      target_tokens = std::stoul(arg.substr(9));
    } else if (arg.rfind("--runs=", 0) == 0) {
      runs = std::max(1, std::stoi(arg.substr(7)));
    } else if (const size_t eq = arg.find('='); eq != std::string::npos) {
      files.emplace_back(arg.substr(0, eq), arg.substr(eq + 1));
    } else {
      std::fprintf(stderr, "usage: %s [--tokens=N] [--runs=N] [NAME=tokenizer.json ...]\n", argv[0]);
      return 2;
    }
  }
  const std::string data = root + "tests/data/tokenizers/";
  if (files.empty()) {
    files = {{"embedded (Llama-3 regex)", root + "models/embedded/tokenizer.json"},
             {"llama3_1_cut", data + "llama3_1_cut.tokenizer.json"},
             {"qwen3_cut", data + "qwen3_cut.tokenizer.json"},
             {"deepseek_v3_cut (PCRE2)", data + "deepseek_v3_cut.tokenizer.json"},
             {"mistral7b (SentencePiece)", data + "mistral7b.tokenizer.json"},
             {"gemma3_cut", data + "gemma3_cut.tokenizer.json"}};
  }
  const nlohmann::json corpus = nlohmann::json::parse(ReadFile(data + "corpus.json"), nullptr, false);
  if (!corpus.is_array()) {
    std::fprintf(stderr, "cannot read %scorpus.json\n", data.c_str());
    return 1;
  }
  std::printf("%-28s %8s %9s %12s %12s %12s %12s\n", "tokenizer", "tokens", "bytes",
              "encode ms", "Mtok/s", "decode ms", "stream ms");
  for (const auto& [name, path] : files) {
    auto tokenizer = Tokenizer::FromJson(ReadFile(path), "");
    if (!tokenizer.ok()) {
      std::printf("%-28s does not load: %s\n", name.c_str(),
                  std::string(tokenizer.status().message()).substr(0, 120).c_str());
      continue;
    }
    const Tokenizer& tok = **tokenizer;
    // The text: corpus strings joined by newlines until the target token count is reached.
    std::string text;
    size_t tokens = 0;
    for (size_t i = 0; tokens < target_tokens; i = (i + 1) % corpus.size()) {
      const std::string piece = corpus[i].get<std::string>() + "\n";
      text += piece;
      tokens += tok.Encode(piece, false).value_or(std::vector<int32_t>()).size();
    }
    std::vector<int32_t> ids;
    const auto [encode_best, encode_median] = TimeMs(runs, [&] {
      ids = tok.Encode(text, false).value_or(std::vector<int32_t>());
    });
    std::string decoded;
    const auto [decode_best, decode_median] = TimeMs(runs, [&] {
      decoded = tok.Decode(ids, false).value_or(std::string());
    });
    const auto [stream_best, stream_median] = TimeMs(runs, [&] {
      IncrementalDecoder stream(tok, false);
      std::string out;
      for (int32_t id : ids) out += stream.Push(id).value_or(std::string());
      out += stream.Flush();
      decoded = std::move(out);
    });
    std::printf("%-28s %8zu %9zu %5.1f (%5.1f) %12.2f %5.1f (%5.1f) %5.1f (%5.1f)\n", name.c_str(),
                ids.size(), text.size(), encode_best, encode_median,
                ids.size() / encode_best / 1000.0, decode_best, decode_median, stream_best,
                stream_median);
  }
  std::printf("times: thread CPU time, best (median) of %d runs, one thread\n", runs);
  return 0;
}
