#include "llm/lora_adapter.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <memory>
#include <set>
#include <type_traits>

#include "data/atomic_file.h"
#include "kernels/cpu/lora.h"
#include "kernels/cpu/nf4.h"
#include "llm/strings.h"

namespace llm {

namespace {

// "model.layers.3.self_attn.q_proj" -> "q_proj".
std::string short_name(const std::string& prefix) {
  return prefix.substr(prefix.rfind('.') + 1);
}

// Every linear layer of `config` an adapter can sit on (all seven targets, every layer).
std::vector<LoraModule> all_modules(const ModelConfig& config) {
  LoraSettings all;
  all.enabled = true;
  all.preset = "all";
  return lora_modules(config, all);
}

std::vector<int64_t> a_shape(const LoraModule& m, int r) {
  return {r, m.in_features};
}
std::vector<int64_t> b_shape(const LoraModule& m, int r) {
  return {m.out_features, r};
}

// Short names of `modules`, each once, in model order.
std::vector<std::string> short_names(const std::vector<LoraModule>& modules) {
  std::vector<std::string> names;
  for (const std::string& n : lora_module_names()) {
    for (const auto& m : modules) {
      if (short_name(m.prefix) == n) {
        names.push_back(n);
        break;
      }
    }
  }
  return names;
}

// Reads adapter_config.json into `adapter` (settings and base model), refusing what we cannot apply.
void read_adapter_config(const std::string& path, PeftAdapter& adapter, std::vector<std::string>* listed,
                         bool* listed_is_list) {
  const json cfg = parse_json_file(path);  // ConfigError "PATH:LINE:COL: malformed JSON" on bad syntax
  if (!cfg.is_object()) throw AdapterError(path + ": expected a JSON object, found " + json_type_name(cfg));
  auto where = [&](const std::string& key) { return path + ": " + key; };
  auto present = [&](const std::string& key) { return cfg.contains(key) && !cfg[key].is_null(); };
  auto flag = [&](const std::string& key) {
    if (!present(key)) return false;
    if (!cfg[key].is_boolean())
      throw AdapterError(where(key) + ": expected true or false, found " + json_type_name(cfg[key]));
    return cfg[key].get<bool>();
  };
  auto nonempty = [&](const std::string& key) {
    if (!present(key)) return false;
    const json& v = cfg[key];
    return !((v.is_object() || v.is_array()) && v.empty());
  };

  if (!cfg.contains("peft_type")) throw AdapterError(where("peft_type") + ": missing (expected \"LORA\")");
  if (!cfg["peft_type"].is_string() || cfg["peft_type"].get<std::string>() != "LORA") {
    throw AdapterError(where("peft_type") + ": " + cfg["peft_type"].dump() +
                       " is not supported; only LoRA adapters (\"LORA\") can be loaded");
  }
  if (present("task_type")) {
    if (!cfg["task_type"].is_string() || cfg["task_type"].get<std::string>() != "CAUSAL_LM") {
      throw AdapterError(where("task_type") + ": " + cfg["task_type"].dump() +
                         " is not supported; expected \"CAUSAL_LM\" (an adapter of a ...ForCausalLM model)");
    }
  }

  // Options that change the computation and that we do not implement.
  if (flag("fan_in_fan_out")) {
    throw AdapterError(where("fan_in_fan_out") +
                       ": true is not supported (it is for GPT-2 style Conv1D weights; these models use "
                       "nn.Linear, [out, in])");
  }
  if (flag("use_dora")) throw AdapterError(where("use_dora") + ": DoRA adapters are not supported");
  if (flag("lora_bias")) throw AdapterError(where("lora_bias") + ": a bias on lora_B is not supported");
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    if (nonempty(key)) {
      throw AdapterError(where(key) + ": per-module ranks and alphas are not supported (found " +
                         cfg[key].dump() + "; expected {})");
    }
  }
  if (present("bias") && !(cfg["bias"].is_string() && cfg["bias"].get<std::string>() == "none")) {
    throw AdapterError(where("bias") + ": " + cfg["bias"].dump() +
                       " is not supported (trained base biases); expected \"none\"");
  }
  // Extras saved beside the adapter (modules_to_save, trainable_token_indices), other layer stacks
  // (layer_replication), adapters on raw parameters (target_parameters) and LoRA variants whose layer
  // computes something else than x W^T + s x A^T B^T: aLoRA, Arrow routing, QA-LoRA, KaSA, MonteCLoRA,
  // block-diagonal LoRA. (VeLoRA only changes the backward pass, the init configs only the start.)
  for (const char* key :
       {"modules_to_save", "trainable_token_indices", "layer_replication", "target_parameters",
        "alora_invocation_tokens", "arrow_config", "kasa_config", "monteclora_config", "use_bdlora"}) {
    if (nonempty(key)) {
      throw AdapterError(where(key) + ": " + cfg[key].dump() + " is not supported; expected null");
    }
  }
  if (flag("use_qalora")) throw AdapterError(where("use_qalora") + ": QA-LoRA adapters are not supported");
  // PiSSA, CorDA, OLoRA, LoftQ and LoRA-GA subtract their initial B A from the base weights, so such an
  // adapter only applies to that modified base. PEFT converts it to a plain LoRA (of rank 2r) when saved
  // with path_initial_model_for_weight_conversion, which also resets init_lora_weights to true.
  if (present("init_lora_weights") && cfg["init_lora_weights"].is_string()) {
    std::string init = cfg["init_lora_weights"].get<std::string>();
    std::transform(init.begin(), init.end(), init.begin(), [](unsigned char c) { return std::tolower(c); });
    for (const char* modifying : {"pissa", "corda", "olora", "loftq", "lora_ga"}) {
      if (init.rfind(modifying, 0) == 0) {
        throw AdapterError(
            where("init_lora_weights") + ": \"" + cfg["init_lora_weights"].get<std::string>() +
            "\" is not supported: that initialisation changes the base weights, so the adapter "
            "only applies to the modified base; save it converted to a plain LoRA (PEFT's "
            "path_initial_model_for_weight_conversion)");
      }
    }
  }

  LoraSettings& s = adapter.settings;
  s.enabled = true;
  s.preset = "custom";
  if (!cfg.contains("r")) throw AdapterError(where("r") + ": missing (the adapter rank)");
  if (!cfg["r"].is_number_integer() || cfg["r"].get<int64_t>() < 1 || cfg["r"].get<int64_t>() > (1 << 20)) {
    throw AdapterError(where("r") + ": expected an integer >= 1, found " + cfg["r"].dump());
  }
  s.r = static_cast<int>(cfg["r"].get<int64_t>());
  s.alpha = 8.0;  // LoraConfig's default
  if (present("lora_alpha")) {
    if (!cfg["lora_alpha"].is_number() || !(cfg["lora_alpha"].get<double>() > 0.0) ||
        !std::isfinite(cfg["lora_alpha"].get<double>())) {
      throw AdapterError(where("lora_alpha") + ": expected a number > 0, found " + cfg["lora_alpha"].dump());
    }
    s.alpha = cfg["lora_alpha"].get<double>();
  }
  s.dropout = 0.0;
  if (present("lora_dropout")) {
    if (!cfg["lora_dropout"].is_number() || !(cfg["lora_dropout"].get<double>() >= 0.0) ||
        !(cfg["lora_dropout"].get<double>() < 1.0)) {
      throw AdapterError(where("lora_dropout") + ": expected a number in [0, 1), found " +
                         cfg["lora_dropout"].dump());
    }
    s.dropout = cfg["lora_dropout"].get<double>();
  }
  s.rslora = flag("use_rslora");

  if (present("base_model_name_or_path")) {
    if (!cfg["base_model_name_or_path"].is_string()) {
      throw AdapterError(where("base_model_name_or_path") + ": expected a string, found " +
                         json_type_name(cfg["base_model_name_or_path"]));
    }
    adapter.base_model_name_or_path = cfg["base_model_name_or_path"].get<std::string>();
  }

  // target_modules: a list of module names (checked against the tensors later), or a string, which PEFT
  // takes as a regular expression over full module names (then only the tensors tell).
  *listed_is_list = false;
  if (present("target_modules")) {
    const json& t = cfg["target_modules"];
    if (t.is_array()) {
      *listed_is_list = true;
      const std::vector<std::string>& known = lora_module_names();
      for (const auto& e : t) {
        if (!e.is_string()) {
          throw AdapterError(where("target_modules") + ": expected module names, found " + e.dump());
        }
        const std::string name = e.get<std::string>();
        if (std::find(known.begin(), known.end(), name) == known.end()) {
          throw AdapterError(where("target_modules") + ": an adapter on \"" + name +
                             "\" is not supported; adapters can sit on q_proj, k_proj, v_proj, o_proj, "
                             "gate_proj, up_proj and down_proj");
        }
        listed->push_back(name);
      }
    } else if (!t.is_string()) {
      throw AdapterError(where("target_modules") + ": expected a list of module names or a string, found " +
                         json_type_name(t));
    }
  }
}

template <typename T>
const T* checked_tensor(const ParameterLayout& layout, const std::string& name,
                        const std::vector<int64_t>& shape, const T* params, bool at_grad_offsets = false) {
  if (!layout.contains(name)) throw AdapterError("the parameter layout has no tensor " + name);
  const TensorInfo& t = layout.at(name);
  if (t.shape != shape) {
    throw AdapterError("tensor " + name + " has shape " + shape_string(t.shape) + ", the adapter needs " +
                       shape_string(shape));
  }
  if (at_grad_offsets && !t.trainable) throw AdapterError("tensor " + name + " is not trainable");
  return params + (at_grad_offsets ? t.grad_offset : t.offset);
}

}  // namespace

std::string peft_tensor_name(const std::string& internal_name) {
  return kPeftPrefix + internal_name;
}

json peft_adapter_config(const ModelConfig& config, const LoraSettings& settings,
                         const std::string& base_model_name_or_path) {
  const std::vector<LoraModule> modules = lora_modules(config, settings);
  json j = json::object();
  // PEFT writes its LoraConfig fields in this spelling; loaders fill absent ones with defaults.
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] =
      base_model_name_or_path.empty() ? json(nullptr) : json(base_model_name_or_path);
  j["revision"] = nullptr;
  j["inference_mode"] = true;
  j["r"] = settings.r;
  if (settings.alpha == std::floor(settings.alpha) && std::fabs(settings.alpha) < 1e9) {
    j["lora_alpha"] = static_cast<int64_t>(settings.alpha);
  } else {
    j["lora_alpha"] = settings.alpha;
  }
  j["lora_dropout"] = settings.dropout;
  j["target_modules"] = short_names(modules);
  j["exclude_modules"] = nullptr;
  j["use_rslora"] = settings.rslora;
  j["use_dora"] = false;
  j["bias"] = "none";
  j["lora_bias"] = false;
  j["fan_in_fan_out"] = false;
  j["init_lora_weights"] = true;
  j["modules_to_save"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["layer_replication"] = nullptr;
  j["rank_pattern"] = json::object();
  j["alpha_pattern"] = json::object();
  j["megatron_config"] = nullptr;
  j["megatron_core"] = "megatron.core";
  j["loftq_config"] = json::object();
  j["auto_mapping"] = nullptr;
  return j;
}

namespace {

// save_peft_adapter, reading each adapter tensor at its offset, or (at_grad_offsets) its grad_offset.
template <typename T>
void save_adapter(const std::string& dir, const ModelConfig& config, const LoraSettings& settings,
                  const ParameterLayout& layout, const T* params, bool at_grad_offsets,
                  const std::string& base_model_name_or_path, SafeDType dtype) {
  if (!settings.enabled) throw AdapterError("save_peft_adapter: LoRA is not enabled in these settings");
  try {
    validate_lora_settings(settings);
  } catch (const ConfigError& e) {
    throw AdapterError(std::string("save_peft_adapter: ") + e.what());
  }
  const std::vector<LoraModule> modules = lora_modules(config, settings);
  if (modules.empty()) throw AdapterError("save_peft_adapter: the settings select no module of this model");

  std::vector<std::vector<float>> storage;
  storage.reserve(2 * modules.size());
  std::vector<SafetensorsWriteTensor> tensors;
  for (const LoraModule& m : modules) {
    for (int which = 0; which < 2; ++which) {
      const std::string name = which == 0 ? m.a_name() : m.b_name();
      const std::vector<int64_t> shape = which == 0 ? a_shape(m, settings.r) : b_shape(m, settings.r);
      const T* src = checked_tensor(layout, name, shape, params, at_grad_offsets);
      const float* data = nullptr;
      if constexpr (std::is_same_v<T, float>) {
        data = src;
      } else {
        storage.emplace_back(src, src + layout.at(name).numel);
        data = storage.back().data();
      }
      tensors.push_back({peft_tensor_name(name), shape, data});
    }
  }

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw AdapterError("cannot create folder " + dir + ": " + ec.message());
  // The weights first, the config last: a folder with a config always has its weights.
  write_safetensors(dir + "/" + kPeftWeightsFile, tensors, dtype);
  const std::string config_text =
      peft_adapter_config(config, settings, base_model_name_or_path).dump(2) + "\n";
  write_file_atomic<AdapterError>(dir + "/" + kPeftConfigFile, config_text);
}

}  // namespace

template <typename T>
void save_peft_adapter(const std::string& dir, const ModelConfig& config, const LoraSettings& settings,
                       const ParameterLayout& layout, const T* params,
                       const std::string& base_model_name_or_path, SafeDType dtype) {
  save_adapter(dir, config, settings, layout, params, false, base_model_name_or_path, dtype);
}

void save_peft_adapter_from_trainable(const std::string& dir, const ModelConfig& config,
                                      const LoraSettings& settings, const ParameterLayout& layout,
                                      const std::vector<float>& trainable,
                                      const std::string& base_model_name_or_path, SafeDType dtype) {
  if (trainable.size() != layout.trainable_elements()) {
    throw AdapterError("save_peft_adapter_from_trainable: " + std::to_string(trainable.size()) +
                       " values for " + std::to_string(layout.trainable_elements()) + " trainable ones");
  }
  save_adapter(dir, config, settings, layout, trainable.data(), true, base_model_name_or_path, dtype);
}

PeftAdapter load_peft_adapter(const std::string& dir, const ModelConfig& config) {
  namespace fs = std::filesystem;
  const std::string config_path = dir + "/" + kPeftConfigFile;
  const std::string weights_path = dir + "/" + kPeftWeightsFile;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw AdapterError(dir + ": no such adapter folder");
  if (!fs::is_regular_file(config_path, ec)) {
    throw AdapterError(config_path + ": missing (a PEFT adapter folder holds " + kPeftConfigFile + " and " +
                       kPeftWeightsFile + ")");
  }

  PeftAdapter adapter;
  std::vector<std::string> listed;
  bool listed_is_list = false;
  try {
    read_adapter_config(config_path, adapter, &listed, &listed_is_list);
  } catch (const ConfigError& e) {
    throw AdapterError(e.what());
  }
  const int r = adapter.settings.r;

  if (!fs::is_regular_file(weights_path, ec)) {
    if (fs::is_regular_file(dir + "/adapter_model.bin", ec)) {
      throw AdapterError(dir +
                         "/adapter_model.bin: PyTorch pickle adapters are not supported; save the "
                         "adapter with safe_serialization=True (" +
                         kPeftWeightsFile + ")");
    }
    throw AdapterError(weights_path + ": missing (the adapter's weights)");
  }
  std::unique_ptr<SafetensorsFile> file;
  try {
    file = std::make_unique<SafetensorsFile>(weights_path);
  } catch (const SafetensorsError& e) {
    throw AdapterError(e.what());
  }

  // Every tensor must be P.lora_A.weight or P.lora_B.weight of a linear layer P of this model.
  const std::vector<LoraModule> candidates = all_modules(config);
  std::map<std::string, size_t> by_prefix;
  for (size_t i = 0; i < candidates.size(); ++i) by_prefix[candidates[i].prefix] = i;
  const std::string prefix = kPeftPrefix;
  std::vector<int> have(candidates.size(), 0);  // bit 0: A, bit 1: B
  for (const SafetensorsTensor& t : file->tensors()) {
    const std::string where = weights_path + ": tensor " + t.name;
    const bool a = ends_with(t.name, ".lora_A.weight"), b = ends_with(t.name, ".lora_B.weight");
    const size_t suffix = std::string(".lora_A.weight").size();
    std::string module;
    if (t.name.compare(0, prefix.size(), prefix) == 0 && (a || b) && t.name.size() > prefix.size() + suffix) {
      module = t.name.substr(prefix.size(), t.name.size() - prefix.size() - suffix);
    }
    const auto it = by_prefix.find(module);
    if (it == by_prefix.end()) {
      throw AdapterError(where +
                         " does not map onto this model (expected base_model.model.model.layers.N.<module>."
                         "lora_A.weight or .lora_B.weight, with N < " +
                         std::to_string(config.n_layers) +
                         " and <module> one of self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj)");
    }
    const LoraModule& m = candidates[it->second];
    const std::vector<int64_t> want = a ? a_shape(m, r) : b_shape(m, r);
    if (t.shape != want) {
      throw AdapterError(where + " has shape " + shape_string(t.shape) + ", expected " + shape_string(want) +
                         " (r = " + std::to_string(r) + " from " + kPeftConfigFile + ", " +
                         std::to_string(m.in_features) + " in / " + std::to_string(m.out_features) +
                         " out features)");
    }
    const std::string internal = t.name.substr(prefix.size());
    std::vector<float>& values = adapter.tensors[internal];
    values.resize(static_cast<size_t>(t.numel));
    try {
      file->read(t.name, values.data(), values.size());
    } catch (const SafetensorsError& e) {
      throw AdapterError(e.what());
    }
    for (float v : values) {
      if (!std::isfinite(v)) throw AdapterError(where + " holds a NaN or infinite value");
    }
    have[it->second] |= a ? 1 : 2;
  }

  for (size_t i = 0; i < candidates.size(); ++i) {
    if (have[i] == 0) continue;
    const LoraModule& m = candidates[i];
    if (have[i] != 3) {
      const bool missing_b = have[i] == 1;
      throw AdapterError(weights_path + ": tensor " + peft_tensor_name(missing_b ? m.b_name() : m.a_name()) +
                         " is missing (its pair " + peft_tensor_name(missing_b ? m.a_name() : m.b_name()) +
                         " is present)");
    }
    adapter.modules.push_back(m);
  }
  if (adapter.modules.empty()) throw AdapterError(weights_path + ": holds no LoRA tensors");

  adapter.settings.target_modules = short_names(adapter.modules);
  if (listed_is_list) {
    for (const std::string& name : adapter.settings.target_modules) {
      if (std::find(listed.begin(), listed.end(), name) == listed.end()) {
        throw AdapterError(weights_path + ": has " + name + " adapters, but " + config_path +
                           " target_modules does not list " + name);
      }
    }
    for (const std::string& name : listed) {
      const auto& found = adapter.settings.target_modules;
      if (std::find(found.begin(), found.end(), name) == found.end()) {
        throw AdapterError(config_path + ": target_modules lists " + name + ", but " + weights_path +
                           " has no " + name + " tensors");
      }
    }
  }
  return adapter;
}

void merge_lora_into(const ModelConfig& config, const PeftAdapter& adapter, float* base_params,
                     size_t count) {
  const ParameterLayout layout(config);
  if (count < layout.total_elements()) {
    throw AdapterError("merge_lora_into: the parameter arena holds " + std::to_string(count) +
                       " values, the model needs " + std::to_string(layout.total_elements()));
  }
  const int r = adapter.settings.r;
  const float scale = adapter.scale();
  for (const LoraModule& m : adapter.modules) {
    const auto a = adapter.tensors.find(m.a_name());
    const auto b = adapter.tensors.find(m.b_name());
    if (a == adapter.tensors.end() || b == adapter.tensors.end()) {
      throw AdapterError("merge_lora_into: the adapter lacks " +
                         (a == adapter.tensors.end() ? m.a_name() : m.b_name()));
    }
    const std::string weight = m.prefix + ".weight";
    const TensorInfo& w = layout.at(weight);
    const size_t in = static_cast<size_t>(m.in_features), out = static_cast<size_t>(m.out_features);
    if (a->second.size() != static_cast<size_t>(r) * in || b->second.size() != out * r ||
        w.shape != std::vector<int64_t>{m.out_features, m.in_features}) {
      throw AdapterError("merge_lora_into: the adapter on " + m.prefix + " does not fit " + weight + " " +
                         shape_string(w.shape) + " with r = " + std::to_string(r));
    }
    float* W = base_params + w.offset;
    // lora_merge reads W[o, i] before writing the same element, so it may work in place.
    ref::lora_merge(W, W, a->second.data(), b->second.data(), m.in_features, m.out_features, r, scale);
  }
}

template <typename T>
void copy_adapter_tensors(const PeftAdapter& adapter, const ParameterLayout& layout, T* params) {
  const int r = adapter.settings.r;
  for (const LoraModule& m : adapter.modules) {
    for (int which = 0; which < 2; ++which) {
      const std::string name = which == 0 ? m.a_name() : m.b_name();
      const std::vector<int64_t> shape = which == 0 ? a_shape(m, r) : b_shape(m, r);
      const auto it = adapter.tensors.find(name);
      if (it == adapter.tensors.end()) throw AdapterError("copy_adapter_tensors: the adapter lacks " + name);
      T* dst = const_cast<T*>(checked_tensor(layout, name, shape, static_cast<const T*>(params)));
      if (it->second.size() != static_cast<size_t>(layout.at(name).numel)) {
        throw AdapterError("copy_adapter_tensors: " + name + " holds " + std::to_string(it->second.size()) +
                           " values, expected " + std::to_string(layout.at(name).numel));
      }
      std::copy(it->second.begin(), it->second.end(), dst);
    }
  }
  for (const TensorInfo& t : layout.tensors()) {
    if (t.role == TensorRole::kLora && adapter.tensors.count(t.name) == 0) {
      throw AdapterError("copy_adapter_tensors: the model has an adapter tensor " + t.name +
                         " that the loaded adapter lacks");
    }
  }
}

void nf4_round_trip_base(const ModelConfig& config, const QuantSettings& quant, float* base_params,
                         size_t count) {
  const ParameterLayout layout(config);
  if (count < layout.total_elements()) {
    throw AdapterError("nf4_round_trip_base: the parameter arena holds " + std::to_string(count) +
                       " values, the model needs " + std::to_string(layout.total_elements()));
  }
  if (quant.blocksize < 1) throw AdapterError("nf4_round_trip_base: blocksize must be positive");
  for (const std::string& name : nf4_quantized_tensors(config)) {
    const TensorInfo& t = layout.at(name);
    const size_t n = static_cast<size_t>(t.numel);
    float* w = base_params + t.offset;
    nf4_dequantize_weights(w, nf4_quantize_weights(w, n, quant), n, quant);
  }
}

template void save_peft_adapter<float>(const std::string&, const ModelConfig&, const LoraSettings&,
                                       const ParameterLayout&, const float*, const std::string&, SafeDType);
template void save_peft_adapter<double>(const std::string&, const ModelConfig&, const LoraSettings&,
                                        const ParameterLayout&, const double*, const std::string&, SafeDType);
template void copy_adapter_tensors<float>(const PeftAdapter&, const ParameterLayout&, float*);
template void copy_adapter_tensors<double>(const PeftAdapter&, const ParameterLayout&, double*);

}  // namespace llm
