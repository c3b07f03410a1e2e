// Position information: learned absolute positions, the sinusoidal table, rotary embeddings (RoPE) with
// their context-extension scalings (linear, Llama 3, YaRN), and ALiBi slopes.
//
// Notation: N token rows, C hidden size, H heads of size D, p = pos[n] the position of token row n. Positions
// are passed explicitly, so packed documents can restart their positions at 0.
//
// 1. Learned absolute positions (GPT-2). A trainable table W of maxT rows is added to the residual stream:
//      x_out[n, c] = x_in[n, c] + W[p, c].
//    Backward: d x_out / d x_in is the identity, so the residual-stream gradient passes through unchanged
//    (nothing to compute). d x_out[n, c] / d W[q, c'] = [q == p][c == c'], hence
//      dL/dW[q, c] = sum_{n : pos[n] == q} dL/dx_out[n, c],
//    the same scatter-add as the token embedding. W is a parameter: its gradient accumulates (+=).
//
// 2. Sinusoidal positions (Vaswani et al., 2017). A fixed table with, for column pair i = 0, 1, ...,
//      table[p, 2i]     = sin(p / 10000^(2i / C))
//      table[p, 2i + 1] = cos(p / 10000^(2i / C)).
//    If C is odd the last column is a sine. It is added with add_position_embedding_forward and is not
//    trained (so no backward pass is needed).
//
// 3. Rotary position embedding (Su et al., RoFormer). Each head vector x (length D, D even) is split into
//    D/2 pairs. We use the Hugging Face "rotate_half" pairing: pair i couples a = x[i] and b = x[i + D/2].
//    Pair i rotates at angular frequency w_i = theta^(-2i / D), so at position p by the angle phi = p * w_i:
//      out[i]       = s * (a cos(phi) - b sin(phi))
//      out[i + D/2] = s * (b cos(phi) + a sin(phi))
//    i.e. (out_a, out_b) = s R(phi) (a, b) with the 2x2 rotation R(phi) = [[cos, -sin], [sin, cos]]. The
//    scale s is the attention scaling (1 except for YaRN); we fold it into the tables: cos_table = s cos,
//    sin_table = s sin. Properties (s = 1): |out| = |x| (rotations preserve length); p = 0 is the identity;
//    and since 2D rotations compose by adding angles and R(phi)^T = R(-phi),
//      <R(m w) q, R(n w) k> = <q, R(m w)^T R(n w) k> = <q, R((n - m) w) k>,
//    so the query-key dot product depends only on the offset n - m (relative position).
//    Backward: the Jacobian of (out_a, out_b) with respect to (a, b) is J = s R(phi), so
//      (da, db) = J^T (g_a, g_b) = s R(-phi) (g_a, g_b):
//      din[i]       = g_a * (s cos) + g_b * (s sin)
//      din[i + D/2] = g_b * (s cos) - g_a * (s sin)
//    with g = dL/dout. The input is an activation (q or k), so din is overwritten (=).
//
// 4. RoPE frequency scalings, as in Hugging Face transformers' modeling_rope_utils. Let w_i = theta^(-2i/D),
//    i = 0 .. D/2 - 1, be the unscaled frequencies, f the scaling factor and L the original (pre-training)
//    context length ("original_max_position_embeddings").
//    - Linear (position interpolation): w_i' = w_i / f (the same as feeding positions p / f).
//    - Llama 3: with wavelength lambda_i = 2 pi / w_i and the two cut-offs
//        lambda_low = L / low_freq_factor,  lambda_high = L / high_freq_factor,
//      long wavelengths (lambda_i > lambda_low) are interpolated, w_i' = w_i / f; short ones (lambda_i <
//      lambda_high) are kept, w_i' = w_i; in between the two are blended with
//        t = (L / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor),
//        w_i' = (1 - t) w_i / f + t w_i.
//      (t is 0 at lambda_low and 1 at lambda_high, so w_i' is continuous.) No attention scaling.
//    - YaRN (Peng et al., 2023): pair i completes L / lambda_i turns over the original context. Solving
//      L / lambda_i = r for i gives the "correction dimension"
//        i(r) = D ln(L / (2 pi r)) / (2 ln theta).
//      Pairs that turn at least beta_fast times keep w_i (extrapolation), pairs that turn at most beta_slow
//      times are interpolated to w_i / f, and a linear ramp blends the range in between:
//        lo = floor(i(beta_fast)), hi = ceil(i(beta_slow))   (no floor/ceil when truncate is false)
//        lo = max(lo, 0), hi = min(hi, D - 1), and if lo == hi then hi += 0.001 (avoids dividing by zero)
//        ramp_i = clamp((i - lo) / (hi - lo), 0, 1),  e_i = 1 - ramp_i  (the extrapolation weight)
//        w_i' = (w_i / f) (1 - e_i) + w_i e_i.
//      The softmax gets sharper with the attention factor s = 0.1 ln(f) + 1 (1 when f <= 1), applied to
//      cos and sin (so q.k scales by s^2), unless the config sets it explicitly.
//
// 5. ALiBi (Press et al., 2022). No position embedding; the attention score (i, j) of head h gets
//    -m_h (i - j). For n heads, n a power of two, m_h = 2^(-8 h / n), h = 1 .. n (a geometric sequence from
//    2^(-8/n) to 2^-8). Otherwise, with n' the largest power of two below n, take the n' slopes for n', then
//    the slopes for 2 n' at odd h = 1, 3, 5, ... until n slopes are had. ALiBi has no parameters.
#pragma once

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace llm::ref {

// ---------------------------------------------------------------------------------------------------------
// Learned absolute positions and the sinusoidal table.

// x[n, :] += wpe[pos[n], :] in place. x [N, C], wpe [maxT, C], pos [N] in [0, maxT).
template <typename T>
void add_position_embedding_forward(T* x, const T* wpe, const int32_t* pos, int N, int C) {
  for (int n = 0; n < N; ++n) {
    assert(pos[n] >= 0);
    const T* wpe_row = wpe + static_cast<size_t>(pos[n]) * C;
    T* x_row = x + static_cast<size_t>(n) * C;
    for (int c = 0; c < C; ++c) x_row[c] += wpe_row[c];
  }
}

// dwpe[pos[n], :] += dx[n, :] in increasing n (deterministic). dwpe accumulates (+=). The gradient of x
// itself passes through unchanged, so there is nothing to write for it.
template <typename T>
void add_position_embedding_backward(T* dwpe, const T* dx, const int32_t* pos, int N, int C) {
  for (int n = 0; n < N; ++n) {
    assert(pos[n] >= 0);
    T* dwpe_row = dwpe + static_cast<size_t>(pos[n]) * C;
    const T* dx_row = dx + static_cast<size_t>(n) * C;
    for (int c = 0; c < C; ++c) dwpe_row[c] += dx_row[c];
  }
}

// table[p, 2i] = sin(p / 10000^(2i/C)), table[p, 2i+1] = cos(p / 10000^(2i/C)). table is [maxT, C].
template <typename T>
void sinusoidal_table(T* table, int maxT, int C) {
  for (int p = 0; p < maxT; ++p) {
    for (int c = 0; c < C; ++c) {
      const int pair = c / 2;
      const double angle = p / std::pow(10000.0, 2.0 * pair / C);
      table[static_cast<size_t>(p) * C + c] = static_cast<T>(c % 2 == 0 ? std::sin(angle) : std::cos(angle));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// RoPE.

constexpr double kRopePi = 3.14159265358979323846;

enum class RopeScaling { kNone, kLinear, kLlama3, kYarn };

struct RopeParams {
  int head_dim = 64;
  double theta = 10000.0;
  RopeScaling scaling = RopeScaling::kNone;
  double factor = 1.0;                       // linear, llama3, yarn
  int original_max_position = 0;             // llama3, yarn (HF original_max_position_embeddings)
  double low_freq_factor = 1.0;              // llama3
  double high_freq_factor = 4.0;             // llama3
  double beta_fast = 32.0, beta_slow = 1.0;  // yarn
  double attention_factor = 0.0;             // yarn: 0 means the default 0.1*ln(factor)+1 (1 when factor<=1)
  bool truncate = true;  // yarn: floor/ceil the correction range (HF rope_parameters "truncate")
};

// The unscaled frequencies w_i = theta^(-2i/D), i = 0 .. D/2-1.
inline std::vector<double> rope_base_inv_freq(int head_dim, double theta) {
  std::vector<double> inv_freq(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) inv_freq[i] = 1.0 / std::pow(theta, 2.0 * i / head_dim);
  return inv_freq;
}

// YaRN's correction dimension: the (fractional) pair index whose pair turns `rotations` times over
// `original_max_position` positions.
inline double yarn_correction_dim(double rotations, int head_dim, double theta, int original_max_position) {
  return head_dim * std::log(original_max_position / (rotations * 2.0 * kRopePi)) / (2.0 * std::log(theta));
}

// The D/2 frequencies after scaling (section 4 of the comment at the top).
inline std::vector<double> rope_inv_freq(const RopeParams& params) {
  const int D = params.head_dim;
  if (D <= 0 || D % 2 != 0) throw std::invalid_argument("rope_inv_freq: head_dim must be positive and even");
  std::vector<double> inv_freq = rope_base_inv_freq(D, params.theta);
  const double f = params.factor;
  const double L = params.original_max_position;
  if ((params.scaling == RopeScaling::kLlama3 || params.scaling == RopeScaling::kYarn) && L <= 0) {
    throw std::invalid_argument("rope_inv_freq: llama3 and yarn need original_max_position > 0");
  }

  switch (params.scaling) {
    case RopeScaling::kNone:
      break;

    case RopeScaling::kLinear:
      for (double& w : inv_freq) w /= f;
      break;

    case RopeScaling::kLlama3: {
      const double low_freq_wavelen = L / params.low_freq_factor;
      const double high_freq_wavelen = L / params.high_freq_factor;
      for (double& w : inv_freq) {
        const double wavelen = 2.0 * kRopePi / w;
        if (wavelen < high_freq_wavelen) continue;  // high frequency: kept
        if (wavelen > low_freq_wavelen) {           // low frequency: interpolated
          w /= f;
          continue;
        }
        const double smooth =
            (L / wavelen - params.low_freq_factor) / (params.high_freq_factor - params.low_freq_factor);
        w = (1.0 - smooth) * w / f + smooth * w;
      }
      break;
    }

    case RopeScaling::kYarn: {
      double lo = yarn_correction_dim(params.beta_fast, D, params.theta, params.original_max_position);
      double hi = yarn_correction_dim(params.beta_slow, D, params.theta, params.original_max_position);
      if (params.truncate) {
        lo = std::floor(lo);
        hi = std::ceil(hi);
      }
      lo = std::max(lo, 0.0);
      hi = std::min(hi, static_cast<double>(D - 1));
      if (lo == hi) hi += 0.001;
      for (int i = 0; i < D / 2; ++i) {
        const double ramp = std::clamp((i - lo) / (hi - lo), 0.0, 1.0);
        const double extrapolation_weight = 1.0 - ramp;
        const double w = inv_freq[i];
        inv_freq[i] = (w / f) * (1.0 - extrapolation_weight) + w * extrapolation_weight;
      }
      break;
    }
  }
  return inv_freq;
}

// The factor applied to cos and sin: YaRN's attention factor, 1 for every other scaling.
inline double rope_attention_scaling(const RopeParams& params) {
  if (params.scaling != RopeScaling::kYarn) return 1.0;
  if (params.attention_factor != 0.0) return params.attention_factor;
  if (params.factor <= 1.0) return 1.0;
  return 0.1 * std::log(params.factor) + 1.0;
}

// cos_table[p, i] = s cos(p w_i'), sin_table[p, i] = s sin(p w_i'), both [maxT, D/2], with w' = rope_inv_freq
// and s = rope_attention_scaling. Angles are computed in double.
template <typename T>
void rope_tables(T* cos_table, T* sin_table, const RopeParams& params, int maxT) {
  const std::vector<double> inv_freq = rope_inv_freq(params);
  const double scale = rope_attention_scaling(params);
  const int half = params.head_dim / 2;
  for (int p = 0; p < maxT; ++p) {
    for (int i = 0; i < half; ++i) {
      const double angle = static_cast<double>(p) * inv_freq[i];
      cos_table[static_cast<size_t>(p) * half + i] = static_cast<T>(scale * std::cos(angle));
      sin_table[static_cast<size_t>(p) * half + i] = static_cast<T>(scale * std::sin(angle));
    }
  }
}

// Rotates every head vector of in [N, H, D] by its row's position; tables are [maxT, D/2]. out may alias in.
//   out[i]       = in[i] cos - in[i+D/2] sin
//   out[i+D/2]   = in[i+D/2] cos + in[i] sin
template <typename T>
void rope_forward(T* out, const T* in, const T* cos_table, const T* sin_table, const int32_t* pos, int N,
                  int H, int D) {
  assert(D % 2 == 0);
  const int half = D / 2;
  for (int n = 0; n < N; ++n) {
    assert(pos[n] >= 0);
    const T* cos_row = cos_table + static_cast<size_t>(pos[n]) * half;
    const T* sin_row = sin_table + static_cast<size_t>(pos[n]) * half;
    for (int h = 0; h < H; ++h) {
      const size_t base = (static_cast<size_t>(n) * H + h) * D;
      for (int i = 0; i < half; ++i) {
        const T a = in[base + i];
        const T b = in[base + i + half];
        out[base + i] = a * cos_row[i] - b * sin_row[i];
        out[base + i + half] = b * cos_row[i] + a * sin_row[i];
      }
    }
  }
}

// The transposed rotation: din = R^T dout per pair (din overwritten; may alias dout).
//   din[i]       = dout[i] cos + dout[i+D/2] sin
//   din[i+D/2]   = dout[i+D/2] cos - dout[i] sin
template <typename T>
void rope_backward(T* din, const T* dout, const T* cos_table, const T* sin_table, const int32_t* pos, int N,
                   int H, int D) {
  assert(D % 2 == 0);
  const int half = D / 2;
  for (int n = 0; n < N; ++n) {
    assert(pos[n] >= 0);
    const T* cos_row = cos_table + static_cast<size_t>(pos[n]) * half;
    const T* sin_row = sin_table + static_cast<size_t>(pos[n]) * half;
    for (int h = 0; h < H; ++h) {
      const size_t base = (static_cast<size_t>(n) * H + h) * D;
      for (int i = 0; i < half; ++i) {
        const T ga = dout[base + i];
        const T gb = dout[base + i + half];
        din[base + i] = ga * cos_row[i] + gb * sin_row[i];
        din[base + i + half] = gb * cos_row[i] - ga * sin_row[i];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// ALiBi.

// Slopes m_h for n_heads heads (section 5 of the comment at the top). The attention op adds -m_h (i - j) to
// score(i, j).
inline std::vector<double> alibi_slopes(int n_heads) {
  std::vector<double> slopes;
  if (n_heads <= 0) return slopes;
  int power_of_two = 1;
  while (power_of_two * 2 <= n_heads) power_of_two *= 2;
  for (int h = 1; h <= power_of_two; ++h) slopes.push_back(std::pow(2.0, -8.0 * h / power_of_two));
  for (int h = 1; static_cast<int>(slopes.size()) < n_heads; h += 2) {
    slopes.push_back(std::pow(2.0, -8.0 * h / (2 * power_of_two)));
  }
  return slopes;
}

}  // namespace llm::ref
