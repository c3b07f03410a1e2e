// Row-wise normalisations (LayerNorm, RMSNorm) and the residual add that the CUDA kernels fuse with them.
//
// Every function works on N independent rows of C features; x, out, dx, dout are [N, C] row-major and the
// per-row statistics (mean, rstd) are [N].
//
// LayerNorm
// ---------
// Forward, for one row x_1..x_C:
//   mu    = (1/C) sum_j x_j
//   var   = (1/C) sum_j (x_j - mu)^2                 (biased variance, as in PyTorch)
//   rstd  = 1 / sqrt(var + eps)
//   xhat_i = (x_i - mu) * rstd
//   y_i   = w_i * xhat_i + b_i
//
// Backward. Write g_i = dL/dy_i * w_i for the gradient arriving at xhat. The parameter gradients are
// immediate:
//   dL/dw_i = sum over rows of dL/dy_i * xhat_i,      dL/db_i = sum over rows of dL/dy_i.
// For the input we need the Jacobian of xhat. Using d mu/dx_j = 1/C and
//   d rstd/dx_j = -(1/2) (var + eps)^(-3/2) * d var/dx_j = -rstd^3 * (x_j - mu) / C
// (the term of d var/dx_j that comes through mu is (2/C) sum_k (x_k - mu) * (-1/C) = 0), we get
//   d xhat_i/dx_j = rstd * (delta_ij - 1/C) + (x_i - mu) * d rstd/dx_j
//                 = rstd * (delta_ij - 1/C - xhat_i * xhat_j / C).
// Contracting with g:
//   dL/dx_j = sum_i g_i * d xhat_i/dx_j = rstd * (g_j - mean(g) - xhat_j * mean(g * xhat)),
// where mean() is over the C features of the row. Only the two row means are needed, so the backward
// pass is two sweeps over the row, the same as the forward pass.
//
// RMSNorm
// -------
// Forward, for one row (no centring, no bias):
//   rstd  = 1 / sqrt((1/C) sum_j x_j^2 + eps)
//   xhat_i = x_i * rstd
//   y_i   = w_i * xhat_i
// Backward. With g_i = dL/dy_i * w_i again, dL/dw_i = sum over rows of dL/dy_i * xhat_i, and from
//   d rstd/dx_j = -rstd^3 * x_j / C,
//   d xhat_i/dx_j = rstd * delta_ij - x_i * rstd^3 * x_j / C = rstd * (delta_ij - xhat_i * xhat_j / C),
// so
//   dL/dx_j = rstd * (g_j - xhat_j * mean(g * xhat)).
// This is the LayerNorm result without the mean(g) term, which came from the centring.
//
// Gradient rules. The input of a pre-norm block is the residual stream, which also flows around the
// block, so dx ACCUMULATES (+=) into the residual gradient. dweight and dbias are parameter gradients and
// accumulate (+=) as everywhere else.
//
// Precision. The row statistics and the two row means of the backward pass are summed in double, whatever
// T is; everything stored is T.
#pragma once

#include <cmath>
#include <cstddef>
#include <type_traits>

namespace llm::ref {

// Nullable pointer arguments are declared as `std::common_type_t<T>*`, which is just `T*` but keeps T
// from being deduced from them, so a plain `nullptr` can be passed (a bare nullptr has no T to deduce).

// out, x: [N, C]; mean, rstd: [N] (written, needed by the backward pass); weight, bias: [C]. bias may be
// null (no bias).
template <typename T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* x, const T* weight,
                       const std::common_type_t<T>* bias, int N, int C, double eps) {
  for (int n = 0; n < N; ++n) {
    const T* xr = x + static_cast<size_t>(n) * C;
    T* outr = out + static_cast<size_t>(n) * C;

    double sum = 0.0;
    for (int i = 0; i < C; ++i) sum += xr[i];
    const double mu = sum / C;

    double sq = 0.0;
    for (int i = 0; i < C; ++i) {
      const double d = xr[i] - mu;
      sq += d * d;
    }
    const double var = sq / C;
    const double rs = 1.0 / std::sqrt(var + eps);

    for (int i = 0; i < C; ++i) {
      const double xhat = (xr[i] - mu) * rs;
      double y = xhat * weight[i];
      if (bias != nullptr) y += bias[i];
      outr[i] = static_cast<T>(y);
    }
    mean[n] = static_cast<T>(mu);
    rstd[n] = static_cast<T>(rs);
  }
}

// dx: [N, C], accumulated (+=). dweight: [C], accumulated; null when the weight is frozen. dbias: [C],
// accumulated; null when the norm has no bias or it is frozen. dout, x: [N, C]; mean, rstd: [N] from the
// forward pass; weight: [C].
template <typename T>
void layernorm_backward(T* dx, T* dweight, std::common_type_t<T>* dbias, const T* dout, const T* x,
                        const T* mean, const T* rstd, const T* weight, int N, int C) {
  for (int n = 0; n < N; ++n) {
    const T* xr = x + static_cast<size_t>(n) * C;
    const T* doutr = dout + static_cast<size_t>(n) * C;
    T* dxr = dx + static_cast<size_t>(n) * C;
    const double mu = mean[n];
    const double rs = rstd[n];

    // The two row means: mean(g) and mean(g * xhat), with g = dout * w.
    double sum_g = 0.0;
    double sum_g_xhat = 0.0;
    for (int i = 0; i < C; ++i) {
      const double xhat = (xr[i] - mu) * rs;
      const double g = static_cast<double>(doutr[i]) * weight[i];
      sum_g += g;
      sum_g_xhat += g * xhat;
    }
    const double mean_g = sum_g / C;
    const double mean_g_xhat = sum_g_xhat / C;

    for (int i = 0; i < C; ++i) {
      const double xhat = (xr[i] - mu) * rs;
      const double g = static_cast<double>(doutr[i]) * weight[i];
      dxr[i] += static_cast<T>(rs * (g - mean_g - xhat * mean_g_xhat));
      if (dweight != nullptr) dweight[i] += static_cast<T>(doutr[i] * xhat);
      if (dbias != nullptr) dbias[i] += doutr[i];
    }
  }
}

// out, x: [N, C]; rstd: [N] (written, needed by the backward pass); weight: [C].
template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* x, const T* weight, int N, int C, double eps) {
  for (int n = 0; n < N; ++n) {
    const T* xr = x + static_cast<size_t>(n) * C;
    T* outr = out + static_cast<size_t>(n) * C;

    double sq = 0.0;
    for (int i = 0; i < C; ++i) sq += static_cast<double>(xr[i]) * xr[i];
    const double rs = 1.0 / std::sqrt(sq / C + eps);

    for (int i = 0; i < C; ++i) outr[i] = static_cast<T>(xr[i] * rs * weight[i]);
    rstd[n] = static_cast<T>(rs);
  }
}

// dx: [N, C], accumulated (+=). dweight: [C], accumulated; null when the weight is frozen. dout, x: [N, C];
// rstd: [N] from the forward pass; weight: [C].
template <typename T>
void rmsnorm_backward(T* dx, T* dweight, const T* dout, const T* x, const T* rstd, const T* weight, int N,
                      int C) {
  for (int n = 0; n < N; ++n) {
    const T* xr = x + static_cast<size_t>(n) * C;
    const T* doutr = dout + static_cast<size_t>(n) * C;
    T* dxr = dx + static_cast<size_t>(n) * C;
    const double rs = rstd[n];

    // The row mean mean(g * xhat), with g = dout * w.
    double sum_g_xhat = 0.0;
    for (int i = 0; i < C; ++i) {
      const double g = static_cast<double>(doutr[i]) * weight[i];
      sum_g_xhat += g * (xr[i] * rs);
    }
    const double mean_g_xhat = sum_g_xhat / C;

    for (int i = 0; i < C; ++i) {
      const double xhat = xr[i] * rs;
      const double g = static_cast<double>(doutr[i]) * weight[i];
      dxr[i] += static_cast<T>(rs * (g - xhat * mean_g_xhat));
      if (dweight != nullptr) dweight[i] += static_cast<T>(doutr[i] * xhat);
    }
  }
}

// out = a + b over n elements. out may alias a or b. Its backward pass is the identity into both inputs,
// which is why the residual gradient simply accumulates.
template <typename T>
void residual_add(T* out, const T* a, const T* b, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

}  // namespace llm::ref
