// LayerNorm and RMSNorm fused with the residual add, forward and backward, on the GPU.
//
// Math (full derivations in kernels/cpu/norms.h). Per row of C features:
//   residual_out = residual_in + branch                    (skipped when branch is null: x = residual_in)
//   x = residual_out
//   LayerNorm: mu = mean(x), rstd = 1 / sqrt(mean((x - mu)^2) + eps), xhat = (x - mu) rstd, y = w xhat + b
//   RMSNorm:   mu = 0,       rstd = 1 / sqrt(mean(x^2) + eps),         xhat = x rstd,        y = w xhat
// Backward, with g = dL/dy * w and row means over the C features:
//   LayerNorm: dL/dx = rstd (g - mean(g) - xhat mean(g xhat))
//   RMSNorm:   dL/dx = rstd (g - xhat mean(g xhat))
//   dL/dw = sum over rows of dL/dy xhat,   dL/db = sum over rows of dL/dy.
// The residual add is the identity for both of its inputs, so the gradient of residual_in and of branch
// is the same tensor: the incoming gradient of residual_out (from the blocks above) plus dL/dx. The
// backward kernel therefore ACCUMULATES dL/dx into d_residual in place (+=); afterwards d_residual is the
// gradient of residual_in and of branch alike. dweight and dbias are parameter gradients and accumulate.
//
// Precision: statistics, sums and the arithmetic are fp32; mean and rstd are stored as fp32 [N]. The
// normalised x is the value stored in residual_out (rounded to T), the same x the backward pass reads.
//
// Forward kernel: one block per row, three sweeps (LayerNorm: sum, centred sum of squares, output) or two
// (RMSNorm: sum of squares, output); the block sums are deterministic (kernels/kernel_utils.cuh).
//
// Backward kernels, deterministic without atomics:
//   1. each block takes a fixed range of rows (the split depends on N only, never on the device). For each
//      row it computes the two row means with block sums, writes d_residual, and adds dL/dy xhat and dL/dy
//      into per-channel accumulators in shared memory; each channel belongs to one thread, so there are no
//      races. At the end the block writes its accumulators to its own slice of a scratch buffer:
//      partials[block][0 .. C) for dweight and partials[block][C .. 2C) for dbias.
//   2. a second kernel sums the partials over the blocks in a fixed order and adds the totals to dweight
//      and dbias (+=).
#pragma once

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>

#include "kernels/cuda_common.cuh"
#include "kernels/kernel_utils.cuh"
#include "kernels/nvtx.cuh"

namespace llm::cuda {

// ---------------------------------------------------------------------------------------------------------
// Kernels.

// One block per row. kLayerNorm selects LayerNorm (centred, optional bias) over RMSNorm.
template <bool kLayerNorm, int VEC, typename T>
__global__ void residual_norm_forward_kernel(T* residual_out, T* out, float* mean, float* rstd,
                                             const T* residual_in, const T* branch, const T* weight,
                                             const T* bias, int C, float eps) {
  __shared__ float shared[32];
  const size_t row_offset = static_cast<size_t>(blockIdx.x) * C;
  // The row that gets normalised: the sum as stored in residual_out, or residual_in when there is no branch.
  const T* x = (branch != nullptr ? residual_out : residual_in) + row_offset;

  // Sweep 1: the residual add (stored), and the sum of x (LayerNorm) or of x^2 (RMSNorm).
  float sum = 0.0f;
  for (int c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    float v[VEC];
    load_floats<VEC>(v, residual_in + row_offset + c);
    if (branch != nullptr) {
      float b[VEC];
      load_floats<VEC>(b, branch + row_offset + c);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] += b[k];
      store_floats<VEC>(residual_out + row_offset + c, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = round_to<T>(v[k]);  // normalise what was stored
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += kLayerNorm ? v[k] : v[k] * v[k];
  }
  sum = block_sum(sum, shared);

  float mu = 0.0f;
  float rs;
  if constexpr (kLayerNorm) {
    // Sweep 2 (LayerNorm): the variance about the mean, summed as squares of differences (no cancellation).
    mu = sum / C;
    float sq = 0.0f;
    for (int c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
      float v[VEC];
      load_floats<VEC>(v, x + c);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sq += (v[k] - mu) * (v[k] - mu);
    }
    sq = block_sum(sq, shared);
    rs = 1.0f / sqrtf(sq / C + eps);
  } else {
    rs = 1.0f / sqrtf(sum / C + eps);
  }
  if (threadIdx.x == 0) {
    if constexpr (kLayerNorm) mean[blockIdx.x] = mu;
    rstd[blockIdx.x] = rs;
  }

  // Last sweep: y = w xhat (+ b).
  for (int c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    float v[VEC], w[VEC], b[VEC];
    load_floats<VEC>(v, x + c);
    load_floats<VEC>(w, weight + c);
    if (kLayerNorm && bias != nullptr) {
      load_floats<VEC>(b, bias + c);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) b[k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = (v[k] - mu) * rs * w[k] + b[k];
    store_floats<VEC>(out + row_offset + c, v);
  }
}

// Step 1 of the backward pass: rows [blockIdx.x * rows_per_block, ...). Dynamic shared memory: 2 C floats
// (LayerNorm) or C floats (RMSNorm). partials: [gridDim.x][2 C].
template <bool kLayerNorm, int VEC, typename T>
__global__ void residual_norm_backward_kernel(T* d_residual, float* partials, const T* dout, const T* x,
                                              const float* mean, const float* rstd, const T* weight, int N,
                                              int C, int rows_per_block) {
  extern __shared__ float accumulators[];
  __shared__ float shared[32];
  float* dw_acc = accumulators;
  float* db_acc = accumulators + C;  // LayerNorm only
  for (int c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      dw_acc[c + k] = 0.0f;
      if constexpr (kLayerNorm) db_acc[c + k] = 0.0f;
    }
  }

  const int row_begin = blockIdx.x * rows_per_block;
  const int row_end = min(N, row_begin + rows_per_block);
  for (int row = row_begin; row < row_end; ++row) {
    const size_t row_offset = static_cast<size_t>(row) * C;
    const float mu = kLayerNorm ? mean[row] : 0.0f;
    const float rs = rstd[row];

    // Sweep 1: the row sums of g and of g xhat.
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    for (int c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
      float xv[VEC], dy[VEC], w[VEC];
      load_floats<VEC>(xv, x + row_offset + c);
      load_floats<VEC>(dy, dout + row_offset + c);
      load_floats<VEC>(w, weight + c);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = (xv[k] - mu) * rs;
        const float g = dy[k] * w[k];
        sum_g += g;
        sum_g_xhat += g * xhat;
      }
    }
    if constexpr (kLayerNorm) sum_g = block_sum(sum_g, shared);
    sum_g_xhat = block_sum(sum_g_xhat, shared);
    const float mean_g = kLayerNorm ? sum_g / C : 0.0f;
    const float mean_g_xhat = sum_g_xhat / C;

    // Sweep 2: d_residual += dL/dx; the parameter-gradient terms go to this thread's accumulators.
    for (int c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
      float xv[VEC], dy[VEC], w[VEC], dr[VEC];
      load_floats<VEC>(xv, x + row_offset + c);
      load_floats<VEC>(dy, dout + row_offset + c);
      load_floats<VEC>(w, weight + c);
      load_floats<VEC>(dr, d_residual + row_offset + c);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = (xv[k] - mu) * rs;
        const float g = dy[k] * w[k];
        dr[k] += rs * (g - mean_g - xhat * mean_g_xhat);
        dw_acc[c + k] += dy[k] * xhat;
        if constexpr (kLayerNorm) db_acc[c + k] += dy[k];
      }
      store_floats<VEC>(d_residual + row_offset + c, dr);
    }
  }

  float* my_partials = partials + static_cast<size_t>(blockIdx.x) * 2 * C;
  for (int c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      my_partials[c + k] = dw_acc[c + k];
      if constexpr (kLayerNorm) my_partials[C + c + k] = db_acc[c + k];
    }
  }
}

// Step 2: dweight[c] += sum over blocks of partials[b][c] (and dbias from partials[b][C + c]). Block
// (32, 8): thread (tx, ty) sums the blocks b = ty, ty + 8, ... of channel c in increasing b; thread ty = 0
// then adds the 8 sums in order of ty. The order depends only on the number of blocks.
template <typename T>
__global__ void norm_param_grad_kernel(T* dweight, T* dbias, const float* partials, int blocks, int C) {
  __shared__ float s_dw[8][32];
  __shared__ float s_db[8][32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * 32 + tx;
  float dw = 0.0f, db = 0.0f;
  if (c < C) {
    for (int b = ty; b < blocks; b += 8) {
      const float* p = partials + static_cast<size_t>(b) * 2 * C;
      dw += p[c];
      if (dbias != nullptr) db += p[C + c];
    }
  }
  s_dw[ty][tx] = dw;
  s_db[ty][tx] = db;
  __syncthreads();
  if (ty != 0 || c >= C) return;
  float total_dw = 0.0f, total_db = 0.0f;
  for (int k = 0; k < 8; ++k) {
    total_dw += s_dw[k][tx];
    total_db += s_db[k][tx];
  }
  if (dweight != nullptr) dweight[c] = from_float<T>(to_float(dweight[c]) + total_dw);
  if (dbias != nullptr) dbias[c] = from_float<T>(to_float(dbias[c]) + total_db);
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.

namespace norms_detail {

constexpr int kThreads = 256;
constexpr int kMinRowsPerBlock = 8;
constexpr int kMaxBackwardBlocks = 1024;

// The backward row split: a function of N only, so the summation order (and the bits) never depend on the
// device.
struct BackwardSplit {
  int blocks;
  int rows_per_block;
};
inline BackwardSplit backward_split(int N) {
  const int wanted = std::max(1, std::min(ceil_div(N, kMinRowsPerBlock), kMaxBackwardBlocks));
  const int rows_per_block = std::max(1, ceil_div(N, wanted));
  return {std::max(1, ceil_div(N, rows_per_block)), rows_per_block};
}

inline bool aligned16(const void* p) {
  return p == nullptr || is_aligned(p, 16);
}

template <bool kLayerNorm, typename T>
void forward(const char* name, T* residual_out, T* out, float* mean, float* rstd, const T* residual_in,
             const T* branch, const T* weight, const T* bias, int N, int C, float eps, cudaStream_t stream,
             KernelVariant variant) {
  NvtxRange range(name);
  if (N <= 0 || C <= 0) return;
  if (branch != nullptr && residual_out == nullptr) {
    throw std::invalid_argument(std::string(name) + ": a branch needs a residual_out to write the sum to");
  }
  constexpr int VF = vec16<T>();
  const bool aligned = C % VF == 0 && aligned16(residual_out) && aligned16(out) && aligned16(residual_in) &&
                       aligned16(branch) && aligned16(weight) && aligned16(bias);
  if (use_fast_variant(variant, aligned, name)) {
    residual_norm_forward_kernel<kLayerNorm, VF><<<N, kThreads, 0, stream>>>(
        residual_out, out, mean, rstd, residual_in, branch, weight, bias, C, eps);
  } else {
    residual_norm_forward_kernel<kLayerNorm, 1><<<N, kThreads, 0, stream>>>(
        residual_out, out, mean, rstd, residual_in, branch, weight, bias, C, eps);
  }
  CUDA_CHECK_LAUNCH();
}

template <bool kLayerNorm, int VEC, typename T>
void launch_backward_rows(T* d_residual, float* partials, const T* dout, const T* x, const float* mean,
                          const float* rstd, const T* weight, int N, int C, BackwardSplit split,
                          cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(kLayerNorm ? 2 : 1) * C * sizeof(float);
  auto kernel = residual_norm_backward_kernel<kLayerNorm, VEC, T>;
  // The kernel's static `shared[32]` counts against the same 48 KiB default (e.g. RMSNorm at C = 12288).
  constexpr size_t kStaticSmem = 32 * sizeof(float);
  if (smem + kStaticSmem > 48 * 1024) {
    // Above 48 KiB a kernel must opt in to more dynamic shared memory (up to 227 KiB on H100).
    CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<split.blocks, kThreads, smem, stream>>>(d_residual, partials, dout, x, mean, rstd, weight, N, C,
                                                   split.rows_per_block);
  CUDA_CHECK_LAUNCH();
}

template <bool kLayerNorm, typename T>
void backward(const char* name, T* d_residual, T* dweight, T* dbias, float* scratch, size_t scratch_floats,
              const T* dout, const T* x, const float* mean, const float* rstd, const T* weight, int N, int C,
              cudaStream_t stream, KernelVariant variant) {
  NvtxRange range(name);
  if (N <= 0 || C <= 0) return;
  const BackwardSplit split = backward_split(N);
  const size_t needed = static_cast<size_t>(split.blocks) * 2 * C;
  if (scratch == nullptr || scratch_floats < needed) {
    throw std::invalid_argument(std::string(name) + ": scratch has " + std::to_string(scratch_floats) +
                                " floats, needs " + std::to_string(needed) +
                                " (norm_backward_scratch_floats)");
  }
  constexpr int VF = vec16<T>();
  const bool aligned =
      C % VF == 0 && aligned16(d_residual) && aligned16(dout) && aligned16(x) && aligned16(weight);
  if (use_fast_variant(variant, aligned, name)) {
    launch_backward_rows<kLayerNorm, VF>(d_residual, scratch, dout, x, mean, rstd, weight, N, C, split,
                                         stream);
  } else {
    launch_backward_rows<kLayerNorm, 1>(d_residual, scratch, dout, x, mean, rstd, weight, N, C, split,
                                        stream);
  }
  if (dweight == nullptr && (!kLayerNorm || dbias == nullptr)) return;  // frozen norm (LoRA): dx only
  norm_param_grad_kernel<<<ceil_div(C, 32), dim3(32, 8), 0, stream>>>(dweight, kLayerNorm ? dbias : nullptr,
                                                                      scratch, split.blocks, C);
  CUDA_CHECK_LAUNCH();
}

}  // namespace norms_detail

// Floats of scratch the backward launchers need for N rows of C features.
inline size_t norm_backward_scratch_floats(int N, int C) {
  return static_cast<size_t>(norms_detail::backward_split(N).blocks) * 2 * C;
}

// residual_out = residual_in + branch; out = LayerNorm(residual_out) * weight + bias; mean, rstd [N] saved.
// All activations [N, C]; weight, bias [C] (bias may be null). With branch == null there is no add: x is
// residual_in and residual_out is not written (may be null). residual_out may alias residual_in.
template <typename T>
void residual_layernorm_forward(T* residual_out, T* out, float* mean, float* rstd, const T* residual_in,
                                const T* branch, const T* weight, const T* bias, int N, int C, float eps,
                                cudaStream_t stream, KernelVariant variant = KernelVariant::kAuto) {
  norms_detail::forward<true>("residual_layernorm_forward", residual_out, out, mean, rstd, residual_in,
                              branch, weight, bias, N, C, eps, stream, variant);
}

// d_residual += dL/dx (so it becomes the gradient of residual_in and of branch); dweight, dbias (each
// nullable: a frozen weight or bias gets no gradient)
// += their gradients. x is the forward's normalised input (residual_out, or residual_in without a branch);
// mean, rstd from the forward. scratch: norm_backward_scratch_floats(N, C) floats of device memory.
template <typename T>
void residual_layernorm_backward(T* d_residual, T* dweight, T* dbias, float* scratch, size_t scratch_floats,
                                 const T* dout, const T* x, const float* mean, const float* rstd,
                                 const T* weight, int N, int C, cudaStream_t stream,
                                 KernelVariant variant = KernelVariant::kAuto) {
  norms_detail::backward<true>("residual_layernorm_backward", d_residual, dweight, dbias, scratch,
                               scratch_floats, dout, x, mean, rstd, weight, N, C, stream, variant);
}

// residual_out = residual_in + branch; out = RMSNorm(residual_out) * weight; rstd [N] saved. Same
// conventions as residual_layernorm_forward.
template <typename T>
void residual_rmsnorm_forward(T* residual_out, T* out, float* rstd, const T* residual_in, const T* branch,
                              const T* weight, int N, int C, float eps, cudaStream_t stream,
                              KernelVariant variant = KernelVariant::kAuto) {
  norms_detail::forward<false>("residual_rmsnorm_forward", residual_out, out, static_cast<float*>(nullptr),
                               rstd, residual_in, branch, weight, static_cast<const T*>(nullptr), N, C, eps,
                               stream, variant);
}

// d_residual += dL/dx; dweight += its gradient. Same conventions as residual_layernorm_backward.
template <typename T>
void residual_rmsnorm_backward(T* d_residual, T* dweight, float* scratch, size_t scratch_floats,
                               const T* dout, const T* x, const float* rstd, const T* weight, int N, int C,
                               cudaStream_t stream, KernelVariant variant = KernelVariant::kAuto) {
  norms_detail::backward<false>("residual_rmsnorm_backward", d_residual, dweight, static_cast<T*>(nullptr),
                                scratch, scratch_floats, dout, x, static_cast<const float*>(nullptr), rstd,
                                weight, N, C, stream, variant);
}

}  // namespace llm::cuda
