#include "llm/gguf.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <unordered_map>

#include "data/atomic_file.h"

namespace llm {

namespace {

constexpr uint32_t kGgufVersion = 3;
constexpr uint64_t kAlignment = 32;
constexpr uint32_t kQuantizationVersion = 2;  // general.quantization_version, as gguf-py writes it
constexpr int kQ8Block = 32;
constexpr int kQ8BlockBytes = 34;  // fp16 scale + 32 int8
constexpr int kMaxDims = 4;        // GGML_MAX_DIMS

// Every ggml type id this reader knows: name, elements per block, bytes per block.
struct TypeTraits {
  uint32_t id;
  const char* name;
  uint64_t block;
  uint64_t block_bytes;
};
constexpr TypeTraits kTypes[] = {
    {0, "F32", 1, 4},         {1, "F16", 1, 2},         {2, "Q4_0", 32, 18},      {3, "Q4_1", 32, 20},
    {6, "Q5_0", 32, 22},      {7, "Q5_1", 32, 24},      {8, "Q8_0", 32, 34},      {9, "Q8_1", 32, 40},
    {10, "Q2_K", 256, 84},    {11, "Q3_K", 256, 110},   {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},   {15, "Q8_K", 256, 292},   {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74},
    {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},   {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110},
    {22, "IQ2_S", 256, 82},   {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},         {25, "I16", 1, 2},
    {26, "I32", 1, 4},        {27, "I64", 1, 8},        {28, "F64", 1, 8},        {29, "IQ1_M", 256, 56},
    {30, "BF16", 1, 2},       {34, "TQ1_0", 256, 54},   {35, "TQ2_0", 256, 66},   {39, "MXFP4", 32, 17},
    {40, "NVFP4", 64, 36},    {41, "Q1_0", 128, 18},
};

const TypeTraits* find_type(uint32_t id) {
  for (const auto& t : kTypes)
    if (t.id == id) return &t;
  return nullptr;
}

uint64_t align_up(uint64_t x, uint64_t a) {
  return (x + a - 1) / a * a;
}

// ---- little-endian encoding, independent of the host's byte order ----

void put_u8(std::string& b, uint8_t v) {
  b.push_back(static_cast<char>(v));
}
void put_u32(std::string& b, uint32_t v) {
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void put_u64(std::string& b, uint64_t v) {
  for (int i = 0; i < 8; ++i) b.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void put_f32(std::string& b, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  put_u32(b, u);
}
void put_str(std::string& b, const std::string& s) {
  put_u64(b, s.size());
  b += s;
}

uint16_t get_u16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (p[1] << 8));
}
uint32_t get_u32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
uint64_t get_u64(const uint8_t* p) {
  return static_cast<uint64_t>(get_u32(p)) | (static_cast<uint64_t>(get_u32(p + 4)) << 32);
}
float get_f32(const uint8_t* p) {
  const uint32_t u = get_u32(p);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- metadata under construction ----

struct MetaWriter {
  std::string bytes;
  uint64_t count = 0;

  void key(const std::string& k, GgufValueType t) {
    put_str(bytes, k);
    put_u32(bytes, static_cast<uint32_t>(t));
    ++count;
  }
  void u32(const std::string& k, uint32_t v) {
    key(k, GgufValueType::kUint32);
    put_u32(bytes, v);
  }
  void f32(const std::string& k, double v) {
    key(k, GgufValueType::kFloat32);
    put_f32(bytes, static_cast<float>(v));
  }
  void boolean(const std::string& k, bool v) {
    key(k, GgufValueType::kBool);
    put_u8(bytes, v ? 1 : 0);
  }
  void str(const std::string& k, const std::string& v) {
    key(k, GgufValueType::kString);
    put_str(bytes, v);
  }
  void strings(const std::string& k, const std::vector<std::string>& v) {
    key(k, GgufValueType::kArray);
    put_u32(bytes, static_cast<uint32_t>(GgufValueType::kString));
    put_u64(bytes, v.size());
    for (const auto& s : v) put_str(bytes, s);
  }
  void i32s(const std::string& k, const std::vector<int32_t>& v) {
    key(k, GgufValueType::kArray);
    put_u32(bytes, static_cast<uint32_t>(GgufValueType::kInt32));
    put_u64(bytes, v.size());
    for (int32_t x : v) put_u32(bytes, static_cast<uint32_t>(x));
  }
};

// HF suffix inside a layer -> GGUF suffix inside a block.
const std::vector<std::pair<std::string, std::string>>& layer_name_map() {
  static const std::vector<std::pair<std::string, std::string>> map = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.q_proj.bias", "attn_q.bias"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.k_proj.bias", "attn_k.bias"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.v_proj.bias", "attn_v.bias"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"self_attn.q_norm.weight", "attn_q_norm.weight"},
      {"self_attn.k_norm.weight", "attn_k_norm.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
  };
  return map;
}

const std::vector<std::pair<std::string, std::string>>& global_name_map() {
  static const std::vector<std::pair<std::string, std::string>> map = {
      {"model.embed_tokens.weight", "token_embd.weight"},
      {"model.norm.weight", "output_norm.weight"},
      {"lm_head.weight", "output.weight"},
  };
  return map;
}

// Parses "<prefix><digits>.<rest>"; returns false when `name` is not of that form.
bool split_layer_name(const std::string& name, const std::string& prefix, int& layer, std::string& rest) {
  if (name.compare(0, prefix.size(), prefix) != 0) return false;
  size_t i = prefix.size(), j = i;
  while (j < name.size() && name[j] >= '0' && name[j] <= '9') ++j;
  if (j == i || j - i > 9 || j >= name.size() || name[j] != '.') return false;
  if (name[i] == '0' && j - i > 1) return false;
  layer = std::stoi(name.substr(i, j - i));
  rest = name.substr(j + 1);
  return true;
}

bool is_q_or_k(const std::string& hf_name) {
  for (const char* s : {"self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                        "self_attn.k_proj.bias"}) {
    const std::string suffix = s;
    if (hf_name.size() >= suffix.size() &&
        hf_name.compare(hf_name.size() - suffix.size(), suffix.size(), suffix) == 0)
      return true;
  }
  return false;
}

bool is_k(const std::string& hf_name) {
  return hf_name.find("self_attn.k_proj.") != std::string::npos;
}

std::string join_lines(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& l : lines) out += (out.empty() ? "" : "\n") + l;
  return out;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Why `config` cannot be exported as `arch` (empty when it can).
std::vector<std::string> arch_problems(const ModelConfig& c, const std::string& arch) {
  std::vector<std::string> p;
  if (arch != "llama" && arch != "qwen2" && arch != "qwen3") {
    p.push_back("arch must be \"llama\", \"qwen2\" or \"qwen3\", found \"" + arch + "\"");
    return p;
  }
  for (const auto& problem : validate_model_config(c)) p.push_back("config: " + problem);
  if (c.norm_type != "rmsnorm")
    p.push_back("GGUF export needs norm_type \"rmsnorm\", found \"" + c.norm_type + "\"");
  if (c.activation != "swiglu")
    p.push_back("GGUF export needs activation \"swiglu\", found \"" + c.activation + "\"");
  if (!c.uses_rope())
    p.push_back("GGUF export needs positional_encoding \"rope\" or \"yarn\", found \"" +
                c.positional_encoding + "\"");
  if (c.sliding_window > 0)
    p.push_back("GGUF export of " + arch + " has no sliding-window attention; sliding_window is " +
                std::to_string(c.sliding_window));
  if (arch == "qwen3") {
    if (!c.qk_norm) p.push_back("arch \"qwen3\" needs qk_norm true");
    if (c.attention_bias) p.push_back("arch \"qwen3\" has no attention bias; attention_bias is true");
  } else if (c.qk_norm) {
    p.push_back("qk_norm is true: export as arch \"qwen3\", not \"" + arch + "\"");
  }
  if (arch == "qwen2" && !c.attention_bias)
    p.push_back("arch \"qwen2\" has Q/K/V biases; attention_bias is false (export as \"llama\" instead)");
  if (c.rope_scaling == "llama3" && arch != "llama")
    p.push_back("rope_scaling \"llama3\" is exported (as rope_freqs.weight) for arch \"llama\" only");
  return p;
}

// Converts `n` floats to `type` at `out` (gguf_type_bytes(type, n) bytes). `what` names the tensor.
void encode(const float* x, int64_t n, GgufType type, uint8_t* out, const std::string& what) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i]))
      throw GgufError("tensor " + what + " has a non-finite value (" + std::to_string(x[i]) +
                      ") at element " + std::to_string(i));
  }
  switch (type) {
    case GgufType::kF32:
      for (int64_t i = 0; i < n; ++i) {
        uint32_t u;
        std::memcpy(&u, &x[i], 4);
        for (int b = 0; b < 4; ++b) out[4 * i + b] = static_cast<uint8_t>((u >> (8 * b)) & 0xff);
      }
      return;
    case GgufType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = fp32_to_fp16(x[i]);
        out[2 * i] = static_cast<uint8_t>(h & 0xff);
        out[2 * i + 1] = static_cast<uint8_t>(h >> 8);
      }
      return;
    case GgufType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = fp32_to_bf16(x[i]);
        out[2 * i] = static_cast<uint8_t>(h & 0xff);
        out[2 * i + 1] = static_cast<uint8_t>(h >> 8);
      }
      return;
    case GgufType::kQ8_0:
      quantize_q8_0(x, n, out);
      return;
  }
}

// Zero bytes up to the next multiple of `alignment` (GGUF aligns the data section and every tensor).
void pad_to(AtomicFile<GgufError>& file, uint64_t alignment) {
  static const char zeros[64] = {};
  const uint64_t target = align_up(file.written(), alignment);
  while (file.written() < target)
    file.write(zeros, static_cast<size_t>(std::min<uint64_t>(target - file.written(), sizeof(zeros))));
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Types and scalar conversions

std::string gguf_type_name(uint32_t type) {
  if (const TypeTraits* t = find_type(type)) return t->name;
  return "type " + std::to_string(type);
}

GgufType parse_gguf_type(const std::string& name) {
  std::string s;
  for (char ch : name) s.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(ch))));
  if (s == "f32") return GgufType::kF32;
  if (s == "f16") return GgufType::kF16;
  if (s == "bf16") return GgufType::kBF16;
  if (s == "q8_0") return GgufType::kQ8_0;
  throw GgufError("GGUF type must be one of f32, f16, bf16, q8_0; found \"" + name + "\"");
}

uint32_t gguf_file_type(GgufType type) {
  switch (type) {
    case GgufType::kF32:
      return 0;
    case GgufType::kF16:
      return 1;
    case GgufType::kQ8_0:
      return 7;
    case GgufType::kBF16:
      return 32;
  }
  return 0;
}

uint64_t gguf_type_bytes(GgufType type, uint64_t n) {
  switch (type) {
    case GgufType::kF32:
      return 4 * n;
    case GgufType::kF16:
    case GgufType::kBF16:
      return 2 * n;
    case GgufType::kQ8_0:
      return n / kQ8Block * kQ8BlockBytes;
  }
  return 0;
}

const char* gguf_value_type_name(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
      return "u8";
    case GgufValueType::kInt8:
      return "i8";
    case GgufValueType::kUint16:
      return "u16";
    case GgufValueType::kInt16:
      return "i16";
    case GgufValueType::kUint32:
      return "u32";
    case GgufValueType::kInt32:
      return "i32";
    case GgufValueType::kFloat32:
      return "f32";
    case GgufValueType::kBool:
      return "bool";
    case GgufValueType::kString:
      return "string";
    case GgufValueType::kArray:
      return "array";
    case GgufValueType::kUint64:
      return "u64";
    case GgufValueType::kInt64:
      return "i64";
    case GgufValueType::kFloat64:
      return "f64";
  }
  return "unknown";
}

bool GgufValue::is_integer() const {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
      return true;
    default:
      return false;
  }
}

uint16_t fp32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00);   // NaN (quiet), as ggml
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00);  // rounds to (or is) infinity
  if (a < 0x38800000u) {                                              // below 2^-14: half subnormal or zero
    if (a <= 0x33000000u) return sign;                                // at most 2^-25: rounds to zero
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24: units of 2^-24
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t q = a - 0x38000000u;  // exponent rebiased from 127 to 15
  const uint32_t rem = q & 0x1fffu;
  q >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1))) ++q;  // may carry into the exponent: still right
  return static_cast<uint16_t>(sign | q);
}

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
  uint32_t x;
  if (e == 0x1f) {
    x = sign | 0x7f800000u | (m << 13);
  } else if (e != 0) {
    x = sign | ((e + 112) << 23) | (m << 13);
  } else if (m == 0) {
    x = sign;
  } else {  // subnormal: m * 2^-24, exact in fp32
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    std::memcpy(&x, &v, 4);
    x |= sign;
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

uint16_t fp32_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 64);  // quiet NaN
  return static_cast<uint16_t>((static_cast<uint64_t>(x) + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

float bf16_to_fp32(uint16_t h) {
  const uint32_t x = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

void quantize_q8_0(const float* x, int64_t n, uint8_t* out) {
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const float* xb = x + b * kQ8Block;
    uint8_t* ob = out + b * kQ8BlockBytes;
    float amax = 0.0f;
    for (int j = 0; j < kQ8Block; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t dh = fp32_to_fp16(d);
    ob[0] = static_cast<uint8_t>(dh & 0xff);
    ob[1] = static_cast<uint8_t>(dh >> 8);
    for (int j = 0; j < kQ8Block; ++j) {
      const float q = std::round(xb[j] * id);  // half away from zero, as roundf
      ob[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::max(-128.0f, std::min(127.0f, q))));
    }
  }
}

void dequantize_q8_0(const uint8_t* blocks, int64_t n, float* out) {
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const uint8_t* ib = blocks + b * kQ8BlockBytes;
    const float d = fp16_to_fp32(get_u16(ib));
    for (int j = 0; j < kQ8Block; ++j)
      out[b * kQ8Block + j] = static_cast<float>(static_cast<int8_t>(ib[2 + j])) * d;
  }
}

// ---------------------------------------------------------------------------------------------------
// Names, permutation, rope factors

std::string gguf_tensor_name(const std::string& hf_name) {
  for (const auto& [hf, gg] : global_name_map())
    if (hf == hf_name) return gg;
  int layer = 0;
  std::string rest;
  if (split_layer_name(hf_name, "model.layers.", layer, rest)) {
    for (const auto& [hf, gg] : layer_name_map())
      if (hf == rest) return "blk." + std::to_string(layer) + "." + gg;
  }
  throw GgufError("tensor " + hf_name + " has no GGUF name (llama/qwen2/qwen3 tensors only)");
}

std::string hf_tensor_name(const std::string& gguf_name) {
  for (const auto& [hf, gg] : global_name_map())
    if (gg == gguf_name) return hf;
  int layer = 0;
  std::string rest;
  if (split_layer_name(gguf_name, "blk.", layer, rest)) {
    for (const auto& [hf, gg] : layer_name_map())
      if (gg == rest) return layer_tensor_name(layer, hf);
  }
  throw GgufError("GGUF tensor " + gguf_name + " has no tensor in this project");
}

namespace {
// Source row of GGUF row r under the llama permutation.
int64_t permuted_source_row(int64_t r, int64_t head_dim) {
  const int64_t h = r / head_dim, k = r % head_dim, half = head_dim / 2;
  return h * head_dim + (k % 2) * half + k / 2;
}
}  // namespace

void permute_llama_qk(const float* in, float* out, int64_t rows, int64_t cols, int n_heads) {
  const int64_t head_dim = rows / n_heads;
  for (int64_t r = 0; r < rows; ++r)
    std::copy(in + permuted_source_row(r, head_dim) * cols,
              in + (permuted_source_row(r, head_dim) + 1) * cols, out + r * cols);
}

void unpermute_llama_qk(const float* in, float* out, int64_t rows, int64_t cols, int n_heads) {
  const int64_t head_dim = rows / n_heads;
  for (int64_t r = 0; r < rows; ++r)
    std::copy(in + r * cols, in + (r + 1) * cols, out + permuted_source_row(r, head_dim) * cols);
}

std::vector<float> llama3_rope_freq_factors(const ModelConfig& c) {
  const int dim = c.resolved_head_dim();
  const double factor = c.rope_scaling_factor;
  const double low = c.llama3_low_freq_factor, high = c.llama3_high_freq_factor;
  const double old_len = c.rope_original_max_seq_len > 0 ? c.rope_original_max_seq_len : c.max_seq_len;
  const double low_wavelen = old_len / low, high_wavelen = old_len / high;
  const double pi = 3.14159265358979323846;
  std::vector<float> out;
  for (int i = 0; i < dim; i += 2) {
    // The frequency in fp32, as the converter computes it with torch.
    const float freq = 1.0f / static_cast<float>(std::pow(c.rope_theta, static_cast<double>(i) / dim));
    const double wavelen = 2 * pi / freq;
    if (wavelen < high_wavelen) {
      out.push_back(1.0f);
    } else if (wavelen > low_wavelen) {
      out.push_back(static_cast<float>(factor));
    } else {
      const double smooth = (old_len / wavelen - low) / (high - low);
      out.push_back(static_cast<float>(1.0 / ((1 - smooth) / factor + smooth)));
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Writer

namespace {

struct PlanWithSource {
  GgufTensorPlan plan;
  const float* data = nullptr;  // source rows (HF layout)
  int64_t rows = 0, cols = 0;
};

std::vector<PlanWithSource> make_plan(const ModelConfig& config, const std::vector<GgufSourceTensor>& tensors,
                                      GgufType type, const std::string& arch,
                                      std::vector<float>& rope_freqs) {
  std::vector<std::string> problems = arch_problems(config, arch);
  if (!problems.empty()) throw GgufError("cannot export to GGUF:\n" + join_lines(problems));

  const ParameterLayout layout(config);
  std::unordered_map<std::string, const GgufSourceTensor*> by_name;
  for (const auto& t : tensors) {
    if (!by_name.emplace(t.name, &t).second) problems.push_back("tensor " + t.name + " is given twice");
    if (!layout.contains(t.name))
      problems.push_back("tensor " + t.name + " is not a parameter of this config");
  }
  std::vector<PlanWithSource> out;
  if (config.rope_scaling == "llama3") {
    rope_freqs = llama3_rope_freq_factors(config);
    PlanWithSource p;
    p.plan.gguf_name = "rope_freqs.weight";
    p.plan.dims = {rope_freqs.size()};
    p.data = rope_freqs.data();
    p.rows = static_cast<int64_t>(rope_freqs.size());
    p.cols = 1;
    out.push_back(p);
  }
  for (const TensorInfo& info : layout.tensors()) {
    auto it = by_name.find(info.name);
    if (it == by_name.end()) {
      problems.push_back("tensor " + info.name + " " + shape_str(info.shape) + " is missing");
      continue;
    }
    const GgufSourceTensor& src = *it->second;
    if (src.shape != info.shape) {
      problems.push_back("tensor " + info.name + " has shape " + shape_str(src.shape) + ", expected " +
                         shape_str(info.shape));
      continue;
    }
    if (!src.data) {
      problems.push_back("tensor " + info.name + " has no data");
      continue;
    }
    PlanWithSource p;
    p.plan.hf_name = info.name;
    p.plan.gguf_name = gguf_tensor_name(info.name);
    for (auto d = info.shape.rbegin(); d != info.shape.rend(); ++d)
      p.plan.dims.push_back(static_cast<uint64_t>(*d));
    p.data = src.data;
    p.rows = info.shape[0];
    p.cols = info.numel / info.shape[0];
    if (arch == "llama" && is_q_or_k(info.name)) {
      p.plan.permute_qk = true;
      p.plan.permute_heads = is_k(info.name) ? config.n_kv_heads : config.n_heads;
    }
    out.push_back(p);
  }
  if (!problems.empty()) throw GgufError("cannot export to GGUF:\n" + join_lines(problems));

  uint64_t offset = 0;
  for (auto& p : out) {
    GgufType t = p.plan.dims.size() == 1 ? GgufType::kF32 : type;
    if (t == GgufType::kQ8_0 && p.plan.dims[0] % kQ8Block != 0) t = GgufType::kF16;
    p.plan.type = t;
    uint64_t numel = 1;
    for (uint64_t d : p.plan.dims) numel *= d;
    p.plan.offset = offset;
    p.plan.nbytes = gguf_type_bytes(t, numel);
    offset = align_up(offset + p.plan.nbytes, kAlignment);
  }
  return out;
}

std::string metadata_bytes(const ModelConfig& c, const GgufTokenizer& tok, GgufType type,
                           const std::string& arch, const std::string& model_name, uint64_t& count) {
  std::vector<std::string> problems;
  if (tok.tokens.empty()) problems.push_back("the tokenizer has no tokens (GGUF needs the vocabulary)");
  if (static_cast<int64_t>(tok.tokens.size()) > c.vocab_size)
    problems.push_back("the tokenizer has " + std::to_string(tok.tokens.size()) +
                       " tokens, more than vocab_size " + std::to_string(c.vocab_size));
  if (!tok.token_types.empty() && tok.token_types.size() != tok.tokens.size())
    problems.push_back("token_types has " + std::to_string(tok.token_types.size()) + " entries for " +
                       std::to_string(tok.tokens.size()) + " tokens");
  for (int32_t t : tok.token_types)
    if (t < 1 || t > 6) {
      problems.push_back("token type " + std::to_string(t) + " is not one of 1..6");
      break;
    }
  for (const auto& [name, id] :
       {std::pair<const char*, int>{"bos", tok.bos}, {"eos", tok.eos}, {"pad", tok.pad}})
    if (id < -1 || id >= c.vocab_size)
      problems.push_back(std::string(name) + " token id " + std::to_string(id) +
                         " is outside [0, vocab_size)");
  if (tok.model.empty()) problems.push_back("tokenizer model must not be empty");
  if (!problems.empty()) throw GgufError("cannot export to GGUF:\n" + join_lines(problems));

  MetaWriter m;
  m.str("general.architecture", arch);
  m.str("general.name", model_name.empty() ? arch : model_name);
  m.u32("general.alignment", static_cast<uint32_t>(kAlignment));
  m.u32("general.file_type", gguf_file_type(type));
  m.u32("general.quantization_version", kQuantizationVersion);
  const std::string a = arch + ".";
  const int head_dim = c.resolved_head_dim();
  m.u32(a + "vocab_size", static_cast<uint32_t>(c.vocab_size));
  m.u32(a + "context_length", static_cast<uint32_t>(c.max_seq_len));
  m.u32(a + "embedding_length", static_cast<uint32_t>(c.d_model));
  m.u32(a + "block_count", static_cast<uint32_t>(c.n_layers));
  m.u32(a + "feed_forward_length", static_cast<uint32_t>(c.d_ff));
  m.u32(a + "attention.head_count", static_cast<uint32_t>(c.n_heads));
  m.u32(a + "attention.head_count_kv", static_cast<uint32_t>(c.n_kv_heads));
  m.u32(a + "attention.key_length", static_cast<uint32_t>(head_dim));
  m.u32(a + "attention.value_length", static_cast<uint32_t>(head_dim));
  m.f32(a + "attention.layer_norm_rms_epsilon", c.norm_eps);
  m.u32(a + "rope.dimension_count", static_cast<uint32_t>(head_dim));
  m.f32(a + "rope.freq_base", c.rope_theta);
  const int original_len = c.rope_original_max_seq_len > 0 ? c.rope_original_max_seq_len : c.max_seq_len;
  if (c.positional_encoding == "yarn") {
    m.str(a + "rope.scaling.type", "yarn");
    m.f32(a + "rope.scaling.factor", c.rope_scaling_factor);
    m.u32(a + "rope.scaling.original_context_length", static_cast<uint32_t>(original_len));
    if (c.yarn_attention_factor != 0.0) m.f32(a + "rope.scaling.yarn_attn_factor", c.yarn_attention_factor);
    m.f32(a + "rope.scaling.yarn_beta_fast", c.yarn_beta_fast);
    m.f32(a + "rope.scaling.yarn_beta_slow", c.yarn_beta_slow);
  } else if (c.rope_scaling == "linear") {
    m.str(a + "rope.scaling.type", "linear");
    m.f32(a + "rope.scaling.factor", c.rope_scaling_factor);
  }

  std::vector<std::string> tokens = tok.tokens;
  std::vector<int32_t> types = tok.token_types;
  if (types.empty()) types.assign(tokens.size(), 1);
  for (int64_t id = static_cast<int64_t>(tokens.size()); id < c.vocab_size; ++id) {
    tokens.push_back("[PAD" + std::to_string(id) + "]");
    types.push_back(5);  // unused
  }
  m.str("tokenizer.ggml.model", tok.model);
  m.str("tokenizer.ggml.pre", tok.pre.empty() ? "default" : tok.pre);
  m.strings("tokenizer.ggml.tokens", tokens);
  m.i32s("tokenizer.ggml.token_type", types);
  if (!tok.merges.empty()) m.strings("tokenizer.ggml.merges", tok.merges);
  if (tok.bos >= 0) m.u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(tok.bos));
  if (tok.eos >= 0) m.u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(tok.eos));
  if (tok.pad >= 0) m.u32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(tok.pad));
  if (tok.add_bos_token) m.boolean("tokenizer.ggml.add_bos_token", *tok.add_bos_token);
  if (tok.add_eos_token) m.boolean("tokenizer.ggml.add_eos_token", *tok.add_eos_token);
  if (!tok.chat_template.empty()) m.str("tokenizer.chat_template", tok.chat_template);
  count = m.count;
  return m.bytes;
}

}  // namespace

std::vector<GgufTensorPlan> plan_gguf(const ModelConfig& config, const std::vector<GgufSourceTensor>& tensors,
                                      GgufType type, const std::string& arch) {
  std::vector<float> rope_freqs;
  std::vector<GgufTensorPlan> out;
  for (auto& p : make_plan(config, tensors, type, arch, rope_freqs)) out.push_back(p.plan);
  return out;
}

void write_gguf(const std::string& path, const ModelConfig& config,
                const std::vector<GgufSourceTensor>& tensors, const GgufTokenizer& tokenizer, GgufType type,
                const std::string& arch, const std::string& model_name) {
  std::vector<float> rope_freqs;
  const std::vector<PlanWithSource> plan = make_plan(config, tensors, type, arch, rope_freqs);
  uint64_t kv_count = 0;
  const std::string meta = metadata_bytes(config, tokenizer, type, arch, model_name, kv_count);

  std::string header;
  header += "GGUF";
  put_u32(header, kGgufVersion);
  put_u64(header, plan.size());
  put_u64(header, kv_count);
  header += meta;
  for (const auto& p : plan) {
    put_str(header, p.plan.gguf_name);
    put_u32(header, static_cast<uint32_t>(p.plan.dims.size()));
    for (uint64_t d : p.plan.dims) put_u64(header, d);
    put_u32(header, static_cast<uint32_t>(p.plan.type));
    put_u64(header, p.plan.offset);
  }

  AtomicFile<GgufError> file(path);
  file.write(header.data(), header.size());
  pad_to(file, kAlignment);
  const uint64_t data_start = file.written();

  // Rows go through a staging buffer (permuted when asked) in batches of about 1M elements.
  std::vector<float> stage;
  std::vector<uint8_t> encoded;
  for (const auto& p : plan) {
    if (file.written() != data_start + p.plan.offset)
      throw GgufError(path + ": internal error: offset mismatch");
    const int64_t head_dim = p.plan.permute_qk ? p.rows / p.plan.permute_heads : 0;
    const int64_t batch = std::max<int64_t>(1, (int64_t{1} << 20) / p.cols);
    const std::string what = p.plan.hf_name.empty() ? p.plan.gguf_name : p.plan.hf_name;
    for (int64_t r0 = 0; r0 < p.rows; r0 += batch) {
      const int64_t nr = std::min(batch, p.rows - r0);
      const float* src = p.data + r0 * p.cols;
      if (p.plan.permute_qk) {
        stage.resize(static_cast<size_t>(nr * p.cols));
        for (int64_t r = 0; r < nr; ++r) {
          const float* row = p.data + permuted_source_row(r0 + r, head_dim) * p.cols;
          std::copy(row, row + p.cols, stage.begin() + r * p.cols);
        }
        src = stage.data();
      }
      encoded.resize(static_cast<size_t>(gguf_type_bytes(p.plan.type, static_cast<uint64_t>(nr * p.cols))));
      encode(src, nr * p.cols, p.plan.type, encoded.data(), what);
      file.write(encoded.data(), encoded.size());
    }
    pad_to(file, kAlignment);
  }
  file.commit();
}

void write_gguf(const std::string& path, const ModelConfig& config, const ParameterLayout& layout,
                const float* params, const GgufTokenizer& tokenizer, GgufType type, const std::string& arch,
                const std::string& model_name) {
  std::vector<GgufSourceTensor> tensors;
  for (const TensorInfo& t : layout.tensors()) tensors.push_back({t.name, t.shape, params + t.offset});
  write_gguf(path, config, tensors, tokenizer, type, arch, model_name);
}

// ---------------------------------------------------------------------------------------------------
// Reader

namespace {

class Cursor {
 public:
  Cursor(std::istream& in, const std::string& name) : path_(name), in_(in) {
    in_.seekg(0, std::ios::end);
    const std::streamoff end = in_.tellg();
    if (end < 0) throw GgufError(name + ": cannot determine the file size");
    size_ = static_cast<uint64_t>(end);
    in_.seekg(0);
  }

  GgufError error(const std::string& message) const { return GgufError(path_ + ": " + message); }
  uint64_t pos() const { return pos_; }
  uint64_t size() const { return size_; }
  uint64_t left() const { return size_ - pos_; }

  void read(void* dst, uint64_t n, const std::string& what) {
    if (n > left())
      throw error("truncated: " + what + " at byte " + std::to_string(pos_) + " needs " + std::to_string(n) +
                  " bytes, " + std::to_string(left()) + " left");
    if (n) {
      in_.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
      if (!in_) throw error("read failed at byte " + std::to_string(pos_));
    }
    pos_ += n;
  }
  void seek(uint64_t to) {
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(to));
    if (!in_) throw error("seek failed to byte " + std::to_string(to));
    pos_ = to;
  }
  uint8_t u8(const std::string& what) {
    uint8_t b;
    read(&b, 1, what);
    return b;
  }
  uint16_t u16(const std::string& what) {
    uint8_t b[2];
    read(b, 2, what);
    return get_u16(b);
  }
  uint32_t u32(const std::string& what) {
    uint8_t b[4];
    read(b, 4, what);
    return get_u32(b);
  }
  uint64_t u64(const std::string& what) {
    uint8_t b[8];
    read(b, 8, what);
    return get_u64(b);
  }
  std::string str(const std::string& what) {
    const uint64_t start = pos_;
    const uint64_t n = u64(what + " length");
    if (n > left())
      throw error("truncated or corrupt: " + what + " at byte " + std::to_string(start) + " claims " +
                  std::to_string(n) + " bytes, " + std::to_string(left()) + " left");
    std::string s(static_cast<size_t>(n), '\0');
    read(s.data(), n, what);
    return s;
  }

 private:
  std::string path_;
  std::istream& in_;
  uint64_t size_ = 0, pos_ = 0;
};

bool valid_value_type(uint32_t t) {
  return t <= static_cast<uint32_t>(GgufValueType::kFloat64);
}

// Smallest encoding of one value of type t (for bounding array counts before allocating).
uint64_t min_value_bytes(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kString:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    case GgufValueType::kArray:
      return 12;
  }
  return 1;
}

GgufValue read_scalar(Cursor& c, GgufValueType t, const std::string& what) {
  GgufValue v;
  v.type = t;
  switch (t) {
    case GgufValueType::kUint8:
      v.integer = c.u8(what);
      break;
    case GgufValueType::kInt8:
      v.integer = static_cast<int8_t>(c.u8(what));
      break;
    case GgufValueType::kUint16:
      v.integer = c.u16(what);
      break;
    case GgufValueType::kInt16:
      v.integer = static_cast<int16_t>(c.u16(what));
      break;
    case GgufValueType::kUint32:
      v.integer = c.u32(what);
      break;
    case GgufValueType::kInt32:
      v.integer = static_cast<int32_t>(c.u32(what));
      break;
    case GgufValueType::kUint64: {
      const uint64_t u = c.u64(what);
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        throw c.error(what + ": u64 value " + std::to_string(u) + " is too large");
      v.integer = static_cast<int64_t>(u);
      break;
    }
    case GgufValueType::kInt64:
      v.integer = static_cast<int64_t>(c.u64(what));
      break;
    case GgufValueType::kFloat32: {
      const uint32_t u = c.u32(what);
      float f;
      std::memcpy(&f, &u, 4);
      v.number = f;
      break;
    }
    case GgufValueType::kFloat64: {
      const uint64_t u = c.u64(what);
      double d;
      std::memcpy(&d, &u, 8);
      v.number = d;
      break;
    }
    case GgufValueType::kBool: {
      const uint8_t b = c.u8(what);
      if (b > 1) throw c.error(what + ": bool value " + std::to_string(b) + " is neither 0 nor 1");
      v.integer = b;
      break;
    }
    case GgufValueType::kString:
      v.string = c.str(what);
      break;
    case GgufValueType::kArray:
      throw c.error(what + ": nested arrays are not supported");
  }
  return v;
}

GgufValue read_value(Cursor& c, const std::string& what) {
  const uint32_t t = c.u32(what + " type");
  if (!valid_value_type(t)) throw c.error(what + ": unknown value type " + std::to_string(t));
  const auto type = static_cast<GgufValueType>(t);
  if (type != GgufValueType::kArray) return read_scalar(c, type, what);
  GgufValue v;
  v.type = type;
  const uint32_t et = c.u32(what + " array element type");
  if (!valid_value_type(et)) throw c.error(what + ": unknown array element type " + std::to_string(et));
  v.array_type = static_cast<GgufValueType>(et);
  if (v.array_type == GgufValueType::kArray) throw c.error(what + ": nested arrays are not supported");
  const uint64_t n = c.u64(what + " array length");
  if (n > c.left() / min_value_bytes(v.array_type))
    throw c.error("truncated or corrupt: " + what + " claims " + std::to_string(n) + " elements of type " +
                  gguf_value_type_name(v.array_type) + ", but only " + std::to_string(c.left()) +
                  " bytes are left");
  v.array.reserve(static_cast<size_t>(n));
  for (uint64_t i = 0; i < n; ++i) v.array.push_back(read_scalar(c, v.array_type, what));
  return v;
}

void dequantize(const uint8_t* raw, uint32_t type, int64_t n, float* out) {
  switch (type) {
    case 0:
      for (int64_t i = 0; i < n; ++i) out[i] = get_f32(raw + 4 * i);
      return;
    case 1:
      for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_fp32(get_u16(raw + 2 * i));
      return;
    case 30:
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_fp32(get_u16(raw + 2 * i));
      return;
    case 8:
      dequantize_q8_0(raw, n, out);
      return;
    default:
      return;
  }
}

}  // namespace

std::vector<int64_t> GgufTensor::shape() const {
  std::vector<int64_t> s;
  for (auto d = dims.rbegin(); d != dims.rend(); ++d) s.push_back(static_cast<int64_t>(*d));
  return s;
}

int64_t GgufTensor::numel() const {
  int64_t n = 1;
  for (uint64_t d : dims) n *= static_cast<int64_t>(d);
  return n;
}

bool GgufFile::has(const std::string& key) const {
  for (const auto& kv : metadata)
    if (kv.first == key) return true;
  return false;
}

const GgufValue& GgufFile::at(const std::string& key) const {
  for (const auto& kv : metadata)
    if (kv.first == key) return kv.second;
  throw GgufError(path + ": metadata key " + key + " is missing");
}

int64_t GgufFile::get_int(const std::string& key) const {
  const GgufValue& v = at(key);
  if (!v.is_integer())
    throw GgufError(path + ": metadata key " + key + " is " + gguf_value_type_name(v.type) +
                    ", expected an integer");
  return v.integer;
}

double GgufFile::get_float(const std::string& key) const {
  const GgufValue& v = at(key);
  if (!v.is_float())
    throw GgufError(path + ": metadata key " + key + " is " + gguf_value_type_name(v.type) +
                    ", expected a float");
  return v.number;
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = at(key);
  if (v.type != GgufValueType::kBool)
    throw GgufError(path + ": metadata key " + key + " is " + gguf_value_type_name(v.type) +
                    ", expected a bool");
  return v.integer != 0;
}

const std::string& GgufFile::get_string(const std::string& key) const {
  const GgufValue& v = at(key);
  if (v.type != GgufValueType::kString)
    throw GgufError(path + ": metadata key " + key + " is " + gguf_value_type_name(v.type) +
                    ", expected a string");
  return v.string;
}

std::vector<std::string> GgufFile::get_strings(const std::string& key) const {
  const GgufValue& v = at(key);
  if (v.type != GgufValueType::kArray || v.array_type != GgufValueType::kString)
    throw GgufError(path + ": metadata key " + key + " is not an array of strings");
  std::vector<std::string> out;
  out.reserve(v.array.size());
  for (const auto& e : v.array) out.push_back(e.string);
  return out;
}

std::vector<int64_t> GgufFile::get_ints(const std::string& key) const {
  const GgufValue& v = at(key);
  GgufValue probe;
  probe.type = v.array_type;
  if (v.type != GgufValueType::kArray || !probe.is_integer())
    throw GgufError(path + ": metadata key " + key + " is not an array of integers");
  std::vector<int64_t> out;
  out.reserve(v.array.size());
  for (const auto& e : v.array) out.push_back(e.integer);
  return out;
}

const GgufTensor* GgufFile::find_tensor(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

const GgufTensor& GgufFile::tensor(const std::string& name) const {
  if (const GgufTensor* t = find_tensor(name)) return *t;
  throw GgufError(path + ": no tensor named " + name);
}

namespace {

GgufFile read_gguf_from(std::istream& in, const std::string& path, const GgufReadOptions& options) {
  Cursor c(in, path);
  GgufFile f;
  f.path = path;
  f.file_size = c.size();

  char magic[4];
  c.read(magic, 4, "magic");
  if (std::memcmp(magic, "GGUF", 4) != 0) throw c.error("not a GGUF file (the magic is not \"GGUF\")");
  f.version = c.u32("version");
  if (f.version == 0x02000000u || f.version == 0x03000000u)
    throw c.error("big-endian GGUF files are not supported");
  if (f.version != 2 && f.version != 3)
    throw c.error("GGUF version " + std::to_string(f.version) + " is not supported (2 or 3 expected)");
  const uint64_t n_tensors = c.u64("tensor count");
  const uint64_t n_kv = c.u64("metadata count");
  // Each metadata entry takes at least 8 (key) + 4 (type) + 1 bytes; each tensor info at least 8 + 4 + 8 + 4
  // + 8.
  if (n_kv > c.left() / 13)
    throw c.error("truncated or corrupt header: " + std::to_string(n_kv) +
                  " metadata entries cannot fit in " + std::to_string(c.left()) + " bytes");
  std::set<std::string> keys;
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string what = "metadata entry " + std::to_string(i);
    std::string key = c.str(what + " key");
    if (key.empty()) throw c.error(what + " has an empty key");
    if (!keys.insert(key).second) throw c.error("metadata key " + key + " appears twice");
    GgufValue v = read_value(c, "metadata " + key);
    f.metadata.emplace_back(std::move(key), std::move(v));
  }
  if (f.has("general.alignment")) {
    const GgufValue& a = f.at("general.alignment");
    if (a.type != GgufValueType::kUint32)
      throw c.error(std::string("general.alignment is ") + gguf_value_type_name(a.type) + ", expected u32");
    if (a.integer == 0 || (a.integer & (a.integer - 1)) != 0)
      throw c.error("general.alignment " + std::to_string(a.integer) + " is not a power of two");
    f.alignment = static_cast<uint64_t>(a.integer);
  }

  if (n_tensors > c.left() / 32)
    throw c.error("truncated or corrupt header: " + std::to_string(n_tensors) +
                  " tensor infos cannot fit in " + std::to_string(c.left()) + " bytes");
  std::set<std::string> names;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    const std::string what = "tensor info " + std::to_string(i);
    GgufTensor t;
    t.name = c.str(what + " name");
    if (t.name.empty()) throw c.error(what + " has an empty name");
    if (!names.insert(t.name).second) throw c.error("tensor " + t.name + " appears twice");
    const uint32_t n_dims = c.u32(what + " n_dims");
    if (n_dims < 1 || n_dims > kMaxDims)
      throw c.error("tensor " + t.name + " has " + std::to_string(n_dims) + " dimensions (1 to 4 allowed)");
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t dim = c.u64("tensor " + t.name + " dims");
      if (dim == 0 || dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / numel)
        throw c.error("tensor " + t.name + " has an invalid dimension " + std::to_string(dim));
      numel *= dim;
      t.dims.push_back(dim);
    }
    t.type = c.u32("tensor " + t.name + " type");
    const TypeTraits* traits = find_type(t.type);
    if (!traits) throw c.error("tensor " + t.name + " has unknown ggml type " + std::to_string(t.type));
    if (t.dims[0] % traits->block != 0)
      throw c.error("tensor " + t.name + " has a row of " + std::to_string(t.dims[0]) +
                    " elements, not a multiple of " + traits->name + "'s block of " +
                    std::to_string(traits->block));
    t.nbytes = numel / traits->block * traits->block_bytes;  // numel < 2^63 and block_bytes <= 8 * block
    t.offset = c.u64("tensor " + t.name + " offset");
    if (t.offset % f.alignment != 0)
      throw c.error("tensor " + t.name + " offset " + std::to_string(t.offset) +
                    " is not a multiple of the alignment " + std::to_string(f.alignment));
    f.tensors.push_back(std::move(t));
  }
  f.data_start = align_up(c.pos(), f.alignment);

  // Every tensor lies inside the file, and no two overlap.
  const uint64_t data_size = f.data_start <= f.file_size ? f.file_size - f.data_start : 0;
  std::vector<const GgufTensor*> by_offset;
  for (const auto& t : f.tensors) {
    if (f.data_start > f.file_size || t.offset > data_size || t.nbytes > data_size - t.offset)
      throw c.error("truncated: tensor " + t.name + " needs bytes " +
                    std::to_string(f.data_start + t.offset) + " to " +
                    std::to_string(f.data_start + t.offset + t.nbytes) + ", the file has " +
                    std::to_string(f.file_size));
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensor* a, const GgufTensor* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->offset < by_offset[i - 1]->offset + by_offset[i - 1]->nbytes)
      throw c.error("tensors " + by_offset[i - 1]->name + " and " + by_offset[i]->name + " overlap");
  }

  if (options.load_data || options.keep_raw) {
    std::vector<uint8_t> raw;
    for (auto& t : f.tensors) {
      const bool known = t.type == 0 || t.type == 1 || t.type == 8 || t.type == 30;
      if (options.load_data && !known)
        throw c.error("tensor " + t.name + " has type " + gguf_type_name(t.type) +
                      ", which this reader cannot dequantise (F32, F16, BF16 and Q8_0 only)");
      raw.resize(static_cast<size_t>(t.nbytes));
      c.seek(f.data_start + t.offset);
      c.read(raw.data(), t.nbytes, "tensor " + t.name + " data");
      if (options.load_data) {
        t.data.resize(static_cast<size_t>(t.numel()));
        dequantize(raw.data(), t.type, t.numel(), t.data.data());
      }
      if (options.keep_raw) t.raw = raw;
    }
  }
  return f;
}

}  // namespace

GgufFile read_gguf(const std::string& path, const GgufReadOptions& options) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw GgufError(path + ": cannot open: " + std::strerror(errno));
  return read_gguf_from(in, path, options);
}

GgufFile read_gguf_bytes(const std::string& bytes, const std::string& name, const GgufReadOptions& options) {
  std::istringstream in(bytes, std::ios::binary);
  return read_gguf_from(in, name, options);
}

}  // namespace llm
