// CUDA token embedding (kernels/embedding.cuh) against the CPU reference (kernels/cpu/embedding.h):
// forward copies rows exactly; backward accumulates into a non-zero gradient, in the reference's order
// (bitwise equal for fp32), deterministically run to run, in both variants; invalid ids are flagged.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cpu/embedding.h"
#include "kernels/embedding.cuh"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/kernel_test_helpers.h"

namespace {

using llm::cuda::KernelVariant;
using namespace llm::test;

const char* name_of(KernelVariant variant) {
  return variant == KernelVariant::kFast ? "fast" : "clear";
}

template <typename T>
void check_forward(int N, int C, int V, KernelVariant variant) {
  const std::vector<float> table = round_to<T>(random_floats(static_cast<size_t>(V) * C, 51));
  const std::vector<int32_t> tokens = random_ints(N, 52, 0, V - 1);
  std::vector<float> want(static_cast<size_t>(N) * C);
  llm::ref::embedding_forward(want.data(), tokens.data(), table.data(), N, C);

  DeviceBuffer<T> d_table(table.size()), d_out(want.size());
  DeviceBuffer<int32_t> d_tokens(N);
  upload_floats(d_table, table);
  d_tokens.upload(tokens);
  d_out.poison();
  llm::cuda::embedding_forward(d_out.get(), d_tokens.get(), d_table.get(), N, C, V, nullptr, variant);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = download_floats(d_out);
  expect_all_finite("embedding forward", got);
  EXPECT_TRUE(got == want) << "embedding forward " << type_name<T>() << " " << name_of(variant) << " N=" << N
                           << " C=" << C << ": a row is not an exact copy";
}

// Runs the backward pass on a gradient that starts at `dtable0` and returns the result. The scratch is
// sized for max(N, planned_rows) tokens, as a trainer sizes it once for its largest batch.
template <typename T>
std::vector<T> run_backward(const std::vector<float>& dtable0, const std::vector<float>& dout,
                            const std::vector<int32_t>& tokens, int N, int C, int V, KernelVariant variant,
                            int planned_rows = 0) {
  DeviceBuffer<T> d_dtable(dtable0.size()), d_dout(dout.size());
  DeviceBuffer<int32_t> d_tokens(N);
  const size_t scratch_bytes = llm::cuda::embedding_backward_scratch_bytes(std::max(N, planned_rows), V);
  DeviceBuffer<char> d_scratch(scratch_bytes);
  upload_floats(d_dtable, dtable0);
  upload_floats(d_dout, dout);
  d_tokens.upload(tokens);
  d_scratch.poison();
  llm::cuda::embedding_backward(d_dtable.get(), d_dout.get(), d_tokens.get(), N, C, V, d_scratch.get(),
                                scratch_bytes, nullptr, variant);
  CUDA_CHECK(cudaDeviceSynchronize());
  return d_dtable.download();
}

template <typename T>
void check_backward(int N, int C, int V, KernelVariant variant) {
  // A non-zero starting gradient (gradient accumulation) and many repeated ids (N > V).
  const std::vector<float> dtable0 = round_to<T>(random_floats(static_cast<size_t>(V) * C, 53));
  const std::vector<float> dout = round_to<T>(random_floats(static_cast<size_t>(N) * C, 54));
  const std::vector<int32_t> tokens = random_ints(N, 55, 0, V - 1);
  std::vector<float> want = dtable0;
  llm::ref::embedding_backward(want.data(), dout.data(), tokens.data(), N, C);

  const std::vector<T> first = run_backward<T>(dtable0, dout, tokens, N, C, V, variant);
  const std::vector<T> second = run_backward<T>(dtable0, dout, tokens, N, C, V, variant);
  const std::string what = std::string("embedding backward ") + type_name<T>() + " " + name_of(variant) +
                           " N=" + std::to_string(N) + " C=" + std::to_string(C) + " V=" + std::to_string(V);
  const std::vector<float> got = to_floats(first);
  expect_relative_error(what, got, want, tolerance<T>());
  if constexpr (std::is_same_v<T, float>) {
    // Same additions in the same order as the reference: identical bits.
    EXPECT_TRUE(got == want) << what << ": not bitwise equal to the reference";
  }
  EXPECT_TRUE(bitwise_equal(first, second)) << what << ": two runs differ";
}

template <typename T>
void check_all() {
  // C = 301: not a multiple of the vector width (auto picks clear; fast is refused). C = 264 = 8 * 33: both.
  for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kAuto}) {
    check_forward<T>(37, 301, 50, variant);
    check_backward<T>(37, 301, 50, variant);
  }
  for (KernelVariant variant : {KernelVariant::kClear, KernelVariant::kFast}) {
    check_forward<T>(37, 264, 50, variant);
    check_backward<T>(37, 264, 50, variant);
    check_backward<T>(1, 264, 3, variant);
    // Long runs (each id repeats ~300 times) and more channels than one block covers (256 threads x 8).
    check_backward<T>(2047, 3000 - 3000 % 8, 7, variant);
  }
  // Fast and clear agree.
  const int N = 333, C = 520, V = 40;
  const std::vector<float> dtable0 = round_to<T>(random_floats(static_cast<size_t>(V) * C, 56));
  const std::vector<float> dout = round_to<T>(random_floats(static_cast<size_t>(N) * C, 57));
  const std::vector<int32_t> tokens = random_ints(N, 58, 0, V - 1);
  const std::vector<T> clear = run_backward<T>(dtable0, dout, tokens, N, C, V, KernelVariant::kClear);
  const std::vector<T> fast = run_backward<T>(dtable0, dout, tokens, N, C, V, KernelVariant::kFast);
  // Each (row, channel) sums the same values in the same order in both variants.
  EXPECT_TRUE(bitwise_equal(clear, fast)) << "embedding backward fast vs clear " << type_name<T>();
}

TEST(CudaEmbedding, MatchesReferenceFp32) {
  SKIP_WITHOUT_GPU();
  check_all<float>();
}

TEST(CudaEmbedding, MatchesReferenceBf16) {
  SKIP_WITHOUT_GPU();
  check_all<__nv_bfloat16>();
}

// NEFTune noise: the reference's Philox draws, the product and the sum rounded as there, so the result
// equals the reference's rounded to the storage type (bit for bit in fp32).
template <typename T>
void check_noise(size_t n, float scale, uint64_t seed, uint64_t stream_id) {
  const std::vector<float> x = round_to<T>(random_floats(n, 56));
  std::vector<float> want = x;
  llm::ref::embedding_noise_forward(want.data(), n, scale, seed, stream_id);
  want = round_to<T>(want);
  DeviceBuffer<T> d_x(n);
  upload_floats(d_x, x);
  llm::cuda::embedding_noise_forward(d_x.get(), n, scale, seed, stream_id, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = download_floats(d_x);
  EXPECT_TRUE(got == want) << "embedding noise " << type_name<T>() << " n=" << n << " stream " << stream_id;
}

TEST(CudaEmbedding, NeftuneNoiseMatchesReference) {
  SKIP_WITHOUT_GPU();
  // An odd count (not a multiple of the block), and a stream with bit 62 set as the model uses.
  for (const size_t n : {size_t{1}, size_t{7 * 257 + 5}, size_t{1} << 20}) {
    check_noise<float>(n, 0.05f, 42, (uint64_t{1} << 62) | 9);
    check_noise<__nv_bfloat16>(n, 0.05f, 42, (uint64_t{1} << 62) | 9);
  }
  check_noise<float>(1000, 0.0f, 1, 2);  // scale 0 leaves the values as they are
}

TEST(CudaEmbedding, BackwardIsDeterministicWithManyRepeats) {
  SKIP_WITHOUT_GPU();
  // One id for most rows: the order of the additions decides the bits, so any atomics would show.
  const int N = 4096, C = 512, V = 5;
  std::vector<int32_t> tokens = random_ints(N, 61, 0, V - 1);
  for (int n = 0; n < N; n += 2) tokens[n] = 2;
  const std::vector<float> dtable0 = random_floats(static_cast<size_t>(V) * C, 62);
  const std::vector<float> dout = random_floats(static_cast<size_t>(N) * C, 63, -100.0f, 100.0f);
  const std::vector<float> first =
      to_floats(run_backward<float>(dtable0, dout, tokens, N, C, V, KernelVariant::kAuto));
  for (int run = 0; run < 3; ++run) {
    const std::vector<float> again =
        to_floats(run_backward<float>(dtable0, dout, tokens, N, C, V, KernelVariant::kAuto));
    EXPECT_TRUE(again == first) << "run " << run + 1 << " differs from run 0";
  }
  std::vector<float> want = dtable0;
  llm::ref::embedding_backward(want.data(), dout.data(), tokens.data(), N, C);
  EXPECT_TRUE(first == want) << "not bitwise equal to the reference";
}

// A real vocabulary and both sorts: up to 65536 tokens the counting sort, above it CUB's radix sort, here
// with more tokens than its single-tile sort holds (256 x 19 = 4864 items on sm_80/sm_90), so the
// multi-tile onesweep sort runs, with 18 key bits (3 passes of 8, which use CUB's extra key and value
// buffers). The scratch is sized for the largest (planned) batch, which the shorter batches (a short last
// batch) must still accept: CUB's temporary storage does not shrink below the plan's, and the counting
// sort's scratch is smaller than the radix sort's.
TEST(CudaEmbedding, LargeVocabularyAndShorterBatchThanPlanned) {
  SKIP_WITHOUT_GPU();
  const int V = 151936, C = 8, planned = 70001;
  const std::vector<float> dtable0 = random_floats(static_cast<size_t>(V) * C, 66);
  for (int N : {planned, 65536, 16384, 6001, 1000}) {
    std::vector<int32_t> tokens = random_ints(N, 67 + static_cast<uint32_t>(N), 0, V - 1);
    for (int n = 0; n < N; n += 3) tokens[n] = 1234;  // one long run among many short ones
    const std::vector<float> dout = random_floats(static_cast<size_t>(N) * C, 68);
    std::vector<float> want = dtable0;
    llm::ref::embedding_backward(want.data(), dout.data(), tokens.data(), N, C);
    const std::vector<float> got =
        to_floats(run_backward<float>(dtable0, dout, tokens, N, C, V, KernelVariant::kAuto, planned));
    EXPECT_TRUE(got == want) << "N=" << N << " (scratch for " << planned
                             << "): not bitwise equal to the reference";
  }
}

// The run kernel's edge cases at once: many distinct ids (most runs of length 1), one id repeated 3000
// times (its run spans many blocks' tiles and several chunks of the block that continues it), a few invalid
// ids (sorted after every valid one), N not a multiple of the tile, and C over several channel slices with
// a partly filled last one. Equal to the reference (bitwise for fp32), fast equal to clear, run to run.
template <typename T>
void check_long_run_among_many() {
  const int N = 12001, C = 2056, V = 6000, kHot = 4321;
  std::vector<int32_t> tokens = random_ints(N, 71, 0, V - 1);
  const std::vector<int32_t> pick = random_ints(N, 72, 0, 999);
  for (int n = 0; n < N; ++n) {
    if (pick[n] < 250) tokens[n] = kHot;                          // ~3000 repeats
    if (pick[n] == 999) tokens[n] = n % 2 == 0 ? -3 : V + n % 5;  // ~12 invalid ids
  }
  const std::vector<float> dtable0 = round_to<T>(random_floats(static_cast<size_t>(V) * C, 73));
  const std::vector<float> dout = round_to<T>(random_floats(static_cast<size_t>(N) * C, 74));
  std::vector<float> want = dtable0;
  for (int n = 0; n < N; ++n) {
    if (tokens[n] < 0 || tokens[n] >= V) continue;
    for (int c = 0; c < C; ++c)
      want[static_cast<size_t>(tokens[n]) * C + c] += dout[static_cast<size_t>(n) * C + c];
  }
  const std::vector<T> fast = run_backward<T>(dtable0, dout, tokens, N, C, V, KernelVariant::kFast);
  const std::vector<T> clear = run_backward<T>(dtable0, dout, tokens, N, C, V, KernelVariant::kClear);
  const std::vector<T> again = run_backward<T>(dtable0, dout, tokens, N, C, V, KernelVariant::kFast);
  const std::string what = std::string("embedding backward long run among many ") + type_name<T>();
  const std::vector<float> got = to_floats(fast);
  expect_relative_error(what, got, want, tolerance<T>());
  if constexpr (std::is_same_v<T, float>) {
    EXPECT_TRUE(got == want) << what << ": not bitwise equal to the reference";
  }
  EXPECT_TRUE(bitwise_equal(fast, clear)) << what << ": fast and clear differ";
  EXPECT_TRUE(bitwise_equal(fast, again)) << what << ": two runs differ";
}

TEST(CudaEmbedding, LongRunAmongManyDistinctIds) {
  SKIP_WITHOUT_GPU();
  check_long_run_among_many<float>();
  check_long_run_among_many<__nv_bfloat16>();
}

TEST(CudaEmbedding, InvalidIdsGiveNanRowsAndNoGradient) {
  SKIP_WITHOUT_GPU();
  const int N = 5, C = 16, V = 4;
  const std::vector<int32_t> tokens = {0, 4, 3, -1, 3};  // rows 1 and 3 are invalid
  const std::vector<float> table = random_floats(static_cast<size_t>(V) * C, 64);
  DeviceBuffer<float> d_table(table.size()), d_out(static_cast<size_t>(N) * C);
  DeviceBuffer<int32_t> d_tokens(N);
  upload_floats(d_table, table);
  d_tokens.upload(tokens);
  // Finite first (not poisoned): an invalid row the kernel forgot to write must not pass as NaN.
  upload_floats(d_out, std::vector<float>(static_cast<size_t>(N) * C, 0.0f));
  llm::cuda::embedding_forward(d_out.get(), d_tokens.get(), d_table.get(), N, C, V, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> out = download_floats(d_out);
  for (int n = 0; n < N; ++n) {
    const bool valid = tokens[n] >= 0 && tokens[n] < V;
    for (int c = 0; c < C; ++c) {
      const float v = out[static_cast<size_t>(n) * C + c];
      if (valid) {
        EXPECT_EQ(v, table[static_cast<size_t>(tokens[n]) * C + c]);
      } else {
        EXPECT_TRUE(std::isnan(v)) << "row " << n << " has an invalid id and should be NaN";
      }
    }
  }
  // Backward: the valid rows accumulate as usual, the invalid ones are skipped.
  const std::vector<float> dtable0(static_cast<size_t>(V) * C, 1.0f);
  const std::vector<float> dout = random_floats(static_cast<size_t>(N) * C, 65);
  const std::vector<float> got =
      to_floats(run_backward<float>(dtable0, dout, tokens, N, C, V, KernelVariant::kAuto));
  std::vector<float> want = dtable0;
  for (int n = 0; n < N; ++n) {
    if (tokens[n] < 0 || tokens[n] >= V) continue;
    for (int c = 0; c < C; ++c)
      want[static_cast<size_t>(tokens[n]) * C + c] += dout[static_cast<size_t>(n) * C + c];
  }
  EXPECT_TRUE(got == want);
}

TEST(CudaEmbedding, BackwardRejectsSmallScratch) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<float> d_dtable(64), d_dout(64);
  DeviceBuffer<int32_t> d_tokens(4);
  DeviceBuffer<char> d_scratch(16);
  EXPECT_THROW(llm::cuda::embedding_backward(d_dtable.get(), d_dout.get(), d_tokens.get(), 4, 16, 4,
                                             d_scratch.get(), 16, nullptr),
               std::invalid_argument);
}

}  // namespace
