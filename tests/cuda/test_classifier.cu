// The fused classifier (kernels/classifier.cuh) against the CPU reference composed from
// kernels/cpu/linear.h and kernels/cpu/cross_entropy.h in double: logits = h W^T, token logprobs, lse,
// the mean cross-entropy, and dh, dW from token_logprobs_backward + linear_backward. Odd vocabulary
// (V = 1001, not a multiple of 8), ignored targets, several chunks (the last one partial), per-token and
// uniform upstream gradients, dW accumulating into non-zero values, extreme logits, an all-ignored
// batch, poisoned outputs and scratch, bitwise determinism, and a 152K vocabulary.
#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/classifier.cuh"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/linear.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/gemm_test_helpers.h"

namespace {

using llm::test::DeviceBuffer;
using llm::test::expect_relative_error;
using bf16 = __nv_bfloat16;

// tolerance, random_floats, rounded, to_doubles/to_floats, download/upload, bitwise_equal.
using namespace llm::test::gemm;

void expect_scalar_close(const std::string& what, double got, double want, double tolerance) {
  ASSERT_TRUE(std::isfinite(got)) << what << " is not finite";
  EXPECT_LE(std::fabs(got - want), tolerance * std::max(std::fabs(want), 1e-30))
      << what << ": " << got << " vs " << want;
}

struct Expected {
  std::vector<float> logprobs, lse, dh, dw;
  double loss = 0.0;
};

// A classifier problem with inputs rounded to T and TGrad. `dlogprobs` empty means the mean CE gradient.
template <typename T, typename TGrad = T>
struct Problem {
  int N, d, V;
  std::vector<float> h, w, dw0, dlogprobs;
  std::vector<int32_t> targets;
  int count = 0;

  // ignored_every: every k-th token is ignored (0: none; 1: all). logit_scale multiplies h.
  Problem(int n, int dim, int vocab, unsigned seed, int ignored_every = 5, float logit_scale = 1.0f,
          bool per_token = false)
      : N(n), d(dim), V(vocab) {
    h = rounded<T>(random_floats(static_cast<size_t>(N) * d, seed + 1, -logit_scale, logit_scale));
    // |W| <= 0.3 keeps the logits near unit size, so bf16's rounding of them stays well inside 2e-2.
    w = rounded<T>(random_floats(static_cast<size_t>(V) * d, seed + 2, -0.3f, 0.3f));
    std::mt19937 gen(seed + 3);
    std::uniform_int_distribution<int> pick(0, V - 1);
    targets.resize(N);
    for (int i = 0; i < N; ++i) {
      const bool ignore = ignored_every > 0 && i % ignored_every == ignored_every - 1;
      targets[i] = ignore ? -100 : pick(gen);
      if (!ignore) ++count;
    }
    if (per_token) dlogprobs = random_floats(N, seed + 4, -2.0f, 2.0f);
    // dW starts non-zero, at the size of the gradient itself, so a wrong += shows.
    const Expected grad = reference(std::vector<float>(w.size(), 0.0f));
    double sq = 0.0;
    for (float g : grad.dw) sq += static_cast<double>(g) * g;
    const float rms = static_cast<float>(std::sqrt(sq / grad.dw.size()));
    dw0 = random_floats(w.size(), seed + 5, -1.0f, 1.0f);
    for (float& x : dw0) x *= rms;
    dw0 = rounded<TGrad>(dw0);
  }

  float scale() const { return count > 0 ? -1.0f / count : 0.0f; }

  Expected reference(const std::vector<float>& dw_start) const {
    const std::vector<double> hd = to_doubles(h), wd = to_doubles(w);
    std::vector<double> logits(static_cast<size_t>(N) * V), logprobs(N), lse(N);
    llm::ref::linear_forward<double>(logits.data(), hd.data(), wd.data(), nullptr, N, d, V);
    llm::ref::token_logprobs_forward<double>(logprobs.data(), lse.data(), logits.data(), targets.data(), N,
                                             V);
    int k = 0;
    Expected e;
    e.loss = llm::ref::cross_entropy_mean<double>(logprobs.data(), targets.data(), N, &k);
    std::vector<double> g(N);
    for (int i = 0; i < N; ++i) {
      g[i] = targets[i] == -100 ? 0.0 : (dlogprobs.empty() ? static_cast<double>(scale()) : dlogprobs[i]);
    }
    std::vector<double> dlogits(logits.size());
    llm::ref::token_logprobs_backward<double>(dlogits.data(), g.data(), logits.data(), lse.data(),
                                              targets.data(), N, V);
    std::vector<double> dh(static_cast<size_t>(N) * d, 0.0), dw = to_doubles(dw_start);
    llm::ref::linear_backward<double>(dh.data(), dw.data(), nullptr, dlogits.data(), hd.data(), wd.data(), N,
                                      d, V);
    e.logprobs = to_floats(logprobs);
    e.lse = to_floats(lse);
    e.dh = to_floats(dh);
    e.dw = to_floats(dw);
    return e;
  }
  Expected reference() const { return reference(dw0); }
};

struct Result {
  std::vector<float> logprobs, lse, dh, dw, loss;
};

// Runs classifier_forward_backward (or classifier_forward) on freshly uploaded, poisoned buffers.
template <typename T, typename TGrad>
Result run_gpu(const Problem<T, TGrad>& p, int chunk_rows, bool backward = true) {
  DeviceBuffer<T> h(p.h.size()), w(p.w.size()), dh(p.h.size());
  DeviceBuffer<TGrad> dw(p.w.size());
  DeviceBuffer<T> scratch(llm::cuda::classifier_scratch_elements(chunk_rows, p.V));
  DeviceBuffer<int32_t> targets(p.N);
  DeviceBuffer<float> dlogprobs(std::max<size_t>(1, p.dlogprobs.size())), logprobs(p.N), lse(p.N), loss(1);
  upload(h, p.h);
  upload(w, p.w);
  upload(dw, p.dw0);
  targets.upload(p.targets);
  if (!p.dlogprobs.empty()) dlogprobs.upload(p.dlogprobs);
  dh.poison();
  scratch.poison();  // the padding columns hold NaN: they must never leak into a result
  logprobs.poison();
  lse.poison();
  loss.poison();
  if (backward) {
    llm::cuda::classifier_forward_backward<T, TGrad>(
        dh.get(), dw.get(), logprobs.get(), lse.get(), loss.get(), h.get(), w.get(), targets.get(),
        p.dlogprobs.empty() ? nullptr : dlogprobs.get(), p.scale(), scratch.get(), chunk_rows, p.N, p.d, p.V,
        nullptr);
  } else {
    llm::cuda::classifier_forward<T>(logprobs.get(), lse.get(), loss.get(), h.get(), w.get(), targets.get(),
                                     scratch.get(), chunk_rows, p.N, p.d, p.V, nullptr);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  Result r;
  r.logprobs = logprobs.download();
  r.lse = lse.download();
  r.loss = loss.download();
  if (backward) {
    r.dh = download(dh);
    r.dw = download(dw);
  }
  return r;
}

template <typename T, typename TGrad>
void expect_matches(const Problem<T, TGrad>& p, const Result& got, double tol, bool backward = true) {
  const Expected want = p.reference();
  expect_relative_error("logprobs", got.logprobs, want.logprobs, tol);
  expect_relative_error("lse", got.lse, want.lse, tol);
  expect_scalar_close("loss", got.loss[0], want.loss, tol);
  if (!backward) return;
  expect_relative_error("dh", got.dh, want.dh, tol);
  expect_relative_error("dW", got.dw, want.dw,
                        std::is_same_v<TGrad, float> && std::is_same_v<T, float> ? tol : 2e-2);
}

struct TypeNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "fp32" : "bf16";
  }
};

template <typename T>
class Classifier : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, bf16>;
TYPED_TEST_SUITE(Classifier, StorageTypes, TypeNames);

// 45 tokens in chunks of 16 (16 + 16 + 13), V = 1001, every fifth token ignored, mean CE.
TYPED_TEST(Classifier, MatchesReferenceOverChunks) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(45, 67, 1001, 100);
  expect_matches(p, run_gpu(p, 16), tolerance<T>());
}

TYPED_TEST(Classifier, MatchesReferenceInOneChunk) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(45, 67, 1001, 200);
  expect_matches(p, run_gpu(p, 64), tolerance<T>());
}

// Per-token upstream gradients (as DPO/GRPO pass them), chunk of 7 rows.
TYPED_TEST(Classifier, PerTokenDlogprobs) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(45, 67, 1001, 300, 4, 1.0f, true);
  expect_matches(p, run_gpu(p, 7), tolerance<T>());
}

TYPED_TEST(Classifier, ForwardOnlyMatchesReference) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(45, 67, 1001, 400);
  expect_matches(p, run_gpu(p, 16, false), tolerance<T>(), false);
}

// Logits in the hundreds: the online max keeps every exponent <= 0, so nothing overflows.
TYPED_TEST(Classifier, ExtremeLogitsStayFinite) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(24, 64, 1001, 500, 5, 60.0f);
  const Result r = run_gpu(p, 10);
  for (float v : r.logprobs) ASSERT_TRUE(std::isfinite(v));
  for (float v : r.dh) ASSERT_TRUE(std::isfinite(v));
  for (float v : r.dw) ASSERT_TRUE(std::isfinite(v));
  ASSERT_TRUE(std::isfinite(r.loss[0]));
  if (std::is_same_v<T, float>) {
    // fp32 rounding of lse ~150 (ulp 1.5e-5) moves p by ~1e-5 relative: dh, dW ~4e-6 in a CPU emulation.
    expect_matches(p, r, tolerance<T>());
  } else {
    // bf16 rounds logits of ~150 by up to 0.5: logprobs and lse still agree to ~2e-3 (CPU emulation).
    const Expected want = p.reference();
    expect_relative_error("logprobs", r.logprobs, want.logprobs, tolerance<T>());
    expect_relative_error("lse", r.lse, want.lse, tolerance<T>());
  }
}

TYPED_TEST(Classifier, AllIgnoredGivesZeroLossAndGradients) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(20, 33, 1001, 600, 1);
  ASSERT_EQ(p.count, 0);
  const Result r = run_gpu(p, 8);
  EXPECT_EQ(r.loss[0], 0.0f);
  for (float v : r.logprobs) EXPECT_EQ(v, 0.0f);
  for (float v : r.dh) EXPECT_EQ(v, 0.0f);
  EXPECT_EQ(r.dw, p.dw0);  // dW += 0 leaves it bit for bit
  for (float v : r.lse) EXPECT_TRUE(std::isfinite(v));
}

TYPED_TEST(Classifier, DeterministicAcrossRuns) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(45, 67, 1001, 700);
  const Result a = run_gpu(p, 16), b = run_gpu(p, 16);
  EXPECT_TRUE(bitwise_equal(a.logprobs, b.logprobs));
  EXPECT_TRUE(bitwise_equal(a.lse, b.lse));
  EXPECT_TRUE(bitwise_equal(a.loss, b.loss));
  EXPECT_TRUE(bitwise_equal(a.dh, b.dh));
  EXPECT_TRUE(bitwise_equal(a.dw, b.dw));
}

// A Qwen-sized vocabulary that is not a multiple of 8 (152,061 = 8 * 19,007 + 5).
TYPED_TEST(Classifier, LargeVocabNotMultipleOf8) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const Problem<T> p(24, 64, 152061, 800);
  expect_matches(p, run_gpu(p, 16), tolerance<T>());
}

// bf16 activations and logits with an fp32 weight gradient.
TEST(ClassifierMixed, Bf16WithFp32WeightGradient) {
  SKIP_WITHOUT_GPU();
  const Problem<bf16, float> p(45, 67, 1001, 900);
  expect_matches(p, run_gpu(p, 16), 2e-2);
}

TEST(ClassifierArgs, RejectsBadSizes) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<float> buf(64);
  DeviceBuffer<int32_t> targets(4);
  EXPECT_THROW(llm::cuda::classifier_forward<float>(buf.get(), nullptr, nullptr, buf.get(), buf.get(),
                                                    targets.get(), buf.get(), 0, 4, 4, 4, nullptr),
               std::invalid_argument);
}

}  // namespace
