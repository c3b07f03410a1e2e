// Benchmarks of the memory-bound kernels (embedding, positions, norms, activations, dropout, AdamW) at
// 16K tokens x 2048 hidden, bf16 storage. Each kernel is timed in its clear and fast variants and
// reported as achieved GB/s and as a percentage of the device-to-device copy bandwidth measured in the same
// run (the practical floor for a memory-bound kernel; see "Performance method" in /work/shared/DESIGN.md).
//
// Bytes are the minimum a kernel must move: every input read once and every output written once
// (read-modify-write counts twice); small tables count once. Achieved GB/s = bytes / time.
//
// Build and run from the repository root (not part of the CMake build):
//   nvcc -O2 -std=c++17 -arch=sm_90 -I. dev/bench/bench_memory_kernels.cu -o bench_memory_kernels &&
//   ./bench_memory_kernels
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "kernels/activations.cuh"
#include "kernels/adamw.cuh"
#include "kernels/dropout.cuh"
#include "kernels/embedding.cuh"
#include "kernels/norms.cuh"
#include "kernels/positions.cuh"

namespace {

using bf16 = __nv_bfloat16;
using llm::cuda::KernelVariant;

constexpr int kN = 16384;  // tokens
constexpr int kC = 2048;   // hidden
constexpr int kV = 50257;  // vocabulary (GPT-2)
constexpr int kMaxT = 2048;
constexpr int kHeads = 16, kKvHeads = 16, kHeadDim = 128;
constexpr int kHidden = 4 * kC;  // MLP width for the activations
constexpr int kWarmup = 3, kIters = 20;

// Fills a buffer with values in [-0.5, 0.5) from a hash of the index (no NaNs, no denormals).
template <typename T>
__global__ void fill_kernel(T* p, size_t n, uint32_t salt) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ salt;
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  p[i] = llm::cuda::from_float<T>(static_cast<float>(h & 0xffffu) / 65536.0f - 0.5f);
}

template <typename T>
T* alloc(size_t n, uint32_t salt) {
  T* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, n * sizeof(T)));
  fill_kernel<<<llm::cuda::ceil_div(static_cast<long long>(n), 256), 256>>>(p, n, salt);
  CUDA_CHECK_LAUNCH();
  return p;
}

// Mean time of one call in milliseconds, over kIters back-to-back calls: events around each call (a
// median) would add the launch gap to kernels of tens of microseconds.
float time_ms(const std::function<void()>& fn) {
  for (int i = 0; i < kWarmup; ++i) fn();
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  CUDA_CHECK(cudaEventRecord(start));
  for (int i = 0; i < kIters; ++i) fn();
  CUDA_CHECK(cudaEventRecord(stop));
  CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.0f;
  CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  return ms / kIters;
}

double g_copy_gbps = 0.0;
std::vector<std::pair<double, std::string>> g_fast_pct;  // the fast variants' % of copy, for the summary

double report(const char* name, const char* variant, double bytes, float ms) {
  const double gbps = bytes / (ms * 1e-3) / 1e9;
  std::printf("%-34s %-6s %9.1f us %8.1f GB/s %6.1f %%\n", name, variant, ms * 1e3, gbps,
              100.0 * gbps / g_copy_gbps);
  return 100.0 * gbps / g_copy_gbps;
}

// Times fn(variant) for the clear and the fast variant.
void bench(const char* name, double bytes, const std::function<void(KernelVariant)>& fn) {
  report(name, "clear", bytes, time_ms([&] { fn(KernelVariant::kClear); }));
  g_fast_pct.emplace_back(report(name, "fast", bytes, time_ms([&] { fn(KernelVariant::kFast); })), name);
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s; N = %d tokens, C = %d, bf16 storage, %d timed iterations\n", prop.name, kN, kC,
              kIters);

  const size_t NC = static_cast<size_t>(kN) * kC;
  const double s = sizeof(bf16);

  // The floor: a device-to-device copy of 1 GiB (read + write).
  {
    const size_t bytes = size_t{1} << 30;
    char *a = nullptr, *b = nullptr;
    CUDA_CHECK(cudaMalloc(&a, bytes));
    CUDA_CHECK(cudaMalloc(&b, bytes));
    CUDA_CHECK(cudaMemset(a, 1, bytes));
    const float ms = time_ms([&] { CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
    g_copy_gbps = 2.0 * bytes / (ms * 1e-3) / 1e9;
    std::printf("device-to-device copy: %.1f GB/s (read + write), the 100 %% mark below\n\n", g_copy_gbps);
    CUDA_CHECK(cudaFree(a));
    CUDA_CHECK(cudaFree(b));
  }
  std::printf("%-34s %-6s %12s %13s %8s\n", "kernel", "var", "time", "achieved", "of copy");

  // Token embedding.
  {
    std::vector<int32_t> tokens(kN);
    std::mt19937 gen(1);
    std::uniform_int_distribution<int> dist(0, kV - 1);
    for (int32_t& t : tokens) t = dist(gen);
    const double distinct = static_cast<double>(std::set<int32_t>(tokens.begin(), tokens.end()).size());
    int32_t* d_tokens = nullptr;
    CUDA_CHECK(cudaMalloc(&d_tokens, kN * sizeof(int32_t)));
    CUDA_CHECK(cudaMemcpy(d_tokens, tokens.data(), kN * sizeof(int32_t), cudaMemcpyHostToDevice));
    bf16* table = alloc<bf16>(static_cast<size_t>(kV) * kC, 1);
    bf16* dtable = alloc<bf16>(static_cast<size_t>(kV) * kC, 2);
    bf16* out = alloc<bf16>(NC, 3);
    const size_t scratch_bytes = llm::cuda::embedding_backward_scratch_bytes(kN, kV);
    void* scratch = nullptr;
    CUDA_CHECK(cudaMalloc(&scratch, scratch_bytes));
    // The minimum: each distinct table row read once, out written, tokens read.
    bench("embedding_forward", (distinct + kN) * kC * s + kN * 4.0, [&](KernelVariant v) {
      llm::cuda::embedding_forward(out, d_tokens, table, kN, kC, kV, nullptr, v);
    });
    // dout read once, each touched table row read and written; the sort's key traffic is left out.
    bench("embedding_backward", NC * s + 2.0 * distinct * kC * s, [&](KernelVariant v) {
      llm::cuda::embedding_backward(dtable, out, d_tokens, kN, kC, kV, scratch, scratch_bytes, nullptr, v);
    });
    CUDA_CHECK(cudaFree(scratch));
    CUDA_CHECK(cudaFree(d_tokens));
    CUDA_CHECK(cudaFree(table));
    CUDA_CHECK(cudaFree(dtable));
    CUDA_CHECK(cudaFree(out));
  }

  // Positions: learned add (x read and written, table read once) and RoPE on q and k together.
  {
    std::vector<int32_t> pos(kN);
    for (int n = 0; n < kN; ++n) pos[n] = n % kMaxT;
    int32_t* d_pos = nullptr;
    CUDA_CHECK(cudaMalloc(&d_pos, kN * sizeof(int32_t)));
    CUDA_CHECK(cudaMemcpy(d_pos, pos.data(), kN * sizeof(int32_t), cudaMemcpyHostToDevice));
    bf16* x = alloc<bf16>(NC, 4);
    bf16* wpe = alloc<bf16>(static_cast<size_t>(kMaxT) * kC, 5);
    bench("add_position_embedding_forward", 2.0 * NC * s + static_cast<double>(kMaxT) * kC * s,
          [&](KernelVariant v) {
            llm::cuda::add_position_embedding_forward(x, wpe, d_pos, kN, kC, kMaxT, nullptr, v);
          });

    llm::ref::RopeParams params;
    params.head_dim = kHeadDim;
    float *cos_table = nullptr, *sin_table = nullptr;
    const size_t table_size = static_cast<size_t>(kMaxT) * kHeadDim / 2;
    CUDA_CHECK(cudaMalloc(&cos_table, table_size * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&sin_table, table_size * sizeof(float)));
    llm::cuda::upload_rope_tables(cos_table, sin_table, params, kMaxT, nullptr);
    const size_t nq = static_cast<size_t>(kN) * kHeads * kHeadDim,
                 nk = static_cast<size_t>(kN) * kKvHeads * kHeadDim;
    bf16* q = alloc<bf16>(nq, 6);
    bf16* k = alloc<bf16>(nk, 7);
    const double rope_bytes = 2.0 * (nq + nk) * s + 2.0 * table_size * 4.0;
    bench("rope_forward (q and k, in place)", rope_bytes, [&](KernelVariant v) {
      llm::cuda::rope_forward(q, k, q, k, cos_table, sin_table, d_pos, kN, kHeads, kKvHeads, kHeadDim, 0, 0,
                              kMaxT, nullptr, v);
    });
    bench("rope_backward (q and k, in place)", rope_bytes, [&](KernelVariant v) {
      llm::cuda::rope_backward(q, k, q, k, cos_table, sin_table, d_pos, kN, kHeads, kKvHeads, kHeadDim, 0, 0,
                               kMaxT, nullptr, v);
    });
    CUDA_CHECK(cudaFree(d_pos));
    CUDA_CHECK(cudaFree(x));
    CUDA_CHECK(cudaFree(wpe));
    CUDA_CHECK(cudaFree(cos_table));
    CUDA_CHECK(cudaFree(sin_table));
    CUDA_CHECK(cudaFree(q));
    CUDA_CHECK(cudaFree(k));
  }

  // Norms fused with the residual add.
  {
    bf16* residual_in = alloc<bf16>(NC, 8);
    bf16* branch = alloc<bf16>(NC, 9);
    bf16* residual_out = alloc<bf16>(NC, 10);
    bf16* out = alloc<bf16>(NC, 11);
    bf16* d_residual = alloc<bf16>(NC, 12);
    bf16* weight = alloc<bf16>(kC, 13);
    bf16* bias = alloc<bf16>(kC, 14);
    bf16* dweight = alloc<bf16>(kC, 15);
    bf16* dbias = alloc<bf16>(kC, 16);
    float *mean = nullptr, *rstd = nullptr, *scratch = nullptr;
    const size_t scratch_floats = llm::cuda::norm_backward_scratch_floats(kN, kC);
    CUDA_CHECK(cudaMalloc(&mean, kN * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&rstd, kN * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&scratch, scratch_floats * sizeof(float)));
    // Forward: residual_in and branch read, residual_out and out written. Backward: dout, x read, d_residual
    // read and written, plus the partials written and read once. LayerNorm saves mean and rstd and has
    // dweight and dbias partials (scratch_floats); RMSNorm has rstd and the dweight half only.
    const double fwd_bytes = 4.0 * NC * s + 8.0 * kN;
    const double bwd_bytes = 4.0 * NC * s + 8.0 * kN + 2.0 * scratch_floats * 4.0;
    const double rms_fwd_bytes = 4.0 * NC * s + 4.0 * kN;
    const double rms_bwd_bytes = 4.0 * NC * s + 4.0 * kN + scratch_floats * 4.0;
    bench("residual_layernorm_forward", fwd_bytes, [&](KernelVariant v) {
      llm::cuda::residual_layernorm_forward(residual_out, out, mean, rstd, residual_in, branch, weight, bias,
                                            kN, kC, 1e-5f, nullptr, v);
    });
    bench("residual_layernorm_backward", bwd_bytes, [&](KernelVariant v) {
      llm::cuda::residual_layernorm_backward(d_residual, dweight, dbias, scratch, scratch_floats, out,
                                             residual_out, mean, rstd, weight, kN, kC, nullptr, v);
    });
    bench("residual_rmsnorm_forward", rms_fwd_bytes, [&](KernelVariant v) {
      llm::cuda::residual_rmsnorm_forward(residual_out, out, rstd, residual_in, branch, weight, kN, kC, 1e-5f,
                                          nullptr, v);
    });
    bench("residual_rmsnorm_backward", rms_bwd_bytes, [&](KernelVariant v) {
      llm::cuda::residual_rmsnorm_backward(d_residual, dweight, scratch, scratch_floats, out, residual_out,
                                           rstd, weight, kN, kC, nullptr, v);
    });
    for (void* p :
         {static_cast<void*>(residual_in), static_cast<void*>(branch), static_cast<void*>(residual_out),
          static_cast<void*>(out), static_cast<void*>(d_residual), static_cast<void*>(weight),
          static_cast<void*>(bias), static_cast<void*>(dweight), static_cast<void*>(dbias),
          static_cast<void*>(mean), static_cast<void*>(rstd), static_cast<void*>(scratch)}) {
      CUDA_CHECK(cudaFree(p));
    }
  }

  // Activations on the MLP hidden width, and dropout on the residual width.
  {
    const size_t nh = static_cast<size_t>(kN) * kHidden;
    bf16* a = alloc<bf16>(nh, 17);
    bf16* b = alloc<bf16>(nh, 18);
    bf16* c = alloc<bf16>(nh, 19);
    bf16* d = alloc<bf16>(nh, 20);
    bf16* e = alloc<bf16>(nh, 21);
    bench("activation_forward (gelu_tanh, 4C)", 2.0 * nh * s, [&](KernelVariant v) {
      llm::cuda::activation_forward(b, a, nh, llm::cuda::Activation::kGeluTanh, 0.0f, nullptr, v);
    });
    bench("activation_backward (gelu_tanh, 4C)", 3.0 * nh * s, [&](KernelVariant v) {
      llm::cuda::activation_backward(c, b, a, nh, llm::cuda::Activation::kGeluTanh, 0.0f, nullptr, v);
    });
    bench("swiglu_forward (4C)", 3.0 * nh * s,
          [&](KernelVariant v) { llm::cuda::swiglu_forward(c, a, b, nh, nullptr, v); });
    bench("swiglu_backward (4C)", 5.0 * nh * s,
          [&](KernelVariant v) { llm::cuda::swiglu_backward(d, e, c, a, b, nh, nullptr, v); });
    bench("dropout_forward (p = 0.1)", 2.0 * NC * s,
          [&](KernelVariant v) { llm::cuda::dropout_forward(b, a, NC, 0.1f, 1234, 5, nullptr, v); });
    bench("dropout_backward (p = 0.1)", 2.0 * NC * s,
          [&](KernelVariant v) { llm::cuda::dropout_backward(c, b, NC, 0.1f, 1234, 5, nullptr, v); });
    for (bf16* p : {a, b, c, d, e}) CUDA_CHECK(cudaFree(p));
  }

  // AdamW over N x C parameters: bf16 gradients and working copy, fp32 master, m, v.
  {
    const size_t n = NC;
    bf16* grad = alloc<bf16>(n, 22);
    bf16* param = alloc<bf16>(n, 23);
    float* master = alloc<float>(n, 24);
    float* m = alloc<float>(n, 25);
    float* v = alloc<float>(n, 26);
    CUDA_CHECK(cudaMemset(v, 0, n * sizeof(float)));
    float *norm = nullptr, *clip = nullptr;
    double* scratch = nullptr;
    const size_t scratch_doubles = llm::cuda::grad_norm_scratch_doubles(n);
    CUDA_CHECK(cudaMalloc(&norm, sizeof(float)));
    CUDA_CHECK(cudaMalloc(&clip, sizeof(float)));
    CUDA_CHECK(cudaMalloc(&scratch, scratch_doubles * sizeof(double)));
    bench("global_grad_norm", n * s, [&](KernelVariant variant) {
      llm::cuda::global_grad_norm(norm, clip, scratch, scratch_doubles, grad, n, 1.0f, nullptr, variant);
    });
    // grad read; master, m, v read and written; param written.
    bench("adamw_update", n * (s + 3 * 2 * 4.0 + s), [&](KernelVariant variant) {
      llm::cuda::adamw_update(param, master, m, v, grad, clip, n, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 10,
                              nullptr, variant);
    });
    for (void* p : {static_cast<void*>(grad), static_cast<void*>(param), static_cast<void*>(master),
                    static_cast<void*>(m), static_cast<void*>(v), static_cast<void*>(norm),
                    static_cast<void*>(clip), static_cast<void*>(scratch)}) {
      CUDA_CHECK(cudaFree(p));
    }
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  // One line for dev/gpu/check.sh's table.
  std::sort(g_fast_pct.begin(), g_fast_pct.end());
  std::printf("\nsummary: memory kernels, fast: median %.0f%% of copy (%.0f GB/s), lowest %.0f%% %s\n",
              g_fast_pct[g_fast_pct.size() / 2].first, g_copy_gbps, g_fast_pct.front().first,
              g_fast_pct.front().second.c_str());
  return 0;
}
