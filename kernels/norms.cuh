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
//      row it computes the two row means with one block sum, adds dL/dx to d_residual, and adds dL/dy xhat
//      and dL/dy into per-channel accumulators; each channel belongs to one thread for all of the block's
//      rows, so there are no races. At the end the block writes its accumulators to its own slice of a
//      scratch buffer: partials[block][0 .. C) for dweight and partials[block][C .. 2C) for dbias (nothing
//      when the norm is frozen and no parameter gradient is wanted).
//      Rows of up to 1024 vectors of VEC elements (C <= 8192 in bf16 with the fast variant): one thread per
//      vector, whose weight and accumulators stay in registers. Each thread loads the next row's x, dout
//      and d_residual before it works on the current row, so that those loads are in flight during the
//      current row's block sum, and every element is read once. Wider rows: 256 threads, each with several
//      vectors, the accumulators in shared memory (laid out so that neighbouring threads use neighbouring
//      banks), and two sweeps per row (the row sums, then dL/dx).
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

// VEC consecutive elements of T kept in their storage type (16 bytes for VEC > 1, one element for VEC = 1)
// and moved with one load: the backward kernel holds the next row in these while it works on the current
// one, at half the registers of fp32 for bf16.
template <int VEC, typename T>
struct Packed {
  static_assert(VEC == 1 || VEC * sizeof(T) == 16, "one element or one 16-byte vector");
  alignas(VEC == 1 ? sizeof(T) : 16) T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ void load_packed(Packed<VEC, T>& out, const T* p) {
  if constexpr (VEC == 1) {
    out.v[0] = *p;
  } else {
    *reinterpret_cast<int4*>(out.v) = *reinterpret_cast<const int4*>(p);
  }
}

// The block sums of a (only when kBoth) and b with one barrier. `buf` holds 32 float2; consecutive calls
// must alternate between two such buffers: a thread can write a buffer again only after passing the
// barrier of the call in between, which every thread reaches only after it has read this call's values.
// Deterministic like block_sum: warp shuffles, then the warps in index order. blockDim.x must be a
// multiple of 32.
template <bool kBoth>
__device__ __forceinline__ float2 block_sum_pair(float a, float b, float2* buf) {
  if constexpr (kBoth) a = warp_sum(a);
  b = warp_sum(b);
  if (threadIdx.x % 32 == 0) buf[threadIdx.x / 32] = make_float2(kBoth ? a : 0.0f, b);
  __syncthreads();
  float2 total = make_float2(0.0f, 0.0f);
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) {
    const float2 v = buf[w];
    if constexpr (kBoth) total.x += v.x;
    total.y += v.y;
  }
  return total;
}

// Step 1 of the backward pass, rows [blockIdx.x * rows_per_block, ...), for rows of at most 1024 vectors:
// thread t owns the VEC channels [t VEC, t VEC + VEC) (blockDim.x >= C / VEC; the threads past the row end
// only join the block sums), holds their weight and their dweight/dbias sums in registers, and loads the
// next row's x, dout and d_residual (and mean, rstd) before it works on the current row, so that the loads
// are in flight across the row's block sum. partials: [gridDim.x][2 C] (dweight, then dbias); nullptr
// when no parameter gradient is wanted.
template <bool kLayerNorm, int VEC, typename T>
__global__ void __launch_bounds__(1024)
    residual_norm_backward_kernel(T* d_residual, float* partials, const T* dout, const T* x,
                                  const float* mean, const float* rstd, const T* weight, int N, int C,
                                  int rows_per_block) {
  __shared__ float2 sums[2][32];
  const int c = threadIdx.x * VEC;
  const bool active = c < C;
  float w[VEC], dw[VEC], db[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) w[k] = dw[k] = db[k] = 0.0f;
  if (active) load_floats<VEC>(w, weight + c);

  const int row_begin = blockIdx.x * rows_per_block;
  const int row_end = min(N, row_begin + rows_per_block);
  Packed<VEC, T> xv{}, dyv{}, drv{};  // the current row's x, dout and d_residual
  float mu = 0.0f, rs = 0.0f;
  if (row_begin < row_end) {
    const size_t offset = static_cast<size_t>(row_begin) * C + c;
    if (active) {
      load_packed(xv, x + offset);
      load_packed(dyv, dout + offset);
      load_packed(drv, d_residual + offset);
    }
    if constexpr (kLayerNorm) mu = mean[row_begin];
    rs = rstd[row_begin];
  }
  for (int row = row_begin; row < row_end; ++row) {
    // Prefetch the next row (its elements of d_residual are not written before this load).
    const bool has_next = row + 1 < row_end;
    Packed<VEC, T> xn = xv, dyn = dyv, drn = drv;
    float mun = mu, rsn = rs;
    if (has_next) {
      const size_t next_offset = static_cast<size_t>(row + 1) * C + c;
      if (active) {
        load_packed(xn, x + next_offset);
        load_packed(dyn, dout + next_offset);
        load_packed(drn, d_residual + next_offset);
      }
      if constexpr (kLayerNorm) mun = mean[row + 1];
      rsn = rstd[row + 1];
    }

    // The row sums of g and of g xhat.
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    if (active) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = (to_float(xv.v[k]) - mu) * rs;
        const float g = to_float(dyv.v[k]) * w[k];
        sum_g += g;
        sum_g_xhat += g * xhat;
      }
    }
    const float2 total = block_sum_pair<kLayerNorm>(sum_g, sum_g_xhat, sums[(row - row_begin) % 2]);
    const float mean_g = kLayerNorm ? total.x / C : 0.0f;
    const float mean_g_xhat = total.y / C;

    // d_residual += dL/dx; the parameter-gradient terms go to this thread's registers.
    if (active) {
      float dr[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = (to_float(xv.v[k]) - mu) * rs;
        const float dy = to_float(dyv.v[k]);
        const float g = dy * w[k];
        dr[k] = to_float(drv.v[k]) + rs * (g - mean_g - xhat * mean_g_xhat);
        dw[k] += dy * xhat;
        if constexpr (kLayerNorm) db[k] += dy;
      }
      store_floats<VEC>(d_residual + static_cast<size_t>(row) * C + c, dr);
    }
    xv = xn;
    dyv = dyn;
    drv = drn;
    mu = mun;
    rs = rsn;
  }

  if (partials == nullptr || !active) return;
  float* my_partials = partials + static_cast<size_t>(blockIdx.x) * 2 * C;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    my_partials[c + k] = dw[k];
    if constexpr (kLayerNorm) my_partials[C + c + k] = db[k];
  }
}

// Step 1 for rows of more than 1024 vectors: thread t owns the vectors t, t + blockDim.x, ... (chunk j is
// vector j blockDim.x + t), and keeps their dweight/dbias sums in dynamic shared memory, C floats each
// (LayerNorm: 2 C). Chunk j's accumulators are stored element-major, slot base_j + k width_j + t, with
// width_j the number of threads that have a chunk j, so that neighbouring threads use neighbouring banks
// and no padding is needed. Two sweeps per row (the row sums, then dx), like the forward pass.
template <bool kLayerNorm, int VEC, typename T>
__global__ void residual_norm_backward_wide_kernel(T* d_residual, float* partials, const T* dout, const T* x,
                                                   const float* mean, const float* rstd, const T* weight,
                                                   int N, int C, int rows_per_block) {
  extern __shared__ float accumulators[];
  __shared__ float2 sums[2][32];
  float* dw_acc = accumulators;
  float* db_acc = accumulators + C;  // LayerNorm only
  const int threads = static_cast<int>(blockDim.x);
  const int vectors = C / VEC;  // C % VEC == 0 when VEC > 1
  // Chunk j of this thread: vector v = j * threads + threadIdx.x, channels c = v VEC .. v VEC + VEC - 1,
  // accumulator slots base + k width + threadIdx.x with base = j threads VEC.
  for (int v = threadIdx.x, base = 0; v < vectors; v += threads, base += threads * VEC) {
    const int width = min(threads, vectors - (v - static_cast<int>(threadIdx.x)));
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      dw_acc[base + k * width + threadIdx.x] = 0.0f;
      if constexpr (kLayerNorm) db_acc[base + k * width + threadIdx.x] = 0.0f;
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
    for (int c = threadIdx.x * VEC; c < C; c += threads * VEC) {
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
    const float2 total = block_sum_pair<kLayerNorm>(sum_g, sum_g_xhat, sums[(row - row_begin) % 2]);
    const float mean_g = kLayerNorm ? total.x / C : 0.0f;
    const float mean_g_xhat = total.y / C;

    // Sweep 2: d_residual += dL/dx; the parameter-gradient terms go to this thread's accumulators.
    for (int v = threadIdx.x, base = 0; v < vectors; v += threads, base += threads * VEC) {
      const int width = min(threads, vectors - (v - static_cast<int>(threadIdx.x)));
      const int c = v * VEC;
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
        dw_acc[base + k * width + threadIdx.x] += dy[k] * xhat;
        if constexpr (kLayerNorm) db_acc[base + k * width + threadIdx.x] += dy[k];
      }
      store_floats<VEC>(d_residual + row_offset + c, dr);
    }
  }

  if (partials == nullptr) return;
  float* my_partials = partials + static_cast<size_t>(blockIdx.x) * 2 * C;
  for (int v = threadIdx.x, base = 0; v < vectors; v += threads, base += threads * VEC) {
    const int width = min(threads, vectors - (v - static_cast<int>(threadIdx.x)));
    const int c = v * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      my_partials[c + k] = dw_acc[base + k * width + threadIdx.x];
      if constexpr (kLayerNorm) my_partials[C + c + k] = db_acc[base + k * width + threadIdx.x];
    }
  }
}

// Step 2: dweight[c] += sum over blocks b of partials[b][c] (and dbias from partials[b][C + c]). Block
// (32, 32): thread (tx, ty) sums the blocks b = ty, ty + 32, ... of channel c = 32 blockIdx.x + tx in
// increasing b (it issues kBatch loads before adding them, in the same order); thread ty = 0 then adds the
// 32 sums in order of ty. The order depends only on the number of blocks. Each warp load reads 32
// consecutive floats of one partials row.
constexpr int kParamGradRows = 32;
template <typename T>
__global__ void __launch_bounds__(32 * kParamGradRows)
    norm_param_grad_kernel(T* dweight, T* dbias, const float* partials, int blocks, int C) {
  constexpr int kBatch = 8;
  __shared__ float s_dw[kParamGradRows][32];
  __shared__ float s_db[kParamGradRows][32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * 32 + tx;
  const bool want_dw = dweight != nullptr, want_db = dbias != nullptr;
  const size_t stride = 2 * static_cast<size_t>(C);
  float dw = 0.0f, db = 0.0f;
  if (c < C) {
    int b = ty;
    for (; b + (kBatch - 1) * kParamGradRows < blocks; b += kBatch * kParamGradRows) {
      float pw[kBatch], pb[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const float* p = partials + static_cast<size_t>(b + i * kParamGradRows) * stride + c;
        pw[i] = want_dw ? p[0] : 0.0f;
        pb[i] = want_db ? p[C] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        dw += pw[i];
        db += pb[i];
      }
    }
    for (; b < blocks; b += kParamGradRows) {
      const float* p = partials + static_cast<size_t>(b) * stride + c;
      if (want_dw) dw += p[0];
      if (want_db) db += p[C];
    }
  }
  s_dw[ty][tx] = dw;
  s_db[ty][tx] = db;
  __syncthreads();
  if (ty != 0 || c >= C) return;
  float total_dw = 0.0f, total_db = 0.0f;
  for (int k = 0; k < kParamGradRows; ++k) {
    total_dw += s_dw[k][tx];
    total_db += s_db[k][tx];
  }
  if (want_dw) dweight[c] = from_float<T>(to_float(dweight[c]) + total_dw);
  if (want_db) dbias[c] = from_float<T>(to_float(dbias[c]) + total_db);
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

// The widest row, in vectors, that residual_norm_backward_kernel takes (one vector per thread).
constexpr int kMaxRegisterRowVectors = 1024;

template <bool kLayerNorm, int VEC, typename T>
void launch_backward_rows(T* d_residual, float* partials, const T* dout, const T* x, const float* mean,
                          const float* rstd, const T* weight, int N, int C, BackwardSplit split,
                          cudaStream_t stream) {
  const int vectors = ceil_div(C, VEC);
  if (vectors <= kMaxRegisterRowVectors) {
    const int threads = ceil_div(vectors, 32) * 32;
    residual_norm_backward_kernel<kLayerNorm, VEC, T><<<split.blocks, threads, 0, stream>>>(
        d_residual, partials, dout, x, mean, rstd, weight, N, C, split.rows_per_block);
    CUDA_CHECK_LAUNCH();
    return;
  }
  const size_t smem = static_cast<size_t>(kLayerNorm ? 2 : 1) * C * sizeof(float);
  auto kernel = residual_norm_backward_wide_kernel<kLayerNorm, VEC, T>;
  // The kernel's static `sums` counts against the same 48 KiB default (e.g. RMSNorm at C = 12288).
  constexpr size_t kStaticSmem = 2 * 32 * sizeof(float2);
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
  // A frozen norm (LoRA) wants dx only: step 1 writes no partials and step 2 does not run.
  const bool param_grads = dweight != nullptr || (kLayerNorm && dbias != nullptr);
  float* partials = param_grads ? scratch : nullptr;
  constexpr int VF = vec16<T>();
  const bool aligned =
      C % VF == 0 && aligned16(d_residual) && aligned16(dout) && aligned16(x) && aligned16(weight);
  if (use_fast_variant(variant, aligned, name)) {
    launch_backward_rows<kLayerNorm, VF>(d_residual, partials, dout, x, mean, rstd, weight, N, C, split,
                                         stream);
  } else {
    launch_backward_rows<kLayerNorm, 1>(d_residual, partials, dout, x, mean, rstd, weight, N, C, split,
                                        stream);
  }
  if (!param_grads) return;
  norm_param_grad_kernel<<<ceil_div(C, 32), dim3(32, kParamGradRows), 0, stream>>>(
      dweight, kLayerNorm ? dbias : nullptr, scratch, split.blocks, C);
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
