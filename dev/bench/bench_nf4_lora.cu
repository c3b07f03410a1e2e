// Benchmark: NF4 (QLoRA) and LoRA kernels at a Llama-style MLP projection, 4096 tokens x 2048 -> 5632,
// adapter rank 16, bf16 storage: NF4 quantisation and dequantisation in GB/s, the frozen NF4 linear layer
// (dequantise + cuBLASLt GEMM) in TFLOP/s next to the plain bf16 GEMM of the same shape, and the LoRA
// adapter's forward + backward, alone and as part of a whole QLoRA layer.
//
// Build and run from the repository root (dev/gpu/check.sh does this, with its own -o and -arch):
// clang-format off
//   nvcc -O3 -std=c++17 -arch=native -I. -o build-gpu/bench_nf4_lora dev/bench/bench_nf4_lora.cu kernels/nf4.cu kernels/lora.cu kernels/matmul.cu -lcublasLt -lcublas
// clang-format on
//   ./build-gpu/bench_nf4_lora            (add --quick for fewer repetitions)
//
// Floors (DESIGN.md, "Performance method"), both measured in this run rather than taken from a datasheet:
//   bandwidth    a device-to-device cudaMemcpy of 1 GiB (read + write): the practical floor for the
//                memory-bound NF4 kernels. Bytes are the minimum each must move: dequantise reads n/2
//                bytes of codes and 4 n/64 of absmax and writes n sizeof(T); quantise reads 2 n (bf16)
//                and writes the codes and absmax.
//   GEMM rate    the same layer as a dense bf16 matmul_forward (x W^T): what the NF4 layer would cost if
//                its weight were already unpacked. The NF4 layer pays the dequantisation on top (the fast
//                fused dequant-GEMM is still to come, see kernels/nf4.cuh).
// FLOP conventions: linear forward 2 N I O, input gradient 2 N I O; LoRA forward 2 N r (I + O) (h and the
// up-projection), backward 4 N r (I + O) (dB, dh, dA, dx~); a QLoRA layer's fwd+bwd is the frozen NF4
// layer's forward and input gradient plus the adapter's: 4 N I O + 6 N r (I + O) (no weight gradient for
// the frozen base). The adapter alone is memory-bound (it reads x [N, I] and writes dx [N, I] several
// times for 3 GFLOP), so its TFLOP/s is low by nature; the number that matters is its time next to the
// base layer's.
//
// Timing: CUDA events around each call, after warm-up; the median of the repetitions. Inputs are random
// (never zeros); the large dequantisation buffer is bigger than the L2 cache.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "dev/bench/bench_common.cuh"
#include "kernels/cuda_common.cuh"
#include "kernels/kernel_utils.cuh"
#include "kernels/lora.cuh"
#include "kernels/matmul.cuh"
#include "kernels/nf4.cuh"

namespace {

using bf16 = __nv_bfloat16;
using llm::cuda::KernelVariant;

constexpr int kTokens = 4096;    // N
constexpr int kIn = 2048;        // I (d_model)
constexpr int kOut = 5632;       // O (d_ff of a 1B Llama-style MLP)
constexpr int kRank = 16;        // r
constexpr int kLargeLayers = 8;  // the large dequantisation buffer: 8 such weights, 92M values

using bench::Buffer;
using bench::fill_uniform_kernel;
using bench::g_reps;
using bench::g_warmup;
using bench::time_ms;

double g_copy_gbps = 0.0;    // measured device-to-device copy bandwidth
double g_gemm_tflops = 0.0;  // measured dense bf16 GEMM rate at the layer's shape

double report_bytes(const char* what, double bytes, double ms) {
  const double gbps = bytes / (ms * 1e-3) / 1e9;
  std::printf("%-52s %9.3f ms %8.1f GB/s  %5.1f%% of copy\n", what, ms, gbps, 100.0 * gbps / g_copy_gbps);
  return gbps;
}

double report_flops(const char* what, double flops, double ms) {
  const double tflops = flops / (ms * 1e-3) / 1e12;
  std::printf("%-52s %9.3f ms %8.1f TFLOP/s  %5.1f%% of the bf16 GEMM rate\n", what, ms, tflops,
              100.0 * tflops / g_gemm_tflops);
  return tflops;
}

void bench_copy() {
  const size_t bytes = size_t{1} << 30;
  Buffer<char> a(bytes), b(bytes);
  CUDA_CHECK(cudaMemset(a.ptr, 1, bytes));
  const double ms =
      time_ms([&] { CUDA_CHECK(cudaMemcpyAsync(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice, nullptr)); });
  g_copy_gbps = 2.0 * bytes / (ms * 1e-3) / 1e9;
  std::printf("device-to-device copy: %.1f GB/s (read + write), the bandwidth floor below\n", g_copy_gbps);
}

struct Results {
  double dequant_gbps = 0, linear_fwd_tflops = 0, lora_ms = 0, lora_tflops = 0, lora_share = 0, qlora_ms = 0,
         qlora_tflops = 0, dense_lora_ms = 0;
};

// NF4 quantisation and dequantisation, at the layer's shape and over a buffer larger than L2.
void bench_nf4_memory(Results* res) {
  std::printf("\n== NF4 quantise / dequantise, blocksize 64 ==\n");
  for (int layers : {1, kLargeLayers}) {
    const size_t n = static_cast<size_t>(layers) * kOut * kIn;
    const size_t nbytes = llm::cuda::nf4_packed_bytes(n), nblocks = llm::cuda::nf4_blocks(n, 64);
    Buffer<bf16> w(n), w_out(n);
    Buffer<float> w_out32(n), absmax(nblocks);
    Buffer<uint8_t> packed(nbytes);
    w.fill(1, 0.05f);
    const double meta = static_cast<double>(nbytes) + 4.0 * nblocks;  // codes + absmax
    char what[128];
    std::snprintf(what, sizeof(what), "quantise bf16 -> nf4, %zu M weights", n >> 20);
    report_bytes(what, 2.0 * n + meta, time_ms([&] {
                   llm::cuda::nf4_quantize<bf16>(packed.ptr, absmax.ptr, w.ptr, n, 64, nullptr);
                 }));
    for (KernelVariant v : {KernelVariant::kClear, KernelVariant::kFast}) {
      const char* name = v == KernelVariant::kClear ? "clear" : "fast";
      std::snprintf(what, sizeof(what), "dequantise nf4 -> bf16, %zu M weights, %s", n >> 20, name);
      const double gbps = report_bytes(what, meta + 2.0 * n, time_ms([&] {
                                         llm::cuda::nf4_dequantize<bf16>(w_out.ptr, packed.ptr, absmax.ptr, n,
                                                                         64, nullptr, v);
                                       }));
      if (layers == kLargeLayers && v == KernelVariant::kFast) res->dequant_gbps = gbps;
      std::snprintf(what, sizeof(what), "dequantise nf4 -> fp32, %zu M weights, %s", n >> 20, name);
      report_bytes(what, meta + 4.0 * n, time_ms([&] {
                     llm::cuda::nf4_dequantize<float>(w_out32.ptr, packed.ptr, absmax.ptr, n, 64, nullptr, v);
                   }));
    }
  }
}

// The frozen NF4 layer, the adapter, and a whole QLoRA layer, each next to its dense bf16 twin.
void bench_layers(Results* res, float dropout_p) {
  const int N = kTokens, I = kIn, O = kOut, r = kRank;
  const size_t nw = static_cast<size_t>(O) * I, nx = static_cast<size_t>(N) * I,
               ny = static_cast<size_t>(N) * O;
  Buffer<bf16> x(nx), w(nw), out(ny), dout(ny), dx(nx), scratch(llm::cuda::nf4_linear_scratch_elements(I, O));
  Buffer<bf16> A(static_cast<size_t>(r) * I), B(static_cast<size_t>(O) * r), h(static_cast<size_t>(N) * r),
      dh(static_cast<size_t>(N) * r), x_dropped(nx), work(nx);
  Buffer<float> dA(static_cast<size_t>(r) * I), dB(static_cast<size_t>(O) * r),
      absmax(llm::cuda::nf4_blocks(nw, 64));
  Buffer<uint8_t> packed(llm::cuda::nf4_packed_bytes(nw));
  x.fill(2, 1.0f);
  w.fill(3, 0.05f);
  dout.fill(4, 1.0f);
  A.fill(5, 0.02f);
  B.fill(6, 0.02f);
  dA.fill(7, 0.0f);
  dB.fill(8, 0.0f);
  llm::cuda::nf4_quantize<bf16>(packed.ptr, absmax.ptr, w.ptr, nw, 64, nullptr);
  const float scale = 32.0f / r;
  const uint64_t seed = 1234, stream_id = 5;
  const double nio = static_cast<double>(N) * I * O;
  const double lora_flops = 6.0 * N * r * (static_cast<double>(I) + O);

  std::printf("\n== layer N=%d I=%d O=%d, bf16 storage, fp32 LoRA gradients, rank %d, dropout %.2f ==\n", N,
              I, O, r, dropout_p);
  const double gemm_ms =
      time_ms([&] { llm::cuda::matmul_forward<bf16>(out.ptr, x.ptr, w.ptr, nullptr, N, I, O, nullptr); });
  g_gemm_tflops = 2.0 * nio / (gemm_ms * 1e-3) / 1e12;
  report_flops("dense bf16 forward x W^T (the GEMM twin)", 2.0 * nio, gemm_ms);
  const double dense_dx_ms = time_ms([&] {
    llm::cuda::matmul_backward<bf16, bf16>(dx.ptr, nullptr, nullptr, dout.ptr, x.ptr, w.ptr, N, I, O, false,
                                           nullptr);
  });
  report_flops("dense bf16 input gradient G W", 2.0 * nio, dense_dx_ms);
  const double nf4_fwd_ms = time_ms([&] {
    llm::cuda::nf4_linear_forward<bf16>(out.ptr, scratch.ptr, x.ptr, packed.ptr, absmax.ptr, nullptr, N, I, O,
                                        64, nullptr);
  });
  const double fwd_tflops = report_flops("nf4 linear forward (dequantise + GEMM)", 2.0 * nio, nf4_fwd_ms);
  if (dropout_p > 0.0f) res->linear_fwd_tflops = fwd_tflops;
  const double nf4_dx_ms = time_ms([&] {
    llm::cuda::nf4_linear_backward_input<bf16>(dx.ptr, scratch.ptr, dout.ptr, packed.ptr, absmax.ptr, N, I, O,
                                               64, false, nullptr);
  });
  report_flops("nf4 linear input gradient (dequantise + GEMM)", 2.0 * nio, nf4_dx_ms);

  auto lora_fwd = [&] {
    llm::cuda::lora_forward<bf16>(out.ptr, h.ptr, x_dropped.ptr, x.ptr, A.ptr, B.ptr, N, I, O, r, scale,
                                  dropout_p, seed, stream_id, nullptr);
  };
  auto lora_bwd = [&] {
    llm::cuda::lora_backward<bf16, float>(dx.ptr, dA.ptr, dB.ptr, dh.ptr, work.ptr, dout.ptr, x.ptr, h.ptr,
                                          A.ptr, B.ptr, N, I, O, r, scale, dropout_p, seed, stream_id, true,
                                          nullptr);
  };
  report_flops("lora forward (adapter only)", 2.0 * N * r * (static_cast<double>(I) + O), time_ms(lora_fwd));
  report_flops("lora backward (adapter only: dB, dh, dA, dx +=)", 4.0 * N * r * (static_cast<double>(I) + O),
               time_ms(lora_bwd));
  const double lora_ms = time_ms([&] {
    lora_fwd();
    lora_bwd();
  });
  const double lora_tflops = report_flops("lora forward + backward (adapter only)", lora_flops, lora_ms);
  const double qlora_ms = time_ms([&] {
    llm::cuda::nf4_linear_forward<bf16>(out.ptr, scratch.ptr, x.ptr, packed.ptr, absmax.ptr, nullptr, N, I, O,
                                        64, nullptr);
    lora_fwd();
    llm::cuda::nf4_linear_backward_input<bf16>(dx.ptr, scratch.ptr, dout.ptr, packed.ptr, absmax.ptr, N, I, O,
                                               64, false, nullptr);
    lora_bwd();
  });
  const double qlora_tflops =
      report_flops("qlora layer fwd + bwd (nf4 base + adapter)", 4.0 * nio + lora_flops, qlora_ms);
  const double dense_lora_ms = time_ms([&] {
    llm::cuda::matmul_forward<bf16>(out.ptr, x.ptr, w.ptr, nullptr, N, I, O, nullptr);
    lora_fwd();
    llm::cuda::matmul_backward<bf16, bf16>(dx.ptr, nullptr, nullptr, dout.ptr, x.ptr, w.ptr, N, I, O, false,
                                           nullptr);
    lora_bwd();
  });
  report_flops("bf16 lora layer fwd + bwd (dense base + adapter)", 4.0 * nio + lora_flops, dense_lora_ms);
  const double share = 100.0 * lora_ms / (gemm_ms + dense_dx_ms);
  std::printf("adapter time = %.1f%% of the dense base GEMMs (its FLOPs: %.1f%%)\n", share,
              100.0 * lora_flops / (4.0 * nio));
  if (dropout_p > 0.0f) {
    res->lora_ms = lora_ms;
    res->lora_tflops = lora_tflops;
    res->lora_share = share;
    res->qlora_ms = qlora_ms;
    res->qlora_tflops = qlora_tflops;
    res->dense_lora_ms = dense_lora_ms;
  }
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
    std::printf("bench_nf4_lora: no usable GPU\n");
    return 1;
  }
  std::printf("device: %s (sm_%d%d, %d SMs, %.1f GiB)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, static_cast<double>(prop.totalGlobalMem) / (1 << 30));
  try {
    Results res;
    bench_copy();
    bench_nf4_memory(&res);
    bench_layers(&res, 0.0f);
    bench_layers(&res, 0.1f);
    if (llm::cuda::gemm_fallback_count() != 0) {
      std::printf("WARNING: %lld GEMM(s) found no cuBLASLt algorithm and ran on the tiled kernel\n",
                  llm::cuda::gemm_fallback_count());
    }
    std::printf(
        "\nsummary: nf4 dequantise -> bf16 (%dM weights, fast): %.0f GB/s = %.0f%% of copy (%.0f GB/s)\n",
        kLargeLayers * kOut * kIn >> 20, res.dequant_gbps, 100.0 * res.dequant_gbps / g_copy_gbps,
        g_copy_gbps);
    std::printf("summary: nf4 linear fwd %dx%d->%d: %.0f TFLOP/s = %.0f%% of the bf16 GEMM (%.0f TFLOP/s)\n",
                kTokens, kIn, kOut, res.linear_fwd_tflops, 100.0 * res.linear_fwd_tflops / g_gemm_tflops,
                g_gemm_tflops);
    std::printf("summary: lora r=%d fwd+bwd (p=0.1): %.3f ms, %.1f TFLOP/s, %.1f%% of the base GEMMs' time\n",
                kRank, res.lora_ms, res.lora_tflops, res.lora_share);
    std::printf("summary: qlora layer fwd+bwd: %.3f ms, %.0f TFLOP/s (bf16 lora layer: %.3f ms)\n",
                res.qlora_ms, res.qlora_tflops, res.dense_lora_ms);
  } catch (const std::exception& e) {
    std::printf("bench_nf4_lora: %s\n", e.what());
    return 1;
  }
  return 0;
}
