// Dropout with a Philox mask: the identity at p = 0, the kept fraction, the mask's dependence on
// (seed, stream), the backward pass reusing the forward mask, and a finite-difference gradient check.
#include <gtest/gtest.h>

#include <cmath>
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

// keep iff philox_mask_uniform >= p, kept values scaled by 1/(1-p); about 1-p of the elements survive.
// n is not a multiple of 8, so the last packed Philox block is only partly used.
TEST(Dropout, KeptFractionAndScale) {
  const size_t n = 200003;  // large enough for the threaded path
  const std::vector<float> in(n, 1.0f);
  std::vector<float> out(n);
  for (float p : {0.1f, 0.5f, 0.9f}) {
    llm::ref::dropout_forward(out.data(), in.data(), n, p, 1234, 5);
    const float scale = 1.0f / (1.0f - p);
    size_t kept = 0;
    for (size_t i = 0; i < n; ++i) {
      const bool keep = llm::philox_mask_uniform(1234, 5, i) >= p;
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

namespace {

// A mask drawn once and applied with dropout_apply_mask gives dropout_forward's and dropout_backward's
// values bit for bit, at the edges (p = 0, p = 1) too, across the parallel threshold (2^16 elements).
TEST(Dropout, MaskDrawnOnceEqualsForwardAndBackward) {
  const size_t n = (size_t{1} << 16) + 37;
  std::vector<float> x(n), y(n);
  for (size_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i)) * 3.0);
    y[i] = static_cast<float>(std::cos(0.11 * static_cast<double>(i)));
  }
  for (float p : {0.0f, 0.3f, 0.9f, 1.0f}) {
    std::vector<uint8_t> keep(n);
    llm::ref::dropout_keep_mask(keep.data(), n, p, 7, 123);
    std::vector<float> want_fwd(n), want_bwd(n), got_fwd(n), got_bwd(n);
    llm::ref::dropout_forward(want_fwd.data(), x.data(), n, p, 7, 123);
    llm::ref::dropout_backward(want_bwd.data(), y.data(), n, p, 7, 123);
    llm::ref::dropout_apply_mask(got_fwd.data(), x.data(), keep.data(), n, p);
    llm::ref::dropout_apply_mask(got_bwd.data(), y.data(), keep.data(), n, p);
    EXPECT_EQ(got_fwd, want_fwd) << p;
    EXPECT_EQ(got_bwd, want_bwd) << p;
    size_t kept = 0;
    for (uint8_t k : keep) kept += k;
    EXPECT_NEAR(static_cast<double>(kept) / n, 1.0 - p, 0.01) << p;
  }
}

}  // namespace
