// The SophiaG step and its Hessian-estimate update on the GPU (the CPU reference, the estimator and
// the defaults are in train/optim_sophia.h).
//
// Math, per element, with gradient g (times the clipping scale), momentum m, Hessian-diagonal EMA h:
//   w = w - lr wd w                                         decoupled weight decay, first
//   m = b1 m + (1 - b1) g
//   w = w - lr sign(m) min(|m| / (rho bs h + 1e-15), 1)     clipped, preconditioned step
// and, when the trainer has the gradient g^ of the loss on labels sampled from the model (every k
// steps), over bs tokens:
//   h = b2 h + (1 - b2) g^ g^
// bs (batch_tokens of the latest estimate) is a host-side number, passed in. Until the first estimate
// h = 0 and the step is lr sign(m). No backward pass; elementwise, so bitwise deterministic. The
// arithmetic is in fp64 like the CPU reference (state fp32), which makes fp32 results agree with it to
// the last bit or two; the kernels are memory bound, so fp64 costs nothing measurable.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cuda_common.cuh"
#include "kernels/nvtx.cuh"

namespace llm::cuda {

template <typename TP, typename TG>
__global__ void sophia_kernel(TP* param, float* master, float* m, const float* h, const TG* grad,
                              const float* grad_scale, size_t n, double lr, double beta1, double curvature,
                              double weight_decay) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double scale = grad_scale != nullptr ? static_cast<double>(*grad_scale) : 1.0;
  const double g = static_cast<double>(to_float(grad[i])) * scale;
  double w = master[i];
  w -= lr * weight_decay * w;
  const double mi = beta1 * m[i] + (1.0 - beta1) * g;
  m[i] = static_cast<float>(mi);
  const double ratio = fmin(fabs(mi) / (curvature * h[i] + 1e-15), 1.0);
  const double sign = mi > 0.0 ? 1.0 : (mi < 0.0 ? -1.0 : 0.0);
  w -= lr * sign * ratio;
  master[i] = static_cast<float>(w);
  if (param != nullptr) param[i] = from_float<TP>(static_cast<float>(w));
}

template <typename TG>
__global__ void sophia_hessian_kernel(float* h, const TG* sampled_grad, size_t n, double beta2) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double g = to_float(sampled_grad[i]);
  h[i] = static_cast<float>(beta2 * h[i] + (1.0 - beta2) * g * g);
}

// One SophiaG step over n parameters: master, m (fp32) read and written, h (fp32) read; param (may be
// null) gets the new master rounded to TP. batch_tokens: bs of the latest Hessian estimate (0 before
// the first). lr is this tensor's learning rate.
template <typename TP, typename TG>
void sophia_update(TP* param, float* master, float* m, const float* h, const TG* grad,
                   const float* grad_scale, size_t n, double lr, double beta1, double rho,
                   double batch_tokens, double weight_decay, cudaStream_t stream) {
  NvtxRange range("sophia_update");
  if (n == 0) return;
  constexpr int kThreads = 256;
  sophia_kernel<<<ceil_div(static_cast<long long>(n), kThreads), kThreads, 0, stream>>>(
      param, master, m, h, grad, grad_scale, n, lr, beta1, rho * batch_tokens, weight_decay);
  CUDA_CHECK_LAUNCH();
}

// h = b2 h + (1 - b2) g^2 over n elements, g the sampled-label gradient.
template <typename TG>
void sophia_hessian_update(float* h, const TG* sampled_grad, size_t n, double beta2, cudaStream_t stream) {
  NvtxRange range("sophia_hessian_update");
  if (n == 0) return;
  constexpr int kThreads = 256;
  sophia_hessian_kernel<<<ceil_div(static_cast<long long>(n), kThreads), kThreads, 0, stream>>>(
      h, sampled_grad, n, beta2);
  CUDA_CHECK_LAUNCH();
}

}  // namespace llm::cuda
