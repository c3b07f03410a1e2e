#include "llm/hf_config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <utility>
#include <vector>

namespace llm {

namespace {

// What a transformers config class assumes for keys that config.json leaves out.
struct ArchSpec {
  const char* architecture;
  const char* model_type;
  int kv_heads;  // default num_key_value_heads; 0 means num_attention_heads
  int head_dim;  // default head_dim; 0 means hidden_size / num_attention_heads
  int max_position_embeddings;
  bool qkv_bias;        // always has q/k/v bias (Qwen2)
  bool qk_norm;         // always has q/k RMSNorm (Qwen3)
  bool attention_bias;  // reads attention_bias (bias on q, k, v AND o)
  bool qwen_window;     // sliding window only with use_sliding_window, from max_window_layers on
  int default_window;   // Mistral: sliding_window when the key is absent
  int64_t bos, eos;     // default token ids (-1: none)
};

const ArchSpec kArchs[] = {
    {"LlamaForCausalLM", "llama", 0, 0, 2048, false, false, true, false, 0, 1, 2},
    {"Qwen2ForCausalLM", "qwen2", 32, 0, 32768, true, false, false, true, 0, -1, -1},
    {"Qwen3ForCausalLM", "qwen3", 32, 128, 32768, false, true, true, true, 0, -1, -1},
    {"MistralForCausalLM", "mistral", 8, 0, 4096 * 32, false, false, false, false, 4096, 1, 2},
};

// Keys that do not change the model's computation and are ignored without a note.
const std::set<std::string> kSilentKeys = {"architectures",
                                           "model_type",
                                           "transformers_version",
                                           "torch_dtype",
                                           "dtype",
                                           "use_cache",
                                           "initializer_range",
                                           "_name_or_path",
                                           "pretraining_tp",
                                           "output_attentions",
                                           "output_hidden_states",
                                           "return_dict",
                                           "is_decoder",
                                           "is_encoder_decoder",
                                           "id2label",
                                           "label2id",
                                           "problem_type",
                                           "tokenizer_class",
                                           "_attn_implementation",
                                           "attn_implementation",
                                           "bos_token_id",
                                           "eos_token_id",
                                           "pad_token_id",
                                           "max_window_layers",
                                           "use_sliding_window",
                                           "layer_types",
                                           "sliding_window",
                                           "attention_dropout",
                                           "rope_theta",
                                           "rope_scaling",
                                           "rope_parameters",
                                           "head_dim",
                                           "tie_word_embeddings",
                                           "hidden_act",
                                           "mlp_bias",
                                           "attention_bias",
                                           "partial_rotary_factor",
                                           "vocab_size",
                                           "hidden_size",
                                           "intermediate_size",
                                           "num_hidden_layers",
                                           "num_attention_heads",
                                           "num_key_value_heads",
                                           "rms_norm_eps",
                                           "max_position_embeddings",
                                           "chunk_size_feed_forward",
                                           "tie_encoder_decoder",
                                           "torchscript",
                                           "use_bfloat16",
                                           "pruned_heads",
                                           "add_cross_attention",
                                           "finetuning_task",
                                           "cross_attention_hidden_size",
                                           "prefix",
                                           "sep_token_id",
                                           "decoder_start_token_id",
                                           "task_specific_params",
                                           "tf_legacy_loss"};

std::string join(const std::vector<std::string>& items) {
  std::string s;
  for (const auto& i : items) s += (s.empty() ? "" : ", ") + i;
  return s;
}

// True when `value` nests containers more than `limit` levels deep. Iterative: copying, comparing or
// printing a json value recurses, so arbitrarily deep input is refused before any of that happens.
bool nested_deeper_than(const json& value, int limit) {
  std::vector<std::pair<const json*, int>> stack = {{&value, 1}};
  while (!stack.empty()) {
    const auto [v, depth] = stack.back();
    stack.pop_back();
    if (!v->is_structured()) continue;
    if (depth > limit) return true;
    for (const auto& child : *v) stack.emplace_back(&child, depth + 1);
  }
  return false;
}

// A value for an error message: scalars as JSON, containers by kind (never a huge dump).
std::string describe(const json& v) {
  if (v.is_array()) return "a list of " + std::to_string(v.size()) + " entries";
  if (v.is_object()) return "an object";
  std::string text = v.dump();
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

constexpr int kMaxDepth = 8;  // config.json nests at most 3 levels (rope_parameters per layer type)

std::string number(double v) {
  json j = v;
  return j.dump();
}

// A token id: an integer, or null. eos may also be a list of integers.
void read_token(const json& object, const char* key, const std::string& origin, int64_t* id,
                std::vector<std::string>* problems) {
  auto it = object.find(key);
  if (it == object.end()) return;
  if (it->is_null()) {
    *id = -1;
  } else if (it->is_number_integer() && it->get<int64_t>() >= 0) {
    *id = it->get<int64_t>();
  } else {
    problems->push_back(origin + ": key \"" + key + "\": expected a non-negative integer or null, found " +
                        json_type_name(*it));
  }
}

void read_eos(const json& object, const std::string& origin, std::vector<int64_t>* eos,
              std::vector<std::string>* problems) {
  auto it = object.find("eos_token_id");
  if (it == object.end()) return;
  eos->clear();
  if (it->is_null()) return;
  const json list = it->is_array() ? *it : json::array({*it});
  for (const auto& e : list) {
    if (!e.is_number_integer() || e.get<int64_t>() < 0) {
      problems->push_back(origin +
                          ": key \"eos_token_id\": expected a non-negative integer, a list of them, " +
                          "or null, found " + json_type_name(*it));
      eos->clear();
      return;
    }
    eos->push_back(e.get<int64_t>());
  }
}

// Reads RoPE settings from `rope` (rope_scaling or rope_parameters, possibly null) into `c`.
void read_rope(const json& top, const json& rope_in, const std::string& origin, int max_position_embeddings,
               ModelConfig& c, std::vector<std::string>& problems) {
  c.positional_encoding = "rope";
  c.rope_scaling = "none";
  c.rope_scaling_factor = 1.0;
  double theta = 10000.0;
  if (top.contains("rope_theta") && !top["rope_theta"].is_null()) {
    if (!top["rope_theta"].is_number()) {
      problems.push_back(origin + ": key \"rope_theta\": expected a number, found " +
                         json_type_name(top["rope_theta"]));
    } else {
      theta = top["rope_theta"].get<double>();
    }
  }
  json rope = rope_in;
  const std::string where = origin + ": rope settings";
  if (rope.is_object()) {
    // transformers v5 may nest the parameters per layer type; one set for all layers is all we run.
    std::vector<json> nested;
    for (const char* layer_type : {"full_attention", "sliding_attention"}) {
      if (rope.contains(layer_type) && rope[layer_type].is_object()) nested.push_back(rope[layer_type]);
    }
    if (!nested.empty()) {
      for (const auto& n : nested) {
        if (n != nested.front()) {
          problems.push_back(where + ": different RoPE parameters per layer type are not supported");
          return;
        }
      }
      rope = nested.front();
    }
  } else if (!rope.is_null()) {
    problems.push_back(where + ": expected an object, found " + json_type_name(rope));
    return;
  }
  if (rope.is_null()) {
    c.rope_theta = theta;
    return;
  }
  KeyReader r(rope, where);
  r.get("rope_theta", theta);
  c.rope_theta = theta;
  std::string type = "default";
  if (!r.get("rope_type", type)) r.get("type", type);
  double partial = 1.0;
  r.get("partial_rotary_factor", partial);
  if (partial != 1.0)
    r.problem("partial_rotary_factor",
              "partial rotary embeddings are not supported, found " + number(partial));

  if (type == "default") {
    // nothing to scale
  } else if (type == "linear") {
    c.rope_scaling = "linear";
    if (!r.get("factor", c.rope_scaling_factor)) r.problem("factor", "linear RoPE scaling needs a factor");
  } else if (type == "llama3") {
    c.rope_scaling = "llama3";
    const bool has_factor = r.get("factor", c.rope_scaling_factor);
    const bool has_low = r.get("low_freq_factor", c.llama3_low_freq_factor);
    const bool has_high = r.get("high_freq_factor", c.llama3_high_freq_factor);
    if (!has_factor || !has_low || !has_high) {
      r.problems_add("llama3 RoPE scaling needs factor, low_freq_factor and high_freq_factor");
    }
    c.rope_original_max_seq_len = max_position_embeddings;
    r.get("original_max_position_embeddings", c.rope_original_max_seq_len);
  } else if (type == "yarn") {
    c.positional_encoding = "yarn";
    c.rope_original_max_seq_len = max_position_embeddings;
    r.get("original_max_position_embeddings", c.rope_original_max_seq_len);
    if (!r.get("factor", c.rope_scaling_factor)) {
      // transformers: factor = max_position_embeddings / original_max_position_embeddings
      if (c.rope_original_max_seq_len > 0)
        c.rope_scaling_factor = static_cast<double>(max_position_embeddings) / c.rope_original_max_seq_len;
    }
    // transformers uses `value or default`, so 0 also means the default.
    double beta_fast = 0, beta_slow = 0;
    r.get("beta_fast", beta_fast);
    r.get("beta_slow", beta_slow);
    c.yarn_beta_fast = beta_fast != 0 ? beta_fast : 32.0;
    c.yarn_beta_slow = beta_slow != 0 ? beta_slow : 1.0;
    double attention_factor = 0.0, mscale = 0.0, mscale_all_dim = 0.0;
    const bool explicit_factor = r.get("attention_factor", attention_factor);
    r.get("mscale", mscale);
    r.get("mscale_all_dim", mscale_all_dim);
    const double f = c.rope_scaling_factor;
    auto get_mscale = [f](double m) { return f <= 1.0 ? 1.0 : 0.1 * m * std::log(f) + 1.0; };
    if (explicit_factor) {
      c.yarn_attention_factor = attention_factor;
      if (attention_factor <= 0)
        r.problem("attention_factor", "must be positive, found " + number(attention_factor));
    } else if (mscale != 0.0 && mscale_all_dim != 0.0) {
      c.yarn_attention_factor = get_mscale(mscale) / get_mscale(mscale_all_dim);
    } else {
      c.yarn_attention_factor = 0.0;  // ours: 0 means 0.1 ln(factor) + 1, as transformers
    }
    bool truncate = true;
    r.get("truncate", truncate);
    if (!truncate) r.problem("truncate", "yarn without truncation (truncate: false) is not supported");
  } else {
    r.problem("rope_type",
              "RoPE type \"" + type + "\" is not supported (supported: default, linear, llama3, yarn)");
  }
  for (const auto& p : r.problems()) problems.push_back(p);
}

const ArchSpec* find_arch(const std::string& name) {
  for (const auto& a : kArchs) {
    if (name == a.architecture) return &a;
  }
  return nullptr;
}

}  // namespace

const std::vector<std::string>& hf_supported_architectures() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    for (const auto& a : kArchs) n.push_back(a.architecture);
    return n;
  }();
  return names;
}

HfConfigImport hf_config_from_json(const json& j, const std::string& origin, const HfImportOptions& options) {
  HfConfigImport out;
  std::vector<std::string> problems;
  auto fail_now = [&]() {
    std::string all;
    for (const auto& p : problems) all += (all.empty() ? "" : "\n") + p;
    return ConfigError(all);
  };
  if (!j.is_object()) {
    problems.push_back(origin + ": expected a JSON object at the top level, found " + json_type_name(j));
    throw fail_now();
  }
  if (nested_deeper_than(j, kMaxDepth)) {
    problems.push_back(origin + ": nested more than " + std::to_string(kMaxDepth) + " levels deep");
    throw fail_now();
  }

  // The architecture: "architectures": [name], else "model_type".
  const ArchSpec* arch = nullptr;
  std::string named;
  if (j.contains("architectures") && !j["architectures"].is_null()) {
    const json& a = j["architectures"];
    if (!a.is_array() || a.size() != 1 || !a[0].is_string()) {
      problems.push_back(origin + ": key \"architectures\": expected a list of one name, found " +
                         describe(a));
    } else {
      named = a[0].get<std::string>();
      arch = find_arch(named);
    }
  } else if (j.contains("model_type") && j["model_type"].is_string()) {
    named = "model_type \"" + j["model_type"].get<std::string>() + "\"";
    for (const auto& s : kArchs) {
      if (j["model_type"] == s.model_type) arch = &s;
    }
  } else {
    problems.push_back(origin + ": neither \"architectures\" nor \"model_type\" says which model this is");
  }
  if (arch == nullptr) {
    if (!named.empty()) {
      problems.push_back(origin + ": unsupported architecture " + named +
                         " (supported: " + join(hf_supported_architectures()) + ")");
    }
    throw fail_now();
  }
  out.architecture = arch->architecture;

  ModelConfig& c = out.config;
  KeyReader r(j, origin);
  auto required = [&](const char* key, int& value) {
    if (!r.get(key, value)) r.problem(key, "missing (required)");
  };
  required("hidden_size", c.d_model);
  required("intermediate_size", c.d_ff);
  required("num_hidden_layers", c.n_layers);
  required("num_attention_heads", c.n_heads);
  required("vocab_size", c.vocab_size);
  c.n_kv_heads = arch->kv_heads > 0 ? arch->kv_heads : c.n_heads;
  r.get("num_key_value_heads", c.n_kv_heads);
  c.head_dim = arch->head_dim;
  r.get("head_dim", c.head_dim);
  if (c.head_dim > 0 && c.n_heads > 0 && c.head_dim * c.n_heads == c.d_model) c.head_dim = 0;  // derived
  std::string act = "silu";
  r.get("hidden_act", act);
  if (act != "silu" && act != "swish") {
    r.problem("hidden_act", "only \"silu\" (the SwiGLU gated MLP) is supported, found \"" + act + "\"");
  }
  c.activation = "swiglu";
  c.norm_type = "rmsnorm";
  c.norm_eps = 1e-6;
  r.get("rms_norm_eps", c.norm_eps);
  out.max_position_embeddings = arch->max_position_embeddings;
  r.get("max_position_embeddings", out.max_position_embeddings);
  c.tie_word_embeddings = false;
  r.get("tie_word_embeddings", c.tie_word_embeddings);
  bool mlp_bias = false;
  r.get("mlp_bias", mlp_bias);
  if (mlp_bias) r.problem("mlp_bias", "biases on the MLP projections are not supported");
  double partial = 1.0;
  r.get("partial_rotary_factor", partial);
  if (partial != 1.0) {
    r.problem("partial_rotary_factor",
              "partial rotary embeddings are not supported, found " + number(partial));
  }
  if (j.contains("quantization_config")) {
    r.problem("quantization_config", "quantized checkpoints are not supported; use the unquantized weights");
  }

  // Attention biases.
  c.attention_bias = arch->qkv_bias;
  if (arch->attention_bias) {
    bool bias = false;
    r.get("attention_bias", bias);
    if (bias) {
      r.problem("attention_bias", std::string("true puts a bias on q_proj, k_proj, v_proj AND o_proj in ") +
                                      arch->architecture + "; an o_proj bias is not supported");
    }
  } else if (!arch->qkv_bias && j.contains("attention_bias")) {
    out.notes.push_back("attention_bias is ignored: " + std::string(arch->architecture) + " has no biases");
  }
  c.qk_norm = arch->qk_norm;

  // Sliding window.
  c.sliding_window = 0;
  int window = arch->default_window;
  const bool window_given = j.contains("sliding_window");
  if (window_given && j["sliding_window"].is_null()) window = 0;
  r.get("sliding_window", window);
  if (arch->qwen_window) {
    bool use_window = false;
    r.get("use_sliding_window", use_window);
    int max_window_layers = 28;
    r.get("max_window_layers", max_window_layers);
    std::vector<std::string> layer_types;
    if (use_window && window > 0) {
      for (int l = 0; l < c.n_layers; ++l)
        layer_types.push_back(l >= max_window_layers ? "sliding_attention" : "full_attention");
    } else {
      layer_types.assign(std::max(c.n_layers, 0), "full_attention");
    }
    if (j.contains("layer_types") && !j["layer_types"].is_null()) {
      std::vector<std::string> given;
      const size_t before = r.problems().size();
      r.get("layer_types", given);
      if (r.problems().size() == before) {
        if (given.size() != static_cast<size_t>(std::max(c.n_layers, 0))) {
          r.problem("layer_types", "has " + std::to_string(given.size()) + " entries for " +
                                       std::to_string(c.n_layers) + " layers");
        } else {
          layer_types = given;
        }
      }
    }
    const size_t sliding = std::count(layer_types.begin(), layer_types.end(), "sliding_attention");
    const size_t full = std::count(layer_types.begin(), layer_types.end(), "full_attention");
    if (sliding + full != layer_types.size()) {
      r.problem("layer_types", "expected only \"full_attention\" and \"sliding_attention\"");
    } else if (sliding > 0 && full > 0) {
      r.problem("layer_types", "mixes sliding-window and full-attention layers (" + std::to_string(sliding) +
                                   " and " + std::to_string(full) +
                                   "); one kind for all layers is supported");
    } else if (sliding > 0) {
      if (window <= 0) r.problem("sliding_window", "sliding-window layers need a positive sliding_window");
      c.sliding_window = window;
    } else if (window_given && window > 0) {
      out.notes.push_back("sliding_window " + std::to_string(window) +
                          " is ignored: no layer uses it (use_sliding_window / max_window_layers)");
    }
  } else if (arch->default_window > 0) {  // Mistral: one window for every layer
    c.sliding_window = std::max(window, 0);
    if (window < 0) r.problem("sliding_window", "must be positive or null");
    if (j.contains("layer_types")) out.notes.push_back("layer_types is ignored: Mistral windows every layer");
  } else if (window_given && window > 0) {
    out.notes.push_back("sliding_window is ignored: " + std::string(arch->architecture) + " has no window");
  }

  double attention_dropout = 0.0;
  r.get("attention_dropout", attention_dropout);
  if (attention_dropout != 0.0) {
    out.notes.push_back("attention_dropout " + number(attention_dropout) +
                        " is ignored (dropout is set by the training config)");
  }
  r.get("torch_dtype", out.torch_dtype);
  r.get("dtype", out.torch_dtype);

  // RoPE: rope_scaling (transformers v4, and v5 still reads it first) or rope_parameters (v5).
  json rope = nullptr;
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    rope = j["rope_scaling"];
  } else if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) {
    rope = j["rope_parameters"];
  }
  for (const auto& p : r.problems()) problems.push_back(p);
  read_rope(j, rope, origin, out.max_position_embeddings, c, problems);

  out.tokens.bos = arch->bos;
  if (arch->eos >= 0) out.tokens.eos = {arch->eos};
  read_token(j, "bos_token_id", origin, &out.tokens.bos, &problems);
  read_eos(j, origin, &out.tokens.eos, &problems);
  read_token(j, "pad_token_id", origin, &out.tokens.pad, &problems);

  c.max_seq_len = options.max_seq_len > 0 ? options.max_seq_len : out.max_position_embeddings;
  if (options.max_seq_len > out.max_position_embeddings) {
    out.notes.push_back("max_seq_len " + std::to_string(options.max_seq_len) +
                        " exceeds max_position_embeddings " + std::to_string(out.max_position_embeddings));
  }
  c.attention_type = c.n_kv_heads == c.n_heads ? "mha" : (c.n_kv_heads == 1 ? "mqa" : "gqa");
  c.dropout = 0.0;

  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!kSilentKeys.count(it.key()) && it.key() != "quantization_config")
      out.notes.push_back("ignored key \"" + it.key() + "\"");
  }
  if (problems.empty()) {
    for (const auto& p : validate_model_config(c)) problems.push_back(origin + ": " + p);
  }
  if (!problems.empty()) throw fail_now();
  return out;
}

namespace {

// parse_json_text, plus the other nlohmann errors it lets through (e.g. out_of_range for 1e999).
json parse_config_text(const std::string& text, const std::string& origin) {
  try {
    return parse_json_text(text, origin);
  } catch (const json::exception& e) {
    throw ConfigError(origin + ": malformed JSON: " + e.what());
  }
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("cannot open " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

}  // namespace

HfConfigImport hf_config_from_text(const std::string& text, const std::string& origin,
                                   const HfImportOptions& options) {
  return hf_config_from_json(parse_config_text(text, origin), origin, options);
}

HfConfigImport load_hf_config(const std::string& dir, const HfImportOptions& options) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw ConfigError(dir + ": not a Hugging Face model folder (not a directory)");
  const std::string path = dir + "/config.json";
  if (!fs::exists(path, ec)) throw ConfigError(dir + ": no config.json in this folder");
  HfConfigImport out = hf_config_from_text(read_text_file(path), path, options);
  out.config.tokenizer_name = dir;
  const std::string generation = dir + "/generation_config.json";
  if (fs::exists(generation, ec)) {
    const json g = parse_config_text(read_text_file(generation), generation);
    std::vector<std::string> problems;
    if (!g.is_object()) problems.push_back(generation + ": expected a JSON object");
    if (nested_deeper_than(g, kMaxDepth)) {
      throw ConfigError(generation + ": nested more than " + std::to_string(kMaxDepth) + " levels deep");
    }
    if (g.is_object()) {
      read_token(g, "bos_token_id", generation, &out.tokens.bos, &problems);
      read_eos(g, generation, &out.tokens.eos, &problems);
      read_token(g, "pad_token_id", generation, &out.tokens.pad, &problems);
    }
    if (!problems.empty()) {
      std::string all;
      for (const auto& p : problems) all += (all.empty() ? "" : "\n") + p;
      throw ConfigError(all);
    }
  }
  return out;
}

std::string hf_architecture_for(const ModelConfig& c) {
  std::vector<std::string> problems;
  if (c.norm_type != "rmsnorm") problems.push_back("norm_type \"" + c.norm_type + "\" (needs rmsnorm)");
  if (c.activation != "swiglu") problems.push_back("activation \"" + c.activation + "\" (needs swiglu)");
  if (!c.uses_rope()) {
    problems.push_back("positional_encoding \"" + c.positional_encoding + "\" (needs rope or yarn)");
  }
  if (c.qk_norm && c.attention_bias) {
    problems.push_back("qk_norm with attention_bias (Qwen3's attention_bias would also add an o_proj bias)");
  }
  if (!problems.empty()) {
    throw ConfigError("cannot export as a Hugging Face Llama/Qwen2/Qwen3/Mistral model: " + join(problems));
  }
  if (c.qk_norm) return "Qwen3ForCausalLM";
  if (c.attention_bias) return "Qwen2ForCausalLM";
  if (c.sliding_window > 0) return "MistralForCausalLM";
  return "LlamaForCausalLM";
}

json hf_config_to_json(const ModelConfig& c, const HfSpecialTokens& tokens, const std::string& torch_dtype) {
  const std::string arch = hf_architecture_for(c);
  const ArchSpec* spec = find_arch(arch);
  json j;
  j["architectures"] = {arch};
  j["model_type"] = spec->model_type;
  j["hidden_size"] = c.d_model;
  j["intermediate_size"] = c.d_ff;
  j["num_hidden_layers"] = c.n_layers;
  j["num_attention_heads"] = c.n_heads;
  j["num_key_value_heads"] = c.n_kv_heads;
  j["head_dim"] = c.resolved_head_dim();
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = c.norm_eps;
  j["max_position_embeddings"] = c.max_seq_len;
  j["vocab_size"] = c.vocab_size;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["attention_dropout"] = 0.0;
  j["initializer_range"] = 0.02;
  j["use_cache"] = true;
  j["torch_dtype"] = torch_dtype;
  if (spec->attention_bias) j["attention_bias"] = false;
  if (arch == "LlamaForCausalLM") j["mlp_bias"] = false;
  if (spec->qwen_window) {
    j["use_sliding_window"] = c.sliding_window > 0;
    j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
    j["max_window_layers"] = c.sliding_window > 0 ? 0 : c.n_layers;
    j["layer_types"] =
        std::vector<std::string>(c.n_layers, c.sliding_window > 0 ? "sliding_attention" : "full_attention");
  } else if (arch == "MistralForCausalLM") {
    j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
  }

  // RoPE, in both spellings: rope_theta + rope_scaling (transformers v4; v5 reads rope_scaling first)
  // and rope_parameters (v5).
  json scaling = nullptr;
  const int original = c.rope_original_max_seq_len > 0 ? c.rope_original_max_seq_len : c.max_seq_len;
  if (c.positional_encoding == "yarn") {
    scaling = {{"rope_type", "yarn"},
               {"factor", c.rope_scaling_factor},
               {"original_max_position_embeddings", original},
               {"beta_fast", c.yarn_beta_fast},
               {"beta_slow", c.yarn_beta_slow}};
    if (c.yarn_attention_factor != 0.0) scaling["attention_factor"] = c.yarn_attention_factor;
  } else if (c.rope_scaling == "linear") {
    scaling = {{"rope_type", "linear"}, {"factor", c.rope_scaling_factor}};
  } else if (c.rope_scaling == "llama3") {
    scaling = {{"rope_type", "llama3"},
               {"factor", c.rope_scaling_factor},
               {"low_freq_factor", c.llama3_low_freq_factor},
               {"high_freq_factor", c.llama3_high_freq_factor},
               {"original_max_position_embeddings", original}};
  }
  j["rope_theta"] = c.rope_theta;
  j["rope_scaling"] = scaling;
  json parameters = scaling.is_null() ? json{{"rope_type", "default"}} : scaling;
  parameters["rope_theta"] = c.rope_theta;
  j["rope_parameters"] = parameters;

  j["bos_token_id"] = tokens.bos >= 0 ? json(tokens.bos) : json(nullptr);
  if (tokens.eos.empty()) {
    j["eos_token_id"] = nullptr;
  } else if (tokens.eos.size() == 1) {
    j["eos_token_id"] = tokens.eos[0];
  } else {
    j["eos_token_id"] = tokens.eos;
  }
  j["pad_token_id"] = tokens.pad >= 0 ? json(tokens.pad) : json(nullptr);
  return j;
}

json hf_generation_config_to_json(const HfSpecialTokens& tokens) {
  json g = json::object();
  if (tokens.bos >= 0) g["bos_token_id"] = tokens.bos;
  if (tokens.eos.size() == 1) g["eos_token_id"] = tokens.eos[0];
  if (tokens.eos.size() > 1) g["eos_token_id"] = tokens.eos;
  if (tokens.pad >= 0) g["pad_token_id"] = tokens.pad;
  return g;
}

}  // namespace llm
