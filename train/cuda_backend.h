// The CUDA backend: the model on the GPU kernels (kernels/cuda_model.h) behind the same TrainBackend
// interface as the CPU backend, and the factory that picks one from the config's "device".
//
// Optimizers: all six run on the GPU, over the fp32 master weights and fp32 gradients, on the model's
// stream, with the groups of make_param_views (weight decay by role and by the name overrides, and
// each tensor's lr_scale):
//   adamw       the model's fused AdamW (kernels/adamw.cuh), which also writes the bf16 working copy;
//   lion, sophia, adafactor, adamw_8bit
//               the steps of kernels/cuda_optimizers.h, one call per tensor;
//   muon        Muon (momentum, Newton-Schulz as cuBLASLt GEMMs, in bf16 when the model trains in bf16
//               and in fp32 in the fp32 test mode) on the 2-D hidden matrices (llm::muon_updates), and
//               AdamW at muon_adamw_lr_scale x lr on every other tensor, as train/optim_muon.cpp does.
// After any step but AdamW's the working copy is refreshed from the master weights (one conversion
// pass over the parameters). Sophia's Hessian estimate samples labels from the model's own softmax on
// the GPU with the host's Philox stream (CudaModel::sample_labels), backpropagates them and folds the
// squared gradients into h.
//
// State: optimizer_state() and load_optimizer_state() produce and consume exactly the CPU optimizer's
// StateBuffer names, order and layouts (train/optim_*.h), so checkpoints move between the backends.
//
// LoRA and QLoRA (BackendOptions::lora, ::quant): the CUDA model builds the CPU model's layout (adapters
// appended, base frozen), the initial weights are the CPU backend's (llm::Model::init_weights with the same
// LoRA settings), and the optimizers see the adapters only. quantize_base_nf4() quantises the base with the
// CPU reference on the host (llm::nf4_quantize_weights) and keeps only the NF4 form on the GPU
// (kernels/cuda_model.h); read_parameters() then returns the dequantised base, bit for bit the CPU's.
#pragma once

#include <memory>
#include <string>

#include "kernels/cuda_model.h"
#include "kernels/cuda_runtime.h"
#include "train/backend.h"
#include "train/cpu_backend.h"

namespace llm {

// The GPU side of one optimizer (defined in cuda_backend.cpp).
class CudaOptimizer;

class CudaBackend : public TrainBackend {
 public:
  // Throws ConfigError when no CUDA device is usable or the optimizer's settings have no CUDA
  // implementation (see cuda_optimizer_unsupported).
  CudaBackend(const ModelConfig& config, const OptimizerConfig& optimizer, const BackendOptions& options,
              cuda::Precision precision = cuda::Precision::kBf16);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  const ParameterLayout& layout() const override { return model_.layout(); }
  // The model's plan plus the optimizer state (and Muon's/Adafactor's scratch) on the device.
  MemoryPlan memory_plan() const override;
  double forward_backward(const TokenBatch& batch, double grad_scale, uint64_t dropout_counter) override;
  double evaluate(const TokenBatch& batch) override;
  std::vector<float> next_token_logits(const std::vector<int32_t>& tokens) override;
  void zero_grad() override { model_.zero_grad(); }
  double grad_norm() override { return model_.grad_norm(); }
  void scale_grads(double factor) override { model_.scale_grads(factor); }
  void optimizer_step(double lr, int64_t step) override;
  bool wants_hessian_estimate(int64_t step) const override;
  void update_hessian_estimate(const TokenBatch& batch, int batch_tokens, uint64_t sample_counter) override;
  std::vector<float> read_parameters() override { return model_.download_parameters(); }
  void write_parameters(const std::vector<float>& values) override { model_.upload_parameters(values); }
  std::vector<float> read_trainable_parameters() override { return model_.download_trainable_parameters(); }
  void write_trainable_parameters(const std::vector<float>& values) override {
    check_trainable_count(values.size());
    model_.upload_trainable_parameters(values);
  }
  void write_base_parameters(const std::vector<float>& values) override {
    check_base_count(values.size());
    model_.upload_base_parameters(values);
  }
  void write_tensor(const std::string& name, const std::vector<float>& values) override {
    model_.upload_tensor(checked_tensor(name, values.size()).name, values);
  }
  std::vector<StateBuffer> optimizer_state() override;
  void load_optimizer_state(const std::vector<StateBuffer>& state) override;
  std::string optimizer_name() const override { return optimizer_name_; }
  double peak_flops() const override { return cuda::peak_bf16_flops(); }
  // QLoRA: see CudaModel::quantize_base_nf4 (with llm::nf4_quantize_weights).
  void quantize_base_nf4() override;

  cuda::CudaModel& model() { return model_; }

 private:
  cuda::CudaModel model_;
  uint64_t seed_;
  std::string optimizer_name_;
  std::unique_ptr<CudaOptimizer> optimizer_;
};

// Why the CUDA backend cannot run this optimizer configuration, or "" when it can (today only an
// adamw_8bit_block_size above the GPU kernel's 4096).
std::string cuda_optimizer_unsupported(const OptimizerConfig& optimizer);
// Throws ConfigError unless a CUDA device is usable:
// device "cuda" requested but no usable CUDA device: <reason>.
void require_cuda_device();
// "auto" -> "cuda" when a CUDA device is usable, else "cpu"; "cpu" and "cuda" as they are.
std::string resolve_device(const std::string& device);
// The backend for `device` ("auto" | "cpu" | "cuda"; "auto" is cuda for every optimizer when a GPU is
// usable, unless cuda_optimizer_unsupported says otherwise). The CUDA backend trains in `precision`.
std::unique_ptr<TrainBackend> make_backend(const std::string& device, const ModelConfig& config,
                                           const OptimizerConfig& optimizer, const BackendOptions& options,
                                           cuda::Precision precision = cuda::Precision::kBf16);

}  // namespace llm
