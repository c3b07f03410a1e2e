// Inverted dropout with a counter-based (Philox) mask, forward and backward, on the GPU.
//
// Math (derivation in kernels/cpu/dropout.h, which these kernels match draw for draw):
//   u_i    = philox_mask_uniform(seed, stream_id, i)     (kernels/philox.h; i = the element index)
//   keep_i = [u_i >= p]
//   out_i  = keep_i * in_i * scale,   scale = 1 / (1 - p) evaluated in fp32
// For a fixed mask the op is linear and diagonal, so the backward pass is the same map applied to the
// gradient: din_i = keep_i * dout_i * scale. The mask is never stored: the backward kernel draws the same
// u_i from the same (seed, stream_id, i). din is an activation gradient and is overwritten (=).
// Edge cases as in the reference: p <= 0 copies, p >= 1 writes zeros.
//
// Kernel: one thread per VEC consecutive elements (clear VEC = 1, fast 16 bytes), tail elements one per
// thread (see kernels/activations.cuh for the same layout). A thread's elements start at a multiple of VEC
// and VEC divides 8, so they share one packed Philox block, philox_at(seed, stream_id, first / 8): the fast
// bf16 kernel makes one Philox call per eight elements, the clear one a call per element.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cuda_common.cuh"
#include "kernels/kernel_utils.cuh"
#include "kernels/nvtx.cuh"
#include "kernels/philox.h"

namespace llm::cuda {

namespace dropout_detail {

// dst_i = keep_i * src_i * scale for the elements of this thread.
template <int VEC, typename T>
__global__ void dropout_kernel(T* dst, const T* src, size_t n, float p, float scale, uint64_t seed,
                               uint64_t stream_id) {
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

  float v[VEC];
  if (count == VEC) {
    load_floats<VEC>(v, src + first);
  } else {
    v[0] = to_float(src[first]);
  }
  static_assert(8 % VEC == 0, "a thread's elements must lie in one packed Philox block");
  if (p >= 1.0f) {
    for (int k = 0; k < count; ++k) v[k] = 0.0f;
  } else if (p > 0.0f) {
    const llm::Philox4 draws = llm::philox_at(seed, stream_id, first / 8);
    const int lane0 = static_cast<int>(first % 8);
    for (int k = 0; k < count; ++k) {
      const bool keep = llm::philox_mask_lane(draws, lane0 + k) >= p;
      v[k] = keep ? v[k] * scale : 0.0f;
    }
  }
  if (count == VEC) {
    store_floats<VEC>(dst + first, v);
  } else {
    dst[first] = from_float<T>(v[0]);
  }
}

template <typename T>
void launch(const char* name, T* dst, const T* src, size_t n, float p, uint64_t seed, uint64_t stream_id,
            cudaStream_t stream, KernelVariant variant) {
  NvtxRange range(name);
  if (n == 0) return;
  // The same float expression as the reference: 1 / (1 - p) in fp32 (unused when p <= 0 or p >= 1).
  const float scale = (p > 0.0f && p < 1.0f) ? 1.0f / (1.0f - p) : 1.0f;
  constexpr int kThreads = 256;
  constexpr int V = vec16<T>();
  if (use_fast_variant(variant, is_aligned(dst, 16) && is_aligned(src, 16), name)) {
    const int blocks = ceil_div(static_cast<long long>(n / V + n % V), kThreads);
    dropout_kernel<V><<<blocks, kThreads, 0, stream>>>(dst, src, n, p, scale, seed, stream_id);
  } else {
    const int blocks = ceil_div(static_cast<long long>(n), kThreads);
    dropout_kernel<1><<<blocks, kThreads, 0, stream>>>(dst, src, n, p, scale, seed, stream_id);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace dropout_detail

// out = dropout(in) over n elements with drop probability p. out may alias in. `stream_id` names the use
// (layer, site, step); the backward call must pass the same p, seed and stream_id.
template <typename T>
void dropout_forward(T* out, const T* in, size_t n, float p, uint64_t seed, uint64_t stream_id,
                     cudaStream_t stream, KernelVariant variant = KernelVariant::kAuto) {
  dropout_detail::launch("dropout_forward", out, in, n, p, seed, stream_id, stream, variant);
}

// din = keep * dout * scale over n elements, with the forward call's mask; din overwritten (may alias dout).
template <typename T>
void dropout_backward(T* din, const T* dout, size_t n, float p, uint64_t seed, uint64_t stream_id,
                      cudaStream_t stream, KernelVariant variant = KernelVariant::kAuto) {
  dropout_detail::launch("dropout_backward", din, dout, n, p, seed, stream_id, stream, variant);
}

}  // namespace llm::cuda
