#include "train/checkpoint.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "data/atomic_file.h"

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

}  // namespace

// Streamed to the file piece by piece (header, each array, checksum), so that saving holds no second copy
// of the parameters and optimizer state in memory.
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
  std::string start(kMagic, sizeof(kMagic));
  append_u64(start, header_text.size());
  AtomicFile<CheckpointError> file(path);
  file.write(start.data(), start.size());
  file.write(header_text.data(), header_text.size());
  uint64_t hash = fnv1a(header_text.data(), header_text.size());
  for (const auto& a : checkpoint.arrays) {
    const char* bytes = reinterpret_cast<const char*>(a.data.data());
    const size_t size = a.data.size() * sizeof(float);
    file.write(bytes, size);
    hash = fnv1a(bytes, size, hash);
  }
  std::string checksum;
  append_u64(checksum, hash);
  file.write(checksum.data(), checksum.size());
  file.commit();
}

// Reads the file in order (start, header, each array, checksum), keeping only the arrays asked for: the
// file is never held in memory whole. Sizes are checked against the file's size before anything is
// allocated, and an array's header fields only after the checksum has been verified, so a damaged file
// reads as corrupted whichever byte was hit.
Checkpoint read_checkpoint(const std::string& path, bool load_optimizer) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError("cannot open checkpoint " + path);
  auto fail = [&path](const std::string& why) { return CheckpointError("checkpoint " + path + ": " + why); };
  in.seekg(0, std::ios::end);
  const std::streamoff end = in.tellg();
  if (end < 0) throw fail("cannot read its size");
  const uint64_t file_size = static_cast<uint64_t>(end);
  in.seekg(0, std::ios::beg);
  auto read_exactly = [&](char* out, uint64_t size) {
    if (!in.read(out, static_cast<std::streamsize>(size)))
      throw fail("read error (was the file changed while it was read?)");
  };

  // A file shorter than the magic is truncated when what there is of it matches.
  char start[16] = {};
  const uint64_t start_bytes = std::min<uint64_t>(file_size, sizeof(start));
  read_exactly(start, start_bytes);
  if (std::memcmp(start, kMagic, std::min<uint64_t>(start_bytes, sizeof(kMagic))) != 0) {
    throw fail("corrupted, or not a checkpoint of this trainer (bad magic)");
  }
  if (file_size < 24) {
    throw fail("truncated: " + std::to_string(file_size) + " bytes, less than the 24 of an empty checkpoint");
  }
  const uint64_t header_bytes = read_u64(start + 8);
  if (header_bytes > file_size - 24) {
    throw fail("truncated or corrupted: the header claims " + std::to_string(header_bytes) +
               " bytes but the file has " + std::to_string(file_size));
  }
  std::string header_text(header_bytes, '\0');
  read_exactly(header_text.data(), header_bytes);
  uint64_t hash = fnv1a(header_text.data(), header_text.size());
  json header = json::parse(header_text, nullptr, false);
  if (header.is_discarded() || !header.is_object() || !header.contains("arrays") ||
      !header["arrays"].is_array() || !header.contains("meta")) {
    throw fail("corrupted header");
  }
  uint64_t data_bytes = 0;
  for (const auto& a : header["arrays"]) {
    if (!a.is_object() || !a.contains("count") || !a["count"].is_number_unsigned())
      throw fail("corrupted header");
    // Bounded by the file size before multiplying or adding, so a crafted count cannot wrap around.
    const uint64_t count = a["count"].get<uint64_t>();
    if (count > file_size / sizeof(float) || data_bytes + count * sizeof(float) > file_size) {
      throw fail("truncated or corrupted: the header describes more data than the file's " +
                 std::to_string(file_size) + " bytes");
    }
    data_bytes += count * sizeof(float);
  }
  const uint64_t expected = 16 + header_bytes + data_bytes + 8;
  if (file_size < expected) {
    throw fail("truncated or corrupted: the header describes " + std::to_string(expected) +
               " bytes, the file has " + std::to_string(file_size));
  }
  if (file_size > expected) {
    throw fail("corrupted: " + std::to_string(file_size - expected) + " bytes after the end (expected " +
               std::to_string(expected) + " bytes, found " + std::to_string(file_size) + ")");
  }

  Checkpoint checkpoint;
  checkpoint.meta = header["meta"];
  std::string field_problem;  // the first bad array entry, reported once the checksum holds
  std::vector<char> skipped;  // a chunk of an array that is not kept, read for the checksum
  uint64_t expected_offset = 0;
  for (const auto& a : header["arrays"]) {
    CheckpointArray array;
    if (field_problem.empty()) {
      try {
        array.name = a.at("name").get<std::string>();
        array.kind = a.at("kind").get<std::string>();
        array.shape = a.at("shape").get<std::vector<int64_t>>();
        if (a.at("offset").get<uint64_t>() != expected_offset)
          field_problem = "corrupted header: array " + array.name + " is misplaced";
      } catch (const json::exception&) {
        field_problem = "corrupted header";
      }
    }
    const uint64_t count = a["count"].get<uint64_t>();
    const uint64_t bytes = count * sizeof(float);
    if (field_problem.empty() && (array.kind == "param" || load_optimizer)) {
      array.data.resize(count);
      read_exactly(reinterpret_cast<char*>(array.data.data()), bytes);
      hash = fnv1a(reinterpret_cast<const char*>(array.data.data()), bytes, hash);
      checkpoint.arrays.push_back(std::move(array));
    } else {
      skipped.resize(static_cast<size_t>(std::min<uint64_t>(bytes, uint64_t{1} << 22)));
      for (uint64_t done = 0; done < bytes;) {
        const uint64_t n = std::min<uint64_t>(skipped.size(), bytes - done);
        read_exactly(skipped.data(), n);
        hash = fnv1a(skipped.data(), n, hash);
        done += n;
      }
    }
    expected_offset += bytes;
  }
  char stored[8];
  read_exactly(stored, sizeof(stored));
  if (read_u64(stored) != hash) throw fail("corrupted: checksum mismatch");
  if (!field_problem.empty()) throw fail(field_problem);
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
