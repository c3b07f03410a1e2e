// Dropout with a Philox mask: the identity at p = 0, the kept fraction, the mask's dependence on
// (seed, stream), the backward pass reusing the forward mask, and a finite-difference gradient check.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "kernels/cpu/dropout.h"
#include "kernels/philox.h"
#include "tests/gradcheck.h"

namespace {

using llm::test::expect_gradient;
using llm::test::random_vector;
using llm::test::weighted_sum;

TEST(GradCheck, Dropout) {
  const size_t n = 23;
  const float p = 0.3f;
  std::vector<double> x = random_vector(n, 1);
  const std::vector<double> wts = random_vector(n, 2);
  std::vector<double> out(n);
  auto loss = [&]() {
    llm::ref::dropout_forward(out.data(), x.data(), n, p, 42, 7);
    return weighted_sum(out, wts);
  };
  std::vector<double> dx(n, 99.0);
  llm::ref::dropout_backward(dx.data(), wts.data(), n, p, 42, 7);
  expect_gradient("dx", x, dx, loss);
}

TEST(Dropout, ZeroProbabilityIsIdentity) {
  const std::vector<float> in = llm::test::to_float(random_vector(101, 3));
  std::vector<float> out(in.size()), din(in.size());
  llm::ref::dropout_forward(out.data(), in.data(), in.size(), 0.0f, 1, 2);
  EXPECT_EQ(out, in);
  llm::ref::dropout_backward(din.data(), in.data(), in.size(), 0.0f, 1, 2);
  EXPECT_EQ(din, in);
}

TEST(Dropout, OneProbabilityDropsEverything) {
  const std::vector<float> in(17, 1.0f);
  std::vector<float> out(in.size(), 5.0f);
  llm::ref::dropout_forward(out.data(), in.data(), in.size(), 1.0f, 1, 2);
  for (float v : out) EXPECT_EQ(v, 0.0f);
}

// keep iff philox_uniform >= p, kept values scaled by 1/(1-p); about 1-p of the elements survive.
TEST(Dropout, KeptFractionAndScale) {
  const size_t n = 200000;  // large enough for the threaded path
  const std::vector<float> in(n, 1.0f);
  std::vector<float> out(n);
  for (float p : {0.1f, 0.5f, 0.9f}) {
    llm::ref::dropout_forward(out.data(), in.data(), n, p, 1234, 5);
    const float scale = 1.0f / (1.0f - p);
    size_t kept = 0;
    for (size_t i = 0; i < n; ++i) {
      const bool keep = llm::philox_uniform(1234, 5, i) >= p;
      ASSERT_EQ(out[i], keep ? scale : 0.0f) << "p=" << p << " i=" << i;
      kept += keep ? 1 : 0;
    }
    EXPECT_NEAR(static_cast<double>(kept) / n, 1.0 - p, 0.005) << "p=" << p;
  }
}

TEST(Dropout, MaskRepeatsForSameStreamAndDiffersForAnother) {
  const size_t n = 1000;
  const std::vector<float> in(n, 1.0f);
  std::vector<float> a(n), b(n), c(n), d(n);
  llm::ref::dropout_forward(a.data(), in.data(), n, 0.5f, 99, 3);
  llm::ref::dropout_forward(b.data(), in.data(), n, 0.5f, 99, 3);
  llm::ref::dropout_forward(c.data(), in.data(), n, 0.5f, 99, 4);
  llm::ref::dropout_forward(d.data(), in.data(), n, 0.5f, 100, 3);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(a, d);
}

// The backward pass regenerates the forward mask: din is nonzero exactly where out is, with the same scale.
TEST(Dropout, BackwardUsesForwardMask) {
  const size_t n = 777;
  const float p = 0.25f;
  const std::vector<float> in(n, 1.0f);
  const std::vector<float> dout = llm::test::to_float(random_vector(n, 9, 0.5, 1.5));
  std::vector<float> out(n), din(n, 3.0f);
  llm::ref::dropout_forward(out.data(), in.data(), n, p, 7, 11);
  llm::ref::dropout_backward(din.data(), dout.data(), n, p, 7, 11);
  for (size_t i = 0; i < n; ++i) {
    // out[i] is the mask times 1/(1-p), so din = dout * mask / (1-p) = dout * out.
    EXPECT_EQ(din[i], out[i] == 0.0f ? 0.0f : dout[i] * out[i]) << i;
  }
}

}  // namespace
