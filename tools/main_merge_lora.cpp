// ./merge_lora: folds a PEFT LoRA adapter into its base model and writes the merged model.
//
//   ./merge_lora --base DIR --adapter DIR --out DIR [--dtype f32|bf16|f16] [--max-shard-size 5GB]
//                [--nf4] [--no-double-quant] [--gguf-out FILE [--gguf-type f16] [--gguf-arch ...]]
//
// The base is a Hugging Face folder (config.json and safetensors weights); the adapter is a PEFT folder
// (adapter_config.json and adapter_model.safetensors, llm/lora_adapter.h), ours or PEFT's. Each adapted
// weight becomes W + s B A. The output is an ordinary Hugging Face folder (config.json, weights,
// generation_config.json and the tokenizer files copied from the base), and optionally a GGUF file.
//
// --nf4: the adapter was trained with QLoRA, against the NF4-dequantised base weights rather than the
// original ones, so those weights are first replaced by their NF4 round trip (blocks of 64, the absmax
// values double-quantised unless --no-double-quant, as bitsandbytes' bnb_4bit_use_double_quant) and the
// adapter is merged into that.
//
// Exit status: 0 on success, 1 when an input is refused or a file cannot be written, 2 for a usage error.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "llm/config.h"
#include "llm/gguf.h"
#include "llm/gguf_tokenizer.h"
#include "llm/hf_config.h"
#include "llm/hf_model.h"
#include "llm/lora_adapter.h"
#include "llm/params.h"
#include "llm/safetensors.h"

namespace {

void usage(FILE* out) {
  std::fprintf(
      out,
      "usage: ./merge_lora --base DIR --adapter DIR --out DIR [options]\n"
      "  --base DIR           the base model, a Hugging Face folder\n"
      "  --adapter DIR        the LoRA adapter, a PEFT folder (adapter_config.json,\n"
      "                       adapter_model.safetensors)\n"
      "  --out DIR            where the merged Hugging Face folder is written\n"
      "options:\n"
      "  --dtype f32|bf16|f16 weights dtype of the output (default: the base folder's, else f32)\n"
      "  --max-shard-size S   split larger outputs into shards (B, KB, MB, GB; default 5GB)\n"
      "  --nf4                the adapter was trained with QLoRA: merge into the NF4 round trip of the\n"
      "                       base's decoder-layer linear weights\n"
      "  --no-double-quant    with --nf4: the absmax values were not double-quantised\n"
      "  --gguf-out FILE      also write the merged model as GGUF (tokenizer from the base folder)\n"
      "  --gguf-type T        GGUF weight type: f32, f16 (default), bf16, q8_0\n"
      "  --gguf-arch A        GGUF architecture: llama, qwen2, qwen3 (default: from the config)\n");
}

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  usage(stderr);
  std::exit(2);
}

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  std::exit(1);
}

uint64_t parse_size(const std::string& text) {
  try {
    return llm::parse_shard_size(text);
  } catch (const std::invalid_argument& e) {
    usage_error(e.what());
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string base, adapter_dir, out, dtype_name, gguf_out, gguf_type = "f16", gguf_arch;
  uint64_t max_shard = 5'000'000'000ull;
  llm::QuantSettings quant;
  bool no_double_quant = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--base") {
      base = value();
    } else if (arg == "--adapter") {
      adapter_dir = value();
    } else if (arg == "--out") {
      out = value();
    } else if (arg == "--dtype") {
      dtype_name = value();
    } else if (arg == "--max-shard-size") {
      max_shard = parse_size(value());
    } else if (arg == "--nf4") {
      quant.nf4 = true;
    } else if (arg == "--no-double-quant") {
      no_double_quant = true;
    } else if (arg == "--gguf-out") {
      gguf_out = value();
    } else if (arg == "--gguf-type") {
      gguf_type = value();
    } else if (arg == "--gguf-arch") {
      gguf_arch = value();
    } else if (arg == "-h" || arg == "--help") {
      usage(stdout);
      return 0;
    } else {
      usage_error("unknown argument \"" + arg + "\"");
    }
  }
  if (base.empty()) usage_error("--base DIR is required");
  if (adapter_dir.empty()) usage_error("--adapter DIR is required");
  if (out.empty()) usage_error("--out DIR is required");
  if (no_double_quant && !quant.nf4) usage_error("--no-double-quant applies with --nf4 only");
  quant.double_quant = !no_double_quant;

  llm::HfExportOptions options;
  llm::GgufType gguf_type_value = llm::GgufType::kF16;
  try {
    if (!dtype_name.empty()) options.dtype = llm::parse_export_dtype(dtype_name);
    if (!gguf_out.empty()) gguf_type_value = llm::parse_gguf_type(gguf_type);
  } catch (const std::exception& e) {
    usage_error(e.what());
  }
  if (!gguf_arch.empty() && gguf_arch != "llama" && gguf_arch != "qwen2" && gguf_arch != "qwen3") {
    usage_error("--gguf-arch: expected llama, qwen2 or qwen3, found \"" + gguf_arch + "\"");
  }

  try {
    std::printf("reading base model %s\n", base.c_str());
    const llm::HfConfigImport imported = llm::load_hf_config(base);
    const llm::ModelConfig& config = imported.config;
    for (const auto& n : imported.notes) std::printf("  note: %s\n", n.c_str());
    // Everything is read and checked before anything is written.
    llm::GgufTokenizer tokenizer;
    if (!gguf_out.empty()) {
      if (gguf_arch.empty()) gguf_arch = llm::default_gguf_arch(config);
      tokenizer = llm::gguf_tokenizer_from_folder(base, imported.tokens, gguf_arch);
    }
    std::vector<std::string> notes;
    std::vector<float> params = llm::load_hf_parameters(base, config, &notes);
    for (const auto& n : notes) std::printf("  note: %s\n", n.c_str());
    std::printf("  %s: d_model %d, %d layers, %zu values\n", imported.architecture.c_str(), config.d_model,
                config.n_layers, params.size());

    std::printf("reading adapter %s\n", adapter_dir.c_str());
    const llm::PeftAdapter adapter = llm::load_peft_adapter(adapter_dir, config);
    std::string targets;
    for (const auto& t : adapter.settings.target_modules) targets += (targets.empty() ? "" : ", ") + t;
    std::printf("  r %d, alpha %g%s, scale %g, %zu adapted layers (%s)\n", adapter.settings.r,
                adapter.settings.alpha, adapter.settings.rslora ? " (rsLoRA)" : "", adapter.scale(),
                adapter.modules.size(), targets.c_str());
    if (!adapter.base_model_name_or_path.empty()) {
      std::printf("  trained on %s\n", adapter.base_model_name_or_path.c_str());
    }

    if (quant.nf4) {
      std::printf("rounding the base's decoder-layer linear weights through NF4 (%s)\n",
                  quant.double_quant ? "double quantisation" : "fp32 absmax");
      llm::nf4_round_trip_base(config, quant, params);
    }
    llm::merge_lora_into(config, adapter, params);

    if (dtype_name.empty() && (imported.torch_dtype == "bfloat16" || imported.torch_dtype == "float16")) {
      options.dtype = llm::parse_export_dtype(imported.torch_dtype);
    }
    options.max_shard_bytes = max_shard;
    options.tokens = imported.tokens;
    options.source_dir = base;
    const llm::ParameterLayout layout(config);
    std::printf("writing merged model %s (%s weights)\n", out.c_str(), llm::safe_dtype_name(options.dtype));
    const auto files = llm::save_hf_folder(out, config, layout, params.data(), options);
    for (const auto& f : files) std::printf("  wrote %s/%s\n", out.c_str(), f.c_str());

    if (!gguf_out.empty()) {
      std::printf("writing GGUF %s (arch %s, %s weights)\n", gguf_out.c_str(), gguf_arch.c_str(),
                  llm::gguf_type_name(gguf_type_value).c_str());
      llm::write_gguf(gguf_out, config, layout, params.data(), tokenizer, gguf_type_value, gguf_arch);
    }
  } catch (const std::exception& e) {
    fail(e.what());
  }
  std::printf("done\n");
  return 0;
}
