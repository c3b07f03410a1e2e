// Helpers shared by the matmul and classifier tests: tolerances by storage type, seeded random
// inputs, rounding through the storage type, and host/device copies in float.
#pragma once

#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "tests/cuda/cuda_test_util.h"

namespace llm::test::gemm {

using llm::test::DeviceBuffer;

template <typename T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 2e-2;
}

inline std::vector<float> random_floats(size_t n, unsigned seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// The values T actually stores, back in float: the reference sees exactly what the GPU sees.
template <typename T>
std::vector<float> rounded(const std::vector<float>& v) {
  return llm::test::to_floats(llm::test::from_floats<T>(v));
}

inline std::vector<double> to_doubles(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}
inline std::vector<float> to_floats(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

template <typename T>
std::vector<float> download(const DeviceBuffer<T>& buf) {
  return llm::test::to_floats(buf.download());
}
template <typename T>
void upload(DeviceBuffer<T>& buf, const std::vector<float>& v) {
  buf.upload(llm::test::from_floats<T>(v));
}

template <typename T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

}  // namespace llm::test::gemm
