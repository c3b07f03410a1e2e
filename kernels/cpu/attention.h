// Causal scaled-dot-product attention: the CPU reference, forward and backward.
//
// ---------------------------------------------------------------------------------------------------------
// Notation
// ---------------------------------------------------------------------------------------------------------
// Batch b, query head h (0 <= h < Hq), key/value head g (0 <= g < Hkv), query position i, key position j,
// feature d (0 <= d < D). Grouped-query attention (GQA) lets r = Hq / Hkv query heads share one K/V head:
//     g(h) = h / r.
// r = 1 is multi-head attention (MHA), Hkv = 1 is multi-query attention (MQA). For one (b, h) write
// q_i = q[b, i, h, :], k_j = k[b, j, g(h), :], v_j = v[b, j, g(h), :], all vectors of length D.
//
// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------
// 1. Scores. With c = scale (1/sqrt(D) unless given) and an optional ALiBi slope a_h:
//        s_ij = c * <q_i, k_j> - a_h * (i - j).
//    ALiBi penalises a key linearly in its distance to the query; the slopes are constants.
//
// 2. Visibility. Key j is visible to query i when all of the enabled conditions hold:
//        causal:          j <= i
//        sliding window:  i - j < W          (the window of W positions counts the query itself)
//        documents:       doc[b, i] == doc[b, j]   (sequences packed into one row do not see each other)
//    Every condition holds for j = i, so each row has at least one visible key. A masked entry is
//    equivalent to s_ij = -infinity.
//
// 3. Softmax over the visible keys of row i, made numerically stable by subtracting the row maximum
//    m_i = max_{j visible} s_ij, so that every exponent is <= 0 and nothing overflows:
//        P_ij = exp(s_ij - m_i) / Z_i,   Z_i = sum_{j visible} exp(s_ij - m_i),   P_ij = 0 if j is masked.
//    Subtracting m_i changes nothing mathematically (numerator and denominator both gain exp(-m_i)), so m_i
//    contributes no gradient: the softmax is invariant to a shift of its row.
//
// 4. Dropout on the probabilities, with inverted scaling so that the expectation is unchanged:
//        M_ij = [u_ij >= p] / (1 - p),   u_ij = philox_uniform(seed, stream, ((b*Hq + h)*T + i)*T + j),
//        A_ij = P_ij * M_ij.
//    E[M_ij] = (1 - p) / (1 - p) = 1, hence E[A_ij] = P_ij. With p = 0, M_ij = 1 and A = P.
//
// 5. Output:
//        o_i = sum_j A_ij v_j.
//
// The forward pass stores P (before dropout) for the backward pass; the mask M is regenerated from the
// counter-based generator instead of being stored.
//
// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------
// Given the upstream gradient dO = dL/dO, we want dQ, dK and dV. Everything below is for one (b, h); the
// last paragraph adds up the heads that share K/V.
//
// (a) Through the output o_i = sum_j A_ij v_j, which is bilinear in A and v:
//        dA_ij = dL/dA_ij = <dO_i, v_j>,
//        dV_j  = sum_i A_ij dO_i.
//
// (b) Through dropout. For a fixed mask M (fixed seed, stream and index) A_ij = P_ij M_ij is a constant
//     elementwise scaling of P, so
//        dP_ij = M_ij * dA_ij.
//     Dropped entries (M_ij = 0) pass no gradient; kept entries pass it scaled by 1/(1-p).
//
// (c) Through the softmax. Within row i, P_ij depends on every score s_ik of the row:
//        dP_ij / ds_ik = P_ij (delta_jk - P_ik)      (the softmax Jacobian, J = diag(P) - P P^T).
//     Proof: P_ij = e_j / Z with e_j = exp(s_ij - m_i) and Z = sum_k e_k. Since de_j/ds_ik = delta_jk e_j and
//     dZ/ds_ik = e_k, the quotient rule gives dP_ij/ds_ik = delta_jk e_j / Z - e_j e_k / Z^2
//     = P_ij delta_jk - P_ij P_ik.
//     The chain rule sums over the outputs j of the row:
//        dS_ik = sum_j dP_ij * P_ij (delta_jk - P_ik)
//              = P_ik dP_ik - P_ik sum_j P_ij dP_ij
//              = P_ik (dP_ik - rowsum_i),   rowsum_i = sum_j P_ij dP_ij,
//     i.e. dS = P o (dP - rowsum(dP o P)) with o the elementwise product. A masked entry has P_ik = 0 and
//     therefore dS_ik = 0, as it must: a score of -infinity is a constant. (Equivalently
//     rowsum_i = sum_j A_ij dA_ij = <dO_i, o_i>, the identity fused kernels use to avoid a pass over P.)
//
// (d) Through the scores s_ij = c <q_i, k_j> - a_h (i - j). The ALiBi term and the mask do not depend on
//     q or k, so
//        dQ_i = c * sum_j dS_ij k_j,
//        dK_j = c * sum_i dS_ij q_i.
//
// (e) Heads that share K/V (GQA/MQA). K/V head g is read by the r query heads h with g(h) = g. A variable
//     used in several places receives the sum of the gradients of each use (multivariate chain rule), so
//        dK[b, j, g, :] = sum_{h : g(h) = g} dK^(h)_j,    dV[b, j, g, :] = sum_{h : g(h) = g} dV^(h)_j,
//     with dK^(h), dV^(h) the per-head results of (a) and (d). dQ needs no such sum: each query head is used
//     once.
//
// ---------------------------------------------------------------------------------------------------------
// Layouts and conventions
// ---------------------------------------------------------------------------------------------------------
//   q, out, dq, dout:  [B, T, Hq, D]        (as the projections produce them)
//   k, v, dk, dv:      [B, T, Hkv, D]       (shared by index, never repeated in memory)
//   probs:             [B, Hq, T, T]        (P before dropout; masked entries exactly 0)
//   doc_ids:           [B, T]               alibi_slopes: [Hq]
// dq, dk and dv are activation gradients and are overwritten (=), not accumulated.
//
// The loops are parallelised over (b, g): one thread owns a K/V head and all r query heads that read it,
// so dK and dV are summed by a single thread in a fixed order and the result does not depend on the thread
// count.
#pragma once

#include <cassert>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/philox.h"

namespace llm::ref {

struct AttentionShape {
  int B, T, Hq, Hkv, D;  // Hq % Hkv == 0; the K/V head of query head h is h / (Hq / Hkv)
};

struct AttentionOptions {
  double scale = 0.0;                // 0 means 1/sqrt(D)
  bool causal = true;                // key j visible to query i only if j <= i
  int sliding_window = 0;            // 0 = none; else key j visible to query i only if i - j < sliding_window
  const int32_t* doc_ids = nullptr;  // [B, T] or null: query i sees key j only if their doc ids are equal
  const double* alibi_slopes = nullptr;  // [Hq] or null: score(i, j) += -slope[h] * (i - j)
  float dropout = 0.0f;                  // dropout probability on the attention probabilities, scaled 1/(1-p)
  uint64_t seed = 0, stream = 0;         // Philox key and stream; element index ((b*Hq + h)*T + i)*T + j
};

// The scale c of the scores.
inline double attention_scale(const AttentionShape& s, const AttentionOptions& opt) {
  return opt.scale != 0.0 ? opt.scale : 1.0 / std::sqrt(static_cast<double>(s.D));
}

// Whether key j is visible to query i in batch row b.
inline bool attention_visible(int b, int i, int j, const AttentionShape& s, const AttentionOptions& opt) {
  if (opt.causal && j > i) return false;
  if (opt.sliding_window > 0 && i - j >= opt.sliding_window) return false;
  if (opt.doc_ids != nullptr) {
    const size_t row = static_cast<size_t>(b) * s.T;
    if (opt.doc_ids[row + i] != opt.doc_ids[row + j]) return false;
  }
  return true;
}

// The dropout factor M_ij: 0 for a dropped entry, 1/(1-p) for a kept one, 1 without dropout.
inline double attention_dropout_factor(int b, int h, int i, int j, const AttentionShape& s,
                                       const AttentionOptions& opt) {
  if (opt.dropout <= 0.0f) return 1.0;
  const uint64_t index = ((static_cast<uint64_t>(b) * s.Hq + h) * s.T + i) * s.T + j;
  const bool keep = philox_uniform(opt.seed, opt.stream, index) >= opt.dropout;
  return keep ? 1.0 / (1.0 - static_cast<double>(opt.dropout)) : 0.0;
}

// Element offsets into the layouts above.
inline size_t attention_q_offset(int b, int t, int h, const AttentionShape& s) {
  return ((static_cast<size_t>(b) * s.T + t) * s.Hq + h) * s.D;
}
inline size_t attention_kv_offset(int b, int t, int g, const AttentionShape& s) {
  return ((static_cast<size_t>(b) * s.T + t) * s.Hkv + g) * s.D;
}
inline size_t attention_probs_offset(int b, int h, int i, const AttentionShape& s) {
  return ((static_cast<size_t>(b) * s.Hq + h) * s.T + i) * s.T;
}

// out [B,T,Hq,D], probs [B,Hq,T,T] (before dropout) from q [B,T,Hq,D], k and v [B,T,Hkv,D].
template <typename T>
void attention_forward(T* out, T* probs, const T* q, const T* k, const T* v, const AttentionShape& s,
                       const AttentionOptions& opt) {
  assert(s.Hkv > 0 && s.Hq % s.Hkv == 0);
  assert(opt.dropout >= 0.0f && opt.dropout < 1.0f);
  const int group = s.Hq / s.Hkv;
  const T c = static_cast<T>(attention_scale(s, opt));
#if defined(_OPENMP)
#pragma omp parallel for collapse(2) schedule(static)
#endif
  for (int b = 0; b < s.B; ++b) {
    for (int g = 0; g < s.Hkv; ++g) {
      for (int h = g * group; h < (g + 1) * group; ++h) {
        const T slope = opt.alibi_slopes != nullptr ? static_cast<T>(opt.alibi_slopes[h]) : T(0);
        for (int i = 0; i < s.T; ++i) {
          const T* qi = q + attention_q_offset(b, i, h, s);
          T* p = probs + attention_probs_offset(b, h, i, s);
          // Scores of the visible keys and their maximum; masked entries are exactly 0 in P.
          T row_max = T(0);
          bool any = false;
          for (int j = 0; j < s.T; ++j) {
            p[j] = T(0);
            if (!attention_visible(b, i, j, s, opt)) continue;
            const T* kj = k + attention_kv_offset(b, j, g, s);
            T dot = T(0);
            for (int d = 0; d < s.D; ++d) dot += qi[d] * kj[d];
            const T score = c * dot - slope * static_cast<T>(i - j);
            p[j] = score;  // temporarily holds the score
            if (!any || score > row_max) row_max = score;
            any = true;
          }
          // Stable softmax over the visible keys.
          T z = T(0);
          for (int j = 0; j < s.T; ++j) {
            if (!attention_visible(b, i, j, s, opt)) continue;
            p[j] = std::exp(p[j] - row_max);
            z += p[j];
          }
          for (int j = 0; j < s.T; ++j) p[j] /= z;
          // o_i = sum_j P_ij M_ij v_j.
          T* oi = out + attention_q_offset(b, i, h, s);
          for (int d = 0; d < s.D; ++d) oi[d] = T(0);
          for (int j = 0; j < s.T; ++j) {
            if (p[j] == T(0)) continue;
            const T a = p[j] * static_cast<T>(attention_dropout_factor(b, h, i, j, s, opt));
            if (a == T(0)) continue;
            const T* vj = v + attention_kv_offset(b, j, g, s);
            for (int d = 0; d < s.D; ++d) oi[d] += a * vj[d];
          }
        }
      }
    }
  }
}

// dq [B,T,Hq,D], dk and dv [B,T,Hkv,D] (all overwritten) from dout [B,T,Hq,D] and the forward's probs, q, k,
// v. The options must be those of the forward pass (same mask, ALiBi, dropout seed and stream).
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* probs, const T* q, const T* k,
                        const T* v, const AttentionShape& s, const AttentionOptions& opt) {
  assert(s.Hkv > 0 && s.Hq % s.Hkv == 0);
  assert(opt.dropout >= 0.0f && opt.dropout < 1.0f);
  const int group = s.Hq / s.Hkv;
  const T c = static_cast<T>(attention_scale(s, opt));
#if defined(_OPENMP)
#pragma omp parallel for collapse(2) schedule(static)
#endif
  for (int b = 0; b < s.B; ++b) {
    for (int g = 0; g < s.Hkv; ++g) {
      // This thread owns K/V head g of row b: clear its dK, dV, then add the r query heads that read it.
      for (int t = 0; t < s.T; ++t) {
        for (int d = 0; d < s.D; ++d) {
          dk[attention_kv_offset(b, t, g, s) + d] = T(0);
          dv[attention_kv_offset(b, t, g, s) + d] = T(0);
        }
      }
      std::vector<T> dp(static_cast<size_t>(s.T));  // dP_ij for the current row i
      for (int h = g * group; h < (g + 1) * group; ++h) {
        for (int i = 0; i < s.T; ++i) {
          const T* p = probs + attention_probs_offset(b, h, i, s);
          const T* qi = q + attention_q_offset(b, i, h, s);
          const T* doi = dout + attention_q_offset(b, i, h, s);
          T* dqi = dq + attention_q_offset(b, i, h, s);
          // (a), (b): dA_ij = <dO_i, v_j>, dP_ij = M_ij dA_ij, dV_j += A_ij dO_i; and rowsum_i.
          T rowsum = T(0);
          for (int j = 0; j < s.T; ++j) {
            dp[j] = T(0);
            if (!attention_visible(b, i, j, s, opt)) continue;
            const T m = static_cast<T>(attention_dropout_factor(b, h, i, j, s, opt));
            if (m == T(0)) continue;  // dropped: no gradient to P_ij or v_j
            const T* vj = v + attention_kv_offset(b, j, g, s);
            T* dvj = dv + attention_kv_offset(b, j, g, s);
            T da = T(0);
            for (int d = 0; d < s.D; ++d) da += doi[d] * vj[d];
            dp[j] = m * da;
            rowsum += p[j] * dp[j];
            const T a = p[j] * m;
            for (int d = 0; d < s.D; ++d) dvj[d] += a * doi[d];
          }
          // (c), (d): dS_ij = P_ij (dP_ij - rowsum_i); dQ_i = c sum_j dS_ij k_j; dK_j += c dS_ij q_i.
          for (int d = 0; d < s.D; ++d) dqi[d] = T(0);
          for (int j = 0; j < s.T; ++j) {
            if (!attention_visible(b, i, j, s, opt)) continue;
            const T ds = p[j] * (dp[j] - rowsum);
            const T* kj = k + attention_kv_offset(b, j, g, s);
            T* dkj = dk + attention_kv_offset(b, j, g, s);
            for (int d = 0; d < s.D; ++d) {
              dqi[d] += c * ds * kj[d];
              dkj[d] += c * ds * qi[d];
            }
          }
        }
      }
    }
  }
}

}  // namespace llm::ref
