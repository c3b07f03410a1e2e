// LoRA (low-rank adaptation) on the GPU: the adapter's forward and backward passes on top of a frozen base
// layer, its initialisation, and merging it into the base weight. The CPU reference, which these
// launchers must match, is kernels/cpu/lora.h.
//
// The layer. A frozen linear layer y = x W^T + b (W [O, I], PyTorch layout) gets a trainable rank-r
// update: A [r, I] maps the input down to r features, B [O, r] maps them back up. With x [N, I]:
//   x~ = dropout_p(x)              LoRA dropout: on the adapter's input only, never on the base path
//   h  = x~ A^T          [N, r]    the adapter's hidden features (kept for the backward pass)
//   y  = x W^T + b + s h B^T       s = alpha / r (or alpha / sqrt(r) with rsLoRA)
// The launchers here do only the adapter: the caller runs the base layer first (matmul_forward, or
// nf4_linear_forward for QLoRA), and lora_forward adds s h B^T to its output. Because r is small (8-64)
// the adapter costs 2 N r (I + O) FLOPs against the base's 2 N I O: at r = 16, I = 2048, O = 5632 that
// is about 1.1 % more.
//
// Backward. Let G = dL/dy [N, O]. The adapter path is y += s h B^T with h = x~ A^T: two matrix products
// and one diagonal map (dropout), so the chain rule goes through them one at a time.
//   1. y[n, o] depends on B[o, k] through s h[n, k] B[o, k], so dL/dB[o, k] = sum_n G[n, o] s h[n, k]:
//        dB += s G^T h                   [O, r]
//   2. y[n, o] depends on h[n, k] through the same term, so dL/dh[n, k] = sum_o G[n, o] s B[o, k]:
//        dh  = s G B                     [N, r]   (scratch: an activation gradient inside the adapter)
//   3. h[n, k] = sum_i x~[n, i] A[k, i] is a linear layer with weight A, so, as in kernels/cpu/linear.h:
//        dA += dh^T x~                   [r, I]
//        dx~ = dh A                      [N, I]
//   4. x~ = keep * x / (1 - p) is diagonal with entries keep_i / (1 - p) (kernels/cpu/dropout.h), so
//        dx += keep * dx~ / (1 - p)      [N, I]   added to the base path's G W
// There is no dW and no db: the base is frozen. dA and dB are parameter gradients and accumulate (+=), so
// gradient accumulation works. dx is the layer's input gradient: the caller writes the base path's G W
// first (matmul_backward or nf4_linear_backward_input) and lora_backward adds the adapter's part
// (accumulate_dx = true); accumulate_dx = false writes the adapter's part alone.
// The scale s is applied once per product, as cuBLASLt's alpha: y += s (h B^T), dB += s (G^T h),
// dh = s (G B); h itself is stored unscaled, as in the reference.
//
// Dropout mask. keep_i = [philox_mask_uniform(seed, stream_id, i) >= p] over the flat [N, I] array, i =
// n * I + col, exactly the reference's (kernels/philox.h). The mask is never stored: the backward pass
// draws it again, once to rebuild x~ for dA and once inside the kernel that applies it to dx~. So the
// forward and backward calls of one use must pass the same p, seed and stream_id. p <= 0 turns dropout
// off and needs no scratch; p >= 1 drops everything (h = 0, and the adapter adds nothing).
//
// Implementation. Every product is one cuBLASLt GEMM through gemm() (kernels/matmul.cuh: row-major
// C = alpha op(A) op(B) + beta C, fp32 accumulation; PEDANTIC fp32 in the fp32 test mode). The only
// kernels of our own are the dropout ones: x~ comes from dropout_forward (kernels/dropout.cuh), and the
// backward mask is applied by lora_dropout_backward_kernel in lora.cu, which adds keep * dx~ / (1 - p) to
// dx in the same pass (so dx is read and written once). The GEMMs, in gemm()'s terms (M, Nc, K):
//   forward   h    = x~ A^T        (N, r, I)    trans_b            alpha 1  beta 0
//             y   += s h B^T       (N, O, r)    trans_b            alpha s  beta 1
//   backward  dB  += s G^T h       (O, r, N)    trans_a            alpha s  beta 1
//             dh   = s G B         (N, r, O)                       alpha s  beta 0
//             dA  += dh^T x~       (r, I, N)    trans_a            alpha 1  beta 1
//             dx~  = dh A          (N, I, r)                       alpha 1  beta 0 (p = 0: straight into
//                                                                  dx, beta 1 if accumulate_dx, no mask)
// Leading dimensions are the row lengths (r, I or O): any value works, tensor-core kernels are picked when
// the rows are 16-byte multiples (r a multiple of 8 in bf16), and gemm() tells cuBLASLt the pointers'
// real alignment. A fused kernel (dropout in the GEMM's prologue, dh A and the mask in one epilogue) would
// save the [N, I] scratch traffic; it is not written yet.
//
// Precision: bf16 storage, fp32 accumulation; h, dh and the scratch x~ / dx~ are stored in T. dA and dB
// may be fp32 while T is bf16 (TGrad = float): cuBLASLt reads bf16 and accumulates into fp32.
// Determinism: cuBLASLt is deterministic for a fixed problem (one workspace per stream) and the dropout
// kernels are elementwise, so the same inputs give the same bits.
//
// Initialisation (PEFT's default, derivation in kernels/cpu/lora.h): B = 0, A ~ U(-1/sqrt(I), 1/sqrt(I))
// drawn from Philox (seed, stream_id, k) for element k of A, the same numbers as the reference.
// Merging: W' = W + s B A is one GEMM with beta = 1 ((O, I, r), alpha s); unmerge with -s.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/matmul.cuh"

namespace llm::cuda {

// Forward of the adapter, added to the base layer's output.
//   out: [N, O], += s h B^T (it holds x W^T + b on entry). h: [N, r], written (x~ A^T, unscaled; keep it
//   for lora_backward). x_dropped: [N, I] scratch for x~, written, needed when dropout_p > 0 (may be null
//   otherwise). x: [N, I]; A: [r, I]; B: [O, r].
// T = float or __nv_bfloat16. blas: null for BlasLt::shared().
template <typename T>
void lora_forward(T* out, T* h, T* x_dropped, const T* x, const T* A, const T* B, int N, int I, int O, int r,
                  float scale, float dropout_p, uint64_t seed, uint64_t stream_id, cudaStream_t stream,
                  BlasLt* blas = nullptr);

// Backward of the adapter.
//   dx: [N, I], += (accumulate_dx) or = (otherwise) keep * (dh A) / (1 - p); null to skip.
//   dA: [r, I] +=; dB: [O, r] +=; either may be null to skip it.
//   dh: [N, r] scratch, needed unless dx and dA are both null. work: [N, I] scratch, needed when
//   dropout_p > 0 and dx or dA is wanted (it holds x~, then dx~).
//   dout: [N, O]; x: [N, I]; h: [N, r] from lora_forward; A: [r, I]; B: [O, r].
//   scale, dropout_p, seed and stream_id must be the forward call's.
// Instantiated for (T, TGrad) = (float, float), (bf16, bf16) and (bf16, float).
template <typename T, typename TGrad = T>
void lora_backward(T* dx, TGrad* dA, TGrad* dB, T* dh, T* work, const T* dout, const T* x, const T* h,
                   const T* A, const T* B, int N, int I, int O, int r, float scale, float dropout_p,
                   uint64_t seed, uint64_t stream_id, bool accumulate_dx, cudaStream_t stream,
                   BlasLt* blas = nullptr);

// A: [r, I] drawn U(-1/sqrt(I), 1/sqrt(I)) from Philox (seed, stream_id, element), the reference's numbers
// (rounded to T); B: [O, r] zeroed.
template <typename T>
void lora_init(T* A, T* B, int I, int O, int r, uint64_t seed, uint64_t stream_id, cudaStream_t stream);

// merged = weight + s B A, all [O, I]. merged may be weight itself (in place) but must not otherwise
// overlap it. A: [r, I]; B: [O, r]. Unmerge with -scale (exact only up to rounding).
template <typename T>
void lora_merge(T* merged, const T* weight, const T* A, const T* B, int I, int O, int r, float scale,
                cudaStream_t stream, BlasLt* blas = nullptr);

}  // namespace llm::cuda
