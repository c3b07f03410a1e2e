// Elementwise activations and SwiGLU: finite-difference gradient checks in double, known values of the
// formulas (which a gradient check cannot see: a wrong constant is still differentiated correctly), and
// the overwrite rule for dx.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/activations.h"
#include "tests/gradcheck.h"

namespace {

using llm::ref::Activation;
using llm::test::expect_gradient;
using llm::test::random_vector;
using llm::test::weighted_sum;

constexpr size_t kSize = 13;

// Inputs in [-3, 3]; for the kinked activations they are pushed to |x| >= 0.1, where finite differences
// with h = 1e-6 never straddle the kink.
void check_activation_gradient(Activation act, bool away_from_zero, double slope = 0.01) {
  std::vector<double> x = random_vector(kSize, 100 + static_cast<int>(act), -3.0, 3.0);
  if (away_from_zero) {
    for (double& v : x) {
      if (std::fabs(v) < 0.1) v = v < 0.0 ? v - 0.1 : v + 0.1;
    }
  }
  const std::vector<double> wts = random_vector(kSize, 200 + static_cast<int>(act));
  std::vector<double> out(kSize);
  auto loss = [&]() {
    llm::ref::activation_forward(act, out.data(), x.data(), kSize, slope);
    return weighted_sum(out, wts);
  };
  std::vector<double> dx(kSize);
  llm::ref::activation_backward(act, dx.data(), wts.data(), x.data(), kSize, slope);
  expect_gradient("dx", x, dx, loss);
}

TEST(GradCheck, Relu) {
  check_activation_gradient(Activation::kRelu, true);
}
TEST(GradCheck, GeluTanh) {
  check_activation_gradient(Activation::kGeluTanh, false);
}
TEST(GradCheck, GeluErf) {
  check_activation_gradient(Activation::kGeluErf, false);
}
TEST(GradCheck, Silu) {
  check_activation_gradient(Activation::kSilu, false);
}
TEST(GradCheck, LeakyRelu) {
  check_activation_gradient(Activation::kLeakyRelu, true);
  check_activation_gradient(Activation::kLeakyRelu, true, 0.2);
}

TEST(GradCheck, SwiGlu) {
  std::vector<double> gate = random_vector(kSize, 301, -4.0, 4.0);
  std::vector<double> up = random_vector(kSize, 302, -2.0, 2.0);
  const std::vector<double> wts = random_vector(kSize, 303);
  std::vector<double> out(kSize);
  auto loss = [&]() {
    llm::ref::swiglu_forward(out.data(), gate.data(), up.data(), kSize);
    return weighted_sum(out, wts);
  };
  std::vector<double> dgate(kSize), dup(kSize);
  llm::ref::swiglu_backward(dgate.data(), dup.data(), wts.data(), gate.data(), up.data(), kSize);
  expect_gradient("dgate", gate, dgate, loss);
  expect_gradient("dup", up, dup, loss);
}

double apply(Activation act, double x, double slope = 0.01) {
  double out = 0.0;
  llm::ref::activation_forward(act, &out, &x, 1, slope);
  return out;
}

double derivative(Activation act, double x, double slope = 0.01) {
  double dx = 0.0;
  const double one = 1.0;
  llm::ref::activation_backward(act, &dx, &one, &x, 1, slope);
  return dx;
}

// Reference values of x * Phi(x) and of the tanh approximation. The two GELUs differ by about 1.5e-4 at
// x = +-1, so swapping them, or a wrong constant in either, fails here.
TEST(Activations, GeluKnownValues) {
  EXPECT_NEAR(apply(Activation::kGeluErf, 1.0), 0.8413447460685429, 1e-14);
  EXPECT_NEAR(apply(Activation::kGeluErf, -1.0), -0.15865525393145707, 1e-14);
  EXPECT_NEAR(apply(Activation::kGeluErf, 2.0), 1.9544997361036416, 1e-14);
  EXPECT_NEAR(apply(Activation::kGeluErf, 0.5), 0.34573123063700656, 1e-14);
  EXPECT_NEAR(apply(Activation::kGeluErf, -3.0), -0.00404969409489031, 1e-14);

  EXPECT_NEAR(apply(Activation::kGeluTanh, 1.0), 0.8411919906082768, 1e-14);
  EXPECT_NEAR(apply(Activation::kGeluTanh, -1.0), -0.15880800939172324, 1e-14);
  EXPECT_NEAR(apply(Activation::kGeluTanh, 2.0), 1.954597694087775, 1e-14);
  EXPECT_NEAR(apply(Activation::kGeluTanh, 0.5), 0.34571400982514394, 1e-14);
  EXPECT_NEAR(apply(Activation::kGeluTanh, -3.0), -0.0036373920817729943, 1e-14);

  // f'(0) = Phi(0) = 1/2 for both.
  EXPECT_NEAR(derivative(Activation::kGeluErf, 0.0), 0.5, 1e-15);
  EXPECT_NEAR(derivative(Activation::kGeluTanh, 0.0), 0.5, 1e-15);
}

TEST(Activations, SiluKnownValues) {
  EXPECT_NEAR(apply(Activation::kSilu, 1.0), 0.7310585786300049, 1e-14);
  EXPECT_NEAR(apply(Activation::kSilu, -2.0), -0.2384058440442351, 1e-14);
  EXPECT_NEAR(apply(Activation::kSilu, 3.0), 2.8577223804673, 1e-13);
  EXPECT_DOUBLE_EQ(apply(Activation::kSilu, 0.0), 0.0);
  EXPECT_NEAR(derivative(Activation::kSilu, 0.0), 0.5, 1e-15);
  // Far tails stay finite: silu(-800) underflows to -0, silu(800) = 800.
  EXPECT_TRUE(std::isfinite(apply(Activation::kSilu, -800.0)));
  EXPECT_NEAR(apply(Activation::kSilu, 800.0), 800.0, 1e-12);
  EXPECT_TRUE(std::isfinite(derivative(Activation::kSilu, -800.0)));
}

TEST(Activations, ReluAndLeakyReluKnownValues) {
  EXPECT_EQ(apply(Activation::kRelu, 2.5), 2.5);
  EXPECT_EQ(apply(Activation::kRelu, -2.5), 0.0);
  EXPECT_EQ(derivative(Activation::kRelu, 2.5), 1.0);
  EXPECT_EQ(derivative(Activation::kRelu, -2.5), 0.0);
  EXPECT_EQ(derivative(Activation::kRelu, 0.0), 0.0);

  EXPECT_DOUBLE_EQ(apply(Activation::kLeakyRelu, -2.0), -0.02);
  EXPECT_DOUBLE_EQ(apply(Activation::kLeakyRelu, -2.0, 0.25), -0.5);
  EXPECT_DOUBLE_EQ(apply(Activation::kLeakyRelu, 3.0, 0.25), 3.0);
  EXPECT_DOUBLE_EQ(derivative(Activation::kLeakyRelu, -2.0, 0.25), 0.25);
  EXPECT_DOUBLE_EQ(derivative(Activation::kLeakyRelu, 3.0, 0.25), 1.0);
}

// swiglu(g, u) = silu(g) * u: silu(1) * 3 and silu(-2) * -0.5.
TEST(Activations, SwiGluKnownValues) {
  const std::vector<double> gate = {1.0, -2.0};
  const std::vector<double> up = {3.0, -0.5};
  std::vector<double> out(2);
  llm::ref::swiglu_forward(out.data(), gate.data(), up.data(), 2);
  EXPECT_NEAR(out[0], 3.0 * 0.7310585786300049, 1e-14);
  EXPECT_NEAR(out[1], -0.5 * -0.2384058440442351, 1e-14);
}

// Activation gradients are overwritten, not accumulated.
TEST(Activations, BackwardOverwrites) {
  const std::vector<float> x = {-1.5f, 0.3f, 2.0f};
  const std::vector<float> dout = {1.0f, -2.0f, 0.5f};
  for (Activation act : {Activation::kRelu, Activation::kGeluTanh, Activation::kGeluErf, Activation::kSilu,
                         Activation::kLeakyRelu}) {
    std::vector<float> clean(3, 0.0f), dirty(3, 123.0f);
    llm::ref::activation_backward(act, clean.data(), dout.data(), x.data(), 3);
    llm::ref::activation_backward(act, dirty.data(), dout.data(), x.data(), 3);
    EXPECT_EQ(clean, dirty);
  }
  std::vector<float> dg(3, 7.0f), du(3, 7.0f), dg0(3, 0.0f), du0(3, 0.0f);
  llm::ref::swiglu_backward(dg.data(), du.data(), dout.data(), x.data(), dout.data(), 3);
  llm::ref::swiglu_backward(dg0.data(), du0.data(), dout.data(), x.data(), dout.data(), 3);
  EXPECT_EQ(dg, dg0);
  EXPECT_EQ(du, du0);
}

}  // namespace
