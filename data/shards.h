// Pre-tokenised binary shards: a 32-byte header then the tokens, little-endian, so large corpora are
// tokenised once (by tools/tokenize) and loaded without re-tokenising.
//
// Header: magic "LLMTOKS1" (8 bytes), u32 version (1), u32 token dtype in bytes (2 = uint16, 4 = uint32),
// u32 vocab_size, u32 reserved (0), u64 token count. uint16 is used whenever vocab_size <= 65536.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace llm::data {

inline constexpr char kShardMagic[8] = {'L', 'L', 'M', 'T', 'O', 'K', 'S', '1'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 32;

struct TokenShard {
  uint32_t vocab_size = 0;
  std::vector<int32_t> tokens;
};

// Writes to a temporary file beside path, then renames it, so a crash never leaves a half-written shard.
// Throws std::invalid_argument for a token outside [0, vocab_size), std::runtime_error on I/O failure.
void write_token_shard(const std::string& path, const std::vector<int32_t>& tokens, uint32_t vocab_size);

// Reads and validates a whole shard. Throws std::runtime_error naming the file for a truncated header, bad
// magic, unknown version or dtype, nonzero reserved field, a token count that disagrees with the file
// size, or a token >= vocab_size.
TokenShard read_token_shard(const std::string& path);

}  // namespace llm::data
