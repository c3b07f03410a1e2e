// The Lion step on the GPU (the CPU reference and the paper are in train/optim_lion.h).
//
// Math, per element, with gradient g (times the clipping scale), momentum m, lr and weight decay wd:
//   c = b1 m + (1 - b1) g
//   w = w - lr wd w - lr sign(c)          sign(0) = 0; decoupled weight decay from the old w
//   m = b2 m + (1 - b2) g
// There is no backward pass. Each element is independent, so the kernel is one thread per element and
// bitwise deterministic. The arithmetic is in fp64, as the CPU reference does it (the state stays
// fp32), so fp32 results agree with the CPU to the last bit or two; the kernel is memory bound
// (12 bytes read, 8 written per element), so fp64 costs nothing measurable.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cuda_common.cuh"
#include "kernels/nvtx.cuh"

namespace llm::cuda {

template <typename TP, typename TG>
__global__ void lion_kernel(TP* param, float* master, float* m, const TG* grad, const float* grad_scale,
                            size_t n, double lr, double beta1, double beta2, double weight_decay) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double scale = grad_scale != nullptr ? static_cast<double>(*grad_scale) : 1.0;
  const double g = static_cast<double>(to_float(grad[i])) * scale;
  const double mi = m[i];
  const double c = beta1 * mi + (1.0 - beta1) * g;
  const double sign = c > 0.0 ? 1.0 : (c < 0.0 ? -1.0 : 0.0);
  double w = master[i];
  w -= lr * weight_decay * w;
  w -= lr * sign;
  master[i] = static_cast<float>(w);
  if (param != nullptr) param[i] = from_float<TP>(static_cast<float>(w));
  m[i] = static_cast<float>(beta2 * mi + (1.0 - beta2) * g);
}

// One Lion step over n parameters: master and m (fp32) read and written; param (the working copy, may
// be null) overwritten with the new master rounded to TP; grad multiplied by *grad_scale (device; null
// means 1). lr is this tensor's learning rate (schedule times lr_scale).
template <typename TP, typename TG>
void lion_update(TP* param, float* master, float* m, const TG* grad, const float* grad_scale, size_t n,
                 double lr, double beta1, double beta2, double weight_decay, cudaStream_t stream) {
  NvtxRange range("lion_update");
  if (n == 0) return;
  constexpr int kThreads = 256;
  lion_kernel<<<ceil_div(static_cast<long long>(n), kThreads), kThreads, 0, stream>>>(
      param, master, m, grad, grad_scale, n, lr, beta1, beta2, weight_decay);
  CUDA_CHECK_LAUNCH();
}

}  // namespace llm::cuda
