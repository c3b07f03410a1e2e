// The 8-bit AdamW step on the GPU: AdamW whose moments are stored blockwise-quantised in one byte each,
// with exactly the code of the CPU reference (train/optim_adamw8bit.h, which describes the two code
// tables, the rounding rule and the state layout), so that CPU and GPU states agree code for code.
//
// Math, per quantisation block of `block` elements (the last one may be shorter) of one tensor:
//   m, v  = code_m[m_codes] * m_absmax,  code_v[v_codes] * v_absmax             (fp32 products)
//   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2                             (fp64, rounded to fp32)
//   w = w - lr wd w;   if v > 0: w = w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//   m_absmax = max |m|,  v_absmax = max |v|                                      (over the block)
//   codes = index of the code value nearest to x / absmax (one fp32 division), judged against the
//           midpoints of neighbouring values, ties to the lower code; all-zero block -> the zero code
// No backward pass. One CUDA block per quantisation block: the fresh m and v wait in shared memory for
// the block's absmax (a max, so exact and order independent), then every element is quantised by a
// binary search over the midpoints. The fp64 arithmetic uses the explicitly rounded intrinsics
// (__dmul_rn, __dadd_rn, ...), which the compiler never fuses into FMAs: the CPU reference (x86-64, no
// FMA contraction) rounds after every operation, so both sides produce the same bits and hence the
// same codes. Deterministic.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda_common.cuh"
#include "kernels/nvtx.cuh"

namespace llm::cuda {

// The two code tables as the CPU builds them: values ascending, midpoint[i] between value[i] and
// value[i + 1], `count` codes in use (255 signed, 256 unsigned).
struct Q8Tables {
  float signed_value[256], signed_mid[256];
  float unsigned_value[256], unsigned_mid[256];
  int signed_count, unsigned_count;
};

namespace adamw8bit_detail {

constexpr int kThreads = 256;
constexpr int kMaxBlock = 4096;  // 32 KB of shared memory for the fresh m and v

// std::lower_bound over mid[0 .. count - 2]: the first midpoint >= x (NaN -> 0, as on the CPU).
__device__ __forceinline__ uint8_t nearest(const float* mid, int count, float x) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int m = (lo + hi) / 2;
    if (mid[m] < x) {
      lo = m + 1;
    } else {
      hi = m;
    }
  }
  return static_cast<uint8_t>(lo);
}

__device__ __forceinline__ float block_max(float v, float* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total = fmaxf(total, shared[w]);
  return total;
}

}  // namespace adamw8bit_detail

template <typename TP, typename TG>
__global__ void adamw8bit_kernel(TP* param, float* master, uint8_t* m_codes, float* m_absmax,
                                 uint8_t* v_codes, float* v_absmax, const TG* grad, const float* grad_scale,
                                 const Q8Tables* tables, size_t n, int block, double lr, double beta1,
                                 double beta2, double eps, double weight_decay, double bias1, double bias2) {
  extern __shared__ float fresh[];  // m: [block], v: [block]
  __shared__ Q8Tables t;
  __shared__ float red[32];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    t.signed_value[i] = tables->signed_value[i];
    t.signed_mid[i] = tables->signed_mid[i];
    t.unsigned_value[i] = tables->unsigned_value[i];
    t.unsigned_mid[i] = tables->unsigned_mid[i];
  }
  if (threadIdx.x == 0) {
    t.signed_count = tables->signed_count;
    t.unsigned_count = tables->unsigned_count;
  }
  __syncthreads();
  float* fm = fresh;
  float* fv = fresh + block;
  const size_t b = blockIdx.x;
  const size_t start = b * static_cast<size_t>(block);
  const int len = static_cast<int>(min(static_cast<size_t>(block), n - start));
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  const float ma = m_absmax[b], va = v_absmax[b];
  float local_m = 0.0f, local_v = 0.0f;
  for (int k = threadIdx.x; k < len; k += blockDim.x) {
    const size_t i = start + k;
    const float m_old = t.signed_value[m_codes[i]] * ma;
    const float v_old = t.unsigned_value[v_codes[i]] * va;
    const double g = static_cast<double>(to_float(grad[i]) * scale);
    const double mi = __dadd_rn(__dmul_rn(beta1, m_old), __dmul_rn(1.0 - beta1, g));
    const double vi = __dadd_rn(__dmul_rn(beta2, v_old), __dmul_rn(__dmul_rn(1.0 - beta2, g), g));
    fm[k] = static_cast<float>(mi);
    fv[k] = static_cast<float>(vi);
    local_m = fmaxf(local_m, fabsf(fm[k]));
    local_v = fmaxf(local_v, fabsf(fv[k]));
    double w = master[i];
    w = __dsub_rn(w, __dmul_rn(__dmul_rn(lr, weight_decay), w));
    if (vi > 0.0) {
      const double num = __dmul_rn(lr, __ddiv_rn(mi, bias1));
      const double den = __dadd_rn(__dsqrt_rn(__ddiv_rn(vi, bias2)), eps);
      w = __dsub_rn(w, __ddiv_rn(num, den));
    }
    master[i] = static_cast<float>(w);
    if (param != nullptr) param[i] = from_float<TP>(static_cast<float>(w));
  }
  const float new_ma = adamw8bit_detail::block_max(local_m, red);
  const float new_va = adamw8bit_detail::block_max(local_v, red);
  for (int k = threadIdx.x; k < len; k += blockDim.x) {
    const size_t i = start + k;
    m_codes[i] = new_ma > 0.0f
                     ? adamw8bit_detail::nearest(t.signed_mid, t.signed_count, __fdiv_rn(fm[k], new_ma))
                     : static_cast<uint8_t>(127);
    v_codes[i] = new_va > 0.0f
                     ? adamw8bit_detail::nearest(t.unsigned_mid, t.unsigned_count, __fdiv_rn(fv[k], new_va))
                     : static_cast<uint8_t>(0);
  }
  if (threadIdx.x == 0) {
    m_absmax[b] = new_ma;
    v_absmax[b] = new_va;
  }
}

// One 8-bit AdamW step on one tensor of n parameters (blocks start at the tensor's first element, as on
// the CPU). m_codes, v_codes: [n] bytes; m_absmax, v_absmax: [ceil(n / block)]; tables: a device copy
// of the code tables (see make_q8_tables in kernels/cuda_optimizers.h). lr: this tensor's learning
// rate; step counts from 1.
template <typename TP, typename TG>
void adamw8bit_update(TP* param, float* master, uint8_t* m_codes, float* m_absmax, uint8_t* v_codes,
                      float* v_absmax, const TG* grad, const float* grad_scale, const Q8Tables* tables,
                      size_t n, int block, double lr, double beta1, double beta2, double eps,
                      double weight_decay, int64_t step, cudaStream_t stream) {
  NvtxRange range("adamw8bit_update");
  if (step < 1) throw std::invalid_argument("adamw8bit_update: step counts from 1");
  if (block < 1 || block > adamw8bit_detail::kMaxBlock) {
    throw std::invalid_argument("adamw8bit_update: block size " + std::to_string(block) + " outside 1.." +
                                std::to_string(adamw8bit_detail::kMaxBlock));
  }
  if (n == 0) return;
  // Bias corrections in double on the host, as the CPU computes them.
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const size_t blocks = (n + static_cast<size_t>(block) - 1) / static_cast<size_t>(block);
  const int threads = std::min(adamw8bit_detail::kThreads, ((block + 31) / 32) * 32);
  const size_t shared = 2 * static_cast<size_t>(block) * sizeof(float);
  adamw8bit_kernel<<<static_cast<unsigned>(blocks), threads, shared, stream>>>(
      param, master, m_codes, m_absmax, v_codes, v_absmax, grad, grad_scale, tables, n, block, lr, beta1,
      beta2, eps, weight_decay, bias1, bias2);
  CUDA_CHECK_LAUNCH();
}

}  // namespace llm::cuda
