// The interface every tokenizer implements (the built-in byte tokenizer, the BPE one read from
// tokenizer.json), so that readers, loaders and tools never depend on a particular vocabulary.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace llm::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Text to ids. Special-token strings that appear in the text map to their ids.
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Ids to text. Throws std::invalid_argument naming the first id outside [0, vocab_size()).
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;

  virtual int vocab_size() const = 0;
  virtual int32_t eos_id() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 when the vocabulary has none
  virtual int32_t pad_id() const = 0;
  virtual std::string name() const = 0;
  // The id of a special token such as "<|im_start|>", or -1 when the vocabulary has no such token.
  virtual int32_t token_to_id(std::string_view token) const = 0;
};

}  // namespace llm::data
