// `config_docs`: writes the configuration's generated documentation from the key table
// (server/config_docs.h) into a checkout: configs/default.yaml (the defaults as `sieved
// --print-config` prints them) and the key reference between the markers of docs/config.md.
//
//   config_docs REPO_ROOT          rewrite both files
//   config_docs --check REPO_ROOT  exit 1 (naming the file) if either differs from the table
//
// scripts/gen-config-docs.sh builds and runs it; server/config_test.cc makes the same check.
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <string_view>

#include "server/config.h"
#include "server/config_docs.h"

namespace sieve::server {
namespace {

bool Read(const std::string& path, std::string& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream s;
  s << in.rdbuf();
  out = s.str();
  return true;
}

// Checks or rewrites `path` to hold `want`; returns whether it (now) does.
bool Sync(const std::string& path, const std::string& want, bool check) {
  std::string have;
  if (Read(path, have) && have == want) return true;
  if (check) {
    std::cerr << "config_docs: " << path << " differs from the key table; run "
              << "scripts/gen-config-docs.sh\n";
    return false;
  }
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << want;
  if (!out) {
    std::cerr << "config_docs: cannot write " << path << "\n";
    return false;
  }
  std::cout << "wrote " << path << "\n";
  return true;
}

int Run(int argc, char** argv) {
  bool check = false;
  std::string root;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--check") {
      check = true;
    } else if (root.empty() && !arg.starts_with("-")) {
      root = arg;
    } else {
      root.clear();
      break;
    }
  }
  if (root.empty()) {
    std::cerr << "usage: config_docs [--check] REPO_ROOT\n";
    return 2;
  }
  const std::string doc_path = root + "/docs/config.md";
  std::string doc;
  if (!Read(doc_path, doc)) {
    std::cerr << "config_docs: cannot read " << doc_path << "\n";
    return 1;
  }
  absl::StatusOr<std::string> new_doc = ReplaceGeneratedSection(doc, FormatConfigMarkdown());
  if (!new_doc.ok()) {
    std::cerr << "config_docs: " << doc_path << ": " << new_doc.status().message() << "\n";
    return 1;
  }
  bool ok = Sync(root + "/configs/default.yaml", ConfigToYaml(ServerConfig()), check);
  ok = Sync(doc_path, *new_doc, check) && ok;
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace sieve::server

int main(int argc, char** argv) { return sieve::server::Run(argc, argv); }
