// Linear layer (PyTorch layout, out = x W^T + b): finite-difference gradient checks in double, the
// accumulation rules, a hand-computed case, and bitwise independence of the OpenMP thread count.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstring>
#include <vector>

#include "kernels/cpu/linear.h"
#include "tests/gradcheck.h"

namespace {

using llm::test::expect_gradient;
using llm::test::random_vector;
using llm::test::weighted_sum;

constexpr int kN = 5;
constexpr int kI = 7;
constexpr int kO = 3;

void check_linear_gradients(bool with_bias) {
  std::vector<double> x = random_vector(kN * kI, 1);
  std::vector<double> w = random_vector(kO * kI, 2);
  std::vector<double> b = random_vector(kO, 3);
  const std::vector<double> wts = random_vector(kN * kO, 4);
  const double* bias = with_bias ? b.data() : nullptr;

  std::vector<double> out(kN * kO);
  auto loss = [&]() {
    llm::ref::linear_forward(out.data(), x.data(), w.data(), bias, kN, kI, kO);
    return weighted_sum(out, wts);
  };
  std::vector<double> dx(kN * kI), dw(kO * kI, 0.0), db(kO, 0.0);
  llm::ref::linear_backward(dx.data(), dw.data(), with_bias ? db.data() : nullptr, wts.data(), x.data(),
                            w.data(), kN, kI, kO);
  expect_gradient("dx", x, dx, loss);
  expect_gradient("dweight", w, dw, loss);
  if (with_bias) expect_gradient("dbias", b, db, loss);
}

TEST(GradCheck, Linear) {
  {
    SCOPED_TRACE("with bias");
    check_linear_gradients(true);
  }
  {
    SCOPED_TRACE("without bias");
    check_linear_gradients(false);
  }
}

// x = [[1, 2], [3, 4]], W = [[1, 0], [1, -1], [0.5, 2]], b = [0, 1, -1]:
//   out = [[1, 0, 3.5], [3, 0, 8.5]].
// With dout = ones: dx = column sums of W = [2.5, 1] per row; dW = column sums of x = [4, 6] per row;
// db = [2, 2, 2].
TEST(Linear, KnownValues) {
  const std::vector<double> x = {1, 2, 3, 4};
  const std::vector<double> w = {1, 0, 1, -1, 0.5, 2};
  const std::vector<double> b = {0, 1, -1};
  std::vector<double> out(6);
  llm::ref::linear_forward(out.data(), x.data(), w.data(), b.data(), 2, 2, 3);
  EXPECT_EQ(out, (std::vector<double>{1, 0, 3.5, 3, 0, 8.5}));

  const std::vector<double> dout(6, 1.0);
  std::vector<double> dx(4), dw(6, 0.0), db(3, 0.0);
  llm::ref::linear_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), 2, 2, 3);
  EXPECT_EQ(dx, (std::vector<double>{2.5, 1, 2.5, 1}));
  EXPECT_EQ(dw, (std::vector<double>{4, 6, 4, 6, 4, 6}));
  EXPECT_EQ(db, (std::vector<double>{2, 2, 2}));
}

// dW and db accumulate; dx is overwritten by default and accumulates with accumulate_dx.
TEST(Linear, BackwardAccumulationRules) {
  const std::vector<double> x = random_vector(kN * kI, 11);
  const std::vector<double> w = random_vector(kO * kI, 12);
  const std::vector<double> dout = random_vector(kN * kO, 13);

  std::vector<double> dx0(kN * kI), dw0(kO * kI, 0.0), db0(kO, 0.0);
  llm::ref::linear_backward(dx0.data(), dw0.data(), db0.data(), dout.data(), x.data(), w.data(), kN, kI, kO);

  const std::vector<double> dx_init = random_vector(kN * kI, 14);
  const std::vector<double> dw_init = random_vector(kO * kI, 15);
  const std::vector<double> db_init = random_vector(kO, 16);

  // Default: dx overwritten, dW and db accumulated.
  std::vector<double> dx = dx_init, dw = dw_init, db = db_init;
  llm::ref::linear_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), kN, kI, kO);
  for (int i = 0; i < kN * kI; ++i) EXPECT_NEAR(dx[i], dx0[i], 1e-14) << i;
  for (int i = 0; i < kO * kI; ++i) EXPECT_NEAR(dw[i], dw_init[i] + dw0[i], 1e-14) << i;
  for (int i = 0; i < kO; ++i) EXPECT_NEAR(db[i], db_init[i] + db0[i], 1e-14) << i;

  // accumulate_dx: dx accumulated too.
  dx = dx_init;
  llm::ref::linear_backward(dx.data(), nullptr, nullptr, dout.data(), x.data(), w.data(), kN, kI, kO,
                            /*accumulate_dx=*/true);
  for (int i = 0; i < kN * kI; ++i) EXPECT_NEAR(dx[i], dx_init[i] + dx0[i], 1e-14) << i;
}

// Null gradients are skipped: a frozen weight (dweight null), no input gradient (dx null), no bias.
TEST(Linear, NullGradientsAreSkipped) {
  const std::vector<double> x = random_vector(kN * kI, 21);
  const std::vector<double> w = random_vector(kO * kI, 22);
  const std::vector<double> dout = random_vector(kN * kO, 23);
  std::vector<double> dx0(kN * kI), dw0(kO * kI, 0.0), db0(kO, 0.0);
  llm::ref::linear_backward(dx0.data(), dw0.data(), db0.data(), dout.data(), x.data(), w.data(), kN, kI, kO);

  std::vector<double> dx(kN * kI);
  llm::ref::linear_backward(dx.data(), nullptr, nullptr, dout.data(), x.data(), w.data(), kN, kI, kO);
  EXPECT_EQ(dx, dx0);

  std::vector<double> db(kO, 0.0);
  llm::ref::linear_backward(nullptr, nullptr, db.data(), dout.data(), x.data(), w.data(), kN, kI, kO);
  EXPECT_EQ(db, db0);

  std::vector<double> dw(kO * kI, 0.0);
  llm::ref::linear_backward(nullptr, dw.data(), nullptr, dout.data(), x.data(), w.data(), kN, kI, kO);
  EXPECT_EQ(dw, dw0);
}

struct LinearResults {
  std::vector<float> out, dx, dw, db;
};

LinearResults run_linear_float(int threads, int N, int I, int O) {
  const std::vector<float> x = llm::test::to_float(random_vector(static_cast<size_t>(N) * I, 31));
  const std::vector<float> w = llm::test::to_float(random_vector(static_cast<size_t>(O) * I, 32));
  const std::vector<float> b = llm::test::to_float(random_vector(O, 33));
  const std::vector<float> dout = llm::test::to_float(random_vector(static_cast<size_t>(N) * O, 34));
  LinearResults r;
  r.out.resize(static_cast<size_t>(N) * O);
  r.dx.resize(static_cast<size_t>(N) * I);
  r.dw = llm::test::to_float(random_vector(static_cast<size_t>(O) * I, 35));
  r.db = llm::test::to_float(random_vector(O, 36));
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  llm::ref::linear_forward(r.out.data(), x.data(), w.data(), b.data(), N, I, O);
  llm::ref::linear_backward(r.dx.data(), r.dw.data(), r.db.data(), dout.data(), x.data(), w.data(), N, I, O);
  omp_set_num_threads(saved);
  return r;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Every output element is summed by one thread in a fixed order, so 1 and 2 threads agree bit for bit.
TEST(Linear, DeterministicAcrossThreadCounts) {
  const int N = 37, I = 131, O = 67;
  const LinearResults one = run_linear_float(1, N, I, O);
  const LinearResults two = run_linear_float(2, N, I, O);
  EXPECT_TRUE(bitwise_equal(one.out, two.out));
  EXPECT_TRUE(bitwise_equal(one.dx, two.dx));
  EXPECT_TRUE(bitwise_equal(one.dw, two.dw));
  EXPECT_TRUE(bitwise_equal(one.db, two.db));
  const LinearResults three = run_linear_float(3, N, I, O);
  EXPECT_TRUE(bitwise_equal(one.out, three.out));
  EXPECT_TRUE(bitwise_equal(one.dw, three.dw));
}

// The float path agrees with the double path to float precision.
TEST(Linear, FloatMatchesDouble) {
  const int N = 9, I = 33, O = 17;
  const std::vector<double> x = random_vector(N * I, 41), w = random_vector(O * I, 42),
                            b = random_vector(O, 43);
  std::vector<double> out(N * O);
  llm::ref::linear_forward(out.data(), x.data(), w.data(), b.data(), N, I, O);
  const std::vector<float> xf = llm::test::to_float(x), wf = llm::test::to_float(w),
                           bf = llm::test::to_float(b);
  std::vector<float> outf(N * O);
  llm::ref::linear_forward(outf.data(), xf.data(), wf.data(), bf.data(), N, I, O);
  for (int i = 0; i < N * O; ++i) EXPECT_NEAR(outf[i], out[i], 1e-5) << i;
}

}  // namespace
