#include "llm/hf_model.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <type_traits>

#include "data/atomic_file.h"
#include "llm/strings.h"

namespace llm {

namespace {

[[noreturn]] void throw_problems(const std::string& dir, const std::vector<std::string>& problems) {
  constexpr size_t kShown = 30;
  std::string all = dir + ": the weights do not match the model config (" + std::to_string(problems.size()) +
                    " problem" + (problems.size() == 1 ? "" : "s") + "):";
  for (size_t i = 0; i < problems.size() && i < kShown; ++i) all += "\n  " + problems[i];
  if (problems.size() > kShown) all += "\n  ... and " + std::to_string(problems.size() - kShown) + " more";
  throw HfModelError(all);
}

// Every problem of the folder against the layout (missing, misshapen and unexpected tensors; a separate
// lm_head under tied embeddings), thrown at once; `notes` gets what is accepted but ignored.
template <typename T>
void check_hf_weights(const SafetensorsFolder& folder, const ParameterLayout& layout,
                      std::vector<std::string>* notes) {
  std::vector<std::string> problems;
  for (const TensorInfo& info : layout.tensors()) {
    const SafetensorsTensor* t = folder.find(info.name);
    if (t == nullptr) {
      problems.push_back("missing tensor " + info.name + " " + shape_string(info.shape));
    } else if (t->shape != info.shape) {
      problems.push_back("tensor " + info.name + " has shape " + shape_string(t->shape) +
                         ", the config needs " + shape_string(info.shape));
    }
  }
  bool tied_head = false;
  for (const std::string& name : folder.names()) {
    if (layout.contains(name)) continue;
    if (ends_with(name, ".rotary_emb.inv_freq")) {  // a buffer old Llama checkpoints saved; recomputed
      if (notes) notes->push_back("ignored " + name + " (RoPE frequencies are computed from the config)");
      continue;
    }
    if (name == "lm_head.weight" && layout.contains("model.embed_tokens.weight")) {
      tied_head = true;  // checked below, once the shapes are known to be right
      continue;
    }
    problems.push_back("unexpected tensor " + name + " " + shape_string(folder.find(name)->shape) +
                       " (the config has no such parameter)");
  }
  if (tied_head) {
    const TensorInfo& embed = layout.at("model.embed_tokens.weight");
    const SafetensorsTensor* head = folder.find("lm_head.weight");
    bool equal = head->shape == embed.shape;
    const SafetensorsTensor* embed_t = folder.find(embed.name);
    if (equal && embed_t != nullptr) {
      std::vector<T> a(static_cast<size_t>(embed.numel)), b(a.size());
      folder.read(embed.name, a.data(), a.size());
      folder.read("lm_head.weight", b.data(), b.size());
      equal = a == b;
    }
    if (!equal) {
      problems.push_back(
          "unexpected tensor lm_head.weight: tie_word_embeddings is true but it differs from "
          "model.embed_tokens.weight (set tie_word_embeddings false in config.json if the head is separate)");
    } else if (notes) {
      notes->push_back("ignored lm_head.weight: equal to model.embed_tokens.weight (tied embeddings)");
    }
  }
  if (!problems.empty()) throw_problems(folder.dir(), problems);
}

}  // namespace

template <typename T>
void load_hf_weights(const SafetensorsFolder& folder, const ParameterLayout& layout, T* params,
                     std::vector<std::string>* notes) {
  check_hf_weights<T>(folder, layout, notes);
  for (const TensorInfo& info : layout.tensors()) {
    folder.read(info.name, params + info.offset, static_cast<size_t>(info.numel));
  }
}

template <typename T>
void load_hf_weights(const std::string& dir, Model<T>& model, std::vector<std::string>* notes) {
  const SafetensorsFolder folder(dir);
  load_hf_weights(folder, model.layout(), model.parameters().data(), notes);
}

std::vector<float> load_hf_parameters(const std::string& dir, const ModelConfig& config,
                                      std::vector<std::string>* notes) {
  const ParameterLayout layout(config);
  std::vector<float> params(layout.total_elements());
  const SafetensorsFolder folder(dir);
  load_hf_weights(folder, layout, params.data(), notes);
  return params;
}

void check_hf_parameters(const std::string& dir, const ModelConfig& config, std::vector<std::string>* notes) {
  check_hf_weights<float>(SafetensorsFolder(dir), ParameterLayout(config), notes);
}

void read_hf_tensors(const std::string& dir, const ModelConfig& config, std::vector<std::string>* notes,
                     const std::function<void(const TensorInfo&, const std::vector<float>&)>& sink) {
  const ParameterLayout layout(config);
  const SafetensorsFolder folder(dir);
  check_hf_weights<float>(folder, layout, notes);
  std::vector<float> values;
  for (const TensorInfo& info : layout.tensors()) {
    values.resize(static_cast<size_t>(info.numel));
    folder.read(info.name, values.data(), values.size());
    sink(info, values);
  }
}

const std::vector<std::string>& hf_tokenizer_files() {
  static const std::vector<std::string> files = {
      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",   "vocab.json",
      "merges.txt",     "added_tokens.json",     "chat_template.jinja",     "chat_template.json"};
  return files;
}

uint64_t parse_shard_size(const std::string& text) {
  size_t pos = 0;
  double value = 0;
  try {
    value = std::stod(text, &pos);
  } catch (const std::exception&) {
    throw std::invalid_argument("--max-shard-size: expected a size such as 5GB or 500MB, found \"" + text +
                                "\"");
  }
  const std::string unit = text.substr(pos);
  double scale = 0;
  if (unit == "" || unit == "B") scale = 1;
  if (unit == "KB" || unit == "kB") scale = 1e3;
  if (unit == "MB") scale = 1e6;
  if (unit == "GB") scale = 1e9;
  if (scale == 0)
    throw std::invalid_argument("--max-shard-size: unknown unit \"" + unit + "\" (B, KB, MB, GB)");
  if (!(value > 0) || value * scale > 1e15) {
    throw std::invalid_argument("--max-shard-size must be positive, found \"" + text + "\"");
  }
  return static_cast<uint64_t>(value * scale);
}

SafeDType parse_export_dtype(const std::string& name) {
  if (name == "f32" || name == "F32" || name == "float32" || name == "fp32") return SafeDType::kF32;
  if (name == "bf16" || name == "BF16" || name == "bfloat16") return SafeDType::kBF16;
  if (name == "f16" || name == "F16" || name == "float16" || name == "fp16") return SafeDType::kF16;
  throw std::invalid_argument("unknown export dtype \"" + name + "\" (expected f32, bf16 or f16)");
}

std::string torch_dtype_name(SafeDType dtype) {
  switch (dtype) {
    case SafeDType::kBF16:
      return "bfloat16";
    case SafeDType::kF16:
      return "float16";
    default:
      return "float32";
  }
}

template <typename T>
std::vector<std::string> save_hf_folder(const std::string& dir, const ModelConfig& config,
                                        const ParameterLayout& layout, const T* params,
                                        const HfExportOptions& options) {
  namespace fs = std::filesystem;
  const json config_json = hf_config_to_json(config, options.tokens, torch_dtype_name(options.dtype));
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw HfModelError("cannot create folder " + dir + ": " + ec.message());

  // Weights, as float (the writer converts to the file dtype).
  std::vector<std::vector<float>> storage;
  std::vector<SafetensorsWriteTensor> tensors;
  storage.reserve(layout.tensors().size());
  for (const TensorInfo& info : layout.tensors()) {
    const T* src = params + info.offset;
    const float* data = nullptr;
    if constexpr (std::is_same_v<T, float>) {
      data = src;
    } else {
      storage.emplace_back(src, src + info.numel);
      data = storage.back().data();
    }
    tensors.push_back({info.name, info.shape, data});
  }
  std::vector<std::string> written =
      write_safetensors_folder(dir, tensors, options.dtype, options.max_shard_bytes);

  write_file_atomic<HfModelError>(dir + "/config.json", config_json.dump(2) + "\n");
  written.push_back("config.json");

  std::string source = options.source_dir;
  if (source.empty() && fs::is_directory(config.tokenizer_name, ec)) source = config.tokenizer_name;
  const bool same = !source.empty() && fs::equivalent(source, dir, ec);
  std::vector<std::string> copies = hf_tokenizer_files();
  copies.push_back("generation_config.json");
  bool have_generation = false;
  if (!source.empty() && !same) {
    for (const std::string& file : copies) {
      const std::string from = source + "/" + file;
      if (!fs::is_regular_file(from, ec)) continue;
      // Read whole and written atomically, like every other file of the folder.
      std::ifstream in(from, std::ios::binary);
      const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      if (!in.good() && !in.eof()) throw HfModelError("cannot read " + from);
      write_file_atomic<HfModelError>(dir + "/" + file, bytes);
      written.push_back(file);
      if (file == "generation_config.json") have_generation = true;
    }
  } else if (same) {
    have_generation = fs::is_regular_file(dir + "/generation_config.json", ec);
  }
  if (!have_generation) {
    write_file_atomic<HfModelError>(dir + "/generation_config.json",
                                    hf_generation_config_to_json(options.tokens).dump(2) + "\n");
    written.push_back("generation_config.json");
  }
  return written;
}

template <typename T>
std::vector<std::string> save_hf_model(const std::string& dir, const Model<T>& model,
                                       const HfExportOptions& options) {
  return save_hf_folder(dir, model.config(), model.layout(), model.parameters().data(), options);
}

template void load_hf_weights<float>(const SafetensorsFolder&, const ParameterLayout&, float*,
                                     std::vector<std::string>*);
template void load_hf_weights<double>(const SafetensorsFolder&, const ParameterLayout&, double*,
                                      std::vector<std::string>*);
template void load_hf_weights<float>(const std::string&, Model<float>&, std::vector<std::string>*);
template void load_hf_weights<double>(const std::string&, Model<double>&, std::vector<std::string>*);
template std::vector<std::string> save_hf_folder<float>(const std::string&, const ModelConfig&,
                                                        const ParameterLayout&, const float*,
                                                        const HfExportOptions&);
template std::vector<std::string> save_hf_folder<double>(const std::string&, const ModelConfig&,
                                                         const ParameterLayout&, const double*,
                                                         const HfExportOptions&);
template std::vector<std::string> save_hf_model<float>(const std::string&, const Model<float>&,
                                                       const HfExportOptions&);
template std::vector<std::string> save_hf_model<double>(const std::string&, const Model<double>&,
                                                        const HfExportOptions&);

}  // namespace llm
