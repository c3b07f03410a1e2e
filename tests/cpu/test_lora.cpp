// LoRA on a frozen linear layer: finite-difference gradients in double (with and without dropout, LoRA
// and rsLoRA scaling), B = 0 gives the base output exactly, merged weights give the adapter's output,
// initialisation bounds, and the accumulation rules.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/linear.h"
#include "kernels/cpu/lora.h"
#include "tests/gradcheck.h"

namespace {

using llm::test::expect_gradient;
using llm::test::random_vector;
using llm::test::weighted_sum;

constexpr int kN = 5;
constexpr int kI = 7;
constexpr int kO = 6;
constexpr int kR = 3;
constexpr uint64_t kSeed = 1234;
constexpr uint64_t kStream = 17;

void check_lora_gradients(float p, bool rslora, bool with_bias) {
  std::vector<double> x = random_vector(kN * kI, 1);
  const std::vector<double> w = random_vector(kO * kI, 2);
  const std::vector<double> b = random_vector(kO, 3);
  std::vector<double> A = random_vector(kR * kI, 4);
  std::vector<double> B = random_vector(kO * kR, 5);  // nonzero, or dA would be trivially zero
  const std::vector<double> wts = random_vector(kN * kO, 6);
  const float s = llm::ref::lora_scale(16.0f, kR, rslora);
  const double* bias = with_bias ? b.data() : nullptr;

  std::vector<double> out(kN * kO), h(kN * kR);
  auto loss = [&]() {
    llm::ref::lora_forward(out.data(), h.data(), x.data(), w.data(), bias, A.data(), B.data(), kN, kI, kO, kR,
                           s, p, kSeed, kStream);
    return weighted_sum(out, wts);
  };
  loss();
  std::vector<double> dx(kN * kI), dA(kR * kI, 0.0), dB(kO * kR, 0.0);
  llm::ref::lora_backward(dx.data(), dA.data(), dB.data(), wts.data(), x.data(), h.data(), w.data(), A.data(),
                          B.data(), kN, kI, kO, kR, s, p, kSeed, kStream);
  expect_gradient("dx", x, dx, loss);
  expect_gradient("dA", A, dA, loss);
  expect_gradient("dB", B, dB, loss);
}

TEST(GradCheck, Lora) {
  for (float p : {0.0f, 0.3f}) {
    for (bool rslora : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "dropout " << p << (rslora ? " rsLoRA" : " LoRA"));
      check_lora_gradients(p, rslora, /*with_bias=*/true);
    }
  }
  SCOPED_TRACE("no bias");
  check_lora_gradients(0.1f, false, false);
}

TEST(Lora, Scale) {
  EXPECT_EQ(llm::ref::lora_scale(16.0f, 8, false), 2.0f);
  EXPECT_EQ(llm::ref::lora_scale(16.0f, 16, true), 4.0f);
}

// Dropout actually drops: with p > 0 some adapter inputs are zeroed, so h differs from the p = 0 value.
TEST(Lora, DropoutChangesAdapterInput) {
  const std::vector<float> x = llm::test::to_float(random_vector(kN * kI, 1));
  const std::vector<float> w = llm::test::to_float(random_vector(kO * kI, 2));
  const std::vector<float> A = llm::test::to_float(random_vector(kR * kI, 4));
  const std::vector<float> B = llm::test::to_float(random_vector(kO * kR, 5));
  std::vector<float> out(kN * kO), h0(kN * kR), h1(kN * kR);
  llm::ref::lora_forward(out.data(), h0.data(), x.data(), w.data(), nullptr, A.data(), B.data(), kN, kI, kO,
                         kR, 2.0f, 0.0f, kSeed, kStream);
  llm::ref::lora_forward(out.data(), h1.data(), x.data(), w.data(), nullptr, A.data(), B.data(), kN, kI, kO,
                         kR, 2.0f, 0.5f, kSeed, kStream);
  EXPECT_NE(h0, h1);
}

// A fresh adapter (B = 0) changes nothing: the output is bitwise the base linear layer's.
TEST(Lora, ZeroBGivesBaseOutputExactly) {
  const std::vector<float> x = llm::test::to_float(random_vector(kN * kI, 1));
  const std::vector<float> w = llm::test::to_float(random_vector(kO * kI, 2));
  const std::vector<float> b = llm::test::to_float(random_vector(kO, 3));
  std::vector<float> A(kR * kI), B(kO * kR, 1.0f);
  llm::ref::lora_init(A.data(), B.data(), kI, kO, kR, kSeed, kStream);
  for (float v : B) ASSERT_EQ(v, 0.0f);

  std::vector<float> base(kN * kO), out(kN * kO), h(kN * kR);
  llm::ref::linear_forward(base.data(), x.data(), w.data(), b.data(), kN, kI, kO);
  llm::ref::lora_forward(out.data(), h.data(), x.data(), w.data(), b.data(), A.data(), B.data(), kN, kI, kO,
                         kR, llm::ref::lora_scale(32.0f, kR, false), 0.1f, kSeed, kStream);
  EXPECT_EQ(out, base);
}

// Without dropout, x (W + s B A)^T + b equals the unmerged output to fp32 rounding; unmerging with -s
// recovers W to fp32 rounding.
TEST(Lora, MergedEqualsUnmerged) {
  for (bool rslora : {false, true}) {
    const std::vector<float> x = llm::test::to_float(random_vector(kN * kI, 1));
    const std::vector<float> w = llm::test::to_float(random_vector(kO * kI, 2));
    const std::vector<float> b = llm::test::to_float(random_vector(kO, 3));
    const std::vector<float> A = llm::test::to_float(random_vector(kR * kI, 4));
    const std::vector<float> B = llm::test::to_float(random_vector(kO * kR, 5));
    const float s = llm::ref::lora_scale(16.0f, kR, rslora);

    std::vector<float> out(kN * kO), h(kN * kR), merged(kO * kI), out_merged(kN * kO);
    llm::ref::lora_forward(out.data(), h.data(), x.data(), w.data(), b.data(), A.data(), B.data(), kN, kI, kO,
                           kR, s, 0.0f, kSeed, kStream);
    llm::ref::lora_merge(merged.data(), w.data(), A.data(), B.data(), kI, kO, kR, s);
    llm::ref::linear_forward(out_merged.data(), x.data(), merged.data(), b.data(), kN, kI, kO);
    for (size_t k = 0; k < out.size(); ++k) {
      EXPECT_NEAR(out_merged[k], out[k], 1e-5f * (1.0f + std::fabs(out[k]))) << k;
    }

    std::vector<float> unmerged = merged;
    llm::ref::lora_merge(unmerged.data(), unmerged.data(), A.data(), B.data(), kI, kO, kR, -s);
    for (size_t k = 0; k < w.size(); ++k)
      EXPECT_NEAR(unmerged[k], w[k], 1e-5f * (1.0f + std::fabs(w[k]))) << k;
  }
}

// A ~ U(-1/sqrt(I), 1/sqrt(I)) (kaiming_uniform_ with a = sqrt(5)): within the bound, spread over it,
// roughly zero mean, deterministic in (seed, stream) and different for another stream.
TEST(Lora, InitBounds) {
  constexpr int I = 256, O = 32, r = 16;
  std::vector<float> A(r * I), B(O * r, 3.0f), A2(r * I), A3(r * I);
  llm::ref::lora_init(A.data(), B.data(), I, O, r, kSeed, kStream);
  const float bound = llm::ref::lora_a_init_bound(I);
  EXPECT_FLOAT_EQ(bound, 1.0f / 16.0f);
  EXPECT_FLOAT_EQ(bound, std::sqrt(6.0f / ((1.0f + 5.0f) * I)));  // sqrt(6 / ((1 + a^2) fan_in))
  float lo = 1, hi = -1;
  double sum = 0;
  for (float v : A) {
    ASSERT_LE(std::fabs(v), bound);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    sum += v;
  }
  EXPECT_LT(lo, -0.95f * bound);
  EXPECT_GT(hi, 0.95f * bound);
  EXPECT_LT(std::fabs(sum / A.size()), 0.05 * bound);
  for (float v : B) EXPECT_EQ(v, 0.0f);

  llm::ref::lora_init(A2.data(), B.data(), I, O, r, kSeed, kStream);
  EXPECT_EQ(A, A2);
  llm::ref::lora_init(A3.data(), B.data(), I, O, r, kSeed, kStream + 1);
  EXPECT_NE(A, A3);
}

// dA and dB accumulate; dx is overwritten by default and accumulates with accumulate_dx.
TEST(Lora, BackwardAccumulationRules) {
  const std::vector<double> x = random_vector(kN * kI, 11);
  const std::vector<double> w = random_vector(kO * kI, 12);
  const std::vector<double> A = random_vector(kR * kI, 13);
  const std::vector<double> B = random_vector(kO * kR, 14);
  const std::vector<double> dout = random_vector(kN * kO, 15);
  std::vector<double> out(kN * kO), h(kN * kR);
  llm::ref::lora_forward(out.data(), h.data(), x.data(), w.data(), nullptr, A.data(), B.data(), kN, kI, kO,
                         kR, 2.0f, 0.2f, kSeed, kStream);

  std::vector<double> dx0(kN * kI), dA0(kR * kI, 0.0), dB0(kO * kR, 0.0);
  llm::ref::lora_backward(dx0.data(), dA0.data(), dB0.data(), dout.data(), x.data(), h.data(), w.data(),
                          A.data(), B.data(), kN, kI, kO, kR, 2.0f, 0.2f, kSeed, kStream);

  std::vector<double> dx(kN * kI, 123.0), dA(kR * kI, 0.0), dB(kO * kR, 0.0);
  for (int rep = 0; rep < 2; ++rep) {
    llm::ref::lora_backward(dx.data(), dA.data(), dB.data(), dout.data(), x.data(), h.data(), w.data(),
                            A.data(), B.data(), kN, kI, kO, kR, 2.0f, 0.2f, kSeed, kStream);
  }
  for (size_t k = 0; k < dx.size(); ++k) EXPECT_DOUBLE_EQ(dx[k], dx0[k]);
  for (size_t k = 0; k < dA.size(); ++k) EXPECT_NEAR(dA[k], 2 * dA0[k], 1e-12);
  for (size_t k = 0; k < dB.size(); ++k) EXPECT_NEAR(dB[k], 2 * dB0[k], 1e-12);

  std::vector<double> dxacc(kN * kI, 1.0);
  llm::ref::lora_backward(dxacc.data(), static_cast<double*>(nullptr), static_cast<double*>(nullptr),
                          dout.data(), x.data(), h.data(), w.data(), A.data(), B.data(), kN, kI, kO, kR, 2.0f,
                          0.2f, kSeed, kStream, /*accumulate_dx=*/true);
  for (size_t k = 0; k < dx.size(); ++k) EXPECT_NEAR(dxacc[k], 1.0 + dx0[k], 1e-12);
}

}  // namespace
