// Shared by every CUDA kernel file: error checking, the storage types, and small device helpers.
//
// Precision: activations and weights are stored in bf16 (`__nv_bfloat16`) and computed in fp32; the
// same kernels instantiate with `float` storage for the fp32 test mode. Master weights, optimizer
// state, softmax statistics, losses and norms are fp32 in both modes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace llm::cuda {

// Throws std::runtime_error with the file, line and CUDA error text.
inline void check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + what + ": " +
                             cudaGetErrorString(err));
  }
}

// Storage <-> fp32 conversions that work for both storage types.
__device__ __forceinline__ float to_float(float x) {
  return x;
}
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

inline int ceil_div(long long a, long long b) {
  return static_cast<int>((a + b - 1) / b);
}

}  // namespace llm::cuda

#define CUDA_CHECK(call) ::llm::cuda::check((call), #call, __FILE__, __LINE__)
// After a kernel launch: launch-configuration errors surface here, not at the next sync.
#define CUDA_CHECK_LAUNCH() ::llm::cuda::check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
