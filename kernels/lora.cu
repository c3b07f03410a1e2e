// LoRA on the GPU: the dropout-gradient and initialisation kernels, and the host launchers that chain
// them with cuBLASLt GEMMs. The math, the derivation of the backward pass and the GEMM table are in
// lora.cuh.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda_common.cuh"
#include "kernels/dropout.cuh"
#include "kernels/kernel_utils.cuh"
#include "kernels/lora.cuh"
#include "kernels/matmul.cuh"
#include "kernels/nvtx.cuh"
#include "kernels/philox.h"

namespace llm::cuda {

namespace {

// ---------------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------------

// dx_i (= or +=) keep_i * t_i * scale, where t = dh A is the gradient of x~ and keep_i the forward
// mask, drawn again from (seed, stream_id, i). One thread per VEC consecutive elements; the n % VEC
// elements at the end go one per thread to the threads after the last full vector (the layout of
// kernels/dropout.cuh). p <= 0 keeps everything, p >= 1 drops everything, as in the reference.
template <int VEC, typename T>
__global__ void lora_dropout_backward_kernel(T* dx, const T* t, size_t n, float p, float scale, uint64_t seed,
                                             uint64_t stream_id, bool accumulate) {
  const size_t thread = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t n_vec = n / VEC;
  size_t first;
  int count;
  if (thread < n_vec) {
    first = thread * VEC;
    count = VEC;
  } else {
    first = n_vec * VEC + (thread - n_vec);
    count = first < n ? 1 : 0;
  }
  if (count == 0) return;

  float g[VEC], d[VEC] = {};
  if (count == VEC) {
    load_floats<VEC>(g, t + first);
    if (accumulate) load_floats<VEC>(d, dx + first);
  } else {
    g[0] = to_float(t[first]);
    if (accumulate) d[0] = to_float(dx[first]);
  }
  // As in kernels/dropout.cuh: this thread's elements share one packed Philox block.
  static_assert(8 % VEC == 0, "a thread's elements must lie in one packed Philox block");
  llm::Philox4 draws = {};
  if (p > 0.0f && p < 1.0f) draws = llm::philox_at(seed, stream_id, first / 8);
  const int lane0 = static_cast<int>(first % 8);
  for (int k = 0; k < count; ++k) {
    bool keep = true;
    if (p >= 1.0f) {
      keep = false;
    } else if (p > 0.0f) {
      keep = llm::philox_mask_lane(draws, lane0 + k) >= p;
    }
    // The reference rounds keep * t * scale first and then adds it: no fused multiply-add here.
    const float v = keep ? __fmul_rn(g[k], scale) : 0.0f;
    d[k] = accumulate ? __fadd_rn(d[k], v) : v;
  }
  if (count == VEC) {
    store_floats<VEC>(dx + first, d);
  } else {
    dx[first] = from_float<T>(d[0]);
  }
}

// A[k] = (2 u_k - 1) * bound with u_k = philox_uniform(seed, stream_id, k): U(-bound, bound).
template <typename T>
__global__ void lora_init_kernel(T* A, size_t n, float bound, uint64_t seed, uint64_t stream_id) {
  const size_t k = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= n) return;
  const float u = llm::philox_uniform(seed, stream_id, k);
  // Each operation rounded on its own, as the reference computes it (2u - 1 is exact either way).
  A[k] = from_float<T>(__fmul_rn(__fsub_rn(__fmul_rn(2.0f, u), 1.0f), bound));
}

// ---------------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------------

void check_sizes(const char* op, int N, int I, int O, int r) {
  if (N < 0 || I <= 0 || O <= 0 || r <= 0) {
    throw std::invalid_argument(std::string(op) + ": sizes must be positive (N=" + std::to_string(N) +
                                " I=" + std::to_string(I) + " O=" + std::to_string(O) +
                                " r=" + std::to_string(r) + ")");
  }
}

template <typename T>
void launch_dropout_backward(T* dx, const T* t, size_t n, float p, uint64_t seed, uint64_t stream_id,
                             bool accumulate, cudaStream_t stream) {
  if (n == 0) return;
  // 1 / (1 - p) in fp32, the reference's expression (unused when p <= 0 or p >= 1).
  const float scale = (p > 0.0f && p < 1.0f) ? 1.0f / (1.0f - p) : 1.0f;
  constexpr int kThreads = 256;
  constexpr int V = vec16<T>();
  if (is_aligned(dx, 16) && is_aligned(t, 16)) {
    const int blocks = ceil_div(static_cast<long long>(n / V + n % V), kThreads);
    lora_dropout_backward_kernel<V>
        <<<blocks, kThreads, 0, stream>>>(dx, t, n, p, scale, seed, stream_id, accumulate);
  } else {
    const int blocks = ceil_div(static_cast<long long>(n), kThreads);
    lora_dropout_backward_kernel<1>
        <<<blocks, kThreads, 0, stream>>>(dx, t, n, p, scale, seed, stream_id, accumulate);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Host API
// ---------------------------------------------------------------------------------------------------

template <typename T>
void lora_forward(T* out, T* h, T* x_dropped, const T* x, const T* A, const T* B, int N, int I, int O, int r,
                  float scale, float dropout_p, uint64_t seed, uint64_t stream_id, cudaStream_t stream,
                  BlasLt* blas) {
  NvtxRange range("lora_forward");
  check_sizes("lora_forward", N, I, O, r);
  if (N == 0) return;
  const bool dropout = dropout_p > 0.0f;
  if (dropout && x_dropped == nullptr) {
    throw std::invalid_argument("lora_forward: dropout_p > 0 needs the x_dropped scratch buffer [N, I]");
  }
  const T* xd = x;
  if (dropout) {
    dropout_forward(x_dropped, x, static_cast<size_t>(N) * I, dropout_p, seed, stream_id, stream);
    xd = x_dropped;
  }
  // h[N, r] = x~[N, I] A[r, I]^T
  gemm<T, T>(h, xd, A, nullptr, N, r, I, I, I, r, false, true, 1.0f, 0.0f, stream, GemmEngine::kCublasLt,
             blas);
  // out[N, O] += s h[N, r] B[O, r]^T
  gemm<T, T>(out, h, B, nullptr, N, O, r, r, r, O, false, true, scale, 1.0f, stream, GemmEngine::kCublasLt,
             blas);
}

template <typename T, typename TGrad>
void lora_backward(T* dx, TGrad* dA, TGrad* dB, T* dh, T* work, const T* dout, const T* x, const T* h,
                   const T* A, const T* B, int N, int I, int O, int r, float scale, float dropout_p,
                   uint64_t seed, uint64_t stream_id, bool accumulate_dx, cudaStream_t stream, BlasLt* blas) {
  NvtxRange range("lora_backward");
  check_sizes("lora_backward", N, I, O, r);
  if (N == 0) return;  // nothing to add; dx has no rows
  const bool dropout = dropout_p > 0.0f;
  const size_t nx = static_cast<size_t>(N) * I;
  // Checked before any work is queued, so a refused call leaves dB untouched.
  const bool need_dh = dx != nullptr || dA != nullptr;
  if (need_dh && dh == nullptr)
    throw std::invalid_argument("lora_backward: dx or dA needs the dh scratch buffer [N, r]");
  if (need_dh && dropout && work == nullptr) {
    throw std::invalid_argument("lora_backward: dropout_p > 0 needs the work scratch buffer [N, I]");
  }

  // dB[O, r] += s dout[N, O]^T h[N, r]
  if (dB != nullptr) {
    gemm<T, TGrad>(dB, dout, h, nullptr, O, r, N, O, r, r, true, false, scale, 1.0f, stream,
                   GemmEngine::kCublasLt, blas);
  }
  if (!need_dh) return;

  // dh[N, r] = s dout[N, O] B[O, r]
  gemm<T, T>(dh, dout, B, nullptr, N, r, O, O, r, r, false, false, scale, 0.0f, stream, GemmEngine::kCublasLt,
             blas);

  // dA[r, I] += dh[N, r]^T x~[N, I], with x~ drawn again from the forward call's mask.
  if (dA != nullptr) {
    const T* xd = x;
    if (dropout) {
      dropout_forward(work, x, nx, dropout_p, seed, stream_id, stream);
      xd = work;
    }
    gemm<T, TGrad>(dA, dh, xd, nullptr, r, I, N, r, I, I, true, false, 1.0f, 1.0f, stream,
                   GemmEngine::kCublasLt, blas);
  }

  // dx[N, I] (+)= keep * (dh[N, r] A[r, I]) / (1 - p).
  if (dx != nullptr) {
    if (!dropout) {
      gemm<T, T>(dx, dh, A, nullptr, N, I, r, r, I, I, false, false, 1.0f, accumulate_dx ? 1.0f : 0.0f,
                 stream, GemmEngine::kCublasLt, blas);
    } else {
      gemm<T, T>(work, dh, A, nullptr, N, I, r, r, I, I, false, false, 1.0f, 0.0f, stream,
                 GemmEngine::kCublasLt, blas);
      launch_dropout_backward(dx, static_cast<const T*>(work), nx, dropout_p, seed, stream_id, accumulate_dx,
                              stream);
    }
  }
}

template <typename T>
void lora_init(T* A, T* B, int I, int O, int r, uint64_t seed, uint64_t stream_id, cudaStream_t stream) {
  NvtxRange range("lora_init");
  check_sizes("lora_init", 0, I, O, r);
  // kaiming_uniform_(a = sqrt(5)) bound, 1 / sqrt(fan_in): the same float expression as the reference.
  const float bound = 1.0f / std::sqrt(static_cast<float>(I));
  const size_t na = static_cast<size_t>(r) * I;
  constexpr int kThreads = 256;
  lora_init_kernel<T><<<ceil_div(static_cast<long long>(na), kThreads), kThreads, 0, stream>>>(
      A, na, bound, seed, stream_id);
  CUDA_CHECK_LAUNCH();
  // All-zero bits are +0 in fp32 and in bf16.
  CUDA_CHECK(cudaMemsetAsync(B, 0, static_cast<size_t>(O) * r * sizeof(T), stream));
}

template <typename T>
void lora_merge(T* merged, const T* weight, const T* A, const T* B, int I, int O, int r, float scale,
                cudaStream_t stream, BlasLt* blas) {
  NvtxRange range("lora_merge");
  check_sizes("lora_merge", 0, I, O, r);
  if (merged != weight) {
    CUDA_CHECK(cudaMemcpyAsync(merged, weight, static_cast<size_t>(O) * I * sizeof(T),
                               cudaMemcpyDeviceToDevice, stream));
  }
  // merged[O, I] += s B[O, r] A[r, I]
  gemm<T, T>(merged, B, A, nullptr, O, I, r, r, I, I, false, false, scale, 1.0f, stream,
             GemmEngine::kCublasLt, blas);
}

// Explicit instantiations.
using bf16 = __nv_bfloat16;
template void lora_forward<float>(float*, float*, float*, const float*, const float*, const float*, int, int,
                                  int, int, float, float, uint64_t, uint64_t, cudaStream_t, BlasLt*);
template void lora_forward<bf16>(bf16*, bf16*, bf16*, const bf16*, const bf16*, const bf16*, int, int, int,
                                 int, float, float, uint64_t, uint64_t, cudaStream_t, BlasLt*);
template void lora_backward<float, float>(float*, float*, float*, float*, float*, const float*, const float*,
                                          const float*, const float*, const float*, int, int, int, int, float,
                                          float, uint64_t, uint64_t, bool, cudaStream_t, BlasLt*);
template void lora_backward<bf16, bf16>(bf16*, bf16*, bf16*, bf16*, bf16*, const bf16*, const bf16*,
                                        const bf16*, const bf16*, const bf16*, int, int, int, int, float,
                                        float, uint64_t, uint64_t, bool, cudaStream_t, BlasLt*);
template void lora_backward<bf16, float>(bf16*, float*, float*, bf16*, bf16*, const bf16*, const bf16*,
                                         const bf16*, const bf16*, const bf16*, int, int, int, int, float,
                                         float, uint64_t, uint64_t, bool, cudaStream_t, BlasLt*);
template void lora_init<float>(float*, float*, int, int, int, uint64_t, uint64_t, cudaStream_t);
template void lora_init<bf16>(bf16*, bf16*, int, int, int, uint64_t, uint64_t, cudaStream_t);
template void lora_merge<float>(float*, const float*, const float*, const float*, int, int, int, float,
                                cudaStream_t, BlasLt*);
template void lora_merge<bf16>(bf16*, const bf16*, const bf16*, const bf16*, int, int, int, float,
                               cudaStream_t, BlasLt*);

}  // namespace llm::cuda
