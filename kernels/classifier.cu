// The fused classifier: the row kernel (softmax statistics, logprob, dz in place), the loss reduction, and
// the host loop over chunks. The math is in classifier.cuh.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/classifier.cuh"

namespace llm::cuda {

namespace {

// exp for the row kernel: the fast hardware approximation in bf16 (its error, a few ulp of fp32, is far
// below bf16's rounding of the logits), the accurate one in the fp32 test mode.
template <typename T>
__device__ __forceinline__ float row_exp(float x);
template <>
__device__ __forceinline__ float row_exp<float>(float x) {
  return expf(x);
}
template <>
__device__ __forceinline__ float row_exp<__nv_bfloat16>(float x) {
  return __expf(x);
}

// 16 bytes of T: the unit of the row kernel's loads and stores (8 bf16 or 4 floats).
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// A running (max, sum of exp(x - max)) pair of the online softmax.
struct MaxSum {
  float m;
  float s;
};

// Merges two partial (max, sum) pairs. Empty pairs have m = -inf and s = 0. Both operations are
// commutative in IEEE arithmetic, so the xor-shuffle reduction below leaves the same bits in every lane.
template <typename T>
__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * row_exp<T>(a.m - m) + b.s * row_exp<T>(b.m - m)};
}

constexpr int kMaxRowThreads = 1024;

// One block per row of the chunk: logits[row, 0:V) (leading dimension ld, a multiple of 8).
// Pass 1: each thread folds its packs into a running (max, sum); the block merges them (warp shuffles,
// then the warps' results in order through shared memory), giving lse. Pass 2 (backward): each thread
// rewrites the same packs it read with dz = g * ([v == t] - exp(z - lse)); padding columns get 0.
// The target's logit is read by thread 0 before the block's first barrier, i.e. before any thread can
// overwrite it in pass 2.
template <typename T, bool kBackward>
__global__ void __launch_bounds__(kMaxRowThreads)
    classifier_row_kernel(T* logits, int ld, int V, const int32_t* targets, const float* dlogprobs,
                          float dlogprob_scale, float* logprobs, float* lse_out) {
  constexpr int kVec = Pack<T>::kSize;
  const int row = blockIdx.x;
  T* z = logits + static_cast<size_t>(row) * ld;
  Pack<T>* packs = reinterpret_cast<Pack<T>*>(z);
  const int num_packs = ld / kVec;

  const int t = targets[row];
  const bool ignored = t == kClassifierIgnoreIndex;
  const bool valid = t >= 0 && t < V;
  float target_logit = 0.0f;
  if (threadIdx.x == 0 && valid) target_logit = to_float(z[t]);

  // Pass 1: online max and sum of exponentials.
  MaxSum acc{-INFINITY, 0.0f};
  for (int i = threadIdx.x; i < num_packs; i += blockDim.x) {
    const Pack<T> p = packs[i];
    float x[kVec];
    float pack_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      x[j] = to_float(p.v[j]);
      if (i * kVec + j < V) pack_max = fmaxf(pack_max, x[j]);
    }
    if (pack_max > acc.m) {
      acc.s *= row_exp<T>(acc.m - pack_max);  // 0 * exp(-inf) = 0 on the first pack
      acc.m = pack_max;
    }
    if (acc.m != -INFINITY) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (i * kVec + j < V) acc.s += row_exp<T>(x[j] - acc.m);
      }
    }
  }

  // Block reduction of (max, sum): within each warp, then across the warps in order.
  __shared__ MaxSum warp_result[kMaxRowThreads / 32];
  __shared__ float row_lse;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, acc.m, offset),
                       __shfl_xor_sync(0xffffffffu, acc.s, offset)};
    acc = combine<T>(acc, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_result[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    MaxSum total = warp_result[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) total = combine<T>(total, warp_result[w]);
    const float lse = total.m + logf(total.s);
    row_lse = lse;
    if (lse_out != nullptr) lse_out[row] = lse;
    logprobs[row] = ignored ? 0.0f : (valid ? target_logit - lse : NAN);
  }
  if (!kBackward) return;
  __syncthreads();

  // Pass 2: dz in place.
  const float lse = row_lse;
  const float g = (ignored || !valid) ? 0.0f : (dlogprobs != nullptr ? dlogprobs[row] : dlogprob_scale);
  for (int i = threadIdx.x; i < num_packs; i += blockDim.x) {
    Pack<T> p = packs[i];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int v = i * kVec + j;
      float grad = 0.0f;
      if (v < V && g != 0.0f) {
        const float prob = row_exp<T>(to_float(p.v[j]) - lse);
        grad = g * ((v == t ? 1.0f : 0.0f) - prob);
      }
      p.v[j] = from_float<T>(grad);
    }
    packs[i] = p;
  }
}

// loss = -(sum of logprobs of counted tokens) / count, in one block with a fixed summation order.
constexpr int kLossThreads = 1024;

__global__ void __launch_bounds__(kLossThreads)
    mean_loss_kernel(float* loss, const float* logprobs, const int32_t* targets, int N) {
  double sum = 0.0;
  int count = 0;
  for (int n = threadIdx.x; n < N; n += kLossThreads) {
    if (targets[n] != kClassifierIgnoreIndex) {
      sum += logprobs[n];
      ++count;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    count += __shfl_xor_sync(0xffffffffu, count, offset);
  }
  __shared__ double warp_sum[kLossThreads / 32];
  __shared__ int warp_count[kLossThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_sum[warp] = sum;
    warp_count[warp] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    long long total_count = 0;
    for (int w = 0; w < kLossThreads / 32; ++w) {
      total += warp_sum[w];
      total_count += warp_count[w];
    }
    *loss = total_count > 0 ? static_cast<float>(-total / static_cast<double>(total_count)) : 0.0f;
  }
}

template <typename T, typename TGrad>
void classifier_run(bool backward, T* dh, TGrad* dweight, float* logprobs, float* lse, float* loss,
                    const T* h, const T* weight, const int32_t* targets, const float* dlogprobs,
                    float dlogprob_scale, T* scratch, int chunk_rows, int N, int d, int V,
                    cudaStream_t stream, BlasLt* blas) {
  if (N < 0 || d <= 0 || V <= 0 || chunk_rows <= 0) {
    throw std::invalid_argument("classifier: bad sizes (N=" + std::to_string(N) + " d=" + std::to_string(d) +
                                " V=" + std::to_string(V) + " chunk_rows=" + std::to_string(chunk_rows) +
                                ")");
  }
  if (N > 0 && (logprobs == nullptr || h == nullptr || weight == nullptr || targets == nullptr ||
                scratch == nullptr)) {
    throw std::invalid_argument("classifier: logprobs, h, weight, targets and scratch must not be null");
  }
  if (reinterpret_cast<uintptr_t>(scratch) % 16 != 0) {
    throw std::invalid_argument("classifier: the scratch buffer must be 16-byte aligned");
  }
  const int ld = classifier_padded_vocab(V);
  const int num_packs = ld / Pack<T>::kSize;
  const int threads = std::min(kMaxRowThreads, std::max(32, (num_packs + 31) / 32 * 32));

  for (int r0 = 0; r0 < N; r0 += chunk_rows) {
    const int rows = std::min(chunk_rows, N - r0);
    const T* h_chunk = h + static_cast<size_t>(r0) * d;
    // logits[rows, V] (ld) = h_chunk[rows, d] W[V, d]^T
    gemm<T, T>(scratch, h_chunk, weight, nullptr, rows, V, d, d, d, ld, false, true, 1.0f, 0.0f, stream,
               GemmEngine::kCublasLt, blas);
    const float* chunk_dlogprobs = dlogprobs != nullptr ? dlogprobs + r0 : nullptr;
    float* chunk_lse = lse != nullptr ? lse + r0 : nullptr;
    if (backward) {
      classifier_row_kernel<T, true><<<rows, threads, 0, stream>>>(
          scratch, ld, V, targets + r0, chunk_dlogprobs, dlogprob_scale, logprobs + r0, chunk_lse);
    } else {
      classifier_row_kernel<T, false><<<rows, threads, 0, stream>>>(
          scratch, ld, V, targets + r0, chunk_dlogprobs, dlogprob_scale, logprobs + r0, chunk_lse);
    }
    CUDA_CHECK_LAUNCH();
    if (!backward) continue;
    if (dh != nullptr) {
      // dh[rows, d] = dz[rows, V] W[V, d]
      gemm<T, T>(dh + static_cast<size_t>(r0) * d, scratch, weight, nullptr, rows, d, V, ld, d, d, false,
                 false, 1.0f, 0.0f, stream, GemmEngine::kCublasLt, blas);
    }
    if (dweight != nullptr) {
      // dW[V, d] += dz[rows, V]^T h_chunk[rows, d]
      gemm<T, TGrad>(dweight, scratch, h_chunk, nullptr, V, d, rows, ld, d, d, true, false, 1.0f, 1.0f,
                     stream, GemmEngine::kCublasLt, blas);
    }
  }
  if (loss != nullptr) {
    mean_loss_kernel<<<1, kLossThreads, 0, stream>>>(loss, logprobs, targets, N);
    CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

template <typename T>
void classifier_forward(float* logprobs, float* lse, float* loss, const T* h, const T* weight,
                        const int32_t* targets, T* scratch, int chunk_rows, int N, int d, int V,
                        cudaStream_t stream, BlasLt* blas) {
  classifier_run<T, T>(false, nullptr, nullptr, logprobs, lse, loss, h, weight, targets, nullptr, 0.0f,
                       scratch, chunk_rows, N, d, V, stream, blas);
}

template <typename T, typename TGrad>
void classifier_forward_backward(T* dh, TGrad* dweight, float* logprobs, float* lse, float* loss, const T* h,
                                 const T* weight, const int32_t* targets, const float* dlogprobs,
                                 float dlogprob_scale, T* scratch, int chunk_rows, int N, int d, int V,
                                 cudaStream_t stream, BlasLt* blas) {
  classifier_run<T, TGrad>(true, dh, dweight, logprobs, lse, loss, h, weight, targets, dlogprobs,
                           dlogprob_scale, scratch, chunk_rows, N, d, V, stream, blas);
}

using bf16 = __nv_bfloat16;
template void classifier_forward<float>(float*, float*, float*, const float*, const float*, const int32_t*,
                                        float*, int, int, int, int, cudaStream_t, BlasLt*);
template void classifier_forward<bf16>(float*, float*, float*, const bf16*, const bf16*, const int32_t*,
                                       bf16*, int, int, int, int, cudaStream_t, BlasLt*);
template void classifier_forward_backward<float, float>(float*, float*, float*, float*, float*, const float*,
                                                        const float*, const int32_t*, const float*, float,
                                                        float*, int, int, int, int, cudaStream_t, BlasLt*);
template void classifier_forward_backward<bf16, bf16>(bf16*, bf16*, float*, float*, float*, const bf16*,
                                                      const bf16*, const int32_t*, const float*, float, bf16*,
                                                      int, int, int, int, cudaStream_t, BlasLt*);
template void classifier_forward_backward<bf16, float>(bf16*, float*, float*, float*, float*, const bf16*,
                                                       const bf16*, const int32_t*, const float*, float,
                                                       bf16*, int, int, int, int, cudaStream_t, BlasLt*);

}  // namespace llm::cuda
