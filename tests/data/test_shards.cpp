// Token shards: uint16 and uint32 round trips, atomic writes, and a clear error naming the file for every
// kind of damaged shard.
#include <gtest/gtest.h>

#include <unistd.h>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <string>

#include "data/shards.h"

namespace {

namespace fs = std::filesystem;

class ShardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("llm_shards_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  static std::string read_bytes(const std::string& file) {
    std::ifstream in(file, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  static void write_bytes(const std::string& file, const std::string& bytes) {
    std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
  }
  static void put_u32(std::string& bytes, size_t offset, uint32_t value) {
    for (int i = 0; i < 4; ++i) bytes[offset + i] = static_cast<char>(value >> (8 * i));
  }

  // Writes a valid shard, lets `damage` edit its bytes, and returns the reader's error message.
  template <typename Damage>
  std::string error_after(Damage damage) {
    const std::string file = path("damaged.bin");
    llm::data::write_token_shard(file, {1, 2, 3, 4, 5}, 260);
    std::string bytes = read_bytes(file);
    damage(bytes);
    write_bytes(file, bytes);
    try {
      llm::data::read_token_shard(file);
    } catch (const std::runtime_error& error) {
      EXPECT_NE(std::string(error.what()).find(file), std::string::npos) << error.what();
      return error.what();
    }
    return "no error";
  }

  fs::path dir_;
};

TEST_F(ShardTest, RoundTripUint16) {
  std::vector<int32_t> tokens;
  for (int i = 0; i < 1000; ++i) tokens.push_back((i * 7919) % 65536);
  tokens.push_back(65535);
  llm::data::write_token_shard(path("a.bin"), tokens, 65536);
  EXPECT_EQ(fs::file_size(path("a.bin")), 32 + 2 * tokens.size());
  const std::string bytes = read_bytes(path("a.bin"));
  EXPECT_EQ(bytes.substr(0, 8), "LLMTOKS1");
  EXPECT_EQ(bytes[12], 2);
  const llm::data::TokenShard shard = llm::data::read_token_shard(path("a.bin"));
  EXPECT_EQ(shard.vocab_size, 65536u);
  EXPECT_EQ(shard.tokens, tokens);
  // Only the shard remains: the temporary file was renamed into place.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);
}

TEST_F(ShardTest, RoundTripUint32) {
  const std::vector<int32_t> tokens = {0, 65536, 151000, 151935, 7};
  llm::data::write_token_shard(path("b.bin"), tokens, 151936);
  EXPECT_EQ(fs::file_size(path("b.bin")), 32 + 4 * tokens.size());
  const llm::data::TokenShard shard = llm::data::read_token_shard(path("b.bin"));
  EXPECT_EQ(shard.vocab_size, 151936u);
  EXPECT_EQ(shard.tokens, tokens);
  llm::data::write_token_shard(path("empty.bin"), {}, 260);
  EXPECT_TRUE(llm::data::read_token_shard(path("empty.bin")).tokens.empty());
}

TEST_F(ShardTest, WriterRejectsTokensOutsideTheVocabulary) {
  EXPECT_THROW(llm::data::write_token_shard(path("c.bin"), {1, 260}, 260), std::invalid_argument);
  EXPECT_THROW(llm::data::write_token_shard(path("c.bin"), {-1}, 260), std::invalid_argument);
  EXPECT_FALSE(fs::exists(path("c.bin")));
}

TEST_F(ShardTest, DamagedShardsAreRejected) {
  EXPECT_NE(error_after([](std::string& b) { b.resize(20); }).find("header"), std::string::npos);
  EXPECT_NE(error_after([](std::string& b) { b.resize(b.size() - 1); }).find("truncated"), std::string::npos);
  EXPECT_NE(error_after([](std::string& b) { b.resize(b.size() - 2); }).find("header says 5 tokens"),
            std::string::npos);
  EXPECT_NE(error_after([](std::string& b) { b += "xy"; }).find("header says 5 tokens"), std::string::npos);
  EXPECT_NE(error_after([](std::string& b) { b[0] = 'X'; }).find("magic"), std::string::npos);
  EXPECT_NE(error_after([](std::string& b) { put_u32(b, 8, 2); }).find("version"), std::string::npos);
  EXPECT_NE(error_after([](std::string& b) { put_u32(b, 12, 3); }).find("dtype"), std::string::npos);
  EXPECT_NE(error_after([](std::string& b) { put_u32(b, 12, 4); }).find("header says 5 tokens of 4 bytes"),
            std::string::npos);
  EXPECT_NE(error_after([](std::string& b) { put_u32(b, 16, 0); }).find("vocab_size"), std::string::npos);
  EXPECT_NE(error_after([](std::string& b) { put_u32(b, 20, 1); }).find("reserved"), std::string::npos);
  EXPECT_NE(error_after([](std::string& b) { put_u32(b, 24, 1000000); }).find("header says 1000000"),
            std::string::npos);
  // The u64 count's high half: a count that would overflow count * dtype must not slip through.
  EXPECT_NE(error_after([](std::string& b) { put_u32(b, 28, 0x80000000u); }).find("truncated"),
            std::string::npos);
  // Token 3 (at position 2) becomes 300 >= vocab 260.
  const std::string message = error_after([](std::string& b) {
    b[32 + 4] = static_cast<char>(300 & 0xff);
    b[32 + 5] = static_cast<char>(300 >> 8);
  });
  EXPECT_NE(message.find("token 300 at position 2"), std::string::npos) << message;
}

// A small fuzz: random byte edits and truncations either read back valid tokens or raise runtime_error.
TEST_F(ShardTest, RandomDamageNeverCrashes) {
  const std::string file = path("fuzz.bin");
  llm::data::write_token_shard(file, {1, 2, 3, 4, 5, 6, 7, 8}, 300);
  const std::string original = read_bytes(file);
  std::mt19937 rng(1);
  int rejected = 0;
  for (int trial = 0; trial < 300; ++trial) {
    std::string bytes = original;
    for (int edits = 1 + rng() % 3; edits > 0; --edits)
      bytes[rng() % bytes.size()] = static_cast<char>(rng());
    if (rng() % 4 == 0) bytes.resize(rng() % bytes.size());
    write_bytes(file, bytes);
    try {
      const llm::data::TokenShard shard = llm::data::read_token_shard(file);
      for (const int32_t token : shard.tokens) EXPECT_LT(static_cast<uint32_t>(token), shard.vocab_size);
    } catch (const std::runtime_error&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 100);
}

TEST_F(ShardTest, MissingFileIsNamed) {
  try {
    llm::data::read_token_shard(path("missing.bin"));
    FAIL() << "expected an error";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("missing.bin"), std::string::npos) << error.what();
  }
}

}  // namespace
