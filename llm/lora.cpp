#include "llm/lora.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "kernels/cpu/lora.h"
#include "kernels/cpu/nf4.h"
#include "llm/model_layout.h"

namespace llm {

namespace {

// Short name -> index into layer::Tensor.
int module_tensor(const std::string& name) {
  static const std::vector<std::pair<std::string, int>> kModules = {
      {"q_proj", layer::kQ},       {"k_proj", layer::kK},   {"v_proj", layer::kV},      {"o_proj", layer::kO},
      {"gate_proj", layer::kGate}, {"up_proj", layer::kUp}, {"down_proj", layer::kDown}};
  for (const auto& [module, tensor] : kModules) {
    if (module == name) return tensor;
  }
  return -1;
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

float LoraSettings::scale() const {
  return static_cast<float>(rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / r);
}

const std::vector<std::string>& lora_module_names() {
  static const std::vector<std::string> kNames = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"};
  return kNames;
}

std::vector<std::string> lora_preset_modules(const std::string& preset,
                                             const std::vector<std::string>& custom) {
  if (preset == "minimal") return {"q_proj", "v_proj"};
  if (preset == "attention_only") return {"q_proj", "k_proj", "v_proj", "o_proj"};
  if (preset == "ffn_only") return {"gate_proj", "up_proj", "down_proj"};
  if (preset == "all") return lora_module_names();
  if (preset == "custom") {
    if (custom.empty()) {
      throw ConfigError(
          "lora_preset \"custom\" needs lora_target_modules, \"all-linear\" or a list of module names "
          "from: " +
          joined(lora_module_names()));
    }
    std::vector<std::string> out;
    for (const auto& m : custom) {
      if (m == "all-linear") {  // PEFT's name for every linear layer but the LM head
        for (const auto& name : lora_module_names())
          if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
        continue;
      }
      if (module_tensor(m) < 0) {
        throw ConfigError("lora_target_modules: unknown module \"" + m +
                          "\"; expected \"all-linear\" or one of " + joined(lora_module_names()));
      }
      if (std::find(out.begin(), out.end(), m) == out.end()) out.push_back(m);
    }
    return out;
  }
  throw ConfigError("lora_preset: expected minimal, attention_only, ffn_only, all or custom, found \"" +
                    preset + "\"");
}

void validate_lora_settings(const LoraSettings& s) {
  if (s.r < 1) throw ConfigError("lora_r: expected an integer >= 1, found " + std::to_string(s.r));
  if (!(s.alpha > 0.0))
    throw ConfigError("lora_alpha: expected a number > 0, found " + std::to_string(s.alpha));
  if (!(s.dropout >= 0.0 && s.dropout < 1.0)) {
    throw ConfigError("lora_dropout: expected a number in [0, 1), found " + std::to_string(s.dropout));
  }
  lora_preset_modules(s.preset, s.target_modules);
}

std::vector<LoraModule> lora_modules(const ModelConfig& config, const LoraSettings& settings) {
  std::vector<LoraModule> modules;
  if (!settings.enabled) return modules;
  const std::vector<std::string> targets = lora_preset_modules(settings.preset, settings.target_modules);
  const int C = config.d_model, F = config.d_ff;
  const int Q = config.n_heads * config.resolved_head_dim(),
            K = config.n_kv_heads * config.resolved_head_dim();
  for (int l = 0; l < config.n_layers; ++l) {
    for (const auto& name : lora_module_names()) {
      if (std::find(targets.begin(), targets.end(), name) == targets.end()) continue;
      const int tensor = module_tensor(name);
      if (tensor == layer::kGate && !config.gated_mlp()) continue;
      LoraModule m;
      m.prefix = layer_tensor_name(l, layer::tensor_suffix(tensor));
      m.layer = l;
      m.tensor = tensor;
      switch (tensor) {
        case layer::kQ:
          m.in_features = C, m.out_features = Q;
          break;
        case layer::kK:
        case layer::kV:
          m.in_features = C, m.out_features = K;
          break;
        case layer::kO:
          m.in_features = Q, m.out_features = C;
          break;
        case layer::kGate:
        case layer::kUp:
          m.in_features = C, m.out_features = F;
          break;
        default:  // kDown
          m.in_features = F, m.out_features = C;
          break;
      }
      modules.push_back(m);
    }
  }
  return modules;
}

std::vector<float> initial_lora_adapters(const ModelConfig& config, const LoraSettings& settings,
                                         const ParameterLayout& layout) {
  std::vector<float> out(layout.trainable_elements());
  const std::vector<LoraModule> modules = lora_modules(config, settings);
  for (size_t i = 0; i < modules.size(); ++i) {
    const LoraModule& m = modules[i];
    const TensorInfo& a = layout.at(m.a_name());
    const TensorInfo& b = layout.at(m.b_name());
    if (!a.trainable || !b.trainable)
      throw std::invalid_argument(m.prefix + ": its adapter is not trainable");
    ref::lora_init(out.data() + a.grad_offset, out.data() + b.grad_offset, m.in_features, m.out_features,
                   settings.r, settings.init_seed, layer::lora_init_stream(i));
  }
  return out;
}

void add_lora_tensors(ParameterLayout& layout, const std::vector<LoraModule>& modules, int r) {
  std::vector<std::string> base;
  for (const auto& t : layout.tensors()) base.push_back(t.name);
  for (const auto& m : modules) {
    layout.append(m.a_name(), {r, m.in_features}, TensorRole::kLora);
    layout.append(m.b_name(), {m.out_features, r}, TensorRole::kLora);
  }
  for (const auto& name : base) layout.set_trainable(name, false);
}

std::vector<std::string> nf4_quantized_tensors(const ModelConfig& config) {
  std::vector<std::string> names;
  const ParameterLayout layout(config);
  for (const auto& t : layout.tensors()) {
    if (t.role == TensorRole::kMatrix && t.name.rfind("model.layers.", 0) == 0) names.push_back(t.name);
  }
  return names;
}

Nf4Weights nf4_quantize_weights(const float* w, size_t n, const QuantSettings& quant) {
  const int bs = quant.blocksize;
  if (bs < 1) throw std::invalid_argument("NF4 blocksize must be positive, found " + std::to_string(bs));
  Nf4Weights q;
  q.packed.resize((n + 1) / 2);
  q.absmax.resize(ref::blocks_for(n, bs));
  const size_t blocks = q.absmax.size();
  // Blocks are independent, and with an even blocksize every run of whole blocks starts on a byte of
  // codes, so quantising runs of blocks separately (in parallel) writes exactly what one call over the
  // whole array writes (only the last run can end in a partial block or a pad nibble, as the whole does).
  const size_t per_run = std::max<size_t>(1, (size_t{1} << 16) / static_cast<size_t>(bs));
  if (bs % 2 == 0 && blocks > per_run) {
    const long long runs = static_cast<long long>((blocks + per_run - 1) / per_run);
#pragma omp parallel for schedule(static)
    for (long long r = 0; r < runs; ++r) {
      const size_t b0 = static_cast<size_t>(r) * per_run, b1 = std::min(blocks, b0 + per_run);
      const size_t j0 = b0 * static_cast<size_t>(bs), j1 = std::min(n, b1 * static_cast<size_t>(bs));
      ref::nf4_quantize(q.packed.data() + j0 / 2, q.absmax.data() + b0, w + j0, j1 - j0, bs);
    }
  } else {
    ref::nf4_quantize(q.packed.data(), q.absmax.data(), w, n, bs);
  }
  if (quant.double_quant) {
    q.qabsmax.resize(blocks);
    q.state2.resize(ref::blocks_for(blocks, ref::kNf4NestedBlockSize));
    ref::nf4_double_quantize(q.qabsmax.data(), q.state2.data(), &q.offset, q.absmax.data(), blocks);
    ref::nf4_double_dequantize(q.absmax.data(), q.qabsmax.data(), q.state2.data(), q.offset, blocks);
  }
  return q;
}

void nf4_dequantize_weights(float* out, const Nf4Weights& q, size_t n, const QuantSettings& quant) {
  ref::nf4_dequantize(out, q.packed.data(), q.absmax.data(), n, quant.blocksize);
}

}  // namespace llm
