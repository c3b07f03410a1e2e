// A plain C++ interface to the GPU optimizer steps (kernels/adamw.cuh, optim_lion.cuh, optim_sophia.cuh,
// optim_adafactor.cuh, optim_adamw8bit.cuh, optim_muon.cuh), for host code that is not compiled by nvcc:
// the training backends and the tests in tests/train that compare the GPU with the CPU optimizer classes
// of train/. No CUDA header is needed to include it.
//
// Every step updates ONE tensor held in device memory: fp32 master parameters (updated in place), fp32
// gradients and fp32 optimizer state (8-bit AdamW: byte codes plus fp32 absmax), laid out as the CPU
// optimizer's state buffers for that tensor, so state moves between the backends by plain copies. `lr`
// is the tensor's learning rate (the schedule times its lr_scale) unless said otherwise; `stream` is a
// cudaStream_t (null: the default stream). The calls are asynchronous; synchronize() waits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace llm::cuda {

// An owned device array of n elements (float, double, uint8_t); freed on destruction.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n);
  // A device copy of `host`.
  explicit DeviceArray(const std::vector<T>& host);
  ~DeviceArray();
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& host);  // host.size() must equal size()
  std::vector<T> download() const;          // waits for the device
  // Elements [offset, offset + count) from or to host memory (cudaMemcpy on the legacy default stream:
  // work on a non-blocking stream must be synchronized first, and read the uploaded values only after
  // synchronize()). Throws std::out_of_range past the end.
  void upload(const T* host, size_t offset, size_t count);
  void download(T* host, size_t offset, size_t count) const;
  // Sets every byte to `byte` (0 zeroes any type; 127 is the 8-bit AdamW signed code's zero);
  // asynchronous like cudaMemset, so synchronize() before work on another stream reads it.
  void fill_bytes(unsigned char byte);

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// Waits for all work on the device.
void synchronize();

// AdamW (kernels/adamw.cuh); step counts from 1.
void adamw_step(float* param, float* m, float* v, const float* grad, size_t n, double lr, double beta1,
                double beta2, double eps, double weight_decay, int64_t step, void* stream = nullptr);

// Lion (kernels/optim_lion.cuh): m [n].
void lion_step(float* param, float* m, const float* grad, size_t n, double lr, double beta1, double beta2,
               double weight_decay, void* stream = nullptr);

// SophiaG (kernels/optim_sophia.cuh): m, h [n]; batch_tokens is bs of the latest Hessian estimate (0
// before the first). sophia_hessian_step folds in the sampled-label gradient: h = b2 h + (1 - b2) g^2.
void sophia_step(float* param, float* m, const float* h, const float* grad, size_t n, double lr, double beta1,
                 double rho, double batch_tokens, double weight_decay, void* stream = nullptr);
void sophia_hessian_step(float* h, const float* sampled_grad, size_t n, double beta2, void* stream = nullptr);

// Adafactor (kernels/optim_adafactor.cuh), transformers semantics.
struct AdafactorHyper {
  double eps1 = 1e-30, eps2 = 1e-3, clip_threshold = 1.0, decay_rate = -0.8, beta1 = 0.0;
  bool scale_parameter = true, relative_step = false, warmup_init = false;
};
// Doubles of scratch adafactor_step needs for a tensor of `matrices` matrices of rows x cols, or for a
// vector (1, 0, 0).
size_t adafactor_scratch_doubles(int64_t matrices, int64_t rows, int64_t cols);
// A tensor with two or more dimensions is `matrices` matrices of rows x cols (its last two dimensions):
// row [matrices * rows] and col [matrices * cols], full = null. A vector: full [n], row = col = null.
// first [n] when hyper.beta1 > 0, else null. Here `lr` is the scheduled learning rate and `lr_scale`
// the tensor's factor (relative_step replaces lr, not lr_scale, as on the CPU). step counts from 1.
void adafactor_step(float* param, float* row, float* col, float* full, float* first, const float* grad,
                    double* scratch, size_t scratch_doubles, size_t n, int64_t matrices, int64_t rows,
                    int64_t cols, double lr, double lr_scale, double weight_decay, int64_t step,
                    const AdafactorHyper& hyper, void* stream = nullptr);

// 8-bit AdamW (kernels/optim_adamw8bit.cuh), the CPU's code tables and blocks: m_codes, v_codes [n]
// bytes (fresh state: 127 and 0), m_absmax, v_absmax [ceil(n / block)] (fresh: 0). step from 1.
void adamw8bit_step(float* param, uint8_t* m_codes, float* m_absmax, uint8_t* v_codes, float* v_absmax,
                    const float* grad, size_t n, int block, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step, void* stream = nullptr);

// Muon (kernels/optim_muon.cuh) on one rows x cols matrix: momentum [rows * cols]. The Newton-Schulz
// iteration runs in bf16 (training) or fp32 (tests). workspace: muon_workspace_bytes(...) bytes.
// The AdamW side of Muon (tensors that are not 2-D hidden matrices) is adamw_step at
// muon_adamw_lr_scale x lr.
enum class MuonPrecision { kBf16, kFloat32 };
size_t muon_workspace_bytes(int64_t rows, int64_t cols, MuonPrecision precision);
void muon_step(float* param, float* momentum, const float* grad, void* workspace, size_t workspace_bytes,
               int64_t rows, int64_t cols, double lr, double weight_decay, double momentum_beta,
               bool nesterov, int ns_steps, MuonPrecision precision, void* stream = nullptr);
// NS5 alone: out [rows, cols] = NS5(in) (fp32 buffers), for tests. Uses the momentum path with mu = 0,
// so `in` is treated as the gradient; workspace as above.
void muon_orthogonalize(float* out, const float* in, void* workspace, size_t workspace_bytes, int64_t rows,
                        int64_t cols, int ns_steps, MuonPrecision precision, void* stream = nullptr);

}  // namespace llm::cuda
