// NF4 (4-bit NormalFloat) weight quantisation with double quantisation, as bitsandbytes stores it for
// QLoRA, and the forward/backward of a frozen NF4 linear layer.
//
// Code table. NF4 has 16 values in [-1, 1] placed at quantiles of N(0, 1) (Dettmers et al., "QLoRA",
// 2023): 7 negative, an exact 0, 8 positive, normalised so the ends are -1 and 1. kNf4Code below holds
// the float32 values bitsandbytes uses (get_4bit_type("nf4")); a 4-bit code is an index into this table
// (sorted ascending), not a floating-point encoding.
//
// Quantisation of a flat array w[0..n) in blocks of `blocksize` (64 by default):
//   absmax_b = max_{j in b} |w_j|                              (fp32, one per block)
//   s_j      = clamp(w_j * (1 / absmax_b), -1, 1)              (reciprocal first, as bitsandbytes does;
//                                                               a partial last block divides instead)
//   q_j      = #{ i : m_i < s_j },  m_i = (c_i + c_{i+1}) / 2  (nearest code; a tie on a midpoint goes to
//                                                               the lower code, like torch.bucketize and
//                                                               the CUDA comparison tree's `x > m`)
// absmax is clamped below at 1e-38 before the reciprocal, so an all-zero block quantises to code 7 (0).
// Packing: two codes per byte, element 2k in the HIGH nibble and element 2k+1 in the low nibble; an odd
// n pads the last low nibble with the code of 0.
//
// Dequantisation: w'_j = c[q_j] * absmax_b (fp32). The error bound follows from nearest rounding:
//   |w_j - w'_j| <= absmax_b * max_i (c_{i+1} - c_i) / 2   (+ fp32 rounding of the products).
//
// Double quantisation (bitsandbytes' compress_statistics). The fp32 absmax values (one per 64 weights)
// are compressed to 8 bits:
//   offset = mean(absmax)                                      (one fp32 number)
//   a_b    = absmax_b - offset, quantised blockwise in blocks of 256 with the signed dynamic 8-bit map
//            (create_dynamic_map(signed=True)) and an fp32 absmax per block of 256 ("state2"),
//            by the same nearest-code rule;
//   absmax'_b = dyn[qa_b] * state2_{b/256} + offset.
// The dynamic map: for e = 0..6 the magnitudes 10^(e-6) * (midpoints of linspace(0.1, 1, 2^e + 1)),
// with both signs (254 values), plus 0 and 1, sorted (kDynamicMapSigned below).
//
// Frozen NF4 linear (the QLoRA base layer), weight [O, I] flattened row-major:
//   out = x deq(W)^T + b,     dx = G deq(W)   (no weight gradient: the base is frozen).
// The reference simply dequantises and calls linear.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/cpu/linear.h"

namespace llm::ref {

inline constexpr float kNf4Code[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};
inline constexpr int kNf4BlockSize = 64;
inline constexpr int kNf4NestedBlockSize = 256;
inline constexpr uint8_t kNf4ZeroCode = 7;

// Index of the nearest entry of the sorted table code[0..size): the number of midpoints strictly below s.
inline int nearest_code_index(const float* code, int size, float s) {
  int q = 0;
  for (int i = 0; i + 1 < size; ++i) {
    const float mid = (code[i] + code[i + 1]) / 2.0f;
    if (s > mid) q = i + 1;
  }
  return q;
}

inline uint8_t nf4_quantize_value(float s) {
  return static_cast<uint8_t>(nearest_code_index(kNf4Code, 16, s));
}

// Largest half-gap of the NF4 table (between -1 and the next code): the worst rounding error per unit
// of absmax.
inline float nf4_max_half_gap() {
  float g = 0;
  for (int i = 0; i < 15; ++i) g = std::fmax(g, (kNf4Code[i + 1] - kNf4Code[i]) / 2.0f);
  return g;
}

inline size_t blocks_for(size_t n, int blocksize) {
  return (n + static_cast<size_t>(blocksize) - 1) / blocksize;
}

namespace detail {

// Shared blockwise absmax quantiser (4-bit NF4 table or the 8-bit dynamic map): writes one code per
// element to q and one absmax per block.
inline void quantize_blockwise_codes(uint8_t* q, float* absmax, const float* x, size_t n, int blocksize,
                                     const float* code, int code_size) {
  const size_t blocks = blocks_for(n, blocksize);
  for (size_t b = 0; b < blocks; ++b) {
    const size_t begin = b * blocksize;
    const size_t end = std::min(n, begin + static_cast<size_t>(blocksize));
    float am = 0.0f;
    for (size_t j = begin; j < end; ++j) am = std::fmax(am, std::fabs(x[j]));
    absmax[b] = am;
    const float safe = std::fmax(am, 1e-38f);
    const bool full = end - begin == static_cast<size_t>(blocksize);
    const float inv = 1.0f / safe;
    for (size_t j = begin; j < end; ++j) {
      float s = full ? x[j] * inv : x[j] / safe;
      s = std::fmin(std::fmax(s, -1.0f), 1.0f);
      q[j] = static_cast<uint8_t>(nearest_code_index(code, code_size, s));
    }
  }
}

}  // namespace detail

// packed: [(n + 1) / 2]; absmax: [ceil(n / blocksize)]; w: [n].
inline void nf4_quantize(uint8_t* packed, float* absmax, const float* w, size_t n,
                         int blocksize = kNf4BlockSize) {
  std::vector<uint8_t> q(n);
  detail::quantize_blockwise_codes(q.data(), absmax, w, n, blocksize, kNf4Code, 16);
  for (size_t k = 0; 2 * k < n; ++k) {
    const uint8_t hi = q[2 * k];
    const uint8_t lo = 2 * k + 1 < n ? q[2 * k + 1] : kNf4ZeroCode;
    packed[k] = static_cast<uint8_t>((hi << 4) | lo);
  }
}

// Code of element j of a packed array: high nibble for even j, low nibble for odd j.
inline uint8_t nf4_code_at(const uint8_t* packed, size_t j) {
  const uint8_t byte = packed[j / 2];
  return (j % 2 == 0) ? static_cast<uint8_t>(byte >> 4) : static_cast<uint8_t>(byte & 0xF);
}

// w: [n] (fp32 or double) = code * absmax of its block, the product taken in fp32.
template <typename T>
void nf4_dequantize(T* w, const uint8_t* packed, const float* absmax, size_t n,
                    int blocksize = kNf4BlockSize) {
  for (size_t j = 0; j < n; ++j)
    w[j] = static_cast<T>(kNf4Code[nf4_code_at(packed, j)] * absmax[j / blocksize]);
}

// bitsandbytes' signed dynamic 8-bit map, create_dynamic_map(signed=True, max_exponent_bits=7,
// total_bits=8): 256 sorted float32 values. For e = 0..6 it takes the 2^e pairwise means of
// linspace(0.1, 1, 2^e + 1), times 10^(e - 6), with both signs (254 values), then adds 0 and 1.
// torch computes linspace and the products in float32 with its own (vectorised) rounding, which a plain
// formula reproduces only to about one ulp, so the exact float32 values are tabulated here; they were
// printed by `dev/reference/nf4_fixtures.py --print-dynamic-map`; tests/cpu/test_nf4.cpp checks
// them against the formula below (to 2 ulp), tests/model/test_nf4_bnb.cpp against bitsandbytes (bitwise).
inline constexpr float kDynamicMapSigned[256] = {
    -0x1.fc6666p-1f,  -0x1.f53334p-1f,  -0x1.eep-1f,      -0x1.e6ccccp-1f,  -0x1.df999ap-1f,
    -0x1.d86666p-1f,  -0x1.d13334p-1f,  -0x1.cap-1f,      -0x1.c2ccccp-1f,  -0x1.bb999ap-1f,
    -0x1.b46666p-1f,  -0x1.ad3334p-1f,  -0x1.a6p-1f,      -0x1.9eccccp-1f,  -0x1.97999ap-1f,
    -0x1.906666p-1f,  -0x1.893334p-1f,  -0x1.82p-1f,      -0x1.7accccp-1f,  -0x1.73999ap-1f,
    -0x1.6c6668p-1f,  -0x1.653334p-1f,  -0x1.5ep-1f,      -0x1.56ccccp-1f,  -0x1.4f999ap-1f,
    -0x1.486668p-1f,  -0x1.413334p-1f,  -0x1.3ap-1f,      -0x1.32ccccp-1f,  -0x1.2b999ap-1f,
    -0x1.246668p-1f,  -0x1.1d3334p-1f,  -0x1.16p-1f,      -0x1.0eccccp-1f,  -0x1.079998p-1f,
    -0x1.006666p-1f,  -0x1.f26664p-2f,  -0x1.e4p-2f,      -0x1.d59998p-2f,  -0x1.c73334p-2f,
    -0x1.b8ccccp-2f,  -0x1.aa6666p-2f,  -0x1.9cp-2f,      -0x1.8d9998p-2f,  -0x1.7f3334p-2f,
    -0x1.70ccccp-2f,  -0x1.626666p-2f,  -0x1.54p-2f,      -0x1.459998p-2f,  -0x1.373334p-2f,
    -0x1.28ccccp-2f,  -0x1.1a6668p-2f,  -0x1.0cp-2f,      -0x1.fb3332p-3f,  -0x1.de6666p-3f,
    -0x1.c1999ap-3f,  -0x1.a4ccccp-3f,  -0x1.88p-3f,      -0x1.6b3334p-3f,  -0x1.4e6666p-3f,
    -0x1.31999ap-3f,  -0x1.14ccccp-3f,  -0x1.fp-4f,       -0x1.b66668p-4f,  -0x1.93d70ap-4f,
    -0x1.8851eep-4f,  -0x1.7ccccep-4f,  -0x1.7147aep-4f,  -0x1.65c29p-4f,   -0x1.5a3d7p-4f,
    -0x1.4eb854p-4f,  -0x1.433334p-4f,  -0x1.37ae14p-4f,  -0x1.2c28f6p-4f,  -0x1.20a3d6p-4f,
    -0x1.151ebap-4f,  -0x1.09999ap-4f,  -0x1.fc28f6p-5f,  -0x1.e51ebap-5f,  -0x1.ce147ap-5f,
    -0x1.b70a3ep-5f,  -0x1.ap-5f,       -0x1.88f5c2p-5f,  -0x1.71eb86p-5f,  -0x1.5ae146p-5f,
    -0x1.43d70ap-5f,  -0x1.2ccccep-5f,  -0x1.15c29p-5f,   -0x1.fd70a4p-6f,  -0x1.cf5c2ap-6f,
    -0x1.a147aep-6f,  -0x1.733334p-6f,  -0x1.451ebap-6f,  -0x1.170a3ep-6f,  -0x1.d1eb86p-7f,
    -0x1.75c29p-7f,   -0x1.3e76c8p-7f,  -0x1.2c083p-7f,   -0x1.19999ap-7f,  -0x1.072b02p-7f,
    -0x1.e978d4p-8f,  -0x1.c49ba6p-8f,  -0x1.9fbe76p-8f,  -0x1.7ae148p-8f,  -0x1.56041ap-8f,
    -0x1.3126e8p-8f,  -0x1.0c49bap-8f,  -0x1.ced914p-9f,  -0x1.851eb8p-9f,  -0x1.3b645ap-9f,
    -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f,
    -0x1.3dd982p-11f, -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f,
    -0x1.b43528p-19f, -0x1.27476ep-21f, 0x0p+0f,          0x1.27476ep-21f,  0x1.b43528p-19f,
    0x1.040bfep-17f,  0x1.64840cp-16f,  0x1.6f0068p-15f,  0x1.15df66p-14f,  0x1.743e96p-14f,
    0x1.47ae16p-13f,  0x1.19ce0ap-12f,  0x1.8fc506p-12f,  0x1.02de02p-11f,  0x1.3dd982p-11f,
    0x1.78d5p-11f,    0x1.b3d07cp-11f,  0x1.eecbfep-11f,  0x1.4fdf3ap-10f,  0x1.e353f8p-10f,
    0x1.3b645ap-9f,   0x1.851eb8p-9f,   0x1.ced914p-9f,   0x1.0c49bap-8f,   0x1.3126e8p-8f,
    0x1.56041ap-8f,   0x1.7ae148p-8f,   0x1.9fbe76p-8f,   0x1.c49ba6p-8f,   0x1.e978d4p-8f,
    0x1.072b02p-7f,   0x1.19999ap-7f,   0x1.2c083p-7f,    0x1.3e76c8p-7f,   0x1.75c29p-7f,
    0x1.d1eb86p-7f,   0x1.170a3ep-6f,   0x1.451ebap-6f,   0x1.733334p-6f,   0x1.a147aep-6f,
    0x1.cf5c2ap-6f,   0x1.fd70a4p-6f,   0x1.15c29p-5f,    0x1.2ccccep-5f,   0x1.43d70ap-5f,
    0x1.5ae146p-5f,   0x1.71eb86p-5f,   0x1.88f5c2p-5f,   0x1.ap-5f,        0x1.b70a3ep-5f,
    0x1.ce147ap-5f,   0x1.e51ebap-5f,   0x1.fc28f6p-5f,   0x1.09999ap-4f,   0x1.151ebap-4f,
    0x1.20a3d6p-4f,   0x1.2c28f6p-4f,   0x1.37ae14p-4f,   0x1.433334p-4f,   0x1.4eb854p-4f,
    0x1.5a3d7p-4f,    0x1.65c29p-4f,    0x1.7147aep-4f,   0x1.7ccccep-4f,   0x1.8851eep-4f,
    0x1.93d70ap-4f,   0x1.b66668p-4f,   0x1.fp-4f,        0x1.14ccccp-3f,   0x1.31999ap-3f,
    0x1.4e6666p-3f,   0x1.6b3334p-3f,   0x1.88p-3f,       0x1.a4ccccp-3f,   0x1.c1999ap-3f,
    0x1.de6666p-3f,   0x1.fb3332p-3f,   0x1.0cp-2f,       0x1.1a6668p-2f,   0x1.28ccccp-2f,
    0x1.373334p-2f,   0x1.459998p-2f,   0x1.54p-2f,       0x1.626666p-2f,   0x1.70ccccp-2f,
    0x1.7f3334p-2f,   0x1.8d9998p-2f,   0x1.9cp-2f,       0x1.aa6666p-2f,   0x1.b8ccccp-2f,
    0x1.c73334p-2f,   0x1.d59998p-2f,   0x1.e4p-2f,       0x1.f26664p-2f,   0x1.006666p-1f,
    0x1.079998p-1f,   0x1.0eccccp-1f,   0x1.16p-1f,       0x1.1d3334p-1f,   0x1.246668p-1f,
    0x1.2b999ap-1f,   0x1.32ccccp-1f,   0x1.3ap-1f,       0x1.413334p-1f,   0x1.486668p-1f,
    0x1.4f999ap-1f,   0x1.56ccccp-1f,   0x1.5ep-1f,       0x1.653334p-1f,   0x1.6c6668p-1f,
    0x1.73999ap-1f,   0x1.7accccp-1f,   0x1.82p-1f,       0x1.893334p-1f,   0x1.906666p-1f,
    0x1.97999ap-1f,   0x1.9eccccp-1f,   0x1.a6p-1f,       0x1.ad3334p-1f,   0x1.b46666p-1f,
    0x1.bb999ap-1f,   0x1.c2ccccp-1f,   0x1.cap-1f,       0x1.d13334p-1f,   0x1.d86666p-1f,
    0x1.df999ap-1f,   0x1.e6ccccp-1f,   0x1.eep-1f,       0x1.f53334p-1f,   0x1.fc6666p-1f,
    0x1p+0f,
};

// The same map from the formula, evaluated in double (for the provenance test; not used to quantise).
inline std::vector<double> dynamic_map_signed_formula() {
  std::vector<double> data;
  for (int e = 0; e < 7; ++e) {
    const int k = (1 << e) + 1;
    const double mag = std::pow(10.0, e - 6);
    for (int i = 0; i + 1 < k; ++i) {
      const double lo = 0.1 + 0.9 * i / (k - 1), hi = 0.1 + 0.9 * (i + 1) / (k - 1);
      data.push_back(mag * (lo + hi) / 2.0);
      data.push_back(-mag * (lo + hi) / 2.0);
    }
  }
  data.push_back(0.0);
  data.push_back(1.0);
  std::sort(data.begin(), data.end());
  return data;
}

// Double quantisation of the NF4 absmax values.
// qabsmax: [nblocks] 8-bit codes; state2: [ceil(nblocks / blocksize2)] fp32 scales; *offset: the mean.
inline void nf4_double_quantize(uint8_t* qabsmax, float* state2, float* offset, const float* absmax,
                                size_t nblocks, int blocksize2 = kNf4NestedBlockSize) {
  double sum = 0.0;
  for (size_t b = 0; b < nblocks; ++b) sum += absmax[b];
  const float mean = nblocks > 0 ? static_cast<float>(sum / static_cast<double>(nblocks)) : 0.0f;
  *offset = mean;
  std::vector<float> centred(nblocks);
  for (size_t b = 0; b < nblocks; ++b) centred[b] = absmax[b] - mean;
  detail::quantize_blockwise_codes(qabsmax, state2, centred.data(), nblocks, blocksize2, kDynamicMapSigned,
                                   256);
}

// absmax: [nblocks] = dyn[qabsmax] * state2 + offset, in fp32.
inline void nf4_double_dequantize(float* absmax, const uint8_t* qabsmax, const float* state2, float offset,
                                  size_t nblocks, int blocksize2 = kNf4NestedBlockSize) {
  for (size_t b = 0; b < nblocks; ++b) {
    absmax[b] = kDynamicMapSigned[qabsmax[b]] * state2[b / blocksize2] + offset;
  }
}

// Frozen NF4 linear layer. out: [N, O]; x: [N, I]; packed/absmax: the NF4 weight [O, I] (absmax already
// double-dequantised if it was compressed); bias: [O] or null.
template <typename T>
void nf4_linear_forward(T* out, const T* x, const uint8_t* packed, const float* absmax,
                        const std::common_type_t<T>* bias, int N, int I, int O,
                        int blocksize = kNf4BlockSize) {
  std::vector<T> w(static_cast<size_t>(O) * I);
  nf4_dequantize(w.data(), packed, absmax, w.size(), blocksize);
  linear_forward(out, x, w.data(), bias, N, I, O);
}

// dx: [N, I] = dout deq(W) (= unless accumulate_dx, then +=). No weight gradient (frozen). The bias
// gradient, if the bias is trainable, is the column sum of dout (linear_backward with a null dx).
template <typename T>
void nf4_linear_backward_input(T* dx, const T* dout, const uint8_t* packed, const float* absmax, int N, int I,
                               int O, int blocksize = kNf4BlockSize, bool accumulate_dx = false) {
  std::vector<T> w(static_cast<size_t>(O) * I);
  nf4_dequantize(w.data(), packed, absmax, w.size(), blocksize);
  linear_backward(dx, static_cast<T*>(nullptr), static_cast<T*>(nullptr), dout,
                  static_cast<const T*>(nullptr), w.data(), N, I, O, accumulate_dx);
}

}  // namespace llm::ref
