// The GPU transformer (see kernels/cuda_model.h). The forward and backward passes below follow
// llm/model.cpp line by line; each step names the CPU call it mirrors where the kernel API differs.
#include "kernels/cuda_model.h"
#include "llm/model_layout.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/activations.cuh"
#include "kernels/adamw.cuh"
#include "kernels/attention_flash.cuh"
#include "kernels/attention_simple.cuh"
#include "kernels/classifier.cuh"
#include "kernels/cpu/positions.h"
#include "kernels/cuda_common.cuh"
#include "kernels/dropout.cuh"
#include "kernels/embedding.cuh"
#include "kernels/lora.cuh"
#include "kernels/matmul.cuh"
#include "kernels/nf4.cuh"
#include "kernels/norms.cuh"
#include "kernels/nvtx.cuh"
#include "kernels/philox.h"
#include "kernels/positions.cuh"

namespace llm::cuda {

Precision parse_precision(const std::string& name) {
  if (name == "fp32") return Precision::kFp32;
  if (name == "bf16") return Precision::kBf16;
  throw std::invalid_argument("precision: expected fp32 or bf16; found \"" + name + "\"");
}

const char* precision_name(Precision precision) {
  return precision == Precision::kFp32 ? "fp32" : "bf16";
}

namespace {

// ---- small kernels of our own -------------------------------------------------------------------------

// out = a + b (the residual add at the end of a layer; ref::residual_add).
template <typename T>
__global__ void residual_add_kernel(T* out, const T* a, const T* b, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));
}

// dst += src (a bf16 parameter gradient added into the fp32 gradient arena).
template <typename T>
__global__ void accumulate_float_kernel(float* dst, const T* src, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i] += to_float(src[i]);
}

// g = float(g * factor), in double as the CPU backend does.
__global__ void scale_kernel(float* g, size_t n, double factor) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) g[i] = static_cast<float>(static_cast<double>(g[i]) * factor);
}

// dst = T(src) (the working copy from the master weights).
template <typename T>
__global__ void convert_kernel(T* dst, const float* src, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = from_float<T>(src[i]);
}

template <typename T>
__global__ void to_float_kernel(float* dst, const T* src, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = to_float(src[i]);
}

constexpr int kThreads = 256;
inline int blocks(size_t n) {
  return ceil_div(static_cast<long long>(n), kThreads);
}

// One block per row of logits [rows, ld] (V used): labels[row] = a token drawn from softmax(logits[row])
// exactly as llm::sample_token(logits, 1.0, 0, seed, counter_base + row) draws it on the host:
//   w_v = exp(l_v - max_v l_v) in fp64;  u = philox_uniform(seed, counter_base + row, 0) * sum_v w_v;
//   label = the first v with u < w_0 + ... + w_v (V - 1 when rounding leaves none).
// Thread t owns the contiguous slice [t * per, (t + 1) * per) of the vocabulary. The slice sums are
// added in thread order (thread 0 alone) into each slice's starting offset, so a running sum is its
// slice's offset plus the slice's own terms in order: the host's left-to-right sum up to the grouping
// of the fp64 additions. Each thread finds the first crossing in its slice; the smallest index wins.
constexpr int kSampleThreads = 256;  // a power of two (tree reductions)
template <typename T>
__global__ void sample_rows_kernel(int32_t* labels, const T* logits, int ld, int V, uint64_t seed,
                                   uint64_t counter_base) {
  __shared__ double partial[kSampleThreads];
  __shared__ int first[kSampleThreads];
  __shared__ double total;
  const int tid = static_cast<int>(threadIdx.x);
  const T* x = logits + static_cast<size_t>(blockIdx.x) * ld;
  const int per = (V + kSampleThreads - 1) / kSampleThreads;
  const int begin = min(V, tid * per), end = min(V, begin + per);

  double m = -INFINITY;
  for (int v = begin; v < end; ++v) m = fmax(m, static_cast<double>(to_float(x[v])));
  partial[tid] = m;
  __syncthreads();
  for (int s = kSampleThreads / 2; s > 0; s >>= 1) {
    if (tid < s) partial[tid] = fmax(partial[tid], partial[tid + s]);
    __syncthreads();
  }
  const double max_logit = partial[0];  // a max: exact in any order
  __syncthreads();

  double sum = 0.0;
  for (int v = begin; v < end; ++v) sum += exp(static_cast<double>(to_float(x[v])) - max_logit);
  partial[tid] = sum;
  __syncthreads();
  if (tid == 0) {
    double running = 0.0;  // exclusive prefix over the slices, in order
    for (int t = 0; t < kSampleThreads; ++t) {
      const double slice = partial[t];
      partial[t] = running;
      running += slice;
    }
    total = running;
  }
  __syncthreads();

  const double u = static_cast<double>(philox_uniform(seed, counter_base + blockIdx.x, 0)) * total;
  int found = INT_MAX;
  double cumulative = partial[tid];
  for (int v = begin; v < end; ++v) {
    cumulative += exp(static_cast<double>(to_float(x[v])) - max_logit);
    if (u < cumulative) {
      found = v;
      break;
    }
  }
  first[tid] = found;
  __syncthreads();
  for (int s = kSampleThreads / 2; s > 0; s >>= 1) {
    if (tid < s) first[tid] = min(first[tid], first[tid + s]);
    __syncthreads();
  }
  if (tid == 0) labels[blockIdx.x] = first[0] == INT_MAX ? V - 1 : first[0];
}

// Tensor names, dropout sites, rope_params and activation_kind are shared with llm/model.cpp.
using namespace ::llm::layer;

std::string mb(size_t bytes) {
  return std::to_string(bytes / (1024 * 1024)) + " MB";
}

// cudaMalloc that says which part did not fit and what to change.
void* device_alloc(size_t bytes, const char* what, const char* advice) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    throw std::runtime_error(std::string("out of GPU memory: the ") + what + " (" + mb(bytes) +
                             ") did not fit (" + mb(free_bytes) + " free of " + mb(total_bytes) + "); " +
                             advice);
  }
  return p;
}

// Carves aligned pieces from one allocation; a first pass with base == nullptr only measures.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename U>
  U* take(size_t count) {
    if (count == 0) return nullptr;
    offset_ = (offset_ + 255) / 256 * 256;
    U* p = base_ ? reinterpret_cast<U*>(base_ + offset_) : nullptr;
    offset_ += count * sizeof(U);
    return p;
  }
  size_t bytes() const { return (offset_ + 255) / 256 * 256; }

 private:
  char* base_;
  size_t offset_ = 0;
};

// w[j] = code[q_j] * absmax[j / blocksize] on the host: the expression of ref::nf4_dequantize (one fp32
// product), with the same code table (nf4_code_table(), bit for bit kernels/cpu/nf4.h's kNf4Code).
void nf4_dequantize_host(float* w, const uint8_t* packed, const float* absmax, size_t n, int blocksize) {
  const float* code = nf4_code_table();
  const size_t bs = static_cast<size_t>(blocksize);
  for (size_t j = 0; j < n; ++j) {
    const uint8_t byte = packed[j / 2];
    const uint8_t q = (j % 2 == 0) ? static_cast<uint8_t>(byte >> 4) : static_cast<uint8_t>(byte & 0xF);
    w[j] = code[q] * absmax[j / bs];
  }
}

// A temporary device buffer, freed (after the stream has finished with it) when it goes out of scope.
struct DeviceStage {
  explicit DeviceStage(cudaStream_t s) : stream(s) {}
  ~DeviceStage() {
    if (ptr == nullptr) return;
    cudaStreamSynchronize(stream);  // errors ignored: a destructor must not throw
    cudaFree(ptr);
  }
  DeviceStage(const DeviceStage&) = delete;
  DeviceStage& operator=(const DeviceStage&) = delete;
  cudaStream_t stream;
  float* ptr = nullptr;
};

// Scratch floats for a norm backward over any row count up to max_rows. The norms' block split is not
// monotonic in the row count above 8192 rows (9000 rows take 1000 blocks, 8192 take 1024), so sizing for
// max_rows alone fails for a smaller batch; up to 8192 rows it is monotonic and 8192 rows take the most.
size_t norm_scratch_floats_up_to(size_t max_rows, int width) {
  constexpr size_t kWidest =
      static_cast<size_t>(norms_detail::kMinRowsPerBlock) * norms_detail::kMaxBackwardBlocks;
  return norm_backward_scratch_floats(static_cast<int>(std::min(max_rows, kWidest)), width);
}

// Whether every value survives fp32 -> bf16 -> fp32 bit for bit: its low 16 bits are zero, and it is
// neither NaN (the conversion may change the payload) nor subnormal (whether the device conversion
// flushes it must not matter).
bool bf16_holds_exactly(const float* x, size_t n) {
  for (size_t j = 0; j < n; ++j) {
    uint32_t bits = 0;
    std::memcpy(&bits, x + j, sizeof bits);
    if ((bits & 0xFFFFu) != 0 || std::isnan(x[j]) || std::fpclassify(x[j]) == FP_SUBNORMAL) return false;
  }
  return true;
}

// a and b hold the same values: equal as numbers, or with the same bits (NaN).
bool same_values(const float* a, const float* b, size_t n) {
  for (size_t j = 0; j < n; ++j) {
    if (!(a[j] == b[j]) && std::memcmp(a + j, b + j, sizeof(float)) != 0) return false;
  }
  return true;
}

}  // namespace

// ---- the precision-independent interface of the implementation ------------------------------------------

struct CudaModel::Impl {
  virtual ~Impl() = default;
  ModelConfig config;
  CudaModelOptions options;
  ParameterLayout layout;
  Impl(const ModelConfig& c, const CudaModelOptions& o) : config(c), options(o), layout(c) {}

  virtual MemoryPlan memory_plan() const = 0;
  virtual void upload_parameters(const std::vector<float>& values) = 0;
  virtual std::vector<float> download_parameters() const = 0;
  virtual void upload_trainable_parameters(const std::vector<float>& values) = 0;
  virtual std::vector<float> download_trainable_parameters() const = 0;
  virtual void upload_base_parameters(const std::vector<float>& values) = 0;
  virtual void upload_tensor(const std::string& name, const std::vector<float>& values) = 0;
  virtual void quantize_base_nf4(const Nf4HostQuantizer& quantize) = 0;
  virtual bool nf4_quantized() const = 0;
  virtual size_t host_parameter_bytes() const = 0;
  virtual size_t device_offset(const std::string& name) const = 0;
  virtual std::vector<float> download_gradients() const = 0;
  virtual void upload_gradients(const std::vector<float>& values) = 0;
  virtual double forward(const int32_t* inputs, const int32_t* targets, int B, int T,
                         const int32_t* positions, const int32_t* doc_ids, bool with_backward,
                         double scale) = 0;
  virtual void backward_mean_cross_entropy(double scale) = 0;
  virtual int target_count() const = 0;
  virtual void zero_grad() = 0;
  virtual double grad_norm() = 0;
  virtual void scale_grads(double factor) = 0;
  virtual void adamw_init(const CudaAdamW& hyper) = 0;
  virtual void adamw_step(double lr, int64_t step) = 0;
  virtual std::vector<float> download_adamw_state(int which, size_t tensor) const = 0;
  virtual void upload_adamw_state(int which, size_t tensor, const std::vector<float>& values) = 0;
  virtual std::vector<float> next_token_logits(const std::vector<int32_t>& tokens) = 0;
  virtual std::vector<int32_t> sample_labels(const int32_t* inputs, int B, int T, const int32_t* positions,
                                             const int32_t* doc_ids, uint64_t seed,
                                             uint64_t counter_base) = 0;
  virtual void synchronize() const = 0;
  virtual float* device_master() = 0;
  virtual float* device_gradients() = 0;
  virtual void* cuda_stream() = 0;
  virtual void refresh_working_copy() = 0;

  uint64_t dropout_seed = 0, dropout_counter = 0;
  bool training = true;
};

namespace {

template <typename T>
class ModelImpl final : public CudaModel::Impl {
 public:
  ModelImpl(const ModelConfig& c, const CudaModelOptions& o);
  ~ModelImpl() override;

  MemoryPlan memory_plan() const override;
  void upload_parameters(const std::vector<float>& values) override;
  std::vector<float> download_parameters() const override;
  void upload_trainable_parameters(const std::vector<float>& values) override;
  std::vector<float> download_trainable_parameters() const override;
  void upload_base_parameters(const std::vector<float>& values) override;
  void upload_tensor(const std::string& name, const std::vector<float>& values) override;
  void quantize_base_nf4(const Nf4HostQuantizer& quantize) override;
  bool nf4_quantized() const override { return nf4_ready_; }
  size_t host_parameter_bytes() const override;
  size_t device_offset(const std::string& name) const override {
    const size_t i = tensor_index(layout.at(name));
    if (nf4_of_tensor_[i] >= 0)
      throw std::invalid_argument(name + " is stored in NF4: it has no fp32 master weights on the device");
    if (!layout.tensors()[i].trainable) {
      throw std::invalid_argument(name +
                                  " is frozen: device_master() holds the trainable tensors only (in bf16 "
                                  "mode a frozen tensor's fp32 values are kept on the host)");
    }
    return dev_offset_[i];
  }
  std::vector<float> download_gradients() const override;
  void upload_gradients(const std::vector<float>& values) override;
  double forward(const int32_t* inputs, const int32_t* targets, int B, int T_len, const int32_t* positions,
                 const int32_t* doc_ids, bool with_backward, double scale) override;
  void backward_mean_cross_entropy(double scale) override;
  int target_count() const override { return target_count_; }
  void zero_grad() override;
  double grad_norm() override;
  void scale_grads(double factor) override;
  void adamw_init(const CudaAdamW& hyper) override;
  void adamw_step(double lr, int64_t step) override;
  std::vector<float> download_adamw_state(int which, size_t tensor) const override;
  void upload_adamw_state(int which, size_t tensor, const std::vector<float>& values) override;
  std::vector<float> next_token_logits(const std::vector<int32_t>& tokens) override;
  std::vector<int32_t> sample_labels(const int32_t* inputs, int B, int T_len, const int32_t* positions,
                                     const int32_t* doc_ids, uint64_t seed, uint64_t counter_base) override;
  void synchronize() const override { CUDA_CHECK(cudaStreamSynchronize(stream_)); }
  float* device_master() override { return master_; }
  float* device_gradients() override { return grads_; }
  void* cuda_stream() override { return stream_; }
  // bf16 mode: the trainable tensors only (the first master_elements_ of both arenas); a frozen tensor's
  // working copy is written by upload_parameters alone.
  void refresh_working_copy() override {
    if constexpr (kBf16) {
      const size_t M = master_elements_;
      if (M == 0) return;
      convert_kernel<<<blocks(M), kThreads, 0, stream_>>>(work_, master_, M);
      CUDA_CHECK_LAUNCH();
    }
  }

 private:
  static constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;

  // One NF4 base weight: its device pieces and the host copies that download_parameters dequantises.
  // Before quantize_base_nf4 its values are zeros (never uploaded), `raw` (uploaded, waiting), or its
  // codes (has_codes: uploaded with options.quantize_on_upload).
  struct Nf4Slot {
    size_t tensor = 0;  // index in layout.tensors()
    size_t n = 0, blocks = 0, blocks2 = 0;
    uint8_t* packed = nullptr;         // device: (n + 1) / 2 bytes
    uint8_t* qabsmax = nullptr;        // device, double quantisation: [blocks]
    float* state2 = nullptr;           // device, double quantisation: [blocks2]
    float* absmax = nullptr;           // device, without double quantisation: [blocks]
    float offset = 0.0f;               // double quantisation: the mean
    bool has_codes = false;            // the device pieces and the host copies below are set
    std::vector<uint8_t> host_packed;  // host copies once quantised (download_parameters dequantises them)
    std::vector<float> host_absmax;    // (double-dequantised)
    std::vector<float> raw;            // the uploaded values, waiting for quantize_base_nf4
  };

  struct LayerBuffers {
    T *norm1_out, *q, *k, *v, *q_normed, *k_normed, *q_rot, *k_rot, *attn_out, *mid, *norm2_out, *gate, *up,
        *act;
    float *norm1_mean, *norm1_rstd, *q_rstd, *k_rstd, *probs_or_lse, *norm2_mean, *norm2_rstd;
  };

  void plan(char* base, size_t* bytes);
  void upload_range(const float* layout_values, size_t begin, size_t end);
  // The constructor's device allocations (weights, NF4 storage, gradients, the arena, fixed tables).
  void allocate_device_buffers();
  // Frees every device buffer and the stream; safe on a partly built model.
  void release() noexcept;
  void upload_batch(const int32_t* inputs, const int32_t* targets, int B, int T_len, const int32_t* positions,
                    const int32_t* doc_ids);
  void forward_layers();
  void layer_forward(int l, const T* x, T* out, LayerBuffers& b);
  void layer_backward(int l, const T* x, LayerBuffers& b);
  void backward_from_head();  // after the classifier has written d_norm_out
  void classifier(bool with_backward, double scale);

  static constexpr size_t kNoOffset = static_cast<size_t>(-1);
  size_t tensor_index(const TensorInfo& t) const { return static_cast<size_t>(&t - layout.tensors().data()); }
  // The working copy of a tensor that has one (every tensor but the NF4 ones).
  const T* param(const std::string& name) const {
    const size_t off = dev_offset_[tensor_index(layout.at(name))];
    if (off == kNoOffset) throw std::logic_error("param: " + name + " is stored in NF4");
    return work_ + off;
  }
  float* grad(const std::string& name) {
    const TensorInfo& t = layout.at(name);
    return t.trainable ? grads_ + t.grad_offset : nullptr;
  }
  const std::string& name(int l, int i) const { return layer_names_[l][i]; }
  uint64_t dropout_stream(int layer, int site) const {
    return (dropout_counter * static_cast<uint64_t>(config.n_layers) + static_cast<uint64_t>(layer)) *
               kDropoutSites +
           static_cast<uint64_t>(site);
  }
  float dropout_p() const { return training ? static_cast<float>(config.dropout) : 0.0f; }
  bool flash() const {
    const int D = config.resolved_head_dim();
    return D == 64 || D == 128;
  }
  AttentionOptions attention_options(int l) const;

  // A parameter gradient for kernels that write T: the fp32 arena itself in fp32 mode, else a zeroed
  // T buffer whose contents finish_param_grad adds into the arena.
  T* param_grad_target(float* g, size_t n);
  void finish_param_grad(float* g, size_t n);
  void norm_forward(const std::string& prefix, T* residual_out, T* out, float* mean, float* rstd,
                    const T* residual_in, const T* branch, int rows, int width);
  void norm_backward(const std::string& prefix, T* dx, const T* dout, const T* x, const float* mean,
                     const float* rstd, int rows, int width);
  // A decoder-layer linear (layer::Tensor `tensor` of layer l): the dense base (matmul) or the NF4 base,
  // plus the LoRA adapter when the tensor has one. As llm::Model's layer_linear_forward/backward.
  void layer_linear_forward(int l, int tensor, T* out, const T* x, int in, int out_features, bool bias);
  void layer_linear_backward(int l, int tensor, T* dx, const T* dout, const T* x, int in, int out_features,
                             bool bias, bool accumulate_dx);
  // The absmax an NF4 slot computes with: its fp32 absmax, or (double quantisation) the absmax scratch
  // after nf4_double_dequantize.
  const float* nf4_absmax(const Nf4Slot& s);
  float lora_dropout_p() const { return training ? static_cast<float>(options.lora.dropout) : 0.0f; }

  cudaStream_t stream_ = nullptr;
  std::vector<std::vector<std::string>> layer_names_;
  int Bmax_ = 0, Tmax_ = 0, chunk_rows_ = 0;

  // Parameter, gradient and optimizer arenas. Every tensor but the NF4 ones has a working copy in work_
  // at dev_offset_: the trainable tensors first (layout order, so each one's device offset is its
  // grad_offset), then the frozen dense ones (layout order). bf16 mode: master_ holds the trainable
  // tensors only (master_elements_ = the first trainable_elements() of the working arena's order, at the
  // same offsets); a frozen tensor's values are its bf16 working copy, or, when bf16 cannot hold them,
  // the fp32 copy in host_exact_. fp32 mode: master_ == work_ holds every dense tensor (master_elements_
  // == dense_elements_). With nothing frozen and nothing quantised the device offsets are the layout
  // offsets.
  std::vector<size_t> dev_offset_;  // per layout tensor; kNoOffset for an NF4 tensor
  size_t dense_elements_ = 0, master_elements_ = 0;
  // bf16 mode, per layout tensor: the exact fp32 values of a frozen dense tensor whose last upload held a
  // value that bf16 cannot (see bf16_holds_exactly); empty otherwise.
  std::vector<std::vector<float>> host_exact_;
  // Whether tensor i's values live outside master_: a frozen dense tensor in bf16 mode.
  bool frozen_without_master(size_t i) const {
    return kBf16 && !layout.tensors()[i].trainable && nf4_of_tensor_[i] < 0;
  }
  // QLoRA: the current values of an NF4 tensor (dequantised codes, the waiting values, or zeros).
  void nf4_current_values(const Nf4Slot& s, float* out) const;
  // QLoRA: n = s.n values quantised for slot s; throws std::invalid_argument, naming `caller`, when the
  // quantiser returns pieces of the wrong sizes. Changes nothing.
  Nf4HostWeights nf4_quantize_slot(const Nf4Slot& s, const float* w, const Nf4HostQuantizer& quantize,
                                   const char* caller) const;
  // QLoRA: copies q's codes and absmax into s's device pieces and keeps the host copies.
  void nf4_install(Nf4Slot& s, Nf4HostWeights& q);
  float* master_ = nullptr;
  T* work_ = nullptr;  // == master_ in fp32 mode
  float* grads_ = nullptr;
  float *adam_m_ = nullptr, *adam_v_ = nullptr;
  CudaAdamW adam_;
  std::vector<const TensorInfo*> trainable_;

  // The activation arena and everything carved from it.
  char* arena_ = nullptr;
  size_t arena_bytes_ = 0, activation_bytes_ = 0;
  T* residuals_ = nullptr;
  size_t residual_stride_ = 0;
  std::vector<LayerBuffers> layers_;
  T *final_norm_out_ = nullptr, *branch_ = nullptr;
  float *final_mean_ = nullptr, *final_rstd_ = nullptr, *logprobs_ = nullptr, *lse_ = nullptr,
        *loss_ = nullptr;
  T *d_residual_ = nullptr, *d_norm_out_ = nullptr, *d_q_ = nullptr, *d_k_ = nullptr, *d_v_ = nullptr,
    *d_attn_out_ = nullptr, *d_branch_ = nullptr, *d_q_pre_ = nullptr, *d_k_pre_ = nullptr,
    *d_gate_ = nullptr, *d_up_ = nullptr, *d_act_ = nullptr;
  float* attn_scratch_ = nullptr;  // dscores [B,Hq,T,T] (simple) or delta [B,Hq,T] (flash)
  T* classifier_scratch_ = nullptr;
  float* norm_scratch_ = nullptr;
  size_t norm_scratch_floats_ = 0;
  void* embed_scratch_ = nullptr;
  size_t embed_scratch_bytes_ = 0;
  T* grad_tmp_ = nullptr;  // bf16 only: one parameter gradient written by a T kernel
  size_t grad_tmp_elems_ = 0;
  double* norm_partials_ = nullptr;
  size_t norm_partials_doubles_ = 0;
  float *norm_out_ = nullptr, *clip_out_ = nullptr;
  int32_t *d_inputs_ = nullptr, *d_targets_ = nullptr, *d_positions_ = nullptr, *d_doc_ids_ = nullptr;
  // Fixed tables.
  float *rope_cos_ = nullptr, *rope_sin_ = nullptr, *alibi_ = nullptr;
  T* sinusoidal_ = nullptr;

  // LoRA.
  std::vector<LoraModule> lora_modules_;
  std::vector<std::vector<int>> lora_index_;  // [layer][layer::Tensor] -> index into lora_modules_, or -1
  float lora_scale_ = 0.0f;
  int lora_max_in_ = 0;                          // widest adapter input (the x~ / dx~ scratch row)
  size_t lora_h_stride_ = 0;                     // Nmax * r: each adapter's saved h
  T* lora_h_ = nullptr;                          // activations: h of every adapter, every layer
  T *lora_dh_ = nullptr, *lora_work_ = nullptr;  // scratch: dh [N, r]; x~ then dx~ [N, in] (dropout only)

  // QLoRA: the NF4 base weights (one slot per tensor of nf4_quantized_tensors).
  std::vector<Nf4Slot> nf4_;
  std::vector<std::vector<int>> nf4_index_;  // [layer][layer::Tensor] -> index into nf4_, or -1
  std::vector<int> nf4_of_tensor_;           // per layout tensor: index into nf4_, or -1
  char* nf4_storage_ = nullptr;              // one device allocation for every slot's pieces
  bool nf4_ready_ = false;                   // quantize_base_nf4 has run
  T* nf4_scratch_ = nullptr;                 // dequantised weight [O, I] of the largest NF4 matrix
  size_t nf4_scratch_elems_ = 0;
  float* nf4_absmax_scratch_ = nullptr;  // double quantisation: the layer's absmax
  size_t nf4_max_blocks_ = 0;

  int B_ = 0, T_ = 0, target_count_ = 0;
  bool has_targets_ = false, has_doc_ids_ = false;
};

template <typename T>
ModelImpl<T>::ModelImpl(const ModelConfig& c, const CudaModelOptions& o) : Impl(c, o) {
  const std::vector<std::string> problems = validate_model_config(config);
  if (!problems.empty()) throw ConfigError(problems.front());
  if (options.max_seq <= 0) options.max_seq = config.max_seq_len;
  if (options.max_batch <= 0) throw std::invalid_argument("max_batch must be positive");
  if (options.max_seq > config.max_seq_len) {
    throw std::invalid_argument("sequence length " + std::to_string(options.max_seq) +
                                " exceeds max_seq_len " + std::to_string(config.max_seq_len));
  }
  if (options.quant.nf4 && !options.lora.enabled) {
    throw ConfigError(
        "NF4 quantisation (load_in_4bit) needs LoRA (use_lora: true): the quantised base weights are frozen");
  }
  if (options.quant.nf4 && options.quant.blocksize <= 0)
    throw std::invalid_argument("NF4 blocksize must be positive");
  // The layout of llm::Model: the base tensors, then every adapter's A and B (the base frozen).
  if (options.lora.enabled) {
    validate_lora_settings(options.lora);
    lora_modules_ = ::llm::lora_modules(config, options.lora);
    add_lora_tensors(layout, lora_modules_, options.lora.r);
    lora_scale_ = options.lora.scale();
  }
  Bmax_ = options.max_batch;
  Tmax_ = options.max_seq;
  const size_t Nmax = static_cast<size_t>(Bmax_) * Tmax_;
  const int V = config.vocab_size;
  if (options.classifier_chunk_rows > 0) {
    chunk_rows_ = options.classifier_chunk_rows;
  } else {
    const size_t row_bytes = static_cast<size_t>(classifier_padded_vocab(V)) * sizeof(T);
    chunk_rows_ = static_cast<int>(std::clamp<size_t>((64u << 20) / row_bytes, 1, 4096));
  }
  chunk_rows_ = static_cast<int>(std::min<size_t>(chunk_rows_, Nmax));

  layer_names_.resize(config.n_layers);
  for (int l = 0; l < config.n_layers; ++l)
    for (int i = 0; i < kTensorCount; ++i) layer_names_[l].push_back(layer_tensor_name(l, tensor_suffix(i)));
  for (const auto& t : layout.tensors())
    if (t.trainable) trainable_.push_back(&t);

  lora_index_.assign(config.n_layers, std::vector<int>(kTensorCount, -1));
  for (size_t i = 0; i < lora_modules_.size(); ++i) {
    const LoraModule& m = lora_modules_[i];
    lora_index_[m.layer][m.tensor] = static_cast<int>(i);
    lora_max_in_ = std::max(lora_max_in_, m.in_features);
  }
  lora_h_stride_ = lora_modules_.empty() ? 0 : Nmax * static_cast<size_t>(options.lora.r);

  // NF4 slots, and the device offsets of everything else.
  const size_t n_tensors = layout.tensors().size();
  nf4_of_tensor_.assign(n_tensors, -1);
  nf4_index_.assign(config.n_layers, std::vector<int>(kTensorCount, -1));
  if (options.quant.nf4) {
    const bool dq = options.quant.double_quant;
    for (const std::string& nm : nf4_quantized_tensors(config)) {
      const TensorInfo& t = layout.at(nm);
      Nf4Slot slot;
      slot.tensor = tensor_index(t);
      slot.n = static_cast<size_t>(t.numel);
      slot.blocks = nf4_blocks(slot.n, options.quant.blocksize);
      slot.blocks2 = dq ? nf4_blocks(slot.blocks, kNf4NestedBlockSize) : 0;
      nf4_scratch_elems_ = std::max(nf4_scratch_elems_, slot.n);
      if (dq) nf4_max_blocks_ = std::max(nf4_max_blocks_, slot.blocks);
      nf4_of_tensor_[slot.tensor] = static_cast<int>(nf4_.size());
      nf4_.push_back(std::move(slot));
    }
    for (int l = 0; l < config.n_layers; ++l) {
      for (int i = 0; i < kTensorCount; ++i) {
        const std::string w = name(l, i) + ".weight";
        if (layout.contains(w)) nf4_index_[l][i] = nf4_of_tensor_[tensor_index(layout.at(w))];
      }
    }
  }
  // Device offsets: the trainable tensors first, then the frozen dense ones (see dev_offset_). The
  // layout is fixed from here on (layout() is const): which tensors train cannot change after
  // construction.
  dev_offset_.assign(n_tensors, kNoOffset);
  host_exact_.assign(n_tensors, {});
  for (size_t i = 0; i < n_tensors; ++i) {
    const TensorInfo& t = layout.tensors()[i];
    if (!t.trainable) continue;
    if (nf4_of_tensor_[i] >= 0) throw std::logic_error(t.name + " is stored in NF4 and cannot be trainable");
    dev_offset_[i] = dense_elements_;
    dense_elements_ += static_cast<size_t>(t.numel);
  }
  if (dense_elements_ != layout.trainable_elements())
    throw std::logic_error("CudaModel: the trainable tensors do not add up to trainable_elements()");
  for (size_t i = 0; i < n_tensors; ++i) {
    const TensorInfo& t = layout.tensors()[i];
    if (t.trainable || nf4_of_tensor_[i] >= 0) continue;
    dev_offset_[i] = dense_elements_;
    dense_elements_ += static_cast<size_t>(t.numel);
  }
  master_elements_ = kBf16 ? layout.trainable_elements() : dense_elements_;

  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  // A throw from here on (out of memory, typically) runs no destructor: free what was allocated.
  try {
    allocate_device_buffers();
  } catch (...) {
    release();
    throw;
  }
}

template <typename T>
void ModelImpl<T>::allocate_device_buffers() {
  const size_t P = dense_elements_, M = master_elements_, G = layout.trainable_elements();
  master_ = static_cast<float*>(
      device_alloc(M * sizeof(float), "fp32 master weights", "use a smaller model or another GPU"));
  if constexpr (kBf16) {
    work_ = static_cast<T*>(device_alloc(P * sizeof(T), "bf16 working weights", "use a smaller model"));
  } else {
    work_ = master_;
  }
  // Zero until uploaded: a caller may upload the adapters now and the base later.
  CUDA_CHECK(cudaMemsetAsync(master_, 0, M * sizeof(float), stream_));
  if (static_cast<void*>(work_) != static_cast<void*>(master_))
    CUDA_CHECK(cudaMemsetAsync(work_, 0, P * sizeof(T), stream_));
  if (!nf4_.empty()) {
    // Every slot's codes and absmax (or qabsmax and state2) carved from one allocation.
    auto carve = [this](char* base) {
      Carver k(base);
      for (Nf4Slot& slot : nf4_) {
        slot.packed = k.take<uint8_t>(nf4_packed_bytes(slot.n));
        if (options.quant.double_quant) {
          slot.qabsmax = k.take<uint8_t>(slot.blocks);
          slot.state2 = k.take<float>(slot.blocks2);
        } else {
          slot.absmax = k.take<float>(slot.blocks);
        }
      }
      return k.bytes();
    };
    const size_t nf4_bytes = carve(nullptr);
    nf4_storage_ = static_cast<char*>(device_alloc(nf4_bytes, "NF4 base weights", "use a smaller model"));
    carve(nf4_storage_);
    CUDA_CHECK(cudaMemsetAsync(nf4_storage_, 0, nf4_bytes, stream_));
  }
  grads_ = static_cast<float*>(
      device_alloc(G * sizeof(float), "fp32 gradients", "use a smaller model or freeze tensors (LoRA)"));
  CUDA_CHECK(cudaMemsetAsync(grads_, 0, G * sizeof(float), stream_));

  size_t bytes = 0;
  plan(nullptr, &bytes);
  arena_ = static_cast<char*>(
      device_alloc(bytes, "activation arena", "lower batch_size or seq_len, or set \"recompute\": true"));
  arena_bytes_ = bytes;
  plan(arena_, &bytes);

  // Fixed tables.
  const int maxT = config.max_seq_len;
  if (config.uses_rope()) upload_rope_tables(rope_cos_, rope_sin_, rope_params(config), maxT, stream_);
  if (config.positional_encoding == "sinusoidal")
    upload_sinusoidal_table(sinusoidal_, maxT, config.d_model, stream_);
  if (config.positional_encoding == "alibi") {
    const std::vector<double> slopes = ref::alibi_slopes(config.n_heads);
    std::vector<float> f(slopes.begin(), slopes.end());
    CUDA_CHECK(cudaMemcpyAsync(alibi_, f.data(), f.size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

template <typename T>
ModelImpl<T>::~ModelImpl() {
  release();
}

template <typename T>
void ModelImpl<T>::release() noexcept {
  // Errors are ignored here: a destructor must not throw, and the process may be tearing down CUDA.
  if (stream_) cudaStreamSynchronize(stream_);
  cudaFree(arena_);
  cudaFree(adam_m_);
  cudaFree(adam_v_);
  cudaFree(grads_);
  if (static_cast<void*>(work_) != static_cast<void*>(master_)) cudaFree(work_);
  cudaFree(master_);
  cudaFree(nf4_storage_);
  if (stream_) cudaStreamDestroy(stream_);
  arena_ = nullptr;
  adam_m_ = adam_v_ = grads_ = master_ = nullptr;
  work_ = nullptr;
  nf4_storage_ = nullptr;
  stream_ = nullptr;
}

// Lays out the activation arena; with base == nullptr only the size is computed.
template <typename T>
void ModelImpl<T>::plan(char* base, size_t* bytes) {
  const ModelConfig& c = config;
  const int B = Bmax_, Tm = Tmax_, C = c.d_model, V = c.vocab_size, D = c.resolved_head_dim();
  const size_t N = static_cast<size_t>(B) * Tm;
  const LayerActivationSizes ls = layer_activation_sizes(c, B, Tm);
  const GlobalActivationSizes gs = global_activation_sizes(c, B, Tm);
  const size_t rows_attn = static_cast<size_t>(B) * c.n_heads * Tm;
  const size_t probs = flash() ? rows_attn : rows_attn * Tm;
  Carver k(base);

  residual_stride_ = N * C;
  residuals_ = k.take<T>(residual_stride_ * (c.n_layers + 1));
  const int saved = options.recompute ? 1 : c.n_layers;
  layers_.assign(saved, LayerBuffers{});
  for (auto& b : layers_) {
    b.norm1_out = k.take<T>(ls.norm1_out);
    b.norm1_mean = k.take<float>(ls.norm1_mean);
    b.norm1_rstd = k.take<float>(ls.norm1_rstd);
    b.q = k.take<T>(ls.q);
    b.k = k.take<T>(ls.k);
    b.v = k.take<T>(ls.v);
    b.q_normed = k.take<T>(ls.q_normed);
    b.k_normed = k.take<T>(ls.k_normed);
    b.q_rstd = k.take<float>(ls.q_rstd);
    b.k_rstd = k.take<float>(ls.k_rstd);
    b.q_rot = k.take<T>(ls.q_rot);
    b.k_rot = k.take<T>(ls.k_rot);
    b.probs_or_lse = k.take<float>(probs);
    b.attn_out = k.take<T>(ls.attn_out);
    b.mid = k.take<T>(ls.mid);
    b.norm2_out = k.take<T>(ls.norm2_out);
    b.norm2_mean = k.take<float>(ls.norm2_mean);
    b.norm2_rstd = k.take<float>(ls.norm2_rstd);
    b.gate = k.take<T>(ls.gate);
    b.up = k.take<T>(ls.up);
    b.act = k.take<T>(ls.act);
  }
  lora_h_ = k.take<T>(lora_modules_.size() * lora_h_stride_);
  final_norm_out_ = k.take<T>(gs.final_norm_out);
  final_mean_ = k.take<float>(N);
  final_rstd_ = k.take<float>(N);
  logprobs_ = k.take<float>(N);
  lse_ = k.take<float>(N);
  loss_ = k.take<float>(1);
  activation_bytes_ = k.bytes();

  // Backward and kernel scratch.
  branch_ = k.take<T>(gs.branch);
  d_residual_ = k.take<T>(gs.d_residual);
  d_norm_out_ = k.take<T>(gs.d_norm_out);
  d_q_ = k.take<T>(gs.d_q);
  d_k_ = k.take<T>(gs.d_k);
  d_v_ = k.take<T>(gs.d_v);
  d_attn_out_ = k.take<T>(gs.d_attn_out);
  d_branch_ = k.take<T>(gs.d_branch);
  d_q_pre_ = k.take<T>(gs.d_q_pre);
  d_k_pre_ = k.take<T>(gs.d_k_pre);
  d_gate_ = k.take<T>(gs.d_gate);
  d_up_ = k.take<T>(gs.d_up);
  d_act_ = k.take<T>(gs.d_act);
  attn_scratch_ = k.take<float>(probs);
  classifier_scratch_ = k.take<T>(
      std::max(classifier_scratch_elements(chunk_rows_, V), static_cast<size_t>(classifier_padded_vocab(V))));
  norm_scratch_floats_ = norm_scratch_floats_up_to(N, C);
  if (c.qk_norm) {
    norm_scratch_floats_ = std::max({norm_scratch_floats_, norm_scratch_floats_up_to(N * c.n_heads, D),
                                     norm_scratch_floats_up_to(N * c.n_kv_heads, D)});
  }
  norm_scratch_ = k.take<float>(norm_scratch_floats_);
  // The embedding gradients' scratch, only for embeddings that train (LoRA freezes them).
  const bool embed_trains = layout.at("model.embed_tokens.weight").trainable;
  const bool positions_train =
      c.positional_encoding == "learned" && layout.at("model.embed_positions.weight").trainable;
  embed_scratch_bytes_ = embed_trains ? embedding_backward_scratch_bytes(static_cast<int>(N), V) : 0;
  if (positions_train)
    embed_scratch_bytes_ = std::max(
        embed_scratch_bytes_, position_embedding_backward_scratch_bytes(static_cast<int>(N), c.max_seq_len));
  embed_scratch_ = k.take<char>(embed_scratch_bytes_);
  if constexpr (kBf16) {
    // The largest tensor a T-writing kernel produces a gradient for: the token embedding (or positions)
    // when it trains, else a norm's weight and bias (2 x width).
    grad_tmp_elems_ = 2 * static_cast<size_t>(std::max(C, D));
    if (embed_trains) grad_tmp_elems_ = std::max(grad_tmp_elems_, static_cast<size_t>(V) * C);
    if (positions_train) grad_tmp_elems_ = std::max(grad_tmp_elems_, static_cast<size_t>(c.max_seq_len) * C);
    grad_tmp_ = k.take<T>(grad_tmp_elems_);
  }
  if (!lora_modules_.empty()) {
    lora_dh_ = k.take<T>(N * static_cast<size_t>(options.lora.r));
    if (options.lora.dropout > 0.0) lora_work_ = k.take<T>(N * static_cast<size_t>(lora_max_in_));
  }
  nf4_scratch_ = k.take<T>(nf4_scratch_elems_);
  nf4_absmax_scratch_ = k.take<float>(nf4_max_blocks_);
  norm_partials_doubles_ = grad_norm_scratch_doubles(std::max<size_t>(layout.trainable_elements(), 1));
  norm_partials_ = k.take<double>(norm_partials_doubles_);
  norm_out_ = k.take<float>(1);
  clip_out_ = k.take<float>(1);
  d_inputs_ = k.take<int32_t>(N);
  d_targets_ = k.take<int32_t>(N);
  d_positions_ = k.take<int32_t>(N);
  d_doc_ids_ = k.take<int32_t>(N);
  if (c.uses_rope()) {
    const size_t half = static_cast<size_t>(c.max_seq_len) * (D / 2);
    rope_cos_ = k.take<float>(half);
    rope_sin_ = k.take<float>(half);
  }
  if (c.positional_encoding == "sinusoidal") sinusoidal_ = k.take<T>(static_cast<size_t>(c.max_seq_len) * C);
  if (c.positional_encoding == "alibi") alibi_ = k.take<float>(c.n_heads);
  *bytes = k.bytes();
}

template <typename T>
MemoryPlan ModelImpl<T>::memory_plan() const {
  MemoryPlan p;
  const size_t P = dense_elements_, G = layout.trainable_elements();
  // Bytes per dense (non-NF4) parameter on the device. bf16 mode: 2 (bf16 working copy) for every one,
  // plus 4 (fp32 master) for a trainable one: 6 trainable, 2 frozen (its fp32 values stay on the host).
  // fp32 mode: 4 (the working copy is the master).
  p.parameters = kBf16 ? P * sizeof(T) + master_elements_ * sizeof(float) : P * sizeof(float);
  p.gradients = G * sizeof(float);
  p.optimizer_state = adam_m_ ? 2 * G * sizeof(float) : 0;
  p.activations = activation_bytes_;
  p.scratch = arena_bytes_ - activation_bytes_;
  // NF4, counted as llm::Model::memory_plan counts it: per tensor of n values n/2 code bytes, and per block
  // an fp32 absmax, or with double quantisation an 8-bit code plus an fp32 scale per 256 blocks and one
  // fp32 offset (the device pieces' 256-byte alignment is left out).
  for (const Nf4Slot& s : nf4_) {
    p.nf4_params += s.n;
    p.nf4_base += nf4_packed_bytes(s.n);
    p.nf4_base += options.quant.double_quant ? s.blocks + 4 * s.blocks2 + 4 : 4 * s.blocks;
  }
  return p;
}

template <typename T>
void ModelImpl<T>::upload_parameters(const std::vector<float>& values) {
  const size_t P = layout.total_elements();
  if (values.size() != P) {
    throw std::invalid_argument("parameter count " + std::to_string(values.size()) +
                                " does not match the model's " + std::to_string(P));
  }
  upload_range(values.data(), 0, P);
}

template <typename T>
void ModelImpl<T>::upload_base_parameters(const std::vector<float>& values) {
  if (values.size() > layout.total_elements()) {
    throw std::invalid_argument("base parameter count " + std::to_string(values.size()) +
                                " exceeds the model's " + std::to_string(layout.total_elements()));
  }
  upload_range(values.data(), 0, values.size());
}

template <typename T>
void ModelImpl<T>::upload_tensor(const std::string& name, const std::vector<float>& values) {
  const TensorInfo& t = layout.at(name);
  if (values.size() != static_cast<size_t>(t.numel)) {
    throw std::invalid_argument("upload_tensor: " + std::to_string(values.size()) + " values for " + name);
  }
  upload_range(values.data(), t.offset, t.offset + values.size());
}

// The tensors within elements [begin, end) of the layout; layout_values[0] is element `begin`.
template <typename T>
void ModelImpl<T>::upload_range(const float* layout_values, size_t begin, size_t end) {
  const auto within = [begin, end](const TensorInfo& t) {
    return t.offset >= begin && t.offset + static_cast<size_t>(t.numel) <= end;
  };
  for (const TensorInfo& t : layout.tensors()) {
    const size_t t_end = t.offset + static_cast<size_t>(t.numel);
    if (!within(t) && t.offset < end && t_end > begin) {
      throw std::invalid_argument("upload: elements [" + std::to_string(begin) + ", " + std::to_string(end) +
                                  ") cut tensor " + t.name);
    }
  }
  const auto at = [layout_values, begin](size_t offset) { return layout_values + (offset - begin); };
  // NF4 tensors, every one of the range checked (and with options.quantize_on_upload quantised) before
  // anything changes. Values equal to a tensor's current, dequantised ones keep its codes: quantising
  // dequantised values again is not guaranteed to give the same codes (with double quantisation it does
  // not), and a read written back must change nothing. Other values wait on the host before
  // quantize_base_nf4 (or are quantised now, with options.quantize_on_upload) and are refused after it.
  std::vector<std::pair<size_t, Nf4HostWeights>> fresh_codes;  // (index into nf4_, codes)
  std::vector<float> current;
  for (size_t k = 0; k < nf4_.size(); ++k) {
    const Nf4Slot& s = nf4_[k];
    const TensorInfo& t = layout.tensors()[s.tensor];
    if (!within(t) || (!s.has_codes && !options.quantize_on_upload)) continue;  // waiting values
    if (s.has_codes) {
      current.resize(s.n);
      nf4_current_values(s, current.data());
      if (same_values(current.data(), at(t.offset), s.n)) continue;
    }
    if (nf4_ready_) {
      throw std::invalid_argument(
          "upload_parameters: " + t.name +
          " is stored in NF4 and the values differ from its dequantised ones; base weights must be "
          "uploaded before quantize_base_nf4()");
    }
    fresh_codes.emplace_back(k, nf4_quantize_slot(s, at(t.offset), options.quantize_on_upload, "upload"));
  }
  // bf16 mode, frozen dense tensors: the working copy converted on the device (convert_kernel, as
  // refresh_working_copy converts the trainable ones) from a staging buffer of at most kStageElements
  // floats, freed on return; an exact fp32 host copy only when bf16 cannot hold the values.
  constexpr size_t kStageElements = size_t{1} << 22;  // 16 MB
  DeviceStage stage(stream_);
  size_t stage_elements = 0;
  if constexpr (kBf16) {
    for (size_t i = 0; i < layout.tensors().size(); ++i)
      if (frozen_without_master(i) && within(layout.tensors()[i]))
        stage_elements = std::max(stage_elements, static_cast<size_t>(layout.tensors()[i].numel));
    stage_elements = std::min(stage_elements, kStageElements);
    if (stage_elements > 0) {
      stage.ptr = static_cast<float*>(
          device_alloc(stage_elements * sizeof(float), "parameter upload staging", "use a smaller model"));
    }
  }
  for (auto& [k, q] : fresh_codes) nf4_install(nf4_[k], q);
  for (size_t i = 0; i < layout.tensors().size(); ++i) {
    const TensorInfo& t = layout.tensors()[i];
    if (!within(t)) continue;
    const size_t n = static_cast<size_t>(t.numel);
    const float* src = at(t.offset);
    if (nf4_of_tensor_[i] >= 0) {  // quantised above, or waiting on the host
      if (!nf4_ready_ && !options.quantize_on_upload) nf4_[nf4_of_tensor_[i]].raw.assign(src, src + n);
      continue;
    }
    if (!frozen_without_master(i)) {  // a device master (every dense tensor in fp32 mode)
      CUDA_CHECK(
          cudaMemcpyAsync(master_ + dev_offset_[i], src, n * sizeof(float), cudaMemcpyHostToDevice, stream_));
      continue;
    }
    if constexpr (kBf16) {
      if (bf16_holds_exactly(src, n)) {
        std::vector<float>().swap(host_exact_[i]);
      } else {
        host_exact_[i].assign(src, src + n);
      }
      // Each chunk's copy into the staging buffer is ordered after the previous chunk's conversion on
      // the stream.
      for (size_t done = 0; done < n; done += stage_elements) {
        const size_t m = std::min(stage_elements, n - done);
        CUDA_CHECK(
            cudaMemcpyAsync(stage.ptr, src + done, m * sizeof(float), cudaMemcpyHostToDevice, stream_));
        convert_kernel<<<blocks(m), kThreads, 0, stream_>>>(work_ + dev_offset_[i] + done, stage.ptr, m);
        CUDA_CHECK_LAUNCH();
      }
    }
  }
  refresh_working_copy();
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

template <typename T>
std::vector<float> ModelImpl<T>::download_parameters() const {
  std::vector<float> out(layout.total_elements());
  std::vector<T> working;  // bf16 mode: a frozen tensor's working copy
  for (size_t i = 0; i < layout.tensors().size(); ++i) {
    if (nf4_of_tensor_[i] >= 0) continue;
    const TensorInfo& t = layout.tensors()[i];
    const size_t n = static_cast<size_t>(t.numel);
    float* dst = out.data() + t.offset;
    if (!frozen_without_master(i)) {
      CUDA_CHECK(
          cudaMemcpyAsync(dst, master_ + dev_offset_[i], n * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    } else if (!host_exact_[i].empty()) {  // values bf16 cannot hold: the host copy
      std::copy(host_exact_[i].begin(), host_exact_[i].end(), dst);
    } else {  // the working copy holds the values exactly
      working.resize(n);
      CUDA_CHECK(cudaMemcpyAsync(working.data(), work_ + dev_offset_[i], n * sizeof(T),
                                 cudaMemcpyDeviceToHost, stream_));
      CUDA_CHECK(cudaStreamSynchronize(stream_));
      for (size_t j = 0; j < n; ++j) dst[j] = static_cast<float>(working[j]);
    }
  }
  // The NF4 tensors: their dequantised values (bit for bit the CPU model's), or the values waiting for
  // quantisation.
  for (const Nf4Slot& s : nf4_) nf4_current_values(s, out.data() + layout.tensors()[s.tensor].offset);
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  return out;
}

// Trainable tensors are never NF4 and always have a device master (see dev_offset_).
template <typename T>
void ModelImpl<T>::upload_trainable_parameters(const std::vector<float>& values) {
  if (values.size() != layout.trainable_elements()) {
    throw std::invalid_argument("trainable parameter count " + std::to_string(values.size()) +
                                " does not match the model's " + std::to_string(layout.trainable_elements()));
  }
  for (size_t i = 0; i < layout.tensors().size(); ++i) {
    const TensorInfo& t = layout.tensors()[i];
    if (!t.trainable) continue;
    CUDA_CHECK(cudaMemcpyAsync(master_ + dev_offset_[i], values.data() + t.grad_offset,
                               static_cast<size_t>(t.numel) * sizeof(float), cudaMemcpyHostToDevice,
                               stream_));
  }
  refresh_working_copy();
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

template <typename T>
std::vector<float> ModelImpl<T>::download_trainable_parameters() const {
  std::vector<float> out(layout.trainable_elements());
  for (size_t i = 0; i < layout.tensors().size(); ++i) {
    const TensorInfo& t = layout.tensors()[i];
    if (!t.trainable) continue;
    CUDA_CHECK(cudaMemcpyAsync(out.data() + t.grad_offset, master_ + dev_offset_[i],
                               static_cast<size_t>(t.numel) * sizeof(float), cudaMemcpyDeviceToHost,
                               stream_));
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  return out;
}

template <typename T>
void ModelImpl<T>::nf4_current_values(const Nf4Slot& s, float* out) const {
  if (s.has_codes) {
    nf4_dequantize_host(out, s.host_packed.data(), s.host_absmax.data(), s.n, options.quant.blocksize);
  } else if (!s.raw.empty()) {
    std::copy(s.raw.begin(), s.raw.end(), out);
  } else {
    std::fill(out, out + s.n, 0.0f);
  }
}

template <typename T>
Nf4HostWeights ModelImpl<T>::nf4_quantize_slot(const Nf4Slot& s, const float* w,
                                               const Nf4HostQuantizer& quantize, const char* caller) const {
  Nf4HostWeights q = quantize(w, s.n, options.quant);
  if (q.packed.size() != nf4_packed_bytes(s.n) || q.absmax.size() != s.blocks ||
      (options.quant.double_quant && (q.qabsmax.size() != s.blocks || q.state2.size() != s.blocks2))) {
    throw std::invalid_argument(std::string(caller) + ": the quantiser returned misshapen NF4 data for " +
                                layout.tensors()[s.tensor].name);
  }
  return q;
}

template <typename T>
void ModelImpl<T>::nf4_install(Nf4Slot& s, Nf4HostWeights& q) {
  CUDA_CHECK(cudaMemcpyAsync(s.packed, q.packed.data(), q.packed.size(), cudaMemcpyHostToDevice, stream_));
  if (options.quant.double_quant) {
    CUDA_CHECK(
        cudaMemcpyAsync(s.qabsmax, q.qabsmax.data(), q.qabsmax.size(), cudaMemcpyHostToDevice, stream_));
    CUDA_CHECK(cudaMemcpyAsync(s.state2, q.state2.data(), q.state2.size() * sizeof(float),
                               cudaMemcpyHostToDevice, stream_));
    s.offset = q.offset;
  } else {
    CUDA_CHECK(cudaMemcpyAsync(s.absmax, q.absmax.data(), q.absmax.size() * sizeof(float),
                               cudaMemcpyHostToDevice, stream_));
  }
  // Wait for the copies before q's buffers move or go.
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  s.host_packed = std::move(q.packed);
  s.host_absmax = std::move(q.absmax);
  s.has_codes = true;
}

template <typename T>
void ModelImpl<T>::quantize_base_nf4(const Nf4HostQuantizer& quantize) {
  if (!options.quant.nf4) throw std::logic_error("quantize_base_nf4: the model was not built with quant.nf4");
  if (!quantize) throw std::invalid_argument("quantize_base_nf4: no quantiser");
  // Quantise first (the current values: waiting ones or zeros, or after quantisation the dequantised
  // ones), checking every shape, then install: a throw changes nothing. Codes quantised at upload stay.
  std::vector<Nf4HostWeights> q(nf4_.size());
  std::vector<float> w;
  for (size_t i = 0; i < nf4_.size(); ++i) {
    const Nf4Slot& s = nf4_[i];
    if (s.has_codes && !nf4_ready_) continue;
    w.resize(s.n);
    nf4_current_values(s, w.data());
    q[i] = nf4_quantize_slot(s, w.data(), quantize, "quantize_base_nf4");
  }
  for (size_t i = 0; i < nf4_.size(); ++i) {
    Nf4Slot& s = nf4_[i];
    if (s.has_codes && !nf4_ready_) continue;
    nf4_install(s, q[i]);
    std::vector<float>().swap(s.raw);
  }
  nf4_ready_ = true;
}

template <typename T>
size_t ModelImpl<T>::host_parameter_bytes() const {
  size_t bytes = 0;
  for (const std::vector<float>& v : host_exact_) bytes += v.size() * sizeof(float);
  for (const Nf4Slot& s : nf4_) {
    bytes += s.raw.size() * sizeof(float) + s.host_packed.size() + s.host_absmax.size() * sizeof(float);
  }
  return bytes;
}

template <typename T>
std::vector<float> ModelImpl<T>::download_gradients() const {
  std::vector<float> out(layout.trainable_elements());
  CUDA_CHECK(
      cudaMemcpyAsync(out.data(), grads_, out.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  return out;
}

template <typename T>
void ModelImpl<T>::upload_gradients(const std::vector<float>& values) {
  const size_t G = layout.trainable_elements();
  if (values.size() != G) {
    throw std::invalid_argument("gradient count " + std::to_string(values.size()) +
                                " does not match the model's " + std::to_string(G));
  }
  if (G == 0) return;
  CUDA_CHECK(cudaMemcpyAsync(grads_, values.data(), G * sizeof(float), cudaMemcpyHostToDevice, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

template <typename T>
void ModelImpl<T>::zero_grad() {
  CUDA_CHECK(cudaMemsetAsync(grads_, 0, layout.trainable_elements() * sizeof(float), stream_));
}

template <typename T>
double ModelImpl<T>::grad_norm() {
  const size_t G = layout.trainable_elements();
  if (G == 0) return 0.0;
  global_grad_norm(norm_out_, clip_out_, norm_partials_, norm_partials_doubles_, grads_, G, 0.0f, stream_);
  float norm = 0.0f;
  CUDA_CHECK(cudaMemcpyAsync(&norm, norm_out_, sizeof(float), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  return norm;
}

template <typename T>
void ModelImpl<T>::scale_grads(double factor) {
  const size_t G = layout.trainable_elements();
  if (G == 0) return;
  scale_kernel<<<blocks(G), kThreads, 0, stream_>>>(grads_, G, factor);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void ModelImpl<T>::adamw_init(const CudaAdamW& hyper) {
  if (hyper.weight_decay.size() != trainable_.size() || hyper.lr_scale.size() != trainable_.size()) {
    throw std::invalid_argument("adamw_init: expected one weight decay and lr scale per trainable tensor (" +
                                std::to_string(trainable_.size()) + ")");
  }
  adam_ = hyper;
  const size_t G = layout.trainable_elements();
  if (!adam_m_) {
    adam_m_ =
        static_cast<float*>(device_alloc(G * sizeof(float), "AdamW first moments", "use a smaller model"));
    adam_v_ =
        static_cast<float*>(device_alloc(G * sizeof(float), "AdamW second moments", "use a smaller model"));
  }
  CUDA_CHECK(cudaMemsetAsync(adam_m_, 0, G * sizeof(float), stream_));
  CUDA_CHECK(cudaMemsetAsync(adam_v_, 0, G * sizeof(float), stream_));
}

template <typename T>
void ModelImpl<T>::adamw_step(double lr, int64_t step) {
  if (!adam_m_) throw std::logic_error("adamw_step before adamw_init");
  NvtxRange range("adamw_step");
  for (size_t t = 0; t < trainable_.size(); ++t) {
    const TensorInfo& info = *trainable_[t];
    const size_t n = static_cast<size_t>(info.numel);
    // Trainable tensors are never NF4 and sit at the same offset in the master and working arenas.
    const size_t off = dev_offset_[tensor_index(info)];
    T* working = kBf16 ? work_ + off : nullptr;  // fp32 mode: the master copy is the working copy
    adamw_update(working, master_ + off, adam_m_ + info.grad_offset, adam_v_ + info.grad_offset,
                 grads_ + info.grad_offset, static_cast<const float*>(nullptr), n,
                 static_cast<float>(lr * adam_.lr_scale[t]), adam_.beta1, adam_.beta2,
                 static_cast<float>(adam_.eps), static_cast<float>(adam_.weight_decay[t]), step, stream_);
  }
}

template <typename T>
std::vector<float> ModelImpl<T>::download_adamw_state(int which, size_t tensor) const {
  if (!adam_m_ || tensor >= trainable_.size()) throw std::out_of_range("download_adamw_state: no such state");
  const TensorInfo& info = *trainable_[tensor];
  std::vector<float> out(static_cast<size_t>(info.numel));
  const float* src = (which == 0 ? adam_m_ : adam_v_) + info.grad_offset;
  CUDA_CHECK(cudaMemcpyAsync(out.data(), src, out.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  return out;
}

template <typename T>
void ModelImpl<T>::upload_adamw_state(int which, size_t tensor, const std::vector<float>& values) {
  if (!adam_m_ || tensor >= trainable_.size()) throw std::out_of_range("upload_adamw_state: no such state");
  const TensorInfo& info = *trainable_[tensor];
  if (values.size() != static_cast<size_t>(info.numel))
    throw std::invalid_argument("optimizer state for " + info.name + " has the wrong length");
  float* dst = (which == 0 ? adam_m_ : adam_v_) + info.grad_offset;
  CUDA_CHECK(
      cudaMemcpyAsync(dst, values.data(), values.size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// ---- ops at layer granularity ---------------------------------------------------------------------------

template <typename T>
T* ModelImpl<T>::param_grad_target(float* g, size_t n) {
  if (g == nullptr) return nullptr;
  if constexpr (kBf16) {
    if (n > grad_tmp_elems_) throw std::logic_error("param_grad_target: scratch too small");
    CUDA_CHECK(cudaMemsetAsync(grad_tmp_, 0, n * sizeof(T), stream_));
    return grad_tmp_;
  } else {
    return g;
  }
}

template <typename T>
void ModelImpl<T>::finish_param_grad(float* g, size_t n) {
  if constexpr (kBf16) {
    if (g == nullptr || n == 0) return;
    accumulate_float_kernel<<<blocks(n), kThreads, 0, stream_>>>(g, grad_tmp_, n);
    CUDA_CHECK_LAUNCH();
  }
}

template <typename T>
void ModelImpl<T>::norm_forward(const std::string& prefix, T* residual_out, T* out, float* mean, float* rstd,
                                const T* residual_in, const T* branch, int rows, int width) {
  const float eps = static_cast<float>(config.norm_eps);
  if (config.norm_type == "layernorm") {
    residual_layernorm_forward(residual_out, out, mean, rstd, residual_in, branch, param(prefix + ".weight"),
                               param(prefix + ".bias"), rows, width, eps, stream_);
  } else {
    residual_rmsnorm_forward(residual_out, out, rstd, residual_in, branch, param(prefix + ".weight"), rows,
                             width, eps, stream_);
  }
}

template <typename T>
void ModelImpl<T>::norm_backward(const std::string& prefix, T* dx, const T* dout, const T* x,
                                 const float* mean, const float* rstd, int rows, int width) {
  // Norm weight and bias gradients (width values each) go through the T scratch in bf16 mode; the
  // scratch holds both, one after the other.
  float* gw = grad(prefix + ".weight");
  const bool layernorm = config.norm_type == "layernorm";
  float* gb = layernorm ? grad(prefix + ".bias") : nullptr;
  T* tw = nullptr;
  T* tb = nullptr;
  if constexpr (kBf16) {
    CUDA_CHECK(cudaMemsetAsync(grad_tmp_, 0, 2 * static_cast<size_t>(width) * sizeof(T), stream_));
    tw = gw ? grad_tmp_ : nullptr;
    tb = gb ? grad_tmp_ + width : nullptr;
  } else {
    tw = gw;
    tb = gb;
  }
  // A frozen norm (LoRA): null weight and bias gradients, and the kernels compute dx only.
  if (layernorm) {
    residual_layernorm_backward(dx, tw, tb, norm_scratch_, norm_scratch_floats_, dout, x, mean, rstd,
                                param(prefix + ".weight"), rows, width, stream_);
  } else {
    residual_rmsnorm_backward(dx, tw, norm_scratch_, norm_scratch_floats_, dout, x, rstd,
                              param(prefix + ".weight"), rows, width, stream_);
  }
  if constexpr (kBf16) {
    if (gw) {
      accumulate_float_kernel<<<blocks(width), kThreads, 0, stream_>>>(gw, grad_tmp_, width);
      CUDA_CHECK_LAUNCH();
    }
    if (gb) {
      accumulate_float_kernel<<<blocks(width), kThreads, 0, stream_>>>(gb, grad_tmp_ + width, width);
      CUDA_CHECK_LAUNCH();
    }
  }
}

template <typename T>
const float* ModelImpl<T>::nf4_absmax(const Nf4Slot& s) {
  if (!options.quant.double_quant) return s.absmax;
  // absmax = dyn[qabsmax] * state2 + offset, bit for bit ref::nf4_double_dequantize (a few KB per layer).
  nf4_double_dequantize(nf4_absmax_scratch_, s.qabsmax, s.state2, s.offset, s.blocks, kNf4NestedBlockSize,
                        stream_);
  return nf4_absmax_scratch_;
}

// The base layer, then the adapter's s h B^T added on top (ref::lora_forward computes the same sum).
template <typename T>
void ModelImpl<T>::layer_linear_forward(int l, int tensor, T* out, const T* x, int in, int out_features,
                                        bool bias) {
  const std::string& prefix = name(l, tensor);
  const int N = B_ * T_;
  const T* b = bias ? param(prefix + ".bias") : static_cast<const T*>(nullptr);
  const int slot = nf4_index_[l][tensor];
  if (slot >= 0) {
    const Nf4Slot& s = nf4_[slot];
    nf4_linear_forward<T>(out, nf4_scratch_, x, s.packed, nf4_absmax(s), b, N, in, out_features,
                          options.quant.blocksize, stream_);
  } else {
    matmul_forward(out, x, param(prefix + ".weight"), b, N, in, out_features, stream_);
  }
  const int m = lora_index_[l][tensor];
  if (m < 0) return;
  const LoraModule& mod = lora_modules_[m];
  const float p = lora_dropout_p();
  lora_forward<T>(out, lora_h_ + static_cast<size_t>(m) * lora_h_stride_, p > 0.0f ? lora_work_ : nullptr, x,
                  param(mod.a_name()), param(mod.b_name()), N, in, out_features, options.lora.r, lora_scale_,
                  p, dropout_seed, lora_dropout_stream(dropout_counter, config.n_layers, l, tensor), stream_);
}

// dx = G W (= or += per accumulate_dx) from the base, with W's and b's gradients only where they train (a
// LoRA base is frozen: none); then the adapter adds its part of dx and accumulates dA and dB.
template <typename T>
void ModelImpl<T>::layer_linear_backward(int l, int tensor, T* dx, const T* dout, const T* x, int in,
                                         int out_features, bool bias, bool accumulate_dx) {
  const std::string& prefix = name(l, tensor);
  const int N = B_ * T_;
  float* gb = bias ? grad(prefix + ".bias") : nullptr;
  const int slot = nf4_index_[l][tensor];
  if (slot >= 0) {
    const Nf4Slot& s = nf4_[slot];
    nf4_linear_backward_input<T>(dx, nf4_scratch_, dout, s.packed, nf4_absmax(s), N, in, out_features,
                                 options.quant.blocksize, accumulate_dx, stream_);
    if (gb != nullptr) column_sum_accumulate<T, float>(gb, dout, N, out_features, stream_);
  } else {
    matmul_backward<T, float>(dx, grad(prefix + ".weight"), gb, dout, x, param(prefix + ".weight"), N, in,
                              out_features, accumulate_dx, stream_);
  }
  const int m = lora_index_[l][tensor];
  if (m < 0) return;
  const LoraModule& mod = lora_modules_[m];
  const float p = lora_dropout_p();
  lora_backward<T, float>(dx, grad(mod.a_name()), grad(mod.b_name()), lora_dh_,
                          p > 0.0f ? lora_work_ : nullptr, dout, x,
                          lora_h_ + static_cast<size_t>(m) * lora_h_stride_, param(mod.a_name()),
                          param(mod.b_name()), N, in, out_features, options.lora.r, lora_scale_, p,
                          dropout_seed, lora_dropout_stream(dropout_counter, config.n_layers, l, tensor),
                          /*accumulate_dx=*/true, stream_);
}

template <typename T>
AttentionOptions ModelImpl<T>::attention_options(int l) const {
  AttentionOptions opt;
  opt.sliding_window = config.sliding_window;
  opt.doc_ids = has_doc_ids_ ? d_doc_ids_ : nullptr;
  opt.alibi_slopes = alibi_;
  opt.dropout = dropout_p();
  opt.seed = dropout_seed;
  opt.stream = dropout_stream(l, kAttentionProbs);
  return opt;
}

// ---- forward --------------------------------------------------------------------------------------------

template <typename T>
void ModelImpl<T>::upload_batch(const int32_t* inputs, const int32_t* targets, int B, int T_len,
                                const int32_t* positions, const int32_t* doc_ids) {
  if (B <= 0 || T_len <= 0 || B > Bmax_ || T_len > Tmax_) {
    throw std::invalid_argument("batch " + std::to_string(B) + "x" + std::to_string(T_len) +
                                " is outside the planned maximum " + std::to_string(Bmax_) + "x" +
                                std::to_string(Tmax_));
  }
  const int N = B * T_len, V = config.vocab_size;
  for (int n = 0; n < N; ++n) {
    if (inputs[n] < 0 || inputs[n] >= V) {
      throw std::invalid_argument("input token " + std::to_string(inputs[n]) + " at position " +
                                  std::to_string(n) + " is outside the vocabulary [0, " + std::to_string(V) +
                                  ")");
    }
  }
  target_count_ = 0;
  if (targets) {
    for (int n = 0; n < N; ++n) {
      const int32_t t = targets[n];
      if (t != -100 && (t < 0 || t >= V)) {
        throw std::invalid_argument("target token " + std::to_string(t) + " at position " +
                                    std::to_string(n) +
                                    " is outside the vocabulary and is not the ignore index -100");
      }
      if (t != -100) ++target_count_;
    }
  }
  std::vector<int32_t> pos(N);
  if (positions) {
    for (int n = 0; n < N; ++n) {
      if (positions[n] < 0 || positions[n] >= config.max_seq_len)
        throw std::invalid_argument("position " + std::to_string(positions[n]) +
                                    " is outside [0, max_seq_len)");
      pos[n] = positions[n];
    }
  } else {
    for (int n = 0; n < N; ++n) pos[n] = n % T_len;
  }
  // Copies ordered on our stream (so no kernel reads the buffers before they arrive), then a wait, so
  // that the caller's buffers (and `pos`) may change as soon as we return.
  const size_t bytes = static_cast<size_t>(N) * sizeof(int32_t);
  CUDA_CHECK(cudaMemcpyAsync(d_inputs_, inputs, bytes, cudaMemcpyHostToDevice, stream_));
  if (targets) CUDA_CHECK(cudaMemcpyAsync(d_targets_, targets, bytes, cudaMemcpyHostToDevice, stream_));
  CUDA_CHECK(cudaMemcpyAsync(d_positions_, pos.data(), bytes, cudaMemcpyHostToDevice, stream_));
  if (doc_ids) CUDA_CHECK(cudaMemcpyAsync(d_doc_ids_, doc_ids, bytes, cudaMemcpyHostToDevice, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  B_ = B;
  T_ = T_len;
  has_targets_ = targets != nullptr;
  has_doc_ids_ = doc_ids != nullptr;
}

template <typename T>
void ModelImpl<T>::forward_layers() {
  if (!nf4_.empty() && !nf4_ready_) {
    throw std::logic_error(
        "the NF4 base weights are not quantised yet: call quantize_base_nf4() after uploading the base "
        "weights");
  }
  const int N = B_ * T_, C = config.d_model, V = config.vocab_size;
  {
    NvtxRange range("embedding");
    T* x0 = residuals_;
    embedding_forward(x0, d_inputs_, param("model.embed_tokens.weight"), N, C, V, stream_);
    if (training && options.neftune_alpha > 0.0) {
      embedding_noise_forward(x0, static_cast<size_t>(N) * C, neftune_scale(options.neftune_alpha, T_, C),
                              dropout_seed, neftune_stream(dropout_counter), stream_);
    }
    if (config.positional_encoding == "learned") {
      add_position_embedding_forward(x0, param("model.embed_positions.weight"), d_positions_, N, C,
                                     config.max_seq_len, stream_);
    } else if (config.positional_encoding == "sinusoidal") {
      add_position_embedding_forward(x0, static_cast<const T*>(sinusoidal_), d_positions_, N, C,
                                     config.max_seq_len, stream_);
    }
  }
  for (int l = 0; l < config.n_layers; ++l) {
    const std::string label = "layer " + std::to_string(l) + " forward";
    NvtxRange range(label.c_str());
    layer_forward(l, residuals_ + l * residual_stride_, residuals_ + (l + 1) * residual_stride_,
                  layers_[options.recompute ? 0 : l]);
  }
  NvtxRange range("final norm");
  norm_forward("model.norm", nullptr, final_norm_out_, final_mean_, final_rstd_,
               residuals_ + config.n_layers * residual_stride_, nullptr, N, C);
}

template <typename T>
void ModelImpl<T>::layer_forward(int l, const T* x, T* out, LayerBuffers& b) {
  const ModelConfig& c = config;
  const int N = B_ * T_, C = c.d_model, D = c.resolved_head_dim(), F = c.d_ff;
  const int Q = c.n_heads * D, K = c.n_kv_heads * D;
  const float p = dropout_p();
  const size_t NC = static_cast<size_t>(N) * C, NF = static_cast<size_t>(N) * F;

  norm_forward(name(l, kNorm1), nullptr, b.norm1_out, b.norm1_mean, b.norm1_rstd, x, nullptr, N, C);
  layer_linear_forward(l, kQ, b.q, b.norm1_out, C, Q, c.attention_bias);
  layer_linear_forward(l, kK, b.k, b.norm1_out, C, K, c.attention_bias);
  layer_linear_forward(l, kV, b.v, b.norm1_out, C, K, c.attention_bias);
  const T* q = b.q;
  const T* k = b.k;
  const float eps = static_cast<float>(c.norm_eps);
  if (c.qk_norm) {
    residual_rmsnorm_forward(static_cast<T*>(nullptr), b.q_normed, b.q_rstd, q,
                             static_cast<const T*>(nullptr), param(name(l, kQNorm) + ".weight"),
                             N * c.n_heads, D, eps, stream_);
    residual_rmsnorm_forward(static_cast<T*>(nullptr), b.k_normed, b.k_rstd, k,
                             static_cast<const T*>(nullptr), param(name(l, kKNorm) + ".weight"),
                             N * c.n_kv_heads, D, eps, stream_);
    q = b.q_normed;
    k = b.k_normed;
  }
  if (c.uses_rope()) {
    rope_forward(b.q_rot, b.k_rot, q, k, rope_cos_, rope_sin_, d_positions_, N, c.n_heads, c.n_kv_heads, D, 0,
                 0, c.max_seq_len, stream_);
    q = b.q_rot;
    k = b.k_rot;
  }
  const AttentionShape shape{B_, T_, c.n_heads, c.n_kv_heads, D};
  const AttentionOptions opt = attention_options(l);
  if (flash()) {
    attention_flash_forward(b.attn_out, b.probs_or_lse, q, k, b.v, shape, opt, stream_);
  } else {
    attention_simple_forward(b.attn_out, b.probs_or_lse, q, k, b.v, shape, opt, stream_);
  }

  layer_linear_forward(l, kO, branch_, b.attn_out, Q, C, false);
  if (p > 0)
    dropout_forward(branch_, branch_, NC, p, dropout_seed, dropout_stream(l, kAttentionOutput), stream_);
  // mid = x + branch, then norm2(mid), in one kernel.
  norm_forward(name(l, kNorm2), b.mid, b.norm2_out, b.norm2_mean, b.norm2_rstd, x, branch_, N, C);

  layer_linear_forward(l, kUp, b.up, b.norm2_out, C, F, false);
  if (c.gated_mlp()) {
    layer_linear_forward(l, kGate, b.gate, b.norm2_out, C, F, false);
    swiglu_forward(b.act, b.gate, b.up, NF, stream_);
  } else {
    activation_forward(b.act, b.up, NF, activation_kind(c), static_cast<float>(c.leaky_relu_slope), stream_);
  }
  layer_linear_forward(l, kDown, branch_, b.act, F, C, false);
  if (p > 0) dropout_forward(branch_, branch_, NC, p, dropout_seed, dropout_stream(l, kMlpOutput), stream_);
  residual_add_kernel<<<blocks(NC), kThreads, 0, stream_>>>(out, b.mid, branch_, NC);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void ModelImpl<T>::classifier(bool with_backward, double scale) {
  NvtxRange range(with_backward ? "classifier forward+backward" : "classifier forward");
  const int N = B_ * T_, C = config.d_model, V = config.vocab_size;
  const std::string head = config.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  if (!with_backward) {
    classifier_forward(logprobs_, lse_, loss_, final_norm_out_, param(head), d_targets_, classifier_scratch_,
                       chunk_rows_, N, C, V, stream_);
    return;
  }
  // d logprob_n of (scale * mean CE) = -scale / K for every counted token.
  const float g = target_count_ > 0 ? static_cast<float>(-scale / target_count_) : 0.0f;
  classifier_forward_backward<T, float>(d_norm_out_, grad(head), logprobs_, lse_, loss_, final_norm_out_,
                                        param(head), d_targets_, nullptr, g, classifier_scratch_, chunk_rows_,
                                        N, C, V, stream_);
}

template <typename T>
double ModelImpl<T>::forward(const int32_t* inputs, const int32_t* targets, int B, int T_len,
                             const int32_t* positions, const int32_t* doc_ids, bool with_backward,
                             double scale) {
  if (with_backward && !targets) throw std::logic_error("backward needs a forward pass with targets");
  upload_batch(inputs, targets, B, T_len, positions, doc_ids);
  forward_layers();
  if (!targets) return 0.0;
  classifier(with_backward, scale);
  if (with_backward) backward_from_head();
  float loss = 0.0f;
  CUDA_CHECK(cudaMemcpyAsync(&loss, loss_, sizeof(float), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  return loss;
}

// ---- backward -------------------------------------------------------------------------------------------

template <typename T>
void ModelImpl<T>::backward_mean_cross_entropy(double scale) {
  if (!has_targets_) throw std::logic_error("backward needs a forward pass with targets");
  classifier(true, scale);
  backward_from_head();
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

template <typename T>
void ModelImpl<T>::backward_from_head() {
  const int N = B_ * T_, C = config.d_model, V = config.vocab_size;
  const size_t NC = static_cast<size_t>(N) * C;
  CUDA_CHECK(cudaMemsetAsync(d_residual_, 0, NC * sizeof(T), stream_));
  {
    NvtxRange range("final norm backward");
    norm_backward("model.norm", d_residual_, d_norm_out_, residuals_ + config.n_layers * residual_stride_,
                  final_mean_, final_rstd_, N, C);
  }
  for (int l = config.n_layers - 1; l >= 0; --l) {
    const std::string label = "layer " + std::to_string(l) + " backward";
    NvtxRange range(label.c_str());
    LayerBuffers& b = layers_[options.recompute ? 0 : l];
    T* x = residuals_ + l * residual_stride_;
    if (options.recompute) layer_forward(l, x, residuals_ + (l + 1) * residual_stride_, b);
    layer_backward(l, x, b);
  }
  NvtxRange range("embedding backward");
  if (float* d_embed = grad("model.embed_tokens.weight")) {
    const size_t n = static_cast<size_t>(V) * C;
    embedding_backward(param_grad_target(d_embed, n), d_residual_, d_inputs_, N, C, V, embed_scratch_,
                       embed_scratch_bytes_, stream_);
    finish_param_grad(d_embed, n);
  }
  if (config.positional_encoding == "learned") {
    if (float* d_pos = grad("model.embed_positions.weight")) {
      const size_t n = static_cast<size_t>(config.max_seq_len) * C;
      add_position_embedding_backward(param_grad_target(d_pos, n), d_residual_, d_positions_, N, C,
                                      config.max_seq_len, embed_scratch_, embed_scratch_bytes_, stream_);
      finish_param_grad(d_pos, n);
    }
  }
}

template <typename T>
void ModelImpl<T>::layer_backward(int l, const T* x, LayerBuffers& b) {
  const ModelConfig& c = config;
  const int N = B_ * T_, C = c.d_model, D = c.resolved_head_dim(), F = c.d_ff;
  const int Q = c.n_heads * D, K = c.n_kv_heads * D;
  const size_t NC = static_cast<size_t>(N) * C, NF = static_cast<size_t>(N) * F;
  const float p = dropout_p();
  T* d_res = d_residual_;  // dL/d(layer output) on entry, dL/dx on exit

  // MLP branch: out = mid + dropout(act Wd).
  const T* d_branch = d_res;
  if (p > 0) {
    dropout_backward(d_branch_, d_res, NC, p, dropout_seed, dropout_stream(l, kMlpOutput), stream_);
    d_branch = d_branch_;
  }
  layer_linear_backward(l, kDown, d_act_, d_branch, b.act, F, C, false, false);
  if (c.gated_mlp()) {
    swiglu_backward(d_gate_, d_up_, d_act_, b.gate, b.up, NF, stream_);
    layer_linear_backward(l, kGate, d_norm_out_, d_gate_, b.norm2_out, C, F, false, false);
    layer_linear_backward(l, kUp, d_norm_out_, d_up_, b.norm2_out, C, F, false, true);
  } else {
    activation_backward(d_up_, d_act_, b.up, NF, activation_kind(c), static_cast<float>(c.leaky_relu_slope),
                        stream_);
    layer_linear_backward(l, kUp, d_norm_out_, d_up_, b.norm2_out, C, F, false, false);
  }
  norm_backward(name(l, kNorm2), d_res, d_norm_out_, b.mid, b.norm2_mean, b.norm2_rstd, N, C);

  // Attention branch: mid = x + dropout(attn_out Wo).
  d_branch = d_res;
  if (p > 0) {
    dropout_backward(d_branch_, d_res, NC, p, dropout_seed, dropout_stream(l, kAttentionOutput), stream_);
    d_branch = d_branch_;
  }
  layer_linear_backward(l, kO, d_attn_out_, d_branch, b.attn_out, Q, C, false, false);
  const T* q = c.uses_rope() ? b.q_rot : (c.qk_norm ? b.q_normed : b.q);
  const T* k = c.uses_rope() ? b.k_rot : (c.qk_norm ? b.k_normed : b.k);
  const AttentionShape shape{B_, T_, c.n_heads, c.n_kv_heads, D};
  const AttentionOptions opt = attention_options(l);
  if (flash()) {
    attention_flash_backward(d_q_, d_k_, d_v_, attn_scratch_, d_attn_out_, b.attn_out, q, k, b.v,
                             b.probs_or_lse, shape, opt, stream_);
  } else {
    attention_simple_backward(d_q_, d_k_, d_v_, attn_scratch_, d_attn_out_, b.probs_or_lse, q, k, b.v, shape,
                              opt, stream_);
  }
  if (c.uses_rope()) {
    rope_backward(d_q_, d_k_, d_q_, d_k_, rope_cos_, rope_sin_, d_positions_, N, c.n_heads, c.n_kv_heads, D,
                  0, 0, c.max_seq_len, stream_);
  }
  const T* d_q = d_q_;
  const T* d_k = d_k_;
  if (c.qk_norm) {
    // The norm backward accumulates into its input gradient, so start from zero.
    CUDA_CHECK(cudaMemsetAsync(d_q_pre_, 0, static_cast<size_t>(N) * Q * sizeof(T), stream_));
    CUDA_CHECK(cudaMemsetAsync(d_k_pre_, 0, static_cast<size_t>(N) * K * sizeof(T), stream_));
    const std::string qn = name(l, kQNorm) + ".weight", kn = name(l, kKNorm) + ".weight";
    float* gq = grad(qn);
    T* tq = gq ? param_grad_target(gq, D) : nullptr;  // frozen (LoRA): no weight gradient
    residual_rmsnorm_backward(d_q_pre_, tq, norm_scratch_, norm_scratch_floats_, d_q_, b.q, b.q_rstd,
                              param(qn), N * c.n_heads, D, stream_);
    finish_param_grad(gq, D);
    float* gk = grad(kn);
    T* tk = gk ? param_grad_target(gk, D) : nullptr;
    residual_rmsnorm_backward(d_k_pre_, tk, norm_scratch_, norm_scratch_floats_, d_k_, b.k, b.k_rstd,
                              param(kn), N * c.n_kv_heads, D, stream_);
    finish_param_grad(gk, D);
    d_q = d_q_pre_;
    d_k = d_k_pre_;
  }
  layer_linear_backward(l, kQ, d_norm_out_, d_q, b.norm1_out, C, Q, c.attention_bias, false);
  layer_linear_backward(l, kK, d_norm_out_, d_k, b.norm1_out, C, K, c.attention_bias, true);
  layer_linear_backward(l, kV, d_norm_out_, d_v_, b.norm1_out, C, K, c.attention_bias, true);
  norm_backward(name(l, kNorm1), d_res, d_norm_out_, x, b.norm1_mean, b.norm1_rstd, N, C);
}

// ---- sampling -------------------------------------------------------------------------------------------

template <typename T>
std::vector<float> ModelImpl<T>::next_token_logits(const std::vector<int32_t>& tokens) {
  if (tokens.empty()) throw std::invalid_argument("next_token_logits needs at least one token");
  const bool was_training = training;
  training = false;
  const size_t start = tokens.size() > static_cast<size_t>(Tmax_) ? tokens.size() - Tmax_ : 0;
  const int T_len = static_cast<int>(tokens.size() - start);
  try {
    upload_batch(tokens.data() + start, nullptr, 1, T_len, nullptr, nullptr);
    forward_layers();
  } catch (...) {
    training = was_training;
    throw;
  }
  training = was_training;
  // Logits of the last row only: [1, C] x W^T into the classifier scratch.
  const int C = config.d_model, V = config.vocab_size;
  const std::string head = config.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  const T* last = final_norm_out_ + static_cast<size_t>(T_len - 1) * C;
  matmul_forward(classifier_scratch_, last, param(head), static_cast<const T*>(nullptr), 1, C, V, stream_);
  std::vector<T> host(V);
  CUDA_CHECK(
      cudaMemcpyAsync(host.data(), classifier_scratch_, V * sizeof(T), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::vector<float> out(V);
  for (int v = 0; v < V; ++v) {
    if constexpr (kBf16) {
      out[v] = __bfloat162float(host[v]);
    } else {
      out[v] = host[v];
    }
  }
  return out;
}

template <typename T>
std::vector<int32_t> ModelImpl<T>::sample_labels(const int32_t* inputs, int B, int T_len,
                                                 const int32_t* positions, const int32_t* doc_ids,
                                                 uint64_t seed, uint64_t counter_base) {
  NvtxRange range("sample_labels");
  const bool was_training = training;
  training = false;
  try {
    upload_batch(inputs, nullptr, B, T_len, positions, doc_ids);
    forward_layers();
  } catch (...) {
    training = was_training;
    throw;
  }
  training = was_training;
  // The logits chunk by chunk in the classifier scratch (as classifier.cu computes them), each chunk
  // sampled into d_targets_ (free until the next batch is uploaded).
  const int N = B_ * T_, C = config.d_model, V = config.vocab_size;
  const int ld = classifier_padded_vocab(V);
  const std::string head = config.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  for (int r0 = 0; r0 < N; r0 += chunk_rows_) {
    const int rows = std::min(chunk_rows_, N - r0);
    gemm<T, T>(classifier_scratch_, final_norm_out_ + static_cast<size_t>(r0) * C, param(head),
               static_cast<const T*>(nullptr), rows, V, C, C, C, ld, false, true, 1.0f, 0.0f, stream_);
    sample_rows_kernel<<<rows, kSampleThreads, 0, stream_>>>(d_targets_ + r0, classifier_scratch_, ld, V,
                                                             seed, counter_base + static_cast<uint64_t>(r0));
    CUDA_CHECK_LAUNCH();
  }
  std::vector<int32_t> labels(static_cast<size_t>(N));
  CUDA_CHECK(cudaMemcpyAsync(labels.data(), d_targets_, labels.size() * sizeof(int32_t),
                             cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  return labels;
}

}  // namespace

// ---- CudaModel ------------------------------------------------------------------------------------------

CudaModel::CudaModel(const ModelConfig& config, const CudaModelOptions& options) {
  if (options.precision == Precision::kFp32) {
    impl_ = std::make_unique<ModelImpl<float>>(config, options);
  } else {
    impl_ = std::make_unique<ModelImpl<__nv_bfloat16>>(config, options);
  }
}
CudaModel::~CudaModel() = default;

const ModelConfig& CudaModel::config() const {
  return impl_->config;
}
const CudaModelOptions& CudaModel::options() const {
  return impl_->options;
}
const ParameterLayout& CudaModel::layout() const {
  return impl_->layout;
}
MemoryPlan CudaModel::memory_plan() const {
  return impl_->memory_plan();
}
void CudaModel::upload_parameters(const std::vector<float>& values) {
  impl_->upload_parameters(values);
}
std::vector<float> CudaModel::download_parameters() const {
  return impl_->download_parameters();
}
void CudaModel::upload_trainable_parameters(const std::vector<float>& values) {
  impl_->upload_trainable_parameters(values);
}
std::vector<float> CudaModel::download_trainable_parameters() const {
  return impl_->download_trainable_parameters();
}
void CudaModel::upload_base_parameters(const std::vector<float>& values) {
  impl_->upload_base_parameters(values);
}
void CudaModel::upload_tensor(const std::string& name, const std::vector<float>& values) {
  impl_->upload_tensor(name, values);
}
void CudaModel::quantize_base_nf4(const Nf4HostQuantizer& quantize) {
  impl_->quantize_base_nf4(quantize);
}
bool CudaModel::nf4_quantized() const {
  return impl_->nf4_quantized();
}
size_t CudaModel::host_parameter_bytes() const {
  return impl_->host_parameter_bytes();
}
size_t CudaModel::device_offset(const std::string& name) const {
  return impl_->device_offset(name);
}
std::vector<float> CudaModel::download_gradients() const {
  return impl_->download_gradients();
}
void CudaModel::upload_gradients(const std::vector<float>& values) {
  impl_->upload_gradients(values);
}
void CudaModel::set_dropout_rng(uint64_t seed, uint64_t counter) {
  impl_->dropout_seed = seed;
  impl_->dropout_counter = counter;
}
void CudaModel::set_training(bool training) {
  impl_->training = training;
}
double CudaModel::forward(const int32_t* inputs, const int32_t* targets, int B, int T,
                          const int32_t* positions, const int32_t* doc_ids) {
  return impl_->forward(inputs, targets, B, T, positions, doc_ids, false, 0.0);
}
void CudaModel::backward_mean_cross_entropy(double scale) {
  impl_->backward_mean_cross_entropy(scale);
}
double CudaModel::forward_backward(const int32_t* inputs, const int32_t* targets, int B, int T,
                                   const int32_t* positions, const int32_t* doc_ids, double scale) {
  return impl_->forward(inputs, targets, B, T, positions, doc_ids, true, scale);
}
int CudaModel::target_count() const {
  return impl_->target_count();
}
void CudaModel::zero_grad() {
  impl_->zero_grad();
}
double CudaModel::grad_norm() {
  return impl_->grad_norm();
}
void CudaModel::scale_grads(double factor) {
  impl_->scale_grads(factor);
}
void CudaModel::adamw_init(const CudaAdamW& hyper) {
  impl_->adamw_init(hyper);
}
void CudaModel::adamw_step(double lr, int64_t step) {
  impl_->adamw_step(lr, step);
}
std::vector<float> CudaModel::download_adamw_state(int which, size_t tensor) const {
  return impl_->download_adamw_state(which, tensor);
}
void CudaModel::upload_adamw_state(int which, size_t tensor, const std::vector<float>& values) {
  impl_->upload_adamw_state(which, tensor, values);
}
std::vector<float> CudaModel::next_token_logits(const std::vector<int32_t>& tokens) {
  return impl_->next_token_logits(tokens);
}
std::vector<int32_t> CudaModel::sample_labels(const int32_t* inputs, int B, int T, const int32_t* positions,
                                              const int32_t* doc_ids, uint64_t seed, uint64_t counter_base) {
  return impl_->sample_labels(inputs, B, T, positions, doc_ids, seed, counter_base);
}
void CudaModel::synchronize() const {
  impl_->synchronize();
}
float* CudaModel::device_master() {
  return impl_->device_master();
}
float* CudaModel::device_gradients() {
  return impl_->device_gradients();
}
void* CudaModel::cuda_stream() {
  return impl_->cuda_stream();
}
void CudaModel::refresh_working_copy() {
  impl_->refresh_working_copy();
}

}  // namespace llm::cuda
