// CUDA NF4 (kernels/nf4.cuh) against the CPU reference (kernels/cpu/nf4.h), which matches bitsandbytes.
// Checked: the kernels' code tables equal the reference's bit for bit (runs without a GPU); quantisation
// from fp32 and bf16 weights gives the reference's packed codes and absmax bit for bit, at sizes that are
// not multiples of 64 (partial last block, odd n with its pad nibble), blocksizes 64, 128 and 32, and on
// hand-made blocks for the corner cases (an all-zero block, values exactly on the midpoints between codes
// (the tie rule), subnormals above and below the 1e-38 absmax floor, inf and NaN weights (the clamp's NaN
// rule)); every byte is checked to be written by running on buffers poisoned with 0x00 and with 0xFF;
// dequantisation to fp32 bit for bit and to bf16 as the reference's value rounded once, in the clear and fast
// variants and with an unaligned output; double dequantisation of absmax bit for bit, over all 256 codes; the
// frozen NF4 linear layer's forward (with and without bias) and input gradient (= and +=) against the
// reference in double, at odd sizes, relative error < 1e-5 in fp32 and < 2e-2 in bf16.
#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cpu/nf4.h"
#include "kernels/nf4.cuh"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/kernel_test_helpers.h"

namespace {

using llm::cuda::KernelVariant;
using namespace llm::test;
using bf16 = __nv_bfloat16;

std::vector<double> to_doubles(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}
std::vector<float> to_floats_from(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

// Weights like a layer's (normal, a few outliers), with hand-made blocks of `blocksize` for the corner
// cases when n leaves room for them:
//   block 1  all zeros (absmax floored at 1e-38; every code 7);
//   block 2  absmax exactly 1 and the other values exactly on the 15 midpoints, and one float above and
//            below each: s = w exactly, so the tie rule (a midpoint goes to the lower code) decides;
//   block 3  tiny values, normal and subnormal (absmax about 2e-35);
//   block 4  subnormals only: absmax below the 1e-38 floor;
//   block 5  (with non_finite) an inf, a NaN and ordinary values: absmax = inf, inv = 0, and the NaN
//            products go through the clamp (fmax/fmin return the number, so they get code 0).
std::vector<float> nf4_weights(size_t n, int blocksize, uint32_t seed, bool non_finite = false) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> w(n);
  for (float& v : w) v = normal(gen);
  for (size_t j = 97; j < n; j += 1013) w[j] *= 25.0f;  // outliers
  const size_t bs = static_cast<size_t>(blocksize);
  if (n >= 2 * bs) {
    for (size_t j = bs; j < 2 * bs; ++j) w[j] = 0.0f;
  }
  if (n >= 3 * bs) {
    std::vector<float> special = {1.0f};
    for (int i = 0; i < 15; ++i) {
      const float mid = (llm::ref::kNf4Code[i] + llm::ref::kNf4Code[i + 1]) / 2.0f;
      special.push_back(mid);
      special.push_back(std::nextafter(mid, 2.0f));
      special.push_back(std::nextafter(mid, -2.0f));
    }
    for (size_t k = 0; k < bs; ++k)
      w[2 * bs + k] = k < special.size() ? special[k] : -special[k % special.size()];
  }
  if (n >= 4 * bs) {
    for (size_t k = 0; k < bs; ++k) {
      const int e = -140 + static_cast<int>(k % 20);
      w[3 * bs + k] = (k % 3 == 0 ? 1.0f : -1.0f) * std::ldexp(static_cast<float>(k + 1), e);
    }
  }
  if (n >= 5 * bs) {
    for (size_t k = 0; k < bs; ++k) {
      w[4 * bs + k] = (k % 2 == 0 ? 1.0f : -1.0f) * std::ldexp(static_cast<float>(k + 1), -149);
    }
  }
  if (non_finite && n >= 6 * bs) {
    w[5 * bs + 1] = INFINITY;
    w[5 * bs + 2] = NAN;
    w[5 * bs + 3] = -INFINITY;
  }
  return w;
}

// Runs nf4_quantize on w (rounded to T) twice, on buffers poisoned with 0x00 and with 0xFF, and checks
// both against the reference bit for bit: a byte the kernel forgot would differ in one of the two.
template <typename T>
void check_quantize(size_t n, int blocksize, uint32_t seed) {
  const std::vector<float> w = round_to<T>(nf4_weights(n, blocksize, seed, true));
  const size_t nbytes = llm::cuda::nf4_packed_bytes(n), nblocks = llm::cuda::nf4_blocks(n, blocksize);
  std::vector<uint8_t> want_packed(nbytes);
  std::vector<float> want_absmax(nblocks);
  llm::ref::nf4_quantize(want_packed.data(), want_absmax.data(), w.data(), n, blocksize);

  DeviceBuffer<T> dw(n);
  upload_floats(dw, w);
  DeviceBuffer<uint8_t> packed(nbytes);
  DeviceBuffer<float> absmax(nblocks);
  const std::string what =
      std::string(type_name<T>()) + " n=" + std::to_string(n) + " blocksize=" + std::to_string(blocksize);
  for (int poison : {0x00, 0xFF}) {
    CUDA_CHECK(cudaMemset(packed.get(), poison, nbytes));
    absmax.poison();
    llm::cuda::nf4_quantize<T>(packed.get(), absmax.get(), dw.get(), n, blocksize, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<uint8_t> got_packed = packed.download();
    const std::vector<float> got_absmax = absmax.download();
    size_t first_bad = nbytes;
    for (size_t k = 0; k < nbytes && first_bad == nbytes; ++k) {
      if (got_packed[k] != want_packed[k]) first_bad = k;
    }
    EXPECT_EQ(first_bad, nbytes) << what << " poison " << poison << ": packed byte " << first_bad << " is "
                                 << (first_bad < nbytes ? static_cast<int>(got_packed[first_bad]) : -1)
                                 << ", want "
                                 << (first_bad < nbytes ? static_cast<int>(want_packed[first_bad]) : -1);
    EXPECT_TRUE(bitwise_equal(got_absmax, want_absmax)) << what << ": absmax differs from the reference";
  }
}

// Dequantises the reference's codes on the GPU: fp32 bit for bit, bf16 the reference's fp32 value rounded
// once. offset shifts the output pointer (offset 1: not 16-byte aligned, so kAuto takes the clear path).
template <typename T>
void check_dequantize(size_t n, int blocksize, KernelVariant variant, size_t offset, uint32_t seed) {
  const std::vector<float> w = nf4_weights(n, blocksize, seed);
  const size_t nbytes = llm::cuda::nf4_packed_bytes(n), nblocks = llm::cuda::nf4_blocks(n, blocksize);
  std::vector<uint8_t> packed(nbytes);
  std::vector<float> absmax(nblocks), want(n);
  llm::ref::nf4_quantize(packed.data(), absmax.data(), w.data(), n, blocksize);
  llm::ref::nf4_dequantize(want.data(), packed.data(), absmax.data(), n, blocksize);

  DeviceBuffer<uint8_t> dpacked(nbytes);
  DeviceBuffer<float> dabsmax(nblocks);
  DeviceBuffer<T> out(n + offset);
  dpacked.upload(packed);
  dabsmax.upload(absmax);
  out.poison();
  llm::cuda::nf4_dequantize<T>(out.get() + offset, dpacked.get(), dabsmax.get(), n, blocksize, nullptr,
                               variant);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<T> all = out.download();
  const std::vector<T> got(all.begin() + static_cast<std::ptrdiff_t>(offset), all.end());
  const std::string what = std::string(type_name<T>()) + " n=" + std::to_string(n) +
                           " blocksize=" + std::to_string(blocksize) +
                           (variant == KernelVariant::kFast    ? " fast"
                            : variant == KernelVariant::kClear ? " clear"
                                                               : " auto") +
                           " offset=" + std::to_string(offset);
  expect_all_finite(what, to_floats(got));
  EXPECT_TRUE(bitwise_equal(got, from_floats<T>(want))) << what << ": differs from the reference";
}

struct TypeNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "fp32" : "bf16";
  }
};
template <typename T>
class CudaNf4 : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, bf16>;
TYPED_TEST_SUITE(CudaNf4, StorageTypes, TypeNames);

// Runs without a GPU: the kernels' copies of the tables are the reference's, bit for bit.
TEST(CudaNf4Tables, ConstantsEqualTheReference) {
  EXPECT_EQ(llm::cuda::kNf4BlockSize, llm::ref::kNf4BlockSize);
  EXPECT_EQ(llm::cuda::kNf4NestedBlockSize, llm::ref::kNf4NestedBlockSize);
  EXPECT_EQ(llm::cuda::kNf4ZeroCode, llm::ref::kNf4ZeroCode);
  EXPECT_EQ(std::memcmp(llm::cuda::nf4_code_table(), llm::ref::kNf4Code, sizeof(llm::ref::kNf4Code)), 0);
  EXPECT_EQ(std::memcmp(llm::cuda::nf4_dynamic_map_table(), llm::ref::kDynamicMapSigned,
                        sizeof(llm::ref::kDynamicMapSigned)),
            0);
}

// Runs without a GPU: bad arguments are refused before any device work.
TEST(CudaNf4Arguments, BadBlocksizesThrow) {
  EXPECT_THROW(llm::cuda::nf4_quantize<float>(nullptr, nullptr, nullptr, 100, 63, nullptr),
               std::invalid_argument);
  EXPECT_THROW(llm::cuda::nf4_quantize<float>(nullptr, nullptr, nullptr, 100, 0, nullptr),
               std::invalid_argument);
  EXPECT_THROW(llm::cuda::nf4_dequantize<float>(nullptr, nullptr, nullptr, 100, 0, nullptr),
               std::invalid_argument);
  EXPECT_THROW(llm::cuda::nf4_double_dequantize(nullptr, nullptr, nullptr, 0.0f, 10, 0, nullptr),
               std::invalid_argument);
}

TYPED_TEST(CudaNf4, QuantizeMatchesReferenceBitForBit) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  for (size_t n : {size_t{1}, size_t{2}, size_t{63}, size_t{64}, size_t{65}, size_t{1001},
                   size_t{64 * 300 + 37}, size_t{77 * 301}}) {
    check_quantize<T>(n, 64, 100 + static_cast<uint32_t>(n));
  }
  check_quantize<T>(128 * 40 + 5, 128, 7);
  check_quantize<T>(32 * 50 + 31, 32, 8);
}

TYPED_TEST(CudaNf4, DequantizeMatchesReferenceBitForBit) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  for (size_t n : {size_t{1}, size_t{7}, size_t{64}, size_t{1001}, size_t{64 * 300 + 37}, size_t{77 * 301}}) {
    for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kFast, KernelVariant::kAuto}) {
      check_dequantize<T>(n, 64, variant, 0, 200 + static_cast<uint32_t>(n));
    }
    check_dequantize<T>(n, 64, KernelVariant::kAuto, 1, 300 + static_cast<uint32_t>(n));  // unaligned: clear
  }
  check_dequantize<T>(128 * 40 + 5, 128, KernelVariant::kFast, 0, 9);
  check_dequantize<T>(100 * 3 + 1, 100, KernelVariant::kAuto, 0, 10);  // blocksize % 8 != 0: clear
}

TEST(CudaNf4, FastVariantRefusesUnalignedOutput) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<uint8_t> packed(64);
  DeviceBuffer<float> absmax(2), out(129);
  EXPECT_THROW(llm::cuda::nf4_dequantize<float>(out.get() + 1, packed.get(), absmax.get(), 128, 64, nullptr,
                                                KernelVariant::kFast),
               std::invalid_argument);
}

TEST(CudaNf4, DoubleDequantizeMatchesReferenceBitForBit) {
  SKIP_WITHOUT_GPU();
  // The absmax of a real quantisation (1001 blocks: the last block of 256 is partial), double-quantised
  // on the CPU, then a synthetic set that uses every one of the 256 codes.
  const size_t n = 64 * 1000 + 13;
  const std::vector<float> w = nf4_weights(n, 64, 11);
  const size_t nblocks = llm::cuda::nf4_blocks(n, 64);
  std::vector<uint8_t> packed(llm::cuda::nf4_packed_bytes(n));
  std::vector<float> absmax(nblocks);
  llm::ref::nf4_quantize(packed.data(), absmax.data(), w.data(), n);
  std::vector<uint8_t> qabsmax(nblocks);
  std::vector<float> state2(llm::ref::blocks_for(nblocks, 256));
  float offset = 0.0f;
  llm::ref::nf4_double_quantize(qabsmax.data(), state2.data(), &offset, absmax.data(), nblocks);

  auto check = [](const std::vector<uint8_t>& q, const std::vector<float>& s2, float off, int bs2,
                  const std::string& what) {
    std::vector<float> want(q.size());
    llm::ref::nf4_double_dequantize(want.data(), q.data(), s2.data(), off, q.size(), bs2);
    DeviceBuffer<uint8_t> dq(q.size());
    DeviceBuffer<float> ds2(s2.size()), out(q.size());
    dq.upload(q);
    ds2.upload(s2);
    out.poison();
    llm::cuda::nf4_double_dequantize(out.get(), dq.get(), ds2.get(), off, q.size(), bs2, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> got = out.download();
    expect_all_finite(what, got);
    EXPECT_TRUE(bitwise_equal(got, want)) << what << ": differs from the reference";
  };
  check(qabsmax, state2, offset, 256, "quantised absmax");

  std::vector<uint8_t> all_codes(256 * 3 + 17);
  for (size_t b = 0; b < all_codes.size(); ++b) all_codes[b] = static_cast<uint8_t>((b * 7) % 256);
  const std::vector<float> scales = {0.0123f, 0.5f, 3.75f, 1e-3f};
  check(all_codes, scales, 0.0371f, 256, "all codes");
}

// The frozen NF4 linear layer against the reference in double, on the same rounded inputs.
template <typename T>
void check_linear(int N, int I, int O, bool with_bias, bool accumulate_dx, uint32_t seed) {
  const size_t nw = static_cast<size_t>(O) * I;
  const std::vector<float> w = nf4_weights(nw, 64, seed);
  std::vector<uint8_t> packed(llm::cuda::nf4_packed_bytes(nw));
  std::vector<float> absmax(llm::cuda::nf4_blocks(nw, 64));
  llm::ref::nf4_quantize(packed.data(), absmax.data(), w.data(), nw);
  // Inputs of order 1 against weights of order 0.02: scale x up so the outputs are of order 1 too.
  const std::vector<float> x =
      round_to<T>(random_floats(static_cast<size_t>(N) * I, seed + 1, -20.0f, 20.0f));
  const std::vector<float> bias = round_to<T>(random_floats(O, seed + 2));
  const std::vector<float> dout =
      round_to<T>(random_floats(static_cast<size_t>(N) * O, seed + 3, -20.0f, 20.0f));
  const std::vector<float> dx0 = round_to<T>(random_floats(static_cast<size_t>(N) * I, seed + 4));

  const std::vector<double> xd = to_doubles(x), bd = to_doubles(bias), gd = to_doubles(dout);
  std::vector<double> want_out(static_cast<size_t>(N) * O), want_dx = to_doubles(dx0);
  llm::ref::nf4_linear_forward<double>(want_out.data(), xd.data(), packed.data(), absmax.data(),
                                       with_bias ? bd.data() : nullptr, N, I, O);
  llm::ref::nf4_linear_backward_input<double>(want_dx.data(), gd.data(), packed.data(), absmax.data(), N, I,
                                              O, 64, accumulate_dx);

  DeviceBuffer<uint8_t> dpacked(packed.size());
  DeviceBuffer<float> dabsmax(absmax.size());
  DeviceBuffer<T> dx_in(x.size()), dbias(bias.size()), ddout(dout.size()), out(static_cast<size_t>(N) * O),
      dx(x.size()), scratch(llm::cuda::nf4_linear_scratch_elements(I, O));
  dpacked.upload(packed);
  dabsmax.upload(absmax);
  upload_floats(dx_in, x);
  upload_floats(dbias, bias);
  upload_floats(ddout, dout);
  out.poison();
  scratch.poison();
  if (accumulate_dx) {
    upload_floats(dx, dx0);
  } else {
    dx.poison();
  }
  llm::cuda::nf4_linear_forward<T>(out.get(), scratch.get(), dx_in.get(), dpacked.get(), dabsmax.get(),
                                   with_bias ? dbias.get() : nullptr, N, I, O, 64, nullptr);
  scratch.poison();
  llm::cuda::nf4_linear_backward_input<T>(dx.get(), scratch.get(), ddout.get(), dpacked.get(), dabsmax.get(),
                                          N, I, O, 64, accumulate_dx, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::string what = std::string(type_name<T>()) + " N=" + std::to_string(N) +
                           " I=" + std::to_string(I) + " O=" + std::to_string(O) +
                           (with_bias ? " bias" : "") + (accumulate_dx ? " dx +=" : " dx =");
  expect_relative_error(what + " out", download_floats(out), to_floats_from(want_out), tolerance<T>());
  expect_relative_error(what + " dx", download_floats(dx), to_floats_from(want_dx), tolerance<T>());
}

TYPED_TEST(CudaNf4, LinearForwardAndInputGradientMatchReference) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  // 77 x 200 = 15400 weights (blocks span rows, the last one partial); 33 x 101 = 3333 (odd: a pad nibble).
  for (bool with_bias : {false, true}) {
    for (bool accumulate_dx : {false, true}) {
      check_linear<T>(37, 200, 77, with_bias, accumulate_dx, 400);
      check_linear<T>(19, 101, 33, with_bias, accumulate_dx, 500);
    }
  }
}

// Quantise on the GPU, dequantise on the GPU: the round trip stays within the NF4 error bound
// |w - w'| <= absmax * (largest half-gap of the code table).
TYPED_TEST(CudaNf4, RoundTripWithinErrorBound) {
  SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const size_t n = 64 * 513 + 21;
  const std::vector<float> w = round_to<T>(nf4_weights(n, 64, 12));
  DeviceBuffer<T> dw(n);
  upload_floats(dw, w);
  DeviceBuffer<uint8_t> packed(llm::cuda::nf4_packed_bytes(n));
  DeviceBuffer<float> absmax(llm::cuda::nf4_blocks(n, 64)), back(n);
  back.poison();
  llm::cuda::nf4_quantize<T>(packed.get(), absmax.get(), dw.get(), n, 64, nullptr);
  llm::cuda::nf4_dequantize<float>(back.get(), packed.get(), absmax.get(), n, 64, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = back.download(), am = absmax.download();
  const float gap = llm::ref::nf4_max_half_gap();
  for (size_t j = 0; j < n; ++j) {
    ASSERT_TRUE(std::isfinite(got[j])) << "element " << j << " not written";
    const float bound = am[j / 64] * gap * (1.0f + 1e-5f) + 1e-30f;
    ASSERT_LE(std::fabs(got[j] - w[j]), bound) << "element " << j;
  }
}

}  // namespace
