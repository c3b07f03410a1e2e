// CUDA position kernels (kernels/positions.cuh) against the CPU reference (kernels/cpu/positions.h):
// learned absolute positions (add, and a deterministic accumulating backward), the sinusoidal table, and
// RoPE on Q and K in one launch (GQA head counts, YaRN and Llama 3 tables, a fused-QKV strided layout in
// place), forward and backward, both variants, both storage types.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cpu/positions.h"
#include "kernels/positions.cuh"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/kernel_test_helpers.h"

namespace {

using llm::cuda::KernelVariant;
using namespace llm::test;

const char* name_of(KernelVariant variant) {
  return variant == KernelVariant::kFast ? "fast" : variant == KernelVariant::kClear ? "clear" : "auto";
}

// ---------------------------------------------------------------------------------------------------------
// Learned absolute positions.

template <typename T>
void check_learned_forward(int N, int C, int maxT, KernelVariant variant) {
  const std::vector<float> x = round_to<T>(random_floats(static_cast<size_t>(N) * C, 91));
  const std::vector<float> wpe = round_to<T>(random_floats(static_cast<size_t>(maxT) * C, 92));
  const std::vector<int32_t> pos = random_ints(N, 93, 0, maxT - 1);
  std::vector<float> want = x;
  llm::ref::add_position_embedding_forward(want.data(), wpe.data(), pos.data(), N, C);

  DeviceBuffer<T> d_x(x.size()), d_wpe(wpe.size());
  DeviceBuffer<int32_t> d_pos(N);
  upload_floats(d_x, x);
  upload_floats(d_wpe, wpe);
  d_pos.upload(pos);
  llm::cuda::add_position_embedding_forward(d_x.get(), d_wpe.get(), d_pos.get(), N, C, maxT, nullptr,
                                            variant);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = download_floats(d_x);
  const std::string what = std::string("learned positions forward ") + type_name<T>() + " " +
                           name_of(variant) + " C=" + std::to_string(C);
  expect_relative_error(what, got, want, tolerance<T>());
  if constexpr (std::is_same_v<T, float>)
    EXPECT_TRUE(got == want) << what << ": one fp32 add, should be exact";
}

template <typename T>
std::vector<T> run_learned_backward(const std::vector<float>& dwpe0, const std::vector<float>& dx,
                                    const std::vector<int32_t>& pos, int N, int C, int maxT,
                                    KernelVariant variant) {
  DeviceBuffer<T> d_dwpe(dwpe0.size()), d_dx(dx.size());
  DeviceBuffer<int32_t> d_pos(N);
  const size_t scratch_bytes = llm::cuda::position_embedding_backward_scratch_bytes(N, maxT);
  DeviceBuffer<char> d_scratch(scratch_bytes);
  upload_floats(d_dwpe, dwpe0);
  upload_floats(d_dx, dx);
  d_pos.upload(pos);
  llm::cuda::add_position_embedding_backward(d_dwpe.get(), d_dx.get(), d_pos.get(), N, C, maxT,
                                             d_scratch.get(), scratch_bytes, nullptr, variant);
  CUDA_CHECK(cudaDeviceSynchronize());
  return d_dwpe.download();
}

template <typename T>
void check_learned_backward(int N, int C, int maxT, KernelVariant variant) {
  // Packed documents: positions restart, so rows share positions; the gradient starts non-zero.
  std::vector<int32_t> pos(N);
  for (int n = 0; n < N; ++n) pos[n] = n % 13;
  const std::vector<float> dwpe0 = round_to<T>(random_floats(static_cast<size_t>(maxT) * C, 94));
  const std::vector<float> dx = round_to<T>(random_floats(static_cast<size_t>(N) * C, 95));
  std::vector<float> want = dwpe0;
  llm::ref::add_position_embedding_backward(want.data(), dx.data(), pos.data(), N, C);

  const std::vector<T> first = run_learned_backward<T>(dwpe0, dx, pos, N, C, maxT, variant);
  const std::vector<T> second = run_learned_backward<T>(dwpe0, dx, pos, N, C, maxT, variant);
  const std::string what = std::string("learned positions backward ") + type_name<T>() + " " +
                           name_of(variant) + " C=" + std::to_string(C);
  expect_relative_error(what, to_floats(first), want, tolerance<T>());
  if constexpr (std::is_same_v<T, float>)
    EXPECT_TRUE(to_floats(first) == want) << what << ": not bitwise equal";
  EXPECT_TRUE(bitwise_equal(first, second)) << what << ": two runs differ";
}

template <typename T>
void check_learned_all() {
  for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kAuto}) {
    check_learned_forward<T>(37, 301, 20, variant);
    check_learned_backward<T>(37, 301, 20, variant);
  }
  for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kFast}) {
    check_learned_forward<T>(37, 264, 20, variant);
    check_learned_backward<T>(37, 264, 20, variant);
  }
}

TEST(CudaPositions, LearnedMatchesReferenceFp32) {
  SKIP_WITHOUT_GPU();
  check_learned_all<float>();
}

TEST(CudaPositions, LearnedMatchesReferenceBf16) {
  SKIP_WITHOUT_GPU();
  check_learned_all<__nv_bfloat16>();
}

TEST(CudaPositions, SinusoidalTableMatchesReference) {
  SKIP_WITHOUT_GPU();
  const int maxT = 50, C = 31;  // odd C: the last column is a sine
  std::vector<float> want(static_cast<size_t>(maxT) * C);
  llm::ref::sinusoidal_table(want.data(), maxT, C);
  DeviceBuffer<float> d_table(want.size());
  DeviceBuffer<__nv_bfloat16> d_table_bf16(want.size());
  d_table.poison();
  d_table_bf16.poison();
  llm::cuda::upload_sinusoidal_table(d_table.get(), maxT, C, nullptr);
  llm::cuda::upload_sinusoidal_table(d_table_bf16.get(), maxT, C, nullptr);
  EXPECT_TRUE(d_table.download() == want);
  expect_relative_error("sinusoidal table bf16", download_floats(d_table_bf16), want,
                        tolerance<__nv_bfloat16>());
}

// ---------------------------------------------------------------------------------------------------------
// RoPE.

llm::ref::RopeParams yarn_params(int head_dim) {
  llm::ref::RopeParams params;
  params.head_dim = head_dim;
  params.theta = 10000.0;
  params.scaling = llm::ref::RopeScaling::kYarn;
  params.factor = 4.0;
  params.original_max_position = 32;
  return params;  // attention factor 0.1 ln 4 + 1: the tables are scaled, not unit rotations
}

llm::ref::RopeParams llama3_params(int head_dim) {
  llm::ref::RopeParams params;
  params.head_dim = head_dim;
  params.theta = 500000.0;
  params.scaling = llm::ref::RopeScaling::kLlama3;
  params.factor = 8.0;
  params.original_max_position = 64;
  return params;
}

struct RopeShape {
  int N, Hq, Hkv, D, maxT;
};

// Separate contiguous q and k, out of place (outputs poisoned), forward and backward.
template <typename T>
void check_rope(const RopeShape& s, const llm::ref::RopeParams& params, KernelVariant variant) {
  const int half = s.D / 2;
  const size_t nq = static_cast<size_t>(s.N) * s.Hq * s.D, nk = static_cast<size_t>(s.N) * s.Hkv * s.D;
  std::vector<float> cos_table(static_cast<size_t>(s.maxT) * half), sin_table(cos_table.size());
  llm::ref::rope_tables(cos_table.data(), sin_table.data(), params, s.maxT);
  const std::vector<float> q = round_to<T>(random_floats(nq, 101));
  const std::vector<float> k = round_to<T>(random_floats(nk, 102));
  const std::vector<float> dq = round_to<T>(random_floats(nq, 103));
  const std::vector<float> dk = round_to<T>(random_floats(nk, 104));
  const std::vector<int32_t> pos = random_ints(s.N, 105, 0, s.maxT - 1);
  std::vector<float> want_q(nq), want_k(nk), want_dq(nq), want_dk(nk);
  const float* c = cos_table.data();
  const float* sn = sin_table.data();
  llm::ref::rope_forward(want_q.data(), q.data(), c, sn, pos.data(), s.N, s.Hq, s.D);
  llm::ref::rope_forward(want_k.data(), k.data(), c, sn, pos.data(), s.N, s.Hkv, s.D);
  llm::ref::rope_backward(want_dq.data(), dq.data(), c, sn, pos.data(), s.N, s.Hq, s.D);
  llm::ref::rope_backward(want_dk.data(), dk.data(), c, sn, pos.data(), s.N, s.Hkv, s.D);

  DeviceBuffer<T> d_q(nq), d_k(nk), d_dq(nq), d_dk(nk), d_q_out(nq), d_k_out(nk), d_dq_in(nq), d_dk_in(nk);
  DeviceBuffer<float> d_cos(cos_table.size()), d_sin(sin_table.size());
  DeviceBuffer<int32_t> d_pos(s.N);
  upload_floats(d_q, q);
  upload_floats(d_dq, dq);
  if (nk > 0) {  // Hkv = 0: q only
    upload_floats(d_k, k);
    upload_floats(d_dk, dk);
  }
  d_pos.upload(pos);
  llm::cuda::upload_rope_tables(d_cos.get(), d_sin.get(), params, s.maxT, nullptr);
  d_q_out.poison();
  d_k_out.poison();
  d_dq_in.poison();
  d_dk_in.poison();
  llm::cuda::rope_forward(d_q_out.get(), d_k_out.get(), d_q.get(), d_k.get(), d_cos.get(), d_sin.get(),
                          d_pos.get(), s.N, s.Hq, s.Hkv, s.D, 0, 0, s.maxT, nullptr, variant);
  llm::cuda::rope_backward(d_dq_in.get(), d_dk_in.get(), d_dq.get(), d_dk.get(), d_cos.get(), d_sin.get(),
                           d_pos.get(), s.N, s.Hq, s.Hkv, s.D, 0, 0, s.maxT, nullptr, variant);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::string what = std::string("rope ") + type_name<T>() + " " + name_of(variant) +
                           " D=" + std::to_string(s.D) + " Hq=" + std::to_string(s.Hq) +
                           " Hkv=" + std::to_string(s.Hkv);
  expect_relative_error(what + " q", download_floats(d_q_out), want_q, tolerance<T>());
  if (s.Hkv > 0) expect_relative_error(what + " k", download_floats(d_k_out), want_k, tolerance<T>());
  expect_relative_error(what + " dq", download_floats(d_dq_in), want_dq, tolerance<T>());
  if (s.Hkv > 0) expect_relative_error(what + " dk", download_floats(d_dk_in), want_dk, tolerance<T>());
}

// q, k and v in one fused buffer [N, (Hq + 2 Hkv) D]; q and k rotated in place through row strides; v must
// not be touched.
template <typename T>
void check_rope_fused_in_place(const RopeShape& s, const llm::ref::RopeParams& params, KernelVariant variant,
                               bool backward) {
  const int half = s.D / 2;
  const int width = (s.Hq + 2 * s.Hkv) * s.D;
  const size_t total = static_cast<size_t>(s.N) * width;
  std::vector<float> cos_table(static_cast<size_t>(s.maxT) * half), sin_table(cos_table.size());
  llm::ref::rope_tables(cos_table.data(), sin_table.data(), params, s.maxT);
  const std::vector<float> qkv = round_to<T>(random_floats(total, 111));
  const std::vector<int32_t> pos = random_ints(s.N, 112, 0, s.maxT - 1);

  // Reference: pull q and k out, rotate, put them back.
  std::vector<float> q(static_cast<size_t>(s.N) * s.Hq * s.D), k(static_cast<size_t>(s.N) * s.Hkv * s.D);
  for (int n = 0; n < s.N; ++n) {
    for (int j = 0; j < s.Hq * s.D; ++j)
      q[static_cast<size_t>(n) * s.Hq * s.D + j] = qkv[static_cast<size_t>(n) * width + j];
    for (int j = 0; j < s.Hkv * s.D; ++j) {
      k[static_cast<size_t>(n) * s.Hkv * s.D + j] = qkv[static_cast<size_t>(n) * width + s.Hq * s.D + j];
    }
  }
  if (backward) {
    llm::ref::rope_backward(q.data(), q.data(), cos_table.data(), sin_table.data(), pos.data(), s.N, s.Hq,
                            s.D);
    llm::ref::rope_backward(k.data(), k.data(), cos_table.data(), sin_table.data(), pos.data(), s.N, s.Hkv,
                            s.D);
  } else {
    llm::ref::rope_forward(q.data(), q.data(), cos_table.data(), sin_table.data(), pos.data(), s.N, s.Hq,
                           s.D);
    llm::ref::rope_forward(k.data(), k.data(), cos_table.data(), sin_table.data(), pos.data(), s.N, s.Hkv,
                           s.D);
  }
  std::vector<float> want = qkv;
  for (int n = 0; n < s.N; ++n) {
    for (int j = 0; j < s.Hq * s.D; ++j)
      want[static_cast<size_t>(n) * width + j] = q[static_cast<size_t>(n) * s.Hq * s.D + j];
    for (int j = 0; j < s.Hkv * s.D; ++j) {
      want[static_cast<size_t>(n) * width + s.Hq * s.D + j] = k[static_cast<size_t>(n) * s.Hkv * s.D + j];
    }
  }

  DeviceBuffer<T> d_qkv(total);
  DeviceBuffer<float> d_cos(cos_table.size()), d_sin(sin_table.size());
  DeviceBuffer<int32_t> d_pos(s.N);
  upload_floats(d_qkv, qkv);
  d_pos.upload(pos);
  llm::cuda::upload_rope_tables(d_cos.get(), d_sin.get(), params, s.maxT, nullptr);
  T* q_ptr = d_qkv.get();
  T* k_ptr = d_qkv.get() + static_cast<size_t>(s.Hq) * s.D;
  if (backward) {
    llm::cuda::rope_backward(q_ptr, k_ptr, q_ptr, k_ptr, d_cos.get(), d_sin.get(), d_pos.get(), s.N, s.Hq,
                             s.Hkv, s.D, width, width, s.maxT, nullptr, variant);
  } else {
    llm::cuda::rope_forward(q_ptr, k_ptr, q_ptr, k_ptr, d_cos.get(), d_sin.get(), d_pos.get(), s.N, s.Hq,
                            s.Hkv, s.D, width, width, s.maxT, nullptr, variant);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = download_floats(d_qkv);
  const std::string what = std::string("rope fused qkv in place ") + (backward ? "backward " : "forward ") +
                           type_name<T>() + " " + name_of(variant);
  expect_relative_error(what, got, want, tolerance<T>());
  for (int n = 0; n < s.N; ++n) {
    for (int j = (s.Hq + s.Hkv) * s.D; j < width; ++j) {
      const size_t i = static_cast<size_t>(n) * width + j;
      ASSERT_EQ(got[i], qkv[i]) << what << ": v was modified at row " << n << " column " << j;
    }
  }
}

template <typename T>
void check_rope_all() {
  // D = 6: half = 3, odd, so only the clear variant applies (auto falls back to it).
  for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kAuto}) {
    check_rope<T>({37, 3, 1, 6, 64}, yarn_params(6), variant);
  }
  for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kFast}) {
    check_rope<T>({37, 4, 2, 16, 64}, yarn_params(16), variant);
    check_rope<T>({37, 6, 2, 64, 100}, llama3_params(64), variant);
    check_rope<T>({5, 3, 0, 16, 8}, yarn_params(16), variant);  // q only
    for (bool backward : {false, true}) {
      check_rope_fused_in_place<T>({37, 4, 2, 16, 64}, yarn_params(16), variant, backward);
      check_rope_fused_in_place<T>({11, 6, 1, 128, 300}, llama3_params(128), variant, backward);
    }
  }
  for (bool backward : {false, true}) {
    check_rope_fused_in_place<T>({37, 3, 1, 6, 64}, yarn_params(6), KernelVariant::kAuto, backward);
  }
}

TEST(CudaPositions, RopeMatchesReferenceFp32) {
  SKIP_WITHOUT_GPU();
  check_rope_all<float>();
}

TEST(CudaPositions, RopeMatchesReferenceBf16) {
  SKIP_WITHOUT_GPU();
  check_rope_all<__nv_bfloat16>();
}

TEST(CudaPositions, InvalidPositionsGiveNan) {
  SKIP_WITHOUT_GPU();
  const int N = 3, C = 8, maxT = 4;
  const std::vector<int32_t> pos = {0, 4, -1};
  DeviceBuffer<float> d_x(static_cast<size_t>(N) * C), d_wpe(static_cast<size_t>(maxT) * C);
  DeviceBuffer<int32_t> d_pos(N);
  upload_floats(d_x, std::vector<float>(static_cast<size_t>(N) * C, 1.0f));
  upload_floats(d_wpe, std::vector<float>(static_cast<size_t>(maxT) * C, 2.0f));
  d_pos.upload(pos);
  llm::cuda::add_position_embedding_forward(d_x.get(), d_wpe.get(), d_pos.get(), N, C, maxT, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> x = d_x.download();
  for (int c = 0; c < C; ++c) {
    EXPECT_EQ(x[c], 3.0f);
    EXPECT_TRUE(std::isnan(x[C + c]));
    EXPECT_TRUE(std::isnan(x[2 * C + c]));
  }
}

}  // namespace
