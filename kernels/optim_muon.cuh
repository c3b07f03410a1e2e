// The Muon step on the GPU: momentum, then the quintic Newton-Schulz orthogonalisation (NS5) as cuBLASLt
// GEMMs, then the scaled update. The algorithm, its references, its defaults and why the CPU prefers
// fp64 are in train/optim_muon.h; this file follows the same order of operations.
//
// Math, for one 2-D hidden matrix W [rows, cols] with gradient G (times the clipping scale):
//   B = mu B + (1 - mu) G                          momentum buffer, fp32 (the arithmetic in fp64)
//   D = nesterov ? (1 - mu) G + mu B : B
//   X = D, transposed when rows > cols so that X is n x k with n = min(rows, cols) <= k
//   X = X / (||X||_F + 1e-7)
//   repeat ns_steps times, with (a, b, c) = (3.4445, -4.7750, 2.0315):
//     A = X X^T        (GEMM, n x n, K = k)
//     B = b A + (c A) A   (cA elementwise, then a GEMM n x n x n, then an elementwise sum)
//     X = a X + B X    (GEMM n x k, K = n, then an elementwise sum)
//   O = X (transposed back);  W = W - lr wd W - lr sqrt(max(1, rows / cols)) O
// Each step maps every singular value s to a s + b s^3 + c s^5, so O approximates U V^T of D = U S V^T
// (singular values in a band around 1, not exactly 1). No backward pass.
//
// Precision. T is the storage type of X and of the NS intermediates: bf16 in training (as the
// reference Muon; cuBLASLt accumulates in fp32) or float for tests (cuBLASLt's pedantic fp32 mode, no
// TF32). Every intermediate is rounded to T after each operation, exactly where the CPU's "fp32" and
// "bf16" modes round (train/optim_muon.cpp), so the two differ only by the order of the GEMM sums
// (fp32 on the GPU, fp64 on the CPU) and by how NS5 amplifies those differences.
// The Frobenius norm is a deterministic two-pass reduction in fp64 (fixed grid, fixed block trees, the
// partials added in block order), and cuBLASLt with a fixed workspace is deterministic on one GPU, so
// the whole step is bitwise reproducible.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda_common.cuh"
#include "kernels/kernel_utils.cuh"
#include "kernels/matmul.cuh"
#include "kernels/nvtx.cuh"

namespace llm::cuda {

namespace muon_detail {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 256;
constexpr size_t kScratchDoubles = kMaxBlocks + 1;  // partials, then the denominator ||X|| + 1e-7
constexpr size_t kAlign = 256;

inline size_t align_up(size_t bytes) {
  return (bytes + kAlign - 1) / kAlign * kAlign;
}

inline int reduce_blocks(size_t n) {
  const long long wanted = (static_cast<long long>(n) + kThreads * 16LL - 1) / (kThreads * 16LL);
  return static_cast<int>(std::max(1LL, std::min(wanted, static_cast<long long>(kMaxBlocks))));
}

}  // namespace muon_detail

// B = mu B + (1 - mu) g; X = (nesterov ? (1 - mu) g + mu B : B) rounded to T, transposed when rows > cols.
template <typename T>
__global__ void muon_momentum_kernel(T* x, float* buffer, const float* grad, const float* grad_scale,
                                     int64_t rows, int64_t cols, double mu, bool nesterov) {
  const size_t n = static_cast<size_t>(rows * cols);
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double scale = grad_scale != nullptr ? static_cast<double>(*grad_scale) : 1.0;
  const double g = static_cast<double>(grad[i]) * scale;
  const float b = static_cast<float>(mu * buffer[i] + (1.0 - mu) * g);
  buffer[i] = b;
  const double d = nesterov ? (1.0 - mu) * g + mu * static_cast<double>(b) : static_cast<double>(b);
  const int64_t r = static_cast<int64_t>(i) / cols, c = static_cast<int64_t>(i) % cols;
  const size_t dst = rows > cols ? static_cast<size_t>(c * rows + r) : i;
  x[dst] = from_float<T>(static_cast<float>(d));
}

// Frobenius norm, pass 1: partials[block] = sum of x^2 (fp64, grid-stride, fixed tree).
template <typename T>
__global__ void muon_sumsq_kernel(double* scratch, const T* x, size_t n) {
  __shared__ double shared[32];
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  double acc = 0.0;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const double v = to_float(x[i]);
    acc += v * v;
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) scratch[blockIdx.x] = acc;
}

// Pass 2 (one thread): denominator = round_T(round_T(sqrt(sum)) + 1e-7), as the CPU rounds it.
template <typename T>
__global__ void muon_norm_finalize_kernel(double* scratch, int blocks) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double total = 0.0;
  for (int b = 0; b < blocks; ++b) total += scratch[b];
  const double norm = round_to<T>(static_cast<float>(sqrt(total)));
  scratch[muon_detail::kMaxBlocks] = round_to<T>(static_cast<float>(norm + 1e-7));
}

template <typename T>
__global__ void muon_normalize_kernel(T* x, const double* scratch, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  x[i] = from_float<T>(
      static_cast<float>(static_cast<double>(to_float(x[i])) / scratch[muon_detail::kMaxBlocks]));
}

// out = round_T(s * in)
template <typename T>
__global__ void muon_scale_kernel(T* out, const T* in, double s, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = from_float<T>(static_cast<float>(s * static_cast<double>(to_float(in[i]))));
}

// acc = round_T(round_T(s * acc) + add)
template <typename T>
__global__ void muon_axpy_kernel(T* acc, const T* add, double s, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double scaled = round_to<T>(static_cast<float>(s * static_cast<double>(to_float(acc[i]))));
  acc[i] = from_float<T>(static_cast<float>(scaled + static_cast<double>(to_float(add[i]))));
}

// W = W - lr wd W - lr scale O, with O read from x (transposed back when rows > cols). out: when not
// null, O itself is written there ([rows, cols], fp32) instead of updating W.
template <typename T>
__global__ void muon_apply_kernel(float* master, float* out, const T* x, int64_t rows, int64_t cols,
                                  double lr, double weight_decay, double scale) {
  const size_t n = static_cast<size_t>(rows * cols);
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t r = static_cast<int64_t>(i) / cols, c = static_cast<int64_t>(i) % cols;
  const float o = to_float(x[rows > cols ? static_cast<size_t>(c * rows + r) : i]);
  if (out != nullptr) {
    out[i] = o;
    return;
  }
  double w = master[i];
  w -= lr * weight_decay * w;
  w -= lr * scale * static_cast<double>(o);
  master[i] = static_cast<float>(w);
}

// Bytes of workspace muon_update needs for a rows x cols matrix with NS storage type T.
template <typename T>
size_t muon_workspace_bytes(int64_t rows, int64_t cols) {
  using namespace muon_detail;
  const size_t n = static_cast<size_t>(std::min(rows, cols)), k = static_cast<size_t>(std::max(rows, cols));
  return align_up(kScratchDoubles * sizeof(double)) + 2 * align_up(n * k * sizeof(T)) +
         3 * align_up(n * n * sizeof(T));
}

// NS5 of the n x k matrix in x (already normalised by the caller), in place, with buffers from `ws`.
template <typename T>
void muon_newton_schulz(T* x, T* y, T* a_mat, T* ca, T* ca2, int n, int k, int steps, cudaStream_t stream) {
  using namespace muon_detail;
  const double a = 3.4445, b = -4.7750, c = 2.0315;
  const size_t nk = static_cast<size_t>(n) * k, nn = static_cast<size_t>(n) * n;
  const int nk_blocks = ceil_div(static_cast<long long>(nk), kThreads);
  const int nn_blocks = ceil_div(static_cast<long long>(nn), kThreads);
  for (int s = 0; s < steps; ++s) {
    // A = X X^T
    gemm<T, T>(a_mat, x, x, nullptr, n, n, k, k, k, n, false, true, 1.0f, 0.0f, stream);
    muon_scale_kernel<<<nn_blocks, kThreads, 0, stream>>>(ca, a_mat, c, nn);  // cA
    CUDA_CHECK_LAUNCH();
    gemm<T, T>(ca2, ca, a_mat, nullptr, n, n, n, n, n, n, false, false, 1.0f, 0.0f, stream);  // (cA) A
    muon_axpy_kernel<<<nn_blocks, kThreads, 0, stream>>>(a_mat, ca2, b, nn);  // B = bA + (cA)A, into A
    CUDA_CHECK_LAUNCH();
    gemm<T, T>(y, a_mat, x, nullptr, n, k, n, n, k, k, false, false, 1.0f, 0.0f, stream);  // B X
    muon_axpy_kernel<<<nk_blocks, kThreads, 0, stream>>>(x, y, a, nk);                     // X = aX + BX
    CUDA_CHECK_LAUNCH();
  }
}

// One Muon step on a rows x cols matrix: master (fp32) and the momentum buffer (fp32) read and written;
// grad fp32 times *grad_scale (null means 1). T: the NS storage type (float for tests, bf16 in
// training). workspace: muon_workspace_bytes<T>(rows, cols) bytes of device memory. lr: this tensor's
// learning rate. With `ortho_out` non-null, the step leaves master alone and writes O there instead
// (for tests of the orthogonaliser; momentum is still updated).
template <typename T>
void muon_update(float* master, float* buffer, const float* grad, const float* grad_scale, void* workspace,
                 size_t workspace_bytes, int64_t rows, int64_t cols, double lr, double weight_decay,
                 double mu, bool nesterov, int ns_steps, cudaStream_t stream, float* ortho_out = nullptr) {
  NvtxRange range("muon_update");
  using namespace muon_detail;
  if (rows < 1 || cols < 1) return;
  if (workspace == nullptr || workspace_bytes < muon_workspace_bytes<T>(rows, cols)) {
    throw std::invalid_argument("muon_update: workspace has " + std::to_string(workspace_bytes) +
                                " bytes, needs " + std::to_string(muon_workspace_bytes<T>(rows, cols)));
  }
  const int64_t n = std::min(rows, cols), k = std::max(rows, cols);
  const size_t nk = static_cast<size_t>(n * k), nn = static_cast<size_t>(n * n);
  char* p = static_cast<char*>(workspace);
  double* scratch = reinterpret_cast<double*>(p);
  p += align_up(kScratchDoubles * sizeof(double));
  T* x = reinterpret_cast<T*>(p);
  p += align_up(nk * sizeof(T));
  T* y = reinterpret_cast<T*>(p);
  p += align_up(nk * sizeof(T));
  T* a_mat = reinterpret_cast<T*>(p);
  p += align_up(nn * sizeof(T));
  T* ca = reinterpret_cast<T*>(p);
  p += align_up(nn * sizeof(T));
  T* ca2 = reinterpret_cast<T*>(p);

  const int nk_blocks = ceil_div(static_cast<long long>(nk), kThreads);
  muon_momentum_kernel<<<nk_blocks, kThreads, 0, stream>>>(x, buffer, grad, grad_scale, rows, cols, mu,
                                                           nesterov);
  CUDA_CHECK_LAUNCH();
  const int blocks = reduce_blocks(nk);
  muon_sumsq_kernel<<<blocks, kThreads, 0, stream>>>(scratch, x, nk);
  CUDA_CHECK_LAUNCH();
  muon_norm_finalize_kernel<T><<<1, 1, 0, stream>>>(scratch, blocks);
  CUDA_CHECK_LAUNCH();
  muon_normalize_kernel<<<nk_blocks, kThreads, 0, stream>>>(x, scratch, nk);
  CUDA_CHECK_LAUNCH();
  muon_newton_schulz(x, y, a_mat, ca, ca2, static_cast<int>(n), static_cast<int>(k), ns_steps, stream);
  const double scale = std::sqrt(std::max(1.0, static_cast<double>(rows) / static_cast<double>(cols)));
  muon_apply_kernel<<<nk_blocks, kThreads, 0, stream>>>(master, ortho_out, x, rows, cols, lr, weight_decay,
                                                        scale);
  CUDA_CHECK_LAUNCH();
}

}  // namespace llm::cuda
