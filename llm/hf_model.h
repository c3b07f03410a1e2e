// Hugging Face model folders <-> our parameters.
//
// A folder holds config.json (see llm/hf_config.h), the weights as model.safetensors or as shards
// listed in model.safetensors.index.json (see llm/safetensors.h), and usually the tokenizer files and
// generation_config.json.
//
// Our ParameterLayout already uses the transformers names (model.embed_tokens.weight,
// model.layers.N.self_attn.q_proj.weight, ...), so loading maps every tensor of the folder onto the
// layout tensor of the same name, one to one, converting F32/F16/BF16 (or any other safetensors dtype)
// to T. Every problem is reported by name, all at once: a layout tensor the folder lacks, a folder
// tensor the layout has no place for, and a shape that differs. Two cases are accepted and noted:
// lm_head.weight in a tied model when it equals model.embed_tokens.weight, and the rotary
// inv_freq buffers some old Llama checkpoints saved.
//
// Saving writes config.json, generation_config.json, the weights (F32, F16 or BF16; sharded above a
// size), and copies the tokenizer files from the source folder. Tied models get no lm_head.weight, as
// transformers saves them.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "llm/config.h"
#include "llm/hf_config.h"
#include "llm/model.h"
#include "llm/params.h"
#include "llm/safetensors.h"

namespace llm {

// A folder's tensors do not fit the layout. what() lists every problem, one per line.
class HfModelError : public std::runtime_error {
 public:
  explicit HfModelError(const std::string& message) : std::runtime_error(message) {}
};

// Fills params (layout.total_elements() values, in layout order) from the folder's tensors. `notes`,
// when given, receives what was accepted but ignored. Throws HfModelError or SafetensorsError.
template <typename T>
void load_hf_weights(const SafetensorsFolder& folder, const ParameterLayout& layout, T* params,
                     std::vector<std::string>* notes = nullptr);
// Opens DIR's weights and loads them into the model (built from load_hf_config(DIR).config).
template <typename T>
void load_hf_weights(const std::string& dir, Model<T>& model, std::vector<std::string>* notes = nullptr);
// The parameter arena for `config` (in ParameterLayout order) read from DIR: for callers that keep
// parameters outside a Model (the trainer's backends, the converter).
std::vector<float> load_hf_parameters(const std::string& dir, const ModelConfig& config,
                                      std::vector<std::string>* notes = nullptr);
// Checks DIR's tensors against ParameterLayout(config) as load_hf_parameters does, reading no weights
// (except lm_head and the embeddings under tied embeddings, to compare them). Throws HfModelError.
void check_hf_parameters(const std::string& dir, const ModelConfig& config,
                         std::vector<std::string>* notes = nullptr);
// The same values as load_hf_parameters one tensor at a time, without the whole arena on the host: checks
// the folder (nothing is handed on when the check fails; a read error later leaves the tensors before it
// handed on), then hands each tensor of ParameterLayout(config), in
// layout order, to `sink` as fp32 values.
void read_hf_tensors(const std::string& dir, const ModelConfig& config, std::vector<std::string>* notes,
                     const std::function<void(const TensorInfo&, const std::vector<float>&)>& sink);

struct HfExportOptions {
  SafeDType dtype = SafeDType::kF32;            // F32, F16 or BF16
  uint64_t max_shard_bytes = 5'000'000'000ull;  // larger models are sharded (with an index)
  // Where the tokenizer files and generation_config.json are copied from: this folder, or when empty
  // config.tokenizer_name if that names a folder. Nothing is copied when there is none.
  std::string source_dir;
  HfSpecialTokens tokens;  // written to config.json (and generation_config.json when none is copied)
};

// A shard size as tools take it: "5GB", "500MB", "64KB", "1000B" or a plain byte count (decimal units).
// Throws std::invalid_argument with the message to print for anything else, zero or above 1e15 bytes.
uint64_t parse_shard_size(const std::string& text);

// The files a save copies from the source folder when they exist.
const std::vector<std::string>& hf_tokenizer_files();

// Writes an HF folder for `config` with parameters `params` (layout order). Returns the names of the
// files written or copied. Throws ConfigError (config not expressible), SafetensorsError or
// HfModelError (file system).
template <typename T>
std::vector<std::string> save_hf_folder(const std::string& dir, const ModelConfig& config,
                                        const ParameterLayout& layout, const T* params,
                                        const HfExportOptions& options = {});
template <typename T>
std::vector<std::string> save_hf_model(const std::string& dir, const Model<T>& model,
                                       const HfExportOptions& options = {});

// "f32" / "bf16" / "f16" (or F32, BF16, F16, float32, bfloat16, float16) -> dtype; throws
// std::invalid_argument otherwise.
SafeDType parse_export_dtype(const std::string& name);
// The torch_dtype string of an export dtype ("float32", "bfloat16", "float16").
std::string torch_dtype_name(SafeDType dtype);

}  // namespace llm
