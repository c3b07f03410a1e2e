// Token embedding: a table lookup.
//
// Forward. The table E has V rows (one per vocabulary entry) of C columns. Token row n with id t_n =
// tokens[n] gets a copy of row t_n:
//   out[n, c] = E[t_n, c]
// Equivalently out = onehot(tokens) * E, where onehot(tokens) is the N x V matrix with a single 1 per row.
//
// Backward. Each out[n, c] depends on exactly one table entry, E[t_n, c], with derivative 1:
//   d out[n, c] / d E[v, c'] = [v == t_n] [c == c']
// so by the chain rule
//   dL/dE[v, c] = sum_n [t_n == v] * dL/dout[n, c],
// i.e. dE = onehot(tokens)^T * dout: every token row adds its output gradient into the row of its token id.
// A token id that occurs several times in the batch receives the sum of all its rows; ids that do not occur
// receive nothing. We add in increasing n, so the result is deterministic (bitwise reproducible), which a
// CUDA kernel must match by summing in the same order (or to rounding, if it uses atomics).
//
// E is a parameter, so its gradient accumulates (+=). The token ids are integers: they have no gradient.
//
// NEFTune noise (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"). In
// training only, uniform noise is added to the looked-up rows:
//   out[i] += scale * (2 u_i - 1),   u_i = philox_uniform(seed, stream, i),   scale = alpha / sqrt(T * C)
// so each element moves by at most `scale`, T being the length of the batch's rows (padded or packed, as
// transformers' NEFTune hook counts it) and C the width. The noise does not depend on E, so its derivative
// is zero and the backward pass above is unchanged: dL/dE[v, c] is the sum of dL/dout over the rows of v,
// evaluated at the noisy forward. The noise is not stored; nothing in the backward pass needs it.
#pragma once

#include <cassert>
#include <cstddef>
#include <cstdint>

#include "kernels/philox.h"

namespace llm::ref {

// out[n, :] = table[tokens[n], :]. out is [N, C], tokens [N] with ids in [0, V), table [V, C].
template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* table, int N, int C) {
  for (int n = 0; n < N; ++n) {
    assert(tokens[n] >= 0);
    const T* row = table + static_cast<size_t>(tokens[n]) * C;
    T* out_row = out + static_cast<size_t>(n) * C;
    for (int c = 0; c < C; ++c) out_row[c] = row[c];
  }
}

// dtable[tokens[n], :] += dout[n, :] for n = 0, 1, ..., N-1 in that order. dtable [V, C] accumulates (+=).
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int N, int C) {
  for (int n = 0; n < N; ++n) {
    assert(tokens[n] >= 0);
    T* drow = dtable + static_cast<size_t>(tokens[n]) * C;
    const T* dout_row = dout + static_cast<size_t>(n) * C;
    for (int c = 0; c < C; ++c) drow[c] += dout_row[c];
  }
}

// x[i] += scale * (2 u_i - 1) for i in [0, n); the noise is computed in float, as the CUDA kernel does.
template <typename T>
void embedding_noise_forward(T* x, size_t n, float scale, uint64_t seed, uint64_t stream) {
  const int64_t count = static_cast<int64_t>(n);
#pragma omp parallel for schedule(static) if (count >= (1 << 16))
  for (int64_t i = 0; i < count; ++i) {
    const float noise = scale * (2.0f * llm::philox_uniform(seed, stream, static_cast<uint64_t>(i)) - 1.0f);
    x[i] += static_cast<T>(noise);
  }
}

}  // namespace llm::ref
