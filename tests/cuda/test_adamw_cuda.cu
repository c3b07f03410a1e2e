// CUDA AdamW step (kernels/adamw.cuh): the global gradient norm (deterministic two-pass reduction), the
// clipping scale, and the update of fp32 master weights and state with the working copy written, against
// a double-precision reference of the CPU optimizer's formulas (train/optimizer.h, torch.optim.AdamW),
// over several steps, odd sizes, both variants, fp32 and bf16 working copies and gradients.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/adamw.cuh"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/kernel_test_helpers.h"

namespace {

using llm::cuda::KernelVariant;
using namespace llm::test;

const char* name_of(KernelVariant variant) {
  return variant == KernelVariant::kFast ? "fast" : variant == KernelVariant::kClear ? "clear" : "auto";
}

struct Hyper {
  float lr = 3e-3f, eps = 1e-8f, weight_decay = 0.1f;
  // Doubles, as the CPU optimizer holds them; 0.999 is not a float (1 - float(0.999) is 1.3e-5 off).
  double beta1 = 0.9, beta2 = 0.999;
};

// The reference: the CPU optimizer's AdamW step, in double, with the gradient multiplied by `scale`.
struct AdamState {
  std::vector<float> master, m, v;
};

void reference_step(AdamState& s, const std::vector<float>& grad, double scale, const Hyper& h,
                    int64_t step) {
  const double b1 = h.beta1, b2 = h.beta2;
  const double bias1 = 1.0 - std::pow(b1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(b2, static_cast<double>(step));
  for (size_t i = 0; i < grad.size(); ++i) {
    const double g = grad[i] * scale;
    const double mi = b1 * s.m[i] + (1.0 - b1) * g;
    const double vi = b2 * s.v[i] + (1.0 - b2) * g * g;
    s.m[i] = static_cast<float>(mi);
    s.v[i] = static_cast<float>(vi);
    double w = s.master[i];
    w -= static_cast<double>(h.lr) * h.weight_decay * w;
    w -= static_cast<double>(h.lr) * (mi / bias1) / (std::sqrt(vi / bias2) + static_cast<double>(h.eps));
    s.master[i] = static_cast<float>(w);
  }
}

double reference_norm(const std::vector<float>& grad) {
  double sum = 0.0;
  for (float g : grad) sum += static_cast<double>(g) * g;
  return std::sqrt(sum);
}

// Runs the norm on the GPU; returns {norm, clip_scale}.
template <typename T>
std::pair<float, float> gpu_norm(DeviceBuffer<T>& d_grad, size_t n, float max_norm, KernelVariant variant) {
  DeviceBuffer<float> d_norm(1), d_scale(1);
  const size_t scratch_doubles = llm::cuda::grad_norm_scratch_doubles(n);
  DeviceBuffer<double> d_scratch(scratch_doubles);
  d_norm.poison();
  d_scale.poison();
  d_scratch.poison();
  llm::cuda::global_grad_norm(d_norm.get(), d_scale.get(), d_scratch.get(), scratch_doubles, d_grad.get(), n,
                              max_norm, nullptr, variant);
  CUDA_CHECK(cudaDeviceSynchronize());
  return {d_norm.download()[0], d_scale.download()[0]};
}

template <typename T>
void check_norm(size_t n, KernelVariant variant) {
  const std::vector<float> grad = round_to<T>(random_floats(n, 121, -2.0f, 2.0f));
  DeviceBuffer<T> d_grad(n);
  upload_floats(d_grad, grad);
  const double want = reference_norm(grad);
  const std::string what =
      std::string("grad norm ") + type_name<T>() + " " + name_of(variant) + " n=" + std::to_string(n);

  const auto [norm, scale] = gpu_norm(d_grad, n, static_cast<float>(want / 4), variant);
  EXPECT_NEAR(norm, want, 1e-6 * want) << what;
  EXPECT_NEAR(scale, 0.25, 1e-6) << what << ": clip scale";
  // Twice: the same bits.
  const auto [norm2, scale2] = gpu_norm(d_grad, n, static_cast<float>(want / 4), variant);
  EXPECT_EQ(std::memcmp(&norm, &norm2, sizeof(float)), 0) << what << ": two runs differ";
  EXPECT_EQ(std::memcmp(&scale, &scale2, sizeof(float)), 0) << what << ": two runs differ";
  // No clipping when the norm is below the limit, or when clipping is off (max_norm 0).
  EXPECT_EQ(gpu_norm(d_grad, n, static_cast<float>(want * 2), variant).second, 1.0f) << what;
  EXPECT_EQ(gpu_norm(d_grad, n, 0.0f, variant).second, 1.0f) << what;
}

TEST(CudaAdamW, GradNormMatchesReferenceAndIsDeterministic) {
  SKIP_WITHOUT_GPU();
  // 5000011 elements: the first pass caps at 1024 blocks and each thread strides over several vectors.
  for (size_t n : {size_t{1}, size_t{37}, size_t{10007}, size_t{5000011}}) {
    for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kFast}) {
      check_norm<float>(n, variant);
      check_norm<__nv_bfloat16>(n, variant);
    }
  }
}

// Three steps with clipping, compared after each. T is the type of the working copy and the gradients.
template <typename T>
void check_update(size_t n, KernelVariant variant, bool with_working_copy, bool with_scale) {
  const Hyper h;
  AdamState ref{random_floats(n, 131), random_floats(n, 132, -0.01f, 0.01f),
                random_floats(n, 133, 0.0f, 1e-4f)};
  DeviceBuffer<float> d_master(n), d_m(n), d_v(n), d_norm(1), d_scale(1);
  DeviceBuffer<T> d_param(n), d_grad(n);
  const size_t scratch_doubles = llm::cuda::grad_norm_scratch_doubles(n);
  DeviceBuffer<double> d_scratch(scratch_doubles);
  d_master.upload(ref.master);
  d_m.upload(ref.m);
  d_v.upload(ref.v);
  const std::string what = std::string("adamw ") + type_name<T>() + " " + name_of(variant) +
                           " n=" + std::to_string(n) + (with_working_copy ? "" : " no-working-copy") +
                           (with_scale ? "" : " no-scale");

  for (int64_t step = 1; step <= 3; ++step) {
    const std::vector<float> grad =
        round_to<T>(random_floats(n, 140 + static_cast<uint32_t>(step), -3.0f, 3.0f));
    upload_floats(d_grad, grad);
    d_param.poison();
    double scale = 1.0;
    if (with_scale) {
      const double norm = reference_norm(grad);
      const float max_norm = static_cast<float>(norm / 3);
      scale = max_norm / norm;
      llm::cuda::global_grad_norm(d_norm.get(), d_scale.get(), d_scratch.get(), scratch_doubles, d_grad.get(),
                                  n, max_norm, nullptr, variant);
    }
    llm::cuda::adamw_update(with_working_copy ? d_param.get() : nullptr, d_master.get(), d_m.get(), d_v.get(),
                            d_grad.get(), with_scale ? d_scale.get() : nullptr, n, h.lr, h.beta1, h.beta2,
                            h.eps, h.weight_decay, step, nullptr, variant);
    CUDA_CHECK(cudaDeviceSynchronize());
    reference_step(ref, grad, scale, h, step);

    const std::string at = what + " step " + std::to_string(step);
    const std::vector<float> master = d_master.download();
    // The state is fp32 in both modes and the inputs are identical, so fp32 accuracy applies.
    expect_relative_error(at + " master", master, ref.master, 1e-5);
    expect_relative_error(at + " m", d_m.download(), ref.m, 1e-5);
    expect_relative_error(at + " v", d_v.download(), ref.v, 1e-5);
    if (with_working_copy) {
      // The working copy is the new master weight rounded to T, exactly.
      EXPECT_TRUE(bitwise_equal(d_param.download(), from_floats<T>(master))) << at << ": working copy";
      expect_relative_error(at + " param", download_floats(d_param), ref.master, tolerance<T>());
    } else {
      const std::vector<float> untouched = download_floats(d_param);
      for (float x : untouched) ASSERT_TRUE(std::isnan(x)) << at << ": param written although null";
    }
  }
}

TEST(CudaAdamW, UpdateMatchesReferenceFp32) {
  SKIP_WITHOUT_GPU();
  for (size_t n : {size_t{1}, size_t{37}, size_t{10007}}) {
    for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kFast}) {
      check_update<float>(n, variant, true, true);
    }
  }
  check_update<float>(10007, KernelVariant::kAuto, false, true);
  check_update<float>(10007, KernelVariant::kAuto, true, false);
}

TEST(CudaAdamW, UpdateMatchesReferenceBf16) {
  SKIP_WITHOUT_GPU();
  for (size_t n : {size_t{1}, size_t{37}, size_t{10007}}) {
    for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kFast}) {
      check_update<__nv_bfloat16>(n, variant, true, true);
    }
  }
  check_update<__nv_bfloat16>(10007, KernelVariant::kAuto, true, false);
}

TEST(CudaAdamW, RejectsBadArguments) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<float> buf(16);
  DeviceBuffer<double> scratch(1);
  EXPECT_THROW(llm::cuda::adamw_update(buf.get(), buf.get(), buf.get(), buf.get(), buf.get(), nullptr, 16,
                                       1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 0, nullptr),
               std::invalid_argument);  // step counts from 1
  EXPECT_THROW(
      llm::cuda::global_grad_norm(buf.get(), buf.get(), scratch.get(), 0, buf.get(), 16, 1.0f, nullptr),
      std::invalid_argument);  // no scratch
}

}  // namespace
