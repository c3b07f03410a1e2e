// Shared by the memory-bound kernel tests (embedding, positions, norms, activations, dropout, AdamW):
// random inputs, rounding to the storage type, the tolerance per storage type, and bitwise comparison.
#pragma once

#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "tests/cuda/cuda_test_util.h"

namespace llm::test {

// Relative-error bound against the fp32/fp64 CPU reference: 1e-5 for fp32 storage, 2e-2 for bf16.
template <typename T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 2e-2;
}

template <typename T>
const char* type_name() {
  return std::is_same_v<T, float> ? "fp32" : "bf16";
}

inline std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

inline std::vector<int32_t> random_ints(size_t n, uint32_t seed, int lo, int hi_inclusive) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(lo, hi_inclusive);
  std::vector<int32_t> v(n);
  for (int32_t& x : v) x = dist(gen);
  return v;
}

// v rounded to the storage type T and back: the exact values the kernel sees after an upload.
template <typename T>
std::vector<float> round_to(const std::vector<float>& v) {
  return to_floats(from_floats<T>(v));
}

// A device buffer of T holding v (rounded to T).
template <typename T>
void upload_floats(DeviceBuffer<T>& buffer, const std::vector<float>& v) {
  buffer.upload(from_floats<T>(v));
}

template <typename T>
std::vector<float> download_floats(const DeviceBuffer<T>& buffer) {
  return to_floats(buffer.download());
}

// True when the two vectors hold the same bytes.
template <typename T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Every element of `got` must have been written: a non-finite value fails (poisoned buffers are NaN).
inline void expect_all_finite(const std::string& what, const std::vector<float>& got) {
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << "[" << i << "] was not written (or is not finite)";
  }
}

}  // namespace llm::test
