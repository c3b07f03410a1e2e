// GGUF: export of a (merged) model for llama.cpp and Ollama, and a strict reader of our own.
//
// File layout (GGUF version 3, little-endian):
//   u32 magic "GGUF", u32 version 3, u64 tensor_count, u64 metadata_kv_count
//   metadata:     kv_count times { string key, u32 value_type, value }
//   tensor infos: tensor_count times { string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset }
//   padding to general.alignment (32), then the data section; every tensor offset is relative to the
//   start of that section and a multiple of the alignment.
// A string is { u64 length, bytes } (no terminator); an array is { u32 element_type, u64 count, values }.
// dims are in ggml order: dims[0] is the fastest-varying axis, so a PyTorch weight of shape [out, in]
// is stored with dims {in, out}.
//
// What the writer does, following llama.cpp's convert_hf_to_gguf.py:
//   - maps our (Hugging Face) tensor names to GGUF names (model.layers.N.self_attn.q_proj.weight ->
//     blk.N.attn_q.weight, ...; lm_head.weight -> output.weight, left out when embeddings are tied);
//   - for arch "llama" only, permutes the rows of q_proj and k_proj (weights and biases) from HF's
//     rotate-half RoPE layout to llama.cpp's interleaved one: within each head, GGUF row 2i+j is HF
//     row j*(head_dim/2)+i (j in {0,1}); "qwen2"/"qwen3" use NeoX RoPE in llama.cpp and need none;
//   - picks each tensor's type: 1-D tensors (norms, biases, rope_freqs) stay F32 whatever is asked;
//     2-D tensors get the requested type, except that a Q8_0 request on a tensor whose row length
//     (dims[0]) is not a multiple of 32 falls back to F16;
//   - for rope_scaling "llama3" adds the rope_freqs.weight tensor (head_dim/2 frequency divisors),
//     for "linear" and for YaRN the {arch}.rope.scaling.* keys.
// Conversions are bit-exact with ggml/gguf-py: F16 and BF16 round to nearest even; Q8_0 blocks of 32
// store d = fp16(amax/127) and q = roundf(x * (1/d)) computed in fp32 from the unrounded d.
//
// The reader checks every length, count, offset and type against the file size before using it, so
// a truncated or lying file gets a GgufError naming the file and what was wrong, never an
// out-of-bounds read or a huge allocation.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "llm/config.h"
#include "llm/params.h"

namespace llm {

class GgufError : public std::runtime_error {
 public:
  explicit GgufError(const std::string& message) : std::runtime_error(message) {}
};

// ggml tensor types. The writer produces F32, F16, BF16 and Q8_0; the reader dequantises those four and
// names the others in its errors.
enum class GgufType : uint32_t { kF32 = 0, kF16 = 1, kQ8_0 = 8, kBF16 = 30 };
// "F32", "F16", "Q8_0", "BF16", or the ggml name of any other known type id ("Q4_K", ...); "type N"
// for an unknown id.
std::string gguf_type_name(uint32_t type);
inline std::string gguf_type_name(GgufType type) {
  return gguf_type_name(static_cast<uint32_t>(type));
}
// "f32", "f16", "bf16", "q8_0" (any case). Throws GgufError listing the choices otherwise.
GgufType parse_gguf_type(const std::string& name);
// general.file_type (llama_ftype) for an export in `type`: 0, 1, 32, 7.
uint32_t gguf_file_type(GgufType type);
// Bytes that `n_elements` take in `type` (n_elements a multiple of the block size, 32 for Q8_0).
uint64_t gguf_type_bytes(GgufType type, uint64_t n_elements);

// Metadata value types, with the numbers the format uses.
enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};
const char* gguf_value_type_name(GgufValueType type);

// One metadata value. Scalars hold their value in the member for their kind (integers of any width
// in `integer`, both float widths in `number`); arrays list their elements, which are scalars
// (nested arrays are refused, as by ggml).
struct GgufValue {
  GgufValueType type = GgufValueType::kUint32;
  int64_t integer = 0;  // u8..i64 and bool (0/1); a u64 above INT64_MAX is refused by the reader
  double number = 0.0;  // f32, f64
  std::string string;
  GgufValueType array_type = GgufValueType::kUint8;  // arrays only
  std::vector<GgufValue> array;

  bool is_integer() const;
  bool is_float() const { return type == GgufValueType::kFloat32 || type == GgufValueType::kFloat64; }
};

// The tokenizer part of the export (tokenizer.ggml.*). Tokens are the vocabulary's strings exactly as
// tokenizer.json spells them (byte-level BPE: GPT-2's byte-to-unicode alphabet), in id order; merges
// are "left right" pairs in rank order. token_types (1 normal, 2 unknown, 3 control, 4 user-defined,
// 5 unused, 6 byte) default to normal; the vocabulary is padded to the model's vocab_size with
// "[PAD<id>]" tokens of type unused, as convert_hf_to_gguf.py does for Qwen.
struct GgufTokenizer {
  std::vector<std::string> tokens;
  std::vector<int32_t> token_types;  // empty, or one per token
  std::vector<std::string> merges;
  int bos = -1, eos = -1, pad = -1;  // -1: not written
  std::string model = "gpt2";        // tokenizer.ggml.model
  std::string pre;                   // tokenizer.ggml.pre ("llama-bpe", "qwen2", ...); empty: "default"
  std::string chat_template;         // tokenizer.chat_template; empty: not written
  std::optional<bool> add_bos_token;
  std::optional<bool> add_eos_token;
};

// A float32 tensor to export, under its Hugging Face name, with its PyTorch (row-major) shape.
struct GgufSourceTensor {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;
};

// What the writer will do with one tensor.
struct GgufTensorPlan {
  std::string gguf_name;
  std::string hf_name;         // empty for generated tensors (rope_freqs.weight)
  std::vector<uint64_t> dims;  // ggml order
  GgufType type = GgufType::kF32;
  bool permute_qk = false;  // llama Q/K row permutation applied
  int permute_heads = 0;    // heads of that permutation
  uint64_t offset = 0;      // relative to the data section
  uint64_t nbytes = 0;
};

// GGUF name of one of our tensors: "model.embed_tokens.weight" -> "token_embd.weight", and so on.
// Throws GgufError for a name with no GGUF equivalent.
std::string gguf_tensor_name(const std::string& hf_name);
// The inverse; throws GgufError for a GGUF name this project has no tensor for (rope_freqs.weight
// included: it is derived from the config).
std::string hf_tensor_name(const std::string& gguf_name);

// llama.cpp's Q/K permutation on a [n_heads * head_dim, cols] row-major matrix (cols = 1 for a bias):
// out row h*D + 2i + j = in row h*D + j*D/2 + i. unpermute is its inverse.
void permute_llama_qk(const float* in, float* out, int64_t rows, int64_t cols, int n_heads);
void unpermute_llama_qk(const float* in, float* out, int64_t rows, int64_t cols, int n_heads);

// llama.cpp's rope_freqs for rope_scaling "llama3": one divisor per rotary pair (1 for high
// frequencies, the factor for low ones, a smooth blend between).
std::vector<float> llama3_rope_freq_factors(const ModelConfig& config);

// Scalar conversions, bit-exact with ggml's reference (round to nearest even; NaN stays NaN).
uint16_t fp32_to_fp16(float x);
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_bf16(float x);
float bf16_to_fp32(uint16_t h);
// Q8_0: n a multiple of 32; out holds n/32 blocks of 34 bytes {fp16 d, int8 q[32]}.
void quantize_q8_0(const float* x, int64_t n, uint8_t* out);
void dequantize_q8_0(const uint8_t* blocks, int64_t n, float* out);

// The tensor list, types and offsets write_gguf would produce; checks that the config can be exported
// as `arch` ("llama", "qwen2", "qwen3") and that `tensors` are exactly the config's parameters with
// their shapes. Throws GgufError listing what is wrong.
std::vector<GgufTensorPlan> plan_gguf(const ModelConfig& config, const std::vector<GgufSourceTensor>& tensors,
                                      GgufType type, const std::string& arch);

// Writes the GGUF file atomically (a temporary file in the same folder, flushed, then renamed).
// `model_name` becomes general.name (empty: the arch). Throws GgufError on bad input or I/O failure.
void write_gguf(const std::string& path, const ModelConfig& config,
                const std::vector<GgufSourceTensor>& tensors, const GgufTokenizer& tokenizer, GgufType type,
                const std::string& arch, const std::string& model_name = "");
// The same, from a parameter layout and its float32 arena (host memory).
void write_gguf(const std::string& path, const ModelConfig& config, const ParameterLayout& layout,
                const float* params, const GgufTokenizer& tokenizer, GgufType type, const std::string& arch,
                const std::string& model_name = "");

// ---- Reader ----

struct GgufTensor {
  std::string name;
  std::vector<uint64_t> dims;  // ggml order
  uint32_t type = 0;           // ggml type id
  uint64_t offset = 0;         // relative to the data section
  uint64_t nbytes = 0;
  std::vector<float> data;   // dequantised, row-major in PyTorch order (filled when data is loaded)
  std::vector<uint8_t> raw;  // the stored bytes (filled when asked for)

  std::vector<int64_t> shape() const;  // PyTorch order: dims reversed
  int64_t numel() const;
};

struct GgufReadOptions {
  bool load_data = true;  // dequantise every tensor into GgufTensor::data
  bool keep_raw = false;  // also keep the stored bytes
};

struct GgufFile {
  std::string path;
  uint32_t version = 0;
  uint64_t alignment = 32;
  uint64_t data_start = 0;  // absolute file offset of the data section
  uint64_t file_size = 0;
  std::vector<std::pair<std::string, GgufValue>> metadata;  // in file order
  std::vector<GgufTensor> tensors;                          // in file order

  bool has(const std::string& key) const;
  // Each accessor throws GgufError naming the file and key when the key is missing or of another kind.
  const GgufValue& at(const std::string& key) const;
  int64_t get_int(const std::string& key) const;   // any integer type
  double get_float(const std::string& key) const;  // f32 or f64
  bool get_bool(const std::string& key) const;
  const std::string& get_string(const std::string& key) const;
  std::vector<std::string> get_strings(const std::string& key) const;  // array of strings
  std::vector<int64_t> get_ints(const std::string& key) const;         // array of integers
  const GgufTensor* find_tensor(const std::string& name) const;
  const GgufTensor& tensor(const std::string& name) const;  // throws GgufError when absent
};

// Reads and checks a GGUF file (versions 2 and 3, little-endian). Throws GgufError "PATH: ..." for a
// file that cannot be opened, is truncated, or has an inconsistent header, metadata or tensor table,
// and (with load_data) for a tensor in a type this reader cannot dequantise.
GgufFile read_gguf(const std::string& path, const GgufReadOptions& options = {});
// The same checks on a file's bytes held in memory; `name` stands for the path in messages.
GgufFile read_gguf_bytes(const std::string& bytes, const std::string& name,
                         const GgufReadOptions& options = {});

}  // namespace llm
