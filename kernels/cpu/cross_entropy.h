// Per-token log-probabilities of the targets, and the mean cross-entropy built on them.
//
// Every language-model loss here (pretraining and SFT cross-entropy, DPO, GRPO) is a function of the
// log-probability that the model gives each target token, so the op is split in two:
//   1. token_logprobs: logits [N, V] and targets [N] -> logprob [N]          (the common core)
//   2. a loss on logprob [N] -> scalar, e.g. cross_entropy_mean below      (each trainer its own)
// and the backward pass runs them in reverse: the loss gives dL/dlogprob [N], token_logprobs_backward
// turns that into dL/dlogits [N, V].
//
// Forward. For one row z = logits[n, :] with target t:
//   lse = log sum_v exp(z_v)
//   logprob = log softmax(z)_t = z_t - lse.
// lse is computed stably as m + log sum_v exp(z_v - m) with m = max_v z_v: every exponent is <= 0, so
// nothing overflows however large the logits are, and the largest term is exactly exp(0) = 1, so the
// log never sees 0.
//
// Backward. d lse / d z_v = exp(z_v) / sum_u exp(z_u) = p_v, the softmax; and d z_t / d z_v = [v == t].
//   d logprob / d z_v = [v == t] - p_v,
// so with the upstream gradient d_n = dL/dlogprob[n]:
//   dL/dz[n, v] = d_n * ([v == t_n] - p[n, v]),   p[n, v] = exp(z[n, v] - lse[n]).
// The backward pass recomputes p from the saved lse instead of storing the [N, V] softmax.
//
// Mean cross-entropy. Over the K non-ignored tokens, L = -(1/K) sum_n logprob[n], hence
//   dL/dlogprob[n] = -1/K for counted tokens and 0 for ignored ones.
// Fed into the backward above this gives the familiar (p - onehot) / K.
//
// Ignored tokens (target == ignore_index, e.g. prompt tokens in SFT, padding): logprob is 0, the row of
// dlogits is 0, and they are left out of the count K. Their lse is still computed and saved (it is cheap
// and keeps lse meaningful for every row, e.g. for z-loss or diagnostics). A batch with no counted token
// has loss 0 and all gradients 0. Every other target must lie in [0, V).
//
// Precision: the row max, the sum of exponentials and the loss sums are carried in double.
// Threads: rows are independent, so the row loops of large batches are split with OpenMP; the result does
// not depend on the thread count.
#pragma once

#include <cassert>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace llm::ref {

// logprobs: [N] (written; 0 for ignored tokens). lse: [N] (written for every row). logits: [N, V].
// targets: [N], each in [0, V) or equal to ignore_index.
template <typename T>
void token_logprobs_forward(T* logprobs, T* lse, const T* logits, const int32_t* targets, int N, int V,
                            int ignore_index = -100) {
  // Small batches are not worth waking threads for.
#pragma omp parallel for schedule(static) if (static_cast <int64_t>(N) * V >= (1 << 16))
  for (int n = 0; n < N; ++n) {
    const T* z = logits + static_cast<size_t>(n) * V;

    double m = z[0];
    for (int v = 1; v < V; ++v) m = z[v] > m ? static_cast<double>(z[v]) : m;
    double sum = 0.0;
    for (int v = 0; v < V; ++v) sum += std::exp(z[v] - m);
    const double row_lse = m + std::log(sum);
    lse[n] = static_cast<T>(row_lse);

    const int t = targets[n];
    if (t == ignore_index) {
      logprobs[n] = 0;
    } else {
      assert(t >= 0 && t < V);
      logprobs[n] = static_cast<T>(z[t] - row_lse);
    }
  }
}

// dlogits: [N, V] (overwritten; zero rows for ignored tokens). dlogprobs: [N], dL/dlogprob per token.
// logits: [N, V]; lse: [N] from the forward pass; targets: [N].
template <typename T>
void token_logprobs_backward(T* dlogits, const T* dlogprobs, const T* logits, const T* lse,
                             const int32_t* targets, int N, int V, int ignore_index = -100) {
  // Small batches are not worth waking threads for.
#pragma omp parallel for schedule(static) if (static_cast <int64_t>(N) * V >= (1 << 16))
  for (int n = 0; n < N; ++n) {
    const T* z = logits + static_cast<size_t>(n) * V;
    T* dz = dlogits + static_cast<size_t>(n) * V;
    const int t = targets[n];
    if (t == ignore_index) {
      for (int v = 0; v < V; ++v) dz[v] = 0;
      continue;
    }
    const double d = dlogprobs[n];
    const double row_lse = lse[n];
    for (int v = 0; v < V; ++v) {
      const double p = std::exp(z[v] - row_lse);
      const double onehot = v == t ? 1.0 : 0.0;
      dz[v] = static_cast<T>(d * (onehot - p));
    }
  }
}

// Mean cross-entropy -sum(logprob) / count over the non-ignored tokens; writes count. Returns 0 (and
// count 0) when every token is ignored.
template <typename T>
double cross_entropy_mean(const T* logprobs, const int32_t* targets, int N, int* count,
                          int ignore_index = -100) {
  double sum = 0.0;
  int k = 0;
  for (int n = 0; n < N; ++n) {
    if (targets[n] == ignore_index) continue;
    sum += logprobs[n];
    ++k;
  }
  *count = k;
  return k > 0 ? -sum / k : 0.0;
}

// dlogprobs[n] = -1/count for counted tokens, 0 for ignored ones (all 0 when count == 0). Overwritten.
template <typename T>
void cross_entropy_mean_grad(T* dlogprobs, const int32_t* targets, int N, int count,
                             int ignore_index = -100) {
  const double g = count > 0 ? -1.0 / count : 0.0;
  for (int n = 0; n < N; ++n) dlogprobs[n] = targets[n] == ignore_index ? T(0) : static_cast<T>(g);
}

}  // namespace llm::ref
