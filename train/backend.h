// What a training loop needs from a backend: a forward and backward pass on a batch, gradient-norm
// and clipping, the optimizer step, and host copies of the parameters for checkpoints and sampling.
// The CPU backend implements it with the reference ops; the CUDA backend implements the same calls
// with the kernels, so the loops in train/ are written once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "llm/memory_plan.h"
#include "llm/params.h"
#include "train/optimizer.h"

namespace llm {

// One micro-batch as the backend sees it: B x T tokens, targets with -100 for ignored positions,
// optional per-token positions and document ids (packed sequences).
struct TokenBatch {
  int B = 0, T = 0;
  const int32_t* inputs = nullptr;
  const int32_t* targets = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* doc_ids = nullptr;
};

class TrainBackend {
 public:
  virtual ~TrainBackend() = default;
  virtual std::string name() const = 0;
  virtual const ParameterLayout& layout() const = 0;
  virtual MemoryPlan memory_plan() const = 0;

  // Mean cross-entropy of the batch; its gradient times `grad_scale` is added to the gradients.
  // `dropout_counter` keys this micro-batch's dropout masks (the global micro-step).
  virtual double forward_backward(const TokenBatch& batch, double grad_scale, uint64_t dropout_counter) = 0;
  // Mean cross-entropy with dropout off and no gradients.
  virtual double evaluate(const TokenBatch& batch) = 0;
  // Logits of the last position of one sequence (inference; dropout off).
  virtual std::vector<float> next_token_logits(const std::vector<int32_t>& tokens) = 0;

  virtual void zero_grad() = 0;
  // Global L2 norm of all gradients (NaN or Inf when any gradient is not finite).
  virtual double grad_norm() = 0;
  virtual void scale_grads(double factor) = 0;
  virtual void optimizer_step(double lr, int64_t step) = 0;
  // Sophia's Gauss-Newton-Bartlett pass: labels sampled from the model's own distribution on `batch`,
  // their gradients squared into the optimizer's Hessian estimate. Gradients are zero afterwards.
  virtual bool wants_hessian_estimate(int64_t step) const = 0;
  virtual void update_hessian_estimate(const TokenBatch& batch, int batch_tokens,
                                       uint64_t sample_counter) = 0;

  // Host copies of the parameter arena (layout order) and the optimizer state.
  virtual std::vector<float> read_parameters() = 0;
  virtual void write_parameters(const std::vector<float>& values) = 0;
  // The trainable tensors only (LoRA: the adapters), each at its grad_offset: layout().trainable_elements()
  // values. A backend with a frozen base may override these to avoid copying the whole base.
  virtual std::vector<float> read_trainable_parameters() {
    const std::vector<float> all = read_parameters();
    return gather_trainable(layout(), all.data());
  }
  virtual void write_trainable_parameters(const std::vector<float>& values) {
    check_trainable_count(values.size());
    std::vector<float> all = read_parameters();
    scatter_trainable(layout(), values.data(), all.data());
    write_parameters(all);
  }
  // The first values.size() elements of the parameter arena: a base model's tensors, which precede every
  // LoRA adapter in the layout. std::invalid_argument when the count ends inside a tensor or past the
  // arena. The default goes through a full read and write.
  virtual void write_base_parameters(const std::vector<float>& values) {
    check_base_count(values.size());
    std::vector<float> all = read_parameters();
    std::copy(values.begin(), values.end(), all.begin());
    write_parameters(all);
  }
  // One tensor's values (layout().at(name).numel of them), e.g. a base model streamed from disk; before
  // quantize_base_nf4 for a tensor NF4 will store. The default goes through a full read and write.
  virtual void write_tensor(const std::string& name, const std::vector<float>& values) {
    const TensorInfo& t = checked_tensor(name, values.size());
    std::vector<float> all = read_parameters();
    std::copy(values.begin(), values.end(), all.begin() + t.offset);
    write_parameters(all);
  }
  virtual std::vector<StateBuffer> optimizer_state() = 0;
  virtual void load_optimizer_state(const std::vector<StateBuffer>& state) = 0;
  virtual std::string optimizer_name() const = 0;
  // The hardware's peak rate in FLOP/s for MFU (the GPU's dense bf16 rate), or 0 when not known (the CPU).
  virtual double peak_flops() const { return 0.0; }

  // QLoRA: quantises the base weights the backend holds now (every tensor of nf4_quantized_tensors) to
  // NF4, as llm::Model::quantize_base_nf4 does; call it after the base weights are written. The CPU and
  // CUDA backends give bit-identical dequantised weights. Backends without NF4 throw std::logic_error.
  virtual void quantize_base_nf4() {
    throw std::logic_error("the " + name() + " backend cannot quantise its base weights to NF4");
  }

 protected:
  // Argument checks shared by the write_* defaults and the backends' own versions.
  const TensorInfo& checked_tensor(const std::string& name, size_t count) const {
    if (!layout().contains(name)) throw std::invalid_argument("no tensor " + name + " in the layout");
    const TensorInfo& t = layout().at(name);
    if (count != static_cast<size_t>(t.numel)) {
      throw std::invalid_argument(std::to_string(count) + " values for " + name + " (" +
                                  std::to_string(t.numel) + " elements)");
    }
    return t;
  }
  void check_trainable_count(size_t count) const {
    if (count != layout().trainable_elements()) {
      throw std::invalid_argument("trainable parameter count " + std::to_string(count) +
                                  " does not match the model's " +
                                  std::to_string(layout().trainable_elements()));
    }
  }
  void check_base_count(size_t count) const {
    if (count > layout().total_elements()) {
      throw std::invalid_argument("base parameter count " + std::to_string(count) + " exceeds the model's " +
                                  std::to_string(layout().total_elements()));
    }
    for (const auto& t : layout().tensors()) {
      if (t.offset < count && t.offset + static_cast<size_t>(t.numel) > count)
        throw std::invalid_argument(std::to_string(count) + " base values end inside tensor " + t.name);
    }
  }
};

}  // namespace llm
