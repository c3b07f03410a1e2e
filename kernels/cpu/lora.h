// LoRA (low-rank adaptation) on a frozen linear layer, PyTorch layout.
//
// Forward. The base layer W [O, I] (and bias b [O]) is frozen; a rank-r adapter A [r, I], B [O, r] is
// trained. With x [N, I]:
//   x~ = dropout_p(x)                       (LoRA dropout, on the adapter input only)
//   h  = x~ A^T                             [N, r]   (saved for the backward pass)
//   y  = x W^T + b + s * h B^T              [N, O]
// The scale is s = alpha / r (LoRA) or s = alpha / sqrt(r) (rsLoRA, which keeps the adapter's output
// variance independent of r).
//
// Backward. Let G = dL/dy, [N, O]. The base path is linear_backward with no weight gradient. The adapter
// path is two linear maps and a diagonal one, so by the chain rule
//   dB[o, k] = s * sum_n G[n, o] h[n, k]          dB += s G^T h                 [O, r]
//   dh[n, k] = s * sum_o G[n, o] B[o, k]          dh  = s G B                   [N, r]
//   dA[k, i] = sum_n dh[n, k] x~[n, i]            dA += dh^T x~                 [r, I]
//   dx~      = dh A                                                             [N, I]
//   dx       = G W + dropout_backward(dx~)        (mask_i / (1 - p) per element, same draws as forward)
// There is no dW and no db: the base layer is frozen.
//
// Dropout uses kernels/cpu/dropout.h over the flat [N, I] array, keyed (seed, stream, n * I + i), so the
// backward pass regenerates the forward mask and a CUDA kernel draws the same numbers. p = 0 disables it.
//
// Initialisation (as PEFT's default): B = 0, so a fresh adapter leaves the layer unchanged, and A is
// drawn as torch.nn.init.kaiming_uniform_(A, a=sqrt(5)). That initialiser draws U(-bound, bound) with
//   gain  = sqrt(2 / (1 + a^2)) = sqrt(2 / 6) = 1 / sqrt(3),
//   std   = gain / sqrt(fan_in),
//   bound = sqrt(3) * std = 1 / sqrt(fan_in),
// and fan_in of A [r, I] is I. Our draws come from Philox, u = philox_uniform(seed, stream, k) for element
// k of A, mapped to (2u - 1) * bound: same distribution as PyTorch, not the same numbers.
//
// Merging. Because y = x (W + s B A)^T + b when dropout is off, the adapter folds into the base weight:
//   W' = W + s B A,  W'[o, i] = W[o, i] + s * sum_k B[o, k] A[k, i].
// Unmerging is the same call with -s (exact only up to rounding).
//
// Gradient rules: dA and dB are parameter gradients and accumulate (+=). dx is an activation gradient and
// is overwritten (=) unless accumulate_dx is set. dx, dA and dB may each be null to skip them.
// Every product is a call of the linear op (kernels/cpu/linear.h); scratch for x~, h B^T, dh and dx~ is
// allocated inside the calls (this is the clear reference, not the fast path).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/cpu/dropout.h"
#include "kernels/cpu/linear.h"
#include "kernels/philox.h"

namespace llm::ref {

// s = alpha / r, or alpha / sqrt(r) with rsLoRA.
inline float lora_scale(float alpha, int r, bool rslora) {
  return rslora ? alpha / std::sqrt(static_cast<float>(r)) : alpha / static_cast<float>(r);
}

// kaiming_uniform_(a = sqrt(5)) bound for a weight with fan_in inputs: 1 / sqrt(fan_in).
inline float lora_a_init_bound(int fan_in) {
  return 1.0f / std::sqrt(static_cast<float>(fan_in));
}

// A: [r, I] drawn U(-1/sqrt(I), 1/sqrt(I)) from Philox (seed, stream, element); B: [O, r] zeroed.
template <typename T>
void lora_init(T* A, T* B, int I, int O, int r, uint64_t seed, uint64_t stream) {
  const float bound = lora_a_init_bound(I);
  const size_t na = static_cast<size_t>(r) * I;
  for (size_t k = 0; k < na; ++k) {
    const float u = llm::philox_uniform(seed, stream, k);
    A[k] = static_cast<T>((2.0f * u - 1.0f) * bound);
  }
  const size_t nb = static_cast<size_t>(O) * r;
  for (size_t k = 0; k < nb; ++k) B[k] = T(0);
}

// out: [N, O]; h: [N, r] (written: x~ A^T, unscaled; the backward pass needs it);
// x: [N, I]; weight: [O, I]; bias: [O] or null; A: [r, I]; B: [O, r].
template <typename T>
void lora_forward(T* out, T* h, const T* x, const T* weight, const std::common_type_t<T>* bias, const T* A,
                  const T* B, int N, int I, int O, int r, float scale, float dropout_p, uint64_t seed,
                  uint64_t stream) {
  linear_forward(out, x, weight, bias, N, I, O);  // x W^T + b

  const size_t nx = static_cast<size_t>(N) * I;
  std::vector<T> xd;
  const T* x_tilde = x;  // p = 0: dropout is the identity
  if (dropout_p > 0.0f) {
    xd.resize(nx);
    dropout_forward(xd.data(), x, nx, dropout_p, seed, stream);
    x_tilde = xd.data();
  }
  linear_forward(h, x_tilde, A, static_cast<const T*>(nullptr), N, I, r);  // h = x~ A^T

  std::vector<T> up(static_cast<size_t>(N) * O);
  linear_forward(up.data(), h, B, static_cast<const T*>(nullptr), N, r, O);  // h B^T
  const T s = static_cast<T>(scale);
  for (size_t k = 0; k < up.size(); ++k) out[k] += s * up[k];  // + s h B^T
}

// dx: [N, I] (= unless accumulate_dx, then +=; null to skip); dA: [r, I] (+=; null to skip);
// dB: [O, r] (+=; null to skip). dout: [N, O]; x: [N, I]; h: [N, r] from the forward call;
// weight: [O, I]; A: [r, I]; B: [O, r]. scale, dropout_p, seed and stream must be the forward call's.
template <typename T>
void lora_backward(std::common_type_t<T>* dx, std::common_type_t<T>* dA, std::common_type_t<T>* dB,
                   const T* dout, const T* x, const T* h, const T* weight, const T* A, const T* B, int N,
                   int I, int O, int r, float scale, float dropout_p, uint64_t seed, uint64_t stream,
                   bool accumulate_dx = false) {
  const T s = static_cast<T>(scale);

  // dB += s G^T h: the weight gradient of the linear map h -> h B^T, scaled.
  if (dB != nullptr) {
    std::vector<T> g_h(static_cast<size_t>(O) * r, T(0));
    linear_backward(static_cast<T*>(nullptr), g_h.data(), static_cast<T*>(nullptr), dout, h, B, N, r, O);
    for (size_t k = 0; k < g_h.size(); ++k) dB[k] += s * g_h[k];
  }
  if (dx == nullptr && dA == nullptr) return;

  // dh = s G B: the input gradient of the same map, scaled.
  std::vector<T> dh(static_cast<size_t>(N) * r);
  linear_backward(dh.data(), static_cast<T*>(nullptr), static_cast<T*>(nullptr), dout, h, B, N, r, O);
  for (T& v : dh) v *= s;

  // The forward call's dropout mask, drawn once for both of its uses below.
  const size_t nx = static_cast<size_t>(N) * I;
  std::vector<uint8_t> keep;
  std::vector<T> xd;
  const T* x_tilde = x;
  if (dropout_p > 0.0f) {
    keep.resize(nx);
    dropout_keep_mask(keep.data(), nx, dropout_p, seed, stream);
    xd.resize(nx);
    dropout_apply_mask(xd.data(), x, keep.data(), nx, dropout_p);  // x~
    x_tilde = xd.data();
  }
  // dA += dh^T x~: the weight gradient of h = x~ A^T.
  if (dA != nullptr) {
    linear_backward(static_cast<T*>(nullptr), dA, static_cast<T*>(nullptr), dh.data(), x_tilde, A, N, I, r);
  }

  if (dx != nullptr) {
    // Adapter path: dx~ = dh A, then back through the dropout mask; base path: G W.
    std::vector<T> dxd(nx);
    linear_backward(dxd.data(), static_cast<T*>(nullptr), static_cast<T*>(nullptr), dh.data(), x_tilde, A, N,
                    I, r);
    if (dropout_p > 0.0f) dropout_apply_mask(dxd.data(), dxd.data(), keep.data(), nx, dropout_p);
    linear_backward(dx, static_cast<T*>(nullptr), static_cast<T*>(nullptr), dout, x, weight, N, I, O,
                    accumulate_dx);
    for (size_t k = 0; k < nx; ++k) dx[k] += dxd[k];
  }
}

// merged = weight + s B A, all [O, I]; merged may alias weight. A: [r, I]; B: [O, r].
// Unmerge with -scale.
template <typename T>
void lora_merge(T* merged, const T* weight, const T* A, const T* B, int I, int O, int r, float scale) {
  const T s = static_cast<T>(scale);
  for (int o = 0; o < O; ++o) {
    const T* br = B + static_cast<size_t>(o) * r;
    for (int i = 0; i < I; ++i) {
      T acc = 0;
      for (int k = 0; k < r; ++k) acc += br[k] * A[static_cast<size_t>(k) * I + i];
      merged[static_cast<size_t>(o) * I + i] = weight[static_cast<size_t>(o) * I + i] + s * acc;
    }
  }
}

}  // namespace llm::ref
