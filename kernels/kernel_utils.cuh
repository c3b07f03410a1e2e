// Small device helpers shared by the memory-bound kernels (embedding, positions, norms, activations,
// dropout, AdamW): the clear/fast variant switch, vectorised loads and stores that convert to and from
// fp32, and deterministic block reductions.
//
// Clear and fast variants. Each memory-bound kernel is written once, templated on VEC, the number of
// consecutive elements one thread loads at a time. VEC = 1 is the clear variant: one scalar load per
// element. The fast variant uses VEC = 16 / sizeof(T) (8 bf16 or 4 floats), so that every load and store
// is a single 16-byte transaction. The arithmetic is the same; only the memory access width (and, for the
// row reductions, which thread sums which elements) changes. The tests check fast against clear.
// The fast variant needs the pointers (and row lengths) to be 16-byte aligned; KernelVariant::kAuto picks
// it when they are and falls back to the clear variant otherwise.
//
// Reductions. block_sum reduces with warp shuffles and then over the warps in index order. The result
// depends only on the block size and on which thread holds which value, never on timing, so it is
// bitwise reproducible (no atomics).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda_common.cuh"

namespace llm::cuda {

enum class KernelVariant {
  kAuto,   // fast when the alignment allows it, else clear
  kClear,  // scalar loads (VEC = 1)
  kFast,   // 16-byte vector loads; throws std::invalid_argument when the data is not aligned for them
};

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Decides whether to run the fast variant. `aligned` says whether the data allows it.
inline bool use_fast_variant(KernelVariant variant, bool aligned, const char* op) {
  if (variant == KernelVariant::kClear) return false;
  if (variant == KernelVariant::kFast && !aligned) {
    throw std::invalid_argument(std::string(op) +
                                ": the fast variant needs 16-byte aligned pointers and row lengths");
  }
  return aligned;
}

// Loads VEC consecutive elements of T starting at p and converts them to fp32. For VEC > 1 the bytes
// (VEC * sizeof(T)) must be a multiple of 8 and p aligned to 16 bytes (to 8 when the bytes are 8).
template <int VEC, typename T>
__device__ __forceinline__ void load_floats(float (&out)[VEC], const T* p) {
  if constexpr (VEC == 1) {
    out[0] = to_float(*p);
  } else {
    constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
    static_assert(kBytes % 8 == 0, "vector loads move 8 or 16 bytes at a time");
    alignas(16) T tmp[VEC];
    if constexpr (kBytes % 16 == 0) {
#pragma unroll
      for (int k = 0; k < kBytes / 16; ++k)
        reinterpret_cast<int4*>(tmp)[k] = reinterpret_cast<const int4*>(p)[k];
    } else {
#pragma unroll
      for (int k = 0; k < kBytes / 8; ++k)
        reinterpret_cast<int2*>(tmp)[k] = reinterpret_cast<const int2*>(p)[k];
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(tmp[i]);
  }
}

// Rounds VEC fp32 values to T and stores them at p (same alignment rule as load_floats).
template <int VEC, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[VEC]) {
  if constexpr (VEC == 1) {
    *p = from_float<T>(in[0]);
  } else {
    constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
    static_assert(kBytes % 8 == 0, "vector stores move 8 or 16 bytes at a time");
    alignas(16) T tmp[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) tmp[i] = from_float<T>(in[i]);
    if constexpr (kBytes % 16 == 0) {
#pragma unroll
      for (int k = 0; k < kBytes / 16; ++k)
        reinterpret_cast<int4*>(p)[k] = reinterpret_cast<const int4*>(tmp)[k];
    } else {
#pragma unroll
      for (int k = 0; k < kBytes / 8; ++k)
        reinterpret_cast<int2*>(p)[k] = reinterpret_cast<const int2*>(tmp)[k];
    }
  }
}

// The alignment in bytes that load_floats<VEC, T> and store_floats<VEC, T> need.
template <int VEC, typename T>
constexpr size_t vec_alignment() {
  return VEC == 1 ? sizeof(T) : ((VEC * sizeof(T)) % 16 == 0 ? 16 : 8);
}

// x rounded to the storage type T and back: the value a kernel reads after storing x as T.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// A quiet NaN, written where an input is invalid (an out-of-range token id or position), so that the
// problem shows up in the loss instead of training silently on a wrong row.
__device__ __forceinline__ float quiet_nan() {
  return __int_as_float(0x7fc00000);
}

template <typename F>
__device__ __forceinline__ F warp_sum(F v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block, returned to every thread. blockDim.x must be a multiple of 32 (at most 1024);
// `shared` holds 32 values. Safe to call several times in a row with the same `shared`.
template <typename F>
__device__ __forceinline__ F block_sum(F v, F* shared) {
  v = warp_sum(v);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  F total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += shared[w];
  return total;
}

}  // namespace llm::cuda
