// Fully connected layer in the PyTorch layout: weight W is [O, I] (one row per output feature), and
//   out[n, o] = sum_i x[n, i] * W[o, i] + b[o],     i.e.  out = x W^T + b,
// with x [N, I] and out [N, O].
//
// Backward. Let G = dL/dout, [N, O]. Each out[n, o] is linear in x, W and b, with
//   d out[n, o] / d x[n, i] = W[o, i],   d out[n, o] / d W[o, i] = x[n, i],   d out[n, o] / d b[o] = 1,
// so summing over every output that a given input touches:
//   dx[n, i] = sum_o G[n, o] * W[o, i]        (dx = G W,      [N, I])
//   dW[o, i] = sum_n G[n, o] * x[n, i]        (dW = G^T x,    [O, I])
//   db[o]    = sum_n G[n, o]                  (column sums of G)
//
// Loop order and threads. This file is the hot spot when the demo model trains on the CPU, so the loops
// are ordered for contiguous inner loops:
//   forward  per row n, per o:   dot product of x[n, :] and W[o, :], both contiguous;
//   dx       per row n, per o:   dx[n, :] += G[n, o] * W[o, :], both contiguous;
//   dW, db   per row o, per n:   dW[o, :] += G[n, o] * x[n, :], both contiguous.
// The outermost loop runs over the rows of the array being written (N rows of out and dx, O rows of dW),
// and `#pragma omp parallel for` splits exactly that loop. Each output element is therefore summed by
// one thread in one fixed order, and the result is bitwise the same for any number of threads.
//
// Gradient rules: dW and db are parameter gradients and accumulate (+=). dx is an activation gradient and
// is overwritten (=) unless accumulate_dx is set (for an input that also receives gradient from elsewhere).
// dx, dW and db may each be null to skip them (no input gradient needed, frozen weight, no bias).
//
// Precision: sums are carried in T (float for training, double in the gradient checks).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace llm::ref {

// Nullable pointer arguments are declared as `std::common_type_t<T>*`, which is just `T*` but keeps T
// from being deduced from them, so a plain `nullptr` can be passed (a bare nullptr has no T to deduce).

// out: [N, O]; x: [N, I]; weight: [O, I]; bias: [O] or null.
template <typename T>
void linear_forward(T* out, const T* x, const T* weight, const std::common_type_t<T>* bias, int N, int I,
                    int O) {
  // Rows of x are taken four at a time so that each weight row is read once per four dot products.
  // Which path a row takes depends only on its index, so results do not depend on the thread count.
  constexpr int kRows = 4;
  const int blocks = (N + kRows - 1) / kRows;
#pragma omp parallel for schedule(static)
  for (int blk = 0; blk < blocks; ++blk) {
    const int n0 = blk * kRows;
    if (n0 + kRows <= N) {
      const T* x0 = x + static_cast<size_t>(n0) * I;
      const T* x1 = x0 + I;
      const T* x2 = x1 + I;
      const T* x3 = x2 + I;
      for (int o = 0; o < O; ++o) {
        const T* wr = weight + static_cast<size_t>(o) * I;
        T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int i = 0; i < I; ++i) {
          const T w = wr[i];
          a0 += x0[i] * w;
          a1 += x1[i] * w;
          a2 += x2[i] * w;
          a3 += x3[i] * w;
        }
        const T b = bias != nullptr ? bias[o] : T(0);
        out[static_cast<size_t>(n0) * O + o] = a0 + b;
        out[static_cast<size_t>(n0 + 1) * O + o] = a1 + b;
        out[static_cast<size_t>(n0 + 2) * O + o] = a2 + b;
        out[static_cast<size_t>(n0 + 3) * O + o] = a3 + b;
      }
      continue;
    }
    for (int n = n0; n < N; ++n) {  // the last, partial block
      const T* xr = x + static_cast<size_t>(n) * I;
      T* outr = out + static_cast<size_t>(n) * O;
      for (int o = 0; o < O; ++o) {
        const T* wr = weight + static_cast<size_t>(o) * I;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < I; ++i) acc += xr[i] * wr[i];
        outr[o] = bias != nullptr ? acc + bias[o] : acc;
      }
    }
  }
}

// dx: [N, I] (= unless accumulate_dx, then +=; null to skip). dweight: [O, I] (+=; null to skip).
// dbias: [O] (+=; null to skip). dout: [N, O]; x: [N, I]; weight: [O, I].
template <typename T>
void linear_backward(std::common_type_t<T>* dx, std::common_type_t<T>* dweight, std::common_type_t<T>* dbias,
                     const T* dout, const T* x, const T* weight, int N, int I, int O,
                     bool accumulate_dx = false) {
  if (dx != nullptr) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      T* dxr = dx + static_cast<size_t>(n) * I;
      const T* doutr = dout + static_cast<size_t>(n) * O;
      if (!accumulate_dx) {
        for (int i = 0; i < I; ++i) dxr[i] = 0;
      }
      for (int o = 0; o < O; ++o) {
        const T g = doutr[o];
        const T* wr = weight + static_cast<size_t>(o) * I;
#pragma omp simd
        for (int i = 0; i < I; ++i) dxr[i] += g * wr[i];
      }
    }
  }

  if (dweight != nullptr || dbias != nullptr) {
#pragma omp parallel for schedule(static)
    for (int o = 0; o < O; ++o) {
      T* dwr = dweight != nullptr ? dweight + static_cast<size_t>(o) * I : nullptr;
      T bias_sum = 0;
      for (int n = 0; n < N; ++n) {
        const T g = dout[static_cast<size_t>(n) * O + o];
        bias_sum += g;
        if (dwr != nullptr) {
          const T* xr = x + static_cast<size_t>(n) * I;
#pragma omp simd
          for (int i = 0; i < I; ++i) dwr[i] += g * xr[i];
        }
      }
      if (dbias != nullptr) dbias[o] += bias_sum;
    }
  }
}

}  // namespace llm::ref
