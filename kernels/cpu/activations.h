// Elementwise activations y = f(x) and the gated SwiGLU unit.
//
// An elementwise op has a diagonal Jacobian, so the backward pass is dL/dx_i = dL/dy_i * f'(x_i). The
// derivatives, one by one:
//
// ReLU:        f(x) = max(x, 0)                     f'(x) = 1 if x > 0 else 0
// Leaky ReLU:  f(x) = x if x > 0 else a*x           f'(x) = 1 if x > 0 else a          (a = leaky_slope)
//   At the kink x = 0 both use the left derivative (0, resp. a), as PyTorch does.
//
// GELU (exact, "erf"): f(x) = x * Phi(x), where Phi(x) = (1/2) (1 + erf(x / sqrt(2))) is the standard
//   normal CDF. Its derivative is the normal density phi(x) = exp(-x^2 / 2) / sqrt(2 pi), so by the
//   product rule
//     f'(x) = Phi(x) + x * phi(x).
//
// GELU (tanh approximation, as in GPT-2): f(x) = (1/2) x (1 + tanh(u)),  u = k (x + c x^3),
//   k = sqrt(2 / pi), c = 0.044715. With d tanh(u)/du = 1 - tanh(u)^2 and du/dx = k (1 + 3 c x^2):
//     f'(x) = (1/2) (1 + tanh(u)) + (1/2) x (1 - tanh(u)^2) k (1 + 3 c x^2).
//
// SiLU (swish): f(x) = x * s(x), s(x) = 1 / (1 + exp(-x)) the logistic sigmoid. With s' = s (1 - s):
//     f'(x) = s(x) + x s(x) (1 - s(x)) = s(x) (1 + x (1 - s(x))).
//
// SwiGLU (the Llama/Qwen MLP gate): y = silu(g) * u for a gate g and an up projection u, elementwise.
//   Two inputs, so two partial derivatives:
//     dL/du = dL/dy * silu(g),        dL/dg = dL/dy * u * silu'(g),
//   with silu' from above.
//
// Gradient rule: these ops sit inside a block, never on the residual stream, so dx (and dgate, dup) are
// OVERWRITTEN (=).
//
// Precision: each element is evaluated in double and rounded once to T.
#pragma once

#include <cmath>
#include <cstddef>

namespace llm::ref {

enum class Activation { kRelu, kGeluTanh, kGeluErf, kSilu, kLeakyRelu };

namespace detail {

constexpr double kPi = 3.14159265358979323846;

inline double sigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

inline double activation_value(Activation act, double x, double leaky_slope) {
  switch (act) {
    case Activation::kRelu:
      return x > 0.0 ? x : 0.0;
    case Activation::kLeakyRelu:
      return x > 0.0 ? x : leaky_slope * x;
    case Activation::kGeluErf:
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case Activation::kGeluTanh: {
      const double k = std::sqrt(2.0 / kPi);
      const double u = k * (x + 0.044715 * x * x * x);
      return 0.5 * x * (1.0 + std::tanh(u));
    }
    case Activation::kSilu:
      return x * sigmoid(x);
  }
  return 0.0;
}

inline double activation_derivative(Activation act, double x, double leaky_slope) {
  switch (act) {
    case Activation::kRelu:
      return x > 0.0 ? 1.0 : 0.0;
    case Activation::kLeakyRelu:
      return x > 0.0 ? 1.0 : leaky_slope;
    case Activation::kGeluErf: {
      const double cdf = 0.5 * (1.0 + std::erf(x / std::sqrt(2.0)));
      const double pdf = std::exp(-0.5 * x * x) / std::sqrt(2.0 * kPi);
      return cdf + x * pdf;
    }
    case Activation::kGeluTanh: {
      const double k = std::sqrt(2.0 / kPi);
      const double c = 0.044715;
      const double t = std::tanh(k * (x + c * x * x * x));
      return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * c * x * x);
    }
    case Activation::kSilu: {
      const double s = sigmoid(x);
      return s * (1.0 + x * (1.0 - s));
    }
  }
  return 0.0;
}

}  // namespace detail

// out = f(x) over n elements. leaky_slope is used by kLeakyRelu only.
template <typename T>
void activation_forward(Activation act, T* out, const T* x, size_t n, double leaky_slope = 0.01) {
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(detail::activation_value(act, x[i], leaky_slope));
}

// dx = dout * f'(x) over n elements; dx is overwritten.
template <typename T>
void activation_backward(Activation act, T* dx, const T* dout, const T* x, size_t n,
                         double leaky_slope = 0.01) {
  for (size_t i = 0; i < n; ++i) {
    dx[i] = static_cast<T>(dout[i] * detail::activation_derivative(act, x[i], leaky_slope));
  }
}

// out = silu(gate) * up over n elements.
template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const double g = gate[i];
    out[i] = static_cast<T>(g * detail::sigmoid(g) * up[i]);
  }
}

// dgate = dout * up * silu'(gate), dup = dout * silu(gate); both overwritten.
template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const double g = gate[i];
    const double s = detail::sigmoid(g);
    const double silu = g * s;
    const double dsilu = s * (1.0 + g * (1.0 - s));
    const double d = dout[i];
    dgate[i] = static_cast<T>(d * up[i] * dsilu);
    dup[i] = static_cast<T>(d * silu);
  }
}

}  // namespace llm::ref
