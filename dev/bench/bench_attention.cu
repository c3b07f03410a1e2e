// Benchmark of the fused attention kernels (kernels/attention_flash.cuh): causal, bf16, T = 2048, D = 128,
// forward and backward, reported in TFLOP/s and as a percentage of a cuBLAS bf16 GEMM rate measured in
// the same run on the same GPU.
//
// Build (from the repository root):
//   nvcc -O3 -std=c++17 -arch=sm_90 -I. dev/bench/bench_attention.cu -lcublas -o bench_attention
// (-arch=sm_80 for an A100.) Run:
//   ./bench_attention [B] [H] [T]        defaults B = 8, H = 16, T = 2048 (D = 128 is fixed)
//
// FLOP convention (the usual one for attention kernels): forward = 4 B H T^2 D / 2 for causal (two
// matmuls, half the square visible); backward = 2.5 x forward (five matmuls). Our deterministic backward
// actually executes seven (S and dO V^T are recomputed in the separate dQ pass), so the reported
// backward rate understates the arithmetic done; see kernels/attention_flash.cuh.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/attention_flash.cuh"
#include "kernels/cuda_common.cuh"

namespace {

#define CUBLAS_CHECK(call)                                                                 \
  do {                                                                                     \
    const cublasStatus_t status_ = (call);                                                 \
    if (status_ != CUBLAS_STATUS_SUCCESS) {                                                \
      std::fprintf(stderr, "%s:%d: %s failed (%d)\n", __FILE__, __LINE__, #call, status_); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

// Fills x with a cheap deterministic hash in [-1, 1).
__global__ void fill_kernel(__nv_bfloat16* x, size_t n, uint32_t salt) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ salt;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2bfloat16(static_cast<float>(h & 0xFFFFFF) / 8388608.0f - 1.0f);
  }
}

void fill(__nv_bfloat16* x, size_t n, uint32_t salt) {
  fill_kernel<<<1024, 256>>>(x, n, salt);
  CUDA_CHECK_LAUNCH();
}

// Average milliseconds per call of fn over `reps` calls, after `warmup` calls.
template <typename Fn>
double time_ms(Fn fn, int warmup, int reps) {
  for (int r = 0; r < warmup; ++r) fn();
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  CUDA_CHECK(cudaEventRecord(start));
  for (int r = 0; r < reps; ++r) fn();
  CUDA_CHECK(cudaEventRecord(stop));
  CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.0f;
  CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  return ms / reps;
}

// Measured cuBLAS rate for an n x n x n bf16 GEMM with fp32 accumulation, in TFLOP/s.
double cublas_bf16_tflops(int n) {
  __nv_bfloat16 *a, *b, *c;
  const size_t elems = static_cast<size_t>(n) * n;
  CUDA_CHECK(cudaMalloc(&a, elems * sizeof(__nv_bfloat16)));
  CUDA_CHECK(cudaMalloc(&b, elems * sizeof(__nv_bfloat16)));
  CUDA_CHECK(cudaMalloc(&c, elems * sizeof(__nv_bfloat16)));
  fill(a, elems, 1);
  fill(b, elems, 2);
  cublasHandle_t handle;
  CUBLAS_CHECK(cublasCreate(&handle));
  const float alpha = 1.0f, beta = 0.0f;
  auto gemm = [&] {
    CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, b,
                              CUDA_R_16BF, n, &beta, c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT));
  };
  const double ms = time_ms(gemm, 3, 20);
  CUBLAS_CHECK(cublasDestroy(handle));
  CUDA_CHECK(cudaFree(a));
  CUDA_CHECK(cudaFree(b));
  CUDA_CHECK(cudaFree(c));
  return 2.0 * n * static_cast<double>(n) * n / (ms * 1e-3) / 1e12;
}

}  // namespace

int main(int argc, char** argv) {
  using llm::cuda::AttentionKernel;
  const int B = argc > 1 ? std::atoi(argv[1]) : 8;
  const int H = argc > 2 ? std::atoi(argv[2]) : 16;
  const int T = argc > 3 ? std::atoi(argv[3]) : 2048;
  constexpr int D = 128;
  if (B <= 0 || H <= 0 || T <= 0) {
    std::fprintf(stderr, "usage: %s [B > 0] [H > 0] [T > 0]\n", argv[0]);
    return 2;
  }
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (%d SMs)\n", prop.name, prop.multiProcessorCount);
  std::printf("attention: causal, bf16, B=%d H=%d T=%d D=%d (%d query tiles of 64 per head, %d blocks)\n", B,
              H, T, D, (T + 63) / 64, B * H * ((T + 63) / 64));

  const double gemm_tflops = cublas_bf16_tflops(8192);
  std::printf("cuBLAS bf16 GEMM 8192^3 (fp32 accumulate): %.1f TFLOP/s\n\n", gemm_tflops);

  const size_t n = static_cast<size_t>(B) * T * H * D, stats = static_cast<size_t>(B) * H * T;
  __nv_bfloat16 *q, *k, *v, *out, *dout, *dq, *dk, *dv;
  float *lse, *delta;
  for (__nv_bfloat16** p : {&q, &k, &v, &out, &dout, &dq, &dk, &dv}) {
    CUDA_CHECK(cudaMalloc(p, n * sizeof(__nv_bfloat16)));
  }
  CUDA_CHECK(cudaMalloc(&lse, stats * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&delta, stats * sizeof(float)));
  fill(q, n, 11);
  fill(k, n, 12);
  fill(v, n, 13);
  fill(dout, n, 14);

  const llm::cuda::AttentionShape shape{B, T, H, H, D};
  const double fwd_flops = 4.0 * B * H * static_cast<double>(T) * T * D / 2.0;
  const double bwd_flops = 2.5 * fwd_flops;
  std::printf("%-22s %9s %9s %9s %9s %12s %10s\n", "kernel", "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s",
              "fwd+bwd TF/s", "% cuBLAS");
  std::string summary;
  for (AttentionKernel kernel :
       {AttentionKernel::kMma, AttentionKernel::kTensorCore, AttentionKernel::kFma}) {
    const char* name = kernel == AttentionKernel::kMma          ? "mma"
                       : kernel == AttentionKernel::kTensorCore ? "wmma"
                                                                : "fma";
    llm::cuda::AttentionOptions opt;
    opt.causal = true;
    opt.kernel = kernel;
    auto forward = [&] { llm::cuda::attention_flash_forward(out, lse, q, k, v, shape, opt, nullptr); };
    auto backward = [&] {
      llm::cuda::attention_flash_backward(dq, dk, dv, delta, dout, out, q, k, v, lse, shape, opt, nullptr);
    };
    const int reps = kernel == AttentionKernel::kFma ? 3 : 20;
    const double fwd_ms = time_ms(forward, 2, reps);
    const double bwd_ms = time_ms(backward, 2, reps);
    CUDA_CHECK(cudaDeviceSynchronize());

    // Sanity: the outputs are finite.
    std::vector<__nv_bfloat16> host(std::min<size_t>(n, 1 << 20));
    CUDA_CHECK(cudaMemcpy(host.data(), dq, host.size() * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
    bool finite = true;
    for (const __nv_bfloat16& x : host) finite = finite && std::isfinite(__bfloat162float(x));

    const double total = (fwd_flops + bwd_flops) / ((fwd_ms + bwd_ms) * 1e-3) / 1e12;
    const std::string label =
        std::string(kernel == AttentionKernel::kFma ? "flash bf16->fp32 " : "flash bf16 ") + name;
    std::printf("%-22s %9.3f %9.1f %9.3f %9.1f %12.1f %9.1f%%%s\n", label.c_str(), fwd_ms,
                fwd_flops / (fwd_ms * 1e-3) / 1e12, bwd_ms, bwd_flops / (bwd_ms * 1e-3) / 1e12, total,
                100.0 * total / gemm_tflops, finite ? "" : "   (NON-FINITE OUTPUT)");
    char line[256];
    std::snprintf(
        line, sizeof(line),
        "summary: attention %s causal T=%d D=%d: fwd+bwd %.1f TFLOP/s = %.1f%% of cuBLAS bf16 (%.0f)%s\n",
        name, T, D, total, 100.0 * total / gemm_tflops, gemm_tflops, finite ? "" : " NON-FINITE");
    summary += line;
  }
  std::printf("\nfloor at the cuBLAS rate: fwd %.3f ms, bwd %.3f ms (FLOPs / measured GEMM rate)\n",
              fwd_flops / (gemm_tflops * 1e12) * 1e3, bwd_flops / (gemm_tflops * 1e12) * 1e3);

  // Forward occupancy variants of the mma.sync kernel (launch bounds and the compact shared-memory layout,
  // see fwd_mma_kernel). They do the same arithmetic, so their outputs must equal the default's bit for bit.
  {
    namespace fd = llm::cuda::attention_flash_detail;
    llm::cuda::AttentionOptions opt;
    opt.causal = true;
    const llm::cuda::AttentionParams params = llm::cuda::make_attention_params(shape, opt);
    std::vector<__nv_bfloat16> want(n), got(n);
    std::vector<float> want_lse(stats), got_lse(stats);
    fd::forward_mma_launch<D, false, 1>(params, out, lse, q, k, v, nullptr);
    CUDA_CHECK(cudaMemcpy(want.data(), out, n * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(want_lse.data(), lse, stats * sizeof(float), cudaMemcpyDeviceToHost));
    auto variant = [&](const char* name, auto launch) {
      CUDA_CHECK(cudaMemset(out, 0xff, n * sizeof(__nv_bfloat16)));
      launch();
      CUDA_CHECK(cudaMemcpy(got.data(), out, n * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
      CUDA_CHECK(cudaMemcpy(got_lse.data(), lse, stats * sizeof(float), cudaMemcpyDeviceToHost));
      const bool same = std::memcmp(got.data(), want.data(), n * sizeof(__nv_bfloat16)) == 0 &&
                        std::memcmp(got_lse.data(), want_lse.data(), stats * sizeof(float)) == 0;
      const double ms = time_ms(launch, 2, 20);
      std::printf("variant fwd mma %-28s %9.3f ms %9.1f TF/s  %s\n", name, ms, fwd_flops / (ms * 1e-3) / 1e12,
                  same ? "bitwise equal to the default" : "DIFFERS FROM THE DEFAULT");
    };
    std::printf("\n");
    variant("1 block/SM bound, 5 tiles",
            [&] { fd::forward_mma_launch<D, false, 1>(params, out, lse, q, k, v, nullptr); });
    variant("2 blocks/SM, compact",
            [&] { fd::forward_mma_launch<D, false, 2>(params, out, lse, q, k, v, nullptr); });
    variant("3 blocks/SM, compact",
            [&] { fd::forward_mma_launch<D, false, 3>(params, out, lse, q, k, v, nullptr); });
  }

  // Backward variants of the dQ kernel (32-key tiles, launch bounds); dK/dV is the same kernel in each.
  {
    namespace fd = llm::cuda::attention_flash_detail;
    llm::cuda::AttentionOptions opt;
    opt.causal = true;
    const llm::cuda::AttentionParams params = llm::cuda::make_attention_params(shape, opt);
    llm::cuda::attention_flash_forward(out, lse, q, k, v, shape, opt, nullptr);
    fd::delta_pass<__nv_bfloat16>(params, delta, dout, out, nullptr);
    std::vector<__nv_bfloat16> want(n), got(n);
    fd::backward_mma_launch<D, false>(params, dq, dk, dv, delta, dout, q, k, v, lse, nullptr);
    CUDA_CHECK(cudaMemcpy(want.data(), dq, n * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
    auto variant = [&](const char* name, auto launch) {
      CUDA_CHECK(cudaMemset(dq, 0xff, n * sizeof(__nv_bfloat16)));
      launch();
      CUDA_CHECK(cudaMemcpy(got.data(), dq, n * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
      const bool same = std::memcmp(got.data(), want.data(), n * sizeof(__nv_bfloat16)) == 0;
      const double ms = time_ms(launch, 2, 20);
      std::printf("variant bwd mma %-28s %9.3f ms %9.1f TF/s  %s\n", name, ms, bwd_flops / (ms * 1e-3) / 1e12,
                  same ? "dq bitwise equal to the default" : "DQ DIFFERS FROM THE DEFAULT");
    };
    variant("dq 64 keys, 1 block/SM bound", [&] {
      fd::backward_mma_launch<D, false, 64, 1>(params, dq, dk, dv, delta, dout, q, k, v, lse, nullptr);
    });
    variant("dq 32 keys, 2 blocks/SM", [&] {
      fd::backward_mma_launch<D, false, 32, 2>(params, dq, dk, dv, delta, dout, q, k, v, lse, nullptr);
    });
    variant("dq 32 keys, 3 blocks/SM", [&] {
      fd::backward_mma_launch<D, false, 32, 3>(params, dq, dk, dv, delta, dout, q, k, v, lse, nullptr);
    });
  }

  std::printf("%s", summary.c_str());  // lines starting with "summary:" go into dev/gpu/check.sh's table

  for (__nv_bfloat16* p : {q, k, v, out, dout, dq, dk, dv}) CUDA_CHECK(cudaFree(p));
  CUDA_CHECK(cudaFree(lse));
  CUDA_CHECK(cudaFree(delta));
  return 0;
}
