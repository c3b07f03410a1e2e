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
//
// Element-wise dropout masks use a packed variant (philox_mask_uniform): one Philox call gives 128 bits,
// which are cut into eight 16-bit uniforms for eight consecutive elements,
//   block   = philox_at(seed, stream, index / 8)
//   lane    = index % 8:  word lane / 2, low half for even lanes, high half for odd ones
//   uniform = half / 65536, on the grid {0, 1/65536, ..., 65535/65536}.
// Why: ten Philox rounds cost about 100 integer instructions, while a dropout kernel moves 4 bytes per bf16
// element; one call per element made the GPU dropout kernel compute-bound at 25 % of copy bandwidth. One
// call per 16-byte vector of eight bf16 elements is one call per thread. The price is that a keep test
// [u >= p] sees p rounded up to the next multiple of 1/65536 (p = 0.1 drops with probability 0.1000061),
// far below the sampling noise of any mask. PyTorch's fused dropout likewise takes four uniforms per call.
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

// The Philox output for counter (position, stream) under key seed: the stream convention above.
LLM_HD Philox4 philox_at(uint64_t seed, uint64_t stream, uint64_t position) {
  Philox4 counter;
  counter.v[0] = static_cast<uint32_t>(position);
  counter.v[1] = static_cast<uint32_t>(position >> 32);
  counter.v[2] = static_cast<uint32_t>(stream);
  counter.v[3] = static_cast<uint32_t>(stream >> 32);
  return philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// A uniform float in [0, 1) for element `index` of stream `stream` under `seed`.
LLM_HD float philox_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return static_cast<float>(philox_at(seed, stream, index).v[0] >> 8) * (1.0f / 16777216.0f);
}

// Uniform number `lane` (0..7) of a block: a 16-bit half of one output word, scaled to [0, 1) (exact).
// The word is chosen with selects rather than block.v[lane / 2]: a GPU thread indexing a register array
// with a run-time index would move the array to local memory.
LLM_HD float philox_mask_lane(const Philox4& block, int lane) {
  const uint32_t word =
      lane < 4 ? (lane < 2 ? block.v[0] : block.v[1]) : (lane < 6 ? block.v[2] : block.v[3]);
  const uint32_t half = (lane & 1) ? (word >> 16) : (word & 0xFFFFu);
  return static_cast<float>(half) * (1.0f / 65536.0f);
}

// The packed stream's uniform for element `index`: lane index % 8 of block index / 8. Kernels that own
// eight aligned elements call philox_at(seed, stream, first / 8) once and take all eight lanes.
LLM_HD float philox_mask_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return philox_mask_lane(philox_at(seed, stream, index / 8), static_cast<int>(index % 8));
}

}  // namespace llm
