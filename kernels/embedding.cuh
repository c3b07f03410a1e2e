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
//   1. key[n] = t_n (V for an invalid id);
//   2. sort the (key, n) pairs by key, stably: equal token ids keep increasing n, and the result is a pure
//      function of the input. Up to 64K tokens one launch does it (embedding_counting_sort_kernel: each
//      block owns 512 consecutive keys, counts them over all tokens, and writes their pairs to their
//      sorted positions); above that, a key kernel and CUB's radix sort (about eight small launches);
//   3. the sorted positions are cut into tiles of 16; one block per (tile, slice of channels) owns every run
//      of equal keys that starts in its tile, to the run's end. For a run of key v it starts from dE[v, c],
//      adds dout[n, c] for the run's n in increasing order, and stores once. Each thread issues the (16-byte)
//      loads of 8 rows (and of the dtable rows of the runs they start) before adding them in order, so
//      that about 64 KB per block are in flight; a run that goes on past its tile is continued 16 rows at
//      a time. (A very frequent token makes one long serial run; that block then bounds the kernel's time.)
//      On sm_90 this kernel is launched as a programmatic dependent of the sort, so that its blocks are
//      resident, waiting, when the sort ends.
// Every (v, c) is written by exactly one thread, with no atomics, in the same order as the CPU reference,
// so for fp32 storage the result equals the reference bit for bit. Rows of tokens that do not occur are
// neither read nor written.
//
// Invalid ids (outside [0, V)) should have been rejected by the data loader; if one gets here, the
// forward pass writes a NaN row (so the loss shows it) and the backward pass skips it (its key V sorts
// after every valid id, and no run of key V is summed).
//
// Scratch for the backward pass (caller-owned, sized by embedding_backward_scratch_bytes): the sorted keys
// and rows; for more than 64K tokens also the unsorted ones and CUB's temporary storage.
//
// NEFTune noise (training only; derivation in kernels/cpu/embedding.h): x[i] += scale * (2 u_i - 1) with
// u_i = philox_uniform(seed, stream_id, i), the reference's draws. The noise does not depend on E, so the
// backward pass is unchanged. One thread per element: the kernel runs once per micro-batch, on N * C values.
#pragma once

#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

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

// The backward pass's shape.
namespace embedding_detail {
constexpr int kThreads = 256;     // threads per block; one thread owns VEC consecutive channels
constexpr int kTile = 16;         // sorted positions per block of the run kernel
constexpr int kBatch = 8;         // rows a thread loads before it adds them (loads in flight per thread)
constexpr uint32_t kNoKey = ~0u;  // "no position": differs from every key (keys are at most V < 2^31)
// The counting sort: up to kCountingSortMaxN tokens; each block owns kSortKeysPerBlock keys and has
// kSortWarps warps, which load kSortSteps * 32 tokens at a time.
constexpr int kCountingSortMaxN = 65536;
constexpr int kSortKeysPerBlock = 512;
constexpr int kSortWarps = 16;
constexpr int kSortSteps = 32;
}  // namespace embedding_detail

// Programmatic dependent launch (sm_90 and later; no-ops before): the counting sort lets the run kernel
// launch at once, and the run kernel waits for the sort's completion (and its writes) before it reads
// anything. The run kernel's blocks are then resident when the sort ends, instead of launching after it.
__device__ __forceinline__ void embedding_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void embedding_wait_for_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The sort key of a token: its id, or V for an invalid id (sorted after every valid one, then skipped).
__device__ __forceinline__ uint32_t embedding_sort_key(int token, int V) {
  return (token >= 0 && token < V) ? static_cast<uint32_t>(token) : static_cast<uint32_t>(V);
}

// The key of a position past the end of a warp's tokens: below no block's range and in none.
constexpr uint32_t kEmbeddingNoKey = ~0u;

// The sort keys of tokens base + 32 s + lane, s < STEPS (one warp-wide step each), kEmbeddingNoKey past
// `end`. Both passes of the counting sort read the tokens this way, so that they see the same keys in the
// same places.
template <int STEPS>
__device__ __forceinline__ void load_step_keys(uint32_t (&key)[STEPS], const int32_t* tokens, int base,
                                               int lane, int end, int V) {
#pragma unroll
  for (int s = 0; s < STEPS; ++s) {
    const int n = base + s * 32 + lane;
    key[s] = n < end ? embedding_sort_key(tokens[n], V) : kEmbeddingNoKey;
  }
}

// Steps 1 and 2 for N <= kCountingSortMaxN, in one launch: a stable counting sort. Block b owns the KEYS
// keys [KEYS b, KEYS b + KEYS) and writes their (key, n) pairs straight to their sorted positions. Each of
// its WARPS warps reads a contiguous part of the tokens, 32 consecutive ones per step, STEPS steps' loads at
// a time (at N = 16K, 16 warps x 32 steps: all of a warp's part at once):
//   pass 1  each warp counts each of the block's keys in its part (shared-memory integer atomics), and
//           the block counts the tokens whose key is below its range;
//   scan    the first sorted position of (key k, warp w), in key-major then warp order: (keys below the
//           block) + (the block's tokens with keys < k) + (tokens with key k in warps < w);
//   pass 2  the same reads in the same order: the lanes of a step whose key is k, one of the block's,
//           write (key, n) at the (k, warp) position plus the number of lower such lanes, and the position
//           advances by their count.
// Equal keys keep increasing n (warps, steps and lanes are visited in n order), so the result equals the
// stable radix sort's. Every block reads all N tokens twice (the second time mostly from L1): for N up to
// 64K that costs less than the radix sort's eight or so launches of a few blocks each (H200, N = 16K,
// V = 50257: 10 us against 34 us for the key kernel and the radix sort).
template <int WARPS, int STEPS, int KEYS>
__global__ void __launch_bounds__(WARPS * 32)
    embedding_counting_sort_kernel(uint32_t* sorted_keys, int32_t* sorted_rows, const int32_t* tokens, int N,
                                   int V) {
  constexpr int kWarps = WARPS, kThreads = WARPS * 32, kSteps = STEPS, kKeys = KEYS;
  constexpr int kKeysPerThread = kKeys / kThreads;  // in the scan, thread t has keys [t, t + 1) * this
  static_assert(kKeys % kThreads == 0, "the scan gives each thread the same number of keys");
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ int s_pos[kWarps][kKeys];  // counts per (warp, key), then the next sorted position of each
  __shared__ int s_below[kWarps];
  __shared__ typename Scan::TempStorage scan_storage;

  embedding_launch_dependents();  // the run kernel may launch now; it waits for this grid's end
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  const uint32_t lo = blockIdx.x * static_cast<uint32_t>(kKeys);  // the block's keys: [lo, lo + kKeys)
  const uint32_t lower_lanes = (1u << lane) - 1;
  const int per_warp = (N + kWarps - 1) / kWarps;
  const int begin = warp * per_warp, end = min(N, begin + per_warp);  // this warp's tokens
  for (int i = t; i < kWarps * kKeys; i += kThreads) s_pos[i / kKeys][i % kKeys] = 0;
  __syncthreads();

  // Pass 1. All branches on `group` are warp-uniform; __syncwarp orders one step's shared-memory update
  // before the next step's, which another lane may make.
  int below = 0;
  for (int base = begin; base < end; base += 32 * kSteps) {
    uint32_t key[kSteps];
    load_step_keys<kSteps>(key, tokens, base, lane, end, V);
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      below += key[s] < lo ? 1 : 0;
      // Unsigned: false below lo and for kEmbeddingNoKey. Integer atomics: the counts do not depend on their
      // order.
      if (key[s] - lo < static_cast<uint32_t>(kKeys)) atomicAdd(&s_pos[warp][key[s] - lo], 1);
    }
  }
  below = warp_sum(below);
  if (lane == 0) s_below[warp] = below;
  __syncthreads();

  // Scan: thread t turns the counts of its keys into first positions.
  int block_below = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) block_below += s_below[w];
  int total[kKeysPerThread], before[kKeysPerThread];
#pragma unroll
  for (int i = 0; i < kKeysPerThread; ++i) {
    total[i] = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total[i] += s_pos[w][t * kKeysPerThread + i];
  }
  Scan(scan_storage).ExclusiveSum(total, before);
#pragma unroll
  for (int i = 0; i < kKeysPerThread; ++i) {
    int next = block_below + before[i];
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int count = s_pos[w][t * kKeysPerThread + i];
      s_pos[w][t * kKeysPerThread + i] = next;
      next += count;
    }
  }
  __syncthreads();

  // Pass 2.
  for (int base = begin; base < end; base += 32 * kSteps) {
    uint32_t key[kSteps];
    load_step_keys<kSteps>(key, tokens, base, lane, end, V);
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const bool mine = key[s] - lo < static_cast<uint32_t>(kKeys);
      const uint32_t group = __ballot_sync(~0u, mine);
      if (group != 0) {  // warp-uniform
        if (mine) {
          // The lanes with this lane's key: usually the whole group (one lane, or one frequent key), which
          // min == max tells cheaply; else __match_any_sync sorts them out.
          uint32_t peers = group;
          if ((group & (group - 1)) != 0 &&
              __reduce_min_sync(group, key[s]) != __reduce_max_sync(group, key[s])) {
            peers = __match_any_sync(group, key[s]);
          }
          const int leader = __ffs(peers) - 1;
          int first = 0;
          if (lane == leader) {
            first = s_pos[warp][key[s] - lo];
            s_pos[warp][key[s] - lo] = first + __popc(peers);
          }
          const int pos = __shfl_sync(peers, first, leader) + __popc(peers & lower_lanes);
          sorted_keys[pos] = key[s];
          sorted_rows[pos] = base + s * 32 + lane;
        }
        __syncwarp();  // orders this step's update of s_pos before the next step's reads
      }
    }
  }
}

// Steps 1 and 2 for larger N: the sort keys and values (n) for CUB's radix sort.
__global__ void embedding_sort_keys_kernel(uint32_t* keys, int32_t* rows, const int32_t* tokens, int N,
                                           int V) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  keys[n] = embedding_sort_key(tokens[n], V);
  rows[n] = n;
}

// VEC consecutive elements of T as one aligned unit, so that loading them is one instruction (16 bytes in
// the fast variant). A batch of rows is held in this raw form, as 32-bit words, until it is added: bf16 pairs
// unpacked at load time would take twice the registers. get(k) is element k in fp32, exactly to_float's
// value (a bf16 is the upper half of the fp32 with the same value; element 0 is the low half of word 0).
template <int VEC, typename T>
struct alignas(vec_alignment<VEC, T>()) PackedVec {
  static constexpr bool kWords = (VEC * sizeof(T)) % 4 == 0;
  static_assert(sizeof(T) == 4 || std::is_same_v<T, __nv_bfloat16>, "fp32 or bf16 storage");
  using Unit = std::conditional_t<kWords, uint32_t, T>;
  Unit u[kWords ? VEC * sizeof(T) / 4 : VEC];

  __device__ __forceinline__ float get(int k) const {
    if constexpr (!kWords) {
      return to_float(u[k]);
    } else if constexpr (sizeof(T) == 4) {
      return __uint_as_float(u[k]);
    } else {
      const uint32_t w = u[k / 2];
      return __uint_as_float(k % 2 == 0 ? w << 16 : w & 0xffff0000u);
    }
  }
};

template <int VEC, typename T>
__device__ __forceinline__ PackedVec<VEC, T> load_packed(const T* p) {
  return *reinterpret_cast<const PackedVec<VEC, T>*>(p);
}

// acc += rows[0..m) of dout at channels [c, c + VEC), in order, ROWS loads in flight before their adds.
template <int VEC, int ROWS, typename T>
__device__ __forceinline__ void embedding_add_rows(float (&acc)[VEC], const int32_t* rows, int m,
                                                   const T* dout, int c, int C) {
  for (int base = 0; base < m; base += ROWS) {
    PackedVec<VEC, T> g[ROWS];
#pragma unroll
    for (int b = 0; b < ROWS; ++b) {
      if (base + b < m) g[b] = load_packed<VEC>(dout + static_cast<size_t>(rows[base + b]) * C + c);
    }
#pragma unroll
    for (int b = 0; b < ROWS; ++b) {
      if (base + b < m) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += g[b].get(k);
      }
    }
  }
}

// blockIdx.x = tile of TILE sorted positions [p0, p0 + TILE), blockIdx.y = slice of kThreads * VEC
// channels. The block owns every run of valid keys that STARTS in its tile, to the run's end (which may lie
// past the tile); positions before the tile's first run start continue a run an earlier block owns. Each
// thread walks the owned positions in sorted order, BATCH at a time: it first issues the loads of the
// batch's dout rows and, for positions that start a run, of that run's dtable row, then adds them in order.
// For a run starting at position s, acc = dE[v, c], acc += dout[n_s, c], acc += dout[n_{s+1}, c], ... and
// is stored when the next run starts or the walk ends. A run that goes on past the tile is continued in
// chunks of kThreads positions: the block stages the rows in shared memory and adds them 2 * BATCH at a
// time (a frequent token's long run then keeps twice the loads in flight).
template <int VEC, int TILE, int BATCH, typename T>
__global__ void __launch_bounds__(embedding_detail::kThreads)
    embedding_backward_runs_kernel(T* dtable, const T* dout, const uint32_t* sorted_keys,
                                   const int32_t* sorted_rows, int N, int C, int V) {
  constexpr int kThreads = embedding_detail::kThreads;
  constexpr uint32_t kNoKey = embedding_detail::kNoKey;
  static_assert(TILE + 2 <= kThreads, "one thread loads each key of the tile");
  // s_keys[i] = key at sorted position p0 + i - 1 (kNoKey outside [0, N)).
  __shared__ uint32_t s_keys[TILE + 2];
  __shared__ int32_t s_rows[kThreads];  // rows at p0 + i; later the rows of a continued run

  embedding_wait_for_prerequisites();  // the sort has finished (a no-op unless launched dependent on it)
  const int t = threadIdx.x;
  const int p0 = blockIdx.x * TILE;
  const int count = min(TILE, N - p0);  // >= 1
  if (t <= count + 1) {
    const int p = p0 + t - 1;
    s_keys[t] = (p >= 0 && p < N) ? sorted_keys[p] : kNoKey;
  }
  if (t < count) s_rows[t] = sorted_rows[p0 + t];
  __syncthreads();

  // The first position of the tile that starts a run; the ones before it are not this block's.
  int first = count;
  for (int i = 0; i < count; ++i) {
    if (s_keys[i + 1] != s_keys[i]) {
      first = i;
      break;
    }
  }
  const uint32_t valid_end = static_cast<uint32_t>(V);  // keys >= V are invalid ids: skipped
  const int c = (blockIdx.y * kThreads + t) * VEC;
  const bool active = c < C;
  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.0f;
  uint32_t open = kNoKey;  // the table row acc belongs to

  for (int base = first; base < count; base += BATCH) {
    PackedVec<VEC, T> g[BATCH], d[BATCH];
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const int i = base + b;
      if (active && i < count && s_keys[i + 1] < valid_end) {
        g[b] = load_packed<VEC>(dout + static_cast<size_t>(s_rows[i]) * C + c);
        if (s_keys[i + 1] != s_keys[i])
          d[b] = load_packed<VEC>(dtable + static_cast<size_t>(s_keys[i + 1]) * C + c);
      }
    }
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const int i = base + b;
      if (active && i < count && s_keys[i + 1] < valid_end) {
        if (s_keys[i + 1] != s_keys[i]) {  // a run starts: store the previous one, start from dE[v, c]
          if (open != kNoKey) store_floats<VEC>(dtable + static_cast<size_t>(open) * C + c, acc);
          open = s_keys[i + 1];
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] = d[b].get(k);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += g[b].get(k);
      }
    }
  }

  // The tile's last run goes on past the tile when the key after the tile equals it (the same test in every
  // thread, so the barriers below are reached by the whole block).
  const uint32_t last_key = s_keys[count];
  if (first < count && last_key < valid_end && s_keys[count + 1] == last_key) {
    for (int q = p0 + count;; q += kThreads) {
      __syncthreads();  // every thread is done reading s_rows
      const int j = q + t;
      const bool in_run = j < N && sorted_keys[j] == last_key;  // keys are sorted: a prefix of the chunk
      if (in_run) s_rows[t] = sorted_rows[j];
      const int m = __syncthreads_count(in_run);
      if (active) embedding_add_rows<VEC, 2 * BATCH>(acc, s_rows, m, dout, c, C);
      if (m < kThreads) break;
    }
  }
  if (active && open != kNoKey) store_floats<VEC>(dtable + static_cast<size_t>(open) * C + c, acc);
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.

namespace embedding_detail {

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

// The scratch layout. Counting sort: sorted keys, sorted rows. Radix sort: keys, rows, sorted keys, sorted
// rows, then CUB's storage. Each array is padded to 256 bytes.
struct ScratchLayout {
  bool counting_sort = true;
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
  const size_t array_bytes = align_up(static_cast<size_t>(N) * 4);
  char* p = static_cast<char*>(base);
  layout.counting_sort = N <= kCountingSortMaxN;
  if (layout.counting_sort) {
    if (p != nullptr) {
      layout.sorted_keys = reinterpret_cast<uint32_t*>(p);
      layout.sorted_rows = reinterpret_cast<int32_t*>(p + array_bytes);
    }
    layout.total_bytes = 2 * array_bytes;
    return layout;
  }
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, layout.cub_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), N, 0, key_bits(V)));
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

// Whether the current device has programmatic dependent launch (compute capability 9.0 and later).
inline bool supports_dependent_launch() {
  int device = 0, major = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 9;
}

// Step 3: one block per (tile of kTile sorted positions, slice of kThreads * VEC channels). With `overlap`
// it launches as a programmatic dependent of the kernel before it in the stream (the sort).
template <int VEC, typename T>
void launch_runs(T* dtable, const T* dout, const uint32_t* sorted_keys, const int32_t* sorted_rows, int N,
                 int C, int V, cudaStream_t stream, bool overlap) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(ceil_div(N, kTile), ceil_div(C, kThreads * VEC));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute attribute[1] = {};
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = overlap ? 1 : 0;
  CUDA_CHECK(cudaLaunchKernelEx(&config, embedding_backward_runs_kernel<VEC, kTile, kBatch, T>, dtable, dout,
                                sorted_keys, sorted_rows, N, C, V));
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

  if (s.counting_sort) {
    constexpr int kWarps = embedding_detail::kSortWarps;
    embedding_counting_sort_kernel<kWarps, embedding_detail::kSortSteps, embedding_detail::kSortKeysPerBlock>
        <<<ceil_div(V + 1LL, embedding_detail::kSortKeysPerBlock), kWarps * 32, 0, stream>>>(
            s.sorted_keys, s.sorted_rows, tokens, N, V);
    CUDA_CHECK_LAUNCH();
  } else {
    embedding_sort_keys_kernel<<<ceil_div(N, kThreads), kThreads, 0, stream>>>(s.keys, s.rows, tokens, N, V);
    CUDA_CHECK_LAUNCH();
    size_t cub_bytes = s.cub_bytes;
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(s.cub_storage, cub_bytes, s.keys, s.sorted_keys, s.rows,
                                               s.sorted_rows, N, 0, embedding_detail::key_bits(V), stream));
  }

  constexpr int VF = vec16<T>();
  const bool aligned = C % VF == 0 && is_aligned(dtable, 16) && is_aligned(dout, 16);
  const bool overlap = embedding_detail::supports_dependent_launch();
  if (use_fast_variant(variant, aligned, "embedding_backward")) {
    embedding_detail::launch_runs<VF>(dtable, dout, s.sorted_keys, s.sorted_rows, N, C, V, stream, overlap);
  } else {
    embedding_detail::launch_runs<1>(dtable, dout, s.sorted_keys, s.sorted_rows, N, C, V, stream, overlap);
  }
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
