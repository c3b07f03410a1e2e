// Attention on the GPU, the fast fused path: the flash-attention forward and backward of
// kernels/attention_flash.cuh (same math, same tiling plan, same determinism: no atomics, every sum in a
// fixed order) written with the bf16 tensor-core instruction `mma.sync.m16n8k16` directly, so that the
// score tile S, the probabilities P and the accumulators O, dK, dV, dQ never leave registers. The WMMA
// kernels of attention_flash.cuh (AttentionKernel::kTensorCore) stay as the readable tensor-core version
// and are this file's test oracle, together with the fp32 kernels and the CPU reference.
//
// ---------------------------------------------------------------------------------------------------------
// Math (see attention_flash.cuh for the derivation of the backward)
// ---------------------------------------------------------------------------------------------------------
//   forward   s_ij = c <q_i, k_j> - slope (i - j);  online softmax over key tiles keeping m_i, l_i and the
//             unnormalised o_i;  out_i = o_i / l_i,  LSE_i = m_i + log l_i.
//   backward  Delta_i = <dO_i, out_i>;  P_ij = exp(s_ij - LSE_i);  dP_ij = M_ij <dO_i, v_j>;
//             dS_ij = P_ij (dP_ij - Delta_i);  dV_j = sum_i P_ij M_ij dO_i;  dK_j = c sum_i dS_ij q_i;
//             dQ_i = c sum_j dS_ij k_j  (sums over i also run over the query heads sharing K/V head g).
// The exponentials are taken in base 2: with s' = s log2(e), exp(s - m) = 2^(s' - m'), and ex2.approx is a
// single instruction. The LSE is stored in natural log units, exactly as the other kernels store it.
//
// ---------------------------------------------------------------------------------------------------------
// The tensor-core instruction and its register layout
// ---------------------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 computes C[16x8] += A[16x16] B[16x8] for one warp.
// With lane = 4 * gid + tig (gid = lane / 4 in 0..7, tig = lane % 4 in 0..3) each thread holds
//   A: 4 registers of 2 bf16:  a0 = A[gid][2tig..+1]    a1 = A[gid+8][2tig..+1]
//                              a2 = A[gid][2tig+8..+9]  a3 = A[gid+8][2tig+8..+9]
//   B: 2 registers of 2 bf16:  b0 = B[2tig..+1][gid]    b1 = B[2tig+8..+9][gid]
//   C: 4 floats:               c0, c1 = C[gid][2tig..+1]   c2, c3 = C[gid+8][2tig..+1]
// Two facts make the whole computation register-resident:
//   1. A thread holds two whole rows' worth of positions (gid and gid + 8) of every C tile, and the four
//      threads of a quad (same gid) hold the rest of those rows, so row maxima and row sums need only two
//      shuffles (xor 1, xor 2).
//   2. The C layout of two horizontally adjacent 16x8 tiles is exactly the A layout of one 16x16 tile:
//      {c0c1 of tile 2k, c2c3 of tile 2k, c0c1 of tile 2k+1, c2c3 of tile 2k+1} = {a0, a1, a2, a3}. So P
//      (or dS), computed as a C tile, is rounded to bf16 and fed straight back as the A operand of P V.
// Operands come from shared memory with ldmatrix (m8n8.x4: four 8x8 bf16 matrices, each lane giving the
// address of one row). Plain ldmatrix of a row-major [n][k] tile gives B fragments of its transpose (K for
// Q K^T); ldmatrix.trans of a row-major [k][n] tile gives B fragments of the tile itself (V for P V).
// Tiles are stored with rows padded by 16 bytes, so the eight 16-byte rows an 8x8 matrix reads fall in
// eight different bank groups (a row of D = 128 bf16 plus padding is 272 bytes = 16 mod 128).
//
// ---------------------------------------------------------------------------------------------------------
// Tiling (64 x 64 tiles, 4 warps of 16 rows, as the WMMA kernels)
// ---------------------------------------------------------------------------------------------------------
//   forward   grid (query tiles, Hq, B), heaviest (last) causal tiles first. Each warp keeps its 16 query
//             rows of Q as A fragments, S as 8 C tiles and O as D/8 C tiles. K and V tiles are double
//             buffered: cp.async brings tile t+1 while tile t is computed, one __syncthreads per tile.
//   dK/dV     grid (key tiles, Hkv, B). Warp w owns keys 16w..16w+15 and computes S^T = K Q^T and
//             dA^T = V dO^T (keys are the rows, so P^T and dS^T come out as C tiles, which are the A
//             operands of dV += (P M)^T dO and dK += (c dS)^T Q). Q and dO tiles are double buffered. For
//             D = 128 the 64 queries of a tile are taken 32 at a time to keep S^T and dA^T small next to
//             the 2 x 64 accumulator registers.
//   dQ        grid (query tiles, Hq, B), heaviest first. Warp w owns 16 query rows, recomputes S and dA,
//             forms dS and accumulates dQ += (c dS) K. K and V tiles are double buffered.
// Occupancy. With 4 warps a block cannot keep the tensor cores busy through its own softmax and barriers,
// so for D = 128 the forward and dQ kernels come in variants that fit 3 blocks on an SM: the forward
// stages Q in the second V buffer (4 tiles of shared memory instead of 5) and asks for <= 168 registers;
// dQ takes 32-key tiles (half the S, dA registers and K, V buffers). Both do the same products in the
// same order, so their results equal the 64-key, 1-block forms bit for bit (tested). dK/dV holds two
// D-wide accumulators and stays at 2 blocks.
// Requirements: bf16 storage, D in {64, 128}, 16-byte aligned tensors (checked by the dispatcher).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/attention_common.cuh"
#include "kernels/cuda_common.cuh"

namespace llm::cuda {

namespace attention_flash_detail {

using bf16 = __nv_bfloat16;

extern __shared__ __align__(128) unsigned char attn_mma_smem[];

constexpr int kMmaThreads = 128;  // 4 warps
constexpr int kMmaTile = 64;      // Br = Bc = 64; each warp owns 16 rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
struct MmaLayout {
  static constexpr int kLd = D + 8;  // bf16 row stride of a [64][D] tile (16 bytes of padding)
  static constexpr int kTileElems = kMmaTile * kLd;
  static constexpr size_t kTileBytes = static_cast<size_t>(kTileElems) * sizeof(bf16);
  static constexpr size_t kFwdBytes = 5 * kTileBytes;         // 2 x K, 2 x V, Q
  static constexpr size_t kFwdCompactBytes = 4 * kTileBytes;  // 2 x K, 2 x V (Q staged in a V buffer)
  static constexpr size_t kBwdBytes = 6 * kTileBytes;  // dK/dV: K, V, 2 x (Q, dO) (dQ: backward_mma_launch)
  static_assert(kTileBytes % 128 == 0, "tiles stay 128-byte aligned");
};

// ---- PTX wrappers ------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared without passing through registers; zero-filled when !valid.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(ptr)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(ptr)));
}

// c += a b for one m16n8k16 tile (layouts in the header).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x in one instruction (relative error ~2^-22; 2^-inf = 0).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats -> one register of two bf16, the first in the low half (the lower column of a fragment).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ---- fragment addressing -----------------------------------------------------------------------------

// A fragment of the 16x16 block at (row0, col0) of a row-major tile: lanes 0-15 give rows row0..row0+15 at
// col0, lanes 16-31 the same rows at col0 + 8 (matrices a0, a1, a2, a3 in that order).
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* tile, int ld, int row0, int col0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, tile + (row0 + (lane & 15)) * ld + col0 + (lane >> 4) * 8);
}

// B fragments of two n8 tiles (n0 and n0 + 8) for k16 step k0, from a row-major [n][k] tile (B = tile^T):
// r[0], r[1] = b0, b1 of tile n0; r[2], r[3] = b0, b1 of tile n0 + 8.
__device__ __forceinline__ void load_b_nk(uint32_t (&r)[4], const bf16* tile, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(r, tile + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
}

// The same from a row-major [k][n] tile (B = tile), through the transposing ldmatrix.
__device__ __forceinline__ void load_b_kn(uint32_t (&r)[4], const bf16* tile, int ld, int k0, int n0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(r, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
}

// acc[16 x 8N] += A[16 x K] B^T with A rows a_row0.. of tile `a` and B = rows n0.. of the [n][k] tile `b`.
template <int K, int N8>
__device__ __forceinline__ void warp_mma_abt(float (&acc)[N8][4], const bf16* a, int a_row0, const bf16* b,
                                             int n0, int ld) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[4];
    load_a(af, a, ld, a_row0, kk * 16);
#pragma unroll
    for (int nn = 0; nn < N8 / 2; ++nn) {
      uint32_t bf[4];
      load_b_nk(bf, b, ld, n0 + nn * 16, kk * 16);
      mma_bf16(acc[2 * nn], af, bf[0], bf[1]);
      mma_bf16(acc[2 * nn + 1], af, bf[2], bf[3]);
    }
  }
}

// acc[16 x D] += P[16 x 16 KS] B where P is given as C tiles p[2 KS][4] (fact 2 of the header) and B is
// rows k0.. of the row-major [k][D] tile `b`.
template <int D, int KS>
__device__ __forceinline__ void warp_mma_pb(float (&acc)[D / 8][4], const float (&p)[2 * KS][4],
                                            const bf16* b, int k0, int ld) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    const uint32_t pa[4] = {pack_bf16x2(p[2 * kk][0], p[2 * kk][1]), pack_bf16x2(p[2 * kk][2], p[2 * kk][3]),
                            pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                            pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t bf[4];
      load_b_kn(bf, b, ld, k0 + kk * 16, dn * 16);
      mma_bf16(acc[2 * dn], pa, bf[0], bf[1]);
      mma_bf16(acc[2 * dn + 1], pa, bf[2], bf[3]);
    }
  }
}

// Starts the asynchronous copy of rows t0 .. t0 + 63 of a [*, row_stride] bf16 tensor into a padded tile;
// rows at or beyond T_len become zero. The caller commits the group.
template <int D, int kRows = kMmaTile>
__device__ __forceinline__ void async_load_tile(bf16* dst, const bf16* src, size_t row_stride, int t0,
                                                int T_len) {
  constexpr int kVecs = D / 8;
  for (int e = threadIdx.x; e < kRows * kVecs; e += kMmaThreads) {
    const int r = e / kVecs, c = e % kVecs, t = t0 + r;
    const bool valid = t < T_len;
    cp_async_16(dst + r * MmaLayout<D>::kLd + c * 8,
                src + static_cast<size_t>(valid ? t : 0) * row_stride + c * 8, valid);
  }
}

// Writes a warp's 16 x D fp32 accumulator (C tiles, rows row0.. of its tile) as bf16 rows t0 + row0 + r of
// a [*, row_stride] tensor, scaling row gid by scale_a and row gid + 8 by scale_b. The rows go through the
// warp's own 16 rows of `stage` so that the global stores are whole 16-byte vectors.
template <int D>
__device__ __forceinline__ void warp_store_rows(bf16* dst, size_t row_stride, int t_first, int T_len,
                                                const float (&acc)[D / 8][4], float scale_a, float scale_b,
                                                bf16* stage) {
  constexpr int kLd = MmaLayout<D>::kLd;
  const int lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  __syncwarp();
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    const int col = dn * 8 + 2 * tig;
    *reinterpret_cast<uint32_t*>(stage + gid * kLd + col) =
        pack_bf16x2(acc[dn][0] * scale_a, acc[dn][1] * scale_a);
    *reinterpret_cast<uint32_t*>(stage + (gid + 8) * kLd + col) =
        pack_bf16x2(acc[dn][2] * scale_b, acc[dn][3] * scale_b);
  }
  __syncwarp();
  constexpr int kVecs = D / 8;
  for (int e = lane; e < 16 * kVecs; e += 32) {
    const int r = e / kVecs, c = e % kVecs, t = t_first + r;
    if (t < T_len)
      *reinterpret_cast<uint4*>(dst + static_cast<size_t>(t) * row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(stage + r * kLd + c * 8);
  }
}

// ============================================================================================================
// Forward
// ============================================================================================================

// kMinBlocks > 1 asks ptxas for that many resident blocks per SM (fewer registers each) and selects the
// compact shared-memory layout: Q is staged in the second V buffer, read into registers before the loop,
// and the block holds 4 tiles instead of 5. The arithmetic is the same in both forms.
template <int D, bool kDropout, int kMinBlocks>
__global__ void __launch_bounds__(kMmaThreads, kMinBlocks)
    fwd_mma_kernel(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, AttentionParams p) {
  using L = MmaLayout<D>;
  constexpr int kLd = L::kLd, Bc = kMmaTile;
  constexpr bool kCompact = kMinBlocks > 1;
  bf16* const Ks0 = reinterpret_cast<bf16*>(attn_mma_smem);  // K tiles at Ks0 + buf * kTileElems
  bf16* const Vs0 = Ks0 + 2 * L::kTileElems;                 // V tiles likewise
  bf16* const Qs = kCompact ? Vs0 + L::kTileElems : Ks0 + 4 * L::kTileElems;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kMmaTile, h = blockIdx.y, b = blockIdx.z, g = h / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int w0 = warp * 16, row_i[2] = {q0 + w0 + gid, q0 + w0 + gid + 8};
  const float score_scale = p.scale * kLog2e, slope = attn_slope(p, h) * kLog2e;
  const size_t q_stride = static_cast<size_t>(p.Hq) * D, kv_stride = static_cast<size_t>(p.Hkv) * D;
  const bf16* k_head = k + attn_kv_offset(p, b, 0, g);
  const bf16* v_head = v + attn_kv_offset(p, b, 0, g);

  int kt_begin, kt_end;
  key_tile_range(p, q0, min(q0 + kMmaTile, p.T) - 1, Bc, &kt_begin, &kt_end);
  async_load_tile<D>(Qs, q + attn_q_offset(p, b, 0, h), q_stride, q0, p.T);
  async_load_tile<D>(Ks0, k_head, kv_stride, kt_begin * Bc, p.T);
  async_load_tile<D>(Vs0, v_head, kv_stride, kt_begin * Bc, p.T);
  cp_async_commit();

  // This warp's 16 rows of Q, as A fragments for the whole loop.
  uint32_t qf[D / 16][4];
  cp_async_wait_all();
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a(qf[kk], Qs, kLd, w0, kk * 16);
  if constexpr (kCompact) __syncthreads();  // every warp holds its Q before the V buffer is reused

  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};  // base-2 units; l per thread

  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int k0 = kt * Bc, buf = (kt - kt_begin) & 1;
    cp_async_wait_all();
    __syncthreads();  // tile kt has landed everywhere, and every warp is done with tile kt - 1
    if (kt + 1 < kt_end) {
      async_load_tile<D>((Ks0 + (buf ^ 1) * L::kTileElems), k_head, kv_stride, k0 + Bc, p.T);
      async_load_tile<D>((Vs0 + (buf ^ 1) * L::kTileElems), v_head, kv_stride, k0 + Bc, p.T);
      cp_async_commit();
    }

    // S = Q K^T (raw dot products) for this warp's 16 rows.
    float s[Bc / 8][4];
#pragma unroll
    for (int n = 0; n < Bc / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nn = 0; nn < Bc / 16; ++nn) {
        uint32_t bf[4];
        load_b_nk(bf, (Ks0 + buf * L::kTileElems), kLd, nn * 16, kk * 16);
        mma_bf16(s[2 * nn], qf[kk], bf[0], bf[1]);
        mma_bf16(s[2 * nn + 1], qf[kk], bf[2], bf[3]);
      }
    }

    // Scores in base 2, masked to -inf; the tile's row maxima.
    const bool full = tile_fully_visible(p, q0, kMmaTile, k0, Bc);
    float m_new[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int n = 0; n < Bc / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = row_i[e / 2], j = k0 + n * 8 + 2 * tig + (e & 1);
        s[n][e] = visible_in(p, full, b, i, j) ? s[n][e] * score_scale - slope * static_cast<float>(i - j)
                                               : -INFINITY;
        m_new[e / 2] = fmaxf(m_new[e / 2], s[n][e]);
      }
    }
    float m_use[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffffu, m_new[r], 1));
      m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffffu, m_new[r], 2));
      m_use[r] = m_new[r] == -INFINITY ? 0.0f : m_new[r];  // a row with nothing visible yet stays 0
      alpha[r] = exp2_approx(m_run[r] - m_use[r]);         // 0 while m_run is -inf
      m_run[r] = m_new[r];
    }

    // P = 2^(s - m) (l sums it undropped), then P M in place for the product with V.
    float row_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < Bc / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pr = exp2_approx(s[n][e] - m_use[e / 2]);
        row_sum[e / 2] += pr;
        s[n][e] = (kDropout && pr != 0.0f)
                      ? pr * attn_dropout_factor(p, b, h, row_i[e / 2], k0 + n * 8 + 2 * tig + (e & 1))
                      : pr;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = alpha[r] * l_run[r] + row_sum[r];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o[dn][0] *= alpha[0];
      o[dn][1] *= alpha[0];
      o[dn][2] *= alpha[1];
      o[dn][3] *= alpha[1];
    }

    // O += (P M) V.
    warp_mma_pb<D, Bc / 16>(o, s, (Vs0 + buf * L::kTileElems), 0, kLd);
  }

  // Row sums across the quad, then out = O / l and LSE = (m + log2 l) ln 2.
  float inv_l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    const bool valid = row_i[r] < p.T;
    inv_l[r] = valid ? 1.0f / l_run[r] : 0.0f;
    if (valid && tig == 0) lse[attn_row_index(p, b, h, row_i[r])] = (m_run[r] + log2f(l_run[r])) * kLn2;
  }
  if constexpr (kCompact) __syncthreads();  // Qs is a V buffer: other warps may still read it
  warp_store_rows<D>(out + attn_q_offset(p, b, 0, h), q_stride, q0 + w0, p.T, o, inv_l[0], inv_l[1],
                     Qs + w0 * kLd);
}

// ============================================================================================================
// Backward: dK and dV
// ============================================================================================================

template <int D, bool kDropout>
__global__ void __launch_bounds__(kMmaThreads)
    dkdv_mma_kernel(bf16* dk, bf16* dv, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                    const float* lse, const float* delta, AttentionParams p) {
  using L = MmaLayout<D>;
  constexpr int kLd = L::kLd, Br = kMmaTile;
  constexpr int kChunk = D == 128 ? 32 : 64;  // queries per S^T / dA^T pass (register budget)
  bf16* Ks = reinterpret_cast<bf16*>(attn_mma_smem);
  bf16* Vs = Ks + L::kTileElems;
  bf16* const Qs0 = Ks + 2 * L::kTileElems;   // Q tiles at Qs0 + buf * kTileElems, buf in {0, 1}
  bf16* const dOs0 = Ks + 4 * L::kTileElems;  // dO tiles likewise
  const int k0 = blockIdx.x * kMmaTile, g = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int w0 = warp * 16, key_j[2] = {k0 + w0 + gid, k0 + w0 + gid + 8};
  const float score_scale = p.scale * kLog2e;
  const size_t q_stride = static_cast<size_t>(p.Hq) * D, kv_stride = static_cast<size_t>(p.Hkv) * D;

  int qt_begin, qt_end;
  query_tile_range(p, k0, min(k0 + kMmaTile, p.T) - 1, Br, &qt_begin, &qt_end);
  const int q_tiles = qt_end - qt_begin, steps = p.group * q_tiles;  // (head, query tile) pairs

  async_load_tile<D>(Ks, k + attn_kv_offset(p, b, 0, g), kv_stride, k0, p.T);
  async_load_tile<D>(Vs, v + attn_kv_offset(p, b, 0, g), kv_stride, k0, p.T);
  if (steps > 0) {
    const int h = g * p.group;
    async_load_tile<D>(Qs0, q + attn_q_offset(p, b, 0, h), q_stride, qt_begin * Br, p.T);
    async_load_tile<D>(dOs0, dout + attn_q_offset(p, b, 0, h), q_stride, qt_begin * Br, p.T);
  }
  cp_async_commit();

  float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[dn][e] = dv_acc[dn][e] = 0.0f;
  }

  for (int step = 0; step < steps; ++step) {
    const int h = g * p.group + step / q_tiles, q0 = (qt_begin + step % q_tiles) * Br, buf = step & 1;
    cp_async_wait_all();
    __syncthreads();  // this step's Q, dO have landed, and every warp is done with the previous step's
    if (step + 1 < steps) {
      const int h_next = g * p.group + (step + 1) / q_tiles, q0_next = (qt_begin + (step + 1) % q_tiles) * Br;
      async_load_tile<D>((Qs0 + (buf ^ 1) * L::kTileElems), q + attn_q_offset(p, b, 0, h_next), q_stride,
                         q0_next, p.T);
      async_load_tile<D>((dOs0 + (buf ^ 1) * L::kTileElems), dout + attn_q_offset(p, b, 0, h_next), q_stride,
                         q0_next, p.T);
      cp_async_commit();
    }
    const float slope = attn_slope(p, h) * kLog2e;
    const bool full = tile_fully_visible(p, q0, Br, k0, kMmaTile);
    const size_t stats_row = attn_row_index(p, b, h, 0);

#pragma unroll
    for (int c0 = 0; c0 < Br; c0 += kChunk) {
      // S^T = K Q^T and dA^T = V dO^T for this warp's 16 keys and queries c0 .. c0 + kChunk - 1.
      float st[kChunk / 8][4], dat[kChunk / 8][4];
#pragma unroll
      for (int n = 0; n < kChunk / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) st[n][e] = dat[n][e] = 0.0f;
      }
      warp_mma_abt<D, kChunk / 8>(st, Ks, w0, (Qs0 + buf * L::kTileElems), c0, kLd);
      warp_mma_abt<D, kChunk / 8>(dat, Vs, w0, (dOs0 + buf * L::kTileElems), c0, kLd);

      // (P M)^T into st and (c dS)^T into dat; element (key j, query i).
#pragma unroll
      for (int n = 0; n < kChunk / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = q0 + c0 + n * 8 + 2 * tig + (e & 1), j = key_j[e / 2];
          float a = 0.0f, ds = 0.0f;
          if (visible_in(p, full, b, i, j)) {
            const float lse_i = __ldg(lse + stats_row + i), delta_i = __ldg(delta + stats_row + i);
            const float pr =
                exp2_approx(st[n][e] * score_scale - slope * static_cast<float>(i - j) - lse_i * kLog2e);
            const float mf = kDropout ? attn_dropout_factor(p, b, h, i, j) : 1.0f;
            a = pr * mf;
            ds = pr * (mf * dat[n][e] - delta_i);
          }
          st[n][e] = a;
          dat[n][e] = p.scale * ds;
        }
      }

      // dV += (P M)^T dO and dK += (c dS)^T Q over these queries.
      warp_mma_pb<D, kChunk / 16>(dv_acc, st, (dOs0 + buf * L::kTileElems), c0, kLd);
      warp_mma_pb<D, kChunk / 16>(dk_acc, dat, (Qs0 + buf * L::kTileElems), c0, kLd);
    }
  }

  // Each warp stages through its own rows of K and V, which only it has read (the wait matters only when
  // no step ran and the K, V copies may still be in flight).
  cp_async_wait_all();
  warp_store_rows<D>(dk + attn_kv_offset(p, b, 0, g), kv_stride, k0 + w0, p.T, dk_acc, 1.0f, 1.0f,
                     Ks + w0 * kLd);
  warp_store_rows<D>(dv + attn_kv_offset(p, b, 0, g), kv_stride, k0 + w0, p.T, dv_acc, 1.0f, 1.0f,
                     Vs + w0 * kLd);
}

// ============================================================================================================
// Backward: dQ
// ============================================================================================================

// Bc (keys per tile, 64 or 32) and kMinBlocks select an occupancy variant: with 32-key tiles S and dA
// take half the registers and the K, V buffers half the shared memory, so that 3 blocks fit on an SM. The
// products run over the keys in the same order either way, so the result is the same to the bit.
template <int D, bool kDropout, int Bc, int kMinBlocks>
__global__ void __launch_bounds__(kMmaThreads, kMinBlocks)
    dq_mma_kernel(bf16* dq, const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                  const float* delta, AttentionParams p) {
  using L = MmaLayout<D>;
  constexpr int kLd = L::kLd, kKvElems = Bc * kLd;
  static_assert(Bc == 64 || Bc == 32, "key tile");
  bf16* Qs = reinterpret_cast<bf16*>(attn_mma_smem);
  bf16* dOs = Qs + L::kTileElems;
  bf16* const Ks0 = Qs + 2 * L::kTileElems;  // K tiles at Ks0 + buf * kKvElems, buf in {0, 1}
  bf16* const Vs0 = Ks0 + 2 * kKvElems;      // V tiles likewise
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kMmaTile, h = blockIdx.y, b = blockIdx.z, g = h / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int w0 = warp * 16, row_i[2] = {q0 + w0 + gid, q0 + w0 + gid + 8};
  const float score_scale = p.scale * kLog2e, slope = attn_slope(p, h) * kLog2e;
  const size_t q_stride = static_cast<size_t>(p.Hq) * D, kv_stride = static_cast<size_t>(p.Hkv) * D;
  const bf16* k_head = k + attn_kv_offset(p, b, 0, g);
  const bf16* v_head = v + attn_kv_offset(p, b, 0, g);
  float lse2[2], delta_r[2];  // the rows' LSE in base 2 and Delta
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool valid = row_i[r] < p.T;
    lse2[r] = valid ? __ldg(lse + attn_row_index(p, b, h, row_i[r])) * kLog2e : 0.0f;
    delta_r[r] = valid ? __ldg(delta + attn_row_index(p, b, h, row_i[r])) : 0.0f;
  }

  int kt_begin, kt_end;
  key_tile_range(p, q0, min(q0 + kMmaTile, p.T) - 1, Bc, &kt_begin, &kt_end);
  async_load_tile<D>(Qs, q + attn_q_offset(p, b, 0, h), q_stride, q0, p.T);
  async_load_tile<D>(dOs, dout + attn_q_offset(p, b, 0, h), q_stride, q0, p.T);
  async_load_tile<D, Bc>(Ks0, k_head, kv_stride, kt_begin * Bc, p.T);
  async_load_tile<D, Bc>(Vs0, v_head, kv_stride, kt_begin * Bc, p.T);
  cp_async_commit();

  float dq_acc[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) dq_acc[dn][0] = dq_acc[dn][1] = dq_acc[dn][2] = dq_acc[dn][3] = 0.0f;

  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int k0 = kt * Bc, buf = (kt - kt_begin) & 1;
    cp_async_wait_all();
    __syncthreads();  // tile kt has landed everywhere, and every warp is done with tile kt - 1
    if (kt + 1 < kt_end) {
      async_load_tile<D, Bc>((Ks0 + (buf ^ 1) * kKvElems), k_head, kv_stride, k0 + Bc, p.T);
      async_load_tile<D, Bc>((Vs0 + (buf ^ 1) * kKvElems), v_head, kv_stride, k0 + Bc, p.T);
      cp_async_commit();
    }

    // S = Q K^T and dA = dO V^T for this warp's 16 rows.
    float s[Bc / 8][4], da[Bc / 8][4];
#pragma unroll
    for (int n = 0; n < Bc / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = da[n][e] = 0.0f;
    }
    warp_mma_abt<D, Bc / 8>(s, Qs, w0, (Ks0 + buf * kKvElems), 0, kLd);
    warp_mma_abt<D, Bc / 8>(da, dOs, w0, (Vs0 + buf * kKvElems), 0, kLd);

    // c dS into s.
    const bool full = tile_fully_visible(p, q0, kMmaTile, k0, Bc);
#pragma unroll
    for (int n = 0; n < Bc / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, i = row_i[r], j = k0 + n * 8 + 2 * tig + (e & 1);
        float ds = 0.0f;
        if (visible_in(p, full, b, i, j)) {
          const float pr = exp2_approx(s[n][e] * score_scale - slope * static_cast<float>(i - j) - lse2[r]);
          const float mf = kDropout ? attn_dropout_factor(p, b, h, i, j) : 1.0f;
          ds = pr * (mf * da[n][e] - delta_r[r]);
        }
        s[n][e] = p.scale * ds;
      }
    }

    // dQ += (c dS) K.
    warp_mma_pb<D, Bc / 16>(dq_acc, s, (Ks0 + buf * kKvElems), 0, kLd);
  }

  warp_store_rows<D>(dq + attn_q_offset(p, b, 0, h), q_stride, q0 + w0, p.T, dq_acc, 1.0f, 1.0f,
                     Qs + w0 * kLd);
}

// ---- launchers ---------------------------------------------------------------------------------------

// The kernels are compiled with and without dropout so that the Philox code stays out of the common path.
template <int D, bool kDropout, int kMinBlocks = 1>
void forward_mma_launch(const AttentionParams& p, bf16* out, float* lse, const bf16* q, const bf16* k,
                        const bf16* v, cudaStream_t stream) {
  constexpr size_t smem = kMinBlocks > 1 ? MmaLayout<D>::kFwdCompactBytes : MmaLayout<D>::kFwdBytes;
  auto kernel = fwd_mma_kernel<D, kDropout, kMinBlocks>;
  CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(ceil_div(p.T, kMmaTile), p.Hq, p.B);
  kernel<<<grid, kMmaThreads, smem, stream>>>(out, lse, q, k, v, p);
  CUDA_CHECK_LAUNCH();
}

template <int D>
void forward_mma(const AttentionParams& p, bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                 cudaStream_t stream) {
  // D = 128: 3 blocks per SM with the compact layout, 186.5 against 156.8 TFLOP/s for 1 on an H200 (causal,
  // T = 2048; dev/bench/bench_attention.cu). D = 64 fits 3 blocks per SM in the default form already.
  constexpr int kMinBlocks = D == 128 ? 3 : 1;
  if (p.dropout > 0.0f) {
    forward_mma_launch<D, true, kMinBlocks>(p, out, lse, q, k, v, stream);
  } else {
    forward_mma_launch<D, false, kMinBlocks>(p, out, lse, q, k, v, stream);
  }
}

// dK/dV then dQ; delta must hold <dO_i, out_i> (delta_kernel in attention_flash.cuh).
template <int D, bool kDropout, int kDqKeys = kMmaTile, int kDqMinBlocks = 1>
void backward_mma_launch(const AttentionParams& p, bf16* dq, bf16* dk, bf16* dv, const float* delta,
                         const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse,
                         cudaStream_t stream) {
  constexpr size_t smem_kv = MmaLayout<D>::kBwdBytes;
  constexpr size_t smem_q = (2 * kMmaTile + 4 * kDqKeys) * MmaLayout<D>::kLd * sizeof(bf16);
  auto dkdv_kernel = dkdv_mma_kernel<D, kDropout>;
  auto dq_kernel = dq_mma_kernel<D, kDropout, kDqKeys, kDqMinBlocks>;
  CUDA_CHECK(cudaFuncSetAttribute(dkdv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem_kv)));
  CUDA_CHECK(
      cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_q)));
  const dim3 grid_kv(ceil_div(p.T, kMmaTile), p.Hkv, p.B), grid_q(ceil_div(p.T, kMmaTile), p.Hq, p.B);
  dkdv_kernel<<<grid_kv, kMmaThreads, smem_kv, stream>>>(dk, dv, q, k, v, dout, lse, delta, p);
  CUDA_CHECK_LAUNCH();
  dq_kernel<<<grid_q, kMmaThreads, smem_q, stream>>>(dq, q, k, v, dout, lse, delta, p);
  CUDA_CHECK_LAUNCH();
}

template <int D>
void backward_mma(const AttentionParams& p, bf16* dq, bf16* dk, bf16* dv, const float* delta,
                  const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse,
                  cudaStream_t stream) {
  // D = 128: dQ with 32-key tiles and 3 blocks per SM, backward 2.891 against 3.027 ms on an H200 (causal,
  // T = 2048; dev/bench/bench_attention.cu), the same bits (MmaBackwardVariantsEqualTheDefault).
  constexpr int kDqKeys = D == 128 ? 32 : kMmaTile, kDqMinBlocks = D == 128 ? 3 : 1;
  if (p.dropout > 0.0f) {
    backward_mma_launch<D, true, kDqKeys, kDqMinBlocks>(p, dq, dk, dv, delta, dout, q, k, v, lse, stream);
  } else {
    backward_mma_launch<D, false, kDqKeys, kDqMinBlocks>(p, dq, dk, dv, delta, dout, q, k, v, lse, stream);
  }
}

}  // namespace attention_flash_detail

}  // namespace llm::cuda
