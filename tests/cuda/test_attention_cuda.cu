// The CUDA attention paths against the CPU reference (kernels/cpu/attention.h, run in double):
//   AttentionSimpleCuda.*  the unfused kernels (kernels/attention_simple.cuh)
//   AttentionFlashCuda.*   the fused kernels (kernels/attention_flash.cuh), fp32 FMA and bf16 tensor cores
// Every GPU output is poisoned with NaN first, so an element a kernel forgets to write fails the check.
// Tolerances (relative L2 error): 1e-5 for float storage, 2e-2 for bf16 storage.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/attention_flash.cuh"
#include "kernels/attention_simple.cuh"
#include "kernels/cpu/attention.h"
#include "tests/cuda/cuda_test_util.h"

namespace {

using llm::cuda::AttentionKernel;
using llm::test::DeviceBuffer;
using llm::test::expect_relative_error;
using bf16 = __nv_bfloat16;

struct Case {
  int B, T, Hq, Hkv, D;
  bool causal = true;
  int window = 0;
  bool docs = false;
  bool alibi = false;
  float dropout = 0.0f;
};

std::string describe(const Case& c) {
  std::string s = "B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) + " Hq=" + std::to_string(c.Hq) +
                  " Hkv=" + std::to_string(c.Hkv) + " D=" + std::to_string(c.D);
  if (!c.causal) s += " non-causal";
  if (c.window > 0) s += " window=" + std::to_string(c.window);
  if (c.docs) s += " docs";
  if (c.alibi) s += " alibi";
  if (c.dropout > 0.0f) s += " dropout=" + std::to_string(c.dropout);
  return s;
}

enum class Path { kSimple, kFlash };

// Inputs (exactly representable in the storage type, so the CPU sees the same numbers) and the double
// precision CPU reference results.
struct Problem {
  Case c;
  std::vector<float> q, k, v, dout;
  std::vector<int32_t> doc_ids;
  std::vector<float> slopes;
  std::vector<float> out, probs, dq, dk, dv;  // reference, rounded to float for the comparison
};

template <typename T>
std::vector<float> random_values(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(n);
  for (float& e : x) e = llm::test::host_to_float(static_cast<T>(u(rng)));
  return x;
}

std::vector<float> to_float_vec(const std::vector<double>& x) {
  return std::vector<float>(x.begin(), x.end());
}

template <typename T>
Problem make_problem(const Case& c, uint32_t seed = 1234) {
  Problem pb;
  pb.c = c;
  std::mt19937 rng(seed);
  const size_t nq = static_cast<size_t>(c.B) * c.T * c.Hq * c.D,
               nkv = static_cast<size_t>(c.B) * c.T * c.Hkv * c.D;
  pb.q = random_values<T>(nq, rng);
  pb.k = random_values<T>(nkv, rng);
  pb.v = random_values<T>(nkv, rng);
  pb.dout = random_values<T>(nq, rng);
  if (c.docs) {  // packed documents of varying lengths, different boundaries in each batch row
    pb.doc_ids.resize(static_cast<size_t>(c.B) * c.T);
    for (int b = 0; b < c.B; ++b) {
      int doc = 0, left = 5 + 3 * b;
      for (int t = 0; t < c.T; ++t) {
        if (left-- == 0) {
          ++doc;
          left = 3 + (7 * doc + b) % 23;
        }
        pb.doc_ids[static_cast<size_t>(b) * c.T + t] = doc;
      }
    }
  }
  if (c.alibi) {
    for (int h = 0; h < c.Hq; ++h) pb.slopes.push_back(std::exp2(-8.0f * (h + 1) / c.Hq));
  }

  // The reference in double.
  const llm::ref::AttentionShape s{c.B, c.T, c.Hq, c.Hkv, c.D};
  llm::ref::AttentionOptions opt;
  opt.causal = c.causal;
  opt.sliding_window = c.window;
  opt.doc_ids = c.docs ? pb.doc_ids.data() : nullptr;
  std::vector<double> slopes(pb.slopes.begin(), pb.slopes.end());
  opt.alibi_slopes = c.alibi ? slopes.data() : nullptr;
  opt.dropout = c.dropout;
  opt.seed = 0x5eed1234abcdull;
  opt.stream = 7;
  const std::vector<double> q(pb.q.begin(), pb.q.end()), k(pb.k.begin(), pb.k.end()),
      v(pb.v.begin(), pb.v.end()), dout(pb.dout.begin(), pb.dout.end());
  std::vector<double> out(nq), probs(static_cast<size_t>(c.B) * c.Hq * c.T * c.T), dq(nq), dk(nkv), dv(nkv);
  llm::ref::attention_forward<double>(out.data(), probs.data(), q.data(), k.data(), v.data(), s, opt);
  llm::ref::attention_backward<double>(dq.data(), dk.data(), dv.data(), dout.data(), probs.data(), q.data(),
                                       k.data(), v.data(), s, opt);
  pb.out = to_float_vec(out);
  pb.probs = to_float_vec(probs);
  pb.dq = to_float_vec(dq);
  pb.dk = to_float_vec(dk);
  pb.dv = to_float_vec(dv);
  return pb;
}

// What a GPU run produced, as floats. `stats` is probs (simple path) or lse (flash path).
struct GpuResult {
  std::vector<float> out, stats, dq, dk, dv;
};

// A problem's inputs on the device in storage type T, its outputs (poisoned), and the options that go with
// it (device pointers to the document ids and ALiBi slopes).
template <typename T>
struct DeviceProblem {
  DeviceBuffer<T> q, k, v, dout, out, dq, dk, dv;
  DeviceBuffer<int32_t> doc_ids;
  DeviceBuffer<float> slopes;
  llm::cuda::AttentionShape shape;
  llm::cuda::AttentionOptions opt;

  DeviceProblem(const Problem& pb, AttentionKernel kernel)
      : q(pb.q.size()),
        k(pb.k.size()),
        v(pb.v.size()),
        dout(pb.dout.size()),
        out(pb.q.size()),
        dq(pb.q.size()),
        dk(pb.k.size()),
        dv(pb.v.size()),
        doc_ids(pb.doc_ids.size()),
        slopes(pb.slopes.size()),
        shape{pb.c.B, pb.c.T, pb.c.Hq, pb.c.Hkv, pb.c.D} {
    using llm::test::from_floats;
    const Case& c = pb.c;
    q.upload(from_floats<T>(pb.q));
    k.upload(from_floats<T>(pb.k));
    v.upload(from_floats<T>(pb.v));
    dout.upload(from_floats<T>(pb.dout));
    out.poison();
    dq.poison();
    dk.poison();
    dv.poison();
    if (c.docs) doc_ids.upload(pb.doc_ids);
    if (c.alibi) slopes.upload(pb.slopes);
    opt.causal = c.causal;
    opt.sliding_window = c.window;
    opt.doc_ids = c.docs ? doc_ids.get() : nullptr;
    opt.alibi_slopes = c.alibi ? slopes.get() : nullptr;
    opt.dropout = c.dropout;
    opt.seed = 0x5eed1234abcdull;
    opt.stream = 7;
    opt.kernel = kernel;
  }
};

// Runs forward and backward of one path on the GPU with storage type T; every output is poisoned first.
template <typename T>
GpuResult run_gpu(const Problem& pb, Path path, AttentionKernel kernel = AttentionKernel::kAuto) {
  using llm::test::to_floats;
  DeviceProblem<T> d(pb, kernel);
  auto &q = d.q, &k = d.k, &v = d.v, &dout = d.dout, &out = d.out, &dq = d.dq, &dk = d.dk, &dv = d.dv;
  const llm::cuda::AttentionShape& shape = d.shape;
  const llm::cuda::AttentionOptions& opt = d.opt;

  GpuResult r;
  if (path == Path::kSimple) {
    const size_t n = llm::cuda::attention_simple_matrix_elems(shape);
    DeviceBuffer<float> probs(n), workspace(n);
    probs.poison();
    workspace.poison();
    llm::cuda::attention_simple_forward<T>(out.get(), probs.get(), q.get(), k.get(), v.get(), shape, opt,
                                           nullptr);
    llm::cuda::attention_simple_backward<T>(dq.get(), dk.get(), dv.get(), workspace.get(), dout.get(),
                                            probs.get(), q.get(), k.get(), v.get(), shape, opt, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    r.stats = probs.download();
  } else {
    const size_t n = llm::cuda::attention_flash_stats_elems(shape);
    DeviceBuffer<float> lse(n), delta(n);
    lse.poison();
    delta.poison();
    llm::cuda::attention_flash_forward<T>(out.get(), lse.get(), q.get(), k.get(), v.get(), shape, opt,
                                          nullptr);
    llm::cuda::attention_flash_backward<T>(dq.get(), dk.get(), dv.get(), delta.get(), dout.get(), out.get(),
                                           q.get(), k.get(), v.get(), lse.get(), shape, opt, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    r.stats = lse.download();
  }
  r.out = to_floats(out.download());
  r.dq = to_floats(dq.download());
  r.dk = to_floats(dk.download());
  r.dv = to_floats(dv.download());
  return r;
}

template <typename T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 2e-2;
}

// A gradient against the reference. With T = 1 the reference dQ and dK are exactly zero (one visible key:
// P = 1, so dS = 0) and a relative error has no scale; the flash path forms dS = P (dP - Delta) with
// Delta = <dO, o> summed in another order, so it gets rounding-level values there, not exact zeros. Such
// a gradient must then be written and at most `tolerance` in absolute value.
void expect_gradient(const std::string& what, const std::vector<float>& got, const std::vector<float>& want,
                     double tolerance) {
  if (std::any_of(want.begin(), want.end(), [](float x) { return x != 0.0f; })) {
    expect_relative_error(what, got, want, tolerance);
    return;
  }
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t e = 0; e < got.size(); ++e) {
    ASSERT_TRUE(std::isfinite(got[e])) << what << "[" << e << "] was not written (or is not finite)";
    EXPECT_LE(std::fabs(got[e]), tolerance) << what << "[" << e << "] (the reference is exactly 0)";
  }
}

// Forward and backward of `path` against the CPU reference.
template <typename T>
void check_case(const Case& c, Path path, AttentionKernel kernel = AttentionKernel::kAuto) {
  const std::string what = std::string(path == Path::kSimple ? "simple " : "flash ") +
                           (std::is_same_v<T, float> ? "float " : "bf16 ") + describe(c);
  SCOPED_TRACE(what);
  const Problem pb = make_problem<T>(c);
  const GpuResult r = run_gpu<T>(pb, path, kernel);
  const double tol = tolerance<T>();
  expect_relative_error(what + " out", r.out, pb.out, tol);
  if (path == Path::kSimple) expect_relative_error(what + " probs", r.stats, pb.probs, 1e-5);
  if (path == Path::kFlash) {  // every lse must be written and finite
    for (size_t e = 0; e < r.stats.size(); ++e)
      ASSERT_TRUE(std::isfinite(r.stats[e])) << what << " lse[" << e << "]";
  }
  expect_gradient(what + " dq", r.dq, pb.dq, tol);
  expect_gradient(what + " dk", r.dk, pb.dk, tol);
  expect_relative_error(what + " dv", r.dv, pb.dv, tol);
}

template <typename T>
void check_cases(const std::vector<Case>& cases, Path path, AttentionKernel kernel = AttentionKernel::kAuto) {
  for (const Case& c : cases) check_case<T>(c, path, kernel);
}

// Cases shared by the feature tests, with the head size of the path (the simple path takes any D).
Case mha(int T, int D) {
  return Case{2, T, 4, 4, D};
}
Case gqa(int T, int D) {
  return Case{2, T, 6, 2, D};
}
Case mqa(int T, int D) {
  return Case{2, T, 4, 1, D};
}
Case with_window(Case c, int w) {
  c.window = w;
  return c;
}
Case with_docs(Case c) {
  c.docs = true;
  return c;
}
Case with_alibi(Case c) {
  c.alibi = true;
  return c;
}
Case with_dropout(Case c, float p) {
  c.dropout = p;
  return c;
}
Case non_causal(Case c) {
  c.causal = false;
  return c;
}

// Every feature at once, for the bf16 and tensor-core sweeps.
std::vector<Case> feature_sweep(int D) {
  return {mha(77, D),
          gqa(77, D),
          mqa(37, D),
          with_window(gqa(150, D), 20),
          non_causal(with_window(mha(150, D), 20)),
          with_docs(gqa(77, D)),
          with_alibi(gqa(77, D)),
          non_causal(with_alibi(mha(37, D))),
          with_dropout(gqa(77, D), 0.2f),
          with_dropout(with_alibi(with_docs(with_window(mqa(130, D), 40))), 0.1f)};
}

// ---- simple path
// --------------------------------------------------------------------------------------------

TEST(AttentionSimpleCuda, MhaMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({mha(37, 16), mha(64, 64)}, Path::kSimple);
}

TEST(AttentionSimpleCuda, GqaMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({gqa(37, 32)}, Path::kSimple);
}

TEST(AttentionSimpleCuda, MqaMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({mqa(37, 32)}, Path::kSimple);
}

TEST(AttentionSimpleCuda, SlidingWindowMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({with_window(gqa(37, 16), 8), non_causal(with_window(mha(37, 16), 5))}, Path::kSimple);
}

TEST(AttentionSimpleCuda, DocumentMaskMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({with_docs(gqa(37, 16)), non_causal(with_docs(mha(37, 16)))}, Path::kSimple);
}

TEST(AttentionSimpleCuda, AlibiMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({with_alibi(gqa(37, 16)), non_causal(with_alibi(mha(37, 16)))}, Path::kSimple);
}

TEST(AttentionSimpleCuda, DropoutMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({with_dropout(gqa(37, 16), 0.25f), with_dropout(non_causal(mqa(37, 16)), 0.5f)},
                     Path::kSimple);
}

TEST(AttentionSimpleCuda, NonCausalMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({non_causal(gqa(37, 16))}, Path::kSimple);
}

TEST(AttentionSimpleCuda, OddSizesMatchCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({Case{1, 7, 3, 1, 5}, Case{3, 13, 2, 2, 3}, Case{1, 1, 1, 1, 1}}, Path::kSimple);
}

TEST(AttentionSimpleCuda, Bf16MatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<bf16>({gqa(37, 32), with_dropout(with_alibi(with_docs(with_window(mqa(37, 16), 9))), 0.2f),
                     Case{1, 7, 3, 1, 5}},
                    Path::kSimple);
}

// ---- flash path, fp32 FMA kernels (float storage) -------------------------------------------------------

TEST(AttentionFlashCuda, MhaMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({mha(77, 64), mha(77, 128), mha(64, 64)}, Path::kFlash);
}

TEST(AttentionFlashCuda, GqaMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({gqa(77, 64), gqa(77, 128)}, Path::kFlash);
}

TEST(AttentionFlashCuda, MqaMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({mqa(77, 64), mqa(37, 128)}, Path::kFlash);
}

TEST(AttentionFlashCuda, SlidingWindowMatchesCpu) {
  SKIP_WITHOUT_GPU();
  // T = 150 and W = 20 span several tiles, so whole tiles are skipped on both sides of the band.
  check_cases<float>({with_window(gqa(150, 64), 20), with_window(mha(150, 128), 33),
                      non_causal(with_window(mqa(150, 64), 20))},
                     Path::kFlash);
}

TEST(AttentionFlashCuda, DocumentMaskMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({with_docs(gqa(77, 64)), non_causal(with_docs(mha(77, 128)))}, Path::kFlash);
}

TEST(AttentionFlashCuda, AlibiMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({with_alibi(gqa(77, 64)), non_causal(with_alibi(mha(77, 128)))}, Path::kFlash);
}

TEST(AttentionFlashCuda, DropoutMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({with_dropout(gqa(77, 64), 0.2f), with_dropout(non_causal(mqa(77, 128)), 0.5f)},
                     Path::kFlash);
}

TEST(AttentionFlashCuda, NonCausalMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<float>({non_causal(gqa(77, 64)), non_causal(mha(37, 128))}, Path::kFlash);
}

TEST(AttentionFlashCuda, RaggedLengthsMatchCpu) {
  SKIP_WITHOUT_GPU();
  // Lengths below, at and just past the tile sizes (32 for FMA, 64 for tensor cores).
  for (int T : {1, 31, 33, 37, 65, 77, 129}) check_case<float>(gqa(T, 64), Path::kFlash);
  for (int T : {1, 37, 65}) check_case<float>(mqa(T, 128), Path::kFlash);
}

TEST(AttentionFlashCuda, Bf16FmaMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<bf16>({gqa(77, 64), with_dropout(with_alibi(with_docs(mqa(77, 128))), 0.2f)}, Path::kFlash,
                    AttentionKernel::kFma);
}

// Every feature, both head sizes. "Large" keeps it out of the compute-sanitizer runs of dev/gpu/check.sh.
TEST(AttentionFlashCuda, Bf16FmaFeatureSweepLarge) {
  SKIP_WITHOUT_GPU();
  check_cases<bf16>(feature_sweep(64), Path::kFlash, AttentionKernel::kFma);
  check_cases<bf16>(feature_sweep(128), Path::kFlash, AttentionKernel::kFma);
}

// ---- flash path, bf16 tensor-core kernels --------------------------------------------------------------

TEST(AttentionFlashCuda, TensorCoreMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<bf16>({gqa(77, 64), with_dropout(with_alibi(with_docs(with_window(mqa(130, 128), 40))), 0.1f)},
                    Path::kFlash, AttentionKernel::kTensorCore);
}

TEST(AttentionFlashCuda, TensorCoreFeatureSweepLarge) {
  SKIP_WITHOUT_GPU();
  check_cases<bf16>(feature_sweep(64), Path::kFlash, AttentionKernel::kTensorCore);
  check_cases<bf16>(feature_sweep(128), Path::kFlash, AttentionKernel::kTensorCore);
  for (int T : {1, 63, 64, 65, 200})
    check_case<bf16>(gqa(T, 128), Path::kFlash, AttentionKernel::kTensorCore);
}

// The tensor-core kernel against the fp32 fused kernel and the simple path on the same bf16-valued inputs.
TEST(AttentionFlashCuda, TensorCoreMatchesFmaAndSimple) {
  SKIP_WITHOUT_GPU();
  for (const Case& c : {gqa(130, 128), with_dropout(with_alibi(with_window(mha(150, 64), 50)), 0.1f)}) {
    SCOPED_TRACE(describe(c));
    const Problem pb = make_problem<bf16>(c, 99);
    const GpuResult tc = run_gpu<bf16>(pb, Path::kFlash, AttentionKernel::kTensorCore);
    const GpuResult fma = run_gpu<float>(pb, Path::kFlash, AttentionKernel::kFma);
    const GpuResult simple = run_gpu<float>(pb, Path::kSimple);
    for (const GpuResult* other : {&fma, &simple}) {
      const std::string name = other == &fma ? "tensor core vs fp32 flash " : "tensor core vs simple ";
      expect_relative_error(name + "out", tc.out, other->out, 2e-2);
      expect_relative_error(name + "dq", tc.dq, other->dq, 2e-2);
      expect_relative_error(name + "dk", tc.dk, other->dk, 2e-2);
      expect_relative_error(name + "dv", tc.dv, other->dv, 2e-2);
    }
    expect_relative_error("tensor core vs fp32 flash lse", tc.stats, fma.stats, 1e-2);
  }
}

// ---- flash path, bf16 mma.sync kernels (the default for bf16) ------------------------------------------

TEST(AttentionFlashCuda, MmaMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_cases<bf16>({gqa(77, 64), with_dropout(with_alibi(with_docs(with_window(mqa(130, 128), 40))), 0.1f)},
                    Path::kFlash, AttentionKernel::kMma);
}

TEST(AttentionFlashCuda, MmaFeatureSweepLarge) {
  SKIP_WITHOUT_GPU();
  check_cases<bf16>(feature_sweep(64), Path::kFlash, AttentionKernel::kMma);
  check_cases<bf16>(feature_sweep(128), Path::kFlash, AttentionKernel::kMma);
  for (int T : {1, 63, 64, 65, 200, 300}) check_case<bf16>(gqa(T, 128), Path::kFlash, AttentionKernel::kMma);
}

// kAuto picks the mma.sync kernels for bf16: the same bits as asking for them.
TEST(AttentionFlashCuda, AutoIsMmaForBf16) {
  SKIP_WITHOUT_GPU();
  const Problem pb = make_problem<bf16>(gqa(100, 64), 5);
  const GpuResult automatic = run_gpu<bf16>(pb, Path::kFlash, AttentionKernel::kAuto);
  const GpuResult mma = run_gpu<bf16>(pb, Path::kFlash, AttentionKernel::kMma);
  EXPECT_EQ(0, std::memcmp(automatic.out.data(), mma.out.data(), mma.out.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(automatic.dq.data(), mma.dq.data(), mma.dq.size() * sizeof(float)));
}

// The forward's occupancy variants (compact shared-memory layout, fewer registers; see fwd_mma_kernel) do
// the same arithmetic as the default, so they must give the same bits on every feature.
template <int D, int kMinBlocks>
void expect_forward_variant_equal(const Case& c) {
  namespace fd = llm::cuda::attention_flash_detail;
  SCOPED_TRACE(describe(c) + " min blocks " + std::to_string(kMinBlocks));
  const Problem pb = make_problem<bf16>(c, 77);
  DeviceProblem<bf16> d(pb, AttentionKernel::kMma);
  auto &q = d.q, &k = d.k, &v = d.v, &out = d.out;
  const llm::cuda::AttentionParams p = llm::cuda::make_attention_params(d.shape, d.opt);
  DeviceBuffer<float> lse(llm::cuda::attention_flash_stats_elems(d.shape));
  auto run = [&](auto launch) {
    out.poison();
    lse.poison();
    launch();
    CUDA_CHECK(cudaDeviceSynchronize());
    return std::make_pair(llm::test::to_floats(out.download()), lse.download());
  };
  const auto want = run([&] {
    if (c.dropout > 0.0f) {
      fd::forward_mma_launch<D, true, 1>(p, out.get(), lse.get(), q.get(), k.get(), v.get(), nullptr);
    } else {
      fd::forward_mma_launch<D, false, 1>(p, out.get(), lse.get(), q.get(), k.get(), v.get(), nullptr);
    }
  });
  const auto got = run([&] {
    if (c.dropout > 0.0f) {
      fd::forward_mma_launch<D, true, kMinBlocks>(p, out.get(), lse.get(), q.get(), k.get(), v.get(),
                                                  nullptr);
    } else {
      fd::forward_mma_launch<D, false, kMinBlocks>(p, out.get(), lse.get(), q.get(), k.get(), v.get(),
                                                   nullptr);
    }
  });
  expect_relative_error("variant out vs the CPU", got.first, pb.out, 2e-2);
  EXPECT_EQ(0, std::memcmp(got.first.data(), want.first.data(), want.first.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(got.second.data(), want.second.data(), want.second.size() * sizeof(float)));
}

TEST(AttentionFlashCuda, MmaForwardVariantsEqualTheDefault) {
  SKIP_WITHOUT_GPU();
  for (const Case& c : feature_sweep(64)) expect_forward_variant_equal<64, 3>(c);
  for (const Case& c : feature_sweep(128)) {
    expect_forward_variant_equal<128, 2>(c);
    expect_forward_variant_equal<128, 3>(c);
  }
  expect_forward_variant_equal<128, 3>(gqa(300, 128));
}

// The dQ kernel's occupancy variants (64- or 32-key tiles, launch bounds) against the default backward,
// bit for bit; dK and dV come from the same kernel in both runs.
template <int D, int kKeys, int kMinBlocks>
void expect_backward_variant_equal(const Case& c) {
  namespace fd = llm::cuda::attention_flash_detail;
  SCOPED_TRACE(describe(c) + " dq keys " + std::to_string(kKeys) + " min blocks " +
               std::to_string(kMinBlocks));
  const Problem pb = make_problem<bf16>(c, 78);
  const GpuResult want = run_gpu<bf16>(pb, Path::kFlash, AttentionKernel::kMma);
  DeviceProblem<bf16> d(pb, AttentionKernel::kMma);
  auto &q = d.q, &k = d.k, &v = d.v, &out = d.out, &dout = d.dout, &dq = d.dq, &dk = d.dk, &dv = d.dv;
  const llm::cuda::AttentionShape& shape = d.shape;
  const llm::cuda::AttentionOptions& opt = d.opt;
  const llm::cuda::AttentionParams p = llm::cuda::make_attention_params(shape, opt);
  DeviceBuffer<float> lse(llm::cuda::attention_flash_stats_elems(shape)),
      delta(llm::cuda::attention_flash_stats_elems(shape));
  llm::cuda::attention_flash_forward<bf16>(out.get(), lse.get(), q.get(), k.get(), v.get(), shape, opt,
                                           nullptr);
  fd::delta_pass<bf16>(p, delta.get(), dout.get(), out.get(), nullptr);
  if (c.dropout > 0.0f) {
    fd::backward_mma_launch<D, true, kKeys, kMinBlocks>(p, dq.get(), dk.get(), dv.get(), delta.get(),
                                                        dout.get(), q.get(), k.get(), v.get(), lse.get(),
                                                        nullptr);
  } else {
    fd::backward_mma_launch<D, false, kKeys, kMinBlocks>(p, dq.get(), dk.get(), dv.get(), delta.get(),
                                                         dout.get(), q.get(), k.get(), v.get(), lse.get(),
                                                         nullptr);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got_dq = llm::test::to_floats(dq.download());
  expect_gradient("variant dq vs the CPU", got_dq, pb.dq, 2e-2);
  EXPECT_EQ(0, std::memcmp(got_dq.data(), want.dq.data(), want.dq.size() * sizeof(float)));
  const std::vector<float> got_dk = llm::test::to_floats(dk.download()),
                           got_dv = llm::test::to_floats(dv.download());
  EXPECT_EQ(0, std::memcmp(got_dk.data(), want.dk.data(), want.dk.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(got_dv.data(), want.dv.data(), want.dv.size() * sizeof(float)));
}

TEST(AttentionFlashCuda, MmaBackwardVariantsEqualTheDefault) {
  SKIP_WITHOUT_GPU();
  for (const Case& c : feature_sweep(64)) expect_backward_variant_equal<64, 32, 4>(c);
  for (const Case& c : feature_sweep(128)) {  // the default for D = 128 is 32 keys, 3 blocks
    expect_backward_variant_equal<128, 64, 1>(c);
    expect_backward_variant_equal<128, 32, 2>(c);
    expect_backward_variant_equal<128, 32, 3>(c);
  }
  expect_backward_variant_equal<128, 32, 3>(gqa(300, 128));
}

// The fast kernels against the readable WMMA kernels and the fp32 fused kernels on the same bf16 inputs,
// long enough (T = 520, 9 tiles) for interior tiles, double buffering and, with GQA, the head loop.
TEST(AttentionFlashCuda, MmaMatchesWmmaAndFma) {
  SKIP_WITHOUT_GPU();
  for (const Case& c : {gqa(520, 128), with_alibi(with_window(mha(300, 64), 130)), with_docs(mqa(260, 64)),
                        with_dropout(gqa(200, 128), 0.1f)}) {
    SCOPED_TRACE(describe(c));
    const Problem pb = make_problem<bf16>(c, 123);
    const GpuResult mma = run_gpu<bf16>(pb, Path::kFlash, AttentionKernel::kMma);
    const GpuResult wmma = run_gpu<bf16>(pb, Path::kFlash, AttentionKernel::kTensorCore);
    const GpuResult fma = run_gpu<float>(pb, Path::kFlash, AttentionKernel::kFma);
    for (const GpuResult* other : {&wmma, &fma}) {
      const std::string name = other == &wmma ? "mma vs wmma " : "mma vs fp32 flash ";
      expect_relative_error(name + "out", mma.out, other->out, 2e-2);
      expect_relative_error(name + "dq", mma.dq, other->dq, 2e-2);
      expect_relative_error(name + "dk", mma.dk, other->dk, 2e-2);
      expect_relative_error(name + "dv", mma.dv, other->dv, 2e-2);
    }
    expect_relative_error("mma vs fp32 flash lse", mma.stats, fma.stats, 1e-2);
  }
}

// ---- determinism and argument checks ----------------------------------------------------------------------

template <typename T>
void expect_bitwise_repeatable(const Case& c, Path path, AttentionKernel kernel) {
  SCOPED_TRACE(describe(c));
  const Problem pb = make_problem<T>(c);
  const GpuResult a = run_gpu<T>(pb, path, kernel), b = run_gpu<T>(pb, path, kernel);
  auto same = [](const std::vector<float>& x, const std::vector<float>& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
  };
  EXPECT_TRUE(same(a.out, b.out)) << "out differs between runs";
  EXPECT_TRUE(same(a.stats, b.stats)) << "lse/probs differ between runs";
  EXPECT_TRUE(same(a.dq, b.dq)) << "dq differs between runs";
  EXPECT_TRUE(same(a.dk, b.dk)) << "dk differs between runs";
  EXPECT_TRUE(same(a.dv, b.dv)) << "dv differs between runs";
}

TEST(AttentionFlashCuda, DeterministicRuns) {
  SKIP_WITHOUT_GPU();
  const Case c = with_dropout(with_alibi(gqa(150, 128)), 0.1f);
  expect_bitwise_repeatable<float>(c, Path::kFlash, AttentionKernel::kFma);
  expect_bitwise_repeatable<bf16>(c, Path::kFlash, AttentionKernel::kTensorCore);
  expect_bitwise_repeatable<bf16>(c, Path::kFlash, AttentionKernel::kMma);
  expect_bitwise_repeatable<bf16>(c, Path::kFlash, AttentionKernel::kFma);
}

TEST(AttentionSimpleCuda, DeterministicRuns) {
  SKIP_WITHOUT_GPU();
  expect_bitwise_repeatable<float>(with_dropout(gqa(37, 16), 0.1f), Path::kSimple, AttentionKernel::kAuto);
}

// Host-side validation only: every call below throws before touching the GPU, so this runs everywhere.
TEST(AttentionFlashCuda, RejectsBadArguments) {
  const llm::cuda::AttentionOptions opt;
  float* f = nullptr;
  bf16* h = nullptr;
  float* stats = nullptr;
  auto fwd_f = [&](llm::cuda::AttentionShape s, llm::cuda::AttentionOptions o) {
    llm::cuda::attention_flash_forward<float>(f, stats, f, f, f, s, o, nullptr);
  };
  EXPECT_THROW(fwd_f({1, 8, 2, 2, 48}, opt), std::invalid_argument);  // unsupported head size
  EXPECT_THROW(fwd_f({1, 8, 6, 4, 64}, opt), std::invalid_argument);  // Hq % Hkv != 0
  EXPECT_THROW(fwd_f({1, 0, 2, 2, 64}, opt), std::invalid_argument);  // empty
  llm::cuda::AttentionOptions bad = opt;
  bad.dropout = 1.0f;
  EXPECT_THROW(fwd_f({1, 8, 2, 2, 64}, bad), std::invalid_argument);  // dropout must be < 1
  bad = opt;
  bad.kernel = AttentionKernel::kTensorCore;
  EXPECT_THROW(fwd_f({1, 8, 2, 2, 64}, bad), std::invalid_argument);  // tensor cores need bf16
  bad.kernel = AttentionKernel::kMma;
  EXPECT_THROW(fwd_f({1, 8, 2, 2, 64}, bad), std::invalid_argument);  // so do the mma.sync kernels
  bad.kernel = AttentionKernel::kTensorCore;
  EXPECT_THROW(llm::cuda::attention_flash_forward<bf16>(h, stats, h, h, h, {1, 8, 2, 2, 32}, bad, nullptr),
               std::invalid_argument);  // ... and D in {64, 128}
  EXPECT_THROW(llm::cuda::attention_simple_forward<float>(f, stats, f, f, f, {1, 8, 3, 2, 5}, opt, nullptr),
               std::invalid_argument);
}

// Host-side check of the tile bookkeeping the fused kernels rely on (no GPU needed): a skipped key tile
// (forward, dQ) or query tile (dK/dV) never holds a visible pair, and a tile flagged fully visible has no
// masked pair. Visibility comes from the CPU reference.
TEST(AttentionFlashCuda, TileRangesCoverEveryVisiblePair) {
  namespace fd = llm::cuda::attention_flash_detail;
  for (int T : {1, 31, 32, 33, 64, 77, 150, 200}) {
    for (bool causal : {true, false}) {
      for (int window : {0, 1, 5, 20, 32, 64, 70, 1000}) {
        for (int tile : {32, 64}) {
          const llm::ref::AttentionShape rs{1, T, 1, 1, 64};
          llm::ref::AttentionOptions ro;
          ro.causal = causal;
          ro.sliding_window = window;
          llm::cuda::AttentionOptions co;
          co.causal = causal;
          co.sliding_window = window;
          const llm::cuda::AttentionParams p = llm::cuda::make_attention_params({1, T, 1, 1, 64}, co);
          const int tiles = (T + tile - 1) / tile;
          for (int qt = 0; qt < tiles; ++qt) {
            for (int kt = 0; kt < tiles; ++kt) {
              const int q0 = qt * tile, k0 = kt * tile;
              bool any = false, all = true;
              for (int i = q0; i < q0 + tile; ++i) {
                for (int j = k0; j < k0 + tile; ++j) {
                  const bool vis = i < T && j < T && llm::ref::attention_visible(0, i, j, rs, ro);
                  any = any || vis;
                  all = all && vis;
                }
              }
              int kb, ke, qb, qe;
              fd::key_tile_range(p, q0, std::min(q0 + tile, T) - 1, tile, &kb, &ke);
              fd::query_tile_range(p, k0, std::min(k0 + tile, T) - 1, tile, &qb, &qe);
              SCOPED_TRACE("T=" + std::to_string(T) + " causal=" + std::to_string(causal) +
                           " window=" + std::to_string(window) + " tile=" + std::to_string(tile) +
                           " qt=" + std::to_string(qt) + " kt=" + std::to_string(kt));
              if (any) {
                EXPECT_TRUE(kb <= kt && kt < ke) << "key tile skipped although visible";
                EXPECT_TRUE(qb <= qt && qt < qe) << "query tile skipped although visible";
              }
              if (fd::tile_fully_visible(p, q0, tile, k0, tile))
                EXPECT_TRUE(all) << "tile wrongly marked full";
              EXPECT_GE(kb, 0);
              EXPECT_LE(ke, tiles);
              EXPECT_GE(qb, 0);
              EXPECT_LE(qe, tiles);
            }
          }
        }
      }
    }
  }
}

}  // namespace
