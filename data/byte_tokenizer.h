// The built-in byte-level tokenizer: ids 0..255 are the raw bytes, so any byte sequence round-trips and no
// vocabulary file is needed; four special tokens follow for document ends, padding and chat turns.
#pragma once

#include "data/tokenizer.h"

namespace llm::data {

class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kEndOfText = 256;  // "<|endoftext|>": eos, also used as bos
  static constexpr int32_t kPad = 257;        // "<|pad|>"
  static constexpr int32_t kImStart = 258;    // "<|im_start|>"
  static constexpr int32_t kImEnd = 259;      // "<|im_end|>"
  static constexpr int kVocabSize = 260;

  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int vocab_size() const override { return kVocabSize; }
  int32_t eos_id() const override { return kEndOfText; }
  int32_t bos_id() const override { return kEndOfText; }
  int32_t pad_id() const override { return kPad; }
  std::string name() const override { return "byte"; }
  int32_t token_to_id(std::string_view token) const override;
};

}  // namespace llm::data
