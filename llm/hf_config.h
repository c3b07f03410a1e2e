// Hugging Face config.json <-> ModelConfig.
//
// Import reads the config.json of LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM and
// MistralForCausalLM folders (the keys of transformers v4 and v5, including v5's "rope_parameters") and
// maps it onto our architecture options:
//   hidden_size -> d_model, intermediate_size -> d_ff, num_hidden_layers -> n_layers,
//   num_attention_heads -> n_heads, num_key_value_heads -> n_kv_heads (attention_type mha/mqa/gqa from
//   the counts), head_dim, vocab_size, rms_norm_eps -> norm_eps (norm_type rmsnorm),
//   hidden_act silu -> activation swiglu (the gated MLP), max_position_embeddings -> max_seq_len,
//   rope_theta and rope_scaling / rope_parameters (default, linear, llama3, yarn) -> positional_encoding
//   rope or yarn with its factors, tie_word_embeddings, q/k/v bias (Qwen2 always; Llama and Qwen3
//   attention_bias would also put a bias on o_proj, which we do not have: an error), q/k norm (Qwen3),
//   sliding_window (Mistral; Qwen2/Qwen3 only with use_sliding_window and every layer windowed).
// Anything that changes the computation and that we cannot express is an error naming the key; keys
// without effect on the model (use_cache, initializer_range, ...) are ignored. Defaults for absent keys
// are those of the transformers config class, except that the sizes (hidden_size, intermediate_size,
// num_hidden_layers, num_attention_heads, vocab_size) are required.
//
// Export chooses the architecture from our config (Qwen3 if qk_norm, Qwen2 if attention_bias, Mistral
// if sliding_window, else Llama) and writes keys that transformers v4 and v5 both read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "llm/config.h"
#include "llm/json_config.h"

namespace llm {

// Token ids from config.json / generation_config.json; -1 (or an empty list) means none.
struct HfSpecialTokens {
  int64_t bos = -1;
  std::vector<int64_t> eos;
  int64_t pad = -1;
};

struct HfConfigImport {
  ModelConfig config;
  std::string architecture;  // "LlamaForCausalLM", ...
  std::string torch_dtype;   // "float32", "bfloat16", "float16", or "" when the file does not say
  int max_position_embeddings = 0;
  HfSpecialTokens tokens;
  std::vector<std::string> notes;  // what was ignored and why, for tools to print
};

struct HfImportOptions {
  // 0: max_seq_len = max_position_embeddings. Otherwise max_seq_len is this value, e.g. to cap the
  // memory planned for a long-context model (RoPE scaling keeps using the file's values).
  int max_seq_len = 0;
};

// The architectures import accepts.
const std::vector<std::string>& hf_supported_architectures();

// Reads a parsed config.json; `origin` names it in errors. Throws ConfigError with one line per
// problem. tokenizer_name is left at its default; load_hf_config sets it to the folder.
HfConfigImport hf_config_from_json(const json& config, const std::string& origin,
                                   const HfImportOptions& options = {});
// Parses config.json text and imports it (malformed JSON, including numbers out of range, is a
// ConfigError "ORIGIN:LINE:COL: malformed JSON: ...").
HfConfigImport hf_config_from_text(const std::string& text, const std::string& origin,
                                   const HfImportOptions& options = {});
// Reads DIR/config.json, and the special token ids of DIR/generation_config.json when present (they
// take precedence: generation uses them). Sets tokenizer_name to DIR.
HfConfigImport load_hf_config(const std::string& dir, const HfImportOptions& options = {});

// The transformers architecture our config exports as. Throws ConfigError when the config cannot be
// expressed by any of them (LayerNorm, a non-gated MLP, non-RoPE positions, Qwen3 with q/k/v bias).
std::string hf_architecture_for(const ModelConfig& config);
// config.json for `config`. torch_dtype: "float32", "bfloat16" or "float16".
json hf_config_to_json(const ModelConfig& config, const HfSpecialTokens& tokens,
                       const std::string& torch_dtype = "float32");
json hf_generation_config_to_json(const HfSpecialTokens& tokens);

}  // namespace llm
