// What the backend tests in tests/train share: the GPU skip, and random token batches with ignored
// targets and two packed documents per row.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "tests/gpu_skip.h"
#include "train/backend.h"

namespace llm::test {

struct Batch {
  int B, T;
  std::vector<int32_t> inputs, targets, positions, doc_ids;
  // The batch as a backend takes it; `packed` passes the positions and document ids.
  TokenBatch view(bool packed) const {
    TokenBatch b;
    b.B = B;
    b.T = T;
    b.inputs = inputs.data();
    b.targets = targets.data();
    if (packed) {
      b.positions = positions.data();
      b.doc_ids = doc_ids.data();
    }
    return b;
  }
};

// Random tokens; a few ignored targets; two documents per row (positions restart at the boundary).
inline Batch random_batch(int B, int T, int V, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> tok(0, V - 1);
  Batch b{B, T, {}, {}, {}, {}};
  for (int r = 0; r < B; ++r) {
    const int split = T / 2 + r % 3;
    for (int t = 0; t < T; ++t) {
      b.inputs.push_back(tok(rng));
      b.targets.push_back(t % 5 == 3 ? -100 : tok(rng));
      b.positions.push_back(t < split ? t : t - split);
      b.doc_ids.push_back(t < split ? 0 : 1);
    }
  }
  return b;
}

}  // namespace llm::test
