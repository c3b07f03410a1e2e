// Philox4x32-10 against the published known-answer vectors of Random123 (kat_vectors).
#include <gtest/gtest.h>

#include "kernels/philox.h"

namespace {

TEST(Philox, KnownAnswerZero) {
  const llm::Philox4 out = llm::philox4x32_10({{0u, 0u, 0u, 0u}}, 0u, 0u);
  EXPECT_EQ(out.v[0], 0x6627e8d5u);
  EXPECT_EQ(out.v[1], 0xe169c58du);
  EXPECT_EQ(out.v[2], 0xbc57ac4cu);
  EXPECT_EQ(out.v[3], 0x9b00dbd8u);
}

TEST(Philox, KnownAnswerOnes) {
  const llm::Philox4 out =
      llm::philox4x32_10({{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu, 0xffffffffu);
  EXPECT_EQ(out.v[0], 0x408f276du);
  EXPECT_EQ(out.v[1], 0x41c83b0eu);
  EXPECT_EQ(out.v[2], 0xa20bc7c6u);
  EXPECT_EQ(out.v[3], 0x6d5451fdu);
}

TEST(Philox, KnownAnswerPi) {
  const llm::Philox4 out =
      llm::philox4x32_10({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u);
  EXPECT_EQ(out.v[0], 0xd16cfe09u);
  EXPECT_EQ(out.v[1], 0x94fdccebu);
  EXPECT_EQ(out.v[2], 0x5001e420u);
  EXPECT_EQ(out.v[3], 0x24126ea1u);
}

TEST(Philox, UniformIsInRangeAndRoughlyUniform) {
  double sum = 0.0;
  const int n = 100000;
  for (int i = 0; i < n; ++i) {
    const float u = llm::philox_uniform(1234, 7, static_cast<uint64_t>(i));
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    sum += u;
  }
  EXPECT_NEAR(sum / n, 0.5, 0.005);
  EXPECT_NE(llm::philox_uniform(1, 0, 0), llm::philox_uniform(1, 1, 0));
  EXPECT_NE(llm::philox_uniform(1, 0, 0), llm::philox_uniform(2, 0, 0));
}

// The packed mask stream: lane k of block b is 16-bit half (k % 2) of word k / 2 of philox_at(b), low half
// first, scaled by 2^-16. Checked against the raw generator rather than against itself.
TEST(Philox, MaskUniformUnpacksOneBlockIntoEightLanes) {
  const uint64_t seed = 0x0123456789ABCDEFull, stream = 0xFEDCBA9876543210ull;
  // The generator at counter (position, stream), the counter and key written out by hand.
  const auto raw_at = [&](uint64_t position) {
    llm::Philox4 counter;
    counter.v[0] = static_cast<uint32_t>(position);
    counter.v[1] = static_cast<uint32_t>(position >> 32);
    counter.v[2] = static_cast<uint32_t>(stream);
    counter.v[3] = static_cast<uint32_t>(stream >> 32);
    return llm::philox4x32_10(counter, 0x89ABCDEFu, 0x01234567u);
  };
  for (uint64_t block : {0ull, 1ull, 12345ull, 0x1'0000'0003ull}) {
    const llm::Philox4 raw = raw_at(block);
    for (int lane = 0; lane < 8; ++lane) {
      const uint32_t half = (raw.v[lane / 2] >> (16 * (lane % 2))) & 0xFFFFu;
      EXPECT_EQ(llm::philox_mask_uniform(seed, stream, block * 8 + lane), static_cast<float>(half) / 65536.0f)
          << "block " << block << " lane " << lane;
    }
  }
  // philox_uniform reads the same generator: the top 24 bits of word 0 at counter = index.
  EXPECT_EQ(llm::philox_uniform(seed, stream, 7), static_cast<float>(raw_at(7).v[0] >> 8) / 16777216.0f);
}

TEST(Philox, MaskUniformIsRoughlyUniformInEveryLane) {
  const int blocks = 40000;
  double sum[8] = {};
  int below_tenth[8] = {};
  for (int b = 0; b < blocks; ++b) {
    for (int lane = 0; lane < 8; ++lane) {
      const float u = llm::philox_mask_uniform(99, 3, static_cast<uint64_t>(b) * 8 + lane);
      ASSERT_GE(u, 0.0f);
      ASSERT_LT(u, 1.0f);
      sum[lane] += u;
      below_tenth[lane] += u < 0.1f ? 1 : 0;
    }
  }
  for (int lane = 0; lane < 8; ++lane) {
    EXPECT_NEAR(sum[lane] / blocks, 0.5, 0.005) << "lane " << lane;
    EXPECT_NEAR(static_cast<double>(below_tenth[lane]) / blocks, 0.1, 0.006) << "lane " << lane;
  }
}

}  // namespace
