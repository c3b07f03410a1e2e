// ./convert: moves model weights between Hugging Face folders and our checkpoints.
//
//   ./convert --hf-in DIR --hf-out DIR2 [--dtype f32|bf16|f16] [--max-shard-size 5GB]
//       HF folder -> HF folder (load, check, save: a round trip, or a dtype change / re-shard).
//   ./convert --hf-in DIR --ckpt-out FILE
//       HF folder -> our checkpoint (train/checkpoint.h): one "param" array per tensor, by name, and
//       meta.model = the imported ModelConfig. It holds weights only (no optimizer state, no step).
//   ./convert --ckpt-in FILE --hf-out DIR [--tokenizer-from DIR] [--dtype ...] [--max-shard-size ...]
//       our checkpoint -> HF folder (config.json, generation_config.json, safetensors, tokenizer files).
//   ./convert (--hf-in DIR | --ckpt-in FILE) --gguf-out FILE [--gguf-type f16] [--gguf-arch
//   llama|qwen2|qwen3]
//       a merged model -> GGUF for llama.cpp and Ollama, with the tokenizer from tokenizer.json.
//
// Inputs are checked before anything is written: the config is imported (or read from the checkpoint)
// and every tensor must match the parameter layout by name and shape. The steps are printed.
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
#include "llm/params.h"
#include "llm/safetensors.h"
#include "train/checkpoint.h"

namespace {

using llm::json;

void usage() {
  std::fprintf(
      stderr,
      "usage:\n"
      "  ./convert --hf-in DIR --hf-out DIR2 [--dtype f32|bf16|f16] [--max-shard-size 5GB]\n"
      "  ./convert --hf-in DIR --ckpt-out FILE\n"
      "  ./convert --ckpt-in FILE --hf-out DIR [--tokenizer-from DIR] [--dtype f32|bf16|f16]\n"
      "            [--max-shard-size 5GB]\n"
      "  ./convert (--hf-in DIR | --ckpt-in FILE) --gguf-out FILE [--gguf-type f32|f16|bf16|q8_0]\n"
      "            [--gguf-arch llama|qwen2|qwen3] [--tokenizer-from DIR]\n"
      "options:\n"
      "  --dtype           weights dtype of an HF output (default: the input folder's, else f32)\n"
      "  --max-shard-size  larger models are split into shards with an index (units B, KB, MB, GB;\n"
      "                    decimal, as transformers); default 5GB\n"
      "  --tokenizer-from  folder to copy tokenizer files from (default: the model's tokenizer_name\n"
      "                    when that is a folder)\n"
      "  --max-seq-len N   import with max_seq_len N instead of max_position_embeddings\n"
      "  --gguf-type       GGUF weight type (default f16; norms and biases stay f32)\n"
      "  --gguf-arch       GGUF architecture (default: qwen3 with QK-norm, qwen2 with Q/K/V bias, else "
      "llama)\n");
}

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  std::exit(1);
}

uint64_t parse_size(const std::string& text) {
  try {
    return llm::parse_shard_size(text);
  } catch (const std::invalid_argument& e) {
    fail(e.what());
  }
}

void print_notes(const std::vector<std::string>& notes) {
  for (const auto& n : notes) std::printf("  note: %s\n", n.c_str());
}

std::string describe(const llm::ModelConfig& c) {
  const llm::ParameterCount n = llm::count_parameters(c);
  char buffer[256];
  std::snprintf(buffer, sizeof(buffer),
                "d_model %d, %d layers, %d/%d heads, d_ff %d, vocab %d, %lld parameters", c.d_model,
                c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff, c.vocab_size, static_cast<long long>(n.total()));
  return buffer;
}

json tokens_to_json(const llm::HfSpecialTokens& t) {
  return json{{"bos_token_id", t.bos}, {"eos_token_id", t.eos}, {"pad_token_id", t.pad}};
}

llm::HfSpecialTokens tokens_from_json(const json& j) {
  llm::HfSpecialTokens t;
  if (!j.is_object()) return t;
  if (j.value("bos_token_id", json()).is_number_integer()) t.bos = j["bos_token_id"].get<int64_t>();
  if (j.value("pad_token_id", json()).is_number_integer()) t.pad = j["pad_token_id"].get<int64_t>();
  if (j.value("eos_token_id", json()).is_array()) {
    for (const auto& e : j["eos_token_id"]) {
      if (e.is_number_integer()) t.eos.push_back(e.get<int64_t>());
    }
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  std::string hf_in, hf_out, ckpt_in, ckpt_out, tokenizer_from, dtype_name, gguf_out, gguf_type = "f16",
                                                                                      gguf_arch;
  uint64_t max_shard = 5'000'000'000ull;
  int max_seq_len = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--hf-in") {
      hf_in = value();
    } else if (arg == "--hf-out") {
      hf_out = value();
    } else if (arg == "--ckpt-in") {
      ckpt_in = value();
    } else if (arg == "--ckpt-out") {
      ckpt_out = value();
    } else if (arg == "--gguf-out") {
      gguf_out = value();
    } else if (arg == "--gguf-type") {
      gguf_type = value();
    } else if (arg == "--gguf-arch") {
      gguf_arch = value();
    } else if (arg == "--tokenizer-from") {
      tokenizer_from = value();
    } else if (arg == "--dtype") {
      dtype_name = value();
    } else if (arg == "--max-shard-size") {
      max_shard = parse_size(value());
    } else if (arg == "--max-seq-len") {
      const std::string v = value();
      max_seq_len = std::atoi(v.c_str());
      if (max_seq_len <= 0) fail("--max-seq-len expects a positive integer, found \"" + v + "\"");
    } else if (arg == "-h" || arg == "--help") {
      usage();
      return 0;
    } else {
      usage();
      fail("unknown argument \"" + arg + "\"");
    }
  }
  // Exactly one input and one output.
  if (hf_in.empty() == ckpt_in.empty()) {
    usage();
    fail("give exactly one input: --hf-in DIR or --ckpt-in FILE");
  }
  if (int(!hf_out.empty()) + int(!ckpt_out.empty()) + int(!gguf_out.empty()) != 1) {
    usage();
    fail("give exactly one output: --hf-out DIR, --ckpt-out FILE or --gguf-out FILE");
  }
  if (!ckpt_in.empty() && !ckpt_out.empty()) fail("checkpoint to checkpoint is not a conversion");
  if (!ckpt_out.empty() && !dtype_name.empty()) fail("--dtype applies to --hf-out (checkpoints are float32)");

  try {
    llm::ModelConfig config;
    llm::HfSpecialTokens tokens;
    std::string source_dtype, source_dir;
    std::vector<float> params;

    // ---- Input
    if (!hf_in.empty()) {
      std::printf("reading Hugging Face folder %s\n", hf_in.c_str());
      llm::HfImportOptions options;
      options.max_seq_len = max_seq_len;
      const llm::HfConfigImport imported = llm::load_hf_config(hf_in, options);
      config = imported.config;
      tokens = imported.tokens;
      source_dtype = imported.torch_dtype;
      source_dir = hf_in;
      std::printf("  %s: %s\n", imported.architecture.c_str(), describe(config).c_str());
      print_notes(imported.notes);
      std::vector<std::string> notes;
      params = llm::load_hf_parameters(hf_in, config, &notes);
      print_notes(notes);
      std::printf("  loaded %zu tensors (%zu values)\n", llm::ParameterLayout(config).tensors().size(),
                  params.size());
    } else {
      std::printf("reading checkpoint %s\n", ckpt_in.c_str());
      const llm::Checkpoint ck = llm::read_checkpoint(ckpt_in, /*load_optimizer=*/false);
      if (!ck.meta.contains("model")) fail(ckpt_in + ": no meta.model (the model config) in this checkpoint");
      const std::string lora_hint = llm::lora_checkpoint_hint(ckpt_in, ck.meta);
      if (!lora_hint.empty()) fail(ckpt_in + ": " + lora_hint);
      config = llm::model_config_from_json(ck.meta["model"], ckpt_in + ": meta.model");
      if (ck.meta.contains("hf")) tokens = tokens_from_json(ck.meta["hf"]);
      std::printf("  %s\n", describe(config).c_str());
      const llm::ParameterLayout layout(config);
      params.assign(layout.total_elements(), 0.0f);
      std::vector<bool> seen(layout.tensors().size(), false);
      for (const auto& a : ck.arrays) {
        if (a.kind != "param") continue;
        if (!layout.contains(a.name)) fail(ckpt_in + ": unexpected tensor " + a.name);
        const llm::TensorInfo& t = layout.at(a.name);
        if (a.shape != t.shape || static_cast<int64_t>(a.data.size()) != t.numel) {
          fail(ckpt_in + ": tensor " + a.name + " does not have the shape the model config gives it");
        }
        std::copy(a.data.begin(), a.data.end(), params.begin() + static_cast<long>(t.offset));
        seen[&t - layout.tensors().data()] = true;
      }
      for (size_t i = 0; i < seen.size(); ++i) {
        if (!seen[i]) fail(ckpt_in + ": missing tensor " + layout.tensors()[i].name);
      }
      std::printf("  loaded %zu tensors\n", layout.tensors().size());
    }

    // ---- Output
    if (!gguf_out.empty()) {
      const llm::GgufType type = llm::parse_gguf_type(gguf_type);
      if (gguf_arch.empty()) gguf_arch = llm::default_gguf_arch(config);
      const std::string tokenizer_dir = !tokenizer_from.empty() ? tokenizer_from : source_dir;
      if (tokenizer_dir.empty()) fail("GGUF export needs the tokenizer: give --tokenizer-from DIR");
      const llm::GgufTokenizer tokenizer = llm::gguf_tokenizer_from_folder(tokenizer_dir, tokens, gguf_arch);
      const llm::ParameterLayout layout(config);
      std::printf("writing GGUF %s (arch %s, %s weights, %zu tokens)\n", gguf_out.c_str(), gguf_arch.c_str(),
                  gguf_type.c_str(), tokenizer.tokens.size());
      llm::write_gguf(gguf_out, config, layout, params.data(), tokenizer, type, gguf_arch);
    } else if (!hf_out.empty()) {
      llm::HfExportOptions options;
      options.dtype = llm::SafeDType::kF32;
      if (!dtype_name.empty()) {
        options.dtype = llm::parse_export_dtype(dtype_name);
      } else if (source_dtype == "bfloat16" || source_dtype == "float16") {
        options.dtype = llm::parse_export_dtype(source_dtype);
      }
      options.max_shard_bytes = max_shard;
      options.tokens = tokens;
      options.source_dir = !tokenizer_from.empty() ? tokenizer_from : source_dir;
      const llm::ParameterLayout layout(config);
      std::printf("writing Hugging Face folder %s as %s (%s weights)\n", hf_out.c_str(),
                  llm::hf_architecture_for(config).c_str(), llm::safe_dtype_name(options.dtype));
      const auto files = llm::save_hf_folder(hf_out, config, layout, params.data(), options);
      for (const auto& f : files) std::printf("  wrote %s/%s\n", hf_out.c_str(), f.c_str());
    } else {
      std::printf("writing checkpoint %s (weights only, float32)\n", ckpt_out.c_str());
      llm::Checkpoint ck;
      ck.meta["format"] = "llm checkpoint v1";
      ck.meta["contents"] = "weights only (converted from a Hugging Face folder)";
      ck.meta["source"] = hf_in;
      ck.meta["model"] = config.to_json();
      ck.meta["hf"] = tokens_to_json(tokens);
      const llm::ParameterLayout layout(config);
      for (const auto& t : layout.tensors()) {
        ck.arrays.push_back({t.name, "param", t.shape,
                             std::vector<float>(params.begin() + static_cast<long>(t.offset),
                                                params.begin() + static_cast<long>(t.offset + t.numel))});
      }
      llm::write_checkpoint(ckpt_out, ck);
      std::printf("  wrote %zu tensors\n", ck.arrays.size());
    }
  } catch (const std::exception& e) {
    fail(e.what());
  }
  std::printf("done\n");
  return 0;
}
