// CUDA LoRA (kernels/lora.cuh) against the CPU reference (kernels/cpu/lora.h), computed in double on the
// same rounded inputs. The adapter runs on top of the base layer, as in training: matmul_forward then
// lora_forward, matmul_backward (dx = G W) then lora_backward adding the adapter's part. Checked: out, h,
// dx, dA and dB at odd sizes (N, I, O, r not multiples of 8), without dropout, with dropout, and with
// p = 1; the dropout mask of the forward scratch x~ and of the backward's dx equal to the CPU's Philox
// stream element for element; dA and dB accumulating over two backward calls; dx overwritten or
// accumulated; unaligned pointers; fp32, bf16, and bf16 with fp32 gradients; the initialisation (bit
// for bit) and merging/unmerging. Outputs are poisoned (NaN) first, so an unwritten element fails.
#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cpu/dropout.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/lora.h"
#include "kernels/lora.cuh"
#include "kernels/matmul.cuh"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/kernel_test_helpers.h"

namespace {

using namespace llm::test;
using bf16 = __nv_bfloat16;

std::vector<double> to_doubles(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}
std::vector<float> to_floats_from(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

// A device buffer whose data starts `offset` elements in: offset 1 leaves the pointers only 2- or 4-byte
// aligned, which the cuBLASLt heuristics and the vectorised dropout kernels must cope with.
template <typename T>
class OffsetBuffer {
 public:
  OffsetBuffer(size_t n, size_t offset) : buffer_(n + offset), offset_(offset) {}
  T* get() { return buffer_.get() + offset_; }
  void poison() { buffer_.poison(); }
  void upload(const std::vector<float>& v) {
    std::vector<float> all(offset_, 0.0f);
    all.insert(all.end(), v.begin(), v.end());
    upload_floats(buffer_, all);
  }
  std::vector<float> download() const {
    const std::vector<float> all = download_floats(buffer_);
    return std::vector<float>(all.begin() + static_cast<std::ptrdiff_t>(offset_), all.end());
  }

 private:
  DeviceBuffer<T> buffer_;
  size_t offset_;
};

struct Shape {
  int N, I, O, r;
};

std::string describe(const Shape& s, float p) {
  return "N=" + std::to_string(s.N) + " I=" + std::to_string(s.I) + " O=" + std::to_string(s.O) +
         " r=" + std::to_string(s.r) + " p=" + std::to_string(p);
}

// One LoRA problem: inputs rounded to T (initial gradients to TGrad), and the double-precision reference.
template <typename T, typename TGrad>
struct Problem {
  int N, I, O, r;
  float scale, p;
  uint64_t seed = 0x123456789abcdef0ull;
  uint64_t stream_id = (7ull << 32) | 3ull;  // both 32-bit halves set
  std::vector<float> x, w, bias, A, B, dout, dA0, dB0;

  Problem(const Shape& s, float dropout_p, unsigned seed_base)
      : N(s.N), I(s.I), O(s.O), r(s.r), scale(llm::ref::lora_scale(16.0f, s.r, false)), p(dropout_p) {
    const size_t nx = static_cast<size_t>(N) * I;
    x = round_to<T>(random_floats(nx, seed_base + 1));
    for (float& v : x) {
      if (v == 0.0f) v = 0.5f;  // nonzero, so that x~ == 0 means "dropped"
    }
    w = round_to<T>(random_floats(static_cast<size_t>(O) * I, seed_base + 2, -0.5f, 0.5f));
    bias = round_to<T>(random_floats(O, seed_base + 3));
    // A non-zero B (a trained adapter, not a fresh one), so the adapter path shows in every output.
    A = round_to<T>(random_floats(static_cast<size_t>(r) * I, seed_base + 4, -0.3f, 0.3f));
    B = round_to<T>(random_floats(static_cast<size_t>(O) * r, seed_base + 5, -0.3f, 0.3f));
    dout = round_to<T>(random_floats(static_cast<size_t>(N) * O, seed_base + 6));
    dA0 = round_to<TGrad>(random_floats(static_cast<size_t>(r) * I, seed_base + 7));
    dB0 = round_to<TGrad>(random_floats(static_cast<size_t>(O) * r, seed_base + 8));
  }

  // out = x W^T + b + s h B^T and h = x~ A^T.
  void ref_forward(std::vector<double>* out, std::vector<double>* h) const {
    const std::vector<double> xd = to_doubles(x), wd = to_doubles(w), bd = to_doubles(bias),
                              Ad = to_doubles(A), Bd = to_doubles(B);
    out->assign(static_cast<size_t>(N) * O, 0.0);
    h->assign(static_cast<size_t>(N) * r, 0.0);
    llm::ref::lora_forward<double>(out->data(), h->data(), xd.data(), wd.data(), bd.data(), Ad.data(),
                                   Bd.data(), N, I, O, r, scale, p, seed, stream_id);
  }

  // The reference gradients: dx of the base path (G W) and of the adapter alone, and dA, dB after
  // `calls` backward calls starting from dA0, dB0.
  struct Grads {
    std::vector<double> dx_base, dx_adapter, dA, dB;
  };
  Grads ref_backward(int calls) const {
    std::vector<double> out, h;
    ref_forward(&out, &h);
    const std::vector<double> xd = to_doubles(x), wd = to_doubles(w), Ad = to_doubles(A), Bd = to_doubles(B),
                              gd = to_doubles(dout);
    const std::vector<double> zero_w(wd.size(), 0.0);
    Grads g;
    const size_t nx = static_cast<size_t>(N) * I;
    g.dx_base.assign(nx, 0.0);
    llm::ref::linear_backward<double>(g.dx_base.data(), nullptr, nullptr, gd.data(), xd.data(), wd.data(), N,
                                      I, O);
    // With a zero base weight the reference's dx is the adapter's part alone.
    g.dx_adapter.assign(nx, 0.0);
    llm::ref::lora_backward<double>(g.dx_adapter.data(), nullptr, nullptr, gd.data(), xd.data(), h.data(),
                                    zero_w.data(), Ad.data(), Bd.data(), N, I, O, r, scale, p, seed,
                                    stream_id);
    g.dA = to_doubles(dA0);
    g.dB = to_doubles(dB0);
    for (int c = 0; c < calls; ++c) {
      llm::ref::lora_backward<double>(nullptr, g.dA.data(), g.dB.data(), gd.data(), xd.data(), h.data(),
                                      wd.data(), Ad.data(), Bd.data(), N, I, O, r, scale, p, seed, stream_id);
    }
    return g;
  }

  // keep_i / (1 - p) of the reference's mask over [N, I] (0 where dropped).
  std::vector<float> ref_mask() const {
    const size_t nx = static_cast<size_t>(N) * I;
    std::vector<float> ones(nx, 1.0f), mask(nx);
    llm::ref::dropout_forward(mask.data(), ones.data(), nx, p, seed, stream_id);
    return mask;
  }
};

struct GpuResult {
  std::vector<float> out, h, x_dropped, dx, dA, dB;
};

// Forward (base, then adapter) and `calls` backward calls on the GPU. With accumulate_dx the base's dx =
// G W is written first and each lora_backward adds to it; otherwise dx is poisoned and lora_backward
// writes the adapter's part. offset shifts every buffer by that many elements.
template <typename T, typename TGrad>
GpuResult run_gpu(const Problem<T, TGrad>& p, int calls, bool accumulate_dx, size_t offset = 0) {
  const int N = p.N, I = p.I, O = p.O, r = p.r;
  const size_t nx = static_cast<size_t>(N) * I;
  OffsetBuffer<T> x(nx, offset), w(p.w.size(), offset), bias(p.bias.size(), offset), A(p.A.size(), offset),
      B(p.B.size(), offset), dout(p.dout.size(), offset), out(static_cast<size_t>(N) * O, offset),
      h(static_cast<size_t>(N) * r, offset), x_dropped(nx, offset), dx(nx, offset),
      dh(static_cast<size_t>(N) * r, offset), work(nx, offset);
  OffsetBuffer<TGrad> dA(p.A.size(), offset), dB(p.B.size(), offset);
  x.upload(p.x);
  w.upload(p.w);
  bias.upload(p.bias);
  A.upload(p.A);
  B.upload(p.B);
  dout.upload(p.dout);
  dA.upload(p.dA0);
  dB.upload(p.dB0);
  for (OffsetBuffer<T>* b : {&out, &h, &x_dropped, &dx, &dh, &work}) b->poison();

  const bool dropout = p.p > 0.0f;
  llm::cuda::matmul_forward<T>(out.get(), x.get(), w.get(), bias.get(), N, I, O, nullptr);
  llm::cuda::lora_forward<T>(out.get(), h.get(), dropout ? x_dropped.get() : nullptr, x.get(), A.get(),
                             B.get(), N, I, O, r, p.scale, p.p, p.seed, p.stream_id, nullptr);
  if (accumulate_dx) {
    llm::cuda::matmul_backward<T, T>(dx.get(), nullptr, nullptr, dout.get(), x.get(), w.get(), N, I, O, false,
                                     nullptr);
  }
  for (int c = 0; c < calls; ++c) {
    llm::cuda::lora_backward<T, TGrad>(dx.get(), dA.get(), dB.get(), dh.get(), dropout ? work.get() : nullptr,
                                       dout.get(), x.get(), h.get(), A.get(), B.get(), N, I, O, r, p.scale,
                                       p.p, p.seed, p.stream_id, accumulate_dx, nullptr);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  GpuResult g;
  g.out = out.download();
  g.h = h.download();
  if (dropout) g.x_dropped = x_dropped.download();
  g.dx = dx.download();
  g.dA = dA.download();
  g.dB = dB.download();
  return g;
}

// The zero pattern of `got` (a masked array whose kept entries are nonzero) equals the reference mask's.
void expect_mask(const std::string& what, const std::vector<float>& got, const std::vector<float>& mask) {
  ASSERT_EQ(got.size(), mask.size()) << what;
  size_t mismatches = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << "[" << i << "] was not written (or is not finite)";
    if ((got[i] == 0.0f) != (mask[i] == 0.0f)) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0u) << what << ": the dropout mask differs from the CPU Philox stream";
}

// Checks forward and one backward call of one problem against the reference.
template <typename T, typename TGrad>
void check_problem(const Shape& shape, float p, bool accumulate_dx, size_t offset, unsigned seed) {
  const Problem<T, TGrad> prob(shape, p, seed);
  const std::string what =
      describe(shape, p) + (accumulate_dx ? " dx +=" : " dx =") + (offset != 0 ? " unaligned" : "");
  SCOPED_TRACE(what);
  const double tol = tolerance<T>();
  const GpuResult g = run_gpu(prob, 1, accumulate_dx, offset);

  std::vector<double> out, h;
  prob.ref_forward(&out, &h);
  expect_relative_error("out", g.out, to_floats_from(out), tol);
  expect_relative_error("h", g.h, to_floats_from(h), tol);

  if (p > 0.0f) {
    // x~ from the forward scratch: the CPU's mask, and in fp32 the CPU's values bit for bit.
    std::vector<float> want_xd(prob.x.size());
    llm::ref::dropout_forward(want_xd.data(), prob.x.data(), want_xd.size(), p, prob.seed, prob.stream_id);
    const std::vector<float> mask = prob.ref_mask();
    expect_mask("x~", g.x_dropped, mask);
    if constexpr (std::is_same_v<T, float>) {
      EXPECT_TRUE(g.x_dropped == want_xd) << "x~ differs from the reference's dropout_forward";
    } else if (p < 1.0f) {
      expect_relative_error("x~", g.x_dropped, want_xd, tol);
    }
    // dx of the adapter alone is keep * (dh A) / (1 - p): zero exactly where the CPU dropped.
    if (!accumulate_dx) expect_mask("dx (adapter)", g.dx, mask);
  }

  const auto grads = prob.ref_backward(1);
  std::vector<double> want_dx = grads.dx_adapter;
  if (accumulate_dx) {
    for (size_t i = 0; i < want_dx.size(); ++i) want_dx[i] += grads.dx_base[i];
  }
  if (p >= 1.0f && !accumulate_dx) {
    expect_all_finite("dx", g.dx);  // all zeros: no relative error to measure
    for (float v : g.dx) ASSERT_EQ(v, 0.0f);
  } else {
    expect_relative_error("dx", g.dx, to_floats_from(want_dx), tol);
  }
  expect_relative_error("dA", g.dA, to_floats_from(grads.dA), tol);
  expect_relative_error("dB", g.dB, to_floats_from(grads.dB), tol);
}

const Shape kShapes[] = {{37, 301, 77, 8}, {53, 45, 29, 3}};

// (storage type, gradient type) pairs.
template <typename T_, typename TGrad_>
struct TypePair {
  using T = T_;
  using TGrad = TGrad_;
};
struct PairNames {
  template <typename P>
  static std::string GetName(int) {
    if (std::is_same_v<typename P::T, float>) return "fp32";
    return std::is_same_v<typename P::TGrad, float> ? "bf16_fp32grad" : "bf16";
  }
};

template <typename P>
class CudaLora : public ::testing::Test {};
using Pairs = ::testing::Types<TypePair<float, float>, TypePair<bf16, bf16>, TypePair<bf16, float>>;
TYPED_TEST_SUITE(CudaLora, Pairs, PairNames);

TYPED_TEST(CudaLora, ForwardBackwardWithoutDropout) {
  SKIP_WITHOUT_GPU();
  using T = typename TypeParam::T;
  using TGrad = typename TypeParam::TGrad;
  for (const Shape& s : kShapes) {
    for (bool accumulate_dx : {true, false}) check_problem<T, TGrad>(s, 0.0f, accumulate_dx, 0, 10);
  }
}

TYPED_TEST(CudaLora, ForwardBackwardWithDropoutMatchesCpuMask) {
  SKIP_WITHOUT_GPU();
  using T = typename TypeParam::T;
  using TGrad = typename TypeParam::TGrad;
  for (const Shape& s : kShapes) {
    for (float p : {0.1f, 0.5f}) {
      for (bool accumulate_dx : {true, false}) check_problem<T, TGrad>(s, p, accumulate_dx, 0, 20);
    }
  }
}

TYPED_TEST(CudaLora, DropEverything) {
  SKIP_WITHOUT_GPU();
  using T = typename TypeParam::T;
  using TGrad = typename TypeParam::TGrad;
  // p = 1: x~ = 0, so h = 0, the output is the base's, dA gets nothing and dx only the base path.
  for (bool accumulate_dx : {true, false}) check_problem<T, TGrad>(kShapes[0], 1.0f, accumulate_dx, 0, 30);
}

TYPED_TEST(CudaLora, UnalignedPointers) {
  SKIP_WITHOUT_GPU();
  using T = typename TypeParam::T;
  using TGrad = typename TypeParam::TGrad;
  for (float p : {0.0f, 0.25f}) {
    for (bool accumulate_dx : {true, false}) check_problem<T, TGrad>(kShapes[0], p, accumulate_dx, 1, 40);
  }
}

// Gradient accumulation: two backward calls add both contributions to dA, dB and (with +=) dx.
TYPED_TEST(CudaLora, BackwardAccumulatesOverMicroBatches) {
  SKIP_WITHOUT_GPU();
  using T = typename TypeParam::T;
  using TGrad = typename TypeParam::TGrad;
  for (float p : {0.0f, 0.25f}) {
    const Problem<T, TGrad> prob(kShapes[0], p, 50);
    SCOPED_TRACE(describe(kShapes[0], p));
    const GpuResult g = run_gpu(prob, 2, true);
    const auto grads = prob.ref_backward(2);
    std::vector<double> want_dx(grads.dx_base.size());
    for (size_t i = 0; i < want_dx.size(); ++i) want_dx[i] = grads.dx_base[i] + 2.0 * grads.dx_adapter[i];
    const double tol = tolerance<T>();
    expect_relative_error("dx", g.dx, to_floats_from(want_dx), tol);
    expect_relative_error("dA", g.dA, to_floats_from(grads.dA), tol);
    expect_relative_error("dB", g.dB, to_floats_from(grads.dB), tol);
  }
}

template <typename T>
class CudaLoraStorage : public ::testing::Test {};
struct StorageNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "fp32" : "bf16";
  }
};
using StorageTypes = ::testing::Types<float, bf16>;
TYPED_TEST_SUITE(CudaLoraStorage, StorageTypes, StorageNames);

// A drawn from the reference's Philox numbers (bit for bit after rounding to T), B all zeros.
TYPED_TEST(CudaLoraStorage, InitMatchesReference) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const int I = 301, O = 77, r = 8;
  const uint64_t seed = 0xfeedfacecafebeefull, stream_id = (3ull << 32) | 9ull;
  std::vector<float> want_A(static_cast<size_t>(r) * I), want_B(static_cast<size_t>(O) * r, 1.0f);
  llm::ref::lora_init(want_A.data(), want_B.data(), I, O, r, seed, stream_id);
  DeviceBuffer<T> A(want_A.size()), B(want_B.size());
  A.poison();
  B.poison();
  llm::cuda::lora_init<T>(A.get(), B.get(), I, O, r, seed, stream_id, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(bitwise_equal(A.download(), from_floats<T>(want_A))) << "A differs from the reference's draws";
  EXPECT_TRUE(bitwise_equal(B.download(), from_floats<T>(want_B))) << "B is not all zeros";
}

// W' = W + s B A, out of place and in place; unmerging with -s gives W back up to rounding.
TYPED_TEST(CudaLoraStorage, MergeAndUnmerge) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const int I = 301, O = 77, r = 5;
  const float s = llm::ref::lora_scale(16.0f, r, true);  // rsLoRA scale
  const std::vector<float> w = round_to<T>(random_floats(static_cast<size_t>(O) * I, 61, -0.5f, 0.5f));
  const std::vector<float> A = round_to<T>(random_floats(static_cast<size_t>(r) * I, 62, -0.3f, 0.3f));
  const std::vector<float> B = round_to<T>(random_floats(static_cast<size_t>(O) * r, 63, -0.3f, 0.3f));
  std::vector<double> want(w.size());
  const std::vector<double> wd = to_doubles(w), Ad = to_doubles(A), Bd = to_doubles(B);
  llm::ref::lora_merge<double>(want.data(), wd.data(), Ad.data(), Bd.data(), I, O, r, s);

  DeviceBuffer<T> dw(w.size()), dA(A.size()), dB(B.size()), merged(w.size());
  upload_floats(dw, w);
  upload_floats(dA, A);
  upload_floats(dB, B);
  merged.poison();
  llm::cuda::lora_merge<T>(merged.get(), dw.get(), dA.get(), dB.get(), I, O, r, s, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  expect_relative_error("merged", download_floats(merged), to_floats_from(want), tolerance<T>());
  EXPECT_TRUE(bitwise_equal(download_floats(dw), w)) << "out-of-place merge changed the base weight";

  llm::cuda::lora_merge<T>(dw.get(), dw.get(), dA.get(), dB.get(), I, O, r, s, nullptr);  // in place
  CUDA_CHECK(cudaDeviceSynchronize());
  expect_relative_error("merged in place", download_floats(dw), to_floats_from(want), tolerance<T>());
  llm::cuda::lora_merge<T>(dw.get(), dw.get(), dA.get(), dB.get(), I, O, r, -s, nullptr);  // unmerge
  CUDA_CHECK(cudaDeviceSynchronize());
  expect_relative_error("unmerged", download_floats(dw), w, tolerance<T>());
}

// Argument checks happen before any device work, so they run without a GPU too.
TEST(CudaLoraArguments, MissingScratchAndBadSizesThrow) {
  float* null = nullptr;
  EXPECT_THROW(llm::cuda::lora_forward<float>(null, null, null, null, null, null, 4, 8, 8, 0, 1.0f, 0.0f, 1,
                                              2, nullptr),
               std::invalid_argument);
  EXPECT_THROW(llm::cuda::lora_forward<float>(null, null, null, null, null, null, 4, 8, 8, 2, 1.0f, 0.1f, 1,
                                              2, nullptr),
               std::invalid_argument);
  float dummy = 0.0f;
  // dx wanted without the dh scratch.
  auto backward_without_dh = [&] {
    llm::cuda::lora_backward<float, float>(&dummy, null, null, null, null, null, null, null, null, null, 4, 8,
                                           8, 2, 1.0f, 0.0f, 1, 2, true, nullptr);
  };
  EXPECT_THROW(backward_without_dh(), std::invalid_argument);
}

}  // namespace
