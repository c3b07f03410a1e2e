// Inverted dropout with a counter-based mask.
//
// Forward. Each element i draws u_i = philox_mask_uniform(seed, stream, i), uniform on the 16-bit grid
// {0, 1/65536, ..., 65535/65536} (kernels/philox.h: one Philox call serves eight elements), and
//   keep_i = [u_i >= p]                         (so P(keep) = 1 - p)
//   out_i  = keep_i * in_i / (1 - p).
// Scaling the kept elements by 1/(1 - p) makes E[out_i] = in_i, so nothing changes at evaluation time,
// when dropout is simply switched off.
//
// Backward. For a fixed mask the op is linear and diagonal, d out_i / d in_i = keep_i / (1 - p), so
//   din_i = keep_i * dout_i / (1 - p).
// The mask is not stored: the backward pass draws with the same (seed, stream, i) and gets
// the same u_i, and a CUDA kernel doing the same draws the same numbers. `stream` must therefore name the
// use (layer, site, step) uniquely, and the forward and backward calls of one use must pass equal values.
//
// Edge cases: p == 0 copies (no draws); p >= 1 drops everything (out = 0 rather than 0 * inf).
// The scale is 1 / (1 - p) evaluated in T, i.e. in float for training, as the CUDA kernel does.
// din is an activation gradient and is overwritten (=).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/philox.h"

namespace llm::ref {

namespace detail {

// visit(i, keep_i) for 0 <= i < n with 0 < p < 1: one Philox call per block of eight elements (the packed
// stream of kernels/philox.h), blocks in parallel for large n.
template <typename Visit>
void for_each_keep(size_t n, float p, uint64_t seed, uint64_t stream, Visit visit) {
  const int64_t blocks = static_cast<int64_t>((n + 7) / 8);
#pragma omp parallel for schedule(static) if (blocks >= (1 << 13))
  for (int64_t b = 0; b < blocks; ++b) {
    const llm::Philox4 draws = llm::philox_at(seed, stream, static_cast<uint64_t>(b));
    const size_t first = static_cast<size_t>(b) * 8;
    for (size_t i = first; i < first + 8 && i < n; ++i) {
      visit(i, llm::philox_mask_lane(draws, static_cast<int>(i - first)) >= p);
    }
  }
}

// Shared by forward and backward: dst_i = keep_i * src_i / (1 - p).
template <typename T>
void dropout_apply(T* dst, const T* src, size_t n, float p, uint64_t seed, uint64_t stream) {
  if (p <= 0.0f) {
    for (size_t i = 0; i < n; ++i) dst[i] = src[i];
    return;
  }
  if (p >= 1.0f) {
    for (size_t i = 0; i < n; ++i) dst[i] = 0;
    return;
  }
  const T scale = T(1) / (T(1) - static_cast<T>(p));
  for_each_keep(n, p, seed, stream, [&](size_t i, bool keep) { dst[i] = keep ? src[i] * scale : T(0); });
}

}  // namespace detail

// out, in: [n]. out may alias in.
template <typename T>
void dropout_forward(T* out, const T* in, size_t n, float p, uint64_t seed, uint64_t stream) {
  detail::dropout_apply(out, in, n, p, seed, stream);
}

// din, dout: [n]; din overwritten. p, seed and stream must be those of the forward call.
template <typename T>
void dropout_backward(T* din, const T* dout, size_t n, float p, uint64_t seed, uint64_t stream) {
  detail::dropout_apply(din, dout, n, p, seed, stream);
}

// For a caller that applies one mask to several arrays (LoRA's backward: x~ and dx~): keep[i] = keep_i,
// drawn once, and dst_i = keep_i * src_i / (1 - p), bit for bit what dropout_forward / dropout_backward
// give with the same p, seed and stream.
inline void dropout_keep_mask(uint8_t* keep, size_t n, float p, uint64_t seed, uint64_t stream) {
  if (p <= 0.0f || p >= 1.0f) {
    for (size_t i = 0; i < n; ++i) keep[i] = p <= 0.0f;
    return;
  }
  detail::for_each_keep(n, p, seed, stream, [&](size_t i, bool kept) { keep[i] = kept; });
}

template <typename T>
void dropout_apply_mask(T* dst, const T* src, const uint8_t* keep, size_t n, float p) {
  if (p <= 0.0f) {
    for (size_t i = 0; i < n; ++i) dst[i] = src[i];
    return;
  }
  const T scale = T(1) / (T(1) - static_cast<T>(p));
  for (size_t i = 0; i < n; ++i) dst[i] = keep[i] ? src[i] * scale : T(0);
}

}  // namespace llm::ref
