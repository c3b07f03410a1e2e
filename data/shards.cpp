// Token shard writer and reader. Bytes are assembled explicitly in little-endian order so shards are
// portable, and every header field is checked against the file before any token is trusted.
#include "data/shards.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "data/atomic_file.h"

namespace llm::data {
namespace {

void put_le(std::vector<unsigned char>& out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<unsigned char>(value >> (8 * i)));
}

uint64_t get_le(const unsigned char* in, int bytes) {
  uint64_t value = 0;
  for (int i = 0; i < bytes; ++i) value |= static_cast<uint64_t>(in[i]) << (8 * i);
  return value;
}

}  // namespace

void write_token_shard(const std::string& path, const std::vector<int32_t>& tokens, uint32_t vocab_size) {
  if (vocab_size == 0)
    throw std::invalid_argument(path + ": expected a vocab_size > 0 for the shard, found 0");
  const int dtype = vocab_size <= 65536u ? 2 : 4;
  std::vector<unsigned char> bytes;
  bytes.reserve(kShardHeaderBytes + tokens.size() * dtype);
  bytes.insert(bytes.end(), kShardMagic, kShardMagic + sizeof(kShardMagic));
  put_le(bytes, kShardVersion, 4);
  put_le(bytes, static_cast<uint32_t>(dtype), 4);
  put_le(bytes, vocab_size, 4);
  put_le(bytes, 0, 4);
  put_le(bytes, tokens.size(), 8);
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || static_cast<uint32_t>(tokens[i]) >= vocab_size) {
      throw std::invalid_argument(path + ": token " + std::to_string(tokens[i]) + " at position " +
                                  std::to_string(i) + " is outside the vocabulary [0, " +
                                  std::to_string(vocab_size) + ")");
    }
    put_le(bytes, static_cast<uint32_t>(tokens[i]), dtype);
  }

  AtomicFile<std::runtime_error> file(path);
  file.write(bytes.data(), bytes.size());
  file.commit();
}

TokenShard read_token_shard(const std::string& path) {
  std::error_code error;
  if (std::filesystem::is_directory(path, error)) {
    throw std::runtime_error(path + ": expected a token shard file, found a folder");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  in.seekg(0, std::ios::end);
  const std::streamoff file_bytes = in.tellg();
  in.seekg(0, std::ios::beg);
  if (file_bytes < 0) throw std::runtime_error(path + ": cannot determine the file size");
  const uint64_t size = static_cast<uint64_t>(file_bytes);
  if (size < kShardHeaderBytes) {
    throw std::runtime_error(path + ": expected a " + std::to_string(kShardHeaderBytes) +
                             "-byte token shard header, found a file of " + std::to_string(size) + " bytes");
  }
  unsigned char header[kShardHeaderBytes];
  in.read(reinterpret_cast<char*>(header), kShardHeaderBytes);
  if (!in) throw std::runtime_error(path + ": read error in the header");
  if (std::memcmp(header, kShardMagic, sizeof(kShardMagic)) != 0) {
    throw std::runtime_error(path + ": expected the token shard magic \"LLMTOKS1\", found other bytes");
  }
  const uint64_t version = get_le(header + 8, 4);
  const uint64_t dtype = get_le(header + 12, 4);
  const uint64_t vocab_size = get_le(header + 16, 4);
  const uint64_t reserved = get_le(header + 20, 4);
  const uint64_t count = get_le(header + 24, 8);
  if (version != kShardVersion) {
    throw std::runtime_error(path + ": expected token shard version 1, found " + std::to_string(version));
  }
  if (dtype != 2 && dtype != 4) {
    throw std::runtime_error(path + ": expected token dtype 2 (uint16) or 4 (uint32), found " +
                             std::to_string(dtype));
  }
  // Ids are int32 in memory, so a larger vocabulary could not be represented.
  if (vocab_size == 0 || vocab_size > (uint64_t{1} << 31)) {
    throw std::runtime_error(path + ": expected a vocab_size in [1, 2^31], found " +
                             std::to_string(vocab_size));
  }
  if (reserved != 0) {
    throw std::runtime_error(path + ": expected the reserved header field to be 0, found " +
                             std::to_string(reserved));
  }
  const uint64_t payload = size - kShardHeaderBytes;
  if (payload % dtype != 0 || payload / dtype != count) {
    throw std::runtime_error(path + ": header says " + std::to_string(count) + " tokens of " +
                             std::to_string(dtype) + " bytes, but the file holds " + std::to_string(payload) +
                             " bytes of tokens (truncated or corrupt)");
  }
  std::vector<unsigned char> bytes(payload);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(payload));
  if (!in) throw std::runtime_error(path + ": read error in the tokens");

  TokenShard shard;
  shard.vocab_size = static_cast<uint32_t>(vocab_size);
  shard.tokens.resize(count);
  const int width = static_cast<int>(dtype);
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t token = get_le(bytes.data() + i * dtype, width);
    if (token >= vocab_size) {
      throw std::runtime_error(path + ": token " + std::to_string(token) + " at position " +
                               std::to_string(i) + " is >= the shard's vocab_size " +
                               std::to_string(vocab_size));
    }
    shard.tokens[i] = static_cast<int32_t>(token);
  }
  return shard;
}

}  // namespace llm::data
