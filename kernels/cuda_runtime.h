// The small part of the CUDA runtime that host code outside kernels/ needs: is there a usable GPU?
#pragma once

#include <string>

namespace llm::cuda {

// Number of usable CUDA devices; 0 when there is no driver or no device.
int device_count();

// Why no GPU is usable (the CUDA error text), or "" when one is.
std::string unavailable_reason();

// "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)" for device 0, or "" when there is none.
std::string device_summary();

}  // namespace llm::cuda
