// Byte-level BPE read from a Hugging Face tokenizer.json (the `tokenizers` library's format), as used by
// GPT-2, Llama-3, Qwen2/2.5/3 and most recent models, producing the same ids as `tokenizers`.
//
// Encoding, in the order `tokenizers` applies it:
//   1. added tokens with normalized=false are matched in the raw text (leftmost, then longest match) and
//      split it; lstrip/rstrip extend a match over the whitespace beside it, single_word requires word
//      boundaries;
//   2. each remaining piece is normalized (none, NFC, or a Sequence of those) and split on the added
//      tokens with normalized=true;
//   3. each remaining piece is pre-tokenized: Split pre-tokenizers (a regex, behavior Isolated), then
//      ByteLevel (add_prefix_space; use_regex applies GPT-2's pattern). Regexes run on PCRE2 with Unicode
//      classes; `\s` is widened to match U+0085 as Oniguruma's does;
//   4. each pre-token is mapped to bytes and merged lowest-rank-first (leftmost on ties); with
//      model.ignore_merges a pre-token that is itself in the vocabulary is taken whole.
// Bytes that are not valid UTF-8 (which `tokenizers` never sees, since it takes Rust strings) are encoded
// as single-byte tokens, so every byte string round-trips. decode() returns raw bytes: unlike `tokenizers`
// it does not replace invalid UTF-8 with U+FFFD, so partial sequences can be streamed.
//
// Supported: model.type "BPE" (merges as "a b" strings or ["a","b"] pairs); normalizers null, NFC,
// Sequence; pre-tokenizers ByteLevel or Sequence[Split..., ByteLevel]; decoders ByteLevel (or null).
// Anything else is a std::runtime_error naming the file, the key, what was found and what is supported.
// The post-processor is not applied by encode(); adds_bos() says whether it would prepend bos.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer.h"

namespace llm::data {

struct AddedTokenSpec {
  std::string content;
  int32_t id = -1;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool single_word = false;
};

class BpeTokenizer final : public Tokenizer {
 public:
  // Reads tokenizer_json_path and, when config_path is not empty and the file exists, tokenizer_config.json
  // (bos_token, eos_token, pad_token). Throws std::runtime_error naming the file on any problem.
  static std::unique_ptr<BpeTokenizer> from_files(const std::string& tokenizer_json_path,
                                                  const std::string& config_path = "");
  // From parsed JSON; config may be null/empty. source names the tokenizer in messages.
  BpeTokenizer(const nlohmann::json& tokenizer_json, const nlohmann::json& config, std::string source);
  ~BpeTokenizer() override;
  BpeTokenizer(const BpeTokenizer&) = delete;
  BpeTokenizer& operator=(const BpeTokenizer&) = delete;

  std::vector<int32_t> encode(std::string_view text) const override;
  // encode() with the ids the post-processor would add (bos first when adds_bos()).
  std::vector<int32_t> encode_with_special_tokens(std::string_view text) const;
  std::string decode(const std::vector<int32_t>& ids) const override { return decode(ids, false); }
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const;
  // The bytes one id decodes to (added tokens give their content). Throws std::invalid_argument.
  std::string token_bytes(int32_t id) const;

  int vocab_size() const override { return static_cast<int>(token_bytes_.size()); }
  int32_t eos_id() const override { return eos_id_; }
  int32_t bos_id() const override { return bos_id_; }
  int32_t pad_id() const override { return pad_id_; }
  std::string name() const override { return source_; }
  // Any token: an added token's content, or a vocabulary entry as written in tokenizer.json (byte-mapped,
  // e.g. "Ġthe"). -1 when absent.
  int32_t token_to_id(std::string_view token) const override;

  bool is_special(int32_t id) const;
  bool adds_bos() const { return adds_bos_; }
  const std::vector<AddedTokenSpec>& added_tokens() const { return added_tokens_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string source_;
  std::vector<std::string> token_bytes_;  // by id; empty with valid_[id] == 0 for holes
  std::vector<uint8_t> valid_;
  std::vector<uint8_t> special_;
  std::vector<AddedTokenSpec> added_tokens_;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  int32_t pad_id_ = -1;
  bool adds_bos_ = false;
};

// GPT-2's reversible map from bytes to printable code points (the alphabet of byte-level vocabularies):
// the code point byte b is written as in tokenizer.json.
char32_t byte_to_unicode(uint8_t b);

}  // namespace llm::data
