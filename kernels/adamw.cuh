// The AdamW step on the GPU: the global gradient norm, the clipping scale, and the update of the fp32
// master weights, which also writes the bf16 (or fp32) working copy the model computes with.
//
// Math (as in train/optimizer.h, which follows torch.optim.AdamW; step t counts from 1):
//   norm  = sqrt(sum_i g_i^2)                               over the whole flat gradient buffer
//   scale = max_norm / norm if max_norm > 0 and norm > max_norm, else 1   (gradient clipping)
//   g     = scale * grad
//   m     = b1 m + (1 - b1) g,      v = b2 v + (1 - b2) g^2
//   w     = w - lr wd w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// with decoupled weight decay (applied to the weight, not added to the gradient). An optimizer has no
// backward pass. The step works on a flat slice of parameters, gradients and state, so a ZeRO-1 shard can
// call it on its own slice; the clipping scale is read from device memory, so no host sync is needed
// between the norm and the update.
//
// Deterministic norm (two passes, no atomics): pass 1 runs a grid whose size depends on n only; each thread
// sums g^2 over a fixed grid-stride set of elements in fp64, each block reduces its threads in a fixed tree
// and writes one partial. Pass 2 is one block of kMaxNormBlocks threads: thread t holds partial t, and the
// same fixed tree adds them, then sqrt. (A single thread adding up to 1024 partials in a row was most of the
// norm's time at 16K x 2048, 37 % of copy bandwidth on the H200.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda_common.cuh"
#include "kernels/kernel_utils.cuh"
#include "kernels/nvtx.cuh"

namespace llm::cuda {

// ---------------------------------------------------------------------------------------------------------
// Kernels.

// Pass 1: partials[blockIdx.x] = sum of g^2 over this block's elements (fp64).
template <int VEC, typename TG>
__global__ void grad_norm_partials_kernel(double* partials, const TG* grad, size_t n) {
  __shared__ double shared[32];
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t n_vec = n / VEC;
  double acc = 0.0;
#pragma unroll 4  // several loads in flight per thread; the additions stay in element order
  for (size_t p = tid; p < n_vec; p += stride) {
    float g[VEC];
    load_floats<VEC>(g, grad + p * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc += static_cast<double>(g[k]) * g[k];
  }
  for (size_t i = n_vec * VEC + tid; i < n; i += stride) {
    const double g = to_float(grad[i]);
    acc += g * g;
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// Pass 2: one block adds the partials in a fixed tree (thread t starts from partials t, t + blockDim.x, ...).
// static: the header is included by several .cu files of one library.
static __global__ void grad_norm_finalize_kernel(float* norm, float* clip_scale, const double* partials,
                                                 int count, float max_norm) {
  __shared__ double shared[32];
  double own = 0.0;
  for (int b = threadIdx.x; b < count; b += blockDim.x) own += partials[b];
  const double total = block_sum(own, shared);
  if (threadIdx.x != 0) return;
  const double value = sqrt(total);
  *norm = static_cast<float>(value);
  *clip_scale = (max_norm > 0.0f && value > max_norm) ? static_cast<float>(max_norm / value) : 1.0f;
}

// The update of VEC consecutive parameters per thread (the n % VEC left at the end one per thread).
template <int VEC, typename TP, typename TG>
__global__ void adamw_kernel(TP* param, float* master, float* m, float* v, const TG* grad,
                             const float* grad_scale, size_t n, float lr, float beta1, float one_minus_beta1,
                             float beta2, float one_minus_beta2, float eps, float weight_decay,
                             float bias_correction1, float bias_correction2) {
  const size_t t = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t n_vec = n / VEC;
  size_t first;
  int count;
  if (t < n_vec) {
    first = t * VEC;
    count = VEC;
  } else {
    first = n_vec * VEC + (t - n_vec);
    count = first < n ? 1 : 0;
  }
  if (count == 0) return;

  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  float g[VEC], w[VEC], mv[VEC], vv[VEC];
  if (count == VEC) {
    load_floats<VEC>(g, grad + first);
    load_floats<VEC>(w, master + first);
    load_floats<VEC>(mv, m + first);
    load_floats<VEC>(vv, v + first);
  } else {
    g[0] = to_float(grad[first]);
    w[0] = master[first];
    mv[0] = m[first];
    vv[0] = v[first];
  }
  for (int k = 0; k < count; ++k) {
    const float gk = g[k] * scale;
    mv[k] = beta1 * mv[k] + one_minus_beta1 * gk;
    vv[k] = beta2 * vv[k] + one_minus_beta2 * gk * gk;
    w[k] -= lr * weight_decay * w[k];
    w[k] -= lr * (mv[k] / bias_correction1) / (sqrtf(vv[k] / bias_correction2) + eps);
  }
  if (count == VEC) {
    store_floats<VEC>(master + first, w);
    store_floats<VEC>(m + first, mv);
    store_floats<VEC>(v + first, vv);
    if (param != nullptr) store_floats<VEC>(param + first, w);
  } else {
    master[first] = w[0];
    m[first] = mv[0];
    v[first] = vv[0];
    if (param != nullptr) param[first] = from_float<TP>(w[0]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.

namespace adamw_detail {

constexpr int kThreads = 256;
constexpr int kMaxNormBlocks = 1024;
constexpr long long kElementsPerNormThread = 16;  // below this many elements per thread, fewer blocks

// Blocks of the norm's first pass: a function of n only (never of the device), so the bits are reproducible.
inline int norm_blocks(size_t n) {
  const long long wanted = (static_cast<long long>(n) + kThreads * kElementsPerNormThread - 1) /
                           (kThreads * kElementsPerNormThread);
  return static_cast<int>(std::max(1LL, std::min(wanted, static_cast<long long>(kMaxNormBlocks))));
}

}  // namespace adamw_detail

// Doubles of scratch global_grad_norm needs for n gradient elements.
inline size_t grad_norm_scratch_doubles(size_t n) {
  return static_cast<size_t>(adamw_detail::norm_blocks(n));
}

// norm = ||grad||_2 over n elements; clip_scale = max_norm / norm when max_norm > 0 and norm > max_norm,
// else 1 (both single floats in device memory). scratch: grad_norm_scratch_doubles(n) doubles.
template <typename TG>
void global_grad_norm(float* norm, float* clip_scale, double* scratch, size_t scratch_doubles, const TG* grad,
                      size_t n, float max_norm, cudaStream_t stream,
                      KernelVariant variant = KernelVariant::kAuto) {
  NvtxRange range("global_grad_norm");
  const int blocks = adamw_detail::norm_blocks(n);
  if (scratch == nullptr || scratch_doubles < static_cast<size_t>(blocks)) {
    throw std::invalid_argument("global_grad_norm: scratch has " + std::to_string(scratch_doubles) +
                                " doubles, needs " + std::to_string(blocks) + " (grad_norm_scratch_doubles)");
  }
  constexpr int VF = vec16<TG>();
  if (use_fast_variant(variant, is_aligned(grad, 16), "global_grad_norm")) {
    grad_norm_partials_kernel<VF><<<blocks, adamw_detail::kThreads, 0, stream>>>(scratch, grad, n);
  } else {
    grad_norm_partials_kernel<1><<<blocks, adamw_detail::kThreads, 0, stream>>>(scratch, grad, n);
  }
  CUDA_CHECK_LAUNCH();
  grad_norm_finalize_kernel<<<1, adamw_detail::kMaxNormBlocks, 0, stream>>>(norm, clip_scale, scratch, blocks,
                                                                            max_norm);
  CUDA_CHECK_LAUNCH();
}

// One AdamW step over n parameters. master, m, v (fp32) are read and written; param (TP, the working copy;
// may be null) is overwritten with the new master weights rounded to TP. grad (TG) is multiplied by
// *grad_scale (device; null means 1), e.g. the clip_scale of global_grad_norm. step counts from 1.
// beta1, beta2: the config's doubles, uncast (a float-rounded beta2 = 0.999 shifts v by 1.3e-5).
template <typename TP, typename TG>
void adamw_update(TP* param, float* master, float* m, float* v, const TG* grad, const float* grad_scale,
                  size_t n, float lr, double beta1, double beta2, float eps, float weight_decay, int64_t step,
                  cudaStream_t stream, KernelVariant variant = KernelVariant::kAuto) {
  NvtxRange range("adamw_update");
  if (step < 1) throw std::invalid_argument("adamw_update: step counts from 1");
  if (n == 0) return;
  // Bias corrections and 1 - b in double on the host, as the CPU optimizer computes them: in fp32,
  // 1 - float(0.999) is 1.3e-5 off 0.001, which v would carry.
  const float bias1 = static_cast<float>(1.0 - std::pow(beta1, static_cast<double>(step)));
  const float bias2 = static_cast<float>(1.0 - std::pow(beta2, static_cast<double>(step)));
  const float b1 = static_cast<float>(beta1), one_minus_b1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), one_minus_b2 = static_cast<float>(1.0 - beta2);
  // Four parameters per thread: 16 bytes of each fp32 array, 8 or 16 bytes of the TP and TG arrays.
  constexpr int VF = 4;
  const bool aligned = is_aligned(master, 16) && is_aligned(m, 16) && is_aligned(v, 16) &&
                       is_aligned(grad, vec_alignment<VF, TG>()) &&
                       (param == nullptr || is_aligned(param, vec_alignment<VF, TP>()));
  if (use_fast_variant(variant, aligned, "adamw_update")) {
    const int blocks = ceil_div(static_cast<long long>(n / VF + n % VF), adamw_detail::kThreads);
    adamw_kernel<VF><<<blocks, adamw_detail::kThreads, 0, stream>>>(param, master, m, v, grad, grad_scale, n,
                                                                    lr, b1, one_minus_b1, b2, one_minus_b2,
                                                                    eps, weight_decay, bias1, bias2);
  } else {
    const int blocks = ceil_div(static_cast<long long>(n), adamw_detail::kThreads);
    adamw_kernel<1><<<blocks, adamw_detail::kThreads, 0, stream>>>(param, master, m, v, grad, grad_scale, n,
                                                                   lr, b1, one_minus_b1, b2, one_minus_b2,
                                                                   eps, weight_decay, bias1, bias2);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace llm::cuda
