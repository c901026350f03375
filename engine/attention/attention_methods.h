// The names of the attention methods each phase accepts: the one list that config validation
// (engine_config.h), the daemon's key table and MakeAttentionPolicy (attention_policy.h) share.
// A sparse method is added here and in MakeAttentionPolicy together.
#ifndef SIEVE_ENGINE_ATTENTION_ATTENTION_METHODS_H_
#define SIEVE_ENGINE_ATTENTION_ATTENTION_METHODS_H_

#include <string_view>

namespace sieve::engine {

// attention.prefill.method
inline constexpr std::string_view kPrefillAttentionMethods[] = {"dense", "minference",
                                                             "xattention"};
// attention.decode.method
inline constexpr std::string_view kDecodeAttentionMethods[] = {"dense", "quest", "double_sparsity"};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_ATTENTION_ATTENTION_METHODS_H_
