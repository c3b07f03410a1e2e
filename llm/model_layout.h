// What the CPU model (llm/model.cpp) and the CUDA model (kernels/cuda_model.cu) must agree on, kept in
// one place: the per-layer tensor names, the dropout sites (each a Philox stream), and how the config
// maps onto the RoPE and activation options of the ops.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cpu/activations.h"
#include "kernels/cpu/positions.h"
#include "llm/config.h"

namespace llm::layer {

// Indices into a layer's tensor-name table; the suffix follows "model.layers.N.".
enum Tensor { kNorm1, kQ, kK, kV, kO, kQNorm, kKNorm, kNorm2, kGate, kUp, kDown, kTensorCount };

inline const char* tensor_suffix(int index) {
  static const char* const kSuffix[kTensorCount] = {
      "input_layernorm",  "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
      "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm",
      "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  return kSuffix[index];
}

// Dropout sites inside a layer; each gets its own Philox stream.
enum DropoutSite { kAttentionProbs, kAttentionOutput, kMlpOutput, kDropoutSites };

// LoRA dropout on the input of layer `layer`'s adapted tensor `tensor` (a Tensor index), in micro-step
// `counter`: its own range of streams (the top bit set), so it never meets the sites above.
inline uint64_t lora_dropout_stream(uint64_t counter, int n_layers, int layer, int tensor) {
  return (uint64_t{1} << 63) |
         ((counter * static_cast<uint64_t>(n_layers) + static_cast<uint64_t>(layer)) * kTensorCount +
          static_cast<uint64_t>(tensor));
}

// NEFTune noise on the embeddings of micro-step `counter`: streams with bit 62 set, apart from the
// dropout sites (small numbers) and LoRA's (bit 63).
inline uint64_t neftune_stream(uint64_t counter) {
  return (uint64_t{1} << 62) | counter;
}
// Its scale for rows of `seq_len` tokens of width C: alpha / sqrt(seq_len * C), as transformers computes it.
inline float neftune_scale(double alpha, int seq_len, int C) {
  return static_cast<float>(alpha / std::sqrt(static_cast<double>(seq_len) * static_cast<double>(C)));
}

// Weight initialisation draws under the run's seed too: tensor `tensor_index` of the layout (bit 61), and
// LoRA module `module_index`'s A (bits 61 and 60), so that no initial value shares its draw with a
// dropout mask or the noise of an early micro-step.
inline uint64_t weight_init_stream(uint64_t tensor_index) {
  return (uint64_t{1} << 61) | tensor_index;
}
inline uint64_t lora_init_stream(uint64_t module_index) {
  return (uint64_t{1} << 61) | (uint64_t{1} << 60) | module_index;
}

inline ref::RopeParams rope_params(const ModelConfig& c) {
  ref::RopeParams p;
  p.head_dim = c.resolved_head_dim();
  p.theta = c.rope_theta;
  p.factor = c.rope_scaling_factor;
  p.original_max_position = c.rope_original_max_seq_len > 0 ? c.rope_original_max_seq_len : c.max_seq_len;
  p.low_freq_factor = c.llama3_low_freq_factor;
  p.high_freq_factor = c.llama3_high_freq_factor;
  p.beta_fast = c.yarn_beta_fast;
  p.beta_slow = c.yarn_beta_slow;
  p.attention_factor = c.yarn_attention_factor;
  if (c.positional_encoding == "yarn") {
    p.scaling = ref::RopeScaling::kYarn;
  } else if (c.rope_scaling == "linear") {
    p.scaling = ref::RopeScaling::kLinear;
  } else if (c.rope_scaling == "llama3") {
    p.scaling = ref::RopeScaling::kLlama3;
  }
  return p;
}

// The elementwise activation of a non-gated MLP ("swiglu" uses its own gated op).
inline ref::Activation activation_kind(const ModelConfig& c) {
  if (c.activation == "relu") return ref::Activation::kRelu;
  if (c.activation == "gelu") {
    return c.gelu_approximation == "tanh" ? ref::Activation::kGeluTanh : ref::Activation::kGeluErf;
  }
  if (c.activation == "leaky_relu") return ref::Activation::kLeakyRelu;
  return ref::Activation::kSilu;
}

}  // namespace llm::layer
