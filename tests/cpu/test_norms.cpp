// LayerNorm, RMSNorm and the residual add: finite-difference gradient checks in double, the accumulation
// rule (dx, dw, db add into what is already there), and known values for a hand-computed row.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/norms.h"
#include "tests/gradcheck.h"

namespace {

using llm::test::expect_gradient;
using llm::test::random_vector;
using llm::test::weighted_sum;

constexpr int kN = 5;
constexpr int kC = 7;
constexpr double kEps = 1e-5;

void check_layernorm_gradients(bool with_bias) {
  std::vector<double> x = random_vector(kN * kC, 1, -2.0, 2.0);
  std::vector<double> w = random_vector(kC, 2, 0.5, 1.5);
  std::vector<double> b = random_vector(kC, 3);
  const std::vector<double> wts = random_vector(kN * kC, 4);
  const double* bias = with_bias ? b.data() : nullptr;

  std::vector<double> out(kN * kC), mean(kN), rstd(kN);
  auto loss = [&]() {
    llm::ref::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), bias, kN, kC, kEps);
    return weighted_sum(out, wts);
  };
  loss();
  std::vector<double> dx(kN * kC, 0.0), dw(kC, 0.0), db(kC, 0.0);
  llm::ref::layernorm_backward(dx.data(), dw.data(), with_bias ? db.data() : nullptr, wts.data(), x.data(),
                               mean.data(), rstd.data(), w.data(), kN, kC);

  expect_gradient("dx", x, dx, loss);
  expect_gradient("dweight", w, dw, loss);
  if (with_bias) expect_gradient("dbias", b, db, loss);
}

TEST(GradCheck, LayerNorm) {
  {
    SCOPED_TRACE("with bias");
    check_layernorm_gradients(true);
  }
  {
    SCOPED_TRACE("without bias");
    check_layernorm_gradients(false);
  }
}

TEST(GradCheck, RmsNorm) {
  std::vector<double> x = random_vector(kN * kC, 11, -2.0, 2.0);
  std::vector<double> w = random_vector(kC, 12, 0.5, 1.5);
  const std::vector<double> wts = random_vector(kN * kC, 13);

  std::vector<double> out(kN * kC), rstd(kN);
  auto loss = [&]() {
    llm::ref::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), kN, kC, kEps);
    return weighted_sum(out, wts);
  };
  loss();
  std::vector<double> dx(kN * kC, 0.0), dw(kC, 0.0);
  llm::ref::rmsnorm_backward(dx.data(), dw.data(), wts.data(), x.data(), rstd.data(), w.data(), kN, kC);

  expect_gradient("dx", x, dx, loss);
  expect_gradient("dweight", w, dw, loss);
}

// Running the backward pass into buffers that already hold g0 must give g0 + (fresh gradient).
TEST(Norms, LayerNormBackwardAccumulates) {
  const std::vector<double> x = random_vector(kN * kC, 21, -2.0, 2.0);
  const std::vector<double> w = random_vector(kC, 22, 0.5, 1.5);
  const std::vector<double> b = random_vector(kC, 23);
  const std::vector<double> dout = random_vector(kN * kC, 24);
  std::vector<double> out(kN * kC), mean(kN), rstd(kN);
  llm::ref::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), kN, kC,
                              kEps);

  std::vector<double> dx0(kN * kC, 0.0), dw0(kC, 0.0), db0(kC, 0.0);
  llm::ref::layernorm_backward(dx0.data(), dw0.data(), db0.data(), dout.data(), x.data(), mean.data(),
                               rstd.data(), w.data(), kN, kC);

  const std::vector<double> dx_init = random_vector(kN * kC, 25);
  const std::vector<double> dw_init = random_vector(kC, 26);
  const std::vector<double> db_init = random_vector(kC, 27);
  std::vector<double> dx = dx_init, dw = dw_init, db = db_init;
  llm::ref::layernorm_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), mean.data(),
                               rstd.data(), w.data(), kN, kC);
  for (int i = 0; i < kN * kC; ++i) EXPECT_NEAR(dx[i], dx_init[i] + dx0[i], 1e-12) << i;
  for (int i = 0; i < kC; ++i) {
    EXPECT_NEAR(dw[i], dw_init[i] + dw0[i], 1e-12) << i;
    EXPECT_NEAR(db[i], db_init[i] + db0[i], 1e-12) << i;
  }
}

TEST(Norms, RmsNormBackwardAccumulates) {
  const std::vector<double> x = random_vector(kN * kC, 31, -2.0, 2.0);
  const std::vector<double> w = random_vector(kC, 32, 0.5, 1.5);
  const std::vector<double> dout = random_vector(kN * kC, 33);
  std::vector<double> out(kN * kC), rstd(kN);
  llm::ref::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), kN, kC, kEps);

  std::vector<double> dx0(kN * kC, 0.0), dw0(kC, 0.0);
  llm::ref::rmsnorm_backward(dx0.data(), dw0.data(), dout.data(), x.data(), rstd.data(), w.data(), kN, kC);

  const std::vector<double> dx_init = random_vector(kN * kC, 34);
  const std::vector<double> dw_init = random_vector(kC, 35);
  std::vector<double> dx = dx_init, dw = dw_init;
  llm::ref::rmsnorm_backward(dx.data(), dw.data(), dout.data(), x.data(), rstd.data(), w.data(), kN, kC);
  for (int i = 0; i < kN * kC; ++i) EXPECT_NEAR(dx[i], dx_init[i] + dx0[i], 1e-12) << i;
  for (int i = 0; i < kC; ++i) EXPECT_NEAR(dw[i], dw_init[i] + dw0[i], 1e-12) << i;
}

// x = (1, 2, 3, 4): mean(x^2) = 30/4 = 7.5, rstd = 1/sqrt(7.5) = 0.3651483716701107.
TEST(Norms, RmsNormKnownRow) {
  const std::vector<double> x = {1.0, 2.0, 3.0, 4.0};
  const std::vector<double> w = {1.0, 0.5, 2.0, -1.0};
  std::vector<double> out(4), rstd(1);
  llm::ref::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), 1, 4, 0.0);
  EXPECT_NEAR(rstd[0], 0.3651483716701107, 1e-15);
  EXPECT_NEAR(out[0], 0.3651483716701107, 1e-15);
  EXPECT_NEAR(out[1], 0.5 * 0.7302967433402214, 1e-15);
  EXPECT_NEAR(out[2], 2.0 * 1.0954451150103321, 1e-15);
  EXPECT_NEAR(out[3], -1.4605934866804429, 1e-15);

  // eps enters under the square root: 1/sqrt(7.5 + 0.5) = 1/sqrt(8).
  llm::ref::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), 1, 4, 0.5);
  EXPECT_NEAR(rstd[0], 1.0 / std::sqrt(8.0), 1e-15);
}

// x = (1, 2, 3, 4): mean 2.5, biased variance 1.25, rstd = 1/sqrt(1.25) = 0.8944271909999159.
TEST(Norms, LayerNormKnownRow) {
  const std::vector<double> x = {1.0, 2.0, 3.0, 4.0};
  const std::vector<double> w = {1.0, 1.0, 2.0, 1.0};
  const std::vector<double> b = {0.0, 1.0, 0.0, -1.0};
  std::vector<double> out(4), mean(1), rstd(1);
  llm::ref::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), 1, 4, 0.0);
  EXPECT_NEAR(mean[0], 2.5, 1e-15);
  EXPECT_NEAR(rstd[0], 0.8944271909999159, 1e-15);
  EXPECT_NEAR(out[0], -1.3416407864998738, 1e-15);
  EXPECT_NEAR(out[1], -0.4472135954999579 + 1.0, 1e-15);
  EXPECT_NEAR(out[2], 2.0 * 0.4472135954999579, 1e-15);
  EXPECT_NEAR(out[3], 1.3416407864998738 - 1.0, 1e-15);

  llm::ref::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), nullptr, 1, 4, 0.0);
  EXPECT_NEAR(out[1], -0.4472135954999579, 1e-15);
}

// The float path agrees with the double path to float precision.
TEST(Norms, FloatMatchesDouble) {
  const std::vector<double> x = random_vector(kN * kC, 41, -3.0, 3.0);
  const std::vector<double> w = random_vector(kC, 42, 0.5, 1.5);
  std::vector<double> out(kN * kC), rstd(kN);
  llm::ref::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), kN, kC, kEps);
  const std::vector<float> xf = llm::test::to_float(x), wf = llm::test::to_float(w);
  std::vector<float> outf(kN * kC), rstdf(kN);
  llm::ref::rmsnorm_forward(outf.data(), rstdf.data(), xf.data(), wf.data(), kN, kC, kEps);
  for (int i = 0; i < kN * kC; ++i) EXPECT_NEAR(outf[i], out[i], 1e-5) << i;
}

TEST(Norms, ResidualAdd) {
  const std::vector<float> a = {1.0f, -2.0f, 3.5f};
  const std::vector<float> b = {0.5f, 2.0f, -1.0f};
  std::vector<float> out(3);
  llm::ref::residual_add(out.data(), a.data(), b.data(), 3);
  EXPECT_EQ(out, (std::vector<float>{1.5f, 0.0f, 2.5f}));
  // In place, as the model uses it: x += block(x).
  std::vector<float> x = a;
  llm::ref::residual_add(x.data(), x.data(), b.data(), 3);
  EXPECT_EQ(x, out);
}

}  // namespace
