#include "engine/model/weight_store.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

// The Debian Abseil has its own string_view type, which StrCat and the hash maps expect.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr char kIndexFile[] = "model.safetensors.index.json";
constexpr char kSingleFile[] = "model.safetensors";

bool IsRegularFile(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}

absl::StatusOr<std::string> ReadWholeFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read '", p.string(), "'"));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) {
    return absl::DataLossError(absl::StrCat("error while reading '", p.string(), "'"));
  }
  return std::move(ss).str();
}

// A shard name from the index must stay inside the model directory.
absl::Status CheckShardName(const std::string& tensor, const std::string& shard,
                            const std::string& index_path) {
  if (shard.empty() || shard.front() == '/' || absl::StrContains(shard, "..")) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", index_path, "': field 'weight_map': tensor '", tensor, "' names shard '",
                     shard, "', which is not a file name inside the directory"));
  }
  return absl::OkStatus();
}

// Reads "weight_map" (tensor -> shard file) from the index. Duplicate keys in the JSON keep the
// last value (nlohmann behaviour).
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ReadWeightMap(
    const fs::path& index_path) {
  const std::string where = index_path.string();
  SIEVE_ASSIGN_OR_RETURN(std::string text, ReadWholeFile(index_path));
  Json json;
  try {
    json = Json::parse(text);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("'", where, "' is not valid JSON: ", e.what()));
  }
  if (!json.is_object() || !json.contains("weight_map")) {
    return absl::InvalidArgumentError(absl::StrCat("'", where, "': missing field 'weight_map'"));
  }
  const Json& map = json["weight_map"];
  if (!map.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", where, "': field 'weight_map' must be an object, got ", map.type_name()));
  }
  std::vector<std::pair<std::string, std::string>> out;
  for (auto it = map.begin(); it != map.end(); ++it) {
    if (!it.value().is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", where, "': field 'weight_map': value for tensor '", it.key(),
                       "' must be a string, got ", it.value().type_name()));
    }
    std::string shard = it.value().get<std::string>();
    SIEVE_RETURN_IF_ERROR(CheckShardName(it.key(), shard, where));
    out.emplace_back(it.key(), std::move(shard));
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<WeightStore>> WeightStore::Open(const std::string& model_dir) {
  std::error_code ec;
  if (!fs::is_directory(model_dir, ec)) {
    return absl::NotFoundError(
        absl::StrCat("model directory '", model_dir, "' does not exist or is not a directory"));
  }
  std::unique_ptr<WeightStore> store(new WeightStore(model_dir));
  const fs::path dir(model_dir);

  if (IsRegularFile(dir / kIndexFile)) {
    const fs::path index_path = dir / kIndexFile;
    SIEVE_ASSIGN_OR_RETURN(auto weight_map, ReadWeightMap(index_path));
    std::set<std::string> shards;  // Sorted, each opened once.
    for (const auto& [tensor, shard] : weight_map) shards.insert(shard);
    absl::flat_hash_map<std::string, const SafetensorsFile*> opened;
    for (const std::string& shard : shards) {
      if (!IsRegularFile(dir / shard)) {
        return absl::NotFoundError(absl::StrCat("'", index_path.string(), "' names shard '", shard,
                                                "', which does not exist in '", model_dir, "'"));
      }
      SIEVE_ASSIGN_OR_RETURN(opened[shard], store->AddFile(shard));
    }
    for (const auto& [tensor, shard] : weight_map) {
      if (opened[shard]->Find(tensor) == nullptr) {
        return absl::NotFoundError(absl::StrCat("tensor '", tensor, "' is listed in '",
                                                index_path.string(), "' under shard '", shard,
                                                "' but that shard does not contain it"));
      }
    }
    return store;
  }

  if (IsRegularFile(dir / kSingleFile)) {
    SIEVE_RETURN_IF_ERROR(store->AddFile(kSingleFile).status());
    return store;
  }

  std::vector<std::string> names;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (absl::EndsWith(name, ".safetensors") && IsRegularFile(it->path())) names.push_back(name);
  }
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot list model directory '", model_dir, "': ", ec.message()));
  }
  if (names.empty()) {
    return absl::NotFoundError(absl::StrCat("no *.safetensors in '", model_dir, "'"));
  }
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    SIEVE_RETURN_IF_ERROR(store->AddFile(name).status());
  }
  return store;
}

absl::StatusOr<const SafetensorsFile*> WeightStore::AddFile(const std::string& file_name) {
  SIEVE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file,
                         SafetensorsFile::Open((fs::path(dir_) / file_name).string()));
  for (const TensorView& view : file->tensors()) {
    auto [it, inserted] = by_name_.emplace(view.name, Entry{&view, file.get()});
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", view.name, "' appears in both '",
                                                     it->second.file->path(), "' and '",
                                                     file->path(), "'"));
    }
  }
  files_.push_back(std::move(file));
  return files_.back().get();
}

const TensorView* WeightStore::Find(std::string_view name) const {
  auto it = by_name_.find(Av(name));
  return it == by_name_.end() ? nullptr : it->second.view;
}

absl::StatusOr<TensorView> WeightStore::Get(std::string_view name) const {
  const TensorView* view = Find(name);
  if (view == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("tensor '", Av(name), "' not found in model directory '", dir_, "'"));
  }
  return *view;
}

absl::StatusOr<TensorView> WeightStore::GetWithShape(std::string_view name,
                                                     absl::Span<const int64_t> shape) const {
  SIEVE_ASSIGN_OR_RETURN(TensorView view, Get(name));
  if (!std::equal(view.shape.begin(), view.shape.end(), shape.begin(), shape.end())) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", Av(name), "' has shape ",
                                                   ShapeToString(view.shape), ", expected ",
                                                   ShapeToString(shape)));
  }
  return view;
}

std::vector<std::string> WeightStore::Names() const {
  std::vector<std::string> names;
  names.reserve(by_name_.size());
  for (const auto& [name, entry] : by_name_) names.push_back(name);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace sieve::engine
