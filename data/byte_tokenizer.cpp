// Byte-level tokenizer: every byte is its own id, and the special-token strings are recognised in text so
// that chat templates and document separators written as text become single ids.
#include "data/byte_tokenizer.h"

#include <array>
#include <stdexcept>

namespace llm::data {
namespace {

struct SpecialToken {
  std::string_view text;
  int32_t id;
};

constexpr std::array<SpecialToken, 4> kSpecialTokens = {{
    {"<|endoftext|>", ByteTokenizer::kEndOfText},
    {"<|pad|>", ByteTokenizer::kPad},
    {"<|im_start|>", ByteTokenizer::kImStart},
    {"<|im_end|>", ByteTokenizer::kImEnd},
}};

}  // namespace

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    bool matched_special = false;
    if (text[i] == '<') {
      for (const SpecialToken& special : kSpecialTokens) {
        if (text.compare(i, special.text.size(), special.text) == 0) {
          ids.push_back(special.id);
          i += special.text.size();
          matched_special = true;
          break;
        }
      }
    }
    if (!matched_special) {
      ids.push_back(static_cast<unsigned char>(text[i]));
      ++i;
    }
  }
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string text;
  text.reserve(ids.size());
  for (const int32_t id : ids) {
    if (id >= 0 && id < 256) {
      text.push_back(static_cast<char>(static_cast<unsigned char>(id)));
      continue;
    }
    bool found = false;
    for (const SpecialToken& special : kSpecialTokens) {
      if (special.id == id) {
        text.append(special.text);
        found = true;
        break;
      }
    }
    if (!found) {
      throw std::invalid_argument("byte tokenizer: cannot decode token id " + std::to_string(id) +
                                  ": expected an id in [0, " + std::to_string(kVocabSize) + ")");
    }
  }
  return text;
}

int32_t ByteTokenizer::token_to_id(std::string_view token) const {
  for (const SpecialToken& special : kSpecialTokens) {
    if (special.text == token) return special.id;
  }
  return -1;
}

}  // namespace llm::data
