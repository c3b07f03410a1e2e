// Checkpoints: the model's parameters, the optimizer state, and a JSON header with everything else a
// resumed run needs (the configs it was made with, the step, the data loader's position, the best
// validation loss so far).
//
// File layout (little-endian):
//   "LLMCKPT1"            8-byte magic
//   u64 header_bytes      length of the JSON header
//   header                {"meta": {...}, "arrays": [{"name", "kind", "shape", "offset", "count"}, ...]}
//   data                  float32 arrays back to back, at the offsets the header gives
//   u64 checksum          FNV-1a 64 over header and data
// The reader checks the magic, every offset and length against the file size, and the checksum, so a
// truncated or corrupted file is refused with a message instead of being half-loaded.
//
// Writes are atomic: a temporary file in the same folder, flushed to disk, then renamed over the
// target. A crash mid-write leaves the previous checkpoint intact.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "llm/json_config.h"

namespace llm {

struct CheckpointArray {
  std::string name;
  std::string kind;  // "param" or "optimizer"
  std::vector<int64_t> shape;
  std::vector<float> data;
};

struct Checkpoint {
  json meta;
  std::vector<CheckpointArray> arrays;
};

// Thrown for an unreadable, truncated or corrupted checkpoint; what() names the file.
class CheckpointError : public std::runtime_error {
 public:
  explicit CheckpointError(const std::string& message) : std::runtime_error(message) {}
};

void write_checkpoint(const std::string& path, const Checkpoint& checkpoint);
// Reads and verifies a checkpoint. With load_optimizer false, "optimizer" arrays are verified but not
// kept.
Checkpoint read_checkpoint(const std::string& path, bool load_optimizer = true);

// For a LoRA checkpoint (its header has frozen_base: it holds the adapters only), what to use instead of
// it as a whole model: the ./merge_lora command for the PEFT adapters saved beside it. "" otherwise.
std::string lora_checkpoint_hint(const std::string& path, const json& meta);

}  // namespace llm
