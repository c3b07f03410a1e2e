// The plain C++ interface of kernels/cuda_optimizers.h over the optimizer kernels.
#include "kernels/cuda_optimizers.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <mutex>
#include <stdexcept>
#include <string>

#include "kernels/adamw.cuh"
#include "kernels/cuda_common.cuh"
#include "kernels/optim_adafactor.cuh"
#include "kernels/optim_adamw8bit.cuh"
#include "kernels/optim_lion.cuh"
#include "kernels/optim_muon.cuh"
#include "kernels/optim_sophia.cuh"

namespace llm::cuda {

template <typename T>
DeviceArray<T>::DeviceArray(size_t n) : n_(n) {
  CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(1, n) * sizeof(T)));
}

template <typename T>
DeviceArray<T>::DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
  upload(host);
}

template <typename T>
DeviceArray<T>::~DeviceArray() {
  cudaFree(ptr_);
}

template <typename T>
void DeviceArray<T>::upload(const std::vector<T>& host) {
  if (host.size() != n_) {
    throw std::invalid_argument("DeviceArray::upload: " + std::to_string(host.size()) + " values for " +
                                std::to_string(n_));
  }
  if (n_ > 0) CUDA_CHECK(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
}

template <typename T>
std::vector<T> DeviceArray<T>::download() const {
  std::vector<T> host(n_);
  if (n_ > 0) CUDA_CHECK(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

template <typename T>
void DeviceArray<T>::upload(const T* host, size_t offset, size_t count) {
  if (offset > n_ || count > n_ - offset) {
    throw std::out_of_range("DeviceArray::upload: elements [" + std::to_string(offset) + ", " +
                            std::to_string(offset + count) + ") of " + std::to_string(n_));
  }
  if (count > 0) CUDA_CHECK(cudaMemcpy(ptr_ + offset, host, count * sizeof(T), cudaMemcpyHostToDevice));
}

template <typename T>
void DeviceArray<T>::download(T* host, size_t offset, size_t count) const {
  if (offset > n_ || count > n_ - offset) {
    throw std::out_of_range("DeviceArray::download: elements [" + std::to_string(offset) + ", " +
                            std::to_string(offset + count) + ") of " + std::to_string(n_));
  }
  if (count > 0) CUDA_CHECK(cudaMemcpy(host, ptr_ + offset, count * sizeof(T), cudaMemcpyDeviceToHost));
}

template <typename T>
void DeviceArray<T>::fill_bytes(unsigned char byte) {
  if (n_ > 0) CUDA_CHECK(cudaMemset(ptr_, byte, n_ * sizeof(T)));
}

template class DeviceArray<float>;
template class DeviceArray<double>;
template class DeviceArray<uint8_t>;

void synchronize() {
  CUDA_CHECK(cudaDeviceSynchronize());
}

namespace {

cudaStream_t as_stream(void* stream) {
  return static_cast<cudaStream_t>(stream);
}

// The code tables of train/optim_adamw8bit.cpp, built the same way (fp64 powers of two rounded to fp32,
// midpoints in fp64 rounded to fp32), on the device once per process.
Q8Tables make_q8_tables() {
  Q8Tables t{};
  auto fill = [](float* value, float* mid, int& count, bool is_signed) {
    double v[256];
    int c = 0;
    if (is_signed) {
      for (int j = 0; j <= 126; ++j) v[c++] = -std::exp2(-j / 8.0);
      v[c++] = 0.0;
      for (int j = 126; j >= 0; --j) v[c++] = std::exp2(-j / 8.0);
    } else {
      v[c++] = 0.0;
      for (int j = 254; j >= 0; --j) v[c++] = std::exp2(-j / 8.0);
    }
    count = c;
    for (int i = 0; i < 256; ++i) value[i] = static_cast<float>(i < c ? v[i] : v[c - 1]);
    for (int i = 0; i < 256; ++i) {
      mid[i] = i + 1 < c ? static_cast<float>(0.5 * (static_cast<double>(value[i]) + value[i + 1])) : 0.0f;
    }
  };
  fill(t.signed_value, t.signed_mid, t.signed_count, true);
  fill(t.unsigned_value, t.unsigned_mid, t.unsigned_count, false);
  return t;
}

const Q8Tables* device_q8_tables() {
  static std::once_flag once;
  static Q8Tables* device = nullptr;  // kept until exit, like BlasLt::shared()
  std::call_once(once, [] {
    const Q8Tables host = make_q8_tables();
    CUDA_CHECK(cudaMalloc(&device, sizeof(Q8Tables)));
    CUDA_CHECK(cudaMemcpy(device, &host, sizeof(Q8Tables), cudaMemcpyHostToDevice));
  });
  return device;
}

}  // namespace

void adamw_step(float* param, float* m, float* v, const float* grad, size_t n, double lr, double beta1,
                double beta2, double eps, double weight_decay, int64_t step, void* stream) {
  adamw_update<float, float>(nullptr, param, m, v, grad, nullptr, n, static_cast<float>(lr), beta1, beta2,
                             static_cast<float>(eps), static_cast<float>(weight_decay), step,
                             as_stream(stream));
}

void lion_step(float* param, float* m, const float* grad, size_t n, double lr, double beta1, double beta2,
               double weight_decay, void* stream) {
  lion_update<float, float>(nullptr, param, m, grad, nullptr, n, lr, beta1, beta2, weight_decay,
                            as_stream(stream));
}

void sophia_step(float* param, float* m, const float* h, const float* grad, size_t n, double lr, double beta1,
                 double rho, double batch_tokens, double weight_decay, void* stream) {
  sophia_update<float, float>(nullptr, param, m, h, grad, nullptr, n, lr, beta1, rho, batch_tokens,
                              weight_decay, as_stream(stream));
}

void sophia_hessian_step(float* h, const float* sampled_grad, size_t n, double beta2, void* stream) {
  sophia_hessian_update<float>(h, sampled_grad, n, beta2, as_stream(stream));
}

size_t adafactor_scratch_doubles(int64_t matrices, int64_t rows, int64_t cols) {
  return adafactor_scratch_size(matrices, rows, cols);
}

void adafactor_step(float* param, float* row, float* col, float* full, float* first, const float* grad,
                    double* scratch, size_t scratch_doubles, size_t n, int64_t matrices, int64_t rows,
                    int64_t cols, double lr, double lr_scale, double weight_decay, int64_t step,
                    const AdafactorHyper& h, void* stream) {
  if (step < 1) throw std::invalid_argument("adafactor_step: step counts from 1");
  const double t = static_cast<double>(step);
  double rho = lr;
  if (h.relative_step) rho = std::min(h.warmup_init ? 1e-6 * t : 1e-2, 1.0 / std::sqrt(t));
  rho *= lr_scale;
  const double beta2t = 1.0 - std::pow(t, h.decay_rate);
  adafactor_update<float, float>(nullptr, param, row, col, full, first, grad, nullptr, scratch,
                                 scratch_doubles, n, matrices, rows, cols, rho, beta2t, h.eps1, h.eps2,
                                 h.clip_threshold, h.beta1, h.scale_parameter, weight_decay,
                                 as_stream(stream));
}

void adamw8bit_step(float* param, uint8_t* m_codes, float* m_absmax, uint8_t* v_codes, float* v_absmax,
                    const float* grad, size_t n, int block, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step, void* stream) {
  adamw8bit_update<float, float>(nullptr, param, m_codes, m_absmax, v_codes, v_absmax, grad, nullptr,
                                 device_q8_tables(), n, block, lr, beta1, beta2, eps, weight_decay, step,
                                 as_stream(stream));
}

size_t muon_workspace_bytes(int64_t rows, int64_t cols, MuonPrecision precision) {
  return precision == MuonPrecision::kFloat32 ? muon_workspace_bytes<float>(rows, cols)
                                              : muon_workspace_bytes<__nv_bfloat16>(rows, cols);
}

void muon_step(float* param, float* momentum, const float* grad, void* workspace, size_t workspace_bytes,
               int64_t rows, int64_t cols, double lr, double weight_decay, double momentum_beta,
               bool nesterov, int ns_steps, MuonPrecision precision, void* stream) {
  if (precision == MuonPrecision::kFloat32) {
    muon_update<float>(param, momentum, grad, nullptr, workspace, workspace_bytes, rows, cols, lr,
                       weight_decay, momentum_beta, nesterov, ns_steps, as_stream(stream));
  } else {
    muon_update<__nv_bfloat16>(param, momentum, grad, nullptr, workspace, workspace_bytes, rows, cols, lr,
                               weight_decay, momentum_beta, nesterov, ns_steps, as_stream(stream));
  }
}

void muon_orthogonalize(float* out, const float* in, void* workspace, size_t workspace_bytes, int64_t rows,
                        int64_t cols, int ns_steps, MuonPrecision precision, void* stream) {
  // mu = 0, no Nesterov: the buffer becomes `in` (rounded to fp32, which it already is) and D = in.
  DeviceArray<float> buffer(
      std::vector<float>(static_cast<size_t>(rows * cols), 0.0f));  // 0 * garbage may be NaN
  if (precision == MuonPrecision::kFloat32) {
    muon_update<float>(nullptr, buffer.data(), in, nullptr, workspace, workspace_bytes, rows, cols, 0.0, 0.0,
                       0.0, false, ns_steps, as_stream(stream), out);
  } else {
    muon_update<__nv_bfloat16>(nullptr, buffer.data(), in, nullptr, workspace, workspace_bytes, rows, cols,
                               0.0, 0.0, 0.0, false, ns_steps, as_stream(stream), out);
  }
  synchronize();  // before `buffer` is freed
}

}  // namespace llm::cuda
