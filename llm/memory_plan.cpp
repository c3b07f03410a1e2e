#include "llm/memory_plan.h"

#include <cstdio>

namespace llm {

size_t LayerActivationSizes::total() const {
  return norm1_out + norm1_mean + norm1_rstd + q + k + v + q_normed + k_normed + q_rstd + k_rstd + q_rot +
         k_rot + probs + attn_out + mid + norm2_out + norm2_mean + norm2_rstd + gate + up + act;
}

size_t GlobalActivationSizes::total() const {
  return final_norm_out + final_mean + final_rstd + logits + logprobs + lse + branch + d_residual +
         d_norm_out + d_q + d_k + d_v + d_attn_out + d_branch + d_q_pre + d_k_pre + d_gate + d_up + d_act +
         d_logits + d_logprobs;
}

LayerActivationSizes layer_activation_sizes(const ModelConfig& c, int B, int T) {
  const size_t N = static_cast<size_t>(B) * T, C = c.d_model, F = c.d_ff, D = c.resolved_head_dim();
  const size_t Q = c.n_heads * D, K = c.n_kv_heads * D;
  const bool layernorm = c.norm_type == "layernorm";
  LayerActivationSizes s;
  s.norm1_out = N * C;
  s.norm1_mean = layernorm ? N : 0;
  s.norm1_rstd = N;
  s.q = N * Q;
  s.k = N * K;
  s.v = N * K;
  if (c.qk_norm) {
    s.q_normed = N * Q;
    s.k_normed = N * K;
    s.q_rstd = N * c.n_heads;
    s.k_rstd = N * c.n_kv_heads;
  }
  if (c.uses_rope()) {
    s.q_rot = N * Q;
    s.k_rot = N * K;
  }
  s.probs = static_cast<size_t>(B) * c.n_heads * T * T;
  s.attn_out = N * Q;
  s.mid = N * C;
  s.norm2_out = N * C;
  s.norm2_mean = layernorm ? N : 0;
  s.norm2_rstd = N;
  s.gate = c.gated_mlp() ? N * F : 0;
  s.up = N * F;
  s.act = N * F;
  return s;
}

GlobalActivationSizes global_activation_sizes(const ModelConfig& c, int B, int T) {
  const size_t N = static_cast<size_t>(B) * T, C = c.d_model, F = c.d_ff, D = c.resolved_head_dim();
  const size_t V = c.vocab_size, Q = c.n_heads * D, K = c.n_kv_heads * D;
  GlobalActivationSizes s;
  s.final_norm_out = N * C;
  s.final_mean = N;
  s.final_rstd = N;
  s.logits = N * V;
  s.logprobs = N;
  s.lse = N;
  s.branch = N * C;
  s.d_residual = N * C;
  s.d_norm_out = N * C;
  s.d_q = N * Q;
  s.d_k = N * K;
  s.d_v = N * K;
  s.d_attn_out = N * Q;
  s.d_branch = N * C;
  if (c.qk_norm) {
    s.d_q_pre = N * Q;
    s.d_k_pre = N * K;
  }
  s.d_gate = c.gated_mlp() ? N * F : 0;
  s.d_up = N * F;
  s.d_act = N * F;
  s.d_logits = N * V;
  s.d_logprobs = N;
  return s;
}

std::string MemoryPlan::describe() const {
  auto mb = [](size_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); };
  char buf[256];
  std::snprintf(
      buf, sizeof(buf),
      "params %.1f MB | grads %.1f MB | optimizer %.1f MB | activations %.1f MB | scratch %.1f MB | "
      "total %.1f MB",
      mb(parameters), mb(gradients), mb(optimizer_state), mb(activations), mb(scratch), mb(total()));
  std::string out = buf;
  if (nf4_params > 0) {
    std::snprintf(buf, sizeof(buf), " | nf4 base %.1f MB (%.3f bytes per base parameter)", mb(nf4_base),
                  static_cast<double>(nf4_base) / static_cast<double>(nf4_params));
    out += buf;
  }
  return out;
}

MemoryPlan plan_memory(const ModelConfig& c, int B, int T, bool recompute, size_t total_params,
                       size_t trainable_params, size_t bytes_per_value, double optimizer_bytes_per_param) {
  const LayerActivationSizes layer = layer_activation_sizes(c, B, T);
  const GlobalActivationSizes global = global_activation_sizes(c, B, T);
  const size_t residuals = static_cast<size_t>(c.n_layers + 1) * B * T * c.d_model;
  const size_t saved_layers = recompute ? 1 : static_cast<size_t>(c.n_layers);
  MemoryPlan p;
  p.parameters = total_params * bytes_per_value;
  p.gradients = trainable_params * bytes_per_value;
  p.optimizer_state = static_cast<size_t>(optimizer_bytes_per_param * static_cast<double>(trainable_params));
  p.activations = (residuals + saved_layers * layer.total()) * bytes_per_value;
  p.scratch = global.total() * bytes_per_value;
  return p;
}

}  // namespace llm
