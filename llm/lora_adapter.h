// LoRA adapters in PEFT's folder format, and merging an adapter into its base model.
//
// A PEFT adapter folder (what peft's save_pretrained writes, and what PEFT's from_pretrained and vLLM
// load) holds two files:
//   adapter_config.json        the LoraConfig: peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha,
//                              lora_dropout, target_modules (module short names), use_rslora, bias,
//                              fan_in_fan_out, use_dora, rank_pattern, alpha_pattern, ...
//   adapter_model.safetensors  for every adapted linear layer P of the transformers model:
//                                base_model.model.P.lora_A.weight  [r, in]
//                                base_model.model.P.lora_B.weight  [out, r]
//                              (the adapter name, "default", is not part of the saved names).
// Inside this project the same tensors are called P.lora_A.weight / P.lora_B.weight (llm/lora.h), so
// the file name is "base_model.model." + the internal name. The adapted layer computes
//   y = x W^T + b + s (x A^T) B^T,   s = lora_alpha / r,  or lora_alpha / sqrt(r) with use_rslora,
// and merging folds the adapter into the base weight: W' = W + s B A (kernels/cpu/lora.h).
//
// Loading is strict, since adapters come from elsewhere: every problem throws AdapterError naming the
// file and the key or tensor. Refused with a "not supported" message: another peft_type, a task_type
// other than CAUSAL_LM, fan_in_fan_out, DoRA, rank_pattern / alpha_pattern entries, bias other than
// "none", modules_to_save, layer_replication, lora_bias, and adapters on modules other than the seven
// decoder-layer linears (q, k, v, o, gate, up, down_proj; e.g. lm_head or embed_tokens). Also refused:
// tensor names that do not map onto this model, wrong shapes, an A without its B (or the reverse), and
// target_modules that disagree with the tensors present. layers_to_transform is accepted: the tensors
// say which layers are adapted, and merging follows them.
//
// QLoRA: an adapter trained on an NF4 base learned a correction to the dequantised base weights, so the
// merge must start from those (nf4_round_trip_base) rather than from the original full-precision ones.
#pragma once

#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "llm/config.h"
#include "llm/json_config.h"
#include "llm/lora.h"
#include "llm/params.h"
#include "llm/safetensors.h"

namespace llm {

class AdapterError : public std::runtime_error {
 public:
  explicit AdapterError(const std::string& message) : std::runtime_error(message) {}
};

// File names inside an adapter folder, and the prefix PEFT puts before the model's tensor names.
inline constexpr const char* kPeftConfigFile = "adapter_config.json";
inline constexpr const char* kPeftWeightsFile = "adapter_model.safetensors";
inline constexpr const char* kPeftPrefix = "base_model.model.";

// "model.layers.0.self_attn.q_proj.lora_A.weight" -> "base_model.model.model.layers.0...".
std::string peft_tensor_name(const std::string& internal_name);

// A loaded adapter.
struct PeftAdapter {
  // enabled, preset "custom", target_modules = the short names that have tensors (model order), r,
  // alpha, dropout (lora_dropout), rslora (use_rslora). When every layer is adapted (no
  // layers_to_transform), lora_modules(config, settings) equals `modules`.
  LoraSettings settings;
  std::string base_model_name_or_path;  // as the file gives it ("" when null or absent)
  std::vector<LoraModule> modules;      // the adapted linear layers, in model order
  // Internal name (P.lora_A.weight / P.lora_B.weight) -> values, row-major [r, in] / [out, r], fp32.
  std::map<std::string, std::vector<float>> tensors;

  float scale() const { return settings.scale(); }
};

// adapter_config.json for `settings` on `config`: PEFT's LoraConfig keys with inference_mode true.
json peft_adapter_config(const ModelConfig& config, const LoraSettings& settings,
                         const std::string& base_model_name_or_path);

// Writes DIR/adapter_config.json and DIR/adapter_model.safetensors (creating DIR), each to a temporary
// file that is then renamed. `layout` and `params` are a LoRA layout (add_lora_tensors) and its arena,
// e.g. a LoRA model's; the adapter tensors of lora_modules(config, settings) are written in `dtype`
// (F32, F16 or BF16) under PEFT's names. Throws AdapterError (bad settings, a tensor missing from the
// layout or misshapen) or SafetensorsError (file system).
template <typename T>
void save_peft_adapter(const std::string& dir, const ModelConfig& config, const LoraSettings& settings,
                       const ParameterLayout& layout, const T* params,
                       const std::string& base_model_name_or_path, SafeDType dtype = SafeDType::kF32);
// The same from the trainable tensors alone, each at its grad_offset (TrainBackend::
// read_trainable_parameters): no copy of the frozen base is needed.
void save_peft_adapter_from_trainable(const std::string& dir, const ModelConfig& config,
                                      const LoraSettings& settings, const ParameterLayout& layout,
                                      const std::vector<float>& trainable,
                                      const std::string& base_model_name_or_path,
                                      SafeDType dtype = SafeDType::kF32);

// Reads and checks an adapter folder against `config`. Throws AdapterError.
PeftAdapter load_peft_adapter(const std::string& dir, const ModelConfig& config);

// W += s B A for every adapted module, in place on `base_params`, the fp32 arena of ParameterLayout(config)
// (or any longer arena that starts with it, such as a LoRA model's). Throws AdapterError when an
// adapter tensor or the arena does not have the size the config gives it.
void merge_lora_into(const ModelConfig& config, const PeftAdapter& adapter, float* base_params, size_t count);
inline void merge_lora_into(const ModelConfig& config, const PeftAdapter& adapter,
                            std::vector<float>& base_params) {
  merge_lora_into(config, adapter, base_params.data(), base_params.size());
}

// Copies the adapter's tensors into a LoRA layout's arena by name (to run the adapter unmerged). Every
// adapter tensor must be in the layout with its shape and every kLora tensor of the layout must be in
// the adapter; otherwise AdapterError names the first that is not.
template <typename T>
void copy_adapter_tensors(const PeftAdapter& adapter, const ParameterLayout& layout, T* params);

// QLoRA: replaces every weight of nf4_quantized_tensors(config) by its NF4 round trip (blockwise
// quantisation with quant.blocksize, the absmax values themselves double-quantised when
// quant.double_quant), exactly what Model::quantize_base_nf4 computes with, in place on the arena of
// ParameterLayout(config) (or a longer one starting with it).
void nf4_round_trip_base(const ModelConfig& config, const QuantSettings& quant, float* base_params,
                         size_t count);
inline void nf4_round_trip_base(const ModelConfig& config, const QuantSettings& quant,
                                std::vector<float>& base_params) {
  nf4_round_trip_base(config, quant, base_params.data(), base_params.size());
}

}  // namespace llm
