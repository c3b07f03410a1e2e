// What the kernel benchmarks share: deterministic device fills, an owned device buffer, and the median
// timer (DESIGN.md, "Performance method"). Header-only; each bench includes it and compiles on its own.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/cuda_common.cuh"
#include "kernels/kernel_utils.cuh"

namespace bench {

// Uniform values in [-scale, scale] from a hash of the index (no RNG state, any size).
template <typename T>
__global__ void fill_uniform_kernel(T* out, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed ^ static_cast<uint32_t>(i >> 32) * 40503u;
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    const float u = static_cast<float>(x >> 8) * (1.0f / 16777216.0f);  // [0, 1)
    out[i] = llm::cuda::from_float<T>((2.0f * u - 1.0f) * scale);
  }
}

// n elements of device memory, freed on destruction.
template <typename T>
struct Buffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit Buffer(size_t count) : n(count) {
    CUDA_CHECK(cudaMalloc(&ptr, std::max<size_t>(1, n) * sizeof(T)));
  }
  ~Buffer() { cudaFree(ptr); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void fill(uint32_t seed, float scale) {
    fill_uniform_kernel<T><<<1024, 256>>>(ptr, n, seed, scale);
    CUDA_CHECK_LAUNCH();
  }
};

// Repetitions of time_ms (a bench's --quick lowers them).
inline int g_warmup = 3;
inline int g_reps = 10;

// Median milliseconds of f() over g_reps runs, after g_warmup.
inline double time_ms(const std::function<void()>& f) {
  for (int i = 0; i < g_warmup; ++i) f();
  CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int i = 0; i < g_reps; ++i) {
    CUDA_CHECK(cudaEventRecord(start));
    f();
    CUDA_CHECK(cudaEventRecord(stop));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace bench
