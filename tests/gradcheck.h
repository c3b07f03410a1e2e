// Finite-difference gradient checking in double precision, shared by the CPU reference tests.
//
// For a scalar loss L(x), the central difference
//   dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / (2h)
// has truncation error O(h^2 L''') and rounding error O(eps_machine * |L| / h). With doubles and h = 1e-6
// both are far below 1e-7 for the well-scaled tests here, so an analytic gradient that is off by a
// missing term or a wrong index stands out by orders of magnitude.
//
// Ops with several outputs are reduced to one scalar with fixed random weights: L = sum_i w_i * out_i.
// Then dL/dout = w, which is what the test feeds to the backward pass.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace llm::test {

inline std::vector<double> random_vector(size_t n, uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

inline std::vector<float> to_float(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

// L = sum_i w_i * out_i.
inline double weighted_sum(const std::vector<double>& out, const std::vector<double>& w) {
  double s = 0.0;
  for (size_t i = 0; i < out.size(); ++i) s += w[i] * out[i];
  return s;
}

// Compares `analytic` with central differences of `loss` with respect to every element of `x`.
// `x` is perturbed in place and restored. Passes when |numeric - analytic| <= atol + rtol * |numeric|
// for every element.
inline void expect_gradient(const std::string& name, std::vector<double>& x,
                            const std::vector<double>& analytic, const std::function<double()>& loss,
                            double h = 1e-6, double atol = 1e-7, double rtol = 1e-6) {
  ASSERT_EQ(x.size(), analytic.size()) << name;
  int reported = 0;
  double worst = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double plus = loss();
    x[i] = saved - h;
    const double minus = loss();
    x[i] = saved;
    const double numeric = (plus - minus) / (2.0 * h);
    const double err = std::fabs(numeric - analytic[i]);
    worst = std::max(worst, err / (atol + rtol * std::fabs(numeric)));
    if (err > atol + rtol * std::fabs(numeric) && reported < 5) {
      ADD_FAILURE() << name << "[" << i << "]: analytic " << analytic[i] << " numeric " << numeric;
      ++reported;
    }
  }
  ::testing::Test::RecordProperty(name + "_worst_ratio", std::to_string(worst));
}

}  // namespace llm::test
