// CUDA activations (kernels/activations.cuh) against the CPU reference (kernels/cpu/activations.h): every
// activation forward and backward, SwiGLU, both variants, fp32 and bf16 storage, odd sizes, poisoned
// outputs, and the fast variant against the clear one.
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/activations.cuh"
#include "kernels/cpu/activations.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/kernel_test_helpers.h"

namespace {

using llm::cuda::KernelVariant;
using llm::ref::Activation;
using namespace llm::test;

constexpr Activation kActivations[] = {Activation::kRelu, Activation::kLeakyRelu, Activation::kGeluErf,
                                       Activation::kGeluTanh, Activation::kSilu};
constexpr float kSlope = 0.07f;

const char* name_of(Activation act) {
  switch (act) {
    case Activation::kRelu:
      return "relu";
    case Activation::kLeakyRelu:
      return "leaky_relu";
    case Activation::kGeluErf:
      return "gelu_erf";
    case Activation::kGeluTanh:
      return "gelu_tanh";
    case Activation::kSilu:
      return "silu";
  }
  return "?";
}

const char* name_of(KernelVariant variant) {
  return variant == KernelVariant::kFast ? "fast" : "clear";
}

struct ActivationResult {
  std::vector<float> y, dx;
};

// Runs forward and backward on the GPU (outputs poisoned first) and checks them against the reference.
template <typename T>
ActivationResult check_activation(Activation act, size_t n, KernelVariant variant) {
  std::vector<float> x = round_to<T>(random_floats(n, 11, -4.0f, 4.0f));
  x[0] = 0.0f;  // the kink: both sides use the left derivative
  const std::vector<float> dout = round_to<T>(random_floats(n, 12));
  std::vector<float> want_y(n), want_dx(n);
  llm::ref::activation_forward(act, want_y.data(), x.data(), n, static_cast<double>(kSlope));
  llm::ref::activation_backward(act, want_dx.data(), dout.data(), x.data(), n, static_cast<double>(kSlope));

  DeviceBuffer<T> d_x(n), d_dout(n), d_y(n), d_dx(n);
  upload_floats(d_x, x);
  upload_floats(d_dout, dout);
  d_y.poison();
  d_dx.poison();
  llm::cuda::activation_forward(d_y.get(), d_x.get(), n, act, kSlope, nullptr, variant);
  llm::cuda::activation_backward(d_dx.get(), d_dout.get(), d_x.get(), n, act, kSlope, nullptr, variant);
  CUDA_CHECK(cudaDeviceSynchronize());

  ActivationResult got{download_floats(d_y), download_floats(d_dx)};
  const std::string what =
      std::string(name_of(act)) + " " + type_name<T>() + " " + name_of(variant) + " n=" + std::to_string(n);
  expect_relative_error(what + " forward", got.y, want_y, tolerance<T>());
  expect_relative_error(what + " backward", got.dx, want_dx, tolerance<T>());
  return got;
}

template <typename T>
void check_all_activations() {
  // 1001 is odd: the fast variant has a tail of 1001 % 8 (bf16) or 1001 % 4 (fp32) scalar elements.
  for (size_t n : {size_t{1}, size_t{7}, size_t{1001}, size_t{4096}}) {
    for (Activation act : kActivations) {
      const ActivationResult clear = check_activation<T>(act, n, KernelVariant::kClear);
      const ActivationResult fast = check_activation<T>(act, n, KernelVariant::kFast);
      expect_relative_error(std::string("fast vs clear forward ") + name_of(act), fast.y, clear.y,
                            tolerance<T>());
      expect_relative_error(std::string("fast vs clear backward ") + name_of(act), fast.dx, clear.dx,
                            tolerance<T>());
    }
  }
}

template <typename T>
void check_swiglu(size_t n, KernelVariant variant) {
  const std::vector<float> gate = round_to<T>(random_floats(n, 21, -4.0f, 4.0f));
  const std::vector<float> up = round_to<T>(random_floats(n, 22, -2.0f, 2.0f));
  const std::vector<float> dout = round_to<T>(random_floats(n, 23));
  std::vector<float> want_y(n), want_dgate(n), want_dup(n);
  llm::ref::swiglu_forward(want_y.data(), gate.data(), up.data(), n);
  llm::ref::swiglu_backward(want_dgate.data(), want_dup.data(), dout.data(), gate.data(), up.data(), n);

  DeviceBuffer<T> d_gate(n), d_up(n), d_dout(n), d_y(n), d_dgate(n), d_dup(n);
  upload_floats(d_gate, gate);
  upload_floats(d_up, up);
  upload_floats(d_dout, dout);
  d_y.poison();
  d_dgate.poison();
  d_dup.poison();
  llm::cuda::swiglu_forward(d_y.get(), d_gate.get(), d_up.get(), n, nullptr, variant);
  llm::cuda::swiglu_backward(d_dgate.get(), d_dup.get(), d_dout.get(), d_gate.get(), d_up.get(), n, nullptr,
                             variant);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::string what =
      std::string("swiglu ") + type_name<T>() + " " + name_of(variant) + " n=" + std::to_string(n);
  expect_relative_error(what + " forward", download_floats(d_y), want_y, tolerance<T>());
  expect_relative_error(what + " dgate", download_floats(d_dgate), want_dgate, tolerance<T>());
  expect_relative_error(what + " dup", download_floats(d_dup), want_dup, tolerance<T>());
}

template <typename T>
void check_in_place() {
  // out aliases x, dx aliases dout.
  const size_t n = 1003;
  const std::vector<float> x = round_to<T>(random_floats(n, 31, -3.0f, 3.0f));
  const std::vector<float> dout = round_to<T>(random_floats(n, 32));
  std::vector<float> want_y(n), want_dx(n);
  llm::ref::activation_forward(Activation::kGeluTanh, want_y.data(), x.data(), n);
  llm::ref::activation_backward(Activation::kGeluTanh, want_dx.data(), dout.data(), x.data(), n);
  for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kFast}) {
    DeviceBuffer<T> d_x(n), d_y(n), d_g(n);
    upload_floats(d_x, x);
    upload_floats(d_y, x);
    upload_floats(d_g, dout);
    llm::cuda::activation_backward(d_g.get(), d_g.get(), d_x.get(), n, Activation::kGeluTanh, 0.01f, nullptr,
                                   variant);
    llm::cuda::activation_forward(d_y.get(), d_y.get(), n, Activation::kGeluTanh, 0.01f, nullptr, variant);
    CUDA_CHECK(cudaDeviceSynchronize());
    expect_relative_error("in-place forward", download_floats(d_y), want_y, tolerance<T>());
    expect_relative_error("in-place backward", download_floats(d_g), want_dx, tolerance<T>());
  }
}

TEST(CudaActivations, MatchReferenceFp32) {
  SKIP_WITHOUT_GPU();
  check_all_activations<float>();
}

TEST(CudaActivations, MatchReferenceBf16) {
  SKIP_WITHOUT_GPU();
  check_all_activations<__nv_bfloat16>();
}

TEST(CudaActivations, SwigluMatchesReference) {
  SKIP_WITHOUT_GPU();
  for (size_t n : {size_t{3}, size_t{1001}, size_t{8192}}) {
    for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kFast}) {
      check_swiglu<float>(n, variant);
      check_swiglu<__nv_bfloat16>(n, variant);
    }
  }
}

TEST(CudaActivations, InPlace) {
  SKIP_WITHOUT_GPU();
  check_in_place<float>();
  check_in_place<__nv_bfloat16>();
}

TEST(CudaActivations, FastVariantRejectsMisalignedPointers) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<float> d(64);
  EXPECT_THROW(llm::cuda::activation_forward(d.get() + 1, d.get(), 32, Activation::kRelu, 0.0f, nullptr,
                                             KernelVariant::kFast),
               std::invalid_argument);
  // kAuto falls back to the clear variant instead.
  EXPECT_NO_THROW(llm::cuda::activation_forward(d.get() + 1, d.get() + 33, 31, Activation::kRelu, 0.0f,
                                                nullptr, KernelVariant::kAuto));
  CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace
