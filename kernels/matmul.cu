// Matmuls: the tiled teaching kernel, the bias-gradient column sums, and the cuBLASLt host code.
// The math and the row-major/column-major mapping are explained in matmul.cuh.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/matmul.cuh"

namespace llm::cuda {

void check_cublas(cublasStatus_t status, const char* what, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + what + ": " +
                             cublasLtGetStatusString(status));
  }
}

// ---------------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------------

namespace {

constexpr int kTile = 16;

// The teaching path. Each block computes a kTile x kTile tile of C, one element per thread. It walks
// along K in steps of kTile: the block loads one tile of op(A) (its rows of C, kTile columns of K) and one
// tile of op(B) (kTile rows of K, its columns of C) into shared memory, every thread reads its row of the
// first and its column of the second from there, and the block moves on. Each element of A and B is thus
// read from global memory once per tile instead of once per output. Out-of-range elements load as 0, so
// ragged edges need no special case in the inner loop. The +1 column of padding keeps the transposed
// reads of the shared tiles free of bank conflicts.
// (cuBLASLt is an order of magnitude faster: it uses tensor cores, larger tiles per thread and
// asynchronous copies; see the benchmark in dev/bench/bench_matmul_classifier.cu.)
template <typename TIn, typename TOut, bool kTransA, bool kTransB>
__global__ void tiled_gemm_kernel(TOut* c, const TIn* a, const TIn* b, const TOut* bias, int M, int Nc, int K,
                                  int lda, int ldb, int ldc, float alpha, float beta) {
  __shared__ float a_tile[kTile][kTile + 1];  // a_tile[r][k] = op(A)[row0 + r, k0 + k]
  __shared__ float b_tile[kTile][kTile + 1];  // b_tile[k][j] = op(B)[k0 + k, col0 + j]
  const int tx = threadIdx.x;                 // column within the tile
  const int ty = threadIdx.y;                 // row within the tile
  const int row0 = blockIdx.y * kTile;
  const int col0 = blockIdx.x * kTile;

  float acc = 0.0f;
  for (int k0 = 0; k0 < K; k0 += kTile) {
    {
      const int r = row0 + ty, k = k0 + tx;
      float v = 0.0f;
      if (r < M && k < K) {
        v = to_float(kTransA ? a[static_cast<size_t>(k) * lda + r] : a[static_cast<size_t>(r) * lda + k]);
      }
      a_tile[ty][tx] = v;
    }
    {
      const int k = k0 + ty, j = col0 + tx;
      float v = 0.0f;
      if (k < K && j < Nc) {
        v = to_float(kTransB ? b[static_cast<size_t>(j) * ldb + k] : b[static_cast<size_t>(k) * ldb + j]);
      }
      b_tile[ty][tx] = v;
    }
    __syncthreads();  // the tiles are complete before anyone reads them
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) acc += a_tile[ty][kk] * b_tile[kk][tx];
    __syncthreads();  // everyone is done reading before the next tiles overwrite them
  }

  const int row = row0 + ty, col = col0 + tx;
  if (row < M && col < Nc) {
    TOut* out = c + static_cast<size_t>(row) * ldc + col;
    float v = alpha * acc;
    if (bias != nullptr) v += to_float(bias[col]);
    if (beta != 0.0f) v += beta * to_float(*out);  // never read C when beta == 0: it may be garbage
    *out = from_float<TOut>(v);
  }
}

// dbias[o] += sum_n dout[n, o]. A block owns 32 adjacent columns; its 32 x 32 threads read 32 rows at a
// time, so each warp reads 32 consecutive elements of one row (coalesced). Each thread sums its rows
// (y, y + 32, ...) in order, then thread row 0 adds the 32 partial sums in order: a fixed summation order,
// hence the same bits on every run (no atomics).
constexpr int kSumCols = 32;
constexpr int kSumRows = 32;

template <typename T, typename TGrad>
__global__ void column_sum_kernel(TGrad* dbias, const T* dout, int N, int O) {
  __shared__ float partial[kSumRows][kSumCols + 1];
  const int col = blockIdx.x * kSumCols + threadIdx.x;
  float sum = 0.0f;
  if (col < O) {
    for (int n = threadIdx.y; n < N; n += kSumRows) sum += to_float(dout[static_cast<size_t>(n) * O + col]);
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < O) {
    float total = 0.0f;
    for (int r = 0; r < kSumRows; ++r) total += partial[r][threadIdx.x];
    dbias[col] = from_float<TGrad>(to_float(dbias[col]) + total);
  }
}

// c[row, col] += bias[col] over a row-major [M, Nc] C with leading dimension ldc: the bias for a
// cuBLASLt GEMM whose bias pointer is too poorly aligned for the fused epilogue (see try_cublaslt).
template <typename TOut>
__global__ void add_bias_kernel(TOut* c, const TOut* bias, int M, int Nc, int ldc) {
  const size_t total = static_cast<size_t>(M) * Nc;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = i / Nc, col = i % Nc;
    TOut* out = c + row * ldc + col;
    *out = from_float<TOut>(to_float(*out) + to_float(bias[col]));
  }
}

template <typename TIn, typename TOut>
void launch_tiled(TOut* c, const TIn* a, const TIn* b, const TOut* bias, int M, int Nc, int K, int lda,
                  int ldb, int ldc, bool trans_a, bool trans_b, float alpha, float beta,
                  cudaStream_t stream) {
  const dim3 block(kTile, kTile);
  const dim3 grid(ceil_div(Nc, kTile), ceil_div(M, kTile));
  if (trans_a && trans_b) {
    tiled_gemm_kernel<TIn, TOut, true, true>
        <<<grid, block, 0, stream>>>(c, a, b, bias, M, Nc, K, lda, ldb, ldc, alpha, beta);
  } else if (trans_a) {
    tiled_gemm_kernel<TIn, TOut, true, false>
        <<<grid, block, 0, stream>>>(c, a, b, bias, M, Nc, K, lda, ldb, ldc, alpha, beta);
  } else if (trans_b) {
    tiled_gemm_kernel<TIn, TOut, false, true>
        <<<grid, block, 0, stream>>>(c, a, b, bias, M, Nc, K, lda, ldb, ldc, alpha, beta);
  } else {
    tiled_gemm_kernel<TIn, TOut, false, false>
        <<<grid, block, 0, stream>>>(c, a, b, bias, M, Nc, K, lda, ldb, ldc, alpha, beta);
  }
  CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------
// cuBLASLt
// ---------------------------------------------------------------------------------------------------

template <typename T>
constexpr cudaDataType_t cuda_data_type();
template <>
constexpr cudaDataType_t cuda_data_type<float>() {
  return CUDA_R_32F;
}
template <>
constexpr cudaDataType_t cuda_data_type<__nv_bfloat16>() {
  return CUDA_R_16BF;
}

// The largest power of two (at most 256) that divides the address: what the heuristic may assume.
uint32_t pointer_alignment(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

// Owners of the cuBLASLt descriptors, so that an exception never leaks them.
struct MatmulDesc {
  cublasLtMatmulDesc_t desc = nullptr;
  ~MatmulDesc() {
    if (desc != nullptr) cublasLtMatmulDescDestroy(desc);
  }
};
struct Layout {
  cublasLtMatrixLayout_t layout = nullptr;
  Layout(cudaDataType_t type, int rows, int cols, int ld) {
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, rows, cols, ld));
  }
  ~Layout() {
    if (layout != nullptr) cublasLtMatrixLayoutDestroy(layout);
  }
};
struct Preference {
  cublasLtMatmulPreference_t pref = nullptr;
  Preference() { CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref)); }
  ~Preference() {
    if (pref != nullptr) cublasLtMatmulPreferenceDestroy(pref);
  }
  void set(cublasLtMatmulPreferenceAttributes_t attr, uint32_t value) {
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
  }
};

std::atomic<long long> g_fallbacks{0};

// Runs the GEMM through cuBLASLt; returns false (having launched nothing) when the heuristic offers no
// algorithm for this compute type.
template <typename TIn, typename TOut>
bool try_cublaslt(BlasLt& blas, cublasComputeType_t compute, TOut* c, const TIn* a, const TIn* b,
                  const TOut* bias, int M, int Nc, int K, int lda, int ldb, int ldc, bool trans_a,
                  bool trans_b, float alpha, float beta, cudaStream_t stream) {
  MatmulDesc desc;
  if (cublasLtMatmulDescCreate(&desc.desc, compute, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS) return false;
  // cuBLASLt's first operand is our B, its second our A (column-major view of row-major storage).
  const cublasOperation_t op_first = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
  CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));
  // The preference has no alignment attribute for the bias, so the heuristic may pick a kernel that
  // loads it 16 bytes at a time (a misaligned-address fault, e.g. a bias at an odd offset of a packed
  // parameter buffer). Such a bias is added by add_bias_kernel after the GEMM instead.
  const bool fuse_bias = bias != nullptr && pointer_alignment(bias) >= 16;
  if (fuse_bias) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                                sizeof(epilogue)));
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    const int32_t bias_type = cuda_data_type<TOut>();
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                                sizeof(bias_type)));
  }

  // Stored (pre-op) shapes in column-major terms: B is [Nc, K] or, transposed, [K, Nc]; A is [K, M] or
  // [M, K]; C is [Nc, M].
  const Layout first(cuda_data_type<TIn>(), trans_b ? K : Nc, trans_b ? Nc : K, ldb);
  const Layout second(cuda_data_type<TIn>(), trans_a ? M : K, trans_a ? K : M, lda);
  const Layout out(cuda_data_type<TOut>(), Nc, M, ldc);

  // Everything the heuristic is told (the workspace size is the BlasLt's own, fixed).
  const BlasLt::AlgoKey key{compute,
                            cuda_data_type<TIn>(),
                            cuda_data_type<TOut>(),
                            fuse_bias,
                            M,
                            Nc,
                            K,
                            lda,
                            ldb,
                            ldc,
                            trans_a,
                            trans_b,
                            pointer_alignment(a),
                            pointer_alignment(b),
                            pointer_alignment(c)};
  BlasLt::CachedAlgo chosen{};
  if (!blas.find_algo(key, &chosen)) {
    Preference pref;
    const uint64_t workspace_bytes = blas.workspace_bytes();
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                      &workspace_bytes, sizeof(workspace_bytes)));
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, pointer_alignment(b));
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, pointer_alignment(a));
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, pointer_alignment(c));
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, pointer_alignment(c));
    cublasLtMatmulHeuristicResult_t heuristic{};
    int count = 0;
    const cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(blas.handle(), desc.desc, first.layout, second.layout, out.layout,
                                       out.layout, pref.pref, 1, &heuristic, &count);
    chosen = {heuristic.algo, status == CUBLAS_STATUS_SUCCESS && count > 0};
    blas.store_algo(key, chosen);
  }
  if (!chosen.found) return false;

  CUBLAS_CHECK(cublasLtMatmul(blas.handle(), desc.desc, &alpha, b, first.layout, a, second.layout, &beta, c,
                              out.layout, c, out.layout, &chosen.algo, blas.workspace(),
                              blas.workspace_bytes(), stream));
  if (bias != nullptr && !fuse_bias) {
    constexpr int kThreads = 256;
    const long long total = static_cast<long long>(M) * Nc;
    const int blocks = static_cast<int>(std::min<long long>((total + kThreads - 1) / kThreads, 4096));
    add_bias_kernel<TOut><<<blocks, kThreads, 0, stream>>>(c, bias, M, Nc, ldc);
    CUDA_CHECK_LAUNCH();
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Host API
// ---------------------------------------------------------------------------------------------------

BlasLt::BlasLt(size_t workspace_bytes) : workspace_bytes_(workspace_bytes) {
  CUBLAS_CHECK(cublasLtCreate(&handle_));
  if (workspace_bytes_ > 0) {
    const cudaError_t err = cudaMalloc(&workspace_, workspace_bytes_);
    if (err != cudaSuccess) {
      cublasLtDestroy(handle_);
      check(err, "cudaMalloc(cuBLASLt workspace)", __FILE__, __LINE__);
    }
  }
}

BlasLt::~BlasLt() {
  if (workspace_ != nullptr) cudaFree(workspace_);
  if (handle_ != nullptr) cublasLtDestroy(handle_);
}

BlasLt& BlasLt::shared() {
  static std::mutex mutex;
  static std::vector<BlasLt*>* per_device = new std::vector<BlasLt*>();  // never freed, see the header
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  if (per_device->size() <= static_cast<size_t>(device)) per_device->resize(device + 1, nullptr);
  BlasLt*& slot = (*per_device)[device];
  if (slot == nullptr) slot = new BlasLt();
  return *slot;
}

bool BlasLt::find_algo(const AlgoKey& key, CachedAlgo* out) const {
  const std::lock_guard<std::mutex> lock(cache_mutex_);
  const auto it = algo_cache_.find(key);
  if (it == algo_cache_.end()) return false;
  *out = it->second;
  return true;
}

void BlasLt::store_algo(const AlgoKey& key, const CachedAlgo& value) {
  const std::lock_guard<std::mutex> lock(cache_mutex_);
  algo_cache_[key] = value;
}

size_t BlasLt::cached_algos() const {
  const std::lock_guard<std::mutex> lock(cache_mutex_);
  return algo_cache_.size();
}

long long gemm_fallback_count() {
  return g_fallbacks.load();
}

template <typename TIn, typename TOut>
void gemm(TOut* c, const TIn* a, const TIn* b, const TOut* bias, int M, int Nc, int K, int lda, int ldb,
          int ldc, bool trans_a, bool trans_b, float alpha, float beta, cudaStream_t stream,
          GemmEngine engine, BlasLt* blas) {
  if (M < 0 || Nc < 0 || K < 0) throw std::invalid_argument("gemm: negative size");
  if (lda < (trans_a ? M : K) || ldb < (trans_b ? K : Nc) || ldc < Nc || lda < 1 || ldb < 1 || ldc < 1) {
    throw std::invalid_argument(
        "gemm: leading dimension smaller than the row length (M=" + std::to_string(M) +
        " Nc=" + std::to_string(Nc) + " K=" + std::to_string(K) + " lda=" + std::to_string(lda) +
        " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc) + ")");
  }
  if (M == 0 || Nc == 0) return;
  // K == 0 leaves C = beta * C + bias, which cuBLASLt does not take; the tiled kernel does.
  if (engine == GemmEngine::kCublasLt && K > 0) {
    BlasLt& lt = blas != nullptr ? *blas : BlasLt::shared();
    // fp32 storage is the test mode: PEDANTIC forbids TF32 (and NVIDIA_TF32_OVERRIDE) and emulation.
    const cublasComputeType_t compute =
        std::is_same_v<TIn, float> ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
    if (try_cublaslt(lt, compute, c, a, b, bias, M, Nc, K, lda, ldb, ldc, trans_a, trans_b, alpha, beta,
                     stream)) {
      return;
    }
    if (compute != CUBLAS_COMPUTE_32F && try_cublaslt(lt, CUBLAS_COMPUTE_32F, c, a, b, bias, M, Nc, K, lda,
                                                      ldb, ldc, trans_a, trans_b, alpha, beta, stream)) {
      return;
    }
    if (g_fallbacks.fetch_add(1) == 0) {
      std::fprintf(stderr,
                   "matmul: cuBLASLt offered no algorithm for M=%d Nc=%d K=%d lda=%d ldb=%d ldc=%d "
                   "trans_a=%d trans_b=%d; using the tiled kernel (reported once)\n",
                   M, Nc, K, lda, ldb, ldc, trans_a ? 1 : 0, trans_b ? 1 : 0);
    }
  }
  launch_tiled(c, a, b, bias, M, Nc, K, lda, ldb, ldc, trans_a, trans_b, alpha, beta, stream);
}

template <typename T>
void matmul_forward(T* out, const T* x, const T* weight, const T* bias, int N, int I, int O,
                    cudaStream_t stream, GemmEngine engine, BlasLt* blas) {
  // out[N, O] = x[N, I] * W[O, I]^T (+ bias)
  gemm<T, T>(out, x, weight, bias, N, O, I, I, I, O, false, true, 1.0f, 0.0f, stream, engine, blas);
}

template <typename T, typename TGrad>
void column_sum_accumulate(TGrad* dbias, const T* dout, int N, int O, cudaStream_t stream) {
  if (O <= 0) return;
  column_sum_kernel<T, TGrad>
      <<<ceil_div(O, kSumCols), dim3(kSumCols, kSumRows), 0, stream>>>(dbias, dout, N, O);
  CUDA_CHECK_LAUNCH();
}

template <typename T, typename TGrad>
void matmul_backward(T* dx, TGrad* dweight, TGrad* dbias, const T* dout, const T* x, const T* weight, int N,
                     int I, int O, bool accumulate_dx, cudaStream_t stream, GemmEngine engine, BlasLt* blas) {
  if (dx != nullptr) {
    // dx[N, I] (=|+=) dout[N, O] * W[O, I]
    gemm<T, T>(dx, dout, weight, nullptr, N, I, O, O, I, I, false, false, 1.0f, accumulate_dx ? 1.0f : 0.0f,
               stream, engine, blas);
  }
  if (dweight != nullptr) {
    // dW[O, I] += dout[N, O]^T * x[N, I]
    gemm<T, TGrad>(dweight, dout, x, nullptr, O, I, N, O, I, I, true, false, 1.0f, 1.0f, stream, engine,
                   blas);
  }
  if (dbias != nullptr) column_sum_accumulate<T, TGrad>(dbias, dout, N, O, stream);
}

// Explicit instantiations.
using bf16 = __nv_bfloat16;
template void gemm<float, float>(float*, const float*, const float*, const float*, int, int, int, int, int,
                                 int, bool, bool, float, float, cudaStream_t, GemmEngine, BlasLt*);
template void gemm<bf16, bf16>(bf16*, const bf16*, const bf16*, const bf16*, int, int, int, int, int, int,
                               bool, bool, float, float, cudaStream_t, GemmEngine, BlasLt*);
template void gemm<bf16, float>(float*, const bf16*, const bf16*, const float*, int, int, int, int, int, int,
                                bool, bool, float, float, cudaStream_t, GemmEngine, BlasLt*);
template void matmul_forward<float>(float*, const float*, const float*, const float*, int, int, int,
                                    cudaStream_t, GemmEngine, BlasLt*);
template void matmul_forward<bf16>(bf16*, const bf16*, const bf16*, const bf16*, int, int, int, cudaStream_t,
                                   GemmEngine, BlasLt*);
template void matmul_backward<float, float>(float*, float*, float*, const float*, const float*, const float*,
                                            int, int, int, bool, cudaStream_t, GemmEngine, BlasLt*);
template void matmul_backward<bf16, bf16>(bf16*, bf16*, bf16*, const bf16*, const bf16*, const bf16*, int,
                                          int, int, bool, cudaStream_t, GemmEngine, BlasLt*);
template void matmul_backward<bf16, float>(bf16*, float*, float*, const bf16*, const bf16*, const bf16*, int,
                                           int, int, bool, cudaStream_t, GemmEngine, BlasLt*);
template void column_sum_accumulate<float, float>(float*, const float*, int, int, cudaStream_t);
template void column_sum_accumulate<bf16, bf16>(bf16*, const bf16*, int, int, cudaStream_t);
template void column_sum_accumulate<bf16, float>(float*, const bf16*, int, int, cudaStream_t);

}  // namespace llm::cuda
