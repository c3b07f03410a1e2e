#include "llm/config.h"

#include <cmath>

namespace llm {

namespace {

const std::vector<std::string> kPositionalEncodings = {"sinusoidal", "learned", "rope", "alibi", "yarn"};
const std::vector<std::string> kRopeScalings = {"none", "linear", "llama3"};
const std::vector<std::string> kAttentionTypes = {"mha", "mqa", "gqa"};
const std::vector<std::string> kNormTypes = {"layernorm", "rmsnorm"};
const std::vector<std::string> kActivations = {"relu", "gelu", "silu", "leaky_relu", "swiglu"};
const std::vector<std::string> kGeluApproximations = {"none", "tanh"};

}  // namespace

ModelConfig model_config_from_json(const json& object, const std::string& origin) {
  ModelConfig c;
  KeyReader r(object, origin);
  r.get("tokenizer_name", c.tokenizer_name);
  r.get_choice("positional_encoding", c.positional_encoding, kPositionalEncodings);
  r.get("rope_theta", c.rope_theta);
  r.get_choice("rope_scaling", c.rope_scaling, kRopeScalings);
  r.get("rope_scaling_factor", c.rope_scaling_factor);
  r.get("rope_original_max_seq_len", c.rope_original_max_seq_len);
  r.get("llama3_low_freq_factor", c.llama3_low_freq_factor);
  r.get("llama3_high_freq_factor", c.llama3_high_freq_factor);
  r.get("yarn_beta_fast", c.yarn_beta_fast);
  r.get("yarn_beta_slow", c.yarn_beta_slow);
  r.get("yarn_attention_factor", c.yarn_attention_factor);
  r.get_choice("attention_type", c.attention_type, kAttentionTypes);
  r.get_choice("norm_type", c.norm_type, kNormTypes);
  r.get_choice("activation", c.activation, kActivations);
  r.get_choice("gelu_approximation", c.gelu_approximation, kGeluApproximations);
  r.get("leaky_relu_slope", c.leaky_relu_slope);
  r.get("d_model", c.d_model);
  r.get("n_heads", c.n_heads);
  const bool kv_heads_given = r.get("n_kv_heads", c.n_kv_heads);
  r.get("head_dim", c.head_dim);
  r.get("d_ff", c.d_ff);
  r.get("n_layers", c.n_layers);
  r.get("vocab_size", c.vocab_size);
  r.get("max_seq_len", c.max_seq_len);
  r.get("dropout", c.dropout);
  r.get("sliding_window", c.sliding_window);
  r.get("attention_bias", c.attention_bias);
  r.get("qk_norm", c.qk_norm);
  r.get("norm_eps", c.norm_eps);
  r.get("tie_word_embeddings", c.tie_word_embeddings);

  // MHA and MQA fix the number of K/V heads; an explicit conflicting value is an error below.
  if (!kv_heads_given) {
    if (c.attention_type == "mha") c.n_kv_heads = c.n_heads;
    if (c.attention_type == "mqa") c.n_kv_heads = 1;
  }
  if (r.problems().empty()) {
    for (const auto& message : validate_model_config(c)) r.problems_add(message);
  }
  r.finish();
  return c;
}

std::vector<std::string> validate_model_config(const ModelConfig& c) {
  std::vector<std::string> p;
  auto positive = [&](const char* key, int value) {
    if (value <= 0) p.push_back(std::string(key) + " must be positive, found " + std::to_string(value));
  };
  positive("d_model", c.d_model);
  positive("n_heads", c.n_heads);
  positive("n_kv_heads", c.n_kv_heads);
  positive("d_ff", c.d_ff);
  positive("n_layers", c.n_layers);
  positive("vocab_size", c.vocab_size);
  positive("max_seq_len", c.max_seq_len);
  if (!p.empty()) return p;

  if (c.head_dim < 0)
    p.push_back("head_dim must be 0 (derived) or positive, found " + std::to_string(c.head_dim));
  if (c.head_dim == 0 && c.d_model % c.n_heads != 0) {
    p.push_back("d_model (" + std::to_string(c.d_model) + ") must be divisible by n_heads (" +
                std::to_string(c.n_heads) + ")");
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    p.push_back("n_heads (" + std::to_string(c.n_heads) + ") must be divisible by n_kv_heads (" +
                std::to_string(c.n_kv_heads) + ")");
  }
  if (c.attention_type == "mha" && c.n_kv_heads != c.n_heads) {
    p.push_back("attention_type \"mha\" needs n_kv_heads equal to n_heads (" + std::to_string(c.n_heads) +
                "), found " + std::to_string(c.n_kv_heads) + "; use \"gqa\" for shared K/V heads");
  }
  if (c.attention_type == "mqa" && c.n_kv_heads != 1) {
    p.push_back("attention_type \"mqa\" needs n_kv_heads 1, found " + std::to_string(c.n_kv_heads));
  }
  const int hd = c.head_dim > 0 ? c.head_dim : (c.d_model % c.n_heads == 0 ? c.d_model / c.n_heads : 0);
  if (c.uses_rope() && hd % 2 != 0) {
    p.push_back("positional_encoding \"" + c.positional_encoding + "\" needs an even head dimension, found " +
                std::to_string(hd) + " (d_model / n_heads)");
  }
  if (c.rope_theta <= 0) p.push_back("rope_theta must be positive");
  if (c.rope_scaling != "none" && !c.uses_rope()) {
    p.push_back("rope_scaling \"" + c.rope_scaling + "\" needs positional_encoding \"rope\"");
  }
  if (c.positional_encoding == "yarn" && c.rope_scaling != "none") {
    p.push_back("positional_encoding \"yarn\" is its own RoPE scaling; set rope_scaling to \"none\"");
  }
  if (c.rope_scaling_factor < 1.0) {
    p.push_back("rope_scaling_factor must be at least 1, found " + std::to_string(c.rope_scaling_factor));
  }
  if (c.rope_original_max_seq_len < 0) p.push_back("rope_original_max_seq_len must not be negative");
  if (c.rope_scaling == "llama3" && !(c.llama3_high_freq_factor > c.llama3_low_freq_factor)) {
    p.push_back("llama3_high_freq_factor must be greater than llama3_low_freq_factor");
  }
  if (c.positional_encoding == "yarn" && !(c.yarn_beta_fast > c.yarn_beta_slow)) {
    p.push_back("yarn_beta_fast must be greater than yarn_beta_slow");
  }
  if (!(c.dropout >= 0.0 && c.dropout < 1.0)) {
    p.push_back("dropout must be in [0, 1), found " + std::to_string(c.dropout));
  }
  if (c.sliding_window < 0) p.push_back("sliding_window must be 0 (none) or positive");
  if (!(c.norm_eps > 0.0 && c.norm_eps < 1.0)) p.push_back("norm_eps must be in (0, 1)");
  if (c.leaky_relu_slope < 0.0) p.push_back("leaky_relu_slope must not be negative");
  if (c.tokenizer_name.empty())
    p.push_back("tokenizer_name must not be empty (use \"byte\" for the built-in one)");
  return p;
}

ModelConfig load_model_config(const std::string& path) {
  return model_config_from_json(parse_json_file(path), path);
}

json ModelConfig::to_json() const {
  json j;
  j["tokenizer_name"] = tokenizer_name;
  j["positional_encoding"] = positional_encoding;
  j["rope_theta"] = rope_theta;
  j["rope_scaling"] = rope_scaling;
  j["rope_scaling_factor"] = rope_scaling_factor;
  j["rope_original_max_seq_len"] = rope_original_max_seq_len;
  j["llama3_low_freq_factor"] = llama3_low_freq_factor;
  j["llama3_high_freq_factor"] = llama3_high_freq_factor;
  j["yarn_beta_fast"] = yarn_beta_fast;
  j["yarn_beta_slow"] = yarn_beta_slow;
  j["yarn_attention_factor"] = yarn_attention_factor;
  j["attention_type"] = attention_type;
  j["norm_type"] = norm_type;
  j["activation"] = activation;
  j["gelu_approximation"] = gelu_approximation;
  j["leaky_relu_slope"] = leaky_relu_slope;
  j["d_model"] = d_model;
  j["n_heads"] = n_heads;
  j["n_kv_heads"] = n_kv_heads;
  j["head_dim"] = head_dim;
  j["d_ff"] = d_ff;
  j["n_layers"] = n_layers;
  j["vocab_size"] = vocab_size;
  j["max_seq_len"] = max_seq_len;
  j["dropout"] = dropout;
  j["sliding_window"] = sliding_window;
  j["attention_bias"] = attention_bias;
  j["qk_norm"] = qk_norm;
  j["norm_eps"] = norm_eps;
  j["tie_word_embeddings"] = tie_word_embeddings;
  return j;
}

ParameterCount count_parameters(const ModelConfig& c) {
  ParameterCount n;
  const int64_t C = c.d_model, D = c.resolved_head_dim(), F = c.d_ff, V = c.vocab_size;
  const int64_t q_dim = c.n_heads * D, kv_dim = c.n_kv_heads * D;
  n.embedding = V * C;
  if (c.positional_encoding == "learned") n.embedding += static_cast<int64_t>(c.max_seq_len) * C;
  const int64_t norm_size = c.norm_type == "layernorm" ? 2 * C : C;  // LayerNorm has a bias
  int64_t attention = C * q_dim + 2 * C * kv_dim + q_dim * C;
  if (c.attention_bias) attention += q_dim + 2 * kv_dim;
  const int64_t mlp = (c.gated_mlp() ? 3 : 2) * C * F;
  int64_t norms = 2 * norm_size;
  if (c.qk_norm) norms += 2 * D;
  n.attention = c.n_layers * attention;
  n.mlp = c.n_layers * mlp;
  n.norms = c.n_layers * norms + norm_size;  // plus the final norm
  n.lm_head = c.tie_word_embeddings ? 0 : V * C;
  return n;
}

double training_flops_per_token(const ModelConfig& c, int seq_len) {
  const ParameterCount n = count_parameters(c);
  const double matmul_params =
      static_cast<double>(n.attention + n.mlp) + static_cast<double>(c.vocab_size) * c.d_model;
  const double attention =
      12.0 * c.n_layers * c.n_heads * c.resolved_head_dim() * static_cast<double>(seq_len);
  return 6.0 * matmul_params + attention;
}

}  // namespace llm
