// Matrix multiplications on the GPU: the fully connected layer (forward and backward) through cuBLASLt,
// and a plain shared-memory tiled kernel that computes the same thing, kept as the teaching path.
//
// Math (the PyTorch layout of kernels/cpu/linear.h): weight W is [O, I], x is [N, I], out is [N, O],
//   out = x W^T + b,                  out[n, o] = sum_i x[n, i] W[o, i] + b[o].
// Backward, with G = dL/dout [N, O] (each out[n, o] is linear in x[n, i], W[o, i] and b[o]):
//   dx = G W            [N, I]        dx[n, i] = sum_o G[n, o] W[o, i]
//   dW = G^T x          [O, I]        dW[o, i] = sum_n G[n, o] x[n, i]
//   db = column sums of G [O]         db[o]    = sum_n G[n, o]
// Gradient rule: dW and db accumulate (+=, cuBLASLt's beta = 1), so gradient accumulation works; dx is
// overwritten (beta = 0) unless accumulate_dx asks for += (an input that also gets gradient elsewhere).
//
// Everything is one row-major GEMM, C[M, Nc] = alpha * op(A) op(B) (+ bias[Nc]) + beta * C:
//   forward  out = x W^T:   A = x [N, I],            B = W [O, I] transposed,  M = N, Nc = O, K = I
//   dx       dx  = G W:     A = G [N, O],            B = W [O, I],             M = N, Nc = I, K = O
//   dW       dW += G^T x:   A = G [N, O] transposed, B = x [N, I],             M = O, Nc = I, K = N
// cuBLASLt is column-major. A row-major matrix with leading dimension ld is the column-major view of its
// transpose with the same ld, so C = op(A) op(B) row-major is C^T = op(B)^T op(A)^T column-major: gemm()
// hands cuBLASLt B as its first operand and A as its second, with the same transpose flags, and m = Nc,
// n = M. The bias epilogue adds a vector along the rows of the column-major D, i.e. along Nc: one value
// per output feature, as wanted.
//
// Precision: bf16 storage with fp32 accumulation (CUBLAS_COMPUTE_32F) in training. The fp32 test mode
// uses CUBLAS_COMPUTE_32F_PEDANTIC: plain fp32 arithmetic, never TF32 or an emulation, so that fp32
// results match the CPU reference to ~1e-6. Parameter gradients may be kept in fp32 while the
// activations are bf16 (TGrad = float): cuBLASLt reads bf16 A and B and accumulates into an fp32 C.
//
// Bias gradient: a small deterministic kernel of our own (column_sum_accumulate below), not cuBLASLt's
// BGRADB epilogue. BGRADB *writes* the bias gradient (it cannot add to it, which gradient accumulation
// needs), is only offered for some type and layout combinations, and its reduction order is not
// documented. Ours sums each column in a fixed order: the same bits on every run.
//
// Alignment: cuBLASLt's heuristic assumes 256-byte-aligned pointers unless told otherwise, and picks a
// kernel that may need it. gemm() measures each pointer's real alignment and passes it in the
// preference, so row offsets into a matrix (a chunk of tokens, an odd hidden size) are safe. The
// preference cannot describe the bias pointer, so a bias that is not 16-byte aligned is added by a small
// kernel after the GEMM rather than by the epilogue. Leading
// dimensions need not be multiples of 8, but tensor-core kernels are only eligible when they are
// (ld * sizeof(T) a multiple of 16 bytes); callers that own a buffer pad its ld (see classifier.cuh).
// If cuBLASLt offers no algorithm at all, gemm() falls back to the tiled kernel and says so once on
// stderr.
//
// Heuristic cache: a training step runs the same few GEMM shapes hundreds of times, and asking cuBLASLt's
// heuristic costs host time on every call. Each BlasLt remembers the heuristic's answer per problem (types,
// compute type, sizes, leading dimensions, transposes, pointer alignments, fused bias) and asks once.
//
// Determinism: for a fixed problem, cuBLASLt's heuristic picks the same algorithm every time and, with
// a user-owned workspace per stream, gives bitwise identical results on the same GPU and library. Use one
// BlasLt per stream when several streams run matmuls at once (a workspace must not be shared by
// concurrently running kernels).
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>

#include "kernels/cuda_common.cuh"

namespace llm::cuda {

// Throws std::runtime_error with the file, line and cuBLAS status text.
void check_cublas(cublasStatus_t status, const char* what, const char* file, int line);

}  // namespace llm::cuda

#define CUBLAS_CHECK(call) ::llm::cuda::check_cublas((call), #call, __FILE__, __LINE__)

namespace llm::cuda {

// A cuBLASLt handle and the workspace its matmuls may use. One per stream that runs matmuls
// concurrently with others; BlasLt::shared() is the process-wide default for the current device.
class BlasLt {
 public:
  static constexpr size_t kDefaultWorkspaceBytes = 32u << 20;  // what cuBLAS recommends on Hopper

  explicit BlasLt(size_t workspace_bytes = kDefaultWorkspaceBytes);
  ~BlasLt();
  BlasLt(const BlasLt&) = delete;
  BlasLt& operator=(const BlasLt&) = delete;

  cublasLtHandle_t handle() const { return handle_; }
  void* workspace() const { return workspace_; }
  size_t workspace_bytes() const { return workspace_bytes_; }

  // The default instance for the current device, created on first use and kept until the process
  // exits (deliberately never destroyed: static destructors may run after the CUDA runtime is gone).
  static BlasLt& shared();

  // The heuristic cache (see the header comment). A key is everything the heuristic is told; the value
  // is its algorithm, or found == false when it offered none.
  using AlgoKey = std::array<int64_t, 15>;
  struct CachedAlgo {
    cublasLtMatmulAlgo_t algo;
    bool found;
  };
  bool find_algo(const AlgoKey& key, CachedAlgo* out) const;
  void store_algo(const AlgoKey& key, const CachedAlgo& value);
  size_t cached_algos() const;

 private:
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  mutable std::mutex cache_mutex_;
  std::map<AlgoKey, CachedAlgo> algo_cache_;
};

// Which implementation a matmul uses: cuBLASLt (the default, tensor cores), or the tiled kernel in
// matmul.cu (the teaching path: one output element per thread, 16x16 tiles staged in shared memory).
enum class GemmEngine { kCublasLt, kTiled };

// Row-major C[M, Nc] = alpha * op(A) op(B) (+ bias[Nc]) + beta * C, accumulated in fp32.
//   op(A) is [M, K]: A itself (lda >= K) or, with trans_a, the transpose of A stored [K, M] (lda >= M).
//   op(B) is [K, Nc]: B itself (ldb >= Nc) or, with trans_b, the transpose of B stored [Nc, K] (ldb >= K).
//   c: [M rows, ldc >= Nc]; read only when beta != 0, so it may hold garbage (NaN) when beta == 0.
//   bias: [Nc] or null; added once (not scaled by alpha or beta).
// TIn is the type of A and B, TOut of C and bias. Instantiated for (float, float), (bf16, bf16) and
// (bf16, float). blas: null for BlasLt::shared().
template <typename TIn, typename TOut>
void gemm(TOut* c, const TIn* a, const TIn* b, const TOut* bias, int M, int Nc, int K, int lda, int ldb,
          int ldc, bool trans_a, bool trans_b, float alpha, float beta, cudaStream_t stream,
          GemmEngine engine = GemmEngine::kCublasLt, BlasLt* blas = nullptr);

// out: [N, O] (overwritten); x: [N, I]; weight: [O, I]; bias: [O] or null.
// T = float or __nv_bfloat16.
template <typename T>
void matmul_forward(T* out, const T* x, const T* weight, const T* bias, int N, int I, int O,
                    cudaStream_t stream, GemmEngine engine = GemmEngine::kCublasLt, BlasLt* blas = nullptr);

// dx: [N, I] (= unless accumulate_dx, then +=; null to skip). dweight: [O, I] (+=; null to skip).
// dbias: [O] (+=; null to skip). dout: [N, O]; x: [N, I]; weight: [O, I].
// Instantiated for (T, TGrad) = (float, float), (bf16, bf16) and (bf16, float).
template <typename T, typename TGrad = T>
void matmul_backward(T* dx, TGrad* dweight, TGrad* dbias, const T* dout, const T* x, const T* weight, int N,
                     int I, int O, bool accumulate_dx, cudaStream_t stream,
                     GemmEngine engine = GemmEngine::kCublasLt, BlasLt* blas = nullptr);

// dbias[o] += sum_n dout[n, o] for dout [N, O]: the bias gradient, summed in fp32 in a fixed order
// (deterministic). Same type pairs as matmul_backward.
template <typename T, typename TGrad = T>
void column_sum_accumulate(TGrad* dbias, const T* dout, int N, int O, cudaStream_t stream);

// How many gemm() calls found no cuBLASLt algorithm and ran on the tiled kernel instead (for tests and
// benchmarks: it should stay 0).
long long gemm_fallback_count();

}  // namespace llm::cuda
