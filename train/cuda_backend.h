// The CUDA backend: the model on the GPU kernels (kernels/cuda_model.h) behind the same TrainBackend
// interface as the CPU backend, and the factory that picks one from the config's "device".
//
// Optimizers: AdamW runs on the GPU (kernels/adamw.cuh) with fp32 master weights and fp32 state whose
// buffers have the CPU AdamW's names and layout ("adamw.m.<i>", "adamw.v.<i>"), so checkpoints move
// between the backends. The other optimizers are refused with a clear error for now.
#pragma once

#include <memory>
#include <string>

#include "kernels/cuda_model.h"
#include "train/backend.h"
#include "train/cpu_backend.h"

namespace llm {

class CudaBackend : public TrainBackend {
 public:
  // Throws ConfigError when no CUDA device is usable or the optimizer has no CUDA implementation.
  CudaBackend(const ModelConfig& config, const OptimizerConfig& optimizer, const BackendOptions& options,
              cuda::Precision precision = cuda::Precision::kBf16);

  std::string name() const override { return "cuda"; }
  const ParameterLayout& layout() const override { return model_.layout(); }
  MemoryPlan memory_plan() const override { return model_.memory_plan(); }
  double forward_backward(const TokenBatch& batch, double grad_scale, uint64_t dropout_counter) override;
  double evaluate(const TokenBatch& batch) override;
  std::vector<float> next_token_logits(const std::vector<int32_t>& tokens) override;
  void zero_grad() override { model_.zero_grad(); }
  double grad_norm() override { return model_.grad_norm(); }
  void scale_grads(double factor) override { model_.scale_grads(factor); }
  void optimizer_step(double lr, int64_t step) override { model_.adamw_step(lr, step); }
  bool wants_hessian_estimate(int64_t /*step*/) const override { return false; }
  void update_hessian_estimate(const TokenBatch& batch, int batch_tokens, uint64_t sample_counter) override;
  std::vector<float> read_parameters() override { return model_.download_parameters(); }
  void write_parameters(const std::vector<float>& values) override { model_.upload_parameters(values); }
  std::vector<StateBuffer> optimizer_state() override;
  void load_optimizer_state(const std::vector<StateBuffer>& state) override;
  std::string optimizer_name() const override { return "adamw"; }

  cuda::CudaModel& model() { return model_; }

 private:
  cuda::CudaModel model_;
  uint64_t seed_;
};

// Throws ConfigError unless a CUDA device is usable:
// device "cuda" requested but no usable CUDA device: <reason>.
void require_cuda_device();
// "auto" -> "cuda" when a CUDA device is usable, else "cpu"; "cpu" and "cuda" as they are.
std::string resolve_device(const std::string& device);
// The backend for `device` ("auto" | "cpu" | "cuda"; "auto" stays on the CPU for an optimizer the CUDA
// backend lacks). The CUDA backend trains in `precision`.
std::unique_ptr<TrainBackend> make_backend(const std::string& device, const ModelConfig& config,
                                           const OptimizerConfig& optimizer, const BackendOptions& options,
                                           cuda::Precision precision = cuda::Precision::kBf16);

}  // namespace llm
