// The model architecture: every option of the LLM-Lab reference, with its names and defaults, read
// from a JSON file and validated before any memory is touched.
#pragma once

#include <cstdint>
#include <string>

#include "llm/json_config.h"

namespace llm {

struct ModelConfig {
  // Defaults are LLM-Lab's (a Qwen2.5-0.5B-shaped model) except tokenizer_name: LLM-Lab names a hub
  // tokenizer, and this project reads only local files, so the default is the built-in byte tokenizer.
  std::string tokenizer_name = "byte";       // "byte" or a path to a tokenizer folder / tokenizer.json
  std::string positional_encoding = "rope";  // sinusoidal | learned | rope | alibi | yarn
  double rope_theta = 10000.0;
  std::string rope_scaling = "none";  // none | linear | llama3 (yarn is its own positional_encoding)
  double rope_scaling_factor = 1.0;   // linear, llama3 and yarn
  int rope_original_max_seq_len = 0;  // llama3 and yarn; 0 means max_seq_len
  double llama3_low_freq_factor = 1.0;
  double llama3_high_freq_factor = 4.0;
  double yarn_beta_fast = 32.0;
  double yarn_beta_slow = 1.0;
  double yarn_attention_factor = 0.0;       // 0 means 0.1 ln(factor) + 1
  std::string attention_type = "gqa";       // mha | mqa | gqa
  std::string norm_type = "rmsnorm";        // layernorm | rmsnorm
  std::string activation = "swiglu";        // relu | gelu | silu | leaky_relu | swiglu
  std::string gelu_approximation = "none";  // none (erf, PyTorch's default) | tanh
  double leaky_relu_slope = 0.01;
  int d_model = 896;
  int n_heads = 14;
  int n_kv_heads = 2;
  int head_dim = 0;  // 0 means d_model / n_heads (Qwen3 sets it explicitly)
  int d_ff = 4864;
  int n_layers = 24;
  int vocab_size = 151936;
  int max_seq_len = 1024;
  double dropout = 0.0;
  int sliding_window = 0;       // 0 (or null) means none
  bool attention_bias = false;  // bias on the Q, K and V projections (Qwen2)
  bool qk_norm = false;         // per-head RMSNorm on Q and K before RoPE (Qwen3)
  double norm_eps = 1e-6;
  bool tie_word_embeddings = true;

  int resolved_head_dim() const { return head_dim > 0 ? head_dim : d_model / n_heads; }
  bool uses_rope() const { return positional_encoding == "rope" || positional_encoding == "yarn"; }
  bool gated_mlp() const { return activation == "swiglu"; }

  json to_json() const;
};

// Reads and validates a config object. `origin` names it in messages (usually the file path).
// Throws ConfigError listing every problem.
ModelConfig model_config_from_json(const json& object, const std::string& origin);
ModelConfig load_model_config(const std::string& path);
// Checks the relations between fields (divisibility, ranges); returns one message per problem.
std::vector<std::string> validate_model_config(const ModelConfig& config);

// Parameter counts by kind, from the shapes the model will allocate.
struct ParameterCount {
  int64_t embedding = 0;  // token (and learned position) embeddings
  int64_t attention = 0;  // Q, K, V, O projections and their biases
  int64_t mlp = 0;
  int64_t norms = 0;
  int64_t lm_head = 0;  // 0 when tied to the embedding
  int64_t total() const { return embedding + attention + mlp + norms + lm_head; }
};
ParameterCount count_parameters(const ModelConfig& config);

// Training FLOPs per token for MFU: 6 N + 12 L H Q T, with N the parameters that take part in matrix
// products (all but the input embedding lookup; a tied LM head counts once), L layers, H heads, Q the head
// dimension and T the sequence length (the forward and backward of the attention scores and values).
double training_flops_per_token(const ModelConfig& config, int seq_len);

}  // namespace llm
