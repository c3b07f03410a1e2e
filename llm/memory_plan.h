// The memory plan: every buffer the model needs, sized from the config, the batch and the sequence
// length before any work starts. The model allocates exactly these sizes, and the same numbers are
// printed at start-up and by ./model_info.
//
// The residual stream is kept at the input of every layer and at the final norm: (n_layers + 1) N*C.
// Activations saved for the backward pass, per layer (N = B*T tokens, C = d_model, F = d_ff,
// Q = n_heads*head_dim, K = n_kv_heads*head_dim):
//   residual input N*C | norm1 out N*C, stats 2N | q N*Q, k N*K, v N*K | (qk_norm) normed q, k and
//   their per-head rstd | (rope) rotated q, k | probabilities B*n_heads*T*T | attention out N*Q |
//   mid residual N*C | norm2 out N*C, stats 2N | (gated) gate N*F | up N*F | activation N*F.
// With recompute, only the residual input of each layer is kept; one layer's worth of the rest is
// allocated and refilled by re-running that layer's forward during the backward pass.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "llm/config.h"

namespace llm {

// Element counts of one layer's saved activations.
struct LayerActivationSizes {
  size_t norm1_out = 0, norm1_mean = 0, norm1_rstd = 0;
  size_t q = 0, k = 0, v = 0;
  size_t q_normed = 0, k_normed = 0, q_rstd = 0, k_rstd = 0;  // qk_norm only
  size_t q_rot = 0, k_rot = 0;                                // rope only
  size_t probs = 0, attn_out = 0, mid = 0;
  size_t norm2_out = 0, norm2_mean = 0, norm2_rstd = 0;
  size_t gate = 0, up = 0, act = 0;
  size_t total() const;
};
LayerActivationSizes layer_activation_sizes(const ModelConfig& config, int B, int T);

// Element counts of the buffers that exist once: logits, final norm, and the gradient scratch.
struct GlobalActivationSizes {
  size_t final_norm_out = 0, final_mean = 0, final_rstd = 0;
  size_t logits = 0, logprobs = 0, lse = 0;
  // Backward scratch, reused by every layer.
  size_t branch = 0;  // one residual branch's output, before it is added to the stream
  size_t d_residual = 0, d_norm_out = 0, d_q = 0, d_k = 0, d_v = 0, d_attn_out = 0, d_branch = 0;
  size_t d_q_pre = 0, d_k_pre = 0;  // qk_norm only: gradients before the per-head norm
  size_t d_gate = 0, d_up = 0, d_act = 0, d_logits = 0, d_logprobs = 0;
  size_t total() const;
};
GlobalActivationSizes global_activation_sizes(const ModelConfig& config, int B, int T);

// Bytes per kind, for printing and for the "does it fit" check.
struct MemoryPlan {
  size_t parameters = 0, gradients = 0, optimizer_state = 0, activations = 0, scratch = 0;
  // QLoRA: bytes of the NF4 base weights (codes, absmax and their double quantisation) and how many
  // base parameters they hold; zero otherwise.
  size_t nf4_base = 0, nf4_params = 0;
  size_t total() const { return parameters + gradients + optimizer_state + activations + scratch + nf4_base; }
  std::string describe() const;  // "params 12.3 MB | grads ... | total ..."
};

// The plan for training with `bytes_per_value`-byte parameters and activations, `trainable`
// parameters with gradients, and `optimizer_bytes_per_param` of state per trainable parameter.
MemoryPlan plan_memory(const ModelConfig& config, int B, int T, bool recompute, size_t total_params,
                       size_t trainable_params, size_t bytes_per_value, double optimizer_bytes_per_param);

}  // namespace llm
