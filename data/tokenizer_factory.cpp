// "byte" or a path -> a Tokenizer.
#include "data/tokenizer_factory.h"

#include <filesystem>
#include <stdexcept>

#include "data/bpe_tokenizer.h"
#include "data/byte_tokenizer.h"

namespace llm::data {

namespace fs = std::filesystem;

TokenizerFiles find_tokenizer_files(const std::string& spec) {
  std::error_code error;
  const fs::path path(spec);
  TokenizerFiles files;
  if (fs::is_directory(path, error)) {
    const fs::path json = path / "tokenizer.json";
    if (!fs::is_regular_file(json, error)) {
      throw std::runtime_error("tokenizer \"" + spec + "\": the folder has no tokenizer.json");
    }
    files.tokenizer_json = json.string();
  } else if (fs::is_regular_file(path, error)) {
    files.tokenizer_json = path.string();
  } else {
    throw std::runtime_error("tokenizer \"" + spec +
                             "\": expected \"byte\", a folder with tokenizer.json, or a tokenizer.json file; "
                             "no such file or folder");
  }
  const fs::path config = fs::path(files.tokenizer_json).parent_path() / "tokenizer_config.json";
  if (fs::is_regular_file(config, error)) files.tokenizer_config = config.string();
  return files;
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  const TokenizerFiles files = find_tokenizer_files(spec);
  return BpeTokenizer::from_files(files.tokenizer_json, files.tokenizer_config);
}

}  // namespace llm::data
