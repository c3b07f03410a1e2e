// Philox4x32-10: a counter-based random number generator (Salmon et al., "Parallel random numbers:
// as easy as 1, 2, 3", SC'11).
//
// A counter-based generator is a pure function: random = philox(counter, key). No state is carried from
// one draw to the next, so
//   - the forward and the backward pass regenerate the same dropout mask instead of storing it;
//   - the CPU reference and a CUDA thread that owns element i draw exactly the same number;
//   - a resumed run draws the same numbers as an uninterrupted one (the step number is part of the counter).
//
// One round maps the counter (c0, c1, c2, c3) with the key (k0, k1):
//   (hi0, lo0) = M0 * c0      (64-bit product split into halves)
//   (hi1, lo1) = M1 * c2
//   c' = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
// and the key is bumped by the Weyl constants (W0, W1) between rounds. Ten rounds pass BigCrush.
//
// Our stream convention (used by every op that draws randomness):
//   key     = seed (64 bits)
//   counter = (index low 32, index high 32, stream low 32, stream high 32)
//   uniform = top 24 bits of the first output word, scaled to [0, 1).
// `stream` separates independent uses (layer, op, step); `index` is the element.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LLM_HD __host__ __device__ __forceinline__
#else
#define LLM_HD inline
#endif

namespace llm {

struct Philox4 {
  uint32_t v[4];
};

LLM_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
}

LLM_HD Philox4 philox4x32_10(Philox4 counter, uint32_t key0, uint32_t key1) {
  const uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  const uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, counter.v[0], &hi0, &lo0);
    philox_mulhilo(kM1, counter.v[2], &hi1, &lo1);
    Philox4 next;
    next.v[0] = hi1 ^ counter.v[1] ^ key0;
    next.v[1] = lo1;
    next.v[2] = hi0 ^ counter.v[3] ^ key1;
    next.v[3] = lo0;
    counter = next;
    key0 += kW0;
    key1 += kW1;
  }
  return counter;
}

// A uniform float in [0, 1) for element `index` of stream `stream` under `seed`.
LLM_HD float philox_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  Philox4 counter;
  counter.v[0] = static_cast<uint32_t>(index);
  counter.v[1] = static_cast<uint32_t>(index >> 32);
  counter.v[2] = static_cast<uint32_t>(stream);
  counter.v[3] = static_cast<uint32_t>(stream >> 32);
  const Philox4 out = philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(out.v[0] >> 8) * (1.0f / 16777216.0f);
}

}  // namespace llm
