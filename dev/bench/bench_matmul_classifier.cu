// Benchmark: cuBLASLt matmuls, the tiled teaching kernel, and the fused classifier, each as a percentage of
// the measured floor (DESIGN.md, "Performance method").
//
// Build and run from the repository root (dev/gpu/check.sh does this, with its own -o):
// clang-format off
//   nvcc -O3 -std=c++17 -arch=native -I. -o build-gpu/bench_matmul_classifier dev/bench/bench_matmul_classifier.cu kernels/matmul.cu kernels/classifier.cu -lcublasLt -lcublas
// clang-format on
//   ./build-gpu/bench_matmul_classifier            (add --quick for fewer repetitions)
//
// The floor. The tensor-core rate is measured here, not taken from a datasheet: a bf16 8192^3 GEMM
// through cuBLASLt (fp32 accumulation), the "x W^T" layout the forward pass uses. Every other number is a
// percentage of what that rate allows for the same FLOPs:
//   linear layer   forward 2 N I O, backward 4 N I O FLOPs (dx and dW)
//   classifier     forward 2 N d V, forward + backward 6 N d V FLOPs (logits, dh, dW)
// The classifier also moves the logits about five times (5 N V * 2 bytes, ~10 GB at 8K x 128K) and
// reads and writes dW once per chunk; the chunk sweep shows how the chunk size trades the scratch memory
// against that traffic and against the GEMM sizes. Chunk = N is the unchunked layout (full logits).
//
// Timing: CUDA events around each call, after warm-up; the median of the repetitions. Inputs are random
// (never zeros), and every buffer is larger than the L2 cache.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "dev/bench/bench_common.cuh"
#include "kernels/classifier.cuh"
#include "kernels/cuda_common.cuh"
#include "kernels/matmul.cuh"

namespace {

using bf16 = __nv_bfloat16;
using llm::cuda::GemmEngine;

__global__ void fill_targets_kernel(int32_t* targets, int n, int V, uint32_t seed) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    uint32_t x = static_cast<uint32_t>(i) * 2246822519u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    targets[i] = (i % 10 == 9) ? -100 : static_cast<int32_t>(x % static_cast<uint32_t>(V));  // 10% ignored
  }
}

using bench::Buffer;
using bench::fill_uniform_kernel;
using bench::g_reps;
using bench::g_warmup;
using bench::time_ms;

double g_floor_tflops = 0.0;  // the measured bf16 GEMM rate

void report(const char* what, double flops, double ms) {
  const double tflops = flops / (ms * 1e-3) / 1e12;
  const double floor_ms = flops / (g_floor_tflops * 1e12) * 1e3;
  std::printf("%-58s %9.3f ms %8.1f TFLOP/s  floor %8.3f ms  %5.1f%% of floor\n", what, ms, tflops, floor_ms,
              100.0 * floor_ms / ms);
}

void bench_gemm_floor() {
  const int n = 8192;
  Buffer<bf16> a(static_cast<size_t>(n) * n), b(static_cast<size_t>(n) * n), c(static_cast<size_t>(n) * n);
  a.fill(1, 1.0f);
  b.fill(2, 1.0f);
  const double flops = 2.0 * n * n * static_cast<double>(n);
  struct Layout {
    const char* name;
    bool ta, tb;
  };
  const Layout layouts[] = {
      {"NT (x W^T, forward)", false, true}, {"NN (G W, dx)", false, false}, {"TN (G^T x, dW)", true, false}};
  std::printf("\n== bf16 GEMM 8192^3 through cuBLASLt (fp32 accumulation) ==\n");
  for (const Layout& l : layouts) {
    const double ms = time_ms([&] {
      llm::cuda::gemm<bf16, bf16>(c.ptr, a.ptr, b.ptr, nullptr, n, n, n, n, n, n, l.ta, l.tb, 1.0f, 0.0f,
                                  nullptr);
    });
    const double tflops = flops / (ms * 1e-3) / 1e12;
    if (l.ta == false && l.tb == true) g_floor_tflops = tflops;
    std::printf("%-30s %9.3f ms %8.1f TFLOP/s\n", l.name, ms, tflops);
  }
  std::printf("floor rate (NT): %.1f TFLOP/s\n", g_floor_tflops);
}

void bench_linear() {
  const int N = 8192, I = 2048, O = 8192;
  Buffer<bf16> x(static_cast<size_t>(N) * I), w(static_cast<size_t>(O) * I), b(O),
      out(static_cast<size_t>(N) * O), dout(static_cast<size_t>(N) * O), dx(static_cast<size_t>(N) * I);
  Buffer<float> dw(static_cast<size_t>(O) * I), db(O);
  x.fill(3, 1.0f);
  w.fill(4, 0.05f);
  b.fill(5, 0.1f);
  dout.fill(6, 1.0f);
  dw.fill(7, 0.0f);
  db.fill(8, 0.0f);
  std::printf("\n== linear layer N=%d I=%d O=%d, bf16, fp32 weight gradients ==\n", N, I, O);
  const double mnk = static_cast<double>(N) * I * O;
  report("forward (x W^T + b)", 2 * mnk,
         time_ms([&] { llm::cuda::matmul_forward<bf16>(out.ptr, x.ptr, w.ptr, b.ptr, N, I, O, nullptr); }));
  report("backward (dx, dW +=, db +=)", 4 * mnk, time_ms([&] {
           llm::cuda::matmul_backward<bf16, float>(dx.ptr, dw.ptr, db.ptr, dout.ptr, x.ptr, w.ptr, N, I, O,
                                                   false, nullptr);
         }));
  const double sum_ms =
      time_ms([&] { llm::cuda::column_sum_accumulate<bf16, float>(db.ptr, dout.ptr, N, O, nullptr); });
  const double bytes = static_cast<double>(N) * O * sizeof(bf16);
  std::printf("%-58s %9.3f ms %8.1f GB/s (bias gradient alone: reads dout once)\n", "column sums (db)",
              sum_ms, bytes / (sum_ms * 1e-3) / 1e9);
}

void bench_tiled() {
  const int n = 2048;
  Buffer<bf16> a(static_cast<size_t>(n) * n), b(static_cast<size_t>(n) * n), c(static_cast<size_t>(n) * n);
  a.fill(9, 1.0f);
  b.fill(10, 1.0f);
  std::printf("\n== the tiled teaching kernel vs cuBLASLt, bf16 %d^3 ==\n", n);
  const double flops = 2.0 * n * n * static_cast<double>(n);
  for (GemmEngine e : {GemmEngine::kTiled, GemmEngine::kCublasLt}) {
    report(e == GemmEngine::kTiled ? "tiled 16x16 (NT)" : "cuBLASLt (NT)", flops, time_ms([&] {
             llm::cuda::gemm<bf16, bf16>(c.ptr, a.ptr, b.ptr, nullptr, n, n, n, n, n, n, false, true, 1.0f,
                                         0.0f, nullptr, e);
           }));
  }
}

// Returns the fwd+bwd time of the best chunk size.
double bench_classifier(int N, int d, int V, const std::vector<int>& chunks, bool fp32_dw, bool forward_too) {
  Buffer<bf16> h(static_cast<size_t>(N) * d), w(static_cast<size_t>(V) * d), dh(static_cast<size_t>(N) * d);
  Buffer<float> dw32(fp32_dw ? static_cast<size_t>(V) * d : 0);
  Buffer<bf16> dw16(fp32_dw ? 0 : static_cast<size_t>(V) * d);
  Buffer<int32_t> targets(N);
  Buffer<float> logprobs(N), lse(N), loss(1);
  h.fill(11, 1.0f);
  w.fill(12, 0.05f);
  if (fp32_dw) dw32.fill(13, 0.0f);
  if (!fp32_dw) dw16.fill(13, 0.0f);
  fill_targets_kernel<<<llm::cuda::ceil_div(N, 256), 256>>>(targets.ptr, N, V, 14);
  CUDA_CHECK_LAUNCH();
  const int max_chunk = *std::max_element(chunks.begin(), chunks.end());
  Buffer<bf16> scratch(llm::cuda::classifier_scratch_elements(max_chunk, V));
  const double ndv = static_cast<double>(N) * d * V;
  std::printf("\n== classifier N=%d d=%d V=%d, bf16, %s weight gradient ==\n", N, d, V,
              fp32_dw ? "fp32" : "bf16");
  double best = 1e30;
  for (int chunk : chunks) {
    const double scratch_gb = static_cast<double>(llm::cuda::classifier_scratch_elements(chunk, V)) * 2 / 1e9;
    char what[128];
    std::snprintf(what, sizeof(what), "fwd+bwd, chunk %5d rows (scratch %.2f GB)", chunk, scratch_gb);
    const double ms = time_ms([&] {
      if (fp32_dw) {
        llm::cuda::classifier_forward_backward<bf16, float>(dh.ptr, dw32.ptr, logprobs.ptr, lse.ptr, loss.ptr,
                                                            h.ptr, w.ptr, targets.ptr, nullptr, -1.0f / N,
                                                            scratch.ptr, chunk, N, d, V, nullptr);
      } else {
        llm::cuda::classifier_forward_backward<bf16, bf16>(dh.ptr, dw16.ptr, logprobs.ptr, lse.ptr, loss.ptr,
                                                           h.ptr, w.ptr, targets.ptr, nullptr, -1.0f / N,
                                                           scratch.ptr, chunk, N, d, V, nullptr);
      }
    });
    report(what, 6 * ndv, ms);
    best = std::min(best, ms);
  }
  if (forward_too) {
    const int chunk = chunks.front();
    char what[128];
    std::snprintf(what, sizeof(what), "forward only, chunk %5d rows", chunk);
    report(what, 2 * ndv, time_ms([&] {
             llm::cuda::classifier_forward<bf16>(logprobs.ptr, lse.ptr, loss.ptr, h.ptr, w.ptr, targets.ptr,
                                                 scratch.ptr, chunk, N, d, V, nullptr);
           }));
  }
  float host_loss = 0.0f;
  CUDA_CHECK(cudaMemcpy(&host_loss, loss.ptr, sizeof(float), cudaMemcpyDeviceToHost));
  std::printf("loss %.4f (random inputs: expect about log V = %.4f), %s\n", host_loss,
              std::log(static_cast<double>(V)), std::isfinite(host_loss) ? "finite" : "NOT FINITE");
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      g_warmup = 1;
      g_reps = 3;
    }
  }
  int device = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    std::printf("bench_matmul_classifier: no usable GPU\n");
    return 1;
  }
  std::printf("device: %s (sm_%d%d, %d SMs, %.1f GiB)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, static_cast<double>(prop.totalGlobalMem) / (1 << 30));
  try {
    bench_gemm_floor();
    bench_linear();
    bench_tiled();
    const int N = 8192, d = 2048, V = 131072;
    const double best = bench_classifier(N, d, V, {1024, 2048, 4096, 8192}, true, true);
    bench_classifier(N, d, V, {4096}, false, false);
    const double odd_ms = bench_classifier(N, d, 152061, {2048}, true, false);
    const double floor_ms = 6.0 * N * d * V / (g_floor_tflops * 1e12) * 1e3;
    const double odd_floor_ms = 6.0 * N * d * 152061 / (g_floor_tflops * 1e12) * 1e3;
    if (llm::cuda::gemm_fallback_count() != 0) {
      std::printf("WARNING: %lld GEMM(s) found no cuBLASLt algorithm and ran on the tiled kernel\n",
                  llm::cuda::gemm_fallback_count());
    }
    std::printf("\nsummary: bf16 GEMM 8192^3 %.0f TFLOP/s (the floor rate)\n", g_floor_tflops);
    std::printf("summary: classifier fwd+bwd 8Kx2048x128K best %.2f ms = %.0f%% of GEMM floor (%.2f ms)\n",
                best, 100.0 * floor_ms / best, floor_ms);
    std::printf("summary: classifier fwd+bwd V=152061 chunk 2048: %.2f ms = %.0f%% of floor\n", odd_ms,
                100.0 * odd_floor_ms / odd_ms);
  } catch (const std::exception& e) {
    std::printf("bench_matmul_classifier: %s\n", e.what());
    return 1;
  }
  return 0;
}
