// Reading and writing the safetensors format (Hugging Face's tensor files), single files and sharded
// folders.
//
// File layout:
//   u64 N              little-endian length of the header
//   header             N bytes of UTF-8 JSON: {"__metadata__": {"k": "v", ...},
//                        "<tensor name>": {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [b, e]},
//                        ...}
//                      (the writer pads it with spaces so that the data starts 8-byte aligned)
//   data               the tensors' bytes, row-major little-endian; tensor t occupies data[b, e)
//
// Files are untrusted. Opening validates everything before any tensor is read: the header length
// against the file size, the header as a JSON object of well-formed entries, every dtype known, the byte
// count of each tensor equal to numel x the dtype's size, every range inside the data section, and the
// ranges tiling the data section exactly (no overlap, no hole, no trailing bytes). A failed check throws
// SafetensorsError naming the file and the tensor. Nothing is read out of bounds.
//
// A sharded checkpoint is a folder with model.safetensors.index.json ({"weight_map": {name: file}})
// and the shard files it names; SafetensorsFolder opens either that or a single model.safetensors.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace llm {

class SafetensorsError : public std::runtime_error {
 public:
  explicit SafetensorsError(const std::string& message) : std::runtime_error(message) {}
};

// The dtypes of the format. All of them can be read (converted to floating point); the writer produces
// F32, F16 and BF16.
enum class SafeDType {
  kBool,
  kU8,
  kI8,
  kF8E5M2,
  kF8E4M3,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64
};
const char* safe_dtype_name(SafeDType dtype);
size_t safe_dtype_size(SafeDType dtype);
// Parses "F32", "BF16", ...; false for anything else.
bool safe_dtype_from_name(const std::string& name, SafeDType* dtype);
// "F32, F16, BF16, ..." for error messages.
std::string safe_dtype_list();

struct SafetensorsTensor {
  std::string name;
  SafeDType dtype = SafeDType::kF32;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  uint64_t begin = 0, end = 0;  // byte range inside the data section
};

// One safetensors file, memory-mapped (or held in memory), validated on open.
class SafetensorsFile {
 public:
  // Maps and validates `path`. Throws SafetensorsError.
  explicit SafetensorsFile(const std::string& path);
  // Validates an in-memory copy of a file (for tests and fuzzing); `origin` names it in messages.
  static SafetensorsFile from_bytes(const std::string& origin, std::vector<uint8_t> bytes);

  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  // Tensors in the order of their data offsets.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  // The tensor called `name`, or nullptr.
  const SafetensorsTensor* find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Converts tensor `name` to T (float or double) into out[0, count); count must equal its numel.
  // Throws SafetensorsError naming the file and tensor when it is missing or the count differs.
  template <typename T>
  void read(const std::string& name, T* out, size_t count) const;
  std::vector<float> read_floats(const std::string& name) const;
  // The raw little-endian bytes of a tensor (end - begin of them).
  const uint8_t* raw(const SafetensorsTensor& tensor) const { return data_ + tensor.begin; }

 private:
  SafetensorsFile() = default;
  void parse(const uint8_t* bytes, size_t size);
  void release();

  std::string path_;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  const uint8_t* data_ = nullptr;  // start of the data section
  void* map_ = nullptr;            // mmap'ed region (or nullptr)
  size_t map_size_ = 0;
  std::vector<uint8_t> owned_;  // in-memory copy (from_bytes)
};

// Converts `count` values of `dtype` from little-endian bytes to T.
template <typename T>
void convert_from_safe_dtype(T* out, const uint8_t* bytes, SafeDType dtype, size_t count);
// IEEE half and bfloat16 conversions (round to nearest even on the way down).
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
float bf16_to_float(uint16_t b);
uint16_t float_to_bf16(float f);

// The tensors of a Hugging Face model folder: a single model.safetensors, or the shards listed in
// model.safetensors.index.json. Each name maps to one tensor in one file.
class SafetensorsFolder {
 public:
  explicit SafetensorsFolder(const std::string& dir);

  const std::string& dir() const { return dir_; }
  // All tensor names, sorted.
  std::vector<std::string> names() const;
  // The tensor called `name` and the file that holds it, or nullptr.
  const SafetensorsTensor* find(const std::string& name, const SafetensorsFile** file = nullptr) const;
  template <typename T>
  void read(const std::string& name, T* out, size_t count) const;
  const std::vector<SafetensorsFile>& files() const { return files_; }

 private:
  std::string dir_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> where_;  // name -> index into files_
};

// One tensor to write: data in float (converted to the file's dtype on write).
struct SafetensorsWriteTensor {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;  // numel values
};

// Writes one file with every tensor in `dtype` (F32, F16 or BF16), data in the given order, header
// padded with spaces to a multiple of 8 bytes, "__metadata__" = {"format": "pt"} plus `metadata`.
// Written to a temporary file and renamed. Throws SafetensorsError.
void write_safetensors(const std::string& path, const std::vector<SafetensorsWriteTensor>& tensors,
                       SafeDType dtype, const std::map<std::string, std::string>& metadata = {});

// Writes `tensors` into `dir` as model.safetensors when their bytes fit in max_shard_bytes, else as
// model-0000i-of-0000n.safetensors shards (tensors in order, a new shard whenever the next tensor would
// overflow the current one; a tensor larger than the limit gets a shard of its own) plus
// model.safetensors.index.json. Returns the file names written.
std::vector<std::string> write_safetensors_folder(const std::string& dir,
                                                  const std::vector<SafetensorsWriteTensor>& tensors,
                                                  SafeDType dtype, uint64_t max_shard_bytes);

}  // namespace llm
