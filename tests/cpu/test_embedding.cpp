// Token embedding: forward is a row copy, backward a deterministic scatter-add that accumulates.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/cpu/embedding.h"
#include "tests/gradcheck.h"

namespace {

using llm::test::expect_gradient;
using llm::test::random_vector;
using llm::test::weighted_sum;

constexpr int kV = 6;   // vocabulary
constexpr int kN = 7;   // token rows
constexpr int kC = 13;  // channels
// Repeated ids (3 three times, 1 twice) exercise the accumulation; id 2 and 5 never occur.
const std::vector<int32_t> kTokens = {3, 1, 3, 0, 4, 3, 1};

TEST(Embedding, ForwardCopiesRows) {
  const std::vector<float> table = llm::test::to_float(random_vector(kV * kC, 1));
  std::vector<float> out(kN * kC, -7.0f);
  llm::ref::embedding_forward(out.data(), kTokens.data(), table.data(), kN, kC);
  for (int n = 0; n < kN; ++n) {
    for (int c = 0; c < kC; ++c) EXPECT_EQ(out[n * kC + c], table[kTokens[n] * kC + c]) << n << "," << c;
  }
}

TEST(Embedding, BackwardSumsRowsOfEachTokenInOrder) {
  const std::vector<float> dout = llm::test::to_float(random_vector(kN * kC, 2));
  std::vector<float> dtable(kV * kC, 0.0f);
  llm::ref::embedding_backward(dtable.data(), dout.data(), kTokens.data(), kN, kC);
  for (int c = 0; c < kC; ++c) {
    // Token 3 occurs at rows 0, 2, 5; summed in that order.
    EXPECT_EQ(dtable[3 * kC + c], (dout[0 * kC + c] + dout[2 * kC + c]) + dout[5 * kC + c]);
    EXPECT_EQ(dtable[1 * kC + c], dout[1 * kC + c] + dout[6 * kC + c]);
    EXPECT_EQ(dtable[0 * kC + c], dout[3 * kC + c]);
    EXPECT_EQ(dtable[4 * kC + c], dout[4 * kC + c]);
    EXPECT_EQ(dtable[2 * kC + c], 0.0f);  // unused ids receive nothing
    EXPECT_EQ(dtable[5 * kC + c], 0.0f);
  }
}

TEST(GradCheck, Embedding) {
  std::vector<double> table = random_vector(kV * kC, 3);
  const std::vector<double> w = random_vector(kN * kC, 4);  // L = sum w * out, so dL/dout = w
  std::vector<double> out(kN * kC);
  auto loss = [&] {
    llm::ref::embedding_forward(out.data(), kTokens.data(), table.data(), kN, kC);
    return weighted_sum(out, w);
  };

  // The gradient on its own (from zero) ...
  std::vector<double> dtable(kV * kC, 0.0);
  llm::ref::embedding_backward(dtable.data(), w.data(), kTokens.data(), kN, kC);
  expect_gradient("dtable", table, dtable, loss);

  // ... and added to a gradient that is already there (gradient accumulation: +=).
  const std::vector<double> previous = random_vector(kV * kC, 5);
  std::vector<double> accumulated = previous;
  llm::ref::embedding_backward(accumulated.data(), w.data(), kTokens.data(), kN, kC);
  for (int i = 0; i < kV * kC; ++i) EXPECT_DOUBLE_EQ(accumulated[i], previous[i] + dtable[i]) << i;
}

// NEFTune noise: uniform on [-scale, scale), a pure function of (seed, stream, index), added in place.
TEST(EmbeddingNoise, IsUniformWithinTheScaleAndRepeatable) {
  const size_t n = 200000;
  const float scale = 0.25f;
  std::vector<float> noise(n, 0.0f);
  llm::ref::embedding_noise_forward(noise.data(), n, scale, 42, 7);
  double sum = 0.0, sum_sq = 0.0;
  for (float v : noise) {
    ASSERT_GE(v, -scale);
    ASSERT_LT(v, scale);
    sum += v;
    sum_sq += static_cast<double>(v) * v;
  }
  // U(-s, s): mean 0 and variance s^2 / 3; over 200K draws both are within a few standard errors.
  EXPECT_NEAR(sum / n, 0.0, 5.0 * scale / std::sqrt(3.0 * n));
  EXPECT_NEAR(sum_sq / n, scale * scale / 3.0, 0.01 * scale * scale);
  // Element i is scale * (2 u_i - 1) with the Philox draw of the same (seed, stream, i).
  for (size_t i : {size_t{0}, size_t{1}, size_t{12345}, n - 1})
    EXPECT_EQ(noise[i], scale * (2.0f * llm::philox_uniform(42, 7, i) - 1.0f)) << i;

  // Added to the values in place; the same draws again for the same stream, others for another.
  const std::vector<float> x = llm::test::to_float(random_vector(kN * kC, 5));
  std::vector<float> once = x, again = x, other = x;
  llm::ref::embedding_noise_forward(once.data(), once.size(), scale, 42, 7);
  llm::ref::embedding_noise_forward(again.data(), again.size(), scale, 42, 7);
  llm::ref::embedding_noise_forward(other.data(), other.size(), scale, 42, 8);
  EXPECT_EQ(once, again);
  EXPECT_NE(once, other);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(once[i], x[i] + noise[i]) << i;
}

}  // namespace
