// Token embedding on the GPU: a table lookup forward, a deterministic scatter-add backward.
//
// Math (full derivation in kernels/cpu/embedding.h):
//   forward   out[n, c] = E[t_n, c]                         (t_n = tokens[n], E is [V, C])
//   backward  dE[v, c] += sum over n with t_n == v of dout[n, c]
// Each output element depends on one table entry with derivative 1, so the gradient of a table row is the
// sum of the output-gradient rows of the tokens that picked it. E is a parameter: dE accumulates (+=).
//
// Determinism of the backward pass. The obvious kernel (one thread per (n, c) doing atomicAdd into
// dE[t_n, c]) adds in whatever order the hardware schedules, so repeated tokens give run-to-run different
// bits. Instead:
//   1. keys[n] = t_n (V for an invalid id), vals[n] = n;
//   2. sort the (key, n) pairs by key with CUB's radix sort, which is stable: equal token ids keep
//      increasing n. The result is a pure function of the input;
//   3. one block per (sorted position i, slice of channels). A block whose i starts a run of equal keys
//      owns row v = key for its channels: it starts from dE[v, c] and adds dout[n, c] for the run's n in
//      increasing order, then stores once. Blocks that do not start a run exit at once.
//      (A very frequent token makes one long serial run; that block then bounds the kernel's time.)
// Every (v, c) is written by exactly one thread, with no atomics, in the same order as the CPU reference,
// so for fp32 storage the result equals the reference bit for bit.
//
// Invalid ids (outside [0, V)) should have been rejected by the data loader; if one gets here, the
// forward pass writes a NaN row (so the loss shows it) and the backward pass skips it.
//
// Scratch for the backward pass (caller-owned, sized by embedding_backward_scratch_bytes): the key and
// value arrays before and after sorting, plus CUB's temporary storage.
//
// NEFTune noise (training only; derivation in kernels/cpu/embedding.h): x[i] += scale * (2 u_i - 1) with
// u_i = philox_uniform(seed, stream_id, i), the reference's draws. The noise does not depend on E, so the
// backward pass is unchanged. One thread per element: the kernel runs once per micro-batch, on N * C values.
#pragma once

#include <cub/device/device_radix_sort.cuh>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda_common.cuh"
#include "kernels/kernel_utils.cuh"
#include "kernels/nvtx.cuh"
#include "kernels/philox.h"

namespace llm::cuda {

// ---------------------------------------------------------------------------------------------------------
// Kernels.

// One block per token row n; threads step over the row VEC elements at a time.
template <int VEC, typename T>
__global__ void embedding_forward_kernel(T* out, const int32_t* tokens, const T* table, int C, int V) {
  const int n = blockIdx.x;
  const int token = tokens[n];
  const bool valid = token >= 0 && token < V;
  const T* row = table + static_cast<size_t>(valid ? token : 0) * C;
  T* out_row = out + static_cast<size_t>(n) * C;
  for (int c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    float v[VEC];
    if (valid) {
      load_floats<VEC>(v, row + c);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = quiet_nan();
    }
    store_floats<VEC>(out_row + c, v);
  }
}

// x[i] += scale * (2 u_i - 1). The product and the sum are rounded separately (no FMA contraction), as in
// the reference, so that fp32 results equal it bit for bit.
template <typename T>
__global__ void embedding_noise_kernel(T* x, size_t n, float scale, uint64_t seed, uint64_t stream_id) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float noise = __fmul_rn(scale, 2.0f * llm::philox_uniform(seed, stream_id, i) - 1.0f);
  x[i] = from_float<T>(__fadd_rn(to_float(x[i]), noise));
}

// Step 1 of the backward pass: the sort keys (token id, or V for an invalid id) and values (n).
__global__ void embedding_sort_keys_kernel(uint32_t* keys, int32_t* rows, const int32_t* tokens, int N,
                                           int V) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int token = tokens[n];
  keys[n] = (token >= 0 && token < V) ? static_cast<uint32_t>(token) : static_cast<uint32_t>(V);
  rows[n] = n;
}

// Step 3: blockIdx.x = sorted position i, blockIdx.y = slice of blockDim.x * VEC channels.
template <int VEC, typename T>
__global__ void embedding_backward_runs_kernel(T* dtable, const T* dout, const uint32_t* sorted_keys,
                                               const int32_t* sorted_rows, int N, int C, int V) {
  const int i = blockIdx.x;
  const uint32_t key = sorted_keys[i];
  if (i > 0 && sorted_keys[i - 1] == key) return;  // not the start of a run
  if (key >= static_cast<uint32_t>(V)) return;     // the run of invalid ids
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;

  // The run is [i, end): keys are sorted, so a binary search for the first key above `key` finds its end.
  int lo = i + 1, hi = N;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (sorted_keys[mid] == key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int end = lo;

  T* drow = dtable + static_cast<size_t>(key) * C + c;
  float acc[VEC];
  load_floats<VEC>(acc, drow);
  // Rows in increasing n. Four loads are issued before their adds so that a long run (a frequent token)
  // keeps several loads in flight; the adds stay in order.
  constexpr int kBatch = 4;
  int j = i;
  for (; j + kBatch <= end; j += kBatch) {
    float g[kBatch][VEC];
#pragma unroll
    for (int b = 0; b < kBatch; ++b)
      load_floats<VEC>(g[b], dout + static_cast<size_t>(sorted_rows[j + b]) * C + c);
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += g[b][k];
    }
  }
  for (; j < end; ++j) {
    float g[VEC];
    load_floats<VEC>(g, dout + static_cast<size_t>(sorted_rows[j]) * C + c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] += g[k];
  }
  store_floats<VEC>(drow, acc);
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.

namespace embedding_detail {

constexpr int kThreads = 256;
constexpr size_t kScratchAlign = 256;

inline size_t align_up(size_t bytes) {
  return (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
}

// Radix-sort bits needed for keys in [0, V]: the smallest b with 2^b > V.
inline int key_bits(int V) {
  int bits = 1;
  while (bits < 31 && (1LL << bits) <= V) ++bits;
  return bits;
}

// The scratch layout: keys, rows, sorted keys, sorted rows (each padded to 256 bytes), then CUB's storage.
struct ScratchLayout {
  uint32_t* keys = nullptr;
  int32_t* rows = nullptr;
  uint32_t* sorted_keys = nullptr;
  int32_t* sorted_rows = nullptr;
  void* cub_storage = nullptr;
  size_t cub_bytes = 0;
  size_t total_bytes = 0;
};

inline ScratchLayout scratch_layout(void* base, int N, int V) {
  ScratchLayout layout;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, layout.cub_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), N, 0, key_bits(V)));
  const size_t array_bytes = align_up(static_cast<size_t>(N) * 4);
  char* p = static_cast<char*>(base);
  if (p != nullptr) {
    layout.keys = reinterpret_cast<uint32_t*>(p);
    layout.rows = reinterpret_cast<int32_t*>(p + array_bytes);
    layout.sorted_keys = reinterpret_cast<uint32_t*>(p + 2 * array_bytes);
    layout.sorted_rows = reinterpret_cast<int32_t*>(p + 3 * array_bytes);
    layout.cub_storage = p + 4 * array_bytes;
  }
  layout.total_bytes = 4 * array_bytes + align_up(layout.cub_bytes);
  return layout;
}

}  // namespace embedding_detail

// Bytes of scratch embedding_backward needs for N tokens and a table of V rows.
inline size_t embedding_backward_scratch_bytes(int N, int V) {
  return embedding_detail::scratch_layout(nullptr, N, V).total_bytes;
}

// out[n, :] = table[tokens[n], :]. out [N, C], tokens [N] (device), table [V, C].
template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* table, int N, int C, int V,
                       cudaStream_t stream, KernelVariant variant = KernelVariant::kAuto) {
  NvtxRange range("embedding_forward");
  if (N <= 0 || C <= 0) return;
  constexpr int VF = vec16<T>();
  const bool aligned = C % VF == 0 && is_aligned(out, 16) && is_aligned(table, 16);
  if (use_fast_variant(variant, aligned, "embedding_forward")) {
    embedding_forward_kernel<VF><<<N, embedding_detail::kThreads, 0, stream>>>(out, tokens, table, C, V);
  } else {
    embedding_forward_kernel<1><<<N, embedding_detail::kThreads, 0, stream>>>(out, tokens, table, C, V);
  }
  CUDA_CHECK_LAUNCH();
}

// dtable[tokens[n], :] += dout[n, :], summed in increasing n (deterministic). dtable [V, C] accumulates;
// dout [N, C]; tokens [N]. scratch: scratch_bytes >= embedding_backward_scratch_bytes(N, V), device memory.
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int N, int C, int V, void* scratch,
                        size_t scratch_bytes, cudaStream_t stream,
                        KernelVariant variant = KernelVariant::kAuto) {
  NvtxRange range("embedding_backward");
  if (N <= 0 || C <= 0) return;
  const embedding_detail::ScratchLayout s = embedding_detail::scratch_layout(scratch, N, V);
  if (scratch == nullptr || scratch_bytes < s.total_bytes) {
    throw std::invalid_argument("embedding_backward: scratch has " + std::to_string(scratch_bytes) +
                                " bytes, needs " + std::to_string(s.total_bytes) +
                                " (embedding_backward_scratch_bytes)");
  }
  constexpr int kThreads = embedding_detail::kThreads;

  embedding_sort_keys_kernel<<<ceil_div(N, kThreads), kThreads, 0, stream>>>(s.keys, s.rows, tokens, N, V);
  CUDA_CHECK_LAUNCH();

  size_t cub_bytes = s.cub_bytes;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(s.cub_storage, cub_bytes, s.keys, s.sorted_keys, s.rows,
                                             s.sorted_rows, N, 0, embedding_detail::key_bits(V), stream));

  constexpr int VF = vec16<T>();
  const bool aligned = C % VF == 0 && is_aligned(dtable, 16) && is_aligned(dout, 16);
  if (use_fast_variant(variant, aligned, "embedding_backward")) {
    const dim3 grid(N, ceil_div(C, kThreads * VF));
    embedding_backward_runs_kernel<VF>
        <<<grid, kThreads, 0, stream>>>(dtable, dout, s.sorted_keys, s.sorted_rows, N, C, V);
  } else {
    const dim3 grid(N, ceil_div(C, kThreads));
    embedding_backward_runs_kernel<1>
        <<<grid, kThreads, 0, stream>>>(dtable, dout, s.sorted_keys, s.sorted_rows, N, C, V);
  }
  CUDA_CHECK_LAUNCH();
}

// NEFTune: x[i] += scale * (2 u_i - 1) for i in [0, n), in place (x is the embedding output, [N, C]).
template <typename T>
void embedding_noise_forward(T* x, size_t n, float scale, uint64_t seed, uint64_t stream_id,
                             cudaStream_t stream) {
  NvtxRange range("embedding_noise_forward");
  if (n == 0) return;
  constexpr int kThreads = 256;
  embedding_noise_kernel<<<ceil_div(static_cast<long long>(n), kThreads), kThreads, 0, stream>>>(
      x, n, scale, seed, stream_id);
  CUDA_CHECK_LAUNCH();
}

}  // namespace llm::cuda
