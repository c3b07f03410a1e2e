#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda_runtime.h"

namespace llm::cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

std::string unavailable_reason() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable CUDA device: ") + cudaGetErrorString(err);
  }
  if (count == 0) return "no CUDA device found";
  return "";
}

std::string device_summary() {
  if (device_count() == 0) return "";
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return "";
  char details[64];
  std::snprintf(details, sizeof(details), " (sm_%d%d, %.1f GiB)", prop.major, prop.minor,
                static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  return std::string(prop.name) + details;
}

double peak_bf16_flops() {
  if (const char* env = std::getenv("LLM_PEAK_TFLOPS")) {
    const double tflops = std::atof(env);
    if (tflops > 0.0) return tflops * 1e12;
  }
  if (device_count() == 0) return 0.0;
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return 0.0;
  // Most specific names first: "H100 NVL" must not match the H100 SXM entry.
  static const struct {
    const char* name;
    double tflops;
  } kPeaks[] = {{"H200 NVL", 835.0}, {"H100 NVL", 835.0}, {"H100 PCIe", 756.0},
                {"H200", 989.4},     {"H100", 989.4},     {"A100", 312.0}};
  for (const auto& p : kPeaks) {
    if (std::strstr(prop.name, p.name) != nullptr) return p.tflops * 1e12;
  }
  return 0.0;
}

}  // namespace llm::cuda
