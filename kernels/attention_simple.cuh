// Attention on the GPU, the simple (unfused) path: the teaching version and the test oracle of the fused
// kernels. It follows kernels/cpu/attention.h step by step and materialises the [B, Hq, T, T] matrices.
//
// Math (per batch row b and query head h; K/V head g = h / (Hq / Hkv); details in kernels/cpu/attention.h)
//   forward:   s_ij = c <q_i, k_j> - slope_h (i - j)    (fp32, masked entries excluded)
//              P_ij = exp(s_ij - m_i) / sum_{j visible} exp(s_ij - m_i)       (row softmax, fp32)
//              A_ij = P_ij M_ij      (dropout, M regenerated from Philox, never stored)
//              o_i  = sum_j A_ij v_j
//   backward:  dP_ij = M_ij <dO_i, v_j>                 (through o = A V and the dropout scaling)
//              dS_ij = P_ij (dP_ij - rowsum_i),  rowsum_i = sum_j P_ij dP_ij   (softmax Jacobian
//                      diag(P) - P P^T applied to dP)
//              dQ_i  = c sum_j dS_ij k_j
//              dK_j  = c sum_{h in group} sum_i dS_ij q_i    (the r query heads that share K/V head g)
//              dV_j  =   sum_{h in group} sum_i A_ij dO_i
//
// Kernels and ownership (straightforward: one thread per output element or per row, fixed loop order, so
// the results are deterministic; no atomics):
//   forward   scores   one thread per (b, h, i, j):   probs = s_ij (0 where masked)
//             softmax  one thread per row (b, h, i):  probs = P_ij in place (exactly 0 where masked)
//             pv       one thread per (b, i, h, d):   out = sum_j P_ij M_ij v_j[d]
//   backward  dprobs   one thread per (b, h, i, j):   dscores = dP_ij
//             dscores  one thread per row (b, h, i):  dscores = dS_ij in place
//             dq       one thread per (b, i, h, d):   dq = c sum_j dS_ij k_j[d]
//             dkdv     one thread per (b, j, g, d):   dk, dv summed over the group's heads and all i
//
// Buffers: probs and the backward workspace dscores are fp32 [B, Hq, T, T]; q/k/v/out/dq/dk/dv use the
// storage type T (float or __nv_bfloat16) and the layouts of the CPU reference; dq, dk, dv are overwritten.
// Works for any head size D (no tiling).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/attention_common.cuh"
#include "kernels/cuda_common.cuh"

namespace llm::cuda {

namespace attention_simple_detail {

constexpr int kThreads = 256;

// Splits a flat index over [B, Hq, T, T] into (b, h, i, j).
__device__ __forceinline__ void split_bhij(const AttentionParams& p, size_t idx, int* b, int* h, int* i,
                                           int* j) {
  *j = static_cast<int>(idx % p.T);
  idx /= p.T;
  *i = static_cast<int>(idx % p.T);
  idx /= p.T;
  *h = static_cast<int>(idx % p.Hq);
  *b = static_cast<int>(idx / p.Hq);
}

// Splits a flat index over [B, T, H, D] (the tensor layout) into (b, t, head, d).
__device__ __forceinline__ void split_bthd(size_t idx, int T, int H, int D, int* b, int* t, int* head,
                                           int* d) {
  *d = static_cast<int>(idx % D);
  idx /= D;
  *head = static_cast<int>(idx % H);
  idx /= H;
  *t = static_cast<int>(idx % T);
  *b = static_cast<int>(idx / T);
}

__device__ __forceinline__ size_t global_thread() {
  return static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ size_t grid_threads() {
  return static_cast<size_t>(gridDim.x) * blockDim.x;
}

// probs[b,h,i,j] = s_ij for visible entries, 0 otherwise.
template <typename T>
__global__ void scores_kernel(float* probs, const T* q, const T* k, AttentionParams p) {
  const size_t n = static_cast<size_t>(p.B) * p.Hq * p.T * p.T;
  for (size_t idx = global_thread(); idx < n; idx += grid_threads()) {
    int b, h, i, j;
    split_bhij(p, idx, &b, &h, &i, &j);
    float s = 0.0f;
    if (attn_visible(p, b, i, j)) {
      const T* qi = q + attn_q_offset(p, b, i, h);
      const T* kj = k + attn_kv_offset(p, b, j, h / p.group);
      float dot = 0.0f;
      for (int d = 0; d < p.D; ++d) dot += to_float(qi[d]) * to_float(kj[d]);
      s = attn_score(p, dot, attn_slope(p, h), i, j);
    }
    probs[idx] = s;
  }
}

// In place: scores -> P, one thread per row; masked entries become exactly 0.
__global__ void softmax_kernel(float* probs, AttentionParams p) {
  const size_t rows = static_cast<size_t>(p.B) * p.Hq * p.T;
  for (size_t row = global_thread(); row < rows; row += grid_threads()) {
    const int i = static_cast<int>(row % p.T);
    const int b = static_cast<int>(row / p.T / p.Hq);
    float* pr = probs + row * p.T;
    float m = -INFINITY;
    for (int j = 0; j < p.T; ++j) {
      if (attn_visible(p, b, i, j)) m = fmaxf(m, pr[j]);
    }
    float z = 0.0f;
    for (int j = 0; j < p.T; ++j) {
      const float e = attn_visible(p, b, i, j) ? expf(pr[j] - m) : 0.0f;
      pr[j] = e;
      z += e;
    }
    // The diagonal is always visible, so z >= exp(0) = 1 for every real row.
    for (int j = 0; j < p.T; ++j) pr[j] /= z;
  }
}

// out[b,i,h,d] = sum_j P_ij M_ij v[b,j,g,d].
template <typename T>
__global__ void pv_kernel(T* out, const float* probs, const T* v, AttentionParams p) {
  const size_t n = static_cast<size_t>(p.B) * p.T * p.Hq * p.D;
  for (size_t idx = global_thread(); idx < n; idx += grid_threads()) {
    int b, i, h, d;
    split_bthd(idx, p.T, p.Hq, p.D, &b, &i, &h, &d);
    const float* pr = probs + attn_row_index(p, b, h, i) * p.T;
    const int g = h / p.group;
    float acc = 0.0f;
    for (int j = 0; j < p.T; ++j) {
      if (pr[j] == 0.0f) continue;
      const float a = pr[j] * attn_dropout_factor(p, b, h, i, j);
      acc += a * to_float(v[attn_kv_offset(p, b, j, g) + d]);
    }
    out[idx] = from_float<T>(acc);
  }
}

// dscores[b,h,i,j] = dP_ij = M_ij <dO_i, v_j> (0 where masked or dropped).
template <typename T>
__global__ void dprobs_kernel(float* dscores, const T* dout, const T* v, AttentionParams p) {
  const size_t n = static_cast<size_t>(p.B) * p.Hq * p.T * p.T;
  for (size_t idx = global_thread(); idx < n; idx += grid_threads()) {
    int b, h, i, j;
    split_bhij(p, idx, &b, &h, &i, &j);
    float dp = 0.0f;
    if (attn_visible(p, b, i, j)) {
      const float m = attn_dropout_factor(p, b, h, i, j);
      if (m != 0.0f) {
        const T* doi = dout + attn_q_offset(p, b, i, h);
        const T* vj = v + attn_kv_offset(p, b, j, h / p.group);
        float da = 0.0f;
        for (int d = 0; d < p.D; ++d) da += to_float(doi[d]) * to_float(vj[d]);
        dp = m * da;
      }
    }
    dscores[idx] = dp;
  }
}

// In place, one thread per row: dP -> dS = P (dP - rowsum), rowsum = sum_j P_ij dP_ij.
__global__ void dscores_kernel(float* dscores, const float* probs, AttentionParams p) {
  const size_t rows = static_cast<size_t>(p.B) * p.Hq * p.T;
  for (size_t row = global_thread(); row < rows; row += grid_threads()) {
    const float* pr = probs + row * p.T;
    float* ds = dscores + row * p.T;
    float rowsum = 0.0f;
    for (int j = 0; j < p.T; ++j) rowsum += pr[j] * ds[j];
    for (int j = 0; j < p.T; ++j) ds[j] = pr[j] * (ds[j] - rowsum);
  }
}

// dq[b,i,h,d] = c sum_j dS_ij k[b,j,g,d].
template <typename T>
__global__ void dq_kernel(T* dq, const float* dscores, const T* k, AttentionParams p) {
  const size_t n = static_cast<size_t>(p.B) * p.T * p.Hq * p.D;
  for (size_t idx = global_thread(); idx < n; idx += grid_threads()) {
    int b, i, h, d;
    split_bthd(idx, p.T, p.Hq, p.D, &b, &i, &h, &d);
    const float* ds = dscores + attn_row_index(p, b, h, i) * p.T;
    const int g = h / p.group;
    float acc = 0.0f;
    for (int j = 0; j < p.T; ++j) acc += ds[j] * to_float(k[attn_kv_offset(p, b, j, g) + d]);
    dq[idx] = from_float<T>(p.scale * acc);
  }
}

// dk[b,j,g,d] = c sum_{h in group} sum_i dS_ij q[b,i,h,d];  dv[b,j,g,d] = sum_h sum_i A_ij dO[b,i,h,d].
template <typename T>
__global__ void dkdv_kernel(T* dk, T* dv, const float* dscores, const float* probs, const T* q, const T* dout,
                            AttentionParams p) {
  const size_t n = static_cast<size_t>(p.B) * p.T * p.Hkv * p.D;
  for (size_t idx = global_thread(); idx < n; idx += grid_threads()) {
    int b, j, g, d;
    split_bthd(idx, p.T, p.Hkv, p.D, &b, &j, &g, &d);
    float acc_k = 0.0f, acc_v = 0.0f;
    for (int h = g * p.group; h < (g + 1) * p.group; ++h) {
      for (int i = 0; i < p.T; ++i) {
        const size_t e = attn_row_index(p, b, h, i) * p.T + j;
        const size_t qo = attn_q_offset(p, b, i, h) + d;
        acc_k += dscores[e] * to_float(q[qo]);
        if (probs[e] != 0.0f) acc_v += probs[e] * attn_dropout_factor(p, b, h, i, j) * to_float(dout[qo]);
      }
    }
    dk[idx] = from_float<T>(p.scale * acc_k);
    dv[idx] = from_float<T>(acc_v);
  }
}

inline int blocks_for(size_t n) {
  const size_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1)
                                              : 65535 * 16);  // grid-stride beyond
}

}  // namespace attention_simple_detail

// Number of floats in probs and in the backward workspace dscores: B * Hq * T * T.
inline size_t attention_simple_matrix_elems(const AttentionShape& s) {
  return static_cast<size_t>(s.B) * s.Hq * s.T * s.T;
}

// out [B,T,Hq,D] and probs [B,Hq,T,T] (fp32, P before dropout, exactly 0 where masked) from q [B,T,Hq,D],
// k, v [B,T,Hkv,D]. All pointers are device pointers; options as in kernels/cpu/attention.h.
template <typename T>
void attention_simple_forward(T* out, float* probs, const T* q, const T* k, const T* v,
                              const AttentionShape& shape, const AttentionOptions& opt, cudaStream_t stream) {
  namespace sd = attention_simple_detail;
  NvtxRange range("attention_simple_forward");
  const AttentionParams p = make_attention_params(shape, opt);
  const size_t n_matrix = attention_simple_matrix_elems(shape);
  const size_t n_rows = static_cast<size_t>(p.B) * p.Hq * p.T;
  const size_t n_out = n_rows * p.D;
  sd::scores_kernel<T><<<sd::blocks_for(n_matrix), sd::kThreads, 0, stream>>>(probs, q, k, p);
  CUDA_CHECK_LAUNCH();
  sd::softmax_kernel<<<sd::blocks_for(n_rows), sd::kThreads, 0, stream>>>(probs, p);
  CUDA_CHECK_LAUNCH();
  sd::pv_kernel<T><<<sd::blocks_for(n_out), sd::kThreads, 0, stream>>>(out, probs, v, p);
  CUDA_CHECK_LAUNCH();
}

// dq [B,T,Hq,D], dk, dv [B,T,Hkv,D] (overwritten) from dout [B,T,Hq,D], the forward's probs and q, k, v.
// dscores is a workspace of attention_simple_matrix_elems(shape) floats. The options must be the forward's.
template <typename T>
void attention_simple_backward(T* dq, T* dk, T* dv, float* dscores, const T* dout, const float* probs,
                               const T* q, const T* k, const T* v, const AttentionShape& shape,
                               const AttentionOptions& opt, cudaStream_t stream) {
  namespace sd = attention_simple_detail;
  NvtxRange range("attention_simple_backward");
  const AttentionParams p = make_attention_params(shape, opt);
  const size_t n_matrix = attention_simple_matrix_elems(shape);
  const size_t n_rows = static_cast<size_t>(p.B) * p.Hq * p.T;
  const size_t n_q = n_rows * p.D;
  const size_t n_kv = static_cast<size_t>(p.B) * p.T * p.Hkv * p.D;
  sd::dprobs_kernel<T><<<sd::blocks_for(n_matrix), sd::kThreads, 0, stream>>>(dscores, dout, v, p);
  CUDA_CHECK_LAUNCH();
  sd::dscores_kernel<<<sd::blocks_for(n_rows), sd::kThreads, 0, stream>>>(dscores, probs, p);
  CUDA_CHECK_LAUNCH();
  sd::dq_kernel<T><<<sd::blocks_for(n_q), sd::kThreads, 0, stream>>>(dq, dscores, k, p);
  CUDA_CHECK_LAUNCH();
  sd::dkdv_kernel<T><<<sd::blocks_for(n_kv), sd::kThreads, 0, stream>>>(dk, dv, dscores, probs, q, dout, p);
  CUDA_CHECK_LAUNCH();
}

}  // namespace llm::cuda
