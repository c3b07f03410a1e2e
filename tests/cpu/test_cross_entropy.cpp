// Per-token log-probabilities and the mean cross-entropy: finite-difference gradient checks in double,
// a hand-computed row, ignored tokens, the all-ignored batch and very large logits.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/cpu/cross_entropy.h"
#include "tests/gradcheck.h"

namespace {

using llm::test::expect_gradient;
using llm::test::random_vector;
using llm::test::weighted_sum;

constexpr int kN = 5;
constexpr int kV = 11;
constexpr int kIgnore = -100;
// Tokens 1 and 3 are ignored (e.g. prompt tokens in SFT).
const std::vector<int32_t> kTargets = {3, kIgnore, 10, kIgnore, 0};

TEST(GradCheck, TokenLogprobs) {
  std::vector<double> logits = random_vector(kN * kV, 1, -3.0, 3.0);
  const std::vector<double> wts = random_vector(kN, 2);
  std::vector<double> logprobs(kN), lse(kN);
  auto loss = [&]() {
    llm::ref::token_logprobs_forward(logprobs.data(), lse.data(), logits.data(), kTargets.data(), kN, kV);
    return weighted_sum(logprobs, wts);
  };
  loss();
  std::vector<double> dlogits(kN * kV, 99.0);
  llm::ref::token_logprobs_backward(dlogits.data(), wts.data(), logits.data(), lse.data(), kTargets.data(),
                                    kN, kV);
  expect_gradient("dlogits", logits, dlogits, loss);
}

TEST(GradCheck, CrossEntropyMean) {
  std::vector<double> logits = random_vector(kN * kV, 11, -3.0, 3.0);
  std::vector<double> logprobs(kN), lse(kN);
  auto loss = [&]() {
    llm::ref::token_logprobs_forward(logprobs.data(), lse.data(), logits.data(), kTargets.data(), kN, kV);
    int count = 0;
    return llm::ref::cross_entropy_mean(logprobs.data(), kTargets.data(), kN, &count);
  };
  loss();
  int count = 0;
  llm::ref::cross_entropy_mean(logprobs.data(), kTargets.data(), kN, &count);
  EXPECT_EQ(count, 3);
  std::vector<double> dlogprobs(kN), dlogits(kN * kV);
  llm::ref::cross_entropy_mean_grad(dlogprobs.data(), kTargets.data(), kN, count);
  llm::ref::token_logprobs_backward(dlogits.data(), dlogprobs.data(), logits.data(), lse.data(),
                                    kTargets.data(), kN, kV);
  expect_gradient("dlogits", logits, dlogits, loss);
}

// z = (1, 2, 3), target 0: lse = log(e + e^2 + e^3) = 3.40760596444438,
// softmax = (0.09003057317038048, 0.2447284710547977, 0.665240955774822), loss = lse - 1.
TEST(CrossEntropy, KnownRowV3) {
  const std::vector<double> logits = {1.0, 2.0, 3.0};
  const std::vector<int32_t> targets = {0};
  std::vector<double> logprobs(1), lse(1);
  llm::ref::token_logprobs_forward(logprobs.data(), lse.data(), logits.data(), targets.data(), 1, 3);
  EXPECT_NEAR(lse[0], 3.40760596444438, 1e-14);
  EXPECT_NEAR(logprobs[0], -2.40760596444438, 1e-14);

  int count = 0;
  const double loss = llm::ref::cross_entropy_mean(logprobs.data(), targets.data(), 1, &count);
  EXPECT_EQ(count, 1);
  EXPECT_NEAR(loss, 2.40760596444438, 1e-14);

  std::vector<double> dlogprobs(1), dlogits(3);
  llm::ref::cross_entropy_mean_grad(dlogprobs.data(), targets.data(), 1, count);
  EXPECT_EQ(dlogprobs[0], -1.0);
  llm::ref::token_logprobs_backward(dlogits.data(), dlogprobs.data(), logits.data(), lse.data(),
                                    targets.data(), 1, 3);
  // softmax - onehot.
  EXPECT_NEAR(dlogits[0], 0.09003057317038048 - 1.0, 1e-14);
  EXPECT_NEAR(dlogits[1], 0.2447284710547977, 1e-14);
  EXPECT_NEAR(dlogits[2], 0.665240955774822, 1e-14);
}

// Ignored tokens: logprob 0, no contribution to the loss or the count, zero dlogits rows; changing their
// logits changes nothing.
TEST(CrossEntropy, IgnoredTokensContributeNothing) {
  std::vector<double> logits = random_vector(kN * kV, 21, -3.0, 3.0);
  std::vector<double> logprobs(kN), lse(kN);
  llm::ref::token_logprobs_forward(logprobs.data(), lse.data(), logits.data(), kTargets.data(), kN, kV);
  EXPECT_EQ(logprobs[1], 0.0);
  EXPECT_EQ(logprobs[3], 0.0);
  int count = 0;
  const double loss = llm::ref::cross_entropy_mean(logprobs.data(), kTargets.data(), kN, &count);
  EXPECT_EQ(count, 3);
  EXPECT_NEAR(loss, -(logprobs[0] + logprobs[2] + logprobs[4]) / 3.0, 1e-15);

  std::vector<double> dlogprobs(kN, 5.0), dlogits(kN * kV, 5.0);
  llm::ref::cross_entropy_mean_grad(dlogprobs.data(), kTargets.data(), kN, count);
  EXPECT_EQ(dlogprobs, (std::vector<double>{-1.0 / 3, 0.0, -1.0 / 3, 0.0, -1.0 / 3}));
  // Even a non-zero upstream gradient on an ignored token gives a zero row.
  dlogprobs[1] = 7.0;
  llm::ref::token_logprobs_backward(dlogits.data(), dlogprobs.data(), logits.data(), lse.data(),
                                    kTargets.data(), kN, kV);
  for (int v = 0; v < kV; ++v) {
    EXPECT_EQ(dlogits[1 * kV + v], 0.0);
    EXPECT_EQ(dlogits[3 * kV + v], 0.0);
  }
  // Each counted row of dlogits sums to zero (softmax sums to one).
  for (int n : {0, 2, 4}) {
    double s = 0.0;
    for (int v = 0; v < kV; ++v) s += dlogits[n * kV + v];
    EXPECT_NEAR(s, 0.0, 1e-15);
  }

  for (int v = 0; v < kV; ++v) logits[3 * kV + v] += 100.0 * v;
  llm::ref::token_logprobs_forward(logprobs.data(), lse.data(), logits.data(), kTargets.data(), kN, kV);
  EXPECT_EQ(llm::ref::cross_entropy_mean(logprobs.data(), kTargets.data(), kN, &count), loss);
}

TEST(CrossEntropy, AllIgnoredBatchIsZero) {
  const std::vector<float> logits = llm::test::to_float(random_vector(3 * kV, 31));
  const std::vector<int32_t> targets(3, kIgnore);
  std::vector<float> logprobs(3), lse(3), dlogprobs(3, 1.0f), dlogits(3 * kV, 1.0f);
  llm::ref::token_logprobs_forward(logprobs.data(), lse.data(), logits.data(), targets.data(), 3, kV);
  int count = -1;
  const double loss = llm::ref::cross_entropy_mean(logprobs.data(), targets.data(), 3, &count);
  EXPECT_EQ(count, 0);
  EXPECT_EQ(loss, 0.0);
  llm::ref::cross_entropy_mean_grad(dlogprobs.data(), targets.data(), 3, count);
  for (float d : dlogprobs) EXPECT_EQ(d, 0.0f);
  llm::ref::token_logprobs_backward(dlogits.data(), dlogprobs.data(), logits.data(), lse.data(),
                                    targets.data(), 3, kV);
  for (float d : dlogits) EXPECT_EQ(d, 0.0f);
  // lse is still computed for ignored rows, and is finite.
  for (float l : lse) EXPECT_TRUE(std::isfinite(l));
}

// Logits of size 1e4 would overflow exp() without the max shift. z = (1e4, 1e4 - 1, -1e4, 0):
// lse = 1e4 + log(1 + e^-1) (the other terms are below double precision), target 1.
template <typename T>
void check_large_logits() {
  const std::vector<T> logits = {T(1e4), T(1e4 - 1), T(-1e4), T(0)};
  const std::vector<int32_t> targets = {1};
  std::vector<T> logprobs(1), lse(1), dlogits(4);
  llm::ref::token_logprobs_forward(logprobs.data(), lse.data(), logits.data(), targets.data(), 1, 4);
  const double expected = -1.0 - std::log1p(std::exp(-1.0));
  EXPECT_TRUE(std::isfinite(static_cast<double>(lse[0])));
  EXPECT_NEAR(static_cast<double>(logprobs[0]), expected, 1e-3);
  const T dlogprobs[1] = {T(-1)};
  llm::ref::token_logprobs_backward(dlogits.data(), dlogprobs, logits.data(), lse.data(), targets.data(), 1,
                                    4);
  for (T d : dlogits) EXPECT_TRUE(std::isfinite(static_cast<double>(d)));
  const double p0 = 1.0 / (1.0 + std::exp(-1.0));
  EXPECT_NEAR(static_cast<double>(dlogits[0]), p0, 1e-3);
  EXPECT_NEAR(static_cast<double>(dlogits[1]), (1.0 - p0) - 1.0, 1e-3);
  EXPECT_EQ(static_cast<double>(dlogits[2]), 0.0);
}

TEST(CrossEntropy, LargeLogitsStayFinite) {
  {
    SCOPED_TRACE("double");
    check_large_logits<double>();
  }
  {
    SCOPED_TRACE("float");
    check_large_logits<float>();
  }
}

}  // namespace
