#include "train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace llm {

namespace {

constexpr char kMagic[8] = {'L', 'L', 'M', 'C', 'K', 'P', 'T', '1'};

// FNV-1a 64: offset basis 0xcbf29ce484222325, prime 0x100000001b3.
uint64_t fnv1a(const char* data, size_t size, uint64_t hash = 14695981039346656037ull) {
  for (size_t i = 0; i < size; ++i) {
    hash ^= static_cast<unsigned char>(data[i]);
    hash *= 1099511628211ull;
  }
  return hash;
}

void append_u64(std::string& out, uint64_t value) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

uint64_t read_u64(const char* p) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | static_cast<unsigned char>(p[i]);
  return value;
}

std::string folder_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
}

}  // namespace

void write_file_atomic(const std::string& path, const std::string& contents) {
  const std::string temp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw CheckpointError("cannot create " + temp + ": " + std::strerror(errno));
  size_t written = 0;
  while (written < contents.size()) {
    const ssize_t n = ::write(fd, contents.data() + written, contents.size() - written);
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string reason = std::strerror(errno);
      ::close(fd);
      ::unlink(temp.c_str());
      throw CheckpointError("cannot write " + temp + ": " + reason);
    }
    written += static_cast<size_t>(n);
  }
  // Close even when fsync fails, so the descriptor is not leaked.
  const bool synced = ::fsync(fd) == 0;
  const int sync_errno = errno;
  const bool closed = ::close(fd) == 0;
  if (!synced || !closed) {
    const std::string reason = std::strerror(synced ? errno : sync_errno);
    ::unlink(temp.c_str());
    throw CheckpointError("cannot flush " + temp + ": " + reason);
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    ::unlink(temp.c_str());
    throw CheckpointError("cannot rename " + temp + " to " + path + ": " + reason);
  }
  // Make the rename itself durable.
  const int dir = ::open(folder_of(path).c_str(), O_RDONLY);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

void write_checkpoint(const std::string& path, const Checkpoint& checkpoint) {
  json header;
  header["meta"] = checkpoint.meta;
  header["arrays"] = json::array();
  uint64_t offset = 0;
  for (const auto& a : checkpoint.arrays) {
    header["arrays"].push_back({{"name", a.name},
                                {"kind", a.kind},
                                {"shape", a.shape},
                                {"offset", offset},
                                {"count", a.data.size()}});
    offset += a.data.size() * sizeof(float);
  }
  const std::string header_text = header.dump();
  std::string out;
  out.reserve(24 + header_text.size() + offset);
  out.append(kMagic, sizeof(kMagic));
  append_u64(out, header_text.size());
  out += header_text;
  for (const auto& a : checkpoint.arrays) {
    out.append(reinterpret_cast<const char*>(a.data.data()), a.data.size() * sizeof(float));
  }
  append_u64(out, fnv1a(out.data() + 16, out.size() - 16));
  write_file_atomic(path, out);
}

Checkpoint read_checkpoint(const std::string& path, bool load_optimizer) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError("cannot open checkpoint " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string bytes = buffer.str();
  auto fail = [&path](const std::string& why) { return CheckpointError("checkpoint " + path + ": " + why); };

  // A file shorter than the magic is truncated when what there is of it matches.
  if (std::memcmp(bytes.data(), kMagic, std::min(bytes.size(), sizeof(kMagic))) != 0) {
    throw fail("corrupted, or not a checkpoint of this trainer (bad magic)");
  }
  if (bytes.size() < 24) {
    throw fail("truncated: " + std::to_string(bytes.size()) +
               " bytes, less than the 24 of an empty checkpoint");
  }
  const uint64_t header_bytes = read_u64(bytes.data() + 8);
  if (header_bytes > bytes.size() - 24) {
    throw fail("truncated or corrupted: the header claims " + std::to_string(header_bytes) +
               " bytes but the file has " + std::to_string(bytes.size()));
  }
  json header = json::parse(bytes.begin() + 16,
                            bytes.begin() + 16 + static_cast<std::ptrdiff_t>(header_bytes), nullptr, false);
  if (header.is_discarded() || !header.is_object() || !header.contains("arrays") ||
      !header["arrays"].is_array() || !header.contains("meta")) {
    throw fail("corrupted header");
  }
  const size_t data_begin = 16 + header_bytes;
  uint64_t data_bytes = 0;
  for (const auto& a : header["arrays"]) {
    if (!a.is_object() || !a.contains("count") || !a["count"].is_number_unsigned())
      throw fail("corrupted header");
    // Bounded by the file size before multiplying or adding, so a crafted count cannot wrap around.
    const uint64_t count = a["count"].get<uint64_t>();
    if (count > bytes.size() / sizeof(float) || data_bytes + count * sizeof(float) > bytes.size()) {
      throw fail("truncated or corrupted: the header describes more data than the file's " +
                 std::to_string(bytes.size()) + " bytes");
    }
    data_bytes += count * sizeof(float);
  }
  const uint64_t expected = data_begin + data_bytes + 8;
  if (bytes.size() < expected) {
    throw fail("truncated or corrupted: the header describes " + std::to_string(expected) +
               " bytes, the file has " + std::to_string(bytes.size()));
  }
  if (bytes.size() > expected) {
    throw fail("corrupted: " + std::to_string(bytes.size() - expected) + " bytes after the end (expected " +
               std::to_string(expected) + " bytes, found " + std::to_string(bytes.size()) + ")");
  }
  const uint64_t stored = read_u64(bytes.data() + bytes.size() - 8);
  if (stored != fnv1a(bytes.data() + 16, bytes.size() - 24)) throw fail("corrupted: checksum mismatch");

  Checkpoint checkpoint;
  checkpoint.meta = header["meta"];
  uint64_t expected_offset = 0;
  for (const auto& a : header["arrays"]) {
    CheckpointArray array;
    try {
      array.name = a.at("name").get<std::string>();
      array.kind = a.at("kind").get<std::string>();
      array.shape = a.at("shape").get<std::vector<int64_t>>();
      if (a.at("offset").get<uint64_t>() != expected_offset)
        throw fail("corrupted header: array " + array.name + " is misplaced");
    } catch (const json::exception&) {
      throw fail("corrupted header");
    }
    const uint64_t count = a["count"].get<uint64_t>();
    if (array.kind == "param" || load_optimizer) {
      array.data.resize(count);
      std::memcpy(array.data.data(), bytes.data() + data_begin + expected_offset, count * sizeof(float));
      checkpoint.arrays.push_back(std::move(array));
    }
    expected_offset += count * sizeof(float);
  }
  return checkpoint;
}

std::string lora_checkpoint_hint(const std::string& path, const json& meta) {
  if (!meta.contains("frozen_base") || !meta["frozen_base"].is_object()) return "";
  const json& base = meta["frozen_base"];
  const std::string source =
      base.contains("source") && base["source"].is_string() ? base["source"].get<std::string>() : "BASE";
  const bool nf4 = base.contains("nf4") && base["nf4"] == true;
  const bool double_quant = base.contains("double_quant") && base["double_quant"] == true;
  const std::string dir = std::filesystem::path(path).parent_path().string();
  const bool best = std::filesystem::path(path).filename() == "best.ckpt";
  const std::string adapter =
      (dir.empty() ? "" : dir + "/") + (best ? "best_lora_adapters" : "final_lora_adapters");
  // ./merge_lora takes a Hugging Face folder: a base that is one of our checkpoints is converted first.
  const bool base_is_checkpoint = source.size() >= 5 && source.compare(source.size() - 5, 5, ".ckpt") == 0;
  const std::string convert =
      base_is_checkpoint ? "./convert --ckpt-in " + source + " --hf-out BASE_DIR, then " : std::string();
  const std::string merge_base = base_is_checkpoint ? std::string("BASE_DIR") : source;
  return "a LoRA checkpoint, which holds the adapters only; merge the PEFT adapters saved beside it: " +
         convert + "./merge_lora --base " + merge_base + " --adapter " + adapter + " --out DIR" +
         (nf4 ? (double_quant ? " --nf4" : " --nf4 --no-double-quant") : "");
}

}  // namespace llm
