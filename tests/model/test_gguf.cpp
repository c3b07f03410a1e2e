// GGUF export and our reader: round trips per type, alignment, the llama Q/K permutation, metadata,
// malformed files, and agreement with llama.cpp's own Python reader (gguf-py) through committed fixtures.
//
// The tensors written here come from a deterministic generator that dev/reference/gguf_check.py
// reproduces bit for bit (see test_value below), so the script can check our files value by value
// against gguf-py's quantisers. To write the files it checks:
//   LLM_GGUF_WRITE_DIR=/tmp/gguf ./build/tests/test_gguf --gtest_filter=GgufPython.WriteFilesForPython
// and to refresh the committed fixtures (then run gguf_check.py --write-json on them):
//   LLM_GGUF_WRITE_FIXTURES=1 ./build/tests/test_gguf --gtest_filter=GgufPython.WriteFilesForPython
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "llm/config.h"
#include "llm/gguf.h"
#include "llm/json_config.h"
#include "llm/model.h"
#include "llm/params.h"

namespace {

namespace fs = std::filesystem;
using llm::GgufError;
using llm::GgufFile;
using llm::GgufType;
using llm::ModelConfig;

const GgufType kAllTypes[] = {GgufType::kF32, GgufType::kF16, GgufType::kBF16, GgufType::kQ8_0};
const char* const kAllArchs[] = {"llama", "qwen2", "qwen3"};

class TempDir {
 public:
  explicit TempDir(const std::string& tag)
      : path_(fs::temp_directory_path() / ("llm_gguf_" + tag + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

uint32_t fnv1a32(const std::string& s) {
  uint32_t h = 2166136261u;
  for (unsigned char ch : s) h = (h ^ ch) * 16777619u;
  return h;
}

uint64_t fnv1a64(const uint8_t* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

// Element i of tensor `name` (our HF name). Exact in fp32 on every IEEE machine and in numpy:
//   u = fnv1a32(name) + i * 2654435761 (mod 2^32); u ^= u >> 15; u *= 2246822519 (mod 2^32); u ^= u >> 13
//   x = (u >> 8) * 2^-24 - 0.5
//   norms ("norm" in the name): 1 + x / 4
//   others: 0 in every 7th block of 32 (block % 7 == 3), else x * 2^(block % 5 - 2)
float test_value(const std::string& name, uint32_t name_hash, int64_t i) {
  uint32_t u = name_hash + static_cast<uint32_t>(i) * 2654435761u;
  u ^= u >> 15;
  u *= 2246822519u;
  u ^= u >> 13;
  const float x = static_cast<float>(u >> 8) * 5.9604644775390625e-8f - 0.5f;
  if (name.find("norm") != std::string::npos) return 1.0f + x * 0.25f;
  const int64_t block = i / 32;
  if (block % 7 == 3) return 0.0f;
  return std::ldexp(x, static_cast<int>(block % 5) - 2);
}

// The tiny model of each architecture that the tests and gguf_check.py use.
ModelConfig tiny_config(const std::string& arch) {
  ModelConfig c;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.d_ff = 64;
  c.n_layers = 2;
  c.vocab_size = 48;
  c.max_seq_len = 128;
  c.norm_eps = 1e-5;
  if (arch == "llama") {
    c.tie_word_embeddings = false;
    c.rope_theta = 10000.0;
    c.rope_scaling = "llama3";
    c.rope_scaling_factor = 8.0;
    c.rope_original_max_seq_len = 64;
  } else if (arch == "qwen2") {
    c.attention_bias = true;
    c.tie_word_embeddings = true;
    c.rope_theta = 1000000.0;
    c.norm_eps = 1e-6;
  } else if (arch == "qwen3") {
    c.qk_norm = true;
    c.head_dim = 16;
    c.tie_word_embeddings = false;
    c.rope_theta = 1000000.0;
    c.positional_encoding = "yarn";
    c.rope_scaling_factor = 4.0;
    c.rope_original_max_seq_len = 32;
    c.norm_eps = 1e-6;
  }
  return c;
}

llm::GgufTokenizer tiny_tokenizer(const std::string& arch) {
  llm::GgufTokenizer t;
  t.tokens = {"<pad>", "<s>", "</s>", "a", "b", "c", "ab", "Ġ", "Ġt", "he", "Ġthe", "é"};
  for (int i = static_cast<int>(t.tokens.size()); i < 40; ++i) t.tokens.push_back("tok" + std::to_string(i));
  t.token_types.assign(t.tokens.size(), 1);
  t.token_types[0] = t.token_types[1] = t.token_types[2] = 3;
  t.merges = {"a b", "Ġ t", "h e", "Ġt he"};
  t.bos = 1;
  t.eos = 2;
  t.pad = 0;
  t.pre = arch == "llama" ? "llama-bpe" : "qwen2";
  t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
  if (arch == "llama") t.add_bos_token = true;
  return t;
}

// The parameter arena of `config` filled by test_value.
std::vector<float> tiny_params(const llm::ParameterLayout& layout) {
  std::vector<float> arena(layout.total_elements());
  for (const auto& t : layout.tensors()) {
    const uint32_t h = fnv1a32(t.name);
    for (int64_t i = 0; i < t.numel; ++i) arena[t.offset + i] = test_value(t.name, h, i);
  }
  return arena;
}

std::string type_tag(GgufType t) {
  std::string s = llm::gguf_type_name(t);
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

void write_tiny(const std::string& path, const std::string& arch, GgufType type) {
  const ModelConfig c = tiny_config(arch);
  const llm::ParameterLayout layout(c);
  const std::vector<float> arena = tiny_params(layout);
  llm::write_gguf(path, c, layout, arena.data(), tiny_tokenizer(arch), type, arch, "tiny-" + arch);
}

// ---- scalar conversions ----

TEST(GgufConvert, Fp16RoundTripsEveryHalfAndRoundsTiesToEven) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = llm::fp16_to_fp32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(llm::fp16_to_fp32(llm::fp32_to_fp16(f))));
      continue;
    }
    ASSERT_EQ(llm::fp32_to_fp16(f), h) << "half 0x" << std::hex << h;
  }
  // Between consecutive positive finite halves: the midpoint goes to the even one, anything above it up.
  for (uint32_t h = 0; h < 0x7bff; ++h) {
    const double a = llm::fp16_to_fp32(static_cast<uint16_t>(h)),
                 b = llm::fp16_to_fp32(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((a + b) / 2);  // exact in fp32
    const uint32_t even = (h % 2 == 0) ? h : h + 1;
    ASSERT_EQ(llm::fp32_to_fp16(mid), even) << h;
    ASSERT_EQ(llm::fp32_to_fp16(std::nextafter(mid, 1e9f)), h + 1) << h;
    ASSERT_EQ(llm::fp32_to_fp16(std::nextafter(mid, 0.0f)), h) << h;
    ASSERT_EQ(llm::fp32_to_fp16(-mid), even | 0x8000) << h;
  }
  EXPECT_EQ(llm::fp32_to_fp16(65504.0f), 0x7bff);
  EXPECT_EQ(llm::fp32_to_fp16(65519.99f), 0x7bff);
  EXPECT_EQ(llm::fp32_to_fp16(65520.0f), 0x7c00);  // the tie with 65536 rounds to even: infinity
  EXPECT_EQ(llm::fp32_to_fp16(1e10f), 0x7c00);
  EXPECT_EQ(llm::fp32_to_fp16(-INFINITY), 0xfc00);
  EXPECT_EQ(llm::fp32_to_fp16(std::ldexp(1.0f, -25)), 0);  // half the smallest subnormal: tie to 0
  EXPECT_EQ(llm::fp32_to_fp16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 1);
}

TEST(GgufConvert, Bf16RoundsToNearestEven) {
  auto bits = [](uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  EXPECT_EQ(llm::fp32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(llm::fp32_to_bf16(bits(0x3f808000)), 0x3f80);  // tie, even stays
  EXPECT_EQ(llm::fp32_to_bf16(bits(0x3f818000)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(llm::fp32_to_bf16(bits(0x3f808001)), 0x3f81);
  EXPECT_EQ(llm::fp32_to_bf16(bits(0x7f7fffff)), 0x7f80);  // overflow to infinity
  EXPECT_TRUE(std::isnan(llm::bf16_to_fp32(llm::fp32_to_bf16(NAN))));
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  for (int i = 0; i < 10000; ++i) {
    const float x = dist(rng);
    const float y = llm::bf16_to_fp32(llm::fp32_to_bf16(x));
    ASSERT_LE(std::fabs(x - y), std::fabs(x) * std::ldexp(1.0f, -8)) << x;
  }
}

TEST(GgufConvert, Q8_0BlocksFollowGgml) {
  std::vector<float> x(64);
  for (int i = 0; i < 32; ++i) x[i] = (i - 16) * 0.37f;
  // Second block all zero: d = 0, q = 0.
  std::vector<uint8_t> q(68);
  llm::quantize_q8_0(x.data(), 64, q.data());
  const float amax = 16 * 0.37f, d = amax / 127.0f;
  EXPECT_EQ(q[0] | (q[1] << 8), llm::fp32_to_fp16(d));
  EXPECT_EQ(static_cast<int8_t>(q[2]), -127);  // x[0] = -amax
  for (int j = 0; j < 32; ++j)
    EXPECT_EQ(static_cast<int8_t>(q[2 + j]), static_cast<int>(std::round(x[j] * (1.0f / d)))) << j;
  for (int j = 0; j < 34; ++j) EXPECT_EQ(q[34 + j], 0) << j;
  std::vector<float> y(64);
  llm::dequantize_q8_0(q.data(), 64, y.data());
  const float d16 = llm::fp16_to_fp32(llm::fp32_to_fp16(d));
  for (int j = 0; j < 32; ++j) EXPECT_LE(std::fabs(x[j] - y[j]), d / 2 + 127 * std::fabs(d - d16) + 1e-7f);
  for (int j = 32; j < 64; ++j) EXPECT_EQ(y[j], 0.0f);
}

// ---- names and the permutation ----

TEST(GgufNames, MapEveryParameterBothWays) {
  for (const char* arch : kAllArchs) {
    const llm::ParameterLayout layout(tiny_config(arch));
    std::set<std::string> seen;
    for (const auto& t : layout.tensors()) {
      const std::string g = llm::gguf_tensor_name(t.name);
      EXPECT_TRUE(seen.insert(g).second) << g;
      EXPECT_EQ(llm::hf_tensor_name(g), t.name);
    }
  }
  EXPECT_EQ(llm::gguf_tensor_name("model.embed_tokens.weight"), "token_embd.weight");
  EXPECT_EQ(llm::gguf_tensor_name("lm_head.weight"), "output.weight");
  EXPECT_EQ(llm::gguf_tensor_name("model.norm.weight"), "output_norm.weight");
  EXPECT_EQ(llm::gguf_tensor_name("model.layers.11.self_attn.o_proj.weight"), "blk.11.attn_output.weight");
  EXPECT_EQ(llm::gguf_tensor_name("model.layers.0.post_attention_layernorm.weight"), "blk.0.ffn_norm.weight");
  EXPECT_EQ(llm::gguf_tensor_name("model.layers.3.self_attn.k_norm.weight"), "blk.3.attn_k_norm.weight");
  EXPECT_EQ(llm::gguf_tensor_name("model.layers.2.self_attn.q_proj.bias"), "blk.2.attn_q.bias");
  EXPECT_THROW(llm::gguf_tensor_name("model.embed_positions.weight"), GgufError);
  EXPECT_THROW(llm::gguf_tensor_name("model.layers.x.mlp.up_proj.weight"), GgufError);
  EXPECT_THROW(llm::hf_tensor_name("rope_freqs.weight"), GgufError);
  EXPECT_THROW(llm::hf_tensor_name("blk.1.attn_qkv.weight"), GgufError);
}

TEST(GgufPermute, MatchesTheConvertScriptsReshapeSwapaxes) {
  // convert_hf_to_gguf.py: w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).reshape(rows, cols),
  // i.e. out[h, i, j, c] = in[h, j, i, c] with out viewed as (n_head, half, 2, cols).
  const int n_head = 3, head_dim = 8, half = head_dim / 2, cols = 5, rows = n_head * head_dim;
  std::vector<float> in(rows * cols), out(rows * cols), back(rows * cols);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i);
  llm::permute_llama_qk(in.data(), out.data(), rows, cols, n_head);
  for (int h = 0; h < n_head; ++h)
    for (int i = 0; i < half; ++i)
      for (int j = 0; j < 2; ++j)
        for (int c = 0; c < cols; ++c)
          ASSERT_EQ(out[((h * half + i) * 2 + j) * cols + c], in[((h * 2 + j) * half + i) * cols + c]);
  llm::unpermute_llama_qk(out.data(), back.data(), rows, cols, n_head);
  EXPECT_EQ(back, in);
}

// ---- round trips ----

struct RoundTripCase {
  std::string arch;
  GgufType type;
};

class GgufRoundTrip : public ::testing::TestWithParam<RoundTripCase> {};

TEST_P(GgufRoundTrip, ReadBackMatchesWithinTheTypesRounding) {
  const auto [arch, type] = GetParam();
  TempDir dir("rt_" + arch + "_" + type_tag(type));
  const std::string path = dir.file("model.gguf");
  const ModelConfig c = tiny_config(arch);
  const llm::ParameterLayout layout(c);
  const std::vector<float> arena = tiny_params(layout);
  llm::write_gguf(path, c, layout, arena.data(), tiny_tokenizer(arch), type, arch);
  EXPECT_FALSE(fs::exists(path + ".tmp." + std::to_string(::getpid())));

  const GgufFile f = llm::read_gguf(path);
  EXPECT_EQ(f.version, 3u);
  size_t expected_count = layout.tensors().size() + (c.rope_scaling == "llama3" ? 1 : 0);
  ASSERT_EQ(f.tensors.size(), expected_count);

  for (const auto& info : layout.tensors()) {
    SCOPED_TRACE(info.name);
    const llm::GgufTensor& t = f.tensor(llm::gguf_tensor_name(info.name));
    ASSERT_EQ(t.shape(), info.shape);
    const bool one_d = info.shape.size() == 1;
    ASSERT_EQ(t.type, static_cast<uint32_t>(one_d ? GgufType::kF32 : type));
    std::vector<float> got = t.data;
    const bool permuted = arch == "llama" && (info.name.find("q_proj") != std::string::npos ||
                                              info.name.find("k_proj") != std::string::npos);
    if (permuted) {
      const int heads = info.name.find("k_proj") != std::string::npos ? c.n_kv_heads : c.n_heads;
      llm::unpermute_llama_qk(t.data.data(), got.data(), info.shape[0], info.numel / info.shape[0], heads);
    }
    const float* want = arena.data() + info.offset;
    const GgufType stored = static_cast<GgufType>(t.type);
    for (int64_t i = 0; i < info.numel; ++i) {
      const float x = want[i], y = got[static_cast<size_t>(i)];
      switch (stored) {
        case GgufType::kF32:
          ASSERT_EQ(y, x) << i;
          break;
        case GgufType::kF16:
          ASSERT_EQ(y, llm::fp16_to_fp32(llm::fp32_to_fp16(x))) << i;
          ASSERT_LE(std::fabs(y - x), std::fabs(x) * std::ldexp(1.0f, -11) + std::ldexp(1.0f, -25)) << i;
          break;
        case GgufType::kBF16:
          ASSERT_LE(std::fabs(y - x), std::fabs(x) * std::ldexp(1.0f, -8)) << i;
          break;
        case GgufType::kQ8_0: {
          // d = amax/127 of the block as written (the permutation moves whole rows, and rows are
          // multiples of 32, so a block of the GGUF row is a block of one HF row).
          const int64_t b0 = i / 32 * 32;
          float amax = 0;
          for (int64_t j = b0; j < b0 + 32; ++j) amax = std::max(amax, std::fabs(want[j]));
          const float d = amax / 127.0f, d16 = llm::fp16_to_fp32(llm::fp32_to_fp16(d));
          ASSERT_LE(std::fabs(y - x), d / 2 + 127 * std::fabs(d - d16) + 1e-9f) << i;
          break;
        }
      }
    }
  }
}

std::vector<RoundTripCase> all_cases() {
  std::vector<RoundTripCase> out;
  for (const char* a : kAllArchs)
    for (GgufType t : kAllTypes) out.push_back({a, t});
  return out;
}

INSTANTIATE_TEST_SUITE_P(AllArchsAndTypes, GgufRoundTrip, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<RoundTripCase>& info) {
                           return info.param.arch + "_" + type_tag(info.param.type);
                         });

TEST(Gguf, PermutationIsAppliedForLlamaOnly) {
  TempDir dir("perm");
  for (const char* arch : {"llama", "qwen2"}) {
    const std::string path = dir.file(std::string(arch) + ".gguf");
    write_tiny(path, arch, GgufType::kF32);
    const GgufFile f = llm::read_gguf(path);
    const ModelConfig c = tiny_config(arch);
    const llm::ParameterLayout layout(c);
    const std::vector<float> arena = tiny_params(layout);
    for (const char* name :
         {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"}) {
      const auto& info = layout.at(name);
      const auto& t = f.tensor(llm::gguf_tensor_name(name));
      std::vector<float> expect(arena.begin() + info.offset, arena.begin() + info.offset + info.numel);
      if (std::string(arch) == "llama") {
        const int heads = std::string(name).find("k_proj") != std::string::npos ? c.n_kv_heads : c.n_heads;
        std::vector<float> permuted(expect.size());
        llm::permute_llama_qk(expect.data(), permuted.data(), info.shape[0], info.shape[1], heads);
        EXPECT_NE(permuted, expect);
        expect = permuted;
      }
      EXPECT_EQ(t.data, expect) << arch << " " << name;
    }
  }
}

TEST(Gguf, EveryTensorOffsetAndTheDataStartAreAlignedTo32) {
  TempDir dir("align");
  for (const char* arch : kAllArchs) {
    for (GgufType type : kAllTypes) {
      const std::string path = dir.file("m.gguf");
      write_tiny(path, arch, type);
      const GgufFile f = llm::read_gguf(path, {false, false});
      EXPECT_EQ(f.get_int("general.alignment"), 32);
      EXPECT_EQ(f.alignment, 32u);
      EXPECT_EQ(f.data_start % 32, 0u);
      for (const auto& t : f.tensors) EXPECT_EQ(t.offset % 32, 0u) << t.name;
      // Tensors are packed in order with only the alignment padding between them.
      uint64_t expect_offset = 0;
      for (const auto& t : f.tensors) {
        EXPECT_EQ(t.offset, expect_offset) << t.name;
        expect_offset = (t.offset + t.nbytes + 31) / 32 * 32;
      }
      EXPECT_EQ(f.file_size, f.data_start + expect_offset);
    }
  }
}

TEST(Gguf, MetadataValues) {
  TempDir dir("meta");
  {
    const std::string path = dir.file("llama.gguf");
    write_tiny(path, "llama", GgufType::kQ8_0);
    const GgufFile f = llm::read_gguf(path);
    EXPECT_EQ(f.metadata.front().first, "general.architecture");
    EXPECT_EQ(f.get_string("general.architecture"), "llama");
    EXPECT_EQ(f.get_string("general.name"), "tiny-llama");
    EXPECT_EQ(f.get_int("general.file_type"), 7);
    EXPECT_EQ(f.get_int("general.quantization_version"), 2);
    EXPECT_EQ(f.at("llama.context_length").type, llm::GgufValueType::kUint32);
    EXPECT_EQ(f.get_int("llama.context_length"), 128);
    EXPECT_EQ(f.get_int("llama.embedding_length"), 32);
    EXPECT_EQ(f.get_int("llama.block_count"), 2);
    EXPECT_EQ(f.get_int("llama.feed_forward_length"), 64);
    EXPECT_EQ(f.get_int("llama.attention.head_count"), 4);
    EXPECT_EQ(f.get_int("llama.attention.head_count_kv"), 2);
    EXPECT_EQ(f.get_int("llama.attention.key_length"), 8);
    EXPECT_EQ(f.get_int("llama.rope.dimension_count"), 8);
    EXPECT_EQ(f.get_int("llama.vocab_size"), 48);
    EXPECT_EQ(f.at("llama.attention.layer_norm_rms_epsilon").type, llm::GgufValueType::kFloat32);
    EXPECT_EQ(f.get_float("llama.attention.layer_norm_rms_epsilon"), static_cast<double>(1e-5f));
    EXPECT_EQ(f.get_float("llama.rope.freq_base"), 10000.0);
    EXPECT_FALSE(f.has("llama.rope.scaling.type"));  // llama3 scaling travels as rope_freqs.weight
    const auto& freqs = f.tensor("rope_freqs.weight");
    EXPECT_EQ(freqs.type, 0u);
    EXPECT_EQ(freqs.data, llm::llama3_rope_freq_factors(tiny_config("llama")));
    // head_dim 8, theta 1e4: wavelengths 6.3, 63, 628, 6283 against 64/4 = 16 and 64/1 = 64.
    ASSERT_EQ(freqs.data.size(), 4u);
    EXPECT_EQ(freqs.data[0], 1.0f);
    EXPECT_GT(freqs.data[1], 1.0f);
    EXPECT_LT(freqs.data[1], 8.0f);
    EXPECT_EQ(freqs.data[2], 8.0f);
    EXPECT_EQ(freqs.data[3], 8.0f);
    EXPECT_TRUE(f.find_tensor("output.weight"));  // untied

    EXPECT_EQ(f.get_string("tokenizer.ggml.model"), "gpt2");
    EXPECT_EQ(f.get_string("tokenizer.ggml.pre"), "llama-bpe");
    const auto tokens = f.get_strings("tokenizer.ggml.tokens");
    ASSERT_EQ(tokens.size(), 48u);  // padded to vocab_size
    EXPECT_EQ(tokens[10], "Ġthe");
    EXPECT_EQ(tokens[11], "é");
    EXPECT_EQ(tokens[40], "[PAD40]");
    const auto types = f.get_ints("tokenizer.ggml.token_type");
    ASSERT_EQ(types.size(), 48u);
    EXPECT_EQ(f.at("tokenizer.ggml.token_type").array_type, llm::GgufValueType::kInt32);
    EXPECT_EQ(types[1], 3);
    EXPECT_EQ(types[5], 1);
    EXPECT_EQ(types[47], 5);
    EXPECT_EQ(f.get_strings("tokenizer.ggml.merges"), tiny_tokenizer("llama").merges);
    EXPECT_EQ(f.get_int("tokenizer.ggml.bos_token_id"), 1);
    EXPECT_EQ(f.get_int("tokenizer.ggml.eos_token_id"), 2);
    EXPECT_EQ(f.get_int("tokenizer.ggml.padding_token_id"), 0);
    EXPECT_TRUE(f.get_bool("tokenizer.ggml.add_bos_token"));
    EXPECT_EQ(f.get_string("tokenizer.chat_template"), tiny_tokenizer("llama").chat_template);
    EXPECT_THROW(f.get_string("llama.block_count"), GgufError);
    EXPECT_THROW(f.get_int("no.such.key"), GgufError);
  }
  {
    const std::string path = dir.file("qwen2.gguf");
    write_tiny(path, "qwen2", GgufType::kF16);
    const GgufFile f = llm::read_gguf(path);
    EXPECT_EQ(f.get_string("general.architecture"), "qwen2");
    EXPECT_EQ(f.get_int("general.file_type"), 1);
    EXPECT_EQ(f.get_float("qwen2.rope.freq_base"), 1e6);
    EXPECT_EQ(f.get_int("qwen2.context_length"), 128);
    EXPECT_FALSE(f.find_tensor("output.weight"));  // tied
    EXPECT_FALSE(f.find_tensor("rope_freqs.weight"));
    EXPECT_TRUE(f.find_tensor("blk.1.attn_k.bias"));
    EXPECT_FALSE(f.has("tokenizer.ggml.add_bos_token"));
    EXPECT_EQ(f.get_string("tokenizer.ggml.pre"), "qwen2");
  }
  {
    const std::string path = dir.file("qwen3.gguf");
    write_tiny(path, "qwen3", GgufType::kBF16);
    const GgufFile f = llm::read_gguf(path);
    EXPECT_EQ(f.get_int("general.file_type"), 32);
    EXPECT_EQ(f.get_int("qwen3.attention.key_length"), 16);
    EXPECT_EQ(f.get_int("qwen3.attention.value_length"), 16);
    EXPECT_EQ(f.get_int("qwen3.rope.dimension_count"), 16);
    EXPECT_EQ(f.get_string("qwen3.rope.scaling.type"), "yarn");
    EXPECT_EQ(f.get_float("qwen3.rope.scaling.factor"), 4.0);
    EXPECT_EQ(f.get_int("qwen3.rope.scaling.original_context_length"), 32);
    EXPECT_EQ(f.get_float("qwen3.rope.scaling.yarn_beta_fast"), 32.0);
    EXPECT_EQ(f.get_float("qwen3.rope.scaling.yarn_beta_slow"), 1.0);
    EXPECT_FALSE(f.has("qwen3.rope.scaling.yarn_attn_factor"));  // 0 in the config: llama.cpp's default
    EXPECT_EQ(f.tensor("blk.0.attn_q_norm.weight").shape(), std::vector<int64_t>({16}));
    EXPECT_EQ(f.tensor("blk.0.attn_q.weight").shape(), std::vector<int64_t>({64, 32}));
    EXPECT_EQ(f.tensor("blk.0.attn_q.weight").dims, std::vector<uint64_t>({32, 64}));
  }
  {  // linear scaling
    ModelConfig c = tiny_config("qwen2");
    c.rope_scaling = "linear";
    c.rope_scaling_factor = 2.0;
    const llm::ParameterLayout layout(c);
    const auto arena = tiny_params(layout);
    const std::string path = dir.file("linear.gguf");
    llm::write_gguf(path, c, layout, arena.data(), tiny_tokenizer("qwen2"), GgufType::kF32, "qwen2");
    const GgufFile f = llm::read_gguf(path, {false, false});
    EXPECT_EQ(f.get_string("qwen2.rope.scaling.type"), "linear");
    EXPECT_EQ(f.get_float("qwen2.rope.scaling.factor"), 2.0);
  }
}

TEST(Gguf, TypesPerTensorAndTheQ8FallbackToF16) {
  ModelConfig c = tiny_config("qwen2");
  c.d_ff = 48;  // ffn_down rows of 48 elements: not a multiple of 32
  const llm::ParameterLayout layout(c);
  const auto arena = tiny_params(layout);
  std::vector<llm::GgufSourceTensor> src;
  for (const auto& t : layout.tensors()) src.push_back({t.name, t.shape, arena.data() + t.offset});
  for (const auto& p : llm::plan_gguf(c, src, GgufType::kQ8_0, "qwen2")) {
    SCOPED_TRACE(p.gguf_name);
    if (p.dims.size() == 1)
      EXPECT_EQ(p.type, GgufType::kF32);
    else if (p.gguf_name.find("ffn_down") != std::string::npos)
      EXPECT_EQ(p.type, GgufType::kF16);
    else
      EXPECT_EQ(p.type, GgufType::kQ8_0);
    EXPECT_FALSE(p.permute_qk);
  }
  TempDir dir("fallback");
  llm::write_gguf(dir.file("m.gguf"), c, src, tiny_tokenizer("qwen2"), GgufType::kQ8_0, "qwen2");
  const GgufFile f = llm::read_gguf(dir.file("m.gguf"));
  EXPECT_EQ(f.tensor("blk.0.ffn_down.weight").type, 1u);
  EXPECT_EQ(f.tensor("blk.0.ffn_up.weight").type, 8u);
  EXPECT_EQ(f.tensor("token_embd.weight").type, 8u);
  EXPECT_EQ(f.tensor("blk.0.attn_norm.weight").type, 0u);
  EXPECT_EQ(f.tensor("blk.0.attn_q.bias").type, 0u);
}

// ---- bad exports ----

std::string export_error(const ModelConfig& c, const std::vector<llm::GgufSourceTensor>& src,
                         const llm::GgufTokenizer& tok, const std::string& arch, const std::string& path) {
  try {
    llm::write_gguf(path, c, src, tok, GgufType::kF16, arch);
  } catch (const GgufError& e) {
    return e.what();
  }
  return "";
}

TEST(Gguf, BadExportsAreRefusedWithoutTouchingTheTarget) {
  TempDir dir("badexport");
  const std::string path = dir.file("out.gguf");
  const ModelConfig c = tiny_config("qwen2");
  const llm::ParameterLayout layout(c);
  auto arena = tiny_params(layout);
  std::vector<llm::GgufSourceTensor> src;
  for (const auto& t : layout.tensors()) src.push_back({t.name, t.shape, arena.data() + t.offset});
  const auto tok = tiny_tokenizer("qwen2");
  write_bytes(path, "previous");

  auto missing = src;
  missing.erase(missing.begin() + 3);
  EXPECT_NE(export_error(c, missing, tok, "qwen2", path).find("is missing"), std::string::npos);
  auto reshaped = src;
  reshaped[1].shape = {7};
  EXPECT_NE(export_error(c, reshaped, tok, "qwen2", path).find("has shape [7]"), std::string::npos);
  auto extra = src;
  extra.push_back({"lm_head.weight", {48, 32}, arena.data()});
  EXPECT_NE(export_error(c, extra, tok, "qwen2", path).find("not a parameter"), std::string::npos);
  EXPECT_NE(export_error(c, src, tok, "gpt2", path).find("arch must be"), std::string::npos);
  EXPECT_NE(export_error(c, src, tok, "qwen3", path).find("qk_norm"), std::string::npos);
  ModelConfig no_bias = tiny_config("qwen2");
  no_bias.attention_bias = false;
  EXPECT_NE(export_error(no_bias, src, tok, "qwen2", path).find("attention_bias"), std::string::npos);
  ModelConfig layernorm = c;
  layernorm.norm_type = "layernorm";
  EXPECT_NE(export_error(layernorm, src, tok, "qwen2", path).find("rmsnorm"), std::string::npos);
  ModelConfig llama3 = c;
  llama3.rope_scaling = "llama3";
  EXPECT_NE(export_error(llama3, src, tok, "qwen2", path).find("llama3"), std::string::npos);

  auto big = tok;
  for (int i = 0; i < 10; ++i) big.tokens.push_back("x" + std::to_string(i));
  big.token_types.clear();
  EXPECT_NE(export_error(c, src, big, "qwen2", path).find("more than vocab_size"), std::string::npos);
  auto bad_bos = tok;
  bad_bos.bos = 48;
  EXPECT_NE(export_error(c, src, bad_bos, "qwen2", path).find("bos token id 48"), std::string::npos);
  EXPECT_NE(export_error(c, src, llm::GgufTokenizer{}, "qwen2", path).find("no tokens"), std::string::npos);

  arena[layout.at("model.layers.1.mlp.up_proj.weight").offset + 5] = NAN;
  const std::string nan_error = export_error(c, src, tok, "qwen2", path);
  EXPECT_NE(nan_error.find("model.layers.1.mlp.up_proj.weight has a non-finite value"), std::string::npos)
      << nan_error;

  EXPECT_EQ(read_bytes(path), "previous");
  for (const auto& entry : fs::directory_iterator(dir.path()))
    EXPECT_EQ(entry.path().filename(), "out.gguf") << "left behind: " << entry.path();
}

// ---- malformed files ----

std::string read_error(const std::string& path, llm::GgufReadOptions options = {}) {
  try {
    llm::read_gguf(path, options);
  } catch (const GgufError& e) {
    return e.what();
  }
  return "";
}

std::string bytes_error(const std::string& bytes, llm::GgufReadOptions options = {}) {
  try {
    llm::read_gguf_bytes(bytes, "mem.gguf", options);
  } catch (const GgufError& e) {
    return e.what();
  }
  return "";
}

TEST(GgufReader, EveryTruncationIsRejectedCleanly) {
  TempDir dir("trunc");
  const std::string good = dir.file("good.gguf");
  write_tiny(good, "qwen2", GgufType::kQ8_0);
  const std::string bytes = read_bytes(good);
  EXPECT_EQ(bytes_error(bytes), "");
  // Every length through the header and tensor table, then strides through the data (in memory: the
  // same checks as on disk).
  const uint64_t data_start = llm::read_gguf_bytes(bytes, "mem.gguf", {false, false}).data_start;
  for (size_t n = 0; n < bytes.size(); n += (n < data_start + 64 ? 1 : 37)) {
    const std::string e = bytes_error(bytes.substr(0, n));
    ASSERT_FALSE(e.empty()) << "a file cut to " << n << " bytes was accepted";
    ASSERT_EQ(e.rfind("mem.gguf: ", 0), 0u) << e;
    ASSERT_NE(e.find("truncated"), std::string::npos) << n << ": " << e;
  }
  // And a few on disk.
  const std::string cut = dir.file("cut.gguf");
  for (size_t n : {size_t{0}, size_t{3}, size_t{30}, size_t{200}, bytes.size() - 1}) {
    write_bytes(cut, bytes.substr(0, n));
    const std::string e = read_error(cut);
    EXPECT_EQ(e.rfind(cut + ": ", 0), 0u) << e;
    EXPECT_NE(e.find("truncated"), std::string::npos) << e;
  }
  EXPECT_NE(read_error(dir.file("absent.gguf")).find("cannot open"), std::string::npos);
}

// A hand-built GGUF file, for files our writer would never produce.
struct Builder {
  std::string b;
  void u8(uint8_t v) { b.push_back(static_cast<char>(v)); }
  void u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  void u64(uint64_t v) {
    for (int i = 0; i < 8; ++i) b.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  void str(const std::string& s) {
    u64(s.size());
    b += s;
  }
  void header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    b = "GGUF";
    u32(version);
    u64(n_tensors);
    u64(n_kv);
  }
  void kv_u32(const std::string& k, uint32_t v) {
    str(k);
    u32(4);
    u32(v);
  }
  void tensor(const std::string& name, std::vector<uint64_t> dims, uint32_t type, uint64_t offset) {
    str(name);
    u32(static_cast<uint32_t>(dims.size()));
    for (uint64_t d : dims) u64(d);
    u32(type);
    u64(offset);
  }
  void pad(size_t a = 32) {
    while (b.size() % a) u8(0);
  }
  void zeros(size_t n) { b.append(n, '\0'); }
};

TEST(GgufReader, CorruptFilesAreRejectedWithAClearMessage) {
  auto expect_error = [&](const Builder& g, const std::string& needle, llm::GgufReadOptions o = {}) {
    const std::string e = bytes_error(g.b, o);
    EXPECT_NE(e.find(needle), std::string::npos) << "expected \"" << needle << "\", got \"" << e << "\"";
  };
  Builder ok;  // one F32 tensor [4] and one key: valid
  ok.header(1, 1);
  ok.kv_u32("general.alignment", 32);
  ok.tensor("w", {4}, 0, 0);
  ok.pad();
  ok.zeros(16);
  EXPECT_EQ(llm::read_gguf_bytes(ok.b, "ok.gguf").tensor("w").data, std::vector<float>(4, 0.0f));

  Builder g;
  g.b = "GGML";
  g.u32(3);
  expect_error(g, "not a GGUF file");
  g.header(0, 0, 1);
  expect_error(g, "version 1 is not supported");
  g.header(0, 0, 0x03000000);
  expect_error(g, "big-endian");
  g.header(0, 1ull << 60);
  expect_error(g, "metadata entries cannot fit");
  g.header(1ull << 60, 0);
  expect_error(g, "tensor infos cannot fit");
  g.header(0, 1);
  g.u64(1ull << 62);  // key length
  g.zeros(16);
  expect_error(g, "claims 4611686018427387904 bytes");
  g.header(0, 1);
  g.str("k");
  g.u32(13);
  expect_error(g, "unknown value type 13");
  g.header(0, 1);
  g.str("k");
  g.u32(9);
  g.u32(8);
  g.u64(1ull << 40);
  expect_error(g, "claims 1099511627776 elements");
  g.header(0, 1);
  g.str("k");
  g.u32(9);
  g.u32(9);
  g.u64(1);
  expect_error(g, "nested arrays");
  g.header(0, 1);
  g.str("k");
  g.u32(7);
  g.u8(2);
  expect_error(g, "neither 0 nor 1");
  g.header(0, 2);
  g.kv_u32("k", 1);
  g.kv_u32("k", 2);
  expect_error(g, "metadata key k appears twice");
  g.header(0, 1);
  g.kv_u32("general.alignment", 24);
  expect_error(g, "not a power of two");
  g.header(0, 1);
  g.str("general.alignment");
  g.u32(10);
  g.u64(32);
  expect_error(g, "general.alignment is u64, expected u32");

  auto one_tensor = [&](std::vector<uint64_t> dims, uint32_t type, uint64_t offset, size_t data_bytes) {
    Builder t;
    t.header(1, 0);
    t.tensor("w", std::move(dims), type, offset);
    t.pad();
    t.zeros(data_bytes);
    return t;
  };
  expect_error(one_tensor({1, 1, 1, 1, 1}, 0, 0, 4), "5 dimensions");
  expect_error(one_tensor({4, 0}, 0, 0, 64), "invalid dimension 0");
  expect_error(one_tensor({1ull << 40, 1ull << 40}, 0, 0, 64), "invalid dimension");
  expect_error(one_tensor({4}, 77, 0, 64), "unknown ggml type 77");
  expect_error(one_tensor({40}, 8, 0, 64), "not a multiple of Q8_0's block of 32");
  expect_error(one_tensor({4}, 0, 16, 64), "offset 16 is not a multiple of the alignment 32");
  expect_error(one_tensor({4}, 0, 1ull << 62, 64), "truncated: tensor w");
  expect_error(one_tensor({32}, 0, 0, 100), "truncated: tensor w");
  expect_error(one_tensor({32}, 2, 0, 18), "cannot dequantise");  // Q4_0
  {
    // Without dequantising, the table and the raw bytes of a Q4_0 tensor are fine.
    const GgufFile f = llm::read_gguf_bytes(one_tensor({32}, 2, 0, 18).b, "q4.gguf", {false, true});
    EXPECT_EQ(f.tensor("w").nbytes, 18u);
    EXPECT_EQ(f.tensor("w").raw.size(), 18u);
  }
  Builder two;
  two.header(2, 0);
  two.tensor("a", {16}, 0, 0);
  two.tensor("b", {16}, 0, 32);
  two.pad();
  two.zeros(96);
  expect_error(two, "tensors a and b overlap");
  Builder dup;
  dup.header(2, 0);
  dup.tensor("a", {4}, 0, 0);
  dup.tensor("a", {4}, 0, 32);
  dup.pad();
  dup.zeros(64);
  expect_error(dup, "tensor a appears twice");
}

TEST(GgufReader, RandomCorruptionNeverCrashes) {
  TempDir dir("fuzz");
  const std::string good = dir.file("good.gguf");
  write_tiny(good, "llama", GgufType::kQ8_0);
  const std::string bytes = read_bytes(good);
  const uint64_t header_end = llm::read_gguf(good, {false, false}).data_start;
  std::mt19937 rng(1234);
  int rejected = 0;
  for (int trial = 0; trial < 5000; ++trial) {
    std::string b = bytes;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      const size_t at = rng() % header_end;
      b[at] = static_cast<char>(trial % 3 == 0 ? 0xff : static_cast<int>(rng() & 0xff));
    }
    try {
      llm::read_gguf_bytes(b, "fuzz.gguf");
    } catch (const GgufError&) {
      ++rejected;
    }  // any other exception fails the test
  }
  EXPECT_GT(rejected, 0);
}

// ---- agreement with gguf-py ----

const char* const kFixtures[] = {"llama_q8_0", "qwen2_f16", "qwen3_bf16"};

std::string fixture_dir() {
  return std::string(LLM_SOURCE_DIR) + "/tests/fixtures/gguf";
}

void write_fixture(const std::string& path, const std::string& name) {
  const std::string arch = name.substr(0, name.find('_'));
  write_tiny(path, arch, llm::parse_gguf_type(name.substr(name.find('_') + 1)));
}

// Writes the files dev/reference/gguf_check.py checks; skipped unless asked for.
TEST(GgufPython, WriteFilesForPython) {
  const char* dir = std::getenv("LLM_GGUF_WRITE_DIR");
  const char* fixtures = std::getenv("LLM_GGUF_WRITE_FIXTURES");
  if (!dir && !fixtures)
    GTEST_SKIP() << "set LLM_GGUF_WRITE_DIR=DIR or LLM_GGUF_WRITE_FIXTURES=1 to write files";
  if (dir) {
    fs::create_directories(dir);
    for (const char* arch : kAllArchs) {
      for (GgufType t : kAllTypes) {
        // The file, and our CPU model's logits on the weights as the file stores them (read back with our
        // reader, un-permuted), for gguf_check.py --llama-cpp to compare with llama.cpp's.
        const std::string base = std::string(dir) + "/" + arch + "_" + type_tag(t);
        write_tiny(base + ".gguf", arch, t);
        const ModelConfig c = tiny_config(arch);
        const std::vector<int32_t> tokens = {1, 3, 4, 5, 9, 10, 7, 20, 33, 2, 17, 6};
        const int T = static_cast<int>(tokens.size());
        llm::Model<float> model(c, llm::ModelOptions{1, T, false});
        const GgufFile f = llm::read_gguf(base + ".gguf");
        for (const auto& info : model.layout().tensors()) {
          const auto& stored = f.tensor(llm::gguf_tensor_name(info.name)).data;
          float* dst = model.param(info.name);
          if (std::string(arch) == "llama" && (info.name.find("q_proj") != std::string::npos ||
                                               info.name.find("k_proj") != std::string::npos)) {
            const int heads = info.name.find("k_proj") != std::string::npos ? c.n_kv_heads : c.n_heads;
            llm::unpermute_llama_qk(stored.data(), dst, info.shape[0], info.numel / info.shape[0], heads);
          } else {
            std::copy(stored.begin(), stored.end(), dst);
          }
        }
        model.set_training(false);
        model.forward(tokens.data(), nullptr, 1, T);
        llm::json out;
        out["tokens"] = tokens;
        out["logits"] = llm::json::array();
        for (int i = 0; i < T; ++i)
          out["logits"].push_back(
              std::vector<float>(model.logits() + i * c.vocab_size, model.logits() + (i + 1) * c.vocab_size));
        std::ofstream(base + ".logits.json") << out.dump() << "\n";
      }
    }
  }
  if (fixtures) {
    fs::create_directories(fixture_dir());
    for (const char* name : kFixtures) write_fixture(fixture_dir() + "/" + name + ".gguf", name);
  }
}

TEST(GgufPython, CommittedFixturesAreWhatOurWriterWrites) {
  TempDir dir("fixture");
  for (const char* name : kFixtures) {
    const std::string committed = fixture_dir() + "/" + name + ".gguf";
    ASSERT_TRUE(fs::exists(committed)) << committed;
    write_fixture(dir.file("f.gguf"), name);
    EXPECT_TRUE(read_bytes(dir.file("f.gguf")) == read_bytes(committed))
        << name << ": the writer's output changed; regenerate the fixtures (see the top of this file)";
  }
}

TEST(GgufPython, OurReaderSeesWhatGgufPySaw) {
  for (const char* name : kFixtures) {
    SCOPED_TRACE(name);
    const std::string base = fixture_dir() + "/" + name;
    const llm::json seen = llm::parse_json_file(base + ".json");
    const GgufFile f = llm::read_gguf(base + ".gguf", {true, true});
    EXPECT_EQ(seen.at("checks_passed").get<bool>(), true);
    EXPECT_EQ(f.data_start, seen.at("data_offset").get<uint64_t>());
    EXPECT_EQ(f.alignment, seen.at("alignment").get<uint64_t>());

    const auto& meta = seen.at("metadata");
    EXPECT_EQ(meta.size(), f.metadata.size());
    for (const auto& [key, value] : f.metadata) {
      SCOPED_TRACE(key);
      ASSERT_TRUE(meta.contains(key));
      const auto& m = meta.at(key);
      EXPECT_EQ(m.at("type").get<std::string>(), llm::gguf_value_type_name(value.type));
      auto check_scalar = [&](const llm::GgufValue& v, const llm::json& j) {
        if (v.type == llm::GgufValueType::kString)
          EXPECT_EQ(j.get<std::string>(), v.string);
        else if (v.is_float())
          EXPECT_EQ(j.get<double>(), v.number);
        else if (v.type == llm::GgufValueType::kBool)
          EXPECT_EQ(j.get<bool>(), v.integer != 0);
        else
          EXPECT_EQ(j.get<int64_t>(), v.integer);
      };
      if (value.type == llm::GgufValueType::kArray) {
        EXPECT_EQ(m.at("element_type").get<std::string>(), llm::gguf_value_type_name(value.array_type));
        const auto& items = m.at("value");
        ASSERT_EQ(items.size(), value.array.size());
        for (size_t i = 0; i < items.size(); ++i) check_scalar(value.array[i], items[i]);
      } else {
        check_scalar(value, m.at("value"));
      }
    }

    const auto& tensors = seen.at("tensors");
    ASSERT_EQ(tensors.size(), f.tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      const auto& j = tensors[i];
      const auto& t = f.tensors[i];
      SCOPED_TRACE(t.name);
      EXPECT_EQ(j.at("name").get<std::string>(), t.name);
      EXPECT_EQ(j.at("type").get<std::string>(), llm::gguf_type_name(t.type));
      EXPECT_EQ(j.at("dims").get<std::vector<uint64_t>>(), t.dims);
      EXPECT_EQ(j.at("n_bytes").get<uint64_t>(), t.nbytes);
      EXPECT_EQ(j.at("data_offset").get<uint64_t>(), f.data_start + t.offset);
      char hex[17];
      std::snprintf(hex, sizeof hex, "%016llx",
                    static_cast<unsigned long long>(fnv1a64(t.raw.data(), t.raw.size())));
      EXPECT_EQ(j.at("raw_fnv1a64").get<std::string>(), hex);
      double sum = 0, abs_sum = 0;
      for (float v : t.data) {
        sum += v;
        abs_sum += std::fabs(v);
      }
      EXPECT_NEAR(j.at("sum").get<double>(), sum, 1e-9 * abs_sum + 1e-12);
      EXPECT_NEAR(j.at("abs_sum").get<double>(), abs_sum, 1e-9 * abs_sum + 1e-12);
      const auto first = j.at("first").get<std::vector<double>>();
      for (size_t k = 0; k < first.size(); ++k) EXPECT_EQ(first[k], static_cast<double>(t.data[k])) << k;
    }
  }
}

}  // namespace
