// LoRA adapters and NF4 base quantisation as model options: which linear layers get an adapter, the
// adapter tensors' names and shapes, and which base matrices QLoRA stores in NF4.
//
// Naming. An adapter on the linear layer P (for example P = "model.layers.3.self_attn.q_proj", whose
// weight is P.weight [out, in]) is two tensors in the parameter layout, appended after every base tensor
// so that the base tensors keep the offsets of a plain ParameterLayout(config):
//   P.lora_A.weight  [r, in]     role kLora
//   P.lora_B.weight  [out, r]    role kLora
// PEFT saves the same tensors as "base_model.model." + P + ".lora_A.weight" (see llm/lora_adapter.h).
// The layer computes y = x W^T + b + s * dropout(x) A^T B^T with s = alpha / r, or alpha / sqrt(r) with
// rsLoRA (kernels/cpu/lora.h).
//
// Presets (LLM-Lab's lora_preset): minimal = q_proj, v_proj; attention_only = q, k, v, o_proj;
// ffn_only = gate, up, down_proj; all = the seven; custom = lora_target_modules. A module the model does
// not have (gate_proj in a non-gated MLP) is skipped; a name no model has is an error.
//
// NF4 (QLoRA): every linear weight inside the decoder layers (q, k, v, o, gate, up, down) is stored as
// NF4 (kernels/cpu/nf4.h), as bitsandbytes' Linear4bit replaces every nn.Linear but the LM head; the
// embedding, the norms, the biases and the LM head stay in full precision.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "llm/config.h"
#include "llm/params.h"

namespace llm {

struct LoraSettings {
  bool enabled = false;
  std::string preset = "minimal";           // minimal | attention_only | ffn_only | all | custom
  std::vector<std::string> target_modules;  // custom only: short names such as "q_proj", or "all-linear"
  int r = 8;
  double alpha = 16.0;
  double dropout = 0.05;
  bool rslora = false;
  uint64_t init_seed = 0;  // Philox seed of the A matrices

  float scale() const;
};

struct QuantSettings {
  bool nf4 = false;          // load_in_4bit / quantization: "nf4"
  bool double_quant = true;  // bnb_4bit_use_double_quant
  int blocksize = 64;
};

// The seven module short names in model order.
const std::vector<std::string>& lora_module_names();
// The short names a preset selects (custom: `custom`, checked). Throws ConfigError for an unknown preset,
// an empty custom list or an unknown module name.
std::vector<std::string> lora_preset_modules(const std::string& preset,
                                             const std::vector<std::string>& custom);
// Throws ConfigError naming the key for r < 1, alpha <= 0, dropout outside [0, 1), a bad preset.
void validate_lora_settings(const LoraSettings& settings);

struct LoraModule {
  std::string prefix;  // "model.layers.3.self_attn.q_proj"
  int layer = 0;
  int tensor = 0;  // index into layer::Tensor (llm/model_layout.h)
  int in_features = 0, out_features = 0;
  std::string a_name() const { return prefix + ".lora_A.weight"; }
  std::string b_name() const { return prefix + ".lora_B.weight"; }
};
// The adapted linear layers of `config` under `settings`, layer by layer in model order.
std::vector<LoraModule> lora_modules(const ModelConfig& config, const LoraSettings& settings);
// Appends every module's A and B to the layout and freezes every other tensor.
void add_lora_tensors(ParameterLayout& layout, const std::vector<LoraModule>& modules, int r);
// The fresh adapters Model::init_lora writes (Kaiming-uniform A, zero B: ref::lora_init with
// settings.init_seed, module i on stream i), each tensor at its grad_offset in `layout` (a LoRA layout,
// add_lora_tensors): layout.trainable_elements() values, without a whole parameter arena.
std::vector<float> initial_lora_adapters(const ModelConfig& config, const LoraSettings& settings,
                                         const ParameterLayout& layout);

// The names of the base weights NF4 stores (every decoder-layer linear weight), in layout order.
std::vector<std::string> nf4_quantized_tensors(const ModelConfig& config);

// One weight in NF4 (kernels/cpu/nf4.h).
struct Nf4Weights {
  std::vector<uint8_t> packed;   // (n + 1) / 2 bytes, two codes per byte, high nibble first
  std::vector<float> absmax;     // one per block; double-dequantised when double quantised (what the layer
                                 // computes with)
  std::vector<uint8_t> qabsmax;  // double quantisation: the 8-bit absmax codes ...
  std::vector<float> state2;     // ... their fp32 scales, one per 256 blocks ...
  float offset = 0.0f;           // ... and the mean that was subtracted
};
// Quantises n weights with the CPU reference: what every backend stores for a QLoRA base weight.
// Throws std::invalid_argument for a blocksize < 1.
Nf4Weights nf4_quantize_weights(const float* w, size_t n, const QuantSettings& quant);
// out[0..n) = the weights the layer computes with: code * absmax of the block, in fp32.
void nf4_dequantize_weights(float* out, const Nf4Weights& q, size_t n, const QuantSettings& quant);

}  // namespace llm
