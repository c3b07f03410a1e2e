// NF4 on the GPU: the code tables, the quantise/dequantise kernels and the host launchers. The math, the
// exactness argument and the kernel layouts are in nf4.cuh.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cpu/nf4.h"
#include "kernels/cuda_common.cuh"
#include "kernels/kernel_utils.cuh"
#include "kernels/matmul.cuh"
#include "kernels/nf4.cuh"
#include "kernels/nvtx.cuh"

namespace llm::cuda {

namespace {

// The tables are the CPU reference's (kernels/cpu/nf4.h): one copy of bitsandbytes' values.
constexpr const float* kCodeTable = ref::kNf4Code;
constexpr const float* kDynamicMap = ref::kDynamicMapSigned;

// Kernel parameters carry the tables by value (a few hundred bytes of constant bank), filled on the host.
struct CodeTable {
  float v[16];
};
struct Midpoints {
  float v[15];
};
struct DynamicMap {
  float v[256];
};

CodeTable code_table() {
  CodeTable t{};
  for (int i = 0; i < 16; ++i) t.v[i] = kCodeTable[i];
  return t;
}

// m_i = (c_i + c_{i+1}) / 2, the reference's expression evaluated on the host in fp32, so the kernel
// compares against exactly the reference's midpoints.
Midpoints midpoints() {
  Midpoints m{};
  for (int i = 0; i < 15; ++i) m.v[i] = (kCodeTable[i] + kCodeTable[i + 1]) / 2.0f;
  return m;
}

DynamicMap dynamic_map() {
  DynamicMap d{};
  for (int i = 0; i < 256; ++i) d.v[i] = kDynamicMap[i];
  return d;
}

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------------

// The NF4 code of one weight x of a block with absmax floor `safe` (= max(absmax, 1e-38)) and reciprocal
// `inv`: the number of midpoints strictly below the scaled, clamped value.
__device__ __forceinline__ uint32_t nf4_code(float x, bool full_block, float inv, float safe,
                                             const Midpoints& mid) {
  float s = full_block ? __fmul_rn(x, inv) : __fdiv_rn(x, safe);
  s = fminf(fmaxf(s, -1.0f), 1.0f);
  uint32_t q = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) q += s > mid.v[i] ? 1u : 0u;
  return q;
}

// One warp per quantisation block b: absmax[b], then the block's bytes of packed codes.
template <typename T>
__global__ void nf4_quantize_kernel(uint8_t* packed, float* absmax, const T* w, size_t n, int blocksize,
                                    size_t nblocks, Midpoints mid) {
  const size_t b = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (b >= nblocks) return;  // b is the same for all 32 lanes, so whole warps leave together
  const size_t begin = b * static_cast<size_t>(blocksize);
  const size_t end = begin + static_cast<size_t>(blocksize) < n ? begin + static_cast<size_t>(blocksize) : n;

  // absmax: each lane's maximum over its strided elements, then a butterfly over the warp. A maximum is
  // exact, so the order does not matter.
  float am = 0.0f;
  for (size_t j = begin + lane; j < end; j += 32) am = fmaxf(am, fabsf(to_float(w[j])));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, offset));
  if (lane == 0) absmax[b] = am;

  const float safe = fmaxf(am, 1e-38f);
  const bool full_block = end - begin == static_cast<size_t>(blocksize);
  const float inv = __fdiv_rn(1.0f, safe);
  // begin is even (blocksize is even), so element pair k of the block is byte (begin / 2 + k).
  const size_t pairs = (end - begin + 1) / 2;
  for (size_t k = lane; k < pairs; k += 32) {
    const size_t j = begin + 2 * k;
    const uint32_t hi = nf4_code(to_float(w[j]), full_block, inv, safe, mid);
    const uint32_t lo = j + 1 < end ? nf4_code(to_float(w[j + 1]), full_block, inv, safe, mid) : kNf4ZeroCode;
    packed[j / 2] = static_cast<uint8_t>((hi << 4) | lo);
  }
}

// w[j] = code[q_j] * absmax[j / blocksize]. VEC = 1 (clear): one element per thread. VEC = 8 (fast): 8
// elements = 4 bytes per thread; the n % 8 tail elements go one per thread after the last full vector.
template <int VEC, typename T>
__global__ void nf4_dequantize_kernel(T* w, const uint8_t* packed, const float* absmax, size_t n,
                                      int blocksize, CodeTable table) {
  static_assert(VEC == 1 || VEC == 8, "one element, or the 8 elements of one 32-bit word of codes");
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = table.v[threadIdx.x];
  __syncthreads();  // before any thread returns

  const size_t t = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t n_vec = n / VEC;
  if constexpr (VEC > 1) {
    if (t < n_vec) {
      const size_t first = t * VEC;
      const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + first / 2);  // little-endian bytes
      const float a = absmax[first / static_cast<size_t>(blocksize)];  // blocksize % 8 == 0: one block
      float v[VEC];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t byte = (word >> (8 * k)) & 0xFFu;
        v[2 * k] = __fmul_rn(code[byte >> 4], a);
        v[2 * k + 1] = __fmul_rn(code[byte & 0xFu], a);
      }
      store_floats<VEC>(w + first, v);
      return;
    }
  }
  const size_t j = VEC == 1 ? t : n_vec * VEC + (t - n_vec);  // this thread's element
  if (j >= n) return;
  const uint32_t byte = packed[j / 2];
  const uint32_t q = (j % 2 == 0) ? (byte >> 4) : (byte & 0xFu);
  w[j] = from_float<T>(__fmul_rn(code[q], absmax[j / static_cast<size_t>(blocksize)]));
}

// absmax[b] = dyn[qabsmax[b]] * state2[b / blocksize2] + offset, product and sum rounded separately.
__global__ void nf4_double_dequantize_kernel(float* absmax, const uint8_t* qabsmax, const float* state2,
                                             float offset, size_t nblocks, int blocksize2, DynamicMap map) {
  __shared__ float dyn[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) dyn[i] = map.v[i];
  __syncthreads();  // before any thread returns
  const size_t b = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= nblocks) return;
  absmax[b] = __fadd_rn(__fmul_rn(dyn[qabsmax[b]], state2[b / static_cast<size_t>(blocksize2)]), offset);
}

void check_linear_sizes(const char* op, int N, int I, int O) {
  if (N < 0 || I <= 0 || O <= 0) {
    throw std::invalid_argument(std::string(op) + ": sizes must be positive (N=" + std::to_string(N) +
                                " I=" + std::to_string(I) + " O=" + std::to_string(O) + ")");
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Host API
// ---------------------------------------------------------------------------------------------------

const float* nf4_code_table() {
  return kCodeTable;
}

const float* nf4_dynamic_map_table() {
  return kDynamicMap;
}

template <typename T>
void nf4_quantize(uint8_t* packed, float* absmax, const T* w, size_t n, int blocksize, cudaStream_t stream) {
  NvtxRange range("nf4_quantize");
  if (blocksize <= 0 || blocksize % 2 != 0) {
    throw std::invalid_argument("nf4_quantize: blocksize must be positive and even (got " +
                                std::to_string(blocksize) + ")");
  }
  if (n == 0) return;
  const size_t nblocks = nf4_blocks(n, blocksize);
  constexpr int kWarpsPerBlock = kThreads / 32;
  nf4_quantize_kernel<T><<<ceil_div(static_cast<long long>(nblocks), kWarpsPerBlock), kThreads, 0, stream>>>(
      packed, absmax, w, n, blocksize, nblocks, midpoints());
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void nf4_dequantize(T* w, const uint8_t* packed, const float* absmax, size_t n, int blocksize,
                    cudaStream_t stream, KernelVariant variant) {
  NvtxRange range("nf4_dequantize");
  if (blocksize <= 0) {
    throw std::invalid_argument("nf4_dequantize: blocksize must be positive (got " +
                                std::to_string(blocksize) + ")");
  }
  if (n == 0) return;
  const bool aligned = is_aligned(w, 16) && is_aligned(packed, 4) && blocksize % 8 == 0;
  if (variant == KernelVariant::kFast && !aligned) {
    throw std::invalid_argument(
        "nf4_dequantize: the fast variant needs w 16-byte aligned, packed 4-byte aligned and blocksize % 8 "
        "== 0");
  }
  if (variant != KernelVariant::kClear && aligned) {
    const int blocks = ceil_div(static_cast<long long>(n / 8 + n % 8), kThreads);
    nf4_dequantize_kernel<8, T>
        <<<blocks, kThreads, 0, stream>>>(w, packed, absmax, n, blocksize, code_table());
  } else {
    const int blocks = ceil_div(static_cast<long long>(n), kThreads);
    nf4_dequantize_kernel<1, T>
        <<<blocks, kThreads, 0, stream>>>(w, packed, absmax, n, blocksize, code_table());
  }
  CUDA_CHECK_LAUNCH();
}

void nf4_double_dequantize(float* absmax, const uint8_t* qabsmax, const float* state2, float offset,
                           size_t nblocks, int blocksize2, cudaStream_t stream) {
  NvtxRange range("nf4_double_dequantize");
  if (blocksize2 <= 0) {
    throw std::invalid_argument("nf4_double_dequantize: blocksize2 must be positive (got " +
                                std::to_string(blocksize2) + ")");
  }
  if (nblocks == 0) return;
  nf4_double_dequantize_kernel<<<ceil_div(static_cast<long long>(nblocks), kThreads), kThreads, 0, stream>>>(
      absmax, qabsmax, state2, offset, nblocks, blocksize2, dynamic_map());
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void nf4_linear_forward(T* out, T* scratch, const T* x, const uint8_t* packed, const float* absmax,
                        const T* bias, int N, int I, int O, int blocksize, cudaStream_t stream,
                        BlasLt* blas) {
  NvtxRange range("nf4_linear_forward");
  check_linear_sizes("nf4_linear_forward", N, I, O);
  if (N == 0) return;
  nf4_dequantize<T>(scratch, packed, absmax, nf4_linear_scratch_elements(I, O), blocksize, stream);
  matmul_forward<T>(out, x, scratch, bias, N, I, O, stream, GemmEngine::kCublasLt, blas);  // x deq(W)^T + b
}

template <typename T>
void nf4_linear_backward_input(T* dx, T* scratch, const T* dout, const uint8_t* packed, const float* absmax,
                               int N, int I, int O, int blocksize, bool accumulate_dx, cudaStream_t stream,
                               BlasLt* blas) {
  NvtxRange range("nf4_linear_backward_input");
  check_linear_sizes("nf4_linear_backward_input", N, I, O);
  if (N == 0) return;
  nf4_dequantize<T>(scratch, packed, absmax, nf4_linear_scratch_elements(I, O), blocksize, stream);
  // dx (=|+=) dout deq(W); x is not needed for dx, and there is no dW or db.
  matmul_backward<T, T>(dx, nullptr, nullptr, dout, nullptr, scratch, N, I, O, accumulate_dx, stream,
                        GemmEngine::kCublasLt, blas);
}

// Explicit instantiations.
using bf16 = __nv_bfloat16;
template void nf4_quantize<float>(uint8_t*, float*, const float*, size_t, int, cudaStream_t);
template void nf4_quantize<bf16>(uint8_t*, float*, const bf16*, size_t, int, cudaStream_t);
template void nf4_dequantize<float>(float*, const uint8_t*, const float*, size_t, int, cudaStream_t,
                                    KernelVariant);
template void nf4_dequantize<bf16>(bf16*, const uint8_t*, const float*, size_t, int, cudaStream_t,
                                   KernelVariant);
template void nf4_linear_forward<float>(float*, float*, const float*, const uint8_t*, const float*,
                                        const float*, int, int, int, int, cudaStream_t, BlasLt*);
template void nf4_linear_forward<bf16>(bf16*, bf16*, const bf16*, const uint8_t*, const float*, const bf16*,
                                       int, int, int, int, cudaStream_t, BlasLt*);
template void nf4_linear_backward_input<float>(float*, float*, const float*, const uint8_t*, const float*,
                                               int, int, int, int, bool, cudaStream_t, BlasLt*);
template void nf4_linear_backward_input<bf16>(bf16*, bf16*, const bf16*, const uint8_t*, const float*, int,
                                              int, int, int, bool, cudaStream_t, BlasLt*);

}  // namespace llm::cuda
