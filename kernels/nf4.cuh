// NF4 (4-bit NormalFloat) weights on the GPU, as bitsandbytes stores them for QLoRA: quantise,
// dequantise, dequantise the double-quantised absmax, and the frozen NF4 linear layer's forward pass and
// input gradient. The CPU reference, which these launchers must match bit for bit where it says so, is
// kernels/cpu/nf4.h; the math in brief:
//
//   code table   c_0 < ... < c_15 in [-1, 1], quantiles of N(0, 1); c_7 = 0 (the 16 float32 values of
//                bitsandbytes' get_4bit_type("nf4"))
//   quantise     blocks of `blocksize` (64) consecutive weights of the flat array w[0..n):
//                  absmax_b = max_{j in b} |w_j|                                  (fp32)
//                  s_j      = clamp(w_j * (1 / absmax_b), -1, 1)   (w_j / absmax_b in a partial last block;
//                                                                  absmax floored at 1e-38 first)
//                  q_j      = #{ i : m_i < s_j },  m_i = (c_i + c_{i+1}) / 2      (nearest code; a tie on
//                                                                  a midpoint goes to the lower code)
//                two codes per byte, element 2k in the HIGH nibble; an odd n pads the last low nibble
//                with code 7 (the zero)
//   dequantise   w'_j = c[q_j] * absmax_b                                           (one fp32 product)
//   double quant absmax'_b = dyn[qa_b] * state2_{b / 256} + offset  (dyn: the signed 8-bit dynamic map;
//                offset: mean of the absmax; state2: fp32 per 256 blocks; computed on the CPU, see nf4.h)
//   linear       out = x deq(W)^T + b      dx = G deq(W)      W [O, I] flattened row-major; no dW (frozen)
// The linear layer is linear in x with weight deq(W), so its backward is the ordinary one of
// kernels/cpu/linear.h with that weight: dx[n, i] = sum_o G[n, o] deq(W)[o, i]. Nothing flows into the
// codes or the absmax, which are constants of the frozen base.
//
// Exactness. Quantisation is discrete: one rounding difference in s_j can move a weight to the
// neighbouring code, so the kernels reproduce the reference's floating-point steps exactly:
//   - absmax is a maximum, which is exact and independent of the order of reduction: a warp-shuffle
//     reduction gives the reference's bits;
//   - 1 / absmax, w * inv and w / absmax use the IEEE round-to-nearest intrinsics (__fdiv_rn,
//     __fmul_rn), as the host computes them, whatever -prec-div says;
//   - the midpoints m_i are computed on the host by the reference's own expression and passed in; the
//     kernel counts the midpoints strictly below s, which equals the reference's "last i with s > m_i"
//     because the midpoints increase; so a tie goes to the lower code here too;
//   - the clamp uses fmaxf/fminf, which like std::fmax/fmin return the other operand for a NaN (a NaN
//     weight gets code 0 in both); the clamp itself never changes a code (s > 1 still counts 15
//     midpoints) but is kept so that the intermediate values are the same;
//   - the 1e-38 floor is a subnormal float: these kernels must be built without flush-to-zero (no
//     --use_fast_math, which the build never sets), or an all-zero block would divide by zero;
//   - dequantisation is one product (__fmul_rn), and the double dequantisation a product then a sum,
//     each rounded on its own (__fmul_rn, __fadd_rn): a fused multiply-add, which nvcc would otherwise
//     emit, rounds once and can differ in the last bit from the host, which has no FMA here.
// The code table and the dynamic map are the reference's own arrays (nf4.cu includes kernels/cpu/nf4.h;
// llm_cuda links llm_ref for its OpenMP flags), passed to the kernels by value.
//
// Kernels.
//   quantise    one warp per quantisation block: the lanes stride over the block for the absmax (warp
//               shuffles), then each lane writes whole bytes (element pairs), so no two threads write the
//               same byte. This needs an even blocksize (then every block starts on a byte boundary);
//               the last block may have odd length and gets the pad nibble.
//   dequantise  clear: one thread per element (read its byte, pick the nibble). Fast: one thread per 8
//               elements = 4 packed bytes, one 32-bit load and one (bf16) or two (fp32) 16-byte stores,
//               one absmax per thread (blocksize a multiple of 8). Both look the codes up in a 16-float
//               shared-memory table: one bank per entry, so the lanes' different codes never conflict.
//               The fast variant needs packed 4-byte aligned, w 16-byte aligned and blocksize % 8 == 0;
//               KernelVariant::kAuto falls back to the clear one otherwise. The tail (n % 8) goes one
//               element per thread.
//   double dq   one thread per absmax value, with the 256-entry map in shared memory.
//   linear      "dequantise, then GEMM": W is dequantised into a scratch buffer [O, I] of T and the
//               product is the ordinary cuBLASLt matmul (kernels/matmul.cuh): a clear, correct path.
//               The fast path is still to come: a fused dequant-GEMM that unpacks tiles of W in shared
//               memory right before the tensor-core MMAs, so W is read as 4.5 bits per weight instead of
//               being written and read again as 16, and the scratch disappears.
// Cost: dequantise reads n/2 + 4 n/blocksize bytes and writes n sizeof(T) (2.56 bytes per weight into
// bf16 at blocksize 64): memory-bound. The linear layer adds that to the GEMM's 2 N I O FLOPs; at N = 4096
// tokens the GEMM dominates. Scratch: O I sizeof(T) bytes; a model can share one scratch buffer, sized for
// its largest NF4 layer, between all of them (each layer's weight is consumed right after it is unpacked).
//
// Precision: the dequantised weight is rounded once to T (bf16 in training); the GEMM accumulates in fp32
// (PEDANTIC fp32 in the fp32 test mode). Determinism: every kernel is elementwise or an exact maximum, and
// cuBLASLt is deterministic for a fixed problem.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/kernel_utils.cuh"
#include "kernels/matmul.cuh"

namespace llm::cuda {

inline constexpr int kNf4BlockSize = 64;         // weights per absmax
inline constexpr int kNf4NestedBlockSize = 256;  // absmax values per state2 scale (double quantisation)
inline constexpr uint8_t kNf4ZeroCode = 7;       // the code of 0, also the pad nibble

// Bytes of packed codes for n weights (two per byte).
inline size_t nf4_packed_bytes(size_t n) {
  return (n + 1) / 2;
}
// Number of quantisation blocks (absmax values) for n weights.
inline size_t nf4_blocks(size_t n, int blocksize) {
  return (n + static_cast<size_t>(blocksize) - 1) / static_cast<size_t>(blocksize);
}
// Elements of T the linear layer's scratch buffer must hold: the dequantised weight [O, I].
inline size_t nf4_linear_scratch_elements(int I, int O) {
  return static_cast<size_t>(O) * static_cast<size_t>(I);
}

// The host copies of the tables the kernels use: the 16 NF4 codes and the 256 values of the signed dynamic
// map, equal bit for bit to kernels/cpu/nf4.h's kNf4Code and kDynamicMapSigned.
const float* nf4_code_table();
const float* nf4_dynamic_map_table();

// Quantise n weights. packed: [nf4_packed_bytes(n)]; absmax: [nf4_blocks(n, blocksize)] fp32; w: [n].
// Bit-exact with ref::nf4_quantize. blocksize must be positive and even (bitsandbytes uses 64).
// T = float or __nv_bfloat16 (bf16 weights are converted exactly to fp32 first).
template <typename T>
void nf4_quantize(uint8_t* packed, float* absmax, const T* w, size_t n, int blocksize, cudaStream_t stream);

// Dequantise n weights: w[j] = code[q_j] * absmax[j / blocksize], the fp32 product rounded once to T.
// In fp32 bit-exact with ref::nf4_dequantize. w: [n]; packed, absmax as above (any positive blocksize).
template <typename T>
void nf4_dequantize(T* w, const uint8_t* packed, const float* absmax, size_t n, int blocksize,
                    cudaStream_t stream, KernelVariant variant = KernelVariant::kAuto);

// Undo the double quantisation: absmax[b] = dyn[qabsmax[b]] * state2[b / blocksize2] + offset.
// absmax: [nblocks] fp32; qabsmax: [nblocks]; state2: [ceil(nblocks / blocksize2)]. Bit-exact with
// ref::nf4_double_dequantize.
void nf4_double_dequantize(float* absmax, const uint8_t* qabsmax, const float* state2, float offset,
                           size_t nblocks, int blocksize2, cudaStream_t stream);

// Frozen NF4 linear layer, forward: out = x deq(W)^T (+ bias).
//   out: [N, O] (overwritten); scratch: [nf4_linear_scratch_elements(I, O)] of T, clobbered (it holds
//   deq(W) afterwards); x: [N, I]; packed/absmax: the NF4 weight [O, I] (absmax already
//   double-dequantised if it was compressed); bias: [O] or null.
// T = float or __nv_bfloat16. blas: null for BlasLt::shared().
template <typename T>
void nf4_linear_forward(T* out, T* scratch, const T* x, const uint8_t* packed, const float* absmax,
                        const T* bias, int N, int I, int O, int blocksize, cudaStream_t stream,
                        BlasLt* blas = nullptr);

// Frozen NF4 linear layer, input gradient: dx = dout deq(W) (= unless accumulate_dx, then +=).
//   dx: [N, I]; scratch as above; dout: [N, O]. No weight gradient (frozen). A trainable bias's gradient
//   is the column sum of dout: column_sum_accumulate in kernels/matmul.cuh.
template <typename T>
void nf4_linear_backward_input(T* dx, T* scratch, const T* dout, const uint8_t* packed, const float* absmax,
                               int N, int I, int O, int blocksize, bool accumulate_dx, cudaStream_t stream,
                               BlasLt* blas = nullptr);

}  // namespace llm::cuda
