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

// The dense bf16 tensor-core peak of device 0 in FLOP/s, for MFU: looked up from the device name
// (H100 SXM and H200 989.4 TFLOP/s; H100 NVL and H200 NVL 835; H100 PCIe 756; A100 312), or the
// environment variable LLM_PEAK_TFLOPS when set. 0 when unknown or when there is no device.
double peak_bf16_flops();

}  // namespace llm::cuda
