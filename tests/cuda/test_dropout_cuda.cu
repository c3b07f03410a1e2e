// CUDA dropout (kernels/dropout.cuh) against the CPU reference (kernels/cpu/dropout.h): the mask must be the
// reference's Philox stream element for element, forward and backward, in both variants and both storage
// types; p = 0 and p = 1; in place.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cpu/dropout.h"
#include "kernels/dropout.cuh"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/kernel_test_helpers.h"

namespace {

using llm::cuda::KernelVariant;
using namespace llm::test;

// Inputs bounded away from zero, so that an output of 0 means "dropped" and nothing else.
std::vector<float> nonzero_inputs(size_t n, uint32_t seed) {
  std::vector<float> v = random_floats(n, seed, 0.5f, 1.5f);
  for (size_t i = 0; i < n; i += 2) v[i] = -v[i];
  return v;
}

template <typename T>
void check_dropout(size_t n, float p, uint64_t seed, uint64_t stream_id, KernelVariant variant) {
  const std::vector<float> in = round_to<T>(nonzero_inputs(n, 41));
  const std::vector<float> dout = round_to<T>(nonzero_inputs(n, 42));
  std::vector<float> want_out(n), want_din(n);
  llm::ref::dropout_forward(want_out.data(), in.data(), n, p, seed, stream_id);
  llm::ref::dropout_backward(want_din.data(), dout.data(), n, p, seed, stream_id);

  DeviceBuffer<T> d_in(n), d_dout(n), d_out(n), d_din(n);
  upload_floats(d_in, in);
  upload_floats(d_dout, dout);
  d_out.poison();
  d_din.poison();
  llm::cuda::dropout_forward(d_out.get(), d_in.get(), n, p, seed, stream_id, nullptr, variant);
  llm::cuda::dropout_backward(d_din.get(), d_dout.get(), n, p, seed, stream_id, nullptr, variant);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> out = download_floats(d_out);
  const std::vector<float> din = download_floats(d_din);

  const std::string what = std::string(type_name<T>()) +
                           (variant == KernelVariant::kFast ? " fast" : " clear") +
                           " n=" + std::to_string(n) + " p=" + std::to_string(p);
  // The mask, element for element: zero exactly where the reference dropped.
  size_t mismatches = 0, kept = 0;
  for (size_t i = 0; i < n; ++i) {
    ASSERT_TRUE(std::isfinite(out[i]) && std::isfinite(din[i]))
        << what << ": element " << i << " not written";
    if ((out[i] == 0.0f) != (want_out[i] == 0.0f)) ++mismatches;
    if ((din[i] == 0.0f) != (want_din[i] == 0.0f)) ++mismatches;
    if (out[i] != 0.0f) ++kept;
  }
  EXPECT_EQ(mismatches, 0u) << what << ": the mask differs from the CPU Philox stream";
  if (p > 0.0f && p < 1.0f && n >= 10000) {
    const double keep_rate = static_cast<double>(kept) / n;
    EXPECT_NEAR(keep_rate, 1.0 - p, 0.02) << what;
  }
  if constexpr (std::is_same_v<T, float>) {
    // fp32: the same float expression on both sides, so the values are identical.
    EXPECT_TRUE(out == want_out) << what << ": forward values differ from the reference";
    EXPECT_TRUE(din == want_din) << what << ": backward values differ from the reference";
  } else {
    expect_relative_error(what + " forward", out, want_out, tolerance<T>());
    expect_relative_error(what + " backward", din, want_din, tolerance<T>());
  }
}

template <typename T>
void check_all() {
  // Odd sizes (tails for the fast variant), a seed and a stream with both 32-bit halves set.
  const uint64_t seed = 0x123456789abcdef0ull;
  const uint64_t stream_id = (7ull << 32) | 3ull;
  for (size_t n : {size_t{1}, size_t{37}, size_t{10007}, size_t{65536}}) {
    for (float p : {0.1f, 0.5f, 0.9f}) {
      check_dropout<T>(n, p, seed, stream_id, KernelVariant::kClear);
      check_dropout<T>(n, p, seed, stream_id, KernelVariant::kFast);
    }
  }
}

TEST(CudaDropout, MaskMatchesCpuPhiloxStreamFp32) {
  SKIP_WITHOUT_GPU();
  check_all<float>();
}

TEST(CudaDropout, MaskMatchesCpuPhiloxStreamBf16) {
  SKIP_WITHOUT_GPU();
  check_all<__nv_bfloat16>();
}

TEST(CudaDropout, EdgeProbabilities) {
  SKIP_WITHOUT_GPU();
  for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kFast}) {
    check_dropout<float>(1001, 0.0f, 5, 6, variant);  // copies
    check_dropout<float>(1001, 1.0f, 5, 6, variant);  // zeros
    check_dropout<__nv_bfloat16>(1001, 0.0f, 5, 6, variant);
    check_dropout<__nv_bfloat16>(1001, 1.0f, 5, 6, variant);
  }
}

TEST(CudaDropout, StreamsAreIndependentAndInPlaceWorks) {
  SKIP_WITHOUT_GPU();
  const size_t n = 4099;
  const std::vector<float> in = nonzero_inputs(n, 43);
  std::vector<float> want(n);
  llm::ref::dropout_forward(want.data(), in.data(), n, 0.3f, 99, 1);
  DeviceBuffer<float> d(n), d_other(n);
  upload_floats(d, in);
  upload_floats(d_other, in);
  llm::cuda::dropout_forward(d.get(), d.get(), n, 0.3f, 99, 1, nullptr);  // in place
  llm::cuda::dropout_forward(d_other.get(), d_other.get(), n, 0.3f, 99, 2, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = download_floats(d);
  const std::vector<float> other = download_floats(d_other);
  EXPECT_TRUE(got == want);
  EXPECT_FALSE(got == other) << "streams 1 and 2 drew the same mask";
}

}  // namespace
