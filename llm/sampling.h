// Choosing the next token from logits: greedy (temperature 0) or sampling from softmax(logits / t),
// optionally restricted to the top k. Sampling draws from Philox keyed by (seed, counter), so a
// generation repeats exactly.
#pragma once

#include <cstdint>
#include <vector>

namespace llm {

int sample_token(const std::vector<float>& logits, double temperature, int top_k, uint64_t seed,
                 uint64_t counter);

}  // namespace llm
