// The transformer, forward and backward over all layers on the CPU reference ops.
//
// One pre-norm decoder block (the Llama / Qwen / GPT-2 family, chosen by the config):
//   h   = norm1(x)
//   q,k,v = h Wq (+bq), h Wk (+bk), h Wv (+bv)     [qk_norm: per-head RMSNorm of q and k]
//   q,k = rope(q), rope(k)                          [rope / yarn only]
//   a   = attention(q, k, v)                        [causal; GQA shares K/V heads; ALiBi, window, docs]
//   x'  = x + dropout(a Wo)
//   u   = norm2(x')
//   m   = (silu(u Wg) * (u Wu)) Wd   or   act(u Wu) Wd
//   out = x' + dropout(m)
// then a final norm, the LM head (tied to the embedding or not) and per-token log-probabilities of
// the targets. The backward pass runs the same steps in reverse. The residual stream's gradient is
// one buffer that every branch adds into; parameter gradients accumulate (+=) across micro-batches.
//
// The class is a template over the scalar type: float for training, double for the whole-model
// gradient check. Buffers are carved from arenas sized by llm/memory_plan.h before any work.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "llm/config.h"
#include "llm/lora.h"
#include "llm/memory_plan.h"
#include "llm/params.h"

namespace llm {

struct ModelOptions {
  ModelOptions() = default;
  ModelOptions(int batch, int seq, bool recompute_layers, LoraSettings lora_settings = {},
               QuantSettings quant_settings = {})
      : max_batch(batch),
        max_seq(seq),
        recompute(recompute_layers),
        lora(lora_settings),
        quant(quant_settings) {}

  int max_batch = 1;       // B: the largest batch the buffers are planned for
  int max_seq = 0;         // T: the longest sequence (0 means config.max_seq_len)
  bool recompute = false;  // keep only each layer's input and recompute the rest in backward
  // LoRA adapters on the chosen linear layers (llm/lora.h): their A and B are appended to the layout as
  // the only trainable tensors, and each adapted layer computes x W^T + b + s dropout(x) A^T B^T.
  LoraSettings lora;
  // QLoRA: quantize_base_nf4() stores the decoder-layer linear weights in NF4 (needs lora.enabled).
  QuantSettings quant;
  // NEFTune: > 0 adds uniform noise of scale alpha / sqrt(T * d_model) to the embeddings in training
  // (kernels/cpu/embedding.h).
  double neftune_alpha = 0.0;
};

template <typename T>
class Model {
 public:
  Model(const ModelConfig& config, const ModelOptions& options);

  const ModelConfig& config() const { return config_; }
  const ModelOptions& options() const { return options_; }
  ParameterLayout& layout() { return layout_; }
  const ParameterLayout& layout() const { return layout_; }

  // The parameter arena and the gradient arena (trainable tensors only), and one tensor of each.
  std::vector<T>& parameters() { return params_; }
  const std::vector<T>& parameters() const { return params_; }
  std::vector<T>& gradients() { return grads_; }
  T* param(const std::string& name) { return params_.data() + layout_.at(name).offset; }
  const T* param(const std::string& name) const { return params_.data() + layout_.at(name).offset; }
  // The gradient of `name`, or nullptr when the tensor is frozen.
  T* grad(const std::string& name);

  // Normal(0, 0.02) for matrices and embeddings, with the output projections of each residual branch
  // scaled by 1/sqrt(2 n_layers) (GPT-2); ones for norm weights, zeros for biases. Deterministic in seed.
  void init_weights(uint64_t seed);
  // LoRA: A ~ kaiming_uniform(a = sqrt(5)) from Philox (options.lora.init_seed, one stream per module),
  // B = 0, so a fresh adapter leaves the model's output unchanged. Called by init_weights too.
  void init_lora();
  // QLoRA: quantises every tensor of nf4_quantized_tensors() to NF4 (with double quantisation when
  // options.quant.double_quant) and replaces its values by the dequantised ones, which is what the
  // layer then computes with. Call it after the base weights are loaded; the codes are kept for the
  // memory plan and for uploading to a GPU.
  void quantize_base_nf4();
  using Nf4Tensor = Nf4Weights;
  const std::vector<std::pair<std::string, Nf4Tensor>>& nf4_tensors() const { return nf4_; }
  const std::vector<LoraModule>& lora_modules() const { return lora_modules_; }
  // Freezes or unfreezes a tensor; the gradient arena is re-planned (and zeroed).
  void set_trainable(const std::string& name, bool trainable);
  void zero_grad();

  // Dropout draws from Philox keyed by (seed, counter): the trainer sets the counter to the global
  // micro-step so that every forward uses fresh masks and a resumed run draws the same ones.
  void set_dropout_rng(uint64_t seed, uint64_t counter) {
    dropout_seed_ = seed;
    dropout_counter_ = counter;
  }
  void set_training(bool training) { training_ = training; }

  // Runs the forward pass on B x T tokens (B, T within the planned maximum). `positions` (B*T) may be
  // null for 0..T-1 in every row; `doc_ids` (B*T) may be null for one document per row. With targets,
  // it computes the per-token log-probabilities (logprobs(); 0 where target == -100) and returns the
  // mean cross-entropy over the non-ignored tokens; without, it returns 0 and only logits() is valid.
  double forward(const int32_t* inputs, const int32_t* targets, int B, int T_len,
                 const int32_t* positions = nullptr, const int32_t* doc_ids = nullptr);
  // Number of non-ignored target tokens in the last forward.
  int target_count() const { return target_count_; }
  const T* logits() const { return global_.logits; }
  const T* logprobs() const { return global_.logprobs; }

  // Backward from an upstream gradient on each token's log-probability (B*T values, the shape of
  // logprobs()). Gradients accumulate into the gradient arena.
  void backward(const T* dlogprobs);
  // Backward of forward()'s mean cross-entropy, multiplied by `scale` (1/accumulation steps).
  void backward_mean_cross_entropy(double scale = 1.0);

  MemoryPlan memory_plan(double optimizer_bytes_per_param) const;

 private:
  struct LayerBuffers {
    T *norm1_out, *norm1_mean, *norm1_rstd, *q, *k, *v, *q_normed, *k_normed, *q_rstd, *k_rstd, *q_rot,
        *k_rot;
    T *probs, *attn_out, *mid, *norm2_out, *norm2_mean, *norm2_rstd, *gate, *up, *act;
  };
  struct GlobalBuffers {
    T *final_norm_out, *final_mean, *final_rstd, *logits, *logprobs, *lse, *branch;
    T *d_q_pre, *d_k_pre;
    T *d_residual, *d_norm_out, *d_q, *d_k, *d_v, *d_attn_out, *d_branch, *d_gate, *d_up, *d_act, *d_logits,
        *d_logprobs;
  };

  void plan_buffers();
  void layer_forward(int layer, const T* x, T* out, LayerBuffers& buf);
  void layer_backward(int layer, const T* x, LayerBuffers& buf);
  void norm_forward(const std::string& prefix, T* out, T* mean, T* rstd, const T* x, int rows, int width);
  void norm_backward(const std::string& prefix, T* dx, const T* dout, const T* x, const T* mean,
                     const T* rstd, int rows, int width);
  void linear_forward(const std::string& prefix, T* out, const T* x, int in_features, int out_features,
                      bool bias);
  void linear_backward(const std::string& prefix, T* dx, const T* dout, const T* x, int in_features,
                       int out_features, bool bias, bool accumulate_dx);
  // A decoder-layer linear: the plain one above, or the LoRA one when the tensor has an adapter.
  void layer_linear_forward(int layer, int tensor, T* out, const T* x, int in_features, int out_features,
                            bool bias);
  void layer_linear_backward(int layer, int tensor, T* dx, const T* dout, const T* x, int in_features,
                             int out_features, bool bias, bool accumulate_dx);
  uint64_t dropout_stream(int layer, int site) const;
  // The adapter on layer `layer`'s tensor `tensor` (layer::Tensor), or null.
  const LoraModule* lora_at(int layer, int tensor) const;
  // The adapter's saved h = dropout(x) A^T of the current forward ([N, r]).
  T* lora_hidden(int layer, int tensor);
  const std::string& name(int layer, int index) const { return layer_names_[layer][index]; }

  ModelConfig config_;
  ModelOptions options_;
  ParameterLayout layout_;
  std::vector<T> params_, grads_;
  std::vector<T> layer_arena_, global_arena_, residual_arena_;
  T* residual(int index) { return residual_arena_.data() + static_cast<size_t>(index) * residual_stride_; }
  size_t residual_stride_ = 0;        // planned B*T*C
  std::vector<LayerBuffers> layers_;  // n_layers entries, or 1 (shared) with recompute
  GlobalBuffers global_{};
  std::vector<T> rope_cos_, rope_sin_, sinusoidal_;  // fixed tables
  std::vector<double> alibi_;
  std::vector<std::vector<std::string>> layer_names_;  // per-layer tensor name prefixes, built once
  std::vector<int32_t> default_positions_;
  std::vector<LoraModule> lora_modules_;
  std::vector<std::vector<int>> lora_index_;  // [layer][tensor] -> index into lora_modules_, or -1
  std::vector<T> lora_arena_;                 // h of every adapter (one layer's worth with recompute)
  std::vector<size_t> lora_offset_;           // per adapter: offset of its h in lora_arena_
  std::vector<std::pair<std::string, Nf4Tensor>> nf4_;

  // The current batch, kept for the backward pass.
  const int32_t* inputs_ = nullptr;
  const int32_t* targets_ = nullptr;
  const int32_t* positions_ = nullptr;
  const int32_t* doc_ids_ = nullptr;
  int B_ = 0, T_ = 0, target_count_ = 0;
  std::vector<int32_t> inputs_copy_, targets_copy_, positions_copy_, doc_ids_copy_;

  bool training_ = true;
  uint64_t dropout_seed_ = 0, dropout_counter_ = 0;
};

extern template class Model<float>;
extern template class Model<double>;

}  // namespace llm
