#include "llm/gguf_tokenizer.h"

#include <filesystem>
#include <vector>

#include "llm/json_config.h"

namespace llm {

GgufTokenizer gguf_tokenizer_from_folder(const std::string& folder, const HfSpecialTokens& special,
                                         const std::string& arch) {
  namespace fs = std::filesystem;
  const fs::path json_path = fs::path(folder) / "tokenizer.json";
  const std::string where = json_path.string();
  if (!fs::exists(json_path)) {
    throw GgufError("GGUF export needs the tokenizer: no " + where + " (give --tokenizer-from DIR)");
  }
  const json tok = parse_json_file(where);
  const json& model = tok.value("model", json());
  if (!model.is_object() || model.value("type", "") != "BPE" || !model.contains("vocab") ||
      !model["vocab"].is_object()) {
    throw GgufError(where + ": GGUF export supports byte-level BPE tokenizers (model.type \"BPE\") only");
  }
  GgufTokenizer t;
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  auto place = [&](int64_t id, const std::string& text, int32_t type) {
    if (id < 0 || id > (1 << 24))
      throw GgufError(where + ": token id " + std::to_string(id) + " is out of range");
    if (static_cast<size_t>(id) >= tokens.size()) {
      tokens.resize(id + 1);
      types.resize(id + 1, 0);
    }
    tokens[id] = text;
    types[id] = type;
  };
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    if (!it->is_number_integer())
      throw GgufError(where + ": vocab entry " + it.key() + " is not an integer id");
    place(it->get<int64_t>(), it.key(), 1);  // normal
  }
  for (const auto& added : tok.value("added_tokens", json::array())) {
    if (!added.is_object() || !added.contains("id") || !added.contains("content")) continue;
    if (!added["id"].is_number_integer() || !added["content"].is_string()) {
      throw GgufError(where + ": an added token has a non-integer id or a non-string content");
    }
    place(added["id"].get<int64_t>(), added["content"].get<std::string>(),
          added.value("special", false) ? 3 : 4);
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (types[i] == 0)
      throw GgufError(where + ": token id " + std::to_string(i) + " is missing from the vocabulary");
  }
  for (const auto& merge : model.value("merges", json::array())) {
    if (merge.is_string()) {
      t.merges.push_back(merge.get<std::string>());
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      t.merges.push_back(merge[0].get<std::string>() + " " + merge[1].get<std::string>());
    } else {
      throw GgufError(where + ": a merge is neither \"a b\" nor [\"a\", \"b\"]");
    }
  }
  t.tokens = std::move(tokens);
  t.token_types = std::move(types);
  t.bos = static_cast<int>(special.bos);
  t.eos = special.eos.empty() ? -1 : static_cast<int>(special.eos.front());
  t.pad = static_cast<int>(special.pad);
  // llama.cpp picks its pre-tokenizer regex by this name.
  t.pre = arch == "llama" ? "llama-bpe" : "qwen2";
  const fs::path config_path = fs::path(folder) / "tokenizer_config.json";
  if (fs::exists(config_path)) {
    const json config = parse_json_file(config_path.string());
    if (config.contains("chat_template") && config["chat_template"].is_string()) {
      t.chat_template = config["chat_template"].get<std::string>();
    }
  }
  return t;
}

std::string default_gguf_arch(const ModelConfig& config) {
  return config.qk_norm ? "qwen3" : (config.attention_bias ? "qwen2" : "llama");
}

}  // namespace llm
