// NF4 quantisation (bitsandbytes layout): the code table, nearest rounding and its tie rule, the error
// bound, nibble order, the dynamic 8-bit map, double quantisation, and the frozen NF4 linear layer.
// tests/model/test_nf4_bnb.cpp compares against a fixture written by bitsandbytes itself.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/linear.h"
#include "kernels/cpu/nf4.h"
#include "tests/gradcheck.h"

namespace {

using llm::test::random_vector;

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// The 16 float32 values of bitsandbytes' get_4bit_type("nf4"), as bit patterns.
TEST(Nf4, CodeTableExact) {
  const uint32_t expected[16] = {0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu,
                                 0xbdba7871u, 0x00000000u, 0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au,
                                 0x3ee1a4b8u, 0x3f1007abu, 0x3f3913b3u, 0x3f800000u};
  for (int i = 0; i < 16; ++i) EXPECT_EQ(bits_of(llm::ref::kNf4Code[i]), expected[i]) << i;
  for (int i = 0; i < 15; ++i) EXPECT_LT(llm::ref::kNf4Code[i], llm::ref::kNf4Code[i + 1]);
  EXPECT_EQ(llm::ref::kNf4Code[llm::ref::kNf4ZeroCode], 0.0f);
}

// Each code maps to itself; a value just above a midpoint rounds up, exactly on it rounds down.
TEST(Nf4, NearestAndTieRule) {
  using llm::ref::kNf4Code;
  for (int i = 0; i < 16; ++i) EXPECT_EQ(llm::ref::nf4_quantize_value(kNf4Code[i]), i);
  for (int i = 0; i < 15; ++i) {
    const float mid = (kNf4Code[i] + kNf4Code[i + 1]) / 2.0f;
    EXPECT_EQ(llm::ref::nf4_quantize_value(mid), i) << "tie goes to the lower code";
    EXPECT_EQ(llm::ref::nf4_quantize_value(std::nextafter(mid, 2.0f)), i + 1);
    EXPECT_EQ(llm::ref::nf4_quantize_value(std::nextafter(mid, -2.0f)), i);
  }
  EXPECT_EQ(llm::ref::nf4_quantize_value(-1.0f), 0);
  EXPECT_EQ(llm::ref::nf4_quantize_value(1.0f), 15);
}

// |x - deq(q(x))| <= absmax * (the half-gap of x's interval) <= absmax * max half-gap, with an odd length
// and a partial last block.
TEST(Nf4, RoundTripErrorBounded) {
  constexpr size_t n = 64 * 7 + 13;
  const std::vector<float> w = llm::test::to_float(random_vector(n, 21, -0.3, 0.3));
  std::vector<uint8_t> packed((n + 1) / 2);
  std::vector<float> absmax(llm::ref::blocks_for(n, 64)), back(n);
  llm::ref::nf4_quantize(packed.data(), absmax.data(), w.data(), n);
  llm::ref::nf4_dequantize(back.data(), packed.data(), absmax.data(), n);
  const float half_gap = llm::ref::nf4_max_half_gap();
  EXPECT_FLOAT_EQ(half_gap, (llm::ref::kNf4Code[1] - llm::ref::kNf4Code[0]) / 2.0f);
  for (size_t j = 0; j < n; ++j) {
    const float am = absmax[j / 64];
    const int q = llm::ref::nf4_code_at(packed.data(), j);
    // The nearest code: no other code is closer (up to fp32 rounding of the scaled value).
    const float s = w[j] / am;
    for (int c = 0; c < 16; ++c) {
      EXPECT_LE(std::fabs(s - llm::ref::kNf4Code[q]), std::fabs(s - llm::ref::kNf4Code[c]) + 1e-6f) << j;
    }
    EXPECT_LE(std::fabs(w[j] - back[j]), am * half_gap * (1.0f + 1e-6f)) << j;
  }
  // The element holding each block's absmax comes back exactly (code +-1).
  for (size_t b = 0; b < absmax.size(); ++b) {
    bool found = false;
    for (size_t j = b * 64; j < std::min(n, b * 64 + 64); ++j) found |= std::fabs(back[j]) == absmax[b];
    EXPECT_TRUE(found) << b;
  }
}

// Element 2k goes to the high nibble, 2k + 1 to the low one; an odd tail pads with the code of 0.
TEST(Nf4, NibbleOrder) {
  const std::vector<float> w = {-1.0f, 1.0f, 0.0f, 0.5626170039176941f, -0.09105003625154495f};
  std::vector<uint8_t> packed(3);
  float absmax = 0;
  llm::ref::nf4_quantize(packed.data(), &absmax, w.data(), w.size());
  EXPECT_EQ(absmax, 1.0f);
  EXPECT_EQ(packed[0], 0x0F);  // codes 0 (high), 15 (low)
  EXPECT_EQ(packed[1], 0x7D);  // codes 7, 13
  EXPECT_EQ(packed[2], 0x67);  // code 6, then the pad (7)
  EXPECT_EQ(llm::ref::nf4_code_at(packed.data(), 3), 13);
}

// An all-zero block has absmax 0 and dequantises to zeros.
TEST(Nf4, ZeroBlock) {
  std::vector<float> w(64, 0.0f), back(64, 1.0f);
  std::vector<uint8_t> packed(32);
  float absmax = 1;
  llm::ref::nf4_quantize(packed.data(), &absmax, w.data(), w.size());
  EXPECT_EQ(absmax, 0.0f);
  for (uint8_t b : packed) EXPECT_EQ(b, 0x77);
  llm::ref::nf4_dequantize(back.data(), packed.data(), &absmax, 64);
  for (float v : back) EXPECT_EQ(v, 0.0f);
}

// The tabulated dynamic map is sorted, has 0 and 1, and matches its defining formula to 2 ulp.
TEST(Nf4, DynamicMapMatchesFormula) {
  const std::vector<double> formula = llm::ref::dynamic_map_signed_formula();
  ASSERT_EQ(formula.size(), 256u);
  for (int i = 0; i < 256; ++i) {
    const double v = llm::ref::kDynamicMapSigned[i];
    EXPECT_NEAR(v, formula[i], 2.5 * std::ldexp(std::fabs(formula[i]), -23)) << i;
    if (i > 0) {
      EXPECT_LT(llm::ref::kDynamicMapSigned[i - 1], llm::ref::kDynamicMapSigned[i]) << i;
    }
  }
  EXPECT_EQ(llm::ref::kDynamicMapSigned[127], 0.0f);
  EXPECT_EQ(llm::ref::kDynamicMapSigned[255], 1.0f);
}

// Double quantisation: offset is the mean, one fp32 scale per 256 absmax values, and the round trip is
// within half a step of the dynamic map (times the block scale) of each absmax.
TEST(Nf4, DoubleQuantRoundTrip) {
  constexpr size_t nblocks = 256 * 2 + 37;  // two full nested blocks and a partial one
  const std::vector<float> absmax = llm::test::to_float(random_vector(nblocks, 31, 0.01, 0.2));
  std::vector<uint8_t> q(nblocks);
  std::vector<float> state2(llm::ref::blocks_for(nblocks, 256)), back(nblocks);
  float offset = 0;
  llm::ref::nf4_double_quantize(q.data(), state2.data(), &offset, absmax.data(), nblocks);
  double mean = 0;
  for (float a : absmax) mean += a;
  mean /= nblocks;
  EXPECT_NEAR(offset, mean, 1e-7);
  for (size_t b = 0; b < state2.size(); ++b) {
    float am = 0;
    for (size_t j = b * 256; j < std::min(nblocks, b * 256 + 256); ++j)
      am = std::fmax(am, std::fabs(absmax[j] - offset));
    EXPECT_EQ(state2[b], am);
  }
  llm::ref::nf4_double_dequantize(back.data(), q.data(), state2.data(), offset, nblocks);
  const float* dyn = llm::ref::kDynamicMapSigned;
  for (size_t j = 0; j < nblocks; ++j) {
    const float s = (absmax[j] - offset) / state2[j / 256];
    const int c = q[j];
    // Nearest entry of the map.
    if (c > 0) {
      EXPECT_LE(std::fabs(s - dyn[c]), std::fabs(s - dyn[c - 1]) + 1e-7f) << j;
    }
    if (c < 255) {
      EXPECT_LE(std::fabs(s - dyn[c]), std::fabs(s - dyn[c + 1]) + 1e-7f) << j;
    }
    // The largest gap of the map near +-1 is about 0.0141; the round trip is within half of it.
    EXPECT_LE(std::fabs(back[j] - absmax[j]), state2[j / 256] * 0.0071f + 1e-7f) << j;
  }
}

// The frozen NF4 linear layer equals linear_forward / linear_backward with the dequantised weight, and
// its input gradient passes a finite-difference check.
TEST(Nf4, LinearMatchesDequantized) {
  constexpr int N = 5, I = 96, O = 4;  // O * I = 384 = 6 blocks
  const std::vector<float> w = llm::test::to_float(random_vector(O * I, 41, -0.05, 0.05));
  const std::vector<float> x = llm::test::to_float(random_vector(N * I, 42));
  const std::vector<float> b = llm::test::to_float(random_vector(O, 43));
  std::vector<uint8_t> packed(O * I / 2);
  std::vector<float> absmax(O * I / 64), wdq(O * I);
  llm::ref::nf4_quantize(packed.data(), absmax.data(), w.data(), w.size());
  llm::ref::nf4_dequantize(wdq.data(), packed.data(), absmax.data(), w.size());

  std::vector<float> out(N * O), ref(N * O);
  llm::ref::nf4_linear_forward(out.data(), x.data(), packed.data(), absmax.data(), b.data(), N, I, O);
  llm::ref::linear_forward(ref.data(), x.data(), wdq.data(), b.data(), N, I, O);
  EXPECT_EQ(out, ref);

  const std::vector<float> dout = llm::test::to_float(random_vector(N * O, 44));
  std::vector<float> dx(N * I), dxref(N * I);
  llm::ref::nf4_linear_backward_input(dx.data(), dout.data(), packed.data(), absmax.data(), N, I, O);
  llm::ref::linear_backward(dxref.data(), static_cast<float*>(nullptr), static_cast<float*>(nullptr),
                            dout.data(), x.data(), wdq.data(), N, I, O);
  EXPECT_EQ(dx, dxref);

  // In double: dL/dx against central differences, L = sum wts * out.
  std::vector<double> xd = random_vector(N * I, 45);
  const std::vector<double> wts = random_vector(N * O, 46);
  std::vector<double> outd(N * O), dxd(N * I);
  auto loss = [&]() {
    llm::ref::nf4_linear_forward(outd.data(), xd.data(), packed.data(), absmax.data(), nullptr, N, I, O);
    return llm::test::weighted_sum(outd, wts);
  };
  llm::ref::nf4_linear_backward_input(dxd.data(), wts.data(), packed.data(), absmax.data(), N, I, O);
  llm::test::expect_gradient("dx", xd, dxd, loss);
}

}  // namespace
