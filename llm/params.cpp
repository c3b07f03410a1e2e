#include "llm/params.h"

#include <algorithm>
#include <stdexcept>

namespace llm {

const char* role_name(TensorRole role) {
  switch (role) {
    case TensorRole::kMatrix:
      return "matrix";
    case TensorRole::kEmbedding:
      return "embedding";
    case TensorRole::kPosition:
      return "position";
    case TensorRole::kNorm:
      return "norm";
    case TensorRole::kBias:
      return "bias";
    case TensorRole::kHead:
      return "head";
    case TensorRole::kLora:
      return "lora";
  }
  return "unknown";
}

std::string layer_tensor_name(int layer, const std::string& suffix) {
  return "model.layers." + std::to_string(layer) + "." + suffix;
}

ParameterLayout::ParameterLayout(const ModelConfig& c) {
  const int64_t C = c.d_model, D = c.resolved_head_dim(), F = c.d_ff, V = c.vocab_size;
  const int64_t q_dim = c.n_heads * D, kv_dim = c.n_kv_heads * D;
  const bool layernorm = c.norm_type == "layernorm";
  auto add_norm = [&](const std::string& prefix, int64_t size) {
    add(prefix + ".weight", {size}, TensorRole::kNorm);
    if (layernorm) add(prefix + ".bias", {size}, TensorRole::kBias);
  };

  add("model.embed_tokens.weight", {V, C}, TensorRole::kEmbedding);
  if (c.positional_encoding == "learned")
    add("model.embed_positions.weight", {c.max_seq_len, C}, TensorRole::kPosition);
  for (int l = 0; l < c.n_layers; ++l) {
    add_norm(layer_tensor_name(l, "input_layernorm"), C);
    add(layer_tensor_name(l, "self_attn.q_proj.weight"), {q_dim, C}, TensorRole::kMatrix);
    if (c.attention_bias) add(layer_tensor_name(l, "self_attn.q_proj.bias"), {q_dim}, TensorRole::kBias);
    add(layer_tensor_name(l, "self_attn.k_proj.weight"), {kv_dim, C}, TensorRole::kMatrix);
    if (c.attention_bias) add(layer_tensor_name(l, "self_attn.k_proj.bias"), {kv_dim}, TensorRole::kBias);
    add(layer_tensor_name(l, "self_attn.v_proj.weight"), {kv_dim, C}, TensorRole::kMatrix);
    if (c.attention_bias) add(layer_tensor_name(l, "self_attn.v_proj.bias"), {kv_dim}, TensorRole::kBias);
    add(layer_tensor_name(l, "self_attn.o_proj.weight"), {C, q_dim}, TensorRole::kMatrix);
    if (c.qk_norm) {
      add(layer_tensor_name(l, "self_attn.q_norm.weight"), {D}, TensorRole::kNorm);
      add(layer_tensor_name(l, "self_attn.k_norm.weight"), {D}, TensorRole::kNorm);
    }
    add_norm(layer_tensor_name(l, "post_attention_layernorm"), C);
    if (c.gated_mlp()) add(layer_tensor_name(l, "mlp.gate_proj.weight"), {F, C}, TensorRole::kMatrix);
    add(layer_tensor_name(l, "mlp.up_proj.weight"), {F, C}, TensorRole::kMatrix);
    add(layer_tensor_name(l, "mlp.down_proj.weight"), {C, F}, TensorRole::kMatrix);
  }
  add_norm("model.norm", C);
  if (!c.tie_word_embeddings) add("lm_head.weight", {V, C}, TensorRole::kHead);
  assign_gradient_offsets();
}

void ParameterLayout::add(const std::string& name, std::vector<int64_t> shape, TensorRole role) {
  TensorInfo t;
  t.name = name;
  t.shape = std::move(shape);
  t.role = role;
  t.numel = 1;
  for (int64_t d : t.shape) t.numel *= d;
  t.offset = total_;
  index_[t.name] = tensors_.size();
  total_ += static_cast<size_t>(t.numel);
  tensors_.push_back(std::move(t));
}

void ParameterLayout::assign_gradient_offsets() {
  trainable_total_ = 0;
  for (auto& t : tensors_) {
    t.grad_offset = trainable_total_;
    if (t.trainable) trainable_total_ += static_cast<size_t>(t.numel);
  }
}

const TensorInfo& ParameterLayout::at(const std::string& name) const {
  auto it = index_.find(name);
  if (it != index_.end()) return tensors_[it->second];
  throw std::out_of_range("no parameter tensor named " + name);
}

bool ParameterLayout::contains(const std::string& name) const {
  return index_.count(name) > 0;
}

void ParameterLayout::set_trainable(const std::string& name, bool trainable) {
  auto it = index_.find(name);
  if (it == index_.end()) throw std::out_of_range("no parameter tensor named " + name);
  tensors_[it->second].trainable = trainable;
  assign_gradient_offsets();
}

void ParameterLayout::append(const std::string& name, std::vector<int64_t> shape, TensorRole role) {
  if (contains(name)) throw std::invalid_argument("parameter tensor " + name + " already exists");
  add(name, std::move(shape), role);
  assign_gradient_offsets();
}

std::vector<float> gather_trainable(const ParameterLayout& layout, const float* arena) {
  std::vector<float> out(layout.trainable_elements());
  for (const auto& t : layout.tensors()) {
    if (t.trainable) std::copy_n(arena + t.offset, t.numel, out.begin() + t.grad_offset);
  }
  return out;
}

void scatter_trainable(const ParameterLayout& layout, const float* trainable, float* arena) {
  for (const auto& t : layout.tensors()) {
    if (t.trainable) std::copy_n(trainable + t.grad_offset, t.numel, arena + t.offset);
  }
}

}  // namespace llm
