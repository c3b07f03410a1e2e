// Position information on the GPU: learned or sinusoidal absolute positions added to the residual stream,
// and rotary embeddings (RoPE) applied to Q and K together in one launch.
//
// Math (derivations in kernels/cpu/positions.h; p = pos[n] is the position of token row n):
//   Absolute:  x[n, c] += W[p, c]. Backward: dx passes through unchanged (nothing to compute), and
//              dW[q, c] += sum over n with pos[n] == q of dx[n, c], the same scatter-add as the token
//              embedding, so it reuses the deterministic sort-based kernel of kernels/embedding.cuh.
//              The sinusoidal table is the same add with a fixed table (built on the host by
//              ref::sinusoidal_table) and has no backward pass.
//   RoPE:      each head vector of length D is split into pairs (a, b) = (x[i], x[i + D/2]) (Hugging Face
//              "rotate_half" pairing), rotated by the angle p w_i:
//                out[i]       = a cos - b sin
//                out[i + D/2] = b cos + a sin
//              with cos = s cos(p w_i), sin = s sin(p w_i) read from tables [maxT, D/2] that the host
//              computes with ref::rope_tables, so the linear, Llama 3 and YaRN frequency scalings (and
//              YaRN's attention factor s) come from one place. The Jacobian of a pair is s R(phi), so the
//              backward pass applies its transpose, the rotation by -phi:
//                din[i]       = g_a cos + g_b sin
//                din[i + D/2] = g_b cos - g_a sin
//              i.e. the forward kernel with sin negated. q and k are activations: din is overwritten (=).
//
// RoPE layout: q rows of Hq heads and k rows of Hkv heads (grouped-query attention has Hkv < Hq), each
// head D contiguous values; a row stride (in elements) per tensor lets q and k live inside a fused QKV
// buffer. One thread rotates VEC consecutive pairs of one head of one row; Q heads and K heads are numbered
// 0 .. Hq + Hkv - 1 in a single grid, so both tensors are done by one kernel launch. Outputs may alias
// inputs (each thread reads its pairs before writing them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/positions.h"  // ref::rope_tables, ref::sinusoidal_table, ref::RopeParams
#include "kernels/cuda_common.cuh"
#include "kernels/embedding.cuh"
#include "kernels/kernel_utils.cuh"
#include "kernels/nvtx.cuh"

namespace llm::cuda {

// ---------------------------------------------------------------------------------------------------------
// Kernels.

// x[n, :] += wpe[pos[n], :]. One block per row.
template <int VEC, typename T>
__global__ void add_position_embedding_kernel(T* x, const T* wpe, const int32_t* pos, int C, int maxT) {
  const int n = blockIdx.x;
  const int p = pos[n];
  const bool valid = p >= 0 && p < maxT;
  const T* w_row = wpe + static_cast<size_t>(valid ? p : 0) * C;
  T* x_row = x + static_cast<size_t>(n) * C;
  for (int c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    float xv[VEC], wv[VEC];
    load_floats<VEC>(xv, x_row + c);
    load_floats<VEC>(wv, w_row + c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) xv[k] = valid ? xv[k] + wv[k] : quiet_nan();
    store_floats<VEC>(x_row + c, xv);
  }
}

// Rotates VEC consecutive pairs (i .. i + VEC - 1, i + D/2 .. i + D/2 + VEC - 1) of one head of one row.
// sin_sign = +1 for the forward rotation, -1 for the backward (transposed) one.
template <int VEC, typename T>
__global__ void rope_kernel(T* q_out, T* k_out, const T* q_in, const T* k_in, const float* cos_table,
                            const float* sin_table, const int32_t* pos, int N, int Hq, int Hkv, int D,
                            long long q_stride, long long k_stride, int maxT, float sin_sign) {
  const int half = D / 2;
  const int packs = half / VEC;  // vectors of VEC pairs per head
  const size_t t = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t total = static_cast<size_t>(N) * (Hq + Hkv) * packs;
  if (t >= total) return;
  const int i = static_cast<int>(t % packs) * VEC;
  const int h = static_cast<int>((t / packs) % (Hq + Hkv));
  const int n = static_cast<int>(t / (static_cast<size_t>(packs) * (Hq + Hkv)));

  const T* in;
  T* out;
  if (h < Hq) {
    in = q_in + n * q_stride + static_cast<long long>(h) * D;
    out = q_out + n * q_stride + static_cast<long long>(h) * D;
  } else {
    in = k_in + n * k_stride + static_cast<long long>(h - Hq) * D;
    out = k_out + n * k_stride + static_cast<long long>(h - Hq) * D;
  }

  float a[VEC], b[VEC], c[VEC], s[VEC];
  load_floats<VEC>(a, in + i);
  load_floats<VEC>(b, in + i + half);
  const int p = pos[n];
  if (p < 0 || p >= maxT) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = b[k] = quiet_nan();
    store_floats<VEC>(out + i, a);
    store_floats<VEC>(out + i + half, b);
    return;
  }
  load_floats<VEC>(c, cos_table + static_cast<size_t>(p) * half + i);
  load_floats<VEC>(s, sin_table + static_cast<size_t>(p) * half + i);
  float out_a[VEC], out_b[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float sn = sin_sign * s[k];
    out_a[k] = a[k] * c[k] - b[k] * sn;
    out_b[k] = b[k] * c[k] + a[k] * sn;
  }
  store_floats<VEC>(out + i, out_a);
  store_floats<VEC>(out + i + half, out_b);
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.

namespace positions_detail {

constexpr int kThreads = 256;

template <typename T>
T host_from_float(float x) {
  return static_cast<T>(x);
}

template <typename T>
void rope_launch(const char* name, T* q_out, T* k_out, const T* q_in, const T* k_in, const float* cos_table,
                 const float* sin_table, const int32_t* pos, int N, int Hq, int Hkv, int D,
                 long long q_stride, long long k_stride, int maxT, float sin_sign, cudaStream_t stream,
                 KernelVariant variant) {
  NvtxRange range(name);
  if (D <= 0 || D % 2 != 0)
    throw std::invalid_argument(std::string(name) + ": head_dim must be positive and even");
  if (Hq < 0 || Hkv < 0) throw std::invalid_argument(std::string(name) + ": negative head count");
  if (q_stride == 0) q_stride = static_cast<long long>(Hq) * D;
  if (k_stride == 0) k_stride = static_cast<long long>(Hkv) * D;
  if (N <= 0 || Hq + Hkv == 0) return;
  if (Hkv == 0) {
    k_out = nullptr;
    k_in = nullptr;
  }

  constexpr int VF = vec16<T>();
  const int half = D / 2;
  // The fast variant loads VF pairs' halves at a time: every head start, every half and every row stride
  // must keep 16-byte alignment (and the fp32 tables then hold whole vectors too).
  bool aligned = half % VF == 0 && q_stride % VF == 0 && is_aligned(q_out, 16) && is_aligned(q_in, 16) &&
                 is_aligned(cos_table, 16) && is_aligned(sin_table, 16);
  if (Hkv > 0) aligned = aligned && k_stride % VF == 0 && is_aligned(k_out, 16) && is_aligned(k_in, 16);
  const bool fast = use_fast_variant(variant, aligned, name);
  const int vec = fast ? VF : 1;
  const long long threads = static_cast<long long>(N) * (Hq + Hkv) * (half / vec);
  const int blocks = ceil_div(threads, kThreads);
  if (fast) {
    rope_kernel<VF><<<blocks, kThreads, 0, stream>>>(q_out, k_out, q_in, k_in, cos_table, sin_table, pos, N,
                                                     Hq, Hkv, D, q_stride, k_stride, maxT, sin_sign);
  } else {
    rope_kernel<1><<<blocks, kThreads, 0, stream>>>(q_out, k_out, q_in, k_in, cos_table, sin_table, pos, N,
                                                    Hq, Hkv, D, q_stride, k_stride, maxT, sin_sign);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace positions_detail

// x[n, :] += wpe[pos[n], :] in place (learned or sinusoidal). x [N, C]; wpe [maxT, C]; pos [N] (device).
template <typename T>
void add_position_embedding_forward(T* x, const T* wpe, const int32_t* pos, int N, int C, int maxT,
                                    cudaStream_t stream, KernelVariant variant = KernelVariant::kAuto) {
  NvtxRange range("add_position_embedding_forward");
  if (N <= 0 || C <= 0) return;
  constexpr int VF = vec16<T>();
  const bool aligned = C % VF == 0 && is_aligned(x, 16) && is_aligned(wpe, 16);
  if (use_fast_variant(variant, aligned, "add_position_embedding_forward")) {
    add_position_embedding_kernel<VF><<<N, positions_detail::kThreads, 0, stream>>>(x, wpe, pos, C, maxT);
  } else {
    add_position_embedding_kernel<1><<<N, positions_detail::kThreads, 0, stream>>>(x, wpe, pos, C, maxT);
  }
  CUDA_CHECK_LAUNCH();
}

// Bytes of scratch add_position_embedding_backward needs.
inline size_t position_embedding_backward_scratch_bytes(int N, int maxT) {
  return embedding_backward_scratch_bytes(N, maxT);
}

// dwpe[pos[n], :] += dx[n, :] in increasing n (deterministic; see kernels/embedding.cuh). dwpe [maxT, C]
// accumulates. The residual gradient dx itself passes through unchanged.
template <typename T>
void add_position_embedding_backward(T* dwpe, const T* dx, const int32_t* pos, int N, int C, int maxT,
                                     void* scratch, size_t scratch_bytes, cudaStream_t stream,
                                     KernelVariant variant = KernelVariant::kAuto) {
  NvtxRange range("add_position_embedding_backward");
  embedding_backward(dwpe, dx, pos, N, C, maxT, scratch, scratch_bytes, stream, variant);
}

// Builds the sinusoidal table [maxT, C] on the host (ref::sinusoidal_table) and copies it to `table`.
// Set-up time only: it synchronises the stream.
template <typename T>
void upload_sinusoidal_table(T* table, int maxT, int C, cudaStream_t stream) {
  std::vector<float> host(static_cast<size_t>(maxT) * C);
  ref::sinusoidal_table(host.data(), maxT, C);
  std::vector<T> converted(host.size());
  for (size_t i = 0; i < host.size(); ++i) converted[i] = positions_detail::host_from_float<T>(host[i]);
  CUDA_CHECK(
      cudaMemcpyAsync(table, converted.data(), converted.size() * sizeof(T), cudaMemcpyHostToDevice, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

// Builds the RoPE tables [maxT, head_dim / 2] on the host (ref::rope_tables, with every scaling) and copies
// them to cos_table and sin_table (fp32). Set-up time only: it synchronises the stream.
inline void upload_rope_tables(float* cos_table, float* sin_table, const ref::RopeParams& params, int maxT,
                               cudaStream_t stream) {
  const size_t count = static_cast<size_t>(maxT) * (params.head_dim / 2);
  std::vector<float> host_cos(count), host_sin(count);
  ref::rope_tables(host_cos.data(), host_sin.data(), params, maxT);
  CUDA_CHECK(
      cudaMemcpyAsync(cos_table, host_cos.data(), count * sizeof(float), cudaMemcpyHostToDevice, stream));
  CUDA_CHECK(
      cudaMemcpyAsync(sin_table, host_sin.data(), count * sizeof(float), cudaMemcpyHostToDevice, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

// Rotates q [N, Hq heads of D] and k [N, Hkv heads of D] by their rows' positions, in one launch.
// Row strides in elements (0 means contiguous: Hq * D, resp. Hkv * D); the output uses the input's stride.
// Tables [maxT, D / 2] from upload_rope_tables; pos [N]. Outputs may alias inputs. Hkv may be 0 (k unused).
template <typename T>
void rope_forward(T* q_out, T* k_out, const T* q_in, const T* k_in, const float* cos_table,
                  const float* sin_table, const int32_t* pos, int N, int Hq, int Hkv, int D,
                  long long q_stride, long long k_stride, int maxT, cudaStream_t stream,
                  KernelVariant variant = KernelVariant::kAuto) {
  positions_detail::rope_launch("rope_forward", q_out, k_out, q_in, k_in, cos_table, sin_table, pos, N, Hq,
                                Hkv, D, q_stride, k_stride, maxT, 1.0f, stream, variant);
}

// The transposed rotation of the gradients: dq_in = R^T dq_out, dk_in = R^T dk_out (overwritten; may alias).
template <typename T>
void rope_backward(T* dq_in, T* dk_in, const T* dq_out, const T* dk_out, const float* cos_table,
                   const float* sin_table, const int32_t* pos, int N, int Hq, int Hkv, int D,
                   long long q_stride, long long k_stride, int maxT, cudaStream_t stream,
                   KernelVariant variant = KernelVariant::kAuto) {
  positions_detail::rope_launch("rope_backward", dq_in, dk_in, dq_out, dk_out, cos_table, sin_table, pos, N,
                                Hq, Hkv, D, q_stride, k_stride, maxT, -1.0f, stream, variant);
}

}  // namespace llm::cuda
