#include "engine/backends/backend.h"

#include <mutex>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/cord.h"
#include "absl/strings/string_view.h"

namespace sieve::engine {
namespace {

// The payload that marks a status as a lost device. Its value is not read.
constexpr absl::string_view kDeviceLostPayload = "sieve.dev/engine/device-lost";

struct Registry {
  std::mutex mu;
  absl::flat_hash_map<std::string, BackendFactory> factories;  // guarded by mu
};

Registry& GetRegistry() {
  static Registry* registry = new Registry();
  return *registry;
}

}  // namespace

absl::Status DeviceLostError(absl::string_view message) {
  absl::Status status = absl::UnavailableError(message);
  status.SetPayload(kDeviceLostPayload, absl::Cord("1"));
  return status;
}

bool IsDeviceLost(const absl::Status& status) {
  return !status.ok() && status.GetPayload(kDeviceLostPayload).has_value();
}

void RegisterBackend(std::string name, BackendFactory factory) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.factories[std::move(name)] = std::move(factory);
}

BackendFactory FindRegisteredBackend(std::string_view name) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.factories.find(std::string(name));
  return it == r.factories.end() ? BackendFactory() : it->second;
}

}  // namespace sieve::engine
