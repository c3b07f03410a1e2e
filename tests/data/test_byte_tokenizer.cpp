// The byte tokenizer: every byte sequence round-trips, special-token strings become their ids, and
// decoding an unknown id is an error that names it.
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

#include "data/byte_tokenizer.h"

namespace {

using llm::data::ByteTokenizer;

TEST(ByteTokenizer, AllBytesRoundTrip) {
  ByteTokenizer tokenizer;
  std::string bytes;
  for (int b = 0; b < 256; ++b) bytes.push_back(static_cast<char>(b));
  const std::vector<int32_t> ids = tokenizer.encode(bytes);
  ASSERT_EQ(ids.size(), 256u);
  for (int b = 0; b < 256; ++b) EXPECT_EQ(ids[b], b);
  EXPECT_EQ(tokenizer.decode(ids), bytes);
}

TEST(ByteTokenizer, Utf8RoundTrips) {
  ByteTokenizer tokenizer;
  const std::string text = "héllo wörld, 日本語, emoji \xF0\x9F\x98\x80\n";
  const std::vector<int32_t> ids = tokenizer.encode(text);
  EXPECT_EQ(ids.size(), text.size());
  EXPECT_EQ(tokenizer.decode(ids), text);
}

TEST(ByteTokenizer, SpecialTokensInText) {
  ByteTokenizer tokenizer;
  const std::string text = "<|im_start|>user\nhi<|im_end|><|pad|>a<|endoftext|><|nope|><|im_start";
  const std::vector<int32_t> ids = tokenizer.encode(text);
  std::vector<int32_t> expected = {ByteTokenizer::kImStart,
                                   'u',
                                   's',
                                   'e',
                                   'r',
                                   '\n',
                                   'h',
                                   'i',
                                   ByteTokenizer::kImEnd,
                                   ByteTokenizer::kPad,
                                   'a',
                                   ByteTokenizer::kEndOfText};
  for (char c : std::string("<|nope|><|im_start")) expected.push_back(static_cast<unsigned char>(c));
  EXPECT_EQ(ids, expected);
  EXPECT_EQ(tokenizer.decode(ids), text);
}

TEST(ByteTokenizer, Metadata) {
  ByteTokenizer tokenizer;
  EXPECT_EQ(tokenizer.vocab_size(), 260);
  EXPECT_EQ(tokenizer.eos_id(), 256);
  EXPECT_EQ(tokenizer.bos_id(), 256);
  EXPECT_EQ(tokenizer.pad_id(), 257);
  EXPECT_EQ(tokenizer.name(), "byte");
  EXPECT_EQ(tokenizer.token_to_id("<|endoftext|>"), 256);
  EXPECT_EQ(tokenizer.token_to_id("<|pad|>"), 257);
  EXPECT_EQ(tokenizer.token_to_id("<|im_start|>"), 258);
  EXPECT_EQ(tokenizer.token_to_id("<|im_end|>"), 259);
  EXPECT_EQ(tokenizer.token_to_id("<|unknown|>"), -1);
  EXPECT_EQ(tokenizer.token_to_id("a"), -1);
}

TEST(ByteTokenizer, DecodeOutOfRangeNamesTheId) {
  ByteTokenizer tokenizer;
  for (int32_t bad : {260, -1, 100000}) {
    try {
      tokenizer.decode({'a', bad});
      FAIL() << "expected std::invalid_argument for id " << bad;
    } catch (const std::invalid_argument& error) {
      EXPECT_NE(std::string(error.what()).find(std::to_string(bad)), std::string::npos) << error.what();
    }
  }
}

}  // namespace
