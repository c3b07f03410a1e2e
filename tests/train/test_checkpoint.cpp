// Checkpoint files: the round trip is bit-exact, and every damaged file (cut short, a byte flipped, the
// wrong magic, bytes appended, a crafted header) is refused with a CheckpointError that names the file,
// never half-loaded and never read out of bounds. Writes are atomic: a failed write leaves the previous
// checkpoint as it was and no temporary file behind.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "train/checkpoint.h"

namespace {

namespace fs = std::filesystem;
using llm::Checkpoint;
using llm::CheckpointError;
using llm::json;

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "llm_ckpt_XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  static std::string read_bytes(const std::string& file) {
    std::ifstream in(file, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
  static void write_bytes(const std::string& file, const std::string& bytes) {
    // A new file rather than a truncated one: ext4 flushes files that are truncated and rewritten on
    // close, which makes the byte-by-byte loops below slow.
    fs::remove(file);
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }

  // Expects read_checkpoint(file) to throw a CheckpointError naming the file and containing `word`.
  static void expect_refused(const std::string& file, const std::string& word, const std::string& what) {
    try {
      llm::read_checkpoint(file);
      ADD_FAILURE() << what << ": the damaged checkpoint was accepted";
    } catch (const CheckpointError& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find(file), std::string::npos)
          << what << ": message does not name the file: " << message;
      EXPECT_NE(message.find(word), std::string::npos)
          << what << ": message does not say " << word << ": " << message;
    } catch (const std::exception& e) {
      ADD_FAILURE() << what << ": expected a CheckpointError, got: " << e.what();
    }
  }

  fs::path dir_;
};

// Values whose bit patterns a lossy path would change: signed zero, a subnormal, infinities, a NaN
// with a payload, and ordinary numbers.
std::vector<float> tricky_values(size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * (static_cast<float>(i) - 0.37f * static_cast<float>(n));
  if (n >= 6) {
    v[0] = -0.0f;
    v[1] = std::numeric_limits<float>::denorm_min();
    v[2] = std::numeric_limits<float>::infinity();
    v[3] = -std::numeric_limits<float>::infinity();
    uint32_t nan_bits = 0x7fc01234u;
    std::memcpy(&v[4], &nan_bits, sizeof(float));
    v[5] = 1.0f / 3.0f;
  }
  return v;
}

Checkpoint sample_checkpoint() {
  Checkpoint ck;
  ck.meta = {{"format", "llm checkpoint v1"},
             {"step", 1234},
             {"best_val_loss", 2.5},
             {"data_state", {{"batches", 7}, {"streams", json::array({{{"next", 3}, {"epoch", 0}}})}}},
             {"note", "unicode \xc3\xa9 and \"quotes\""}};
  ck.arrays.push_back({"tok_emb.weight", "param", {4, 6}, tricky_values(24, 0.01f)});
  ck.arrays.push_back({"layers.0.norm1.weight", "param", {6}, tricky_values(6, 1.0f)});
  ck.arrays.push_back({"empty", "param", {0}, {}});
  ck.arrays.push_back({"adamw.m.0", "optimizer", {}, tricky_values(24, 1e-3f)});
  ck.arrays.push_back({"adamw.v.0", "optimizer", {}, tricky_values(24, 1e-6f)});
  return ck;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

void expect_same(const llm::CheckpointArray& a, const llm::CheckpointArray& b) {
  EXPECT_EQ(a.name, b.name);
  EXPECT_EQ(a.kind, b.kind);
  EXPECT_EQ(a.shape, b.shape);
  EXPECT_TRUE(same_bits(a.data, b.data)) << "array " << a.name << " is not bit-exact";
}

// The 64-bit FNV-1a hash the format's checksum uses (train/checkpoint.h), to craft files whose checksum
// is right but whose header lies.
uint64_t fnv1a64(const std::string& bytes, size_t begin, size_t end) {
  uint64_t h = 14695981039346656037ull;
  for (size_t i = begin; i < end; ++i) {
    h ^= static_cast<unsigned char>(bytes[i]);
    h *= 1099511628211ull;
  }
  return h;
}

std::string u64_le(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file with the given header text and data, and a correct checksum.
std::string assemble(const std::string& header, const std::string& data) {
  std::string out = "LLMCKPT1" + u64_le(header.size()) + header + data;
  return out + u64_le(fnv1a64(out, 16, out.size()));
}

uint64_t header_size(const std::string& bytes) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(bytes[8 + i]);
  return v;
}

TEST_F(CheckpointTest, ChecksumIsFnv1a64) {
  // Known answers of FNV-1a 64 (the published test vectors), then the checksum of a written file.
  EXPECT_EQ(fnv1a64("", 0, 0), 0xcbf29ce484222325ull);
  EXPECT_EQ(fnv1a64("a", 0, 1), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(fnv1a64("foobar", 0, 6), 0x85944171f73967e8ull);
  const std::string file = path("a.ckpt");
  llm::write_checkpoint(file, sample_checkpoint());
  const std::string bytes = read_bytes(file);
  EXPECT_EQ(bytes.substr(0, 8), "LLMCKPT1");
  EXPECT_EQ(bytes.substr(bytes.size() - 8), u64_le(fnv1a64(bytes, 16, bytes.size() - 8)));
}

TEST_F(CheckpointTest, RoundTripIsBitExact) {
  const Checkpoint ck = sample_checkpoint();
  const std::string file = path("a.ckpt");
  llm::write_checkpoint(file, ck);
  const Checkpoint back = llm::read_checkpoint(file);
  EXPECT_EQ(back.meta, ck.meta);
  ASSERT_EQ(back.arrays.size(), ck.arrays.size());
  for (size_t i = 0; i < ck.arrays.size(); ++i) expect_same(back.arrays[i], ck.arrays[i]);
  // Writing what was read gives the same bytes.
  llm::write_checkpoint(path("b.ckpt"), back);
  EXPECT_EQ(read_bytes(path("b.ckpt")), read_bytes(file));
}

TEST_F(CheckpointTest, WithoutOptimizerDropsOptimizerArrays) {
  const Checkpoint ck = sample_checkpoint();
  const std::string file = path("a.ckpt");
  llm::write_checkpoint(file, ck);
  const Checkpoint back = llm::read_checkpoint(file, /*load_optimizer=*/false);
  EXPECT_EQ(back.meta, ck.meta);
  ASSERT_EQ(back.arrays.size(), 3u);
  for (size_t i = 0; i < 3; ++i) expect_same(back.arrays[i], ck.arrays[i]);
  // The optimizer arrays are still verified: a flipped byte in the last one is refused.
  std::string bytes = read_bytes(file);
  bytes[bytes.size() - 9] ^= 0x01;
  write_bytes(file, bytes);
  EXPECT_THROW(llm::read_checkpoint(file, false), CheckpointError);
}

TEST_F(CheckpointTest, MissingFileIsAnError) {
  const std::string file = path("nope.ckpt");
  try {
    llm::read_checkpoint(file);
    FAIL() << "a missing file was accepted";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
  }
}

TEST_F(CheckpointTest, TruncatedFilesAreRefused) {
  const std::string good = path("good.ckpt");
  llm::write_checkpoint(good, sample_checkpoint());
  const std::string bytes = read_bytes(good);
  const size_t H = header_size(bytes);
  const size_t data_begin = 16 + H;
  ASSERT_GT(bytes.size(), data_begin + 8 + 64);
  const std::vector<std::pair<size_t, std::string>> cuts = {
      {0, "empty file"},
      {3, "inside the magic"},
      {8, "after the magic"},
      {12, "inside the header length"},
      {16, "before the header"},
      {16 + H / 2, "inside the header"},
      {data_begin - 1, "one byte short of the header"},
      {data_begin, "at the end of the header"},
      {data_begin + 1, "one byte into the data"},
      {data_begin + 50, "inside the data"},
      {bytes.size() - 9, "one byte short of the data"},
      {bytes.size() - 8, "before the checksum"},
      {bytes.size() - 3, "inside the checksum"},
      {bytes.size() - 1, "one byte short"},
  };
  const std::string file = path("cut.ckpt");
  for (const auto& [size, where] : cuts) {
    write_bytes(file, bytes.substr(0, size));
    expect_refused(file, "truncated", "cut " + where + " (" + std::to_string(size) + " bytes)");
  }
}

TEST_F(CheckpointTest, FlippedDataOrChecksumByteIsCorrupted) {
  const std::string good = path("good.ckpt");
  llm::write_checkpoint(good, sample_checkpoint());
  const std::string bytes = read_bytes(good);
  const size_t data_begin = 16 + header_size(bytes);
  const std::string file = path("flip.ckpt");
  // Every byte of the data and the checksum, one at a time.
  for (size_t i = data_begin; i < bytes.size(); ++i) {
    std::string damaged = bytes;
    damaged[i] ^= 0x10;
    write_bytes(file, damaged);
    expect_refused(file, "corrupted", "byte " + std::to_string(i) + " flipped");
    if (HasFailure()) break;
  }
}

TEST_F(CheckpointTest, FlippedHeaderByteIsCorrupted) {
  const std::string good = path("good.ckpt");
  llm::write_checkpoint(good, sample_checkpoint());
  const std::string bytes = read_bytes(good);
  const size_t data_begin = 16 + header_size(bytes);
  const std::string file = path("flip.ckpt");
  // Every byte of the header length and the header text, one at a time, with two different flips
  // (a digit can change into another digit, or into something that is not JSON).
  for (unsigned char mask : {0x01, 0x40}) {
    for (size_t i = 8; i < data_begin; ++i) {
      std::string damaged = bytes;
      damaged[i] ^= static_cast<char>(mask);
      write_bytes(file, damaged);
      expect_refused(file, "corrupted", "header byte " + std::to_string(i) + " xor " + std::to_string(mask));
      if (HasFailure()) return;
    }
  }
}

TEST_F(CheckpointTest, WrongMagicIsRefused) {
  const std::string good = path("good.ckpt");
  llm::write_checkpoint(good, sample_checkpoint());
  std::string bytes = read_bytes(good);
  const std::string file = path("magic.ckpt");
  for (size_t i = 0; i < 8; ++i) {
    std::string damaged = bytes;
    damaged[i] ^= 0x20;
    write_bytes(file, damaged);
    expect_refused(file, "magic", "magic byte " + std::to_string(i));
  }
  // Another format altogether (a safetensors-like file: length then JSON).
  write_bytes(file, u64_le(20) + "{\"a\": {\"dtype\": 1}}" + std::string(64, '\0'));
  expect_refused(file, "magic", "another format");
}

TEST_F(CheckpointTest, TrailingBytesAreRefused) {
  const std::string good = path("good.ckpt");
  llm::write_checkpoint(good, sample_checkpoint());
  const std::string bytes = read_bytes(good);
  const std::string file = path("trailing.ckpt");
  for (const std::string& extra : {std::string(1, '\0'), std::string("\n"), std::string(4096, 'x')}) {
    write_bytes(file, bytes + extra);
    expect_refused(file, "corrupted", std::to_string(extra.size()) + " trailing bytes");
  }
  // Two checkpoints back to back.
  write_bytes(file, bytes + bytes);
  expect_refused(file, "corrupted", "a file written twice");
}

TEST_F(CheckpointTest, LyingHeaderWithValidChecksumIsRefused) {
  // Headers that pass the checksum (as a crafted file would) but describe impossible arrays: the reader
  // must refuse them before allocating or reading anything.
  const std::string file = path("crafted.ckpt");
  const std::string two_floats(8, '\0');
  struct Case {
    std::string header, data, what;
  };
  const std::vector<Case> cases = {
      // 2^62 floats: the byte count 2^64 wraps to 0 in 64-bit arithmetic.
      {R"({"meta":{},"arrays":[{"name":"a","kind":"param","shape":[1],"offset":0,"count":4611686018427387904}]})",
       "", "a count whose byte size wraps to 0"},
      // Two arrays whose byte sizes add up to 2^64 + 8.
      {R"({"meta":{},"arrays":[{"name":"a","kind":"param","shape":[1],"offset":0,"count":2305843009213693953},)"
       R"({"name":"b","kind":"param","shape":[1],"offset":9223372036854775812,"count":2305843009213693953}]})",
       two_floats, "counts whose sum wraps"},
      {R"({"meta":{},"arrays":[{"name":"a","kind":"param","shape":[1],"offset":0,"count":-1}]})", two_floats,
       "a negative count"},
      {R"({"meta":{},"arrays":[{"name":"a","kind":"param","shape":[2],"offset":4,"count":2}]})", two_floats,
       "a misplaced array"},
      {R"({"meta":{},"arrays":[{"name":"a","kind":"param","shape":"x","offset":0,"count":2}]})", two_floats,
       "a shape that is not a list"},
      {R"({"meta":{},"arrays":[{"kind":"param","shape":[2],"offset":0,"count":2}]})", two_floats,
       "an array without a name"},
      {R"({"arrays":[]})", "", "no meta"},
      {R"([1, 2])", "", "a header that is not an object"},
  };
  for (const auto& c : cases) {
    write_bytes(file, assemble(c.header, c.data));
    expect_refused(file, "corrupted", c.what);
  }
  // The same construction with a truthful header is accepted (the crafting itself is right).
  write_bytes(
      file,
      assemble(R"({"meta":{"x":1},"arrays":[{"name":"a","kind":"param","shape":[2],"offset":0,"count":2}]})",
               two_floats));
  const Checkpoint ck = llm::read_checkpoint(file);
  ASSERT_EQ(ck.arrays.size(), 1u);
  EXPECT_EQ(ck.arrays[0].data, std::vector<float>({0.0f, 0.0f}));
}

std::vector<std::string> folder_listing(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

TEST_F(CheckpointTest, AtomicWriteLeavesNoTemporaryFile) {
  const std::string file = path("latest.ckpt");
  llm::write_checkpoint(file, sample_checkpoint());
  EXPECT_EQ(folder_listing(dir_), std::vector<std::string>({"latest.ckpt"}));
  // Replacing an existing checkpoint.
  Checkpoint second = sample_checkpoint();
  second.meta["step"] = 2000;
  llm::write_checkpoint(file, second);
  EXPECT_EQ(folder_listing(dir_), std::vector<std::string>({"latest.ckpt"}));
  EXPECT_EQ(llm::read_checkpoint(file).meta["step"], 2000);
}

TEST_F(CheckpointTest, FailedWriteKeepsThePreviousCheckpoint) {
  const std::string file = path("latest.ckpt");
  llm::write_checkpoint(file, sample_checkpoint());
  const std::string before = read_bytes(file);
  Checkpoint next = sample_checkpoint();
  next.meta["step"] = 9999;

  // 1. The temporary file cannot be created (its name is taken by a folder).
  const fs::path blocker = file + ".tmp." + std::to_string(::getpid());
  fs::create_directory(blocker);
  try {
    llm::write_checkpoint(file, next);
    ADD_FAILURE() << "the write succeeded although its temporary file could not be created";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
  }
  fs::remove(blocker);
  EXPECT_EQ(read_bytes(file), before);
  EXPECT_EQ(folder_listing(dir_), std::vector<std::string>({"latest.ckpt"}));

  // 2. The write fails half-way (the file size limit stands in for a full disk).
  next.arrays.push_back({"big", "param", {1 << 16}, std::vector<float>(1 << 16, 1.5f)});
  struct rlimit old_limit {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = old_limit;
  small.rlim_cur = 64 * 1024;  // the new checkpoint is over 256 KB
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  bool threw = false;
  std::string message;
  try {
    llm::write_checkpoint(file, next);
  } catch (const CheckpointError& e) {
    threw = true;
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_TRUE(threw) << "a write past the file size limit did not fail";
  EXPECT_NE(message.find(file), std::string::npos) << message;
  EXPECT_EQ(read_bytes(file), before);
  EXPECT_EQ(folder_listing(dir_), std::vector<std::string>({"latest.ckpt"}));
  EXPECT_EQ(llm::read_checkpoint(file).meta["step"], 1234);

  // 3. The folder does not exist: an error naming the path, and nothing is created.
  const std::string missing = path("no/such/folder/latest.ckpt");
  try {
    llm::write_checkpoint(missing, next);
    ADD_FAILURE() << "a write into a missing folder succeeded";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir_ / "no"));
  EXPECT_EQ(read_bytes(file), before);
}

}  // namespace

// A LoRA checkpoint (frozen_base in its header) is not a whole model: the hint names the ./merge_lora
// command for the adapters saved beside it, with --nf4 for QLoRA; other checkpoints get no hint.
TEST(LoraCheckpointHint, NamesTheMergeCommand) {
  llm::json meta;
  EXPECT_EQ(llm::lora_checkpoint_hint("out/best.ckpt", meta), "");
  meta["frozen_base"] = {{"source", "models/qwen"}, {"nf4", false}, {"double_quant", false}};
  const std::string lora = llm::lora_checkpoint_hint("out/best.ckpt", meta);
  EXPECT_NE(lora.find("./merge_lora --base models/qwen --adapter out/best_lora_adapters --out DIR"),
            std::string::npos)
      << lora;
  EXPECT_EQ(lora.find("--nf4"), std::string::npos) << lora;
  meta["frozen_base"]["nf4"] = true;
  const std::string qlora = llm::lora_checkpoint_hint("out/latest.ckpt", meta);
  EXPECT_NE(qlora.find("--adapter out/final_lora_adapters --out DIR --nf4 --no-double-quant"),
            std::string::npos)
      << qlora;
  meta["frozen_base"]["source"] = "runs/pretrain/best.ckpt";  // our checkpoint: converted first
  const std::string from_checkpoint = llm::lora_checkpoint_hint("out/latest.ckpt", meta);
  EXPECT_NE(from_checkpoint.find("./convert --ckpt-in runs/pretrain/best.ckpt --hf-out BASE_DIR, then "
                                 "./merge_lora --base BASE_DIR"),
            std::string::npos)
      << from_checkpoint;
  meta["frozen_base"]["double_quant"] = true;
  EXPECT_NE(
      llm::lora_checkpoint_hint("latest.ckpt", meta).find("--adapter final_lora_adapters --out DIR --nf4"),
      std::string::npos);
}
