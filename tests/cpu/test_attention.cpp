// Causal scaled-dot-product attention (kernels/cpu/attention.h): gradient checks of dQ, dK and dV against
// central differences for every option, invariants that tie the options to each other, and tiny cases
// computed by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/philox.h"
#include "tests/gradcheck.h"

namespace {

using llm::ref::AttentionOptions;
using llm::ref::AttentionShape;

size_t q_size(const AttentionShape& s) {
  return static_cast<size_t>(s.B) * s.T * s.Hq * s.D;
}
size_t kv_size(const AttentionShape& s) {
  return static_cast<size_t>(s.B) * s.T * s.Hkv * s.D;
}
size_t probs_size(const AttentionShape& s) {
  return static_cast<size_t>(s.B) * s.Hq * s.T * s.T;
}

// Inputs, forward results and gradients of one attention call in double.
struct Result {
  std::vector<double> out, probs, dq, dk, dv;
};

Result run_attention(const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
                     const std::vector<double>& dout, const AttentionShape& s, const AttentionOptions& opt) {
  Result r;
  r.out.assign(q_size(s), 0.0);
  r.probs.assign(probs_size(s), 0.0);
  llm::ref::attention_forward(r.out.data(), r.probs.data(), q.data(), k.data(), v.data(), s, opt);
  r.dq.assign(q_size(s), 0.0);
  r.dk.assign(kv_size(s), 0.0);
  r.dv.assign(kv_size(s), 0.0);
  llm::ref::attention_backward(r.dq.data(), r.dk.data(), r.dv.data(), dout.data(), r.probs.data(), q.data(),
                               k.data(), v.data(), s, opt);
  return r;
}

// Checks dQ, dK and dV of L = sum w * out against central differences.
void check_gradients(const AttentionShape& s, const AttentionOptions& opt, uint64_t seed) {
  std::vector<double> q = llm::test::random_vector(q_size(s), seed);
  std::vector<double> k = llm::test::random_vector(kv_size(s), seed + 1);
  std::vector<double> v = llm::test::random_vector(kv_size(s), seed + 2);
  const std::vector<double> w = llm::test::random_vector(q_size(s), seed + 3);
  const Result r = run_attention(q, k, v, w, s, opt);

  std::vector<double> out(q_size(s)), probs(probs_size(s));
  const auto loss = [&]() {
    llm::ref::attention_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), s, opt);
    return llm::test::weighted_sum(out, w);
  };
  llm::test::expect_gradient("dq", q, r.dq, loss);
  llm::test::expect_gradient("dk", k, r.dk, loss);
  llm::test::expect_gradient("dv", v, r.dv, loss);
}

void expect_near_all(const std::vector<double>& a, const std::vector<double>& b, double tol,
                     const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::fabs(a[i] - b[i]) > tol && reported++ < 5) {
      ADD_FAILURE() << what << "[" << i << "]: " << a[i] << " vs " << b[i];
    }
  }
}

// Odd sizes so that no loop bound can hide behind a power of two.
constexpr AttentionShape kMha{2, 7, 3, 3, 5};
constexpr AttentionShape kGqa{2, 7, 6, 2, 5};
constexpr AttentionShape kMqa{2, 7, 4, 1, 5};

// ---------------------------------------------------------------------------------------------------------
// Gradient checks
// ---------------------------------------------------------------------------------------------------------

TEST(GradCheck, Attention) {
  check_gradients(kMha, AttentionOptions{}, 100);
}

TEST(GradCheck, AttentionGqa) {
  check_gradients(kGqa, AttentionOptions{}, 200);
}

TEST(GradCheck, AttentionMqa) {
  check_gradients(kMqa, AttentionOptions{}, 300);
}

TEST(GradCheck, AttentionNonCausal) {
  AttentionOptions opt;
  opt.causal = false;
  check_gradients(kGqa, opt, 350);
}

TEST(GradCheck, AttentionSlidingWindow) {
  AttentionOptions opt;
  opt.sliding_window = 3;
  check_gradients(kGqa, opt, 400);
}

TEST(GradCheck, AttentionDocumentMask) {
  // Row 0 packs three documents, row 1 two; ids need not be contiguous across rows.
  const std::vector<int32_t> docs = {0, 0, 0, 1, 1, 2, 2, 7, 7, 7, 7, 7, 8, 8};
  AttentionOptions opt;
  opt.doc_ids = docs.data();
  check_gradients(kGqa, opt, 500);
}

TEST(GradCheck, AttentionAlibi) {
  const std::vector<double> slopes = {0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625};
  AttentionOptions opt;
  opt.alibi_slopes = slopes.data();
  check_gradients(kGqa, opt, 600);
}

TEST(GradCheck, AttentionDropout) {
  // For a fixed seed and stream the mask is fixed, so the loss is a deterministic function of q, k, v.
  AttentionOptions opt;
  opt.dropout = 0.3f;
  opt.seed = 0x1234abcd5678ULL;
  opt.stream = 42;
  check_gradients(kGqa, opt, 700);
}

TEST(GradCheck, AttentionScale) {
  AttentionOptions opt;
  opt.scale = 0.7;
  check_gradients(kMha, opt, 800);
}

TEST(GradCheck, AttentionAllOptions) {
  const std::vector<int32_t> docs = {3, 3, 3, 3, 3, 4, 4, 1, 1, 2, 2, 2, 2, 2};
  const std::vector<double> slopes = {0.3, 0.2, 0.1, 0.05};
  AttentionOptions opt;
  opt.scale = 0.6;
  opt.sliding_window = 4;
  opt.doc_ids = docs.data();
  opt.alibi_slopes = slopes.data();
  opt.dropout = 0.25f;
  opt.seed = 99;
  opt.stream = 5;
  check_gradients(AttentionShape{2, 7, 4, 2, 5}, opt, 900);
}

// ---------------------------------------------------------------------------------------------------------
// Invariants
// ---------------------------------------------------------------------------------------------------------

// GQA equals MHA on inputs whose K/V heads are repeated explicitly; dK/dV of GQA are the group sums.
TEST(Attention, GqaWithAllKvHeadsEqualsMha) {
  const AttentionShape gqa = kGqa;
  const AttentionShape mha{gqa.B, gqa.T, gqa.Hq, gqa.Hq, gqa.D};
  const int group = gqa.Hq / gqa.Hkv;
  const std::vector<double> q = llm::test::random_vector(q_size(gqa), 1);
  const std::vector<double> k = llm::test::random_vector(kv_size(gqa), 2);
  const std::vector<double> v = llm::test::random_vector(kv_size(gqa), 3);
  const std::vector<double> dout = llm::test::random_vector(q_size(gqa), 4);
  std::vector<double> k_rep(kv_size(mha)), v_rep(kv_size(mha));
  for (int b = 0; b < gqa.B; ++b) {
    for (int t = 0; t < gqa.T; ++t) {
      for (int h = 0; h < gqa.Hq; ++h) {
        for (int d = 0; d < gqa.D; ++d) {
          const size_t src = llm::ref::attention_kv_offset(b, t, h / group, gqa) + d;
          const size_t dst = llm::ref::attention_kv_offset(b, t, h, mha) + d;
          k_rep[dst] = k[src];
          v_rep[dst] = v[src];
        }
      }
    }
  }
  AttentionOptions opt;  // the dropout index uses the query head, so both see the same mask
  opt.dropout = 0.2f;
  opt.seed = 17;
  const Result a = run_attention(q, k, v, dout, gqa, opt);
  const Result m = run_attention(q, k_rep, v_rep, dout, mha, opt);
  expect_near_all(a.out, m.out, 1e-14, "out");
  expect_near_all(a.probs, m.probs, 1e-14, "probs");
  expect_near_all(a.dq, m.dq, 1e-14, "dq");
  std::vector<double> dk_sum(kv_size(gqa), 0.0), dv_sum(kv_size(gqa), 0.0);
  for (int b = 0; b < gqa.B; ++b) {
    for (int t = 0; t < gqa.T; ++t) {
      for (int h = 0; h < gqa.Hq; ++h) {
        for (int d = 0; d < gqa.D; ++d) {
          dk_sum[llm::ref::attention_kv_offset(b, t, h / group, gqa) + d] +=
              m.dk[llm::ref::attention_kv_offset(b, t, h, mha) + d];
          dv_sum[llm::ref::attention_kv_offset(b, t, h / group, gqa) + d] +=
              m.dv[llm::ref::attention_kv_offset(b, t, h, mha) + d];
        }
      }
    }
  }
  expect_near_all(a.dk, dk_sum, 1e-13, "dk");
  expect_near_all(a.dv, dv_sum, 1e-13, "dv");
}

TEST(Attention, WideSlidingWindowEqualsCausal) {
  const AttentionShape s = kGqa;
  const std::vector<double> q = llm::test::random_vector(q_size(s), 11);
  const std::vector<double> k = llm::test::random_vector(kv_size(s), 12);
  const std::vector<double> v = llm::test::random_vector(kv_size(s), 13);
  const std::vector<double> dout = llm::test::random_vector(q_size(s), 14);
  const Result causal = run_attention(q, k, v, dout, s, AttentionOptions{});
  for (int window : {s.T, s.T + 5}) {  // i - j <= T - 1 < T: the window never cuts
    AttentionOptions opt;
    opt.sliding_window = window;
    const Result wide = run_attention(q, k, v, dout, s, opt);
    EXPECT_EQ(wide.out, causal.out) << window;
    EXPECT_EQ(wide.probs, causal.probs) << window;
    EXPECT_EQ(wide.dq, causal.dq) << window;
    EXPECT_EQ(wide.dk, causal.dk) << window;
    EXPECT_EQ(wide.dv, causal.dv) << window;
  }
  // One position narrower does cut: the key T-1 positions back leaves the last row.
  AttentionOptions narrow;
  narrow.sliding_window = s.T - 1;
  const Result cut = run_attention(q, k, v, dout, s, narrow);
  EXPECT_EQ(cut.probs[llm::ref::attention_probs_offset(0, 0, s.T - 1, s) + 0], 0.0);
  EXPECT_GT(causal.probs[llm::ref::attention_probs_offset(0, 0, s.T - 1, s) + 0], 0.0);
}

TEST(Attention, OneDocumentEqualsNoMask) {
  const AttentionShape s = kGqa;
  const std::vector<double> q = llm::test::random_vector(q_size(s), 21);
  const std::vector<double> k = llm::test::random_vector(kv_size(s), 22);
  const std::vector<double> v = llm::test::random_vector(kv_size(s), 23);
  const std::vector<double> dout = llm::test::random_vector(q_size(s), 24);
  const std::vector<int32_t> docs(static_cast<size_t>(s.B) * s.T, 5);
  AttentionOptions opt;
  opt.doc_ids = docs.data();
  const Result plain = run_attention(q, k, v, dout, s, AttentionOptions{});
  const Result masked = run_attention(q, k, v, dout, s, opt);
  EXPECT_EQ(masked.out, plain.out);
  EXPECT_EQ(masked.probs, plain.probs);
  EXPECT_EQ(masked.dq, plain.dq);
  EXPECT_EQ(masked.dk, plain.dk);
  EXPECT_EQ(masked.dv, plain.dv);
}

// Two documents packed into one row give the same results as running each document alone. Positions (RoPE)
// are applied by the caller before attention, so the op itself only sees relative offsets (ALiBi, window).
TEST(Attention, DocumentMaskEqualsSeparateSequences) {
  const int len0 = 3, len1 = 4;
  const AttentionShape packed{1, len0 + len1, 4, 2, 5};
  const std::vector<double> slopes = {0.4, 0.3, 0.2, 0.1};
  const std::vector<int32_t> docs = {0, 0, 0, 1, 1, 1, 1};
  const std::vector<double> q = llm::test::random_vector(q_size(packed), 31);
  const std::vector<double> k = llm::test::random_vector(kv_size(packed), 32);
  const std::vector<double> v = llm::test::random_vector(kv_size(packed), 33);
  const std::vector<double> dout = llm::test::random_vector(q_size(packed), 34);
  AttentionOptions opt;
  opt.alibi_slopes = slopes.data();
  opt.sliding_window = 3;
  opt.doc_ids = docs.data();
  const Result whole = run_attention(q, k, v, dout, packed, opt);

  AttentionOptions alone_opt = opt;
  alone_opt.doc_ids = nullptr;
  const size_t q_row = static_cast<size_t>(packed.Hq) * packed.D;
  const size_t kv_row = static_cast<size_t>(packed.Hkv) * packed.D;
  int start = 0;
  for (int len : {len0, len1}) {
    const AttentionShape s{1, len, packed.Hq, packed.Hkv, packed.D};
    const auto slice = [&](const std::vector<double>& x, size_t row) {
      return std::vector<double>(x.begin() + start * row, x.begin() + (start + len) * row);
    };
    const Result part =
        run_attention(slice(q, q_row), slice(k, kv_row), slice(v, kv_row), slice(dout, q_row), s, alone_opt);
    expect_near_all(part.out, slice(whole.out, q_row), 1e-15, "out");
    expect_near_all(part.dq, slice(whole.dq, q_row), 1e-15, "dq");
    expect_near_all(part.dk, slice(whole.dk, kv_row), 1e-15, "dk");
    expect_near_all(part.dv, slice(whole.dv, kv_row), 1e-15, "dv");
    for (int h = 0; h < s.Hq; ++h) {
      for (int i = 0; i < len; ++i) {
        for (int j = 0; j < packed.T; ++j) {
          const double p = whole.probs[llm::ref::attention_probs_offset(0, h, start + i, packed) + j];
          const int jj = j - start;
          if (jj < 0 || jj >= len) {
            EXPECT_EQ(p, 0.0) << "cross-document probability";
          } else {
            EXPECT_NEAR(p, part.probs[llm::ref::attention_probs_offset(0, h, i, s) + jj], 1e-15);
          }
        }
      }
    }
    start += len;
  }
}

TEST(Attention, MaskedProbsAreZero) {
  const AttentionShape s = kGqa;
  const std::vector<int32_t> docs = {0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2};
  const std::vector<double> q = llm::test::random_vector(q_size(s), 41, -3.0, 3.0);
  const std::vector<double> k = llm::test::random_vector(kv_size(s), 42, -3.0, 3.0);
  const std::vector<double> v = llm::test::random_vector(kv_size(s), 43);
  std::vector<double> out(q_size(s)), probs(probs_size(s));
  AttentionOptions opt;
  opt.sliding_window = 3;
  opt.doc_ids = docs.data();
  llm::ref::attention_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), s, opt);
  for (int b = 0; b < s.B; ++b) {
    for (int h = 0; h < s.Hq; ++h) {
      for (int i = 0; i < s.T; ++i) {
        const double* p = probs.data() + llm::ref::attention_probs_offset(b, h, i, s);
        double sum = 0.0;
        for (int j = 0; j < s.T; ++j) {
          const bool visible = j <= i && i - j < 3 && docs[b * s.T + i] == docs[b * s.T + j];
          if (visible) {
            EXPECT_GT(p[j], 0.0) << b << " " << h << " " << i << " " << j;
          } else {
            EXPECT_EQ(p[j], 0.0) << b << " " << h << " " << i << " " << j;
          }
          sum += p[j];
        }
        EXPECT_NEAR(sum, 1.0, 1e-14);
      }
    }
  }
}

TEST(Attention, DropoutZeroEqualsNoDropout) {
  const AttentionShape s = kGqa;
  const std::vector<double> q = llm::test::random_vector(q_size(s), 51);
  const std::vector<double> k = llm::test::random_vector(kv_size(s), 52);
  const std::vector<double> v = llm::test::random_vector(kv_size(s), 53);
  const std::vector<double> dout = llm::test::random_vector(q_size(s), 54);
  AttentionOptions opt;
  opt.dropout = 0.0f;
  opt.seed = 1234;
  opt.stream = 77;
  const Result plain = run_attention(q, k, v, dout, s, AttentionOptions{});
  const Result zero = run_attention(q, k, v, dout, s, opt);
  EXPECT_EQ(zero.out, plain.out);
  EXPECT_EQ(zero.probs, plain.probs);
  EXPECT_EQ(zero.dq, plain.dq);
  EXPECT_EQ(zero.dk, plain.dk);
  EXPECT_EQ(zero.dv, plain.dv);
  // And without dropout the output is exactly P V.
  const int group = s.Hq / s.Hkv;
  for (int b = 0; b < s.B; ++b) {
    for (int h = 0; h < s.Hq; ++h) {
      for (int i = 0; i < s.T; ++i) {
        for (int d = 0; d < s.D; ++d) {
          double o = 0.0;
          for (int j = 0; j < s.T; ++j) {
            o += plain.probs[llm::ref::attention_probs_offset(b, h, i, s) + j] *
                 v[llm::ref::attention_kv_offset(b, j, h / group, s) + d];
          }
          EXPECT_NEAR(plain.out[llm::ref::attention_q_offset(b, i, h, s) + d], o, 1e-14);
        }
      }
    }
  }
}

// With q = 0 every visible key gets P_ij = 1/(i+1), and with one-hot values (D = T, v_j = e_j) the output
// reads the applied weights back: out[i][j] = P_ij M_ij. So the test sees the mask itself.
TEST(Attention, DropoutKeepsExpectedFraction) {
  const int T = 64;
  const AttentionShape s{2, T, 4, 1, T};
  const float p = 0.3f;
  const std::vector<double> q(q_size(s), 0.0), k = llm::test::random_vector(kv_size(s), 61);
  std::vector<double> v(kv_size(s), 0.0);
  for (int b = 0; b < s.B; ++b) {
    for (int j = 0; j < T; ++j) v[llm::ref::attention_kv_offset(b, j, 0, s) + j] = 1.0;
  }
  AttentionOptions opt;
  opt.dropout = p;
  opt.seed = 2024;
  opt.stream = 3;
  std::vector<double> out(q_size(s)), probs(probs_size(s));
  llm::ref::attention_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), s, opt);
  long kept = 0, visible = 0;
  for (int b = 0; b < s.B; ++b) {
    for (int h = 0; h < s.Hq; ++h) {
      for (int i = 0; i < T; ++i) {
        for (int j = 0; j <= i; ++j) {
          const double m = out[llm::ref::attention_q_offset(b, i, h, s) + j] * (i + 1);
          const uint64_t index = ((static_cast<uint64_t>(b) * s.Hq + h) * T + i) * T + j;
          const bool keep = llm::philox_uniform(opt.seed, opt.stream, index) >= p;
          EXPECT_NEAR(m, keep ? 1.0 / (1.0 - p) : 0.0, 1e-12) << b << " " << h << " " << i << " " << j;
          // probs are saved before dropout.
          EXPECT_NEAR(probs[llm::ref::attention_probs_offset(b, h, i, s) + j], 1.0 / (i + 1), 1e-15);
          kept += keep ? 1 : 0;
          ++visible;
        }
      }
    }
  }
  // 8320 visible entries: the standard deviation of the kept fraction is about 0.005.
  EXPECT_NEAR(static_cast<double>(kept) / visible, 1.0 - p, 0.03);
}

// ---------------------------------------------------------------------------------------------------------
// Tiny cases by hand
// ---------------------------------------------------------------------------------------------------------

// T = 2, D = 1, scale 1: q = (0.5, 1), k = (0, ln 3), v = (2, 6).
// Row 0 sees only key 0: o_0 = v_0 = 2. Row 1: scores (0, ln 3), weights (1, 3) / 4, o_1 = 0.5 + 4.5 = 5.
// Backward with dO = (0, 1): dV = (1/4, 3/4); dP_1 = (2, 6), rowsum = 5, dS_1 = (1/4 (2-5), 3/4 (6-5))
// = (-3/4, 3/4); dQ_1 = dS_10 k_0 + dS_11 k_1 = 3/4 ln 3, dQ_0 = 0; dK_j = dS_1j q_1 = (-3/4, 3/4).
TEST(Attention, TinyCaseByHand) {
  const AttentionShape s{1, 2, 1, 1, 1};
  const double ln3 = std::log(3.0);
  const std::vector<double> q = {0.5, 1.0}, k = {0.0, ln3}, v = {2.0, 6.0}, dout = {0.0, 1.0};
  const Result r = run_attention(q, k, v, dout, s, AttentionOptions{});
  EXPECT_NEAR(r.probs[0], 1.0, 1e-15);
  EXPECT_EQ(r.probs[1], 0.0);
  EXPECT_NEAR(r.probs[2], 0.25, 1e-15);
  EXPECT_NEAR(r.probs[3], 0.75, 1e-15);
  EXPECT_NEAR(r.out[0], 2.0, 1e-15);
  EXPECT_NEAR(r.out[1], 5.0, 1e-14);
  EXPECT_NEAR(r.dv[0], 0.25, 1e-15);
  EXPECT_NEAR(r.dv[1], 0.75, 1e-15);
  EXPECT_NEAR(r.dq[0], 0.0, 1e-15);
  EXPECT_NEAR(r.dq[1], 0.75 * ln3, 1e-14);
  EXPECT_NEAR(r.dk[0], -0.75, 1e-14);
  EXPECT_NEAR(r.dk[1], 0.75, 1e-14);
}

// The default scale is 1/sqrt(D): with D = 4, q_1 = (2, 0, 0, 0) and k_1 = (ln 3, 0, 0, 0) the score is
// 0.5 * 2 ln 3 = ln 3, so row 1 again weighs keys (0, 1) by (1/4, 3/4).
TEST(Attention, TinyCaseDefaultScaleByHand) {
  const AttentionShape s{1, 2, 1, 1, 4};
  const double ln3 = std::log(3.0);
  const std::vector<double> q = {0, 0, 0, 0, 2, 0, 0, 0}, k = {0, 0, 0, 0, ln3, 0, 0, 0};
  const std::vector<double> v = {2, 0, 0, 0, 6, 0, 0, 1};
  std::vector<double> out(q_size(s)), probs(probs_size(s));
  llm::ref::attention_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), s, AttentionOptions{});
  EXPECT_NEAR(probs[2], 0.25, 1e-15);
  EXPECT_NEAR(probs[3], 0.75, 1e-15);
  EXPECT_NEAR(out[4], 5.0, 1e-14);
  EXPECT_NEAR(out[7], 0.75, 1e-15);
}

// ALiBi sign: with q = k = 0 and slope ln 3, row 1 scores are (-ln 3 * (1 - 0), -ln 3 * 0) = (-ln 3, 0), so
// the farther key gets weight 1/4 and the query itself 3/4.
TEST(Attention, TinyCaseAlibiByHand) {
  const AttentionShape s{1, 2, 1, 1, 1};
  const double slope = std::log(3.0);
  const std::vector<double> q = {0.0, 0.0}, k = {0.0, 0.0}, v = {2.0, 6.0};
  AttentionOptions opt;
  opt.alibi_slopes = &slope;
  std::vector<double> out(q_size(s)), probs(probs_size(s));
  llm::ref::attention_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), s, opt);
  EXPECT_NEAR(probs[2], 0.25, 1e-15);
  EXPECT_NEAR(probs[3], 0.75, 1e-15);
  EXPECT_NEAR(out[1], 5.0, 1e-14);
}

// Large scores must not overflow: the row maximum is subtracted before exponentiating.
TEST(Attention, SoftmaxIsStableForLargeScores) {
  const AttentionShape s{1, 2, 1, 1, 1};
  const double ln3 = std::log(3.0);
  const std::vector<double> q = {1.0, 1.0}, k = {1000.0, 1000.0 + ln3}, v = {2.0, 6.0};
  std::vector<double> out(q_size(s)), probs(probs_size(s));
  llm::ref::attention_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), s, AttentionOptions{});
  EXPECT_NEAR(probs[2], 0.25, 1e-12);
  EXPECT_NEAR(probs[3], 0.75, 1e-12);
  EXPECT_NEAR(out[1], 5.0, 1e-11);
}

// The float instantiation (the one training uses) agrees with double.
TEST(Attention, FloatMatchesDouble) {
  const AttentionShape s = kGqa;
  const std::vector<double> q = llm::test::random_vector(q_size(s), 71);
  const std::vector<double> k = llm::test::random_vector(kv_size(s), 72);
  const std::vector<double> v = llm::test::random_vector(kv_size(s), 73);
  const std::vector<double> dout = llm::test::random_vector(q_size(s), 74);
  AttentionOptions opt;
  opt.dropout = 0.1f;
  opt.seed = 8;
  const Result expected = run_attention(q, k, v, dout, s, opt);
  const std::vector<float> qf = llm::test::to_float(q), kf = llm::test::to_float(k),
                           vf = llm::test::to_float(v);
  const std::vector<float> doutf = llm::test::to_float(dout);
  std::vector<float> out(q_size(s)), probs(probs_size(s)), dq(q_size(s)), dk(kv_size(s)), dv(kv_size(s));
  llm::ref::attention_forward(out.data(), probs.data(), qf.data(), kf.data(), vf.data(), s, opt);
  llm::ref::attention_backward(dq.data(), dk.data(), dv.data(), doutf.data(), probs.data(), qf.data(),
                               kf.data(), vf.data(), s, opt);
  expect_near_all(std::vector<double>(out.begin(), out.end()), expected.out, 1e-5, "out");
  expect_near_all(std::vector<double>(probs.begin(), probs.end()), expected.probs, 1e-6, "probs");
  expect_near_all(std::vector<double>(dq.begin(), dq.end()), expected.dq, 1e-5, "dq");
  expect_near_all(std::vector<double>(dk.begin(), dk.end()), expected.dk, 1e-5, "dk");
  expect_near_all(std::vector<double>(dv.begin(), dv.end()), expected.dv, 1e-5, "dv");
}

}  // namespace
