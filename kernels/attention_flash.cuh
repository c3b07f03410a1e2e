// Attention on the GPU, the fused (flash-style) path: forward and backward without materialising the
// [T, T] probabilities. Semantics are those of kernels/cpu/attention.h (causal, GQA/MQA, sliding window,
// document mask, ALiBi, Philox dropout); kernels/attention_simple.cuh is the unfused version of the same
// math and serves as its test oracle.
//
// ---------------------------------------------------------------------------------------------------------
// Math (per batch row b, query head h, K/V head g = h / (Hq / Hkv); c = scale; M = dropout factor)
// ---------------------------------------------------------------------------------------------------------
// Forward with an online softmax. Keys are visited one tile at a time; per query row we keep the running
// maximum m, the running normaliser l = sum_j exp(s_ij - m) (over the undropped probabilities) and the
// unnormalised output o = sum_j exp(s_ij - m) M_ij v_j. When a tile raises the maximum to m', everything
// accumulated so far is rescaled by alpha = exp(m - m'):
//        l <- alpha l + sum_{j in tile} exp(s_ij - m'),     o <- alpha o + sum_{j in tile} exp(s_ij - m')
//        M_ij v_j.
// At the end o / l = sum_j P_ij M_ij v_j exactly as in the reference, and we store only the per-row
// log-sum-exp LSE_i = m + log l, [B, Hq, T] floats, instead of P.
//
// Backward. P is recomputed from Q, K and the LSE: P_ij = exp(s_ij - LSE_i) (0 where masked). The softmax
// backward needs rowsum_i = sum_j P_ij dP_ij; since dP_ij = M_ij <dO_i, v_j> and o_i = sum_j P_ij M_ij v_j,
//        rowsum_i = sum_j P_ij M_ij <dO_i, v_j> = <dO_i, o_i> =: Delta_i,
// a D-length dot product computed first (kernel "delta") instead of a pass over a row of P. Then
//        dP_ij = M_ij <dO_i, v_j>,  dS_ij = P_ij (dP_ij - Delta_i),
//        dV_j = sum_h sum_i P_ij M_ij dO_i,   dK_j = c sum_h sum_i dS_ij q_i,   dQ_i = c sum_j dS_ij k_j,
// with the sums over h running over the r = Hq / Hkv query heads that share K/V head g (see (e) in
// kernels/cpu/attention.h). Dropout is regenerated from Philox with the reference's element index.
//
// ---------------------------------------------------------------------------------------------------------
// Tiling and ownership (deterministic: every output element is written by exactly one thread, every sum
// runs in a fixed order, no atomics anywhere)
// ---------------------------------------------------------------------------------------------------------
//   forward   grid (query tiles, Hq, B). A block owns Br query rows of one (b, h) and loops over the key
//             tiles that can be visible (causal: up to the diagonal; window: from q0 - W + 1). K and V of
//             head g are read by index from the shared [B, T, Hkv, D] tensors, never copied per query head.
//   delta     one warp per row (b, h, i): Delta_i = <dO_i, o_i>.
//   dK/dV     grid (key tiles, Hkv, B). A block owns Bc keys of one K/V head and loops over the r query
//             heads of its group and, for each, over the query tiles that can see its keys. It
//             accumulates dK and dV for its keys in registers and writes them once: no atomics, and the
//             GQA sum over heads is a fixed-order loop.
//   dQ        grid (query tiles, Hq, B). A separate pass: a block owns Br query rows and loops over the
//             key tiles, recomputing P and dS, and accumulates dQ in registers.
//   We chose this deterministic design over the usual single pass with atomicAdd into dQ. The price is
//   recomputing S = Q K^T and dA = dO V^T in the dQ pass: 7 tile matmuls in the backward instead of 5
//   (the benchmark reports FLOP rates with the usual 5-matmul count).
//
// Two implementations of the same plan:
//   FMA (any storage, fp32 math): Br = Bc = 32, 128 threads, 4 threads per tile row; tiles are converted
//     to fp32 in shared memory (rows padded by one float against bank conflicts); each thread keeps its
//     D/4 output (or dK, dV, dQ) columns of one row in registers.
//   Tensor cores (bf16 storage, D in {64, 128}): Br = Bc = 64, 4 warps, each warp owns 16 rows of the
//     tile. QK^T, dO V^T, P V, dS K, P^T dO and dS^T Q use nvcuda::wmma 16x16x16 bf16 -> fp32; the
//     products land in fp32 shared memory for the softmax, whose results (P M, c dS) are rounded to bf16
//     for the next product. In the forward the output accumulator lives in fp32 shared memory because the
//     online softmax rescales it row by row (the fragment layout is opaque); in the backward dK, dV, dQ
//     stay in fragments.
//   Both need more than 48 KB of shared memory for D = 128 and opt in with cudaFuncSetAttribute.
// A third implementation, kernels/attention_mma.cuh, follows the same plan with mma.sync PTX and keeps S, P
// and the accumulators in registers; it is the default for bf16 (AttentionKernel::kAuto), and the WMMA
// kernels here are its readable tensor-core twin and test oracle.
//
// Sizes: q, out, dq, dout [B, T, Hq, D]; k, v, dk, dv [B, T, Hkv, D]; lse and the backward workspace delta
// are fp32 [B, Hq, T]. dq, dk, dv are overwritten. Supported head sizes: 64 and 128 (others: use
// attention_simple_*). T need not be a multiple of the tile: padded rows are zero and never visible.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/attention_common.cuh"
#include "kernels/attention_mma.cuh"
#include "kernels/cuda_common.cuh"

namespace llm::cuda {

namespace attention_flash_detail {

extern __shared__ __align__(128) unsigned char attn_smem[];

// ============================================================================================================
// FMA kernels: fp32 math, any storage type
// ============================================================================================================

constexpr int kFmaThreads = 128;
constexpr int kFmaBr = 32;                     // query rows per tile
constexpr int kFmaBc = 32;                     // keys per tile
constexpr int kFmaTpr = kFmaThreads / kFmaBr;  // threads per tile row (4, adjacent lanes of one warp)
static_assert(kFmaThreads / kFmaBc == kFmaTpr, "square tiles");
static_assert(kFmaTpr == 4, "the shuffles below combine 4 lanes");

template <int D>
struct FmaLayout {
  static constexpr int kLd = D + 1;        // row stride of a fp32 [rows][D] tile
  static constexpr int kLdS = kFmaBc + 1;  // row stride of a fp32 [32][32] score tile
  static constexpr size_t kTile = static_cast<size_t>(kFmaBr) * kLd;  // floats (Br == Bc)
  static constexpr size_t kScores = static_cast<size_t>(kFmaBr) * kLdS;
  static constexpr size_t kFwdBytes = (3 * kTile + kScores) * sizeof(float);  // Q K V P
  static constexpr size_t kDkdvBytes =
      (4 * kTile + 2 * kScores + 2 * kFmaBr) * sizeof(float);                // K V Q dO A dS
  static constexpr size_t kDqBytes = (4 * kTile + kScores) * sizeof(float);  // Q dO K V dS
};

// dst[r][d] (row stride ld) = row t0 + r of a [*, rows, *, D] tensor (src points at row 0 of the head,
// consecutive rows row_stride elements apart), converted to fp32; rows at or beyond T are zero.
template <typename T, int D>
__device__ __forceinline__ void load_rows_f32(float* dst, int ld, const T* src, size_t row_stride, int t0,
                                              int rows, int T_len) {
  for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
    const int r = e / D, d = e % D, t = t0 + r;
    dst[r * ld + d] = t < T_len ? to_float(src[static_cast<size_t>(t) * row_stride + d]) : 0.0f;
  }
}

// Combines a value over the 4 lanes of one tile row.
__device__ __forceinline__ float row_max4(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float row_sum4(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Forward. Thread (r, sub) owns query row q0 + r: scores of keys sub + 4m, output columns sub + 4m.
template <typename T, int D>
__global__ void __launch_bounds__(kFmaThreads)
    fwd_fma_kernel(T* out, float* lse, const T* q, const T* k, const T* v, AttentionParams p) {
  using L = FmaLayout<D>;
  constexpr int Br = kFmaBr, Bc = kFmaBc, TPR = kFmaTpr, kKeys = Bc / TPR, kCols = D / TPR;
  float* Qs = reinterpret_cast<float*>(attn_smem);
  float* Ks = Qs + L::kTile;
  float* Vs = Ks + L::kTile;
  float* Ps = Vs + L::kTile;  // [Br][kLdS]: P M of the current key tile
  const int q0 = blockIdx.x * Br, h = blockIdx.y, b = blockIdx.z, g = h / p.group;
  const int r = threadIdx.x / TPR, sub = threadIdx.x % TPR, i = q0 + r;
  const float slope = attn_slope(p, h);
  const size_t q_stride = static_cast<size_t>(p.Hq) * D, kv_stride = static_cast<size_t>(p.Hkv) * D;

  load_rows_f32<T, D>(Qs, L::kLd, q + attn_q_offset(p, b, 0, h), q_stride, q0, Br, p.T);
  float o[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) o[c] = 0.0f;
  float m_run = -INFINITY, l_run = 0.0f;

  int kt_begin, kt_end;
  key_tile_range(p, q0, min(q0 + Br, p.T) - 1, Bc, &kt_begin, &kt_end);
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int k0 = kt * Bc;
    __syncthreads();  // the previous tile's K, V, P are no longer read
    load_rows_f32<T, D>(Ks, L::kLd, k + attn_kv_offset(p, b, 0, g), kv_stride, k0, Bc, p.T);
    load_rows_f32<T, D>(Vs, L::kLd, v + attn_kv_offset(p, b, 0, g), kv_stride, k0, Bc, p.T);
    __syncthreads();
    const bool full = tile_fully_visible(p, q0, Br, k0, Bc);

    float s[kKeys];
#pragma unroll
    for (int m = 0; m < kKeys; ++m) s[m] = 0.0f;
    for (int d = 0; d < D; ++d) {
      const float qv = Qs[r * L::kLd + d];
#pragma unroll
      for (int m = 0; m < kKeys; ++m) s[m] += qv * Ks[(sub + TPR * m) * L::kLd + d];
    }
    float tile_max = -INFINITY;
#pragma unroll
    for (int m = 0; m < kKeys; ++m) {
      const int j = k0 + sub + TPR * m;
      s[m] = visible_in(p, full, b, i, j) ? attn_score(p, s[m], slope, i, j) : -INFINITY;
      tile_max = fmaxf(tile_max, s[m]);
    }
    tile_max = row_max4(tile_max);
    const float m_new = fmaxf(m_run, tile_max);
    const float alpha = m_new == -INFINITY ? 1.0f : expf(m_run - m_new);  // nothing visible yet: keep 0
    float row_sum = 0.0f;
#pragma unroll
    for (int m = 0; m < kKeys; ++m) {
      const int c = sub + TPR * m;
      const float pr = s[m] == -INFINITY ? 0.0f : expf(s[m] - m_new);
      row_sum += pr;
      Ps[r * L::kLdS + c] = pr == 0.0f ? 0.0f : pr * attn_dropout_factor(p, b, h, i, k0 + c);
    }
    l_run = alpha * l_run + row_sum4(row_sum);
    m_run = m_new;
    __syncwarp();  // row r of Ps is written and read by the 4 lanes of row r only

#pragma unroll
    for (int c = 0; c < kCols; ++c) o[c] *= alpha;
    for (int c = 0; c < Bc; ++c) {
      const float a = Ps[r * L::kLdS + c];
#pragma unroll
      for (int e = 0; e < kCols; ++e) o[e] += a * Vs[c * L::kLd + sub + TPR * e];
    }
  }
  if (i < p.T) {  // l_run > 0: the diagonal is always visible
    const float inv_l = 1.0f / l_run;
    T* orow = out + attn_q_offset(p, b, i, h);
#pragma unroll
    for (int e = 0; e < kCols; ++e) orow[sub + TPR * e] = from_float<T>(o[e] * inv_l);
    if (sub == 0) lse[attn_row_index(p, b, h, i)] = m_run + logf(l_run);
  }
}

// Delta_i = <dO_i, o_i>, one warp per row (b, h, i) of [B, Hq, T].
template <typename T>
__global__ void delta_kernel(float* delta, const T* dout, const T* out, AttentionParams p) {
  const size_t rows = static_cast<size_t>(p.B) * p.Hq * p.T;
  const size_t row = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // the whole warp leaves together
  const int i = static_cast<int>(row % p.T);
  const int h = static_cast<int>(row / p.T % p.Hq);
  const int b = static_cast<int>(row / p.T / p.Hq);
  const size_t off = attn_q_offset(p, b, i, h);
  float acc = 0.0f;
  for (int d = lane; d < p.D; d += 32) acc += to_float(dout[off + d]) * to_float(out[off + d]);
  for (int w = 16; w > 0; w /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, w);
  if (lane == 0) delta[row] = acc;
}

// dK, dV for key tile blockIdx.x of K/V head blockIdx.y. Thread (c, sub) owns key k0 + c: it recomputes
// S^T and dA^T for queries sub + 4m and accumulates dK, dV columns sub + 4e.
template <typename T, int D>
__global__ void __launch_bounds__(kFmaThreads)
    dkdv_fma_kernel(T* dk, T* dv, const T* q, const T* k, const T* v, const T* dout, const float* lse,
                    const float* delta, AttentionParams p) {
  using L = FmaLayout<D>;
  constexpr int Br = kFmaBr, Bc = kFmaBc, TPR = kFmaTpr, kQueries = Br / TPR, kCols = D / TPR;
  constexpr int kLdA = L::kLdS;  // [Bc][Br + 1]
  float* Ks = reinterpret_cast<float*>(attn_smem);
  float* Vs = Ks + L::kTile;
  float* Qs = Vs + L::kTile;
  float* dOs = Qs + L::kTile;
  float* As = dOs + L::kTile;    // A^T = (P M)^T of the current query tile, [key][query]
  float* dSs = As + L::kScores;  // dS^T, [key][query]
  float* lse_s = dSs + L::kScores;
  float* delta_s = lse_s + Br;
  const int k0 = blockIdx.x * Bc, g = blockIdx.y, b = blockIdx.z;
  const int c = threadIdx.x / TPR, sub = threadIdx.x % TPR, j = k0 + c;
  const size_t q_stride = static_cast<size_t>(p.Hq) * D, kv_stride = static_cast<size_t>(p.Hkv) * D;

  load_rows_f32<T, D>(Ks, L::kLd, k + attn_kv_offset(p, b, 0, g), kv_stride, k0, Bc, p.T);
  load_rows_f32<T, D>(Vs, L::kLd, v + attn_kv_offset(p, b, 0, g), kv_stride, k0, Bc, p.T);
  float dk_acc[kCols], dv_acc[kCols];
#pragma unroll
  for (int e = 0; e < kCols; ++e) dk_acc[e] = dv_acc[e] = 0.0f;

  int qt_begin, qt_end;
  query_tile_range(p, k0, min(k0 + Bc, p.T) - 1, Br, &qt_begin, &qt_end);
  for (int h = g * p.group; h < (g + 1) * p.group; ++h) {
    const float slope = attn_slope(p, h);
    for (int qt = qt_begin; qt < qt_end; ++qt) {
      const int q0 = qt * Br;
      __syncthreads();  // the previous tile's Q, dO are no longer read
      load_rows_f32<T, D>(Qs, L::kLd, q + attn_q_offset(p, b, 0, h), q_stride, q0, Br, p.T);
      load_rows_f32<T, D>(dOs, L::kLd, dout + attn_q_offset(p, b, 0, h), q_stride, q0, Br, p.T);
      for (int e = threadIdx.x; e < Br; e += blockDim.x) {
        const bool in = q0 + e < p.T;
        lse_s[e] = in ? lse[attn_row_index(p, b, h, q0 + e)] : 0.0f;
        delta_s[e] = in ? delta[attn_row_index(p, b, h, q0 + e)] : 0.0f;
      }
      __syncthreads();
      const bool full = tile_fully_visible(p, q0, Br, k0, Bc);

      float s[kQueries], da[kQueries];
#pragma unroll
      for (int m = 0; m < kQueries; ++m) s[m] = da[m] = 0.0f;
      for (int d = 0; d < D; ++d) {
        const float kv = Ks[c * L::kLd + d], vv = Vs[c * L::kLd + d];
#pragma unroll
        for (int m = 0; m < kQueries; ++m) {
          s[m] += Qs[(sub + TPR * m) * L::kLd + d] * kv;
          da[m] += dOs[(sub + TPR * m) * L::kLd + d] * vv;
        }
      }
#pragma unroll
      for (int m = 0; m < kQueries; ++m) {
        const int iq = sub + TPR * m, i = q0 + iq;
        float a = 0.0f, ds = 0.0f;
        if (visible_in(p, full, b, i, j)) {
          const float pr = expf(attn_score(p, s[m], slope, i, j) - lse_s[iq]);
          const float mf = attn_dropout_factor(p, b, h, i, j);
          a = pr * mf;
          ds = pr * (mf * da[m] - delta_s[iq]);
        }
        As[c * kLdA + iq] = a;
        dSs[c * kLdA + iq] = ds;
      }
      __syncwarp();  // row c of As, dSs is written and read by the 4 lanes of key c only

      for (int iq = 0; iq < Br; ++iq) {
        const float a = As[c * kLdA + iq], ds = dSs[c * kLdA + iq];
#pragma unroll
        for (int e = 0; e < kCols; ++e) {
          dv_acc[e] += a * dOs[iq * L::kLd + sub + TPR * e];
          dk_acc[e] += ds * Qs[iq * L::kLd + sub + TPR * e];
        }
      }
    }
  }
  if (j < p.T) {
    const size_t off = attn_kv_offset(p, b, j, g);
#pragma unroll
    for (int e = 0; e < kCols; ++e) {
      dk[off + sub + TPR * e] = from_float<T>(p.scale * dk_acc[e]);
      dv[off + sub + TPR * e] = from_float<T>(dv_acc[e]);
    }
  }
}

// dQ for query tile blockIdx.x of head blockIdx.y. Thread (r, sub) owns query q0 + r.
template <typename T, int D>
__global__ void __launch_bounds__(kFmaThreads)
    dq_fma_kernel(T* dq, const T* q, const T* k, const T* v, const T* dout, const float* lse,
                  const float* delta, AttentionParams p) {
  using L = FmaLayout<D>;
  constexpr int Br = kFmaBr, Bc = kFmaBc, TPR = kFmaTpr, kKeys = Bc / TPR, kCols = D / TPR;
  float* Qs = reinterpret_cast<float*>(attn_smem);
  float* dOs = Qs + L::kTile;
  float* Ks = dOs + L::kTile;
  float* Vs = Ks + L::kTile;
  float* dSs = Vs + L::kTile;  // [Br][kLdS]
  const int q0 = blockIdx.x * Br, h = blockIdx.y, b = blockIdx.z, g = h / p.group;
  const int r = threadIdx.x / TPR, sub = threadIdx.x % TPR, i = q0 + r;
  const float slope = attn_slope(p, h);
  const size_t q_stride = static_cast<size_t>(p.Hq) * D, kv_stride = static_cast<size_t>(p.Hkv) * D;

  load_rows_f32<T, D>(Qs, L::kLd, q + attn_q_offset(p, b, 0, h), q_stride, q0, Br, p.T);
  load_rows_f32<T, D>(dOs, L::kLd, dout + attn_q_offset(p, b, 0, h), q_stride, q0, Br, p.T);
  const float lse_i = i < p.T ? lse[attn_row_index(p, b, h, i)] : 0.0f;
  const float delta_i = i < p.T ? delta[attn_row_index(p, b, h, i)] : 0.0f;
  float dq_acc[kCols];
#pragma unroll
  for (int e = 0; e < kCols; ++e) dq_acc[e] = 0.0f;

  int kt_begin, kt_end;
  key_tile_range(p, q0, min(q0 + Br, p.T) - 1, Bc, &kt_begin, &kt_end);
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int k0 = kt * Bc;
    __syncthreads();
    load_rows_f32<T, D>(Ks, L::kLd, k + attn_kv_offset(p, b, 0, g), kv_stride, k0, Bc, p.T);
    load_rows_f32<T, D>(Vs, L::kLd, v + attn_kv_offset(p, b, 0, g), kv_stride, k0, Bc, p.T);
    __syncthreads();
    const bool full = tile_fully_visible(p, q0, Br, k0, Bc);

    float s[kKeys], da[kKeys];
#pragma unroll
    for (int m = 0; m < kKeys; ++m) s[m] = da[m] = 0.0f;
    for (int d = 0; d < D; ++d) {
      const float qv = Qs[r * L::kLd + d], dov = dOs[r * L::kLd + d];
#pragma unroll
      for (int m = 0; m < kKeys; ++m) {
        s[m] += qv * Ks[(sub + TPR * m) * L::kLd + d];
        da[m] += dov * Vs[(sub + TPR * m) * L::kLd + d];
      }
    }
#pragma unroll
    for (int m = 0; m < kKeys; ++m) {
      const int c = sub + TPR * m, j = k0 + c;
      float ds = 0.0f;
      if (visible_in(p, full, b, i, j)) {
        const float pr = expf(attn_score(p, s[m], slope, i, j) - lse_i);
        ds = pr * (attn_dropout_factor(p, b, h, i, j) * da[m] - delta_i);
      }
      dSs[r * L::kLdS + c] = ds;
    }
    __syncwarp();  // row r of dSs is written and read by the 4 lanes of row r only
    for (int c = 0; c < Bc; ++c) {
      const float ds = dSs[r * L::kLdS + c];
#pragma unroll
      for (int e = 0; e < kCols; ++e) dq_acc[e] += ds * Ks[c * L::kLd + sub + TPR * e];
    }
  }
  if (i < p.T) {
    T* row = dq + attn_q_offset(p, b, i, h);
#pragma unroll
    for (int e = 0; e < kCols; ++e) row[sub + TPR * e] = from_float<T>(p.scale * dq_acc[e]);
  }
}

// ============================================================================================================
// Tensor-core kernels: bf16 storage, WMMA 16x16x16 bf16 -> fp32
// ============================================================================================================

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

constexpr int kTcThreads = 128;  // 4 warps, each owning 16 rows of a 64-row tile
constexpr int kTcTile = 64;      // Br = Bc = 64
constexpr int kTcWarpRows = 16;

// Shared-memory tiles. Row strides are padded (by 16 bytes for bf16, 16 bytes for fp32) against bank
// conflicts while keeping every 16x16 fragment pointer 32-byte aligned as WMMA requires. Every region
// size is a multiple of 128 bytes, so consecutive regions stay aligned.
template <int D>
struct TcLayout {
  static constexpr int kLdH = D + 8;        // bf16 [64][D] tiles (Q, K, V, dO)
  static constexpr int kLdS = kTcTile + 4;  // fp32 [64][64] tiles (S, dA)
  static constexpr int kLdP = kTcTile + 8;  // bf16 [64][64] tiles (P M, c dS)
  static constexpr int kLdO = D + 4;        // fp32 [64][D] output accumulator
  static constexpr size_t kTileH = static_cast<size_t>(kTcTile) * kLdH * sizeof(bf16);
  static constexpr size_t kTileS = static_cast<size_t>(kTcTile) * kLdS * sizeof(float);
  static constexpr size_t kTileP = static_cast<size_t>(kTcTile) * kLdP * sizeof(bf16);
  static constexpr size_t kTileO = static_cast<size_t>(kTcTile) * kLdO * sizeof(float);
  static constexpr size_t kStats = static_cast<size_t>(kTcTile) * sizeof(float);
  static constexpr size_t kFwdBytes = 3 * kTileH + kTileS + kTileP + kTileO + kStats;  // Q K V S P O 1/l
  static constexpr size_t kDkdvBytes =
      4 * kTileH + 2 * kTileS + 2 * kTileP + 2 * kStats;                // K V Q dO S dA A dS
  static constexpr size_t kDqBytes = 4 * kTileH + 2 * kTileS + kTileP;  // Q dO K V S dA dS
  static_assert(kTileH % 128 == 0 && kTileS % 128 == 0 && kTileP % 128 == 0 && kTileO % 128 == 0,
                "alignment");
  static_assert(D % 16 == 0, "WMMA tiles");
};

// dst[r][0..D) (row stride ld) = row t0 + r (16-byte vectors); rows at or beyond T are zero. Requires
// 16-byte aligned tensors (checked by the launcher) and D % 8 == 0.
template <int D>
__device__ __forceinline__ void load_rows_bf16(bf16* dst, int ld, const bf16* src, size_t row_stride, int t0,
                                               int rows, int T_len) {
  constexpr int kVecs = D / 8;
  for (int e = threadIdx.x; e < rows * kVecs; e += blockDim.x) {
    const int r = e / kVecs, c = e % kVecs, t = t0 + r;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (t < T_len) val = *reinterpret_cast<const uint4*>(src + static_cast<size_t>(t) * row_stride + c * 8);
    *reinterpret_cast<uint4*>(dst + r * ld + c * 8) = val;
  }
}

// C[16][64] (fp32, row stride ldc) = A[16][D] (row-major bf16, stride lda) x B^T where B is [64][D]
// row-major bf16 (stride ldb), i.e. B^T read as a col-major matrix. One warp.
template <int D>
__device__ __forceinline__ void warp_abt_16x64(float* C, int ldc, const bf16* A, int lda, const bf16* B,
                                               int ldb) {
  FragC acc[kTcTile / 16];
#pragma unroll
  for (int n = 0; n < kTcTile / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    FragA a;
    wmma::load_matrix_sync(a, A + kk * 16, lda);
#pragma unroll
    for (int n = 0; n < kTcTile / 16; ++n) {
      FragBCol bt;
      wmma::load_matrix_sync(bt, B + n * 16 * ldb + kk * 16, ldb);
      wmma::mma_sync(acc[n], a, bt, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < kTcTile / 16; ++n)
    wmma::store_matrix_sync(C + n * 16, acc[n], ldc, wmma::mem_row_major);
}

// acc[n] (16 x D in 16-column fragments) += A[16][64] (row-major bf16) x B[64][D] (row-major bf16). One warp.
template <int D>
__device__ __forceinline__ void warp_ab_16x64xD(FragC* acc, const bf16* A, int lda, const bf16* B, int ldb) {
#pragma unroll
  for (int kk = 0; kk < kTcTile / 16; ++kk) {
    FragA a;
    wmma::load_matrix_sync(a, A + kk * 16, lda);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      FragBRow bm;
      wmma::load_matrix_sync(bm, B + kk * 16 * ldb + n * 16, ldb);
      wmma::mma_sync(acc[n], a, bm, acc[n]);
    }
  }
}

// Writes a warp's 16 x D accumulator (rows row0 .. row0 + 15 of the tile, t = t0 + row) to a [B,T,H,D]
// tensor, staging each fragment through `stage` (16 rows, stride lds, fp32, owned by this warp).
template <int D>
__device__ __forceinline__ void warp_store_rows(bf16* dst, size_t row_stride, int t0, int T_len,
                                                const FragC* acc, float* stage, int lds) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(stage, acc[n], lds, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int r = e / 16, c = e % 16, t = t0 + r;
      if (t < T_len)
        dst[static_cast<size_t>(t) * row_stride + n * 16 + c] = __float2bfloat16(stage[r * lds + c]);
    }
    __syncwarp();
  }
}

// Forward. Warp w owns query rows 16w .. 16w + 15 of the tile; in the softmax, lane pair (2rr, 2rr + 1)
// owns row 16w + rr, lane `half` taking the columns 2cc + half.
template <int D>
__global__ void __launch_bounds__(kTcThreads)
    fwd_tc_kernel(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, AttentionParams p) {
  using L = TcLayout<D>;
  constexpr int Br = kTcTile, Bc = kTcTile;
  bf16* Qs = reinterpret_cast<bf16*>(attn_smem);
  bf16* Ks = reinterpret_cast<bf16*>(attn_smem + L::kTileH);
  bf16* Vs = reinterpret_cast<bf16*>(attn_smem + 2 * L::kTileH);
  float* Ss = reinterpret_cast<float*>(attn_smem + 3 * L::kTileH);
  bf16* Ps = reinterpret_cast<bf16*>(attn_smem + 3 * L::kTileH + L::kTileS);
  float* Os = reinterpret_cast<float*>(attn_smem + 3 * L::kTileH + L::kTileS + L::kTileP);
  float* inv_l = reinterpret_cast<float*>(attn_smem + 3 * L::kTileH + L::kTileS + L::kTileP + L::kTileO);
  const int q0 = blockIdx.x * Br, h = blockIdx.y, b = blockIdx.z, g = h / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, w0 = warp * kTcWarpRows;
  const int rr = lane >> 1, half = lane & 1, i = q0 + w0 + rr;
  const float slope = attn_slope(p, h);
  const size_t q_stride = static_cast<size_t>(p.Hq) * D, kv_stride = static_cast<size_t>(p.Hkv) * D;

  load_rows_bf16<D>(Qs, L::kLdH, q + attn_q_offset(p, b, 0, h), q_stride, q0, Br, p.T);
  for (int e = lane; e < kTcWarpRows * D; e += 32) Os[(w0 + e / D) * L::kLdO + e % D] = 0.0f;
  float m_run = -INFINITY, l_run = 0.0f;
  float* srow = Ss + (w0 + rr) * L::kLdS;
  bf16* prow = Ps + (w0 + rr) * L::kLdP;
  float* orow = Os + (w0 + rr) * L::kLdO;

  int kt_begin, kt_end;
  key_tile_range(p, q0, min(q0 + Br, p.T) - 1, Bc, &kt_begin, &kt_end);
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int k0 = kt * Bc;
    __syncthreads();  // the previous tile's K, V are no longer read
    load_rows_bf16<D>(Ks, L::kLdH, k + attn_kv_offset(p, b, 0, g), kv_stride, k0, Bc, p.T);
    load_rows_bf16<D>(Vs, L::kLdH, v + attn_kv_offset(p, b, 0, g), kv_stride, k0, Bc, p.T);
    __syncthreads();
    const bool full = tile_fully_visible(p, q0, Br, k0, Bc);

    // S = Q K^T for this warp's 16 rows (raw dot products, fp32).
    warp_abt_16x64<D>(Ss + w0 * L::kLdS, L::kLdS, Qs + w0 * L::kLdH, L::kLdH, Ks, L::kLdH);
    __syncwarp();

    // Online softmax of row rr over this tile.
    float tile_max = -INFINITY;
    for (int cc = 0; cc < Bc / 2; ++cc) {
      const int c = 2 * cc + half, j = k0 + c;
      const float s = visible_in(p, full, b, i, j) ? attn_score(p, srow[c], slope, i, j) : -INFINITY;
      srow[c] = s;
      tile_max = fmaxf(tile_max, s);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m_run, tile_max);
    const float alpha = m_new == -INFINITY ? 1.0f : expf(m_run - m_new);
    float row_sum = 0.0f;
    for (int cc = 0; cc < Bc / 2; ++cc) {
      const int c = 2 * cc + half;
      const float s = srow[c];
      const float pr = s == -INFINITY ? 0.0f : expf(s - m_new);
      row_sum += pr;
      prow[c] = __float2bfloat16(pr == 0.0f ? 0.0f : pr * attn_dropout_factor(p, b, h, i, k0 + c));
    }
    row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
    l_run = alpha * l_run + row_sum;
    m_run = m_new;
    if (alpha != 1.0f) {
      for (int dd = 0; dd < D / 2; ++dd) orow[2 * dd + half] *= alpha;
    }
    __syncwarp();

    // O += (P M) V for this warp's rows; the accumulator round-trips through shared memory.
    FragA pf[Bc / 16];
#pragma unroll
    for (int kk = 0; kk < Bc / 16; ++kk) wmma::load_matrix_sync(pf[kk], Ps + w0 * L::kLdP + kk * 16, L::kLdP);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      FragC acc;
      wmma::load_matrix_sync(acc, Os + w0 * L::kLdO + n * 16, L::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < Bc / 16; ++kk) {
        FragBRow vf;
        wmma::load_matrix_sync(vf, Vs + kk * 16 * L::kLdH + n * 16, L::kLdH);
        wmma::mma_sync(acc, pf[kk], vf, acc);
      }
      wmma::store_matrix_sync(Os + w0 * L::kLdO + n * 16, acc, L::kLdO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (half == 0) {
    inv_l[w0 + rr] = i < p.T ? 1.0f / l_run : 0.0f;
    if (i < p.T) lse[attn_row_index(p, b, h, i)] = m_run + logf(l_run);
  }
  __syncwarp();
  for (int e = lane; e < kTcWarpRows * D; e += 32) {
    const int r = w0 + e / D, d = e % D, t = q0 + r;
    if (t < p.T) out[attn_q_offset(p, b, t, h) + d] = __float2bfloat16(Os[r * L::kLdO + d] * inv_l[r]);
  }
}

// dK, dV for key tile blockIdx.x of K/V head blockIdx.y. Warp w owns keys 16w .. 16w + 15; in the
// elementwise step lane pair (2rr, 2rr + 1) owns key 16w + rr and lane `half` the queries 2cc + half.
template <int D>
__global__ void __launch_bounds__(kTcThreads)
    dkdv_tc_kernel(bf16* dk, bf16* dv, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                   const float* lse, const float* delta, AttentionParams p) {
  using L = TcLayout<D>;
  constexpr int Br = kTcTile, Bc = kTcTile;
  unsigned char* at = attn_smem;
  bf16* Ks = reinterpret_cast<bf16*>(at);
  bf16* Vs = reinterpret_cast<bf16*>(at + L::kTileH);
  bf16* Qs = reinterpret_cast<bf16*>(at + 2 * L::kTileH);
  bf16* dOs = reinterpret_cast<bf16*>(at + 3 * L::kTileH);
  float* St = reinterpret_cast<float*>(at + 4 * L::kTileH);                             // S^T  [key][query]
  float* dAt = reinterpret_cast<float*>(at + 4 * L::kTileH + L::kTileS);                // dA^T [key][query]
  bf16* At = reinterpret_cast<bf16*>(at + 4 * L::kTileH + 2 * L::kTileS);               // (P M)^T
  bf16* dSt = reinterpret_cast<bf16*>(at + 4 * L::kTileH + 2 * L::kTileS + L::kTileP);  // (c dS)^T
  float* lse_s = reinterpret_cast<float*>(at + 4 * L::kTileH + 2 * L::kTileS + 2 * L::kTileP);
  float* delta_s = lse_s + kTcTile;
  const int k0 = blockIdx.x * Bc, g = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, w0 = warp * kTcWarpRows;
  const int rr = lane >> 1, half = lane & 1, j = k0 + w0 + rr;
  const size_t q_stride = static_cast<size_t>(p.Hq) * D, kv_stride = static_cast<size_t>(p.Hkv) * D;

  load_rows_bf16<D>(Ks, L::kLdH, k + attn_kv_offset(p, b, 0, g), kv_stride, k0, Bc, p.T);
  load_rows_bf16<D>(Vs, L::kLdH, v + attn_kv_offset(p, b, 0, g), kv_stride, k0, Bc, p.T);
  FragC dk_acc[D / 16], dv_acc[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(dk_acc[n], 0.0f);
    wmma::fill_fragment(dv_acc[n], 0.0f);
  }
  const float* st_row = St + (w0 + rr) * L::kLdS;
  const float* dat_row = dAt + (w0 + rr) * L::kLdS;
  bf16* at_row = At + (w0 + rr) * L::kLdP;
  bf16* dst_row = dSt + (w0 + rr) * L::kLdP;

  int qt_begin, qt_end;
  query_tile_range(p, k0, min(k0 + Bc, p.T) - 1, Br, &qt_begin, &qt_end);
  for (int h = g * p.group; h < (g + 1) * p.group; ++h) {
    const float slope = attn_slope(p, h);
    for (int qt = qt_begin; qt < qt_end; ++qt) {
      const int q0 = qt * Br;
      __syncthreads();  // the previous tile's Q, dO, statistics are no longer read
      load_rows_bf16<D>(Qs, L::kLdH, q + attn_q_offset(p, b, 0, h), q_stride, q0, Br, p.T);
      load_rows_bf16<D>(dOs, L::kLdH, dout + attn_q_offset(p, b, 0, h), q_stride, q0, Br, p.T);
      for (int e = threadIdx.x; e < Br; e += blockDim.x) {
        const bool in = q0 + e < p.T;
        lse_s[e] = in ? lse[attn_row_index(p, b, h, q0 + e)] : 0.0f;
        delta_s[e] = in ? delta[attn_row_index(p, b, h, q0 + e)] : 0.0f;
      }
      __syncthreads();
      const bool full = tile_fully_visible(p, q0, Br, k0, Bc);

      // S^T = K Q^T and dA^T = V dO^T for this warp's 16 keys.
      warp_abt_16x64<D>(St + w0 * L::kLdS, L::kLdS, Ks + w0 * L::kLdH, L::kLdH, Qs, L::kLdH);
      warp_abt_16x64<D>(dAt + w0 * L::kLdS, L::kLdS, Vs + w0 * L::kLdH, L::kLdH, dOs, L::kLdH);
      __syncwarp();

      for (int cc = 0; cc < Br / 2; ++cc) {
        const int c = 2 * cc + half, i = q0 + c;
        float a = 0.0f, ds = 0.0f;
        if (visible_in(p, full, b, i, j)) {
          const float pr = expf(attn_score(p, st_row[c], slope, i, j) - lse_s[c]);
          const float mf = attn_dropout_factor(p, b, h, i, j);
          a = pr * mf;
          ds = pr * (mf * dat_row[c] - delta_s[c]);
        }
        at_row[c] = __float2bfloat16(a);
        dst_row[c] = __float2bfloat16(p.scale * ds);
      }
      __syncwarp();

      // dV += (P M)^T dO and dK += (c dS)^T Q for this warp's keys.
      warp_ab_16x64xD<D>(dv_acc, At + w0 * L::kLdP, L::kLdP, dOs, L::kLdH);
      warp_ab_16x64xD<D>(dk_acc, dSt + w0 * L::kLdP, L::kLdP, Qs, L::kLdH);
    }
  }
  __syncwarp();
  float* stage = St + w0 * L::kLdS;  // this warp's rows of S^T, no longer needed
  warp_store_rows<D>(dk + attn_kv_offset(p, b, 0, g), kv_stride, k0 + w0, p.T, dk_acc, stage, L::kLdS);
  warp_store_rows<D>(dv + attn_kv_offset(p, b, 0, g), kv_stride, k0 + w0, p.T, dv_acc, stage, L::kLdS);
}

// dQ for query tile blockIdx.x of head blockIdx.y. Warp w owns query rows 16w .. 16w + 15.
template <int D>
__global__ void __launch_bounds__(kTcThreads)
    dq_tc_kernel(bf16* dq, const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                 const float* delta, AttentionParams p) {
  using L = TcLayout<D>;
  constexpr int Br = kTcTile, Bc = kTcTile;
  unsigned char* at = attn_smem;
  bf16* Qs = reinterpret_cast<bf16*>(at);
  bf16* dOs = reinterpret_cast<bf16*>(at + L::kTileH);
  bf16* Ks = reinterpret_cast<bf16*>(at + 2 * L::kTileH);
  bf16* Vs = reinterpret_cast<bf16*>(at + 3 * L::kTileH);
  float* Ss = reinterpret_cast<float*>(at + 4 * L::kTileH);
  float* dAs = reinterpret_cast<float*>(at + 4 * L::kTileH + L::kTileS);
  bf16* dSs = reinterpret_cast<bf16*>(at + 4 * L::kTileH + 2 * L::kTileS);
  const int q0 = blockIdx.x * Br, h = blockIdx.y, b = blockIdx.z, g = h / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, w0 = warp * kTcWarpRows;
  const int rr = lane >> 1, half = lane & 1, i = q0 + w0 + rr;
  const float slope = attn_slope(p, h);
  const size_t q_stride = static_cast<size_t>(p.Hq) * D, kv_stride = static_cast<size_t>(p.Hkv) * D;

  load_rows_bf16<D>(Qs, L::kLdH, q + attn_q_offset(p, b, 0, h), q_stride, q0, Br, p.T);
  load_rows_bf16<D>(dOs, L::kLdH, dout + attn_q_offset(p, b, 0, h), q_stride, q0, Br, p.T);
  const float lse_i = i < p.T ? lse[attn_row_index(p, b, h, i)] : 0.0f;
  const float delta_i = i < p.T ? delta[attn_row_index(p, b, h, i)] : 0.0f;
  FragC dq_acc[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(dq_acc[n], 0.0f);
  const float* s_row = Ss + (w0 + rr) * L::kLdS;
  const float* da_row = dAs + (w0 + rr) * L::kLdS;
  bf16* ds_row = dSs + (w0 + rr) * L::kLdP;

  int kt_begin, kt_end;
  key_tile_range(p, q0, min(q0 + Br, p.T) - 1, Bc, &kt_begin, &kt_end);
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int k0 = kt * Bc;
    __syncthreads();
    load_rows_bf16<D>(Ks, L::kLdH, k + attn_kv_offset(p, b, 0, g), kv_stride, k0, Bc, p.T);
    load_rows_bf16<D>(Vs, L::kLdH, v + attn_kv_offset(p, b, 0, g), kv_stride, k0, Bc, p.T);
    __syncthreads();
    const bool full = tile_fully_visible(p, q0, Br, k0, Bc);

    warp_abt_16x64<D>(Ss + w0 * L::kLdS, L::kLdS, Qs + w0 * L::kLdH, L::kLdH, Ks, L::kLdH);
    warp_abt_16x64<D>(dAs + w0 * L::kLdS, L::kLdS, dOs + w0 * L::kLdH, L::kLdH, Vs, L::kLdH);
    __syncwarp();
    for (int cc = 0; cc < Bc / 2; ++cc) {
      const int c = 2 * cc + half, j = k0 + c;
      float ds = 0.0f;
      if (visible_in(p, full, b, i, j)) {
        const float pr = expf(attn_score(p, s_row[c], slope, i, j) - lse_i);
        ds = pr * (attn_dropout_factor(p, b, h, i, j) * da_row[c] - delta_i);
      }
      ds_row[c] = __float2bfloat16(p.scale * ds);
    }
    __syncwarp();
    warp_ab_16x64xD<D>(dq_acc, dSs + w0 * L::kLdP, L::kLdP, Ks, L::kLdH);
  }
  __syncwarp();
  warp_store_rows<D>(dq + attn_q_offset(p, b, 0, h), q_stride, q0 + w0, p.T, dq_acc, Ss + w0 * L::kLdS,
                     L::kLdS);
}

// ---- host side
// ----------------------------------------------------------------------------------------------

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

inline bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// The kernel family that runs, per AttentionOptions::kernel (see there).
enum class Family { kFma, kWmma, kMma };

template <typename T>
Family pick_family(const AttentionParams& p, AttentionKernel kernel,
                   std::initializer_list<const void*> ptrs) {
  const bool fits = std::is_same_v<T, __nv_bfloat16> && (p.D == 64 || p.D == 128);
  bool aligned = true;
  for (const void* ptr : ptrs) aligned = aligned && aligned16(ptr);
  if (kernel == AttentionKernel::kFma) return Family::kFma;
  const bool tensor_cores_asked = kernel == AttentionKernel::kTensorCore || kernel == AttentionKernel::kMma;
  if (tensor_cores_asked && !(fits && aligned)) {
    throw std::invalid_argument(
        "attention_flash: the tensor-core kernels need bf16 storage, D in {64, 128} and 16-byte aligned "
        "tensors");
  }
  if (!(fits && aligned)) return Family::kFma;
  return kernel == AttentionKernel::kTensorCore ? Family::kWmma : Family::kMma;
}

[[noreturn]] inline void unsupported_head_size(int D) {
  throw std::invalid_argument("attention_flash: head size D=" + std::to_string(D) +
                              " is not supported (64 or 128); use attention_simple_* for other sizes");
}

template <typename T, int D>
void forward_fma(const AttentionParams& p, T* out, float* lse, const T* q, const T* k, const T* v,
                 cudaStream_t stream) {
  constexpr size_t smem = FmaLayout<D>::kFwdBytes;
  set_smem(fwd_fma_kernel<T, D>, smem);
  const dim3 grid(ceil_div(p.T, kFmaBr), p.Hq, p.B);
  fwd_fma_kernel<T, D><<<grid, kFmaThreads, smem, stream>>>(out, lse, q, k, v, p);
  CUDA_CHECK_LAUNCH();
}

template <int D>
void forward_tc(const AttentionParams& p, bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                cudaStream_t stream) {
  constexpr size_t smem = TcLayout<D>::kFwdBytes;
  set_smem(fwd_tc_kernel<D>, smem);
  const dim3 grid(ceil_div(p.T, kTcTile), p.Hq, p.B);
  fwd_tc_kernel<D><<<grid, kTcThreads, smem, stream>>>(out, lse, q, k, v, p);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void delta_pass(const AttentionParams& p, float* delta, const T* dout, const T* out, cudaStream_t stream) {
  const size_t rows = static_cast<size_t>(p.B) * p.Hq * p.T;
  constexpr int kThreads = 256;  // 8 rows per block
  delta_kernel<T>
      <<<ceil_div(static_cast<long long>(rows) * 32, kThreads), kThreads, 0, stream>>>(delta, dout, out, p);
  CUDA_CHECK_LAUNCH();
}

template <typename T, int D>
void backward_fma(const AttentionParams& p, T* dq, T* dk, T* dv, const float* delta, const T* dout,
                  const T* q, const T* k, const T* v, const float* lse, cudaStream_t stream) {
  constexpr size_t smem_kv = FmaLayout<D>::kDkdvBytes, smem_q = FmaLayout<D>::kDqBytes;
  set_smem(dkdv_fma_kernel<T, D>, smem_kv);
  set_smem(dq_fma_kernel<T, D>, smem_q);
  const dim3 grid_kv(ceil_div(p.T, kFmaBc), p.Hkv, p.B), grid_q(ceil_div(p.T, kFmaBr), p.Hq, p.B);
  dkdv_fma_kernel<T, D><<<grid_kv, kFmaThreads, smem_kv, stream>>>(dk, dv, q, k, v, dout, lse, delta, p);
  CUDA_CHECK_LAUNCH();
  dq_fma_kernel<T, D><<<grid_q, kFmaThreads, smem_q, stream>>>(dq, q, k, v, dout, lse, delta, p);
  CUDA_CHECK_LAUNCH();
}

template <int D>
void backward_tc(const AttentionParams& p, bf16* dq, bf16* dk, bf16* dv, const float* delta, const bf16* dout,
                 const bf16* q, const bf16* k, const bf16* v, const float* lse, cudaStream_t stream) {
  constexpr size_t smem_kv = TcLayout<D>::kDkdvBytes, smem_q = TcLayout<D>::kDqBytes;
  set_smem(dkdv_tc_kernel<D>, smem_kv);
  set_smem(dq_tc_kernel<D>, smem_q);
  const dim3 grid_kv(ceil_div(p.T, kTcTile), p.Hkv, p.B), grid_q(ceil_div(p.T, kTcTile), p.Hq, p.B);
  dkdv_tc_kernel<D><<<grid_kv, kTcThreads, smem_kv, stream>>>(dk, dv, q, k, v, dout, lse, delta, p);
  CUDA_CHECK_LAUNCH();
  dq_tc_kernel<D><<<grid_q, kTcThreads, smem_q, stream>>>(dq, q, k, v, dout, lse, delta, p);
  CUDA_CHECK_LAUNCH();
}

}  // namespace attention_flash_detail

// Number of floats in lse and in the backward workspace delta: B * Hq * T.
inline size_t attention_flash_stats_elems(const AttentionShape& s) {
  return static_cast<size_t>(s.B) * s.Hq * s.T;
}

// out [B,T,Hq,D] and lse [B,Hq,T] (fp32 log-sum-exp of each row's visible scores) from q [B,T,Hq,D] and
// k, v [B,T,Hkv,D]. All pointers are device pointers. T is float or __nv_bfloat16; D must be 64 or 128.
template <typename T>
void attention_flash_forward(T* out, float* lse, const T* q, const T* k, const T* v,
                             const AttentionShape& shape, const AttentionOptions& opt, cudaStream_t stream) {
  namespace fd = attention_flash_detail;
  NvtxRange range("attention_flash_forward");
  const AttentionParams p = make_attention_params(shape, opt);
  if (p.D != 64 && p.D != 128) fd::unsupported_head_size(p.D);
  const fd::Family family = fd::pick_family<T>(p, opt.kernel, {out, q, k, v});  // throws if not allowed
  (void)family;                                                                 // only read for bf16 storage
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (family == fd::Family::kMma) {
      if (p.D == 64) {
        fd::forward_mma<64>(p, out, lse, q, k, v, stream);
      } else {
        fd::forward_mma<128>(p, out, lse, q, k, v, stream);
      }
      return;
    }
    if (family == fd::Family::kWmma) {
      if (p.D == 64) {
        fd::forward_tc<64>(p, out, lse, q, k, v, stream);
      } else {
        fd::forward_tc<128>(p, out, lse, q, k, v, stream);
      }
      return;
    }
  }
  if (p.D == 64) {
    fd::forward_fma<T, 64>(p, out, lse, q, k, v, stream);
  } else {
    fd::forward_fma<T, 128>(p, out, lse, q, k, v, stream);
  }
}

// dq [B,T,Hq,D], dk, dv [B,T,Hkv,D] (overwritten) from dout, the forward's out and lse, and q, k, v.
// delta is a workspace of attention_flash_stats_elems(shape) floats. The options must be the forward's
// (same mask, ALiBi, dropout seed and stream, and the same kernel choice).
template <typename T>
void attention_flash_backward(T* dq, T* dk, T* dv, float* delta, const T* dout, const T* out, const T* q,
                              const T* k, const T* v, const float* lse, const AttentionShape& shape,
                              const AttentionOptions& opt, cudaStream_t stream) {
  namespace fd = attention_flash_detail;
  NvtxRange range("attention_flash_backward");
  const AttentionParams p = make_attention_params(shape, opt);
  if (p.D != 64 && p.D != 128) fd::unsupported_head_size(p.D);
  const fd::Family family = fd::pick_family<T>(p, opt.kernel, {dq, dk, dv, dout, q, k, v});
  (void)family;  // only read for bf16 storage
  fd::delta_pass<T>(p, delta, dout, out, stream);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (family == fd::Family::kMma) {
      if (p.D == 64) {
        fd::backward_mma<64>(p, dq, dk, dv, delta, dout, q, k, v, lse, stream);
      } else {
        fd::backward_mma<128>(p, dq, dk, dv, delta, dout, q, k, v, lse, stream);
      }
      return;
    }
    if (family == fd::Family::kWmma) {
      if (p.D == 64) {
        fd::backward_tc<64>(p, dq, dk, dv, delta, dout, q, k, v, lse, stream);
      } else {
        fd::backward_tc<128>(p, dq, dk, dv, delta, dout, q, k, v, lse, stream);
      }
      return;
    }
  }
  if (p.D == 64) {
    fd::backward_fma<T, 64>(p, dq, dk, dv, delta, dout, q, k, v, lse, stream);
  } else {
    fd::backward_fma<T, 128>(p, dq, dk, dv, delta, dout, q, k, v, lse, stream);
  }
}

}  // namespace llm::cuda
