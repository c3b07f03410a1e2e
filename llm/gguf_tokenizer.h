// The tokenizer part of a GGUF export, read from a Hugging Face folder (shared by ./convert and
// ./merge_lora).
//
// tokenizer.json must hold a byte-level BPE model: its vocabulary (token strings in GPT-2's
// byte-to-unicode alphabet, by id) and merges become tokenizer.ggml.tokens / .merges, added tokens are
// typed control (special) or user-defined, and tokenizer_config.json's chat_template is carried over.
#pragma once

#include <string>

#include "llm/config.h"
#include "llm/gguf.h"
#include "llm/hf_config.h"

namespace llm {

// Reads FOLDER/tokenizer.json (and FOLDER/tokenizer_config.json when present). `special` gives the
// bos/eos/pad ids; `arch` ("llama", "qwen2", "qwen3") picks llama.cpp's pre-tokenizer name. Throws
// GgufError naming the file for a missing file, a tokenizer that is not byte-level BPE, or a vocabulary
// with holes or out-of-range ids (ConfigError for malformed JSON).
GgufTokenizer gguf_tokenizer_from_folder(const std::string& folder, const HfSpecialTokens& special,
                                         const std::string& arch);

// The GGUF architecture a config exports as by default: qwen3 with QK-norm, qwen2 with Q/K/V bias, else
// llama.
std::string default_gguf_arch(const ModelConfig& config);

}  // namespace llm
