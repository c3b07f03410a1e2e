// The fused classifier: LM head, softmax and cross-entropy, forward and backward, over chunks of tokens,
// so that the full [N, V] logits never exist (at N = 8K tokens and V = 152K that would be 5 GB in fp32).
//
// Math (kernels/cpu/linear.h and kernels/cpu/cross_entropy.h, composed). Hidden states h [N, d], LM-head
// weight W [V, d] (PyTorch layout, possibly tied to the embedding), targets t [N]:
//   z = h W^T                          logits, [N, V]
//   lse_n = log sum_v exp(z[n, v])     computed as m + log sum_v exp(z[n, v] - m), m = max_v z[n, v]
//   logprob_n = z[n, t_n] - lse_n      0 for ignored tokens (t_n == -100)
//   loss = -(1/K) sum_n logprob_n      mean cross-entropy over the K counted tokens (0 when K == 0)
// Backward, given the upstream g_n = dL/dlogprob_n (for the mean CE, g_n = -1/K for counted tokens):
//   dz[n, v] = g_n ([v == t_n] - p[n, v]),   p[n, v] = exp(z[n, v] - lse_n)   (softmax)
//   dh  = dz W        [N, d]      (activation gradient: overwritten)
//   dW += dz^T h      [V, d]      (parameter gradient: accumulated, beta = 1)
// The derivations are in the two CPU headers. Every loss here (pretraining and SFT cross-entropy, DPO,
// GRPO, PPO) is a function of the per-token logprobs, so the caller either passes one uniform g (the
// mean CE: dlogprob_scale = -1/K, where K may count the tokens of all micro-batches of an accumulation
// step) or a per-token array g [N] computed from logprobs it got earlier from classifier_forward().
//
// Chunking. Rows (tokens) are processed chunk_rows at a time through one scratch buffer of
// chunk_rows x Vp elements of T, Vp = V rounded up to a multiple of 8:
//   1. logits of the chunk = h_chunk W^T (cuBLASLt) into the scratch buffer;
//   2. one block per row: max and sum of exponentials in one pass (an online softmax: when a larger
//      value arrives, the running sum is rescaled by exp(old max - new max)), then lse and logprob;
//      in the backward pass a second sweep overwrites the row with dz in place;
//   3. dh_chunk = dz W and dW += dz^T h_chunk (cuBLASLt).
// The padding of the row length to a multiple of 8 elements (16 bytes in bf16) keeps every row of the
// scratch buffer 16-byte aligned, which the tensor-core kernels of cuBLASLt and the 16-byte vector loads
// of the row kernel need; V itself may be anything (e.g. 152,061 or 1,001). The padding columns are never
// read as data: GEMMs see V columns, the row kernel masks v >= V.
// Memory: the scratch buffer (chunk_rows * Vp * sizeof(T)) is all that is added; a chunk of 2K rows at
// V = 152K is 0.6 GB in bf16. Larger chunks amortise the read-modify-write of dW (V * d values per chunk)
// and keep the GEMMs large; see dev/bench/bench_matmul_classifier.cu for the trade-off.
//
// Cost (per call, forward + backward): 3 GEMMs of 2 N d V FLOPs (6 N d V in all), plus moving the logits
// about five times (GEMM write, two row sweeps, two GEMM reads), 5 N V sizeof(T) bytes, plus dW read and
// written once per chunk. The forward pass alone is one GEMM and one sweep.
//
// Precision: logits and dz are stored in T (bf16 in training) and everything in the row kernel is fp32:
// max, sum, lse and logprob. logprobs, lse and the loss are fp32 outputs. dW may be fp32 while T is bf16.
// Determinism: every reduction has a fixed order (warp shuffles and shared memory in a fixed pattern, no
// atomics), and cuBLASLt is deterministic for a fixed problem, so the same inputs give the same bits.
// Targets outside [0, V) other than -100 are a bug upstream: their logprob (and so the loss) is NaN, and
// their row of dz is 0.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/matmul.cuh"

namespace llm::cuda {

constexpr int kClassifierIgnoreIndex = -100;

// The row length (leading dimension) of the scratch buffer: V rounded up to a multiple of 8.
inline int classifier_padded_vocab(int V) {
  return (V + 7) / 8 * 8;
}
// Elements of T the scratch buffer must hold for chunks of chunk_rows tokens.
inline size_t classifier_scratch_elements(int chunk_rows, int V) {
  return static_cast<size_t>(chunk_rows) * static_cast<size_t>(classifier_padded_vocab(V));
}

// Forward only (evaluation; reference logprobs for DPO/GRPO/PPO).
//   logprobs: [N] fp32, written (0 for ignored tokens). lse: [N] fp32 or null. loss: [1] fp32 or null,
//   the mean cross-entropy over the counted tokens.
//   h: [N, d]; weight: [V, d]; targets: [N], each in [0, V) or -100.
//   scratch: classifier_scratch_elements(chunk_rows, V) elements of T; its contents are clobbered.
// T = float or __nv_bfloat16. blas: null for BlasLt::shared().
template <typename T>
void classifier_forward(float* logprobs, float* lse, float* loss, const T* h, const T* weight,
                        const int32_t* targets, T* scratch, int chunk_rows, int N, int d, int V,
                        cudaStream_t stream, BlasLt* blas = nullptr);

// Forward and backward in one pass over the chunks.
//   dh: [N, d] (overwritten; null to skip). dweight: [V, d] (+=; null to skip, e.g. a frozen head).
//   logprobs, lse, loss: as in classifier_forward.
//   dlogprobs: [N] fp32 per-token dL/dlogprob, or null to use dlogprob_scale for every counted token
//   (-1/K gives the mean cross-entropy). Ignored tokens always get 0.
// Instantiated for (T, TGrad) = (float, float), (bf16, bf16) and (bf16, float).
template <typename T, typename TGrad = T>
void classifier_forward_backward(T* dh, TGrad* dweight, float* logprobs, float* lse, float* loss, const T* h,
                                 const T* weight, const int32_t* targets, const float* dlogprobs,
                                 float dlogprob_scale, T* scratch, int chunk_rows, int N, int d, int V,
                                 cudaStream_t stream, BlasLt* blas = nullptr);

}  // namespace llm::cuda
