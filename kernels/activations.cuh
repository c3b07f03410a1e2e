// Elementwise activations and the fused SwiGLU gate, forward and backward, on the GPU.
//
// Math (the derivations are in kernels/cpu/activations.h, which these kernels must match):
//   ReLU        y = max(x, 0)                      dy/dx = [x > 0]
//   LeakyReLU   y = x > 0 ? x : a x                dy/dx = x > 0 ? 1 : a
//   GELU (erf)  y = x Phi(x)                       dy/dx = Phi(x) + x phi(x)
//   GELU (tanh) y = x (1 + tanh(u)) / 2,  u = k (x + c x^3),  k = sqrt(2/pi), c = 0.044715
//               dy/dx = (1 + tanh(u)) / 2 + x (1 - tanh(u)^2) k (1 + 3 c x^2) / 2
//   SiLU        y = x s(x),  s = sigmoid           dy/dx = s(x) (1 + x (1 - s(x)))
//   SwiGLU      y = silu(g) u                      dL/du = dL/dy silu(g),  dL/dg = dL/dy u silu'(g)
// Each op is elementwise, so its Jacobian is diagonal and the backward pass is dL/dx = dL/dy * f'(x),
// evaluated from the saved input x. These ops sit inside a block, off the residual stream, so every
// gradient here is OVERWRITTEN (=).
//
// Kernels: one thread per VEC consecutive elements (VEC = 1 clear, 16 bytes' worth fast; see
// kernels/kernel_utils.cuh); the n % VEC elements left at the end are handled one per thread by the
// threads after the last full vector. Values are computed in fp32 and rounded once to the storage type T.
#pragma once

#include <cstddef>
#include <stdexcept>

#include "kernels/cpu/activations.h"  // the Activation enum, shared with the CPU reference
#include "kernels/cuda_common.cuh"
#include "kernels/kernel_utils.cuh"
#include "kernels/nvtx.cuh"

namespace llm::cuda {

using ref::Activation;

namespace activation_detail {

__device__ __forceinline__ float sigmoid(float x) {
  return 1.0f / (1.0f + expf(-x));
}

template <Activation A>
__device__ __forceinline__ float value(float x, float leaky_slope) {
  if constexpr (A == Activation::kRelu) {
    return x > 0.0f ? x : 0.0f;
  } else if constexpr (A == Activation::kLeakyRelu) {
    return x > 0.0f ? x : leaky_slope * x;
  } else if constexpr (A == Activation::kGeluErf) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
  } else if constexpr (A == Activation::kGeluTanh) {
    const float k = 0.79788456080286536f;  // sqrt(2 / pi)
    const float u = k * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
  } else {  // kSilu
    return x * sigmoid(x);
  }
}

template <Activation A>
__device__ __forceinline__ float derivative(float x, float leaky_slope) {
  if constexpr (A == Activation::kRelu) {
    return x > 0.0f ? 1.0f : 0.0f;
  } else if constexpr (A == Activation::kLeakyRelu) {
    return x > 0.0f ? 1.0f : leaky_slope;
  } else if constexpr (A == Activation::kGeluErf) {
    const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
    const float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;  // 1 / sqrt(2 pi)
    return cdf + x * pdf;
  } else if constexpr (A == Activation::kGeluTanh) {
    const float k = 0.79788456080286536f;
    const float c = 0.044715f;
    const float t = tanhf(k * (x + c * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * c * x * x);
  } else {  // kSilu
    const float s = sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
  }
}

// The element range of thread t: the full vector [t VEC, t VEC + VEC) when t < n / VEC, else the single
// tail element n_vec VEC + (t - n_vec). Returns the number of elements (VEC, 1 or 0) and the first index.
template <int VEC>
__device__ __forceinline__ int thread_elements(size_t n, size_t* first) {
  const size_t t = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t n_vec = n / VEC;
  if (t < n_vec) {
    *first = t * VEC;
    return VEC;
  }
  *first = n_vec * VEC + (t - n_vec);
  return *first < n ? 1 : 0;
}

}  // namespace activation_detail

// ---------------------------------------------------------------------------------------------------------
// Kernels.

// out = f(x).
template <Activation A, int VEC, typename T>
__global__ void activation_forward_kernel(T* out, const T* x, size_t n, float leaky_slope) {
  size_t i;
  const int count = activation_detail::thread_elements<VEC>(n, &i);
  if (count == VEC) {
    float v[VEC];
    load_floats<VEC>(v, x + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = activation_detail::value<A>(v[k], leaky_slope);
    store_floats<VEC>(out + i, v);
  } else if (count == 1) {
    out[i] = from_float<T>(activation_detail::value<A>(to_float(x[i]), leaky_slope));
  }
}

// dx = dout * f'(x).
template <Activation A, int VEC, typename T>
__global__ void activation_backward_kernel(T* dx, const T* dout, const T* x, size_t n, float leaky_slope) {
  size_t i;
  const int count = activation_detail::thread_elements<VEC>(n, &i);
  if (count == VEC) {
    float xv[VEC], g[VEC];
    load_floats<VEC>(xv, x + i);
    load_floats<VEC>(g, dout + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] *= activation_detail::derivative<A>(xv[k], leaky_slope);
    store_floats<VEC>(dx + i, g);
  } else if (count == 1) {
    dx[i] = from_float<T>(to_float(dout[i]) * activation_detail::derivative<A>(to_float(x[i]), leaky_slope));
  }
}

// out = silu(gate) * up.
template <int VEC, typename T>
__global__ void swiglu_forward_kernel(T* out, const T* gate, const T* up, size_t n) {
  size_t i;
  const int count = activation_detail::thread_elements<VEC>(n, &i);
  if (count == VEC) {
    float g[VEC], u[VEC];
    load_floats<VEC>(g, gate + i);
    load_floats<VEC>(u, up + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] = g[k] * activation_detail::sigmoid(g[k]) * u[k];
    store_floats<VEC>(out + i, g);
  } else if (count == 1) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(g * activation_detail::sigmoid(g) * to_float(up[i]));
  }
}

// The SwiGLU gradients of one element: dgate = dout * up * silu'(gate), dup = dout * silu(gate).
__device__ __forceinline__ void swiglu_grad(float* dgate, float* dup, float dout, float gate, float up) {
  const float s = activation_detail::sigmoid(gate);
  const float silu = gate * s;
  const float dsilu = s * (1.0f + gate * (1.0f - s));
  *dgate = dout * up * dsilu;
  *dup = dout * silu;
}

template <int VEC, typename T>
__global__ void swiglu_backward_kernel(T* dgate, T* dup, const T* dout, const T* gate, const T* up,
                                       size_t n) {
  size_t i;
  const int count = activation_detail::thread_elements<VEC>(n, &i);
  if (count == VEC) {
    float g[VEC], u[VEC], d[VEC], dg[VEC], du[VEC];
    load_floats<VEC>(g, gate + i);
    load_floats<VEC>(u, up + i);
    load_floats<VEC>(d, dout + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) swiglu_grad(&dg[k], &du[k], d[k], g[k], u[k]);
    store_floats<VEC>(dgate + i, dg);
    store_floats<VEC>(dup + i, du);
  } else if (count == 1) {
    float dg, du;
    swiglu_grad(&dg, &du, to_float(dout[i]), to_float(gate[i]), to_float(up[i]));
    dgate[i] = from_float<T>(dg);
    dup[i] = from_float<T>(du);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers. n elements; every pointer is [n]. leaky_slope is used by kLeakyRelu only.

namespace activation_detail {

constexpr int kThreads = 256;

// Threads needed: one per full vector plus one per tail element.
template <int VEC>
inline int blocks_for(size_t n) {
  return ceil_div(static_cast<long long>(n / VEC + n % VEC), kThreads);
}

template <int VEC, typename T>
void launch_forward(Activation act, T* out, const T* x, size_t n, float slope, cudaStream_t stream) {
  const int blocks = blocks_for<VEC>(n);
  switch (act) {
    case Activation::kRelu:
      activation_forward_kernel<Activation::kRelu, VEC><<<blocks, kThreads, 0, stream>>>(out, x, n, slope);
      break;
    case Activation::kLeakyRelu:
      activation_forward_kernel<Activation::kLeakyRelu, VEC>
          <<<blocks, kThreads, 0, stream>>>(out, x, n, slope);
      break;
    case Activation::kGeluErf:
      activation_forward_kernel<Activation::kGeluErf, VEC><<<blocks, kThreads, 0, stream>>>(out, x, n, slope);
      break;
    case Activation::kGeluTanh:
      activation_forward_kernel<Activation::kGeluTanh, VEC>
          <<<blocks, kThreads, 0, stream>>>(out, x, n, slope);
      break;
    case Activation::kSilu:
      activation_forward_kernel<Activation::kSilu, VEC><<<blocks, kThreads, 0, stream>>>(out, x, n, slope);
      break;
    default:
      throw std::invalid_argument("activation_forward: unknown activation");
  }
  CUDA_CHECK_LAUNCH();
}

template <int VEC, typename T>
void launch_backward(Activation act, T* dx, const T* dout, const T* x, size_t n, float slope,
                     cudaStream_t stream) {
  const int blocks = blocks_for<VEC>(n);
  switch (act) {
    case Activation::kRelu:
      activation_backward_kernel<Activation::kRelu, VEC>
          <<<blocks, kThreads, 0, stream>>>(dx, dout, x, n, slope);
      break;
    case Activation::kLeakyRelu:
      activation_backward_kernel<Activation::kLeakyRelu, VEC>
          <<<blocks, kThreads, 0, stream>>>(dx, dout, x, n, slope);
      break;
    case Activation::kGeluErf:
      activation_backward_kernel<Activation::kGeluErf, VEC>
          <<<blocks, kThreads, 0, stream>>>(dx, dout, x, n, slope);
      break;
    case Activation::kGeluTanh:
      activation_backward_kernel<Activation::kGeluTanh, VEC>
          <<<blocks, kThreads, 0, stream>>>(dx, dout, x, n, slope);
      break;
    case Activation::kSilu:
      activation_backward_kernel<Activation::kSilu, VEC>
          <<<blocks, kThreads, 0, stream>>>(dx, dout, x, n, slope);
      break;
    default:
      throw std::invalid_argument("activation_backward: unknown activation");
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace activation_detail

// out = f(x) over n elements. out may alias x.
template <typename T>
void activation_forward(T* out, const T* x, size_t n, Activation act, float leaky_slope, cudaStream_t stream,
                        KernelVariant variant = KernelVariant::kAuto) {
  NvtxRange range("activation_forward");
  if (n == 0) return;
  constexpr int V = vec16<T>();
  const bool aligned = is_aligned(out, 16) && is_aligned(x, 16);
  if (use_fast_variant(variant, aligned, "activation_forward")) {
    activation_detail::launch_forward<V>(act, out, x, n, leaky_slope, stream);
  } else {
    activation_detail::launch_forward<1>(act, out, x, n, leaky_slope, stream);
  }
}

// dx = dout * f'(x) over n elements; dx is overwritten and may alias dout.
template <typename T>
void activation_backward(T* dx, const T* dout, const T* x, size_t n, Activation act, float leaky_slope,
                         cudaStream_t stream, KernelVariant variant = KernelVariant::kAuto) {
  NvtxRange range("activation_backward");
  if (n == 0) return;
  constexpr int V = vec16<T>();
  const bool aligned = is_aligned(dx, 16) && is_aligned(dout, 16) && is_aligned(x, 16);
  if (use_fast_variant(variant, aligned, "activation_backward")) {
    activation_detail::launch_backward<V>(act, dx, dout, x, n, leaky_slope, stream);
  } else {
    activation_detail::launch_backward<1>(act, dx, dout, x, n, leaky_slope, stream);
  }
}

// out = silu(gate) * up over n elements. out may alias gate or up.
template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, size_t n, cudaStream_t stream,
                    KernelVariant variant = KernelVariant::kAuto) {
  NvtxRange range("swiglu_forward");
  if (n == 0) return;
  constexpr int V = vec16<T>();
  const int threads = activation_detail::kThreads;
  const bool aligned = is_aligned(out, 16) && is_aligned(gate, 16) && is_aligned(up, 16);
  if (use_fast_variant(variant, aligned, "swiglu_forward")) {
    swiglu_forward_kernel<V><<<activation_detail::blocks_for<V>(n), threads, 0, stream>>>(out, gate, up, n);
  } else {
    swiglu_forward_kernel<1><<<activation_detail::blocks_for<1>(n), threads, 0, stream>>>(out, gate, up, n);
  }
  CUDA_CHECK_LAUNCH();
}

// dgate = dout * up * silu'(gate), dup = dout * silu(gate) over n elements; both overwritten. dgate may
// alias gate and dup may alias up (each thread reads its elements before writing them).
template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, size_t n,
                     cudaStream_t stream, KernelVariant variant = KernelVariant::kAuto) {
  NvtxRange range("swiglu_backward");
  if (n == 0) return;
  constexpr int V = vec16<T>();
  const int threads = activation_detail::kThreads;
  const bool aligned = is_aligned(dgate, 16) && is_aligned(dup, 16) && is_aligned(dout, 16) &&
                       is_aligned(gate, 16) && is_aligned(up, 16);
  if (use_fast_variant(variant, aligned, "swiglu_backward")) {
    swiglu_backward_kernel<V>
        <<<activation_detail::blocks_for<V>(n), threads, 0, stream>>>(dgate, dup, dout, gate, up, n);
  } else {
    swiglu_backward_kernel<1>
        <<<activation_detail::blocks_for<1>(n), threads, 0, stream>>>(dgate, dup, dout, gate, up, n);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace llm::cuda
