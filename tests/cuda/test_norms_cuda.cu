// CUDA LayerNorm / RMSNorm fused with the residual add (kernels/norms.cuh) against the CPU reference
// (kernels/cpu/norms.h): forward (residual sum, output, mean, rstd), backward (d_residual accumulates,
// dweight/dbias accumulate), with and without a branch and a bias, odd sizes, both variants, both storage
// types, several rows per backward block, both backward kernels (rows of up to 1024 vectors, and wider
// rows), a row too long for the default shared memory, and bitwise determinism of the parameter gradients.
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/norms.h"
#include "kernels/norms.cuh"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/kernel_test_helpers.h"

namespace {

using llm::cuda::KernelVariant;
using namespace llm::test;

enum class Norm { kLayerNorm, kLayerNormNoBias, kRmsNorm };

constexpr float kEps = 1e-5f;

const char* name_of(Norm norm) {
  switch (norm) {
    case Norm::kLayerNorm:
      return "layernorm";
    case Norm::kLayerNormNoBias:
      return "layernorm(no bias)";
    case Norm::kRmsNorm:
      return "rmsnorm";
  }
  return "?";
}
const char* name_of(KernelVariant variant) {
  return variant == KernelVariant::kFast ? "fast" : variant == KernelVariant::kClear ? "clear" : "auto";
}

std::string describe(Norm norm, const char* type, KernelVariant variant, int N, int C) {
  return std::string(name_of(norm)) + " " + type + " " + name_of(variant) + " N=" + std::to_string(N) +
         " C=" + std::to_string(C);
}

// ---------------------------------------------------------------------------------------------------------
// Forward.

template <typename T>
void check_forward(Norm norm, int N, int C, bool with_branch, KernelVariant variant, bool in_place = false) {
  const size_t NC = static_cast<size_t>(N) * C;
  const bool layer = norm != Norm::kRmsNorm;
  const bool has_bias = norm == Norm::kLayerNorm;
  const std::vector<float> residual_in = round_to<T>(random_floats(NC, 71, -2.0f, 2.0f));
  const std::vector<float> branch = round_to<T>(random_floats(NC, 72));
  const std::vector<float> weight = round_to<T>(random_floats(C, 73, 0.5f, 1.5f));
  const std::vector<float> bias = round_to<T>(random_floats(C, 74));

  // Reference: the residual sum in fp32, rounded to T (what the kernel stores and then normalises).
  std::vector<float> sum = residual_in;
  if (with_branch) llm::ref::residual_add(sum.data(), residual_in.data(), branch.data(), NC);
  const std::vector<float> x = round_to<T>(sum);
  std::vector<float> want_out(NC), want_mean(N), want_rstd(N);
  if (layer) {
    llm::ref::layernorm_forward(want_out.data(), want_mean.data(), want_rstd.data(), x.data(), weight.data(),
                                has_bias ? bias.data() : nullptr, N, C, static_cast<double>(kEps));
  } else {
    llm::ref::rmsnorm_forward(want_out.data(), want_rstd.data(), x.data(), weight.data(), N, C,
                              static_cast<double>(kEps));
  }

  DeviceBuffer<T> d_residual_in(NC), d_branch(NC), d_weight(C), d_bias(C), d_residual_out(NC), d_out(NC);
  DeviceBuffer<float> d_mean(N), d_rstd(N);
  upload_floats(d_residual_in, residual_in);
  upload_floats(d_branch, branch);
  upload_floats(d_weight, weight);
  upload_floats(d_bias, bias);
  d_residual_out.poison();
  d_out.poison();
  d_mean.poison();
  d_rstd.poison();
  // Without a branch residual_out still gets a (poisoned) buffer, so that a stray write would show below.
  T* residual_out = in_place ? d_residual_in.get() : d_residual_out.get();
  const T* branch_ptr = with_branch ? d_branch.get() : nullptr;
  if (layer) {
    llm::cuda::residual_layernorm_forward(residual_out, d_out.get(), d_mean.get(), d_rstd.get(),
                                          d_residual_in.get(), branch_ptr, d_weight.get(),
                                          has_bias ? d_bias.get() : nullptr, N, C, kEps, nullptr, variant);
  } else {
    llm::cuda::residual_rmsnorm_forward(residual_out, d_out.get(), d_rstd.get(), d_residual_in.get(),
                                        branch_ptr, d_weight.get(), N, C, kEps, nullptr, variant);
  }
  CUDA_CHECK(cudaDeviceSynchronize());

  const std::string what = describe(norm, type_name<T>(), variant, N, C) + (with_branch ? " +branch" : "") +
                           (in_place ? " in-place" : "");
  if (with_branch) {
    const std::vector<float> got_sum = download_floats(in_place ? d_residual_in : d_residual_out);
    expect_relative_error(what + " residual_out", got_sum, sum, tolerance<T>());
  } else {
    // No branch: residual_out is not written.
    const std::vector<float> untouched = download_floats(d_residual_out);
    for (float v : untouched) ASSERT_TRUE(std::isnan(v)) << what << ": residual_out written without a branch";
  }
  expect_relative_error(what + " out", download_floats(d_out), want_out, tolerance<T>());
  // Statistics are fp32 in both modes and computed from the same x.
  expect_relative_error(what + " rstd", d_rstd.download(), want_rstd, 1e-5);
  if (layer) expect_relative_error(what + " mean", d_mean.download(), want_mean, 1e-5);
}

// ---------------------------------------------------------------------------------------------------------
// Backward.

struct BackwardInputs {
  std::vector<float> x, dout, weight, mean, rstd, d_residual0, dweight0, dbias0;
};

template <typename T>
BackwardInputs make_backward_inputs(Norm norm, int N, int C) {
  const size_t NC = static_cast<size_t>(N) * C;
  BackwardInputs in;
  in.x = round_to<T>(random_floats(NC, 81, -2.0f, 2.0f));
  in.dout = round_to<T>(random_floats(NC, 82));
  in.weight = round_to<T>(random_floats(C, 83, 0.5f, 1.5f));
  in.d_residual0 = round_to<T>(random_floats(NC, 84));  // the incoming residual gradient
  in.dweight0 = round_to<T>(random_floats(C, 85));      // gradient accumulation: non-zero start
  in.dbias0 = round_to<T>(random_floats(C, 86));
  in.mean.assign(N, 0.0f);
  in.rstd.assign(N, 0.0f);
  std::vector<float> unused(NC);
  if (norm == Norm::kRmsNorm) {
    llm::ref::rmsnorm_forward(unused.data(), in.rstd.data(), in.x.data(), in.weight.data(), N, C,
                              static_cast<double>(kEps));
  } else {
    llm::ref::layernorm_forward(unused.data(), in.mean.data(), in.rstd.data(), in.x.data(), in.weight.data(),
                                nullptr, N, C, static_cast<double>(kEps));
  }
  return in;
}

template <typename T>
struct BackwardResult {
  std::vector<T> d_residual, dweight, dbias;
};

template <typename T>
BackwardResult<T> run_backward(Norm norm, const BackwardInputs& in, int N, int C, KernelVariant variant) {
  const size_t NC = static_cast<size_t>(N) * C;
  DeviceBuffer<T> d_x(NC), d_dout(NC), d_weight(C), d_residual(NC), d_dweight(C), d_dbias(C);
  DeviceBuffer<float> d_mean(N), d_rstd(N);
  const size_t scratch_floats = llm::cuda::norm_backward_scratch_floats(N, C);
  DeviceBuffer<float> d_scratch(scratch_floats);
  upload_floats(d_x, in.x);
  upload_floats(d_dout, in.dout);
  upload_floats(d_weight, in.weight);
  upload_floats(d_residual, in.d_residual0);
  upload_floats(d_dweight, in.dweight0);
  upload_floats(d_dbias, in.dbias0);
  d_mean.upload(in.mean);
  d_rstd.upload(in.rstd);
  d_scratch.poison();
  switch (norm) {
    case Norm::kLayerNorm:
    case Norm::kLayerNormNoBias:
      llm::cuda::residual_layernorm_backward(
          d_residual.get(), d_dweight.get(), norm == Norm::kLayerNorm ? d_dbias.get() : nullptr,
          d_scratch.get(), scratch_floats, d_dout.get(), d_x.get(), d_mean.get(), d_rstd.get(),
          d_weight.get(), N, C, nullptr, variant);
      break;
    case Norm::kRmsNorm:
      llm::cuda::residual_rmsnorm_backward(d_residual.get(), d_dweight.get(), d_scratch.get(), scratch_floats,
                                           d_dout.get(), d_x.get(), d_rstd.get(), d_weight.get(), N, C,
                                           nullptr, variant);
      break;
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  return {d_residual.download(), d_dweight.download(), d_dbias.download()};
}

std::vector<double> to_doubles(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}
std::vector<float> as_floats(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

template <typename T>
BackwardResult<T> check_backward(Norm norm, int N, int C, KernelVariant variant) {
  const BackwardInputs in = make_backward_inputs<T>(norm, N, C);
  // The reference in double (the reference's fp32 mode would itself add 9000 rows of dweight in fp32), on
  // exactly the inputs the kernel sees, including the fp32 mean and rstd.
  std::vector<double> want_dres = to_doubles(in.d_residual0), want_dw = to_doubles(in.dweight0),
                      want_db = to_doubles(in.dbias0);
  const std::vector<double> dout = to_doubles(in.dout), x = to_doubles(in.x), weight = to_doubles(in.weight),
                            mean = to_doubles(in.mean), rstd = to_doubles(in.rstd);
  if (norm == Norm::kRmsNorm) {
    llm::ref::rmsnorm_backward(want_dres.data(), want_dw.data(), dout.data(), x.data(), rstd.data(),
                               weight.data(), N, C);
  } else {
    llm::ref::layernorm_backward(want_dres.data(), want_dw.data(),
                                 norm == Norm::kLayerNorm ? want_db.data() : nullptr, dout.data(), x.data(),
                                 mean.data(), rstd.data(), weight.data(), N, C);
  }

  const BackwardResult<T> first = run_backward<T>(norm, in, N, C, variant);
  const std::string what = describe(norm, type_name<T>(), variant, N, C) + " backward";
  expect_relative_error(what + " d_residual", to_floats(first.d_residual), as_floats(want_dres),
                        tolerance<T>());
  expect_relative_error(what + " dweight", to_floats(first.dweight), as_floats(want_dw), tolerance<T>());
  // dbias: accumulated for LayerNorm with a bias, untouched otherwise.
  expect_relative_error(what + " dbias", to_floats(first.dbias), as_floats(want_db), tolerance<T>());

  const BackwardResult<T> second = run_backward<T>(norm, in, N, C, variant);
  EXPECT_TRUE(bitwise_equal(first.d_residual, second.d_residual))
      << what << ": d_residual differs run to run";
  EXPECT_TRUE(bitwise_equal(first.dweight, second.dweight)) << what << ": dweight differs run to run";
  EXPECT_TRUE(bitwise_equal(first.dbias, second.dbias)) << what << ": dbias differs run to run";
  return first;
}

constexpr Norm kNorms[] = {Norm::kLayerNorm, Norm::kLayerNormNoBias, Norm::kRmsNorm};

template <typename T>
void check_forward_all() {
  for (Norm norm : kNorms) {
    for (bool with_branch : {true, false}) {
      // C = 301: odd, not a multiple of the vector width (auto takes the clear variant).
      check_forward<T>(norm, 37, 301, with_branch, KernelVariant::kClear);
      check_forward<T>(norm, 37, 301, with_branch, KernelVariant::kAuto);
      // C = 264 = 8 * 33: both variants; C = 2056 > 256 threads x 8: several vectors per thread.
      check_forward<T>(norm, 37, 264, with_branch, KernelVariant::kClear);
      check_forward<T>(norm, 37, 264, with_branch, KernelVariant::kFast);
      check_forward<T>(norm, 5, 2056, with_branch, KernelVariant::kFast);
      check_forward<T>(norm, 1, 8, with_branch, KernelVariant::kFast);
    }
    check_forward<T>(norm, 37, 264, true, KernelVariant::kFast, /*in_place=*/true);
    check_forward<T>(norm, 37, 301, true, KernelVariant::kClear, /*in_place=*/true);
  }
}

template <typename T>
void check_backward_all() {
  for (Norm norm : kNorms) {
    check_backward<T>(norm, 37, 301, KernelVariant::kClear);
    check_backward<T>(norm, 37, 301, KernelVariant::kAuto);
    const BackwardResult<T> clear = check_backward<T>(norm, 37, 264, KernelVariant::kClear);
    const BackwardResult<T> fast = check_backward<T>(norm, 37, 264, KernelVariant::kFast);
    const std::string what = std::string(name_of(norm)) + " " + type_name<T>() + " fast vs clear";
    expect_relative_error(what + " d_residual", to_floats(fast.d_residual), to_floats(clear.d_residual),
                          tolerance<T>());
    expect_relative_error(what + " dweight", to_floats(fast.dweight), to_floats(clear.dweight),
                          tolerance<T>());
    expect_relative_error(what + " dbias", to_floats(fast.dbias), to_floats(clear.dbias), tolerance<T>());
    // 9000 rows: 1000 blocks of 9 rows each (the row split caps the block count at 1024).
    check_backward<T>(norm, 9000, 40, KernelVariant::kAuto);
    check_backward<T>(norm, 1, 16, KernelVariant::kFast);
    // The widest rows of the register kernel (1024 vectors, one per thread of a 1024-thread block) and the
    // narrowest of the shared-memory kernel (1025 vectors: its last chunk has one thread). 19 rows: blocks
    // of 7, 7 and 5 rows.
    constexpr int kVec = llm::cuda::vec16<T>();
    check_backward<T>(norm, 19, 1024 * kVec, KernelVariant::kFast);
    check_backward<T>(norm, 19, 1025 * kVec, KernelVariant::kFast);
    check_backward<T>(norm, 19, 1024, KernelVariant::kClear);
    check_backward<T>(norm, 19, 1025, KernelVariant::kClear);
    // The shared-memory kernel with several chunks per thread and a partial last chunk.
    check_backward<T>(norm, 19, 2600 * kVec, KernelVariant::kFast);
    check_backward<T>(norm, 19, 2600, KernelVariant::kClear);
  }
}

TEST(CudaNorms, ForwardMatchesReferenceFp32) {
  SKIP_WITHOUT_GPU();
  check_forward_all<float>();
}

TEST(CudaNorms, ForwardMatchesReferenceBf16) {
  SKIP_WITHOUT_GPU();
  check_forward_all<__nv_bfloat16>();
}

TEST(CudaNorms, BackwardMatchesReferenceAndIsDeterministicFp32) {
  SKIP_WITHOUT_GPU();
  check_backward_all<float>();
}

TEST(CudaNorms, BackwardMatchesReferenceAndIsDeterministicBf16) {
  SKIP_WITHOUT_GPU();
  check_backward_all<__nv_bfloat16>();
}

TEST(CudaNorms, WideRowsUseMoreSharedMemory) {
  SKIP_WITHOUT_GPU();
  // 2 x 16384 floats of per-channel accumulators = 128 KiB, above the 48 KiB default.
  for (Norm norm : kNorms) {
    check_forward<__nv_bfloat16>(norm, 3, 16384, true, KernelVariant::kFast);
    check_backward<__nv_bfloat16>(norm, 3, 16384, KernelVariant::kFast);
    check_backward<float>(norm, 3, 16384, KernelVariant::kClear);
    // Exactly 48 KiB of accumulators: with the kernel's static shared memory it is over the default limit.
    check_backward<float>(norm, 3, norm == Norm::kRmsNorm ? 12288 : 6144, KernelVariant::kClear);
  }
}

// A frozen norm (LoRA) passes null weight and bias gradients: dx is the same as with them, bit for bit.
void check_frozen_norm(Norm norm, int N, int C, KernelVariant variant) {
  const BackwardInputs in = make_backward_inputs<float>(norm, N, C);
  const BackwardResult<float> with_grads = run_backward<float>(norm, in, N, C, variant);
  const size_t NC = static_cast<size_t>(N) * C;
  DeviceBuffer<float> d_x(NC), d_dout(NC), d_weight(C), d_residual(NC), d_mean(N), d_rstd(N);
  const size_t scratch_floats = llm::cuda::norm_backward_scratch_floats(N, C);
  DeviceBuffer<float> d_scratch(scratch_floats);
  d_x.upload(in.x);
  d_dout.upload(in.dout);
  d_weight.upload(in.weight);
  d_residual.upload(in.d_residual0);
  d_mean.upload(in.mean);
  d_rstd.upload(in.rstd);
  if (norm == Norm::kRmsNorm) {
    llm::cuda::residual_rmsnorm_backward(d_residual.get(), static_cast<float*>(nullptr), d_scratch.get(),
                                         scratch_floats, d_dout.get(), d_x.get(), d_rstd.get(),
                                         d_weight.get(), N, C, nullptr, variant);
  } else {
    llm::cuda::residual_layernorm_backward(d_residual.get(), static_cast<float*>(nullptr),
                                           static_cast<float*>(nullptr), d_scratch.get(), scratch_floats,
                                           d_dout.get(), d_x.get(), d_mean.get(), d_rstd.get(),
                                           d_weight.get(), N, C, nullptr, variant);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(d_residual.download(), with_grads.d_residual)
      << describe(norm, "float", variant, N, C) << ": frozen norm";
}

// Both variants of both backward kernels: C = 72 (rows of up to 1024 vectors), 1032 (clear) and 4104
// (fast, 1026 vectors of 4 floats): wider rows.
TEST(CudaNorms, FrozenNormComputesTheSameInputGradient) {
  SKIP_WITHOUT_GPU();
  for (Norm norm : kNorms) {
    check_frozen_norm(norm, 37, 72, KernelVariant::kClear);
    check_frozen_norm(norm, 37, 72, KernelVariant::kFast);
    check_frozen_norm(norm, 37, 1032, KernelVariant::kClear);
    check_frozen_norm(norm, 37, 4104, KernelVariant::kFast);
  }
}

TEST(CudaNorms, BackwardRejectsSmallScratch) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<float> buf(1024);
  EXPECT_THROW(llm::cuda::residual_rmsnorm_backward(buf.get(), buf.get(), buf.get(), 3, buf.get(), buf.get(),
                                                    buf.get(), buf.get(), 4, 16, nullptr),
               std::invalid_argument);
}

}  // namespace
