// The Adafactor step on the GPU, with the semantics of transformers.optimization.Adafactor (the CPU
// reference, the defaults and the differences from torch.optim.Adafactor are in
// train/optim_adafactor.h).
//
// Math, step t from 1, on a tensor P with gradient G (times the clipping scale); a tensor of two or more
// dimensions is `batch` matrices of rows x cols (the last two dimensions), a vector is not factored:
//   rho     = the learning rate handed in (the host applies relative_step and lr_scale)
//   alpha   = scale_parameter ? max(eps2, RMS(P)) rho : rho                RMS over the whole tensor
//   beta2t  = 1 - t^decay_rate                                             (host side)
//   matrix: R = beta2t R + (1 - beta2t) rowmean(G^2 + eps1)     one value per row of each matrix
//           C = beta2t C + (1 - beta2t) colmean(G^2 + eps1)     one value per column
//           U = G / sqrt((R / mean(R)) C^T)                     mean(R) over the rows of that matrix
//   vector: V = beta2t V + (1 - beta2t) (G^2 + eps1);  U = G / sqrt(V)
//   U = alpha U / max(1, RMS(U) / clip_threshold)               update clipping, RMS over the tensor
//   beta1 > 0: M = beta1 M + (1 - beta1) U;  U = M
//   P = P - wd alpha P - U                                      (from the old P, as transformers does)
// No backward pass.
//
// Kernels, in order (all on one stream; the scalars alpha, mean(R) and the clip divisor stay in device
// memory, so the host never waits):
//   1. RMS(P):          sumsq partials (a grid whose size depends on n only, fixed-order block trees,
//                       fp64) and a one-thread finalize that adds them in block order -> alpha
//   2. matrix: row statistics, one block per row (fixed tree over the columns, fp64), updating R;
//      column statistics in two passes: the rows cut into chunks of col_chunk_rows(rows) (sqrt(rows)
//      rounded up to a power of two, at least 64), one thread per (column, chunk) summing its rows in
//      order into an fp64 partial, then one thread per column adding the partials in chunk order and
//      updating C (a 152K-row embedding: 297 chunks of 512 rows, instead of one thread per column
//      looping over all 152K rows with only cols threads in flight);
//      mean(R) per matrix, one block each (fixed tree)
//      vector: V updated elementwise
//   3. RMS(U):          U recomputed on the fly (never stored), sumsq partials + finalize -> clip divisor
//   4. apply:           U recomputed once more, scaled, first moment, weight decay, update
// Every reduction has a fixed order, so the result is bitwise reproducible without atomics. The
// arithmetic is fp64 like the CPU reference (state fp32); the only difference from it is the order of
// the fp64 sums (a tree instead of a loop), far below fp32 resolution.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda_common.cuh"
#include "kernels/kernel_utils.cuh"
#include "kernels/nvtx.cuh"

namespace llm::cuda {

namespace adafactor_detail {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 256;
// Scratch layout (doubles): partial sums, then alpha, the clip divisor, mean(R) per matrix, and (a
// matrix) the column partials [matrices][chunks][cols].
constexpr int kAlpha = kMaxBlocks, kClip = kMaxBlocks + 1, kRowMean = kMaxBlocks + 2;

// Rows per chunk of the column statistics: sqrt(rows) rounded up to a power of two (at least 64), so that
// both passes are short, and few enough chunks for a grid dimension (65535).
inline int64_t col_chunk_rows(int64_t rows) {
  int64_t chunk = 64;
  while (chunk * chunk < rows) chunk *= 2;
  return std::max(chunk, (rows + 65534) / 65535);
}
inline int64_t col_chunks(int64_t rows) {
  return rows > 0 ? (rows + col_chunk_rows(rows) - 1) / col_chunk_rows(rows) : 0;
}

inline int reduce_blocks(size_t n) {
  const long long wanted = (static_cast<long long>(n) + kThreads * 16LL - 1) / (kThreads * 16LL);
  return static_cast<int>(std::max(1LL, std::min(wanted, static_cast<long long>(kMaxBlocks))));
}

template <typename TG>
__device__ __forceinline__ double load_grad(const TG* grad, const float* grad_scale, size_t i) {
  const double scale = grad_scale != nullptr ? static_cast<double>(*grad_scale) : 1.0;
  return static_cast<double>(to_float(grad[i])) * scale;
}

// The unclipped update U at element i (see the math above). row == nullptr means a vector (use full).
template <typename TG>
__device__ __forceinline__ double unscaled_update(const TG* grad, const float* grad_scale, const float* row,
                                                  const float* col, const float* full, const double* row_mean,
                                                  size_t i, int64_t rows, int64_t cols) {
  const double g = load_grad(grad, grad_scale, i);
  if (row == nullptr) return g / sqrt(static_cast<double>(full[i]));
  const int64_t matrix = static_cast<int64_t>(i) / (rows * cols);
  const int64_t r = (static_cast<int64_t>(i) / cols) % rows;
  const int64_t c = static_cast<int64_t>(i) % cols;
  const double row_factor = 1.0 / sqrt(static_cast<double>(row[matrix * rows + r]) / row_mean[matrix]);
  return g * row_factor / sqrt(static_cast<double>(col[matrix * cols + c]));
}

}  // namespace adafactor_detail

// partials[blockIdx.x] = sum over this block's grid-stride elements of x^2 (x = master, or U when
// `of_update`), fp64, fixed order.
template <typename TG>
__global__ void adafactor_sumsq_kernel(double* scratch, const float* master, bool of_update, const TG* grad,
                                       const float* grad_scale, const float* row, const float* col,
                                       const float* full, size_t n, int64_t rows, int64_t cols) {
  __shared__ double shared[32];
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  double acc = 0.0;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const double x =
        of_update ? adafactor_detail::unscaled_update(grad, grad_scale, row, col, full,
                                                      scratch + adafactor_detail::kRowMean, i, rows, cols)
                  : static_cast<double>(master[i]);
    acc += x * x;
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) scratch[blockIdx.x] = acc;
}

// One thread: RMS from the partials (in block order), then alpha (of_update false) or the clip divisor.
__global__ void adafactor_finalize_kernel(double* scratch, int blocks, size_t n, bool of_update, double rho,
                                          double eps2, bool scale_parameter, double clip_threshold) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double total = 0.0;
  for (int b = 0; b < blocks; ++b) total += scratch[b];
  const double rms = sqrt(total / static_cast<double>(n));
  if (of_update) {
    scratch[adafactor_detail::kClip] = fmax(1.0, rms / clip_threshold);
  } else {
    scratch[adafactor_detail::kAlpha] = scale_parameter ? fmax(eps2, rms) * rho : rho;
  }
}

// One block per (row, matrix): R = beta2t R + (1 - beta2t) mean over the row of (g^2 + eps1).
template <typename TG>
__global__ void adafactor_row_kernel(float* row, const TG* grad, const float* grad_scale, int64_t rows,
                                     int64_t cols, double beta2t, double eps1) {
  __shared__ double shared[32];
  const int64_t r = blockIdx.x, matrix = blockIdx.y;
  const size_t base = static_cast<size_t>((matrix * rows + r) * cols);
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const double g = adafactor_detail::load_grad(grad, grad_scale, base + c);
    acc += g * g + eps1;
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) {
    float& v = row[matrix * rows + r];
    v = static_cast<float>(beta2t * v + (1.0 - beta2t) * acc / static_cast<double>(cols));
  }
}

// One thread per (column, chunk, matrix): partial[matrix][chunk][c] = the sum over the chunk's rows, in
// order, of g^2 + eps1.
template <typename TG>
__global__ void adafactor_col_partial_kernel(double* partial, const TG* grad, const float* grad_scale,
                                             int64_t rows, int64_t cols, int64_t chunk_rows, double eps1) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chunk = blockIdx.y, matrix = blockIdx.z;
  if (c >= cols) return;
  const int64_t r0 = chunk * chunk_rows, r1 = min(rows, r0 + chunk_rows);
  double acc = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const double g =
        adafactor_detail::load_grad(grad, grad_scale, static_cast<size_t>((matrix * rows + r) * cols + c));
    acc += g * g + eps1;
  }
  partial[(matrix * gridDim.y + chunk) * cols + c] = acc;
}

// One thread per (column, matrix): the partials added in chunk order, then
// C = beta2t C + (1 - beta2t) colmean.
__global__ void adafactor_col_finish_kernel(float* col, const double* partial, int64_t rows, int64_t cols,
                                            int64_t chunks, double beta2t) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t matrix = blockIdx.y;
  if (c >= cols) return;
  double acc = 0.0;
  for (int64_t k = 0; k < chunks; ++k) acc += partial[(matrix * chunks + k) * cols + c];
  float& v = col[matrix * cols + c];
  v = static_cast<float>(beta2t * v + (1.0 - beta2t) * acc / static_cast<double>(rows));
}

// One block per matrix: mean(R) into the scratch.
__global__ void adafactor_row_mean_kernel(double* scratch, const float* row, int64_t rows) {
  __shared__ double shared[32];
  const int64_t matrix = blockIdx.x;
  double acc = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) acc += row[matrix * rows + r];
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) scratch[adafactor_detail::kRowMean + matrix] = acc / static_cast<double>(rows);
}

// Vector: V = beta2t V + (1 - beta2t)(g^2 + eps1).
template <typename TG>
__global__ void adafactor_full_kernel(float* full, const TG* grad, const float* grad_scale, size_t n,
                                      double beta2t, double eps1) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double g = adafactor_detail::load_grad(grad, grad_scale, i);
  full[i] = static_cast<float>(beta2t * full[i] + (1.0 - beta2t) * (g * g + eps1));
}

template <typename TP, typename TG>
__global__ void adafactor_apply_kernel(TP* param, float* master, float* first, const double* scratch,
                                       const TG* grad, const float* grad_scale, const float* row,
                                       const float* col, const float* full, size_t n, int64_t rows,
                                       int64_t cols, double beta1, double weight_decay) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double alpha = scratch[adafactor_detail::kAlpha];
  double u = adafactor_detail::unscaled_update(grad, grad_scale, row, col, full,
                                               scratch + adafactor_detail::kRowMean, i, rows, cols);
  u = alpha * (u / scratch[adafactor_detail::kClip]);
  if (first != nullptr) {
    const float mi = static_cast<float>(beta1 * first[i] + (1.0 - beta1) * u);
    first[i] = mi;
    u = mi;
  }
  double w = master[i];
  w -= weight_decay * alpha * w;
  w -= u;
  master[i] = static_cast<float>(w);
  if (param != nullptr) param[i] = from_float<TP>(static_cast<float>(w));
}

// Doubles of scratch adafactor_update needs for a tensor of `matrices` matrices of rows x cols, or for a
// vector (matrices 1, rows and cols 0).
inline size_t adafactor_scratch_size(int64_t matrices, int64_t rows, int64_t cols) {
  const int64_t m = std::max<int64_t>(matrices, 1);
  return static_cast<size_t>(adafactor_detail::kRowMean + m + m * adafactor_detail::col_chunks(rows) * cols);
}

// One Adafactor step on one tensor of n = matrices * rows * cols elements (factored: row [matrices *
// rows] and col [matrices * cols] non-null, full null) or of n elements (a vector: full [n], row and col
// null). first: [n] when beta1 > 0, else null. rho: this tensor's learning rate (relative_step already
// applied by the caller); beta2t = 1 - t^decay_rate. scratch: adafactor_scratch_size(matrices).
template <typename TP, typename TG>
void adafactor_update(TP* param, float* master, float* row, float* col, float* full, float* first,
                      const TG* grad, const float* grad_scale, double* scratch, size_t scratch_doubles,
                      size_t n, int64_t matrices, int64_t rows, int64_t cols, double rho, double beta2t,
                      double eps1, double eps2, double clip_threshold, double beta1, bool scale_parameter,
                      double weight_decay, cudaStream_t stream) {
  NvtxRange range("adafactor_update");
  using namespace adafactor_detail;
  if (n == 0) return;
  const bool factored = row != nullptr;
  if (factored != (col != nullptr) || factored == (full != nullptr)) {
    throw std::invalid_argument("adafactor_update: give row and col (a matrix) or full (a vector)");
  }
  if (factored && static_cast<size_t>(matrices * rows * cols) != n) {
    throw std::invalid_argument("adafactor_update: matrices x rows x cols != n");
  }
  if (scratch == nullptr || scratch_doubles < (factored ? adafactor_scratch_size(matrices, rows, cols)
                                                        : adafactor_scratch_size(1, 0, 0))) {
    throw std::invalid_argument("adafactor_update: scratch too small (adafactor_scratch_size)");
  }
  if ((beta1 > 0.0) != (first != nullptr)) {
    throw std::invalid_argument("adafactor_update: first moment given iff beta1 > 0");
  }
  const int blocks = reduce_blocks(n);
  const int elem_blocks = ceil_div(static_cast<long long>(n), kThreads);
  adafactor_sumsq_kernel<<<blocks, kThreads, 0, stream>>>(scratch, master, false, grad, grad_scale, row, col,
                                                          full, n, rows, cols);
  CUDA_CHECK_LAUNCH();
  adafactor_finalize_kernel<<<1, 1, 0, stream>>>(scratch, blocks, n, false, rho, eps2, scale_parameter,
                                                 clip_threshold);
  CUDA_CHECK_LAUNCH();
  if (factored) {
    adafactor_row_kernel<<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(matrices)), kThreads, 0,
                           stream>>>(row, grad, grad_scale, rows, cols, beta2t, eps1);
    CUDA_CHECK_LAUNCH();
    const int64_t chunk_rows = col_chunk_rows(rows), chunks = col_chunks(rows);
    double* col_partial = scratch + kRowMean + matrices;
    adafactor_col_partial_kernel<<<dim3(static_cast<unsigned>(ceil_div(cols, kThreads)),
                                        static_cast<unsigned>(chunks), static_cast<unsigned>(matrices)),
                                   kThreads, 0, stream>>>(col_partial, grad, grad_scale, rows, cols,
                                                          chunk_rows, eps1);
    CUDA_CHECK_LAUNCH();
    adafactor_col_finish_kernel<<<dim3(static_cast<unsigned>(ceil_div(cols, kThreads)),
                                       static_cast<unsigned>(matrices)),
                                  kThreads, 0, stream>>>(col, col_partial, rows, cols, chunks, beta2t);
    CUDA_CHECK_LAUNCH();
    adafactor_row_mean_kernel<<<static_cast<unsigned>(matrices), kThreads, 0, stream>>>(scratch, row, rows);
    CUDA_CHECK_LAUNCH();
  } else {
    adafactor_full_kernel<<<elem_blocks, kThreads, 0, stream>>>(full, grad, grad_scale, n, beta2t, eps1);
    CUDA_CHECK_LAUNCH();
  }
  adafactor_sumsq_kernel<<<blocks, kThreads, 0, stream>>>(scratch, master, true, grad, grad_scale, row, col,
                                                          full, n, rows, cols);
  CUDA_CHECK_LAUNCH();
  adafactor_finalize_kernel<<<1, 1, 0, stream>>>(scratch, blocks, n, true, rho, eps2, scale_parameter,
                                                 clip_threshold);
  CUDA_CHECK_LAUNCH();
  adafactor_apply_kernel<<<elem_blocks, kThreads, 0, stream>>>(
      param, master, first, scratch, grad, grad_scale, row, col, full, n, rows, cols, beta1, weight_decay);
  CUDA_CHECK_LAUNCH();
}

}  // namespace llm::cuda
