// Positions: learned absolute positions, the sinusoidal table, RoPE (with linear, Llama 3 and YaRN scaling)
// and ALiBi slopes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/cpu/positions.h"
#include "tests/gradcheck.h"

namespace {

using llm::ref::RopeParams;
using llm::ref::RopeScaling;
using llm::test::expect_gradient;
using llm::test::random_vector;
using llm::test::weighted_sum;

constexpr int kN = 7;     // token rows
constexpr int kMaxT = 9;  // table rows
constexpr int kC = 13;    // channels (odd)
constexpr int kH = 3;     // heads
constexpr int kD = 10;    // head dim (even, D/2 = 5 odd)
constexpr double kPi = 3.14159265358979323846;
// Two packed documents: positions restart at 0; position 0 .. 2 occur twice.
const std::vector<int32_t> kPos = {0, 1, 2, 3, 0, 1, 2};

double dot(const double* a, const double* b, int n) {
  double s = 0.0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Learned absolute positions.

TEST(GradCheck, LearnedPosition) {
  std::vector<double> x = random_vector(kN * kC, 10);
  std::vector<double> wpe = random_vector(kMaxT * kC, 11);
  const std::vector<double> w = random_vector(kN * kC, 12);
  std::vector<double> out(kN * kC);
  auto loss = [&] {
    out = x;
    llm::ref::add_position_embedding_forward(out.data(), wpe.data(), kPos.data(), kN, kC);
    return weighted_sum(out, w);
  };

  std::vector<double> dwpe(kMaxT * kC, 0.0);
  llm::ref::add_position_embedding_backward(dwpe.data(), w.data(), kPos.data(), kN, kC);
  expect_gradient("dwpe", wpe, dwpe, loss);
  // The residual stream's gradient passes through unchanged: dL/dx = dL/dout = w.
  expect_gradient("dx", x, w, loss);

  // Accumulation (+=).
  const std::vector<double> previous = random_vector(kMaxT * kC, 13);
  std::vector<double> accumulated = previous;
  llm::ref::add_position_embedding_backward(accumulated.data(), w.data(), kPos.data(), kN, kC);
  for (int i = 0; i < kMaxT * kC; ++i) EXPECT_DOUBLE_EQ(accumulated[i], previous[i] + dwpe[i]) << i;
  // Positions 4 .. 8 never occur: their gradient rows stay as they were.
  for (int i = 4 * kC; i < kMaxT * kC; ++i) EXPECT_EQ(accumulated[i], previous[i]) << i;
}

// ---------------------------------------------------------------------------------------------------------
// Sinusoidal table.

TEST(Sinusoidal, Table) {
  constexpr int maxT = 50, C = 7;  // odd C: the last column (6) is a sine
  std::vector<double> table(maxT * C);
  llm::ref::sinusoidal_table(table.data(), maxT, C);
  for (int c = 0; c < C; ++c) EXPECT_EQ(table[c], c % 2 == 0 ? 0.0 : 1.0) << c;  // position 0
  // Reference values from Python's math module.
  EXPECT_NEAR(table[1 * C + 0], 0.8414709848078965, 1e-15);     // sin(1)
  EXPECT_NEAR(table[3 * C + 1], -0.9899924966004454, 1e-15);    // cos(3)
  EXPECT_NEAR(table[10 * C + 2], 0.6591483265627224, 1e-14);    // sin(10 / 10000^(2/7))
  EXPECT_NEAR(table[10 * C + 3], 0.7520129544027567, 1e-14);    // cos(10 / 10000^(2/7))
  EXPECT_NEAR(table[37 * C + 5], 0.981693078810019, 1e-14);     // cos(37 / 10000^(4/7))
  EXPECT_NEAR(table[37 * C + 6], 0.013791659509439207, 1e-14);  // sin(37 / 10000^(6/7))

  std::vector<float> table_float(maxT * C);
  llm::ref::sinusoidal_table(table_float.data(), maxT, C);
  for (int i = 0; i < maxT * C; ++i) EXPECT_EQ(table_float[i], static_cast<float>(table[i])) << i;
}

// ---------------------------------------------------------------------------------------------------------
// RoPE.

struct RopeTables {
  std::vector<double> cos, sin;
};

RopeTables make_tables(const RopeParams& params, int maxT) {
  RopeTables t{std::vector<double>(maxT * params.head_dim / 2),
               std::vector<double>(maxT * params.head_dim / 2)};
  llm::ref::rope_tables(t.cos.data(), t.sin.data(), params, maxT);
  return t;
}

RopeParams plain_params(int head_dim) {
  RopeParams p;
  p.head_dim = head_dim;
  return p;
}

RopeParams yarn_params(int head_dim) {
  RopeParams p;
  p.head_dim = head_dim;
  p.scaling = RopeScaling::kYarn;
  p.factor = 4.0;
  p.original_max_position = 16;
  return p;
}

RopeParams llama3_params(int head_dim) {
  RopeParams p;
  p.head_dim = head_dim;
  p.scaling = RopeScaling::kLlama3;
  p.factor = 8.0;
  p.original_max_position = 32;
  return p;
}

// Gradient of L = sum w * rope(x) with respect to x, against central differences.
void check_rope_gradient(const RopeParams& params, uint64_t seed) {
  const RopeTables tables = make_tables(params, kMaxT);
  std::vector<double> x = random_vector(kN * kH * kD, seed);
  const std::vector<double> w = random_vector(kN * kH * kD, seed + 1);
  std::vector<double> out(kN * kH * kD);
  auto loss = [&] {
    llm::ref::rope_forward(out.data(), x.data(), tables.cos.data(), tables.sin.data(), kPos.data(), kN, kH,
                           kD);
    return weighted_sum(out, w);
  };
  // din is overwritten: start from garbage.
  std::vector<double> dx(kN * kH * kD, 123.0);
  llm::ref::rope_backward(dx.data(), w.data(), tables.cos.data(), tables.sin.data(), kPos.data(), kN, kH, kD);
  expect_gradient("dx", x, dx, loss);

  // In place (din aliases dout) gives the same.
  std::vector<double> in_place = w;
  llm::ref::rope_backward(in_place.data(), in_place.data(), tables.cos.data(), tables.sin.data(), kPos.data(),
                          kN, kH, kD);
  for (size_t i = 0; i < dx.size(); ++i) EXPECT_EQ(in_place[i], dx[i]) << i;
}

TEST(GradCheck, Rope) {
  check_rope_gradient(plain_params(kD), 20);
}
TEST(GradCheck, RopeYarn) {
  check_rope_gradient(yarn_params(kD), 22);
}
TEST(GradCheck, RopeLlama3) {
  check_rope_gradient(llama3_params(kD), 24);
}

TEST(Rope, InPlaceForwardMatchesOutOfPlace) {
  const RopeTables tables = make_tables(yarn_params(kD), kMaxT);
  const std::vector<double> x = random_vector(kN * kH * kD, 30);
  std::vector<double> out(x.size());
  llm::ref::rope_forward(out.data(), x.data(), tables.cos.data(), tables.sin.data(), kPos.data(), kN, kH, kD);
  std::vector<double> in_place = x;
  llm::ref::rope_forward(in_place.data(), in_place.data(), tables.cos.data(), tables.sin.data(), kPos.data(),
                         kN, kH, kD);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(in_place[i], out[i]) << i;
}

// |rope(x)| = s |x| for every head vector, with s = 1 without scaling and YaRN's attention factor otherwise.
void check_norms(const RopeParams& params, double expected_scale) {
  constexpr int N = 5, H = 2, maxT = 4096;
  const int D = params.head_dim;
  const RopeTables tables = make_tables(params, maxT);
  const std::vector<int32_t> pos = {0, 1, 17, 1000, 4095};
  const std::vector<double> x = random_vector(N * H * D, 31);
  std::vector<double> out(x.size());
  llm::ref::rope_forward(out.data(), x.data(), tables.cos.data(), tables.sin.data(), pos.data(), N, H, D);
  for (int v = 0; v < N * H; ++v) {
    const double norm_in = std::sqrt(dot(&x[v * D], &x[v * D], D));
    const double norm_out = std::sqrt(dot(&out[v * D], &out[v * D], D));
    EXPECT_NEAR(norm_out, expected_scale * norm_in, 1e-12) << "head vector " << v;
  }
}

TEST(Rope, PreservesNorm) {
  check_norms(plain_params(64), 1.0);
  check_norms(llama3_params(64), 1.0);
  // YaRN with factor 4: attention factor 0.1 ln 4 + 1.
  const RopeParams yarn = yarn_params(64);
  EXPECT_NEAR(llm::ref::rope_attention_scaling(yarn), 1.1386294361119890, 1e-15);
  check_norms(yarn, 0.1 * std::log(4.0) + 1.0);
  RopeParams yarn_explicit = yarn;
  yarn_explicit.attention_factor = 1.5;
  check_norms(yarn_explicit, 1.5);
}

TEST(Rope, PositionZeroIsIdentity) {
  const RopeTables tables = make_tables(plain_params(kD), kMaxT);
  const std::vector<int32_t> pos(kN, 0);
  const std::vector<double> x = random_vector(kN * kH * kD, 32);
  std::vector<double> out(x.size());
  llm::ref::rope_forward(out.data(), x.data(), tables.cos.data(), tables.sin.data(), pos.data(), kN, kH, kD);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(out[i], x[i]) << i;
}

TEST(Rope, BackwardInvertsForwardWithoutScaling) {
  // R^T R = I, so the backward of the forward gives back the input.
  const RopeTables tables = make_tables(plain_params(kD), kMaxT);
  const std::vector<double> x = random_vector(kN * kH * kD, 33);
  std::vector<double> rotated(x.size()), back(x.size());
  llm::ref::rope_forward(rotated.data(), x.data(), tables.cos.data(), tables.sin.data(), kPos.data(), kN, kH,
                         kD);
  llm::ref::rope_backward(back.data(), rotated.data(), tables.cos.data(), tables.sin.data(), kPos.data(), kN,
                          kH, kD);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(back[i], x[i], 1e-14) << i;
}

TEST(Rope, RelativeProperty) {
  constexpr int D = 16, maxT = 64;
  const RopeTables tables = make_tables(plain_params(D), maxT);
  const std::vector<double> q = random_vector(D, 34), k = random_vector(D, 35);
  auto rotated_dot = [&](int32_t m, int32_t n) {
    std::vector<double> rq(D), rk(D);
    llm::ref::rope_forward(rq.data(), q.data(), tables.cos.data(), tables.sin.data(), &m, 1, 1, D);
    llm::ref::rope_forward(rk.data(), k.data(), tables.cos.data(), tables.sin.data(), &n, 1, 1, D);
    return dot(rq.data(), rk.data(), D);
  };
  for (int offset : {0, 1, 5, 17}) {
    const double reference = rotated_dot(offset, 0);
    for (int n : {1, 2, 10, 40})
      EXPECT_NEAR(rotated_dot(n + offset, n), reference, 1e-12) << offset << "," << n;
  }
  // Sanity: a different offset gives a different dot product.
  EXPECT_GT(std::fabs(rotated_dot(5, 0) - rotated_dot(6, 0)), 1e-3);
}

TEST(Rope, TablesHoldScaledCosSin) {
  RopeParams params = yarn_params(kD);
  params.factor = 8.0;
  const RopeTables tables = make_tables(params, kMaxT);
  const std::vector<double> inv_freq = llm::ref::rope_inv_freq(params);
  const double s = llm::ref::rope_attention_scaling(params);
  ASSERT_EQ(inv_freq.size(), static_cast<size_t>(kD / 2));
  for (int p = 0; p < kMaxT; ++p) {
    for (int i = 0; i < kD / 2; ++i) {
      EXPECT_DOUBLE_EQ(tables.cos[p * kD / 2 + i], s * std::cos(p * inv_freq[i]));
      EXPECT_DOUBLE_EQ(tables.sin[p * kD / 2 + i], s * std::sin(p * inv_freq[i]));
    }
  }
}

TEST(Rope, LinearScalingDividesPositions) {
  RopeParams linear = plain_params(kD);
  linear.scaling = RopeScaling::kLinear;
  linear.factor = 4.0;
  const RopeTables scaled = make_tables(linear, 40);
  const RopeTables plain = make_tables(plain_params(kD), 10);
  for (int p = 0; p < 10; ++p) {
    for (int i = 0; i < kD / 2; ++i) {
      EXPECT_NEAR(scaled.cos[4 * p * kD / 2 + i], plain.cos[p * kD / 2 + i], 1e-14);
      EXPECT_NEAR(scaled.sin[4 * p * kD / 2 + i], plain.sin[p * kD / 2 + i], 1e-14);
    }
  }
}

TEST(Rope, FloatTablesAndForwardMatchDouble) {
  const RopeParams params = yarn_params(kD);
  const RopeTables tables = make_tables(params, kMaxT);
  std::vector<float> cos_f(kMaxT * kD / 2), sin_f(kMaxT * kD / 2);
  llm::ref::rope_tables(cos_f.data(), sin_f.data(), params, kMaxT);
  const std::vector<double> x = random_vector(kN * kH * kD, 36);
  const std::vector<float> x_f = llm::test::to_float(x);
  std::vector<double> out(x.size());
  std::vector<float> out_f(x.size()), back_f(x.size());
  llm::ref::rope_forward(out.data(), x.data(), tables.cos.data(), tables.sin.data(), kPos.data(), kN, kH, kD);
  llm::ref::rope_forward(out_f.data(), x_f.data(), cos_f.data(), sin_f.data(), kPos.data(), kN, kH, kD);
  llm::ref::rope_backward(back_f.data(), out_f.data(), cos_f.data(), sin_f.data(), kPos.data(), kN, kH, kD);
  // R^T R = I, so with the attention factor s folded into both: backward(forward(x)) = s^2 x.
  const double s = llm::ref::rope_attention_scaling(params);
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_NEAR(out_f[i], out[i], 1e-6) << i;
    EXPECT_NEAR(back_f[i], s * s * x[i], 1e-6) << i;
  }
}

// Llama 3.1 8B: theta 500000, D 128, factor 8, low/high freq factors 1/4, original context 8192.
// Wavelengths lambda_i = 2 pi 500000^(2i/128). The cut-offs are lambda_high = 8192/4 = 2048 and
// lambda_low = 8192/1 = 8192. Solving lambda_i = 2048 gives i = 64 ln(2048 / 2 pi) / ln 500000 = 28.2, and
// lambda_i = 8192 gives i = 35.0 (34.98), so pairs 0 .. 28 are kept, 29 .. 34 blended and 35 .. 63 divided
// by 8.
TEST(Rope, Llama3InvFreqMatchesFormula) {
  RopeParams params;
  params.head_dim = 128;
  params.theta = 500000.0;
  params.scaling = RopeScaling::kLlama3;
  params.factor = 8.0;
  params.original_max_position = 8192;
  params.low_freq_factor = 1.0;
  params.high_freq_factor = 4.0;
  const std::vector<double> inv_freq = llm::ref::rope_inv_freq(params);
  ASSERT_EQ(inv_freq.size(), 64u);
  auto base = [](int i) { return std::exp(-std::log(500000.0) * i / 64.0); };
  EXPECT_DOUBLE_EQ(inv_freq[0], 1.0);
  for (int i = 0; i <= 28; ++i) EXPECT_NEAR(inv_freq[i], base(i), 1e-14 * base(i)) << i;
  for (int i = 35; i < 64; ++i) EXPECT_NEAR(inv_freq[i], base(i) / 8.0, 1e-14 * base(i)) << i;
  for (int i = 29; i <= 34; ++i) {
    // Blend t = (8192 / lambda_i - 1) / 3 = (8192 w_i / (2 pi) - 1) / 3, between w/8 (t = 0) and w (t = 1).
    const double t = (8192.0 * base(i) / (2.0 * kPi) - 1.0) / 3.0;
    EXPECT_GT(t, 0.0) << i;
    EXPECT_LT(t, 1.0) << i;
    EXPECT_NEAR(inv_freq[i], base(i) * (t + (1.0 - t) / 8.0), 1e-14 * base(i)) << i;
  }
  // Two values worked out by hand: i = 30, w = 500000^(-60/128) = 0.0021311, t = (8192 * 0.0021311 / 2 pi -
  // 1)/3 = 0.59285 and w' = w (t + (1 - t)/8) = 0.0013719.
  EXPECT_NEAR(inv_freq[30], 1.3719e-3, 1e-7);
  EXPECT_NEAR(inv_freq[63], std::pow(500000.0, -126.0 / 128.0) / 8.0, 1e-20);
  EXPECT_EQ(llm::ref::rope_attention_scaling(params), 1.0);
}

// Qwen2.5-style YaRN: theta 1e6, D 128, factor 4, original context 32768, beta 32 / 1.
// Correction dims: i(32) = 128 ln(32768 / (64 pi)) / (2 ln 1e6) = 23.596 -> floor 23;
//                  i(1)  = 128 ln(32768 / (2 pi)) / (2 ln 1e6) = 39.651 -> ceil 40.
// So pairs 0 .. 23 keep w, pairs 40 .. 63 get w/4, and pair i in between gets the ramp (i - 23) / 17:
//   w' = (w/4) ramp + w (1 - ramp).
TEST(Rope, YarnInvFreqMatchesFormula) {
  RopeParams params;
  params.head_dim = 128;
  params.theta = 1e6;
  params.scaling = RopeScaling::kYarn;
  params.factor = 4.0;
  params.original_max_position = 32768;
  EXPECT_NEAR(llm::ref::yarn_correction_dim(32.0, 128, 1e6, 32768), 23.596, 1e-3);
  EXPECT_NEAR(llm::ref::yarn_correction_dim(1.0, 128, 1e6, 32768), 39.651, 1e-3);
  const std::vector<double> inv_freq = llm::ref::rope_inv_freq(params);
  ASSERT_EQ(inv_freq.size(), 64u);
  auto base = [](int i) { return std::pow(1e6, -i / 64.0); };
  for (int i = 0; i <= 23; ++i) EXPECT_NEAR(inv_freq[i], base(i), 1e-15 * base(i)) << i;
  for (int i = 40; i < 64; ++i) EXPECT_NEAR(inv_freq[i], base(i) / 4.0, 1e-15 * base(i)) << i;
  for (int i = 24; i < 40; ++i) {
    const double ramp = (i - 23) / 17.0;
    EXPECT_NEAR(inv_freq[i], base(i) / 4.0 * ramp + base(i) * (1.0 - ramp), 1e-15 * base(i)) << i;
  }
  EXPECT_NEAR(llm::ref::rope_attention_scaling(params), 1.1386294361119890, 1e-15);  // 0.1 ln 4 + 1

  // No truncation: the ramp runs from 23.596 to 39.651 exactly.
  params.truncate = false;
  const std::vector<double> untruncated = llm::ref::rope_inv_freq(params);
  const double lo = llm::ref::yarn_correction_dim(32.0, 128, 1e6, 32768);
  const double hi = llm::ref::yarn_correction_dim(1.0, 128, 1e6, 32768);
  EXPECT_NEAR(untruncated[23], base(23), 1e-15 * base(23));
  const double ramp30 = (30 - lo) / (hi - lo);
  EXPECT_NEAR(untruncated[30], base(30) / 4.0 * ramp30 + base(30) * (1.0 - ramp30), 1e-15 * base(30));

  // factor <= 1: no attention scaling, frequencies unchanged.
  params.truncate = true;
  params.factor = 1.0;
  EXPECT_EQ(llm::ref::rope_attention_scaling(params), 1.0);
  const std::vector<double> unscaled = llm::ref::rope_inv_freq(params);
  for (int i = 0; i < 64; ++i) EXPECT_NEAR(unscaled[i], base(i), 1e-15 * base(i)) << i;
}

// Against Hugging Face transformers' ROPE_INIT_FUNCTIONS, dumped by dev/reference/rope_fixtures.py.
// transformers computes in float32, hence the relative tolerance.
TEST(Rope, InvFreqMatchesTransformersFixtures) {
  const std::string path = std::string(LLM_SOURCE_DIR) + "/tests/fixtures/rope_fixtures.json";
  std::ifstream file(path);
  ASSERT_TRUE(file.good()) << path;
  const nlohmann::json fixtures = nlohmann::json::parse(file);
  ASSERT_GE(fixtures.at("cases").size(), 5u);
  for (const auto& c : fixtures.at("cases")) {
    const std::string name = c.at("name");
    const std::string scaling = c.at("scaling");
    RopeParams params;
    params.head_dim = c.at("head_dim");
    params.theta = c.at("theta");
    params.scaling = scaling == "none"     ? RopeScaling::kNone
                     : scaling == "linear" ? RopeScaling::kLinear
                     : scaling == "llama3" ? RopeScaling::kLlama3
                                           : RopeScaling::kYarn;
    ASSERT_TRUE(scaling == "none" || scaling == "linear" || scaling == "llama3" || scaling == "yarn")
        << scaling;
    params.factor = c.value("factor", params.factor);
    params.original_max_position = c.value("original_max_position", params.original_max_position);
    params.low_freq_factor = c.value("low_freq_factor", params.low_freq_factor);
    params.high_freq_factor = c.value("high_freq_factor", params.high_freq_factor);
    params.beta_fast = c.value("beta_fast", params.beta_fast);
    params.beta_slow = c.value("beta_slow", params.beta_slow);
    params.attention_factor = c.value("attention_factor", params.attention_factor);
    params.truncate = c.value("truncate", params.truncate);

    const std::vector<double> expected = c.at("inv_freq").get<std::vector<double>>();
    const std::vector<double> inv_freq = llm::ref::rope_inv_freq(params);
    ASSERT_EQ(inv_freq.size(), expected.size()) << name;
    for (size_t i = 0; i < expected.size(); ++i) {
      EXPECT_NEAR(inv_freq[i], expected[i], 2e-6 * expected[i]) << name << " [" << i << "]";
    }
    EXPECT_NEAR(llm::ref::rope_attention_scaling(params), c.at("attention_scaling").get<double>(), 1e-12)
        << name;
  }
}

// ---------------------------------------------------------------------------------------------------------
// ALiBi.

TEST(Alibi, SlopesPowerOfTwo) {
  const std::vector<double> slopes = llm::ref::alibi_slopes(8);
  ASSERT_EQ(slopes.size(), 8u);
  for (int h = 0; h < 8; ++h) EXPECT_EQ(slopes[h], 1.0 / (2 << h)) << h;  // 1/2, 1/4, ..., 1/256
  const std::vector<double> one = llm::ref::alibi_slopes(1);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0], 1.0 / 256);
  const std::vector<double> sixteen = llm::ref::alibi_slopes(16);  // 2^(-h/2)
  ASSERT_EQ(sixteen.size(), 16u);
  for (int h = 0; h < 16; ++h) EXPECT_DOUBLE_EQ(sixteen[h], std::pow(2.0, -(h + 1) / 2.0)) << h;
}

TEST(Alibi, SlopesNonPowerOfTwo) {
  // 12 heads: the 8 slopes for 8 heads (2^-1 .. 2^-8), then slopes 1, 3, 5, 7 of the 16-head sequence
  // 2^(-h/2): 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
  const std::vector<double> slopes = llm::ref::alibi_slopes(12);
  const std::vector<double> expected = {0.5,
                                        0.25,
                                        0.125,
                                        0.0625,
                                        0.03125,
                                        0.015625,
                                        0.0078125,
                                        0.00390625,
                                        0.7071067811865476,
                                        0.3535533905932738,
                                        0.1767766952966369,
                                        0.08838834764831845};
  ASSERT_EQ(slopes.size(), expected.size());
  for (size_t h = 0; h < expected.size(); ++h) EXPECT_NEAR(slopes[h], expected[h], 1e-16) << h;

  // 6 heads: 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then 8-head slopes 1 and 3: 2^-1, 2^-3.
  const std::vector<double> six = llm::ref::alibi_slopes(6);
  const std::vector<double> expected_six = {0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125};
  ASSERT_EQ(six.size(), expected_six.size());
  for (size_t h = 0; h < expected_six.size(); ++h) EXPECT_EQ(six[h], expected_six[h]) << h;
}

}  // namespace
