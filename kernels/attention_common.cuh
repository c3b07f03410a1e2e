// Shared by the two CUDA attention paths (kernels/attention_simple.cuh, kernels/attention_flash.cuh):
// the shape and options structs that mirror ref::AttentionShape / ref::AttentionOptions, the kernel
// parameter block, and the per-element rules (visibility, score, dropout factor) written once so that
// both paths apply exactly the semantics of the CPU reference, kernels/cpu/attention.h:
//
//   s_ij = c * <q_i, k_j> - slope_h * (i - j)           c = scale (1/sqrt(D) unless given)
//   visible(i, j) = (!causal || j <= i) && (W == 0 || i - j < W) && (no doc ids || doc[b,i] == doc[b,j])
//   M_ij = [philox_uniform(seed, stream, ((b*Hq + h)*T + i)*T + j) >= p] / (1 - p)
//
// The constants c and 1/(1-p) are computed on the host in double and rounded to float once, exactly as
// the float CPU reference does, so the dropout mask and its scale are bit-identical on both sides.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda_common.cuh"
#include "kernels/nvtx.cuh"  // NvtxRange
#include "kernels/philox.h"

namespace llm::cuda {

// Mirrors ref::AttentionShape: q, out [B, T, Hq, D]; k, v [B, T, Hkv, D]; Hq % Hkv == 0.
struct AttentionShape {
  int B = 0, T = 0, Hq = 0, Hkv = 0, D = 0;
};

// Which fused kernel attention_flash_* runs. kAuto picks the mma.sync tensor-core kernels
// (kernels/attention_mma.cuh) for bf16 storage with D in {64, 128} and 16-byte aligned pointers, and the
// fp32 FMA kernels otherwise. kTensorCore selects the WMMA tensor-core kernels (the readable version of
// the same plan, kept as the fast kernels' oracle) and kMma the mma.sync kernels; both throw when the
// storage, head size or alignment does not allow them.
enum class AttentionKernel { kAuto, kFma, kTensorCore, kMma };

// Mirrors ref::AttentionOptions with device pointers and float constants. Pointers are DEVICE pointers.
struct AttentionOptions {
  double scale = 0.0;                   // 0 means 1/sqrt(D)
  bool causal = true;                   // key j visible to query i only if j <= i
  int sliding_window = 0;               // 0 = none; else visible only if i - j < sliding_window
  const int32_t* doc_ids = nullptr;     // device [B, T] or null: visible only if doc ids are equal
  const float* alibi_slopes = nullptr;  // device [Hq] or null: score(i, j) += -slope[h] * (i - j)
  float dropout = 0.0f;                 // dropout probability on the probabilities, in [0, 1)
  uint64_t seed = 0, stream = 0;        // Philox key and stream (see kernels/philox.h)
  AttentionKernel kernel = AttentionKernel::kAuto;  // flash path only
};

// Everything a kernel needs, passed by value.
struct AttentionParams {
  int B, T, Hq, Hkv, D;
  int group;  // r = Hq / Hkv query heads per K/V head
  float scale;
  int causal;
  int window;
  const int32_t* doc_ids;
  const float* alibi_slopes;
  float dropout;        // p
  float dropout_scale;  // float(1 / (1 - p)), rounded from double as the CPU reference does
  uint64_t seed, stream;
};

// Validates the shape and options (std::invalid_argument with a clear message) and builds the params.
inline AttentionParams make_attention_params(const AttentionShape& s, const AttentionOptions& opt) {
  if (s.B <= 0 || s.T <= 0 || s.Hq <= 0 || s.Hkv <= 0 || s.D <= 0) {
    throw std::invalid_argument(
        "attention: B, T, Hq, Hkv and D must be positive (got B=" + std::to_string(s.B) +
        " T=" + std::to_string(s.T) + " Hq=" + std::to_string(s.Hq) + " Hkv=" + std::to_string(s.Hkv) +
        " D=" + std::to_string(s.D) + ")");
  }
  if (s.Hq % s.Hkv != 0) {
    throw std::invalid_argument("attention: Hq (" + std::to_string(s.Hq) + ") must be a multiple of Hkv (" +
                                std::to_string(s.Hkv) + ")");
  }
  if (!(opt.dropout >= 0.0f && opt.dropout < 1.0f)) {
    throw std::invalid_argument("attention: dropout must be in [0, 1), got " + std::to_string(opt.dropout));
  }
  if (opt.sliding_window < 0) {
    throw std::invalid_argument("attention: sliding_window must be >= 0, got " +
                                std::to_string(opt.sliding_window));
  }
  if (s.B > 65535 || s.Hq > 65535) {
    throw std::invalid_argument("attention: B and Hq must be <= 65535 (grid dimensions)");
  }
  AttentionParams p;
  p.B = s.B;
  p.T = s.T;
  p.Hq = s.Hq;
  p.Hkv = s.Hkv;
  p.D = s.D;
  p.group = s.Hq / s.Hkv;
  p.scale = static_cast<float>(opt.scale != 0.0 ? opt.scale : 1.0 / std::sqrt(static_cast<double>(s.D)));
  p.causal = opt.causal ? 1 : 0;
  p.window = opt.sliding_window;
  p.doc_ids = opt.doc_ids;
  p.alibi_slopes = opt.alibi_slopes;
  p.dropout = opt.dropout;
  p.dropout_scale =
      opt.dropout > 0.0f ? static_cast<float>(1.0 / (1.0 - static_cast<double>(opt.dropout))) : 1.0f;
  p.seed = opt.seed;
  p.stream = opt.stream;
  return p;
}

// ---- per-element rules, identical to kernels/cpu/attention.h ---------------------------------------------

// Whether key j is visible to query i in batch row b. Positions outside [0, T) (tile padding) are never
// visible, so padded rows and columns contribute exactly zero.
__device__ __forceinline__ bool attn_visible(const AttentionParams& p, int b, int i, int j) {
  if (i >= p.T || j >= p.T) return false;
  if (p.causal && j > i) return false;
  if (p.window > 0 && i - j >= p.window) return false;
  if (p.doc_ids != nullptr) {
    const size_t row = static_cast<size_t>(b) * p.T;
    if (__ldg(p.doc_ids + row + i) != __ldg(p.doc_ids + row + j)) return false;
  }
  return true;
}

__device__ __forceinline__ float attn_slope(const AttentionParams& p, int h) {
  return p.alibi_slopes != nullptr ? __ldg(p.alibi_slopes + h) : 0.0f;
}

// s_ij from the raw dot product <q_i, k_j>.
__device__ __forceinline__ float attn_score(const AttentionParams& p, float dot, float slope, int i, int j) {
  return p.scale * dot - slope * static_cast<float>(i - j);
}

// M_ij: 0 (dropped), 1/(1-p) (kept) or 1 (no dropout).
__device__ __forceinline__ float attn_dropout_factor(const AttentionParams& p, int b, int h, int i, int j) {
  if (p.dropout <= 0.0f) return 1.0f;
  const uint64_t index =
      ((static_cast<uint64_t>(b) * p.Hq + h) * static_cast<uint64_t>(p.T) + i) * static_cast<uint64_t>(p.T) +
      j;
  return philox_uniform(p.seed, p.stream, index) >= p.dropout ? p.dropout_scale : 0.0f;
}

// Element offsets of row t of head h in q/out/dq/dout ([B,T,Hq,D]) and k/v/dk/dv ([B,T,Hkv,D]).
__host__ __device__ __forceinline__ size_t attn_q_offset(const AttentionParams& p, int b, int t, int h) {
  return ((static_cast<size_t>(b) * p.T + t) * p.Hq + h) * p.D;
}
__host__ __device__ __forceinline__ size_t attn_kv_offset(const AttentionParams& p, int b, int t, int g) {
  return ((static_cast<size_t>(b) * p.T + t) * p.Hkv + g) * p.D;
}
// Offset of row (b, h, i) in the [B, Hq, T] statistics (LSE, delta) and, times T, in [B, Hq, T, T].
__host__ __device__ __forceinline__ size_t attn_row_index(const AttentionParams& p, int b, int h, int i) {
  return (static_cast<size_t>(b) * p.Hq + h) * p.T + i;
}

// ---- tile ranges, shared by the fused kernels (attention_flash.cuh, attention_mma.cuh) --------------

namespace attention_flash_detail {

// Key tiles [*begin, *end) of width bc that can hold a key visible to a query in [q0, q_last].
__host__ __device__ inline void key_tile_range(const AttentionParams& p, int q0, int q_last, int bc,
                                               int* begin, int* end) {
  const int tiles = (p.T + bc - 1) / bc;
  *begin = 0;
  *end = tiles;
  if (p.causal) *end = q_last / bc + 1 < tiles ? q_last / bc + 1 : tiles;
  if (p.window > 0) {
    const long long first = static_cast<long long>(q0) - p.window + 1;  // first key query q0 can see
    *begin = first > 0 ? static_cast<int>(first / bc) : 0;
  }
}

// Query tiles [*begin, *end) of height br that can see a key in [k0, k_last].
__host__ __device__ inline void query_tile_range(const AttentionParams& p, int k0, int k_last, int br,
                                                 int* begin, int* end) {
  const int tiles = (p.T + br - 1) / br;
  *begin = p.causal ? k0 / br : 0;
  *end = tiles;
  if (p.window > 0) {
    const long long last = static_cast<long long>(k_last) + p.window - 1;  // last query that sees k_last
    if (last / br + 1 < tiles) *end = static_cast<int>(last / br + 1);
  }
}

// True when every (i, j) of the tile [q0, q0 + br) x [k0, k0 + bc) is visible, so the per-element test
// can be skipped (interior tiles of long sequences).
__host__ __device__ inline bool tile_fully_visible(const AttentionParams& p, int q0, int br, int k0, int bc) {
  if (p.doc_ids != nullptr || q0 + br > p.T || k0 + bc > p.T) return false;
  if (p.causal && k0 + bc - 1 > q0) return false;
  if (p.window > 0 && (q0 + br - 1) - k0 >= p.window) return false;
  return true;
}

__device__ __forceinline__ bool visible_in(const AttentionParams& p, bool full, int b, int i, int j) {
  return full || attn_visible(p, b, i, j);
}

}  // namespace attention_flash_detail

}  // namespace llm::cuda
