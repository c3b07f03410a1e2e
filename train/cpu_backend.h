// The CPU backend: the model on the fp32 reference ops, and the optimizer's CPU reference.
#pragma once

#include <memory>

#include "llm/model.h"
#include "train/backend.h"

namespace llm {

struct BackendOptions {
  int max_batch = 1;
  int max_seq = 0;
  bool recompute = false;
  uint64_t seed = 0;  // weight init and dropout
  // false: only the adapters are initialised (init_lora), because the caller writes the base weights
  // next (SFT from a base model); the random base init would be thrown away. QLoRA on the CUDA backend
  // then quantises each NF4 tensor as it is written (CudaModelOptions::quantize_on_upload): before
  // quantize_base_nf4, read_parameters returns its dequantised values there, its written ones here.
  bool init_base = true;
  double weight_decay = 0.0;
  std::vector<std::string> no_decay_names, decay_names;
  LoraSettings lora;           // adapters (the base is frozen); see llm/lora.h
  QuantSettings quant;         // QLoRA: quantize_base_nf4() after the base weights are written
  double neftune_alpha = 0.0;  // NEFTune noise on the embeddings in training (0: none)
};

class CpuBackend : public TrainBackend {
 public:
  CpuBackend(const ModelConfig& config, const OptimizerConfig& optimizer, const BackendOptions& options);

  std::string name() const override { return "cpu"; }
  const ParameterLayout& layout() const override { return model_.layout(); }
  MemoryPlan memory_plan() const override { return model_.memory_plan(optimizer_->state_bytes_per_param()); }
  double forward_backward(const TokenBatch& batch, double grad_scale, uint64_t dropout_counter) override;
  double evaluate(const TokenBatch& batch) override;
  std::vector<float> next_token_logits(const std::vector<int32_t>& tokens) override;
  void zero_grad() override { model_.zero_grad(); }
  double grad_norm() override;
  void scale_grads(double factor) override;
  void optimizer_step(double lr, int64_t step) override;
  bool wants_hessian_estimate(int64_t step) const override {
    return optimizer_->wants_hessian_estimate(step);
  }
  void update_hessian_estimate(const TokenBatch& batch, int batch_tokens, uint64_t sample_counter) override;
  std::vector<float> read_parameters() override { return model_.parameters(); }
  void write_parameters(const std::vector<float>& values) override;
  // Direct copies, without a copy of the whole arena (a frozen base can be most of it).
  std::vector<float> read_trainable_parameters() override;
  void write_trainable_parameters(const std::vector<float>& values) override;
  void write_base_parameters(const std::vector<float>& values) override;
  void write_tensor(const std::string& name, const std::vector<float>& values) override;
  std::vector<StateBuffer> optimizer_state() override { return optimizer_->state(); }
  void load_optimizer_state(const std::vector<StateBuffer>& state) override { optimizer_->load_state(state); }
  std::string optimizer_name() const override { return optimizer_->name(); }

  Model<float>& model() { return model_; }
  // QLoRA: quantises the base weights now in the model to NF4 (see Model::quantize_base_nf4).
  void quantize_base_nf4() override { model_.quantize_base_nf4(); }

 private:
  Model<float> model_;
  std::unique_ptr<Optimizer> optimizer_;
  std::vector<ParamView> views_;
  uint64_t seed_;
};

}  // namespace llm
