// The matmul kernels (kernels/matmul.cuh) against the CPU reference (kernels/cpu/linear.h), computed in
// double on the same rounded inputs: forward with and without bias, backward with dW and db accumulating
// into non-zero gradients and dx overwritten or accumulated, odd sizes (N=37, I=301, O=77), unaligned
// pointers, both engines (cuBLASLt and the tiled teaching kernel) and each against the other, the
// mixed bf16-activations/fp32-gradients mode, and bitwise determinism.
#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/linear.h"
#include "kernels/matmul.cuh"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/gemm_test_helpers.h"

namespace {

using llm::cuda::GemmEngine;
using llm::test::DeviceBuffer;
using llm::test::expect_relative_error;
using bf16 = __nv_bfloat16;

// tolerance, random_floats, rounded, to_doubles/to_floats, download/upload, bitwise_equal.
using namespace llm::test::gemm;

// One linear-layer problem: inputs rounded to T, initial gradients, and the double-precision reference.
template <typename T, typename TGrad = T>
struct Problem {
  int N, I, O;
  std::vector<float> x, w, b, dout, dx0, dw0, db0;

  Problem(int n, int i, int o, unsigned seed) : N(n), I(i), O(o) {
    x = rounded<T>(random_floats(static_cast<size_t>(N) * I, seed + 1));
    w = rounded<T>(random_floats(static_cast<size_t>(O) * I, seed + 2, -0.5f, 0.5f));
    b = rounded<T>(random_floats(O, seed + 3));
    dout = rounded<T>(random_floats(static_cast<size_t>(N) * O, seed + 4));
    dx0 = rounded<T>(random_floats(static_cast<size_t>(N) * I, seed + 5));
    dw0 = rounded<TGrad>(random_floats(static_cast<size_t>(O) * I, seed + 6));
    db0 = rounded<TGrad>(random_floats(O, seed + 7));
  }

  std::vector<float> ref_forward(bool with_bias) const {
    const std::vector<double> xd = to_doubles(x), wd = to_doubles(w), bd = to_doubles(b);
    std::vector<double> out(static_cast<size_t>(N) * O);
    llm::ref::linear_forward<double>(out.data(), xd.data(), wd.data(), with_bias ? bd.data() : nullptr, N, I,
                                     O);
    return to_floats(out);
  }

  // dx (from dx0 when accumulating), dW = dw0 + dout^T x, db = db0 + column sums.
  void ref_backward(bool accumulate_dx, std::vector<float>* dx, std::vector<float>* dw,
                    std::vector<float>* db) const {
    const std::vector<double> xd = to_doubles(x), wd = to_doubles(w), gd = to_doubles(dout);
    std::vector<double> dxd = to_doubles(dx0), dwd = to_doubles(dw0), dbd = to_doubles(db0);
    llm::ref::linear_backward<double>(dxd.data(), dwd.data(), dbd.data(), gd.data(), xd.data(), wd.data(), N,
                                      I, O, accumulate_dx);
    *dx = to_floats(dxd);
    *dw = to_floats(dwd);
    *db = to_floats(dbd);
  }
};

// Runs the forward pass on the GPU with the inputs placed `offset` elements into their buffers (offset 1
// leaves the pointers only 2- or 4-byte aligned).
template <typename T>
std::vector<float> gpu_forward(const Problem<T>& p, bool with_bias, GemmEngine engine, int offset = 0) {
  DeviceBuffer<T> x(p.x.size() + offset), w(p.w.size() + offset), b(p.b.size() + offset),
      out(static_cast<size_t>(p.N) * p.O + offset);
  std::vector<float> pad(offset, 0.0f);
  auto with_pad = [&](const std::vector<float>& v) {
    std::vector<float> r(pad);
    r.insert(r.end(), v.begin(), v.end());
    return r;
  };
  upload(x, with_pad(p.x));
  upload(w, with_pad(p.w));
  upload(b, with_pad(p.b));
  out.poison();
  llm::cuda::matmul_forward<T>(out.get() + offset, x.get() + offset, w.get() + offset,
                               with_bias ? b.get() + offset : nullptr, p.N, p.I, p.O, nullptr, engine);
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> all = download(out);
  return std::vector<float>(all.begin() + offset, all.end());
}

// Runs the backward pass: dx poisoned (or dx0 when accumulating), dW and db starting from dw0 and db0.
template <typename T, typename TGrad>
void gpu_backward(const Problem<T, TGrad>& p, bool accumulate_dx, GemmEngine engine, std::vector<float>* dx,
                  std::vector<float>* dw, std::vector<float>* db) {
  DeviceBuffer<T> x(p.x.size()), w(p.w.size()), dout(p.dout.size()), dxb(p.x.size());
  DeviceBuffer<TGrad> dwb(p.w.size()), dbb(p.b.size());
  upload(x, p.x);
  upload(w, p.w);
  upload(dout, p.dout);
  if (accumulate_dx) {
    upload(dxb, p.dx0);
  } else {
    dxb.poison();
  }
  upload(dwb, p.dw0);
  upload(dbb, p.db0);
  llm::cuda::matmul_backward<T, TGrad>(dxb.get(), dwb.get(), dbb.get(), dout.get(), x.get(), w.get(), p.N,
                                       p.I, p.O, accumulate_dx, nullptr, engine);
  CUDA_CHECK(cudaDeviceSynchronize());
  *dx = download(dxb);
  *dw = download(dwb);
  *db = download(dbb);
}

std::string engine_name(GemmEngine e) {
  return e == GemmEngine::kCublasLt ? "cublaslt" : "tiled";
}

struct TypeNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "fp32" : "bf16";
  }
};

template <typename T>
class Matmul : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, bf16>;
TYPED_TEST_SUITE(Matmul, StorageTypes, TypeNames);

TYPED_TEST(Matmul, ForwardMatchesReference) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(37, 301, 77, 10);
  for (GemmEngine engine : {GemmEngine::kCublasLt, GemmEngine::kTiled}) {
    for (bool with_bias : {false, true}) {
      SCOPED_TRACE(engine_name(engine) + (with_bias ? " with bias" : " without bias"));
      expect_relative_error("out", gpu_forward(p, with_bias, engine), p.ref_forward(with_bias),
                            tolerance<T>());
    }
  }
}

TYPED_TEST(Matmul, ForwardUnalignedPointers) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(37, 301, 77, 20);
  expect_relative_error("out", gpu_forward(p, true, GemmEngine::kCublasLt, 1), p.ref_forward(true),
                        tolerance<T>());
}

TYPED_TEST(Matmul, BackwardMatchesReference) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(37, 301, 77, 30);
  for (GemmEngine engine : {GemmEngine::kCublasLt, GemmEngine::kTiled}) {
    for (bool accumulate_dx : {false, true}) {
      SCOPED_TRACE(engine_name(engine) + (accumulate_dx ? " dx +=" : " dx ="));
      std::vector<float> dx, dw, db, want_dx, want_dw, want_db;
      gpu_backward(p, accumulate_dx, engine, &dx, &dw, &db);
      p.ref_backward(accumulate_dx, &want_dx, &want_dw, &want_db);
      expect_relative_error("dx", dx, want_dx, tolerance<T>());
      expect_relative_error("dW", dw, want_dw, tolerance<T>());
      expect_relative_error("db", db, want_db, tolerance<T>());
    }
  }
}

// Gradient accumulation: two backward calls on the same gradients add both contributions.
TYPED_TEST(Matmul, BackwardAccumulatesOverMicroBatches) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(37, 301, 77, 40);
  DeviceBuffer<T> x(p.x.size()), w(p.w.size()), dout(p.dout.size());
  DeviceBuffer<T> dw(p.w.size()), db(p.b.size());
  upload(x, p.x);
  upload(w, p.w);
  upload(dout, p.dout);
  upload(dw, p.dw0);
  upload(db, p.db0);
  for (int step = 0; step < 2; ++step) {
    llm::cuda::matmul_backward<T, T>(nullptr, dw.get(), db.get(), dout.get(), x.get(), w.get(), p.N, p.I, p.O,
                                     false, nullptr);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> dwd = to_doubles(p.dw0), dbd = to_doubles(p.db0);
  const std::vector<double> xd = to_doubles(p.x), wd = to_doubles(p.w), gd = to_doubles(p.dout);
  for (int step = 0; step < 2; ++step) {
    llm::ref::linear_backward<double>(nullptr, dwd.data(), dbd.data(), gd.data(), xd.data(), wd.data(), p.N,
                                      p.I, p.O);
  }
  expect_relative_error("dW", download(dw), to_floats(dwd), tolerance<T>());
  expect_relative_error("db", download(db), to_floats(dbd), tolerance<T>());
}

TYPED_TEST(Matmul, TiledMatchesCublasLt) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(37, 301, 77, 50);
  expect_relative_error("out", gpu_forward(p, true, GemmEngine::kTiled),
                        gpu_forward(p, true, GemmEngine::kCublasLt), tolerance<T>());
  std::vector<float> dx[2], dw[2], db[2];
  gpu_backward(p, false, GemmEngine::kTiled, &dx[0], &dw[0], &db[0]);
  gpu_backward(p, false, GemmEngine::kCublasLt, &dx[1], &dw[1], &db[1]);
  expect_relative_error("dx", dx[0], dx[1], tolerance<T>());
  expect_relative_error("dW", dw[0], dw[1], tolerance<T>());
  expect_relative_error("db", db[0], db[1], 1e-6);  // same kernel in both
}

TYPED_TEST(Matmul, DeterministicAcrossRuns) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(37, 301, 77, 60);
  DeviceBuffer<T> x(p.x.size()), w(p.w.size()), b(p.b.size()), dout(p.dout.size());
  upload(x, p.x);
  upload(w, p.w);
  upload(b, p.b);
  upload(dout, p.dout);
  std::vector<T> results[2][4];
  for (int run = 0; run < 2; ++run) {
    DeviceBuffer<T> out(static_cast<size_t>(p.N) * p.O), dx(p.x.size()), dw(p.w.size()), db(p.b.size());
    upload(dw, p.dw0);
    upload(db, p.db0);
    llm::cuda::matmul_forward<T>(out.get(), x.get(), w.get(), b.get(), p.N, p.I, p.O, nullptr);
    llm::cuda::matmul_backward<T, T>(dx.get(), dw.get(), db.get(), dout.get(), x.get(), w.get(), p.N, p.I,
                                     p.O, false, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    results[run][0] = out.download();
    results[run][1] = dx.download();
    results[run][2] = dw.download();
    results[run][3] = db.download();
  }
  const char* names[4] = {"out", "dx", "dW", "db"};
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(bitwise_equal(results[0][i], results[1][i])) << names[i];
}

// Sizes that are multiples of 8 take cuBLASLt's tensor-core kernels (the odd sizes above may not).
TYPED_TEST(Matmul, LargeAlignedMatchesReference) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(256, 512, 384, 70);
  expect_relative_error("out", gpu_forward(p, true, GemmEngine::kCublasLt), p.ref_forward(true),
                        tolerance<T>());
  std::vector<float> dx, dw, db, want_dx, want_dw, want_db;
  gpu_backward(p, false, GemmEngine::kCublasLt, &dx, &dw, &db);
  p.ref_backward(false, &want_dx, &want_dw, &want_db);
  expect_relative_error("dx", dx, want_dx, tolerance<T>());
  expect_relative_error("dW", dw, want_dw, tolerance<T>());
  expect_relative_error("db", db, want_db, tolerance<T>());
  if (llm::cuda::gemm_fallback_count() != 0) {
    std::cout << "note: " << llm::cuda::gemm_fallback_count()
              << " GEMM(s) in this process found no cuBLASLt algorithm and ran on the tiled kernel\n";
  }
}

// bf16 activations and weights with fp32 parameter gradients: dW and db accumulate in fp32.
TEST(MatmulMixed, Bf16WithFp32GradientsMatchesReference) {
  SKIP_WITHOUT_GPU();
  const Problem<bf16, float> p(37, 301, 77, 80);
  std::vector<float> dx, dw, db, want_dx, want_dw, want_db;
  gpu_backward(p, false, GemmEngine::kCublasLt, &dx, &dw, &db);
  p.ref_backward(false, &want_dx, &want_dw, &want_db);
  expect_relative_error("dx", dx, want_dx, 2e-2);
  // bf16 products are exact in fp32 and the sums are fp32: only the summation order (and the tensor
  // cores' accumulator rounding) differs, far below bf16's 2e-2.
  expect_relative_error("dW", dw, want_dw, 1e-4);
  expect_relative_error("db", db, want_db, 1e-5);
}

// The heuristic cache: a repeated problem asks cuBLASLt once and gives the same bits; another alignment
// (pointers one element in) is another problem, asked again, and still right.
TEST(MatmulGemm, HeuristicCacheAsksOncePerProblem) {
  SKIP_WITHOUT_GPU();
  llm::cuda::BlasLt& blas = llm::cuda::BlasLt::shared();
  const Problem<bf16> p(53, 200, 91, 90);  // sizes no other test in this file uses
  const size_t before = blas.cached_algos();
  const std::vector<float> first = gpu_forward(p, true, GemmEngine::kCublasLt);
  const size_t after_first = blas.cached_algos();
  EXPECT_EQ(after_first, before + 1);
  const std::vector<float> second = gpu_forward(p, true, GemmEngine::kCublasLt);
  EXPECT_EQ(blas.cached_algos(), after_first);
  EXPECT_TRUE(bitwise_equal(first, second));
  expect_relative_error("out", first, p.ref_forward(true), tolerance<bf16>());
  const std::vector<float> shifted = gpu_forward(p, true, GemmEngine::kCublasLt, 1);
  EXPECT_EQ(blas.cached_algos(), after_first + 1);
  expect_relative_error("out, unaligned", shifted, p.ref_forward(true), tolerance<bf16>());
}

TEST(MatmulGemm, RejectsLeadingDimensionTooSmall) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<float> a(64), b(64), c(64);
  auto call = [&] {  // lda = 3 < K = 4
    llm::cuda::gemm<float, float>(c.get(), a.get(), b.get(), nullptr, 4, 4, 4, 3, 4, 4, false, false, 1.0f,
                                  0.0f, nullptr);
  };
  EXPECT_THROW(call(), std::invalid_argument);
}

}  // namespace
