// Token embedding: forward is a row copy, backward a deterministic scatter-add that accumulates.
#include <gtest/gtest.h>

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

}  // namespace
