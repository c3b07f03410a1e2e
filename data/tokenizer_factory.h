// Makes a Tokenizer from the name users give in configs and on command lines: "byte" for the built-in
// byte tokenizer, or a Hugging Face tokenizer: a model folder holding tokenizer.json (and usually
// tokenizer_config.json), or the tokenizer.json file itself (tokenizer_config.json beside it is read too).
#pragma once

#include <memory>
#include <string>

#include "data/tokenizer.h"

namespace llm::data {

struct TokenizerFiles {
  std::string tokenizer_json;
  std::string tokenizer_config;  // empty when there is none
};

// Throws std::runtime_error naming the spec when it is neither "byte", a folder with tokenizer.json, nor a
// readable file.
TokenizerFiles find_tokenizer_files(const std::string& spec);

// Throws std::runtime_error naming the file for anything wrong inside the tokenizer files.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec);

}  // namespace llm::data
