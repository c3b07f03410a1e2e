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

}  // namespace
