// PEFT-format LoRA adapters (llm/lora_adapter.h) and merging, against the real peft library.
//
// tests/fixtures/peft/ is written by dev/reference/peft_fixtures.py: a tiny random Qwen2 model (base/),
// two adapters saved by peft's save_pretrained (adapter/: r 4, alpha 8, all seven linears;
// adapter_rslora/: r 6, alpha 8, rsLoRA, q_proj and v_proj), and expected.json with the PEFT model's
// logits for fixed input ids.
//
// Tolerance for logits: max |ours - PEFT| <= 1e-4 * max(1, max |PEFT|). Ours run in fp32 (about 1e-7
// relative per operation, accumulated over sums of at most 128 terms and two layers); the reference ran
// the same fp32 weights in float64 except the RMSNorm statistics (fp32 in transformers), and is stored to
// 8 significant digits. A wrongly mapped or scaled adapter moves the logits by more than 1 (the fixture
// script checks that each adapter changes them by over 0.1).
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "llm/hf_config.h"
#include "llm/hf_model.h"
#include "llm/json_config.h"
#include "llm/lora.h"
#include "llm/lora_adapter.h"
#include "llm/model.h"
#include "llm/params.h"
#include "llm/safetensors.h"

namespace {

namespace fs = std::filesystem;
using llm::json;

const std::string kFixtures = std::string(LLM_SOURCE_DIR) + "/tests/fixtures/peft";

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "lora_adapter_XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string str() const { return path_.string(); }
  std::string sub(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

struct Fixture {
  llm::HfConfigImport imported;
  std::vector<float> base;  // ParameterLayout(config) arena
  json expected;
  std::vector<int32_t> ids;
  int B = 0, T = 0, V = 0;
};

const Fixture& fixture() {
  static const Fixture f = [] {
    Fixture x;
    x.imported = llm::load_hf_config(kFixtures + "/base");
    x.base = llm::load_hf_parameters(kFixtures + "/base", x.imported.config);
    x.expected = llm::parse_json_file(kFixtures + "/expected.json");
    const json& ids = x.expected["input_ids"];
    x.B = static_cast<int>(ids.size());
    x.T = static_cast<int>(ids[0].size());
    for (const auto& row : ids)
      for (const auto& id : row) x.ids.push_back(id.get<int32_t>());
    x.V = x.expected["vocab_size"].get<int>();
    return x;
  }();
  return f;
}

std::vector<double> expected_logits(const std::string& key) {
  const json& j = key == "base" ? fixture().expected["base_logits"] : fixture().expected[key]["logits"];
  return j.get<std::vector<double>>();
}

// Forward of `model` on the fixture's ids; returns the logits [B, T, V].
std::vector<double> run(llm::Model<float>& model) {
  const Fixture& f = fixture();
  model.set_training(false);
  model.forward(f.ids.data(), nullptr, f.B, f.T);
  const float* l = model.logits();
  return std::vector<double>(l, l + static_cast<size_t>(f.B) * f.T * f.V);
}

llm::ModelOptions options_for_fixture() {
  llm::ModelOptions o;
  o.max_batch = fixture().B;
  o.max_seq = fixture().T;
  return o;
}

// Logits of a plain model with the given base arena.
std::vector<double> plain_logits(const std::vector<float>& params) {
  llm::Model<float> model(fixture().imported.config, options_for_fixture());
  EXPECT_EQ(model.parameters().size(), params.size());
  std::copy(params.begin(), params.end(), model.parameters().begin());
  return run(model);
}

// max |a - b| / max(1, max |b|), printed with `what`.
double scaled_error(const std::vector<double>& a, const std::vector<double>& b, const std::string& what) {
  EXPECT_EQ(a.size(), b.size());
  double diff = 0, scale = 1;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    diff = std::max(diff, std::fabs(a[i] - b[i]));
    scale = std::max(scale, std::fabs(b[i]));
  }
  std::printf("%s: max |diff| %.3g, logit scale %.3g, scaled %.3g\n", what.c_str(), diff, scale,
              diff / scale);
  return diff / scale;
}

constexpr double kTolerance = 1e-4;

llm::PeftAdapter load_fixture_adapter(const std::string& key) {
  return llm::load_peft_adapter(kFixtures + "/" + key, fixture().imported.config);
}

// ---- The fixture: PEFT's files, PEFT's logits ----

TEST(PeftFixture, BaseLogitsMatchTransformers) {
  EXPECT_LT(scaled_error(plain_logits(fixture().base), expected_logits("base"), "base"), kTolerance);
}

TEST(PeftFixture, ReadsPeftAdapterConfig) {
  const llm::PeftAdapter a = load_fixture_adapter("adapter");
  EXPECT_TRUE(a.settings.enabled);
  EXPECT_EQ(a.settings.r, 4);
  EXPECT_EQ(a.settings.alpha, 8.0);
  EXPECT_FALSE(a.settings.rslora);
  EXPECT_EQ(a.settings.dropout, 0.0);
  EXPECT_FLOAT_EQ(a.scale(), 2.0f);
  EXPECT_EQ(a.settings.target_modules, llm::lora_module_names());  // all seven, in model order
  EXPECT_EQ(a.base_model_name_or_path, "tests/fixtures/peft/base");
  const llm::ModelConfig& config = fixture().imported.config;
  EXPECT_EQ(a.modules.size(), 7u * config.n_layers);
  EXPECT_EQ(a.tensors.size(), 2 * a.modules.size());
  // The settings reproduce the same modules, so a LoRA model built from them has the adapter's layout.
  const std::vector<llm::LoraModule> again = llm::lora_modules(config, a.settings);
  ASSERT_EQ(again.size(), a.modules.size());
  for (size_t i = 0; i < again.size(); ++i) EXPECT_EQ(again[i].prefix, a.modules[i].prefix);
  EXPECT_EQ(a.tensors.at("model.layers.1.mlp.down_proj.lora_A.weight").size(), 4u * config.d_ff);
  EXPECT_EQ(a.tensors.at("model.layers.0.self_attn.k_proj.lora_B.weight").size(),
            4u * config.n_kv_heads * config.resolved_head_dim());

  const llm::PeftAdapter rs = load_fixture_adapter("adapter_rslora");
  EXPECT_EQ(rs.settings.r, 6);
  EXPECT_TRUE(rs.settings.rslora);
  EXPECT_FLOAT_EQ(rs.scale(), static_cast<float>(8.0 / std::sqrt(6.0)));
  EXPECT_EQ(rs.settings.target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(rs.modules.size(), 2u * config.n_layers);
  EXPECT_FLOAT_EQ(rs.scale(),
                  static_cast<float>(fixture().expected["adapter_rslora"]["scale"].get<double>()));
  EXPECT_FLOAT_EQ(a.scale(), static_cast<float>(fixture().expected["adapter"]["scale"].get<double>()));
}

class PeftLogits : public ::testing::TestWithParam<const char*> {};

TEST_P(PeftLogits, MergedEqualsPeft) {
  const std::string key = GetParam();
  const llm::PeftAdapter adapter = load_fixture_adapter(key);
  std::vector<float> params = fixture().base;
  llm::merge_lora_into(fixture().imported.config, adapter, params);
  const std::vector<double> want = expected_logits(key);
  EXPECT_LT(scaled_error(plain_logits(params), want, key + " merged"), kTolerance);
  // And the adapter matters: the base alone is far from PEFT's adapted logits.
  EXPECT_GT(scaled_error(plain_logits(fixture().base), want, key + " (base alone)"), 100 * kTolerance);
}

TEST_P(PeftLogits, UnmergedEqualsPeft) {
  const std::string key = GetParam();
  const llm::PeftAdapter adapter = load_fixture_adapter(key);
  llm::ModelOptions options = options_for_fixture();
  options.lora = adapter.settings;
  llm::Model<float> model(fixture().imported.config, options);
  const std::vector<float>& base = fixture().base;
  ASSERT_EQ(
      model.parameters().size(), base.size() + [&] {
        size_t n = 0;
        for (const auto& [name, values] : adapter.tensors) n += values.size();
        return n;
      }());
  std::copy(base.begin(), base.end(), model.parameters().begin());  // the base part keeps its offsets
  llm::copy_adapter_tensors(adapter, model.layout(), model.parameters().data());
  EXPECT_LT(scaled_error(run(model), expected_logits(key), key + " unmerged"), kTolerance);
}

INSTANTIATE_TEST_SUITE_P(Adapters, PeftLogits, ::testing::Values("adapter", "adapter_rslora"));

// QLoRA: merging into nf4_round_trip_base gives what the NF4 LoRA model computes unmerged.
TEST(PeftFixture, Nf4MergeMatchesQloraModel) {
  for (bool double_quant : {true, false}) {
    const llm::PeftAdapter adapter = load_fixture_adapter("adapter");
    llm::ModelOptions options = options_for_fixture();
    options.lora = adapter.settings;
    options.quant.nf4 = true;
    options.quant.double_quant = double_quant;
    llm::Model<float> qlora(fixture().imported.config, options);
    const std::vector<float>& base = fixture().base;
    std::copy(base.begin(), base.end(), qlora.parameters().begin());
    qlora.quantize_base_nf4();
    llm::copy_adapter_tensors(adapter, qlora.layout(), qlora.parameters().data());

    std::vector<float> rounded = base;
    llm::nf4_round_trip_base(fixture().imported.config, options.quant, rounded);
    // The round trip is exactly the model's dequantised base.
    for (const std::string& name : llm::nf4_quantized_tensors(fixture().imported.config)) {
      const llm::TensorInfo& t = qlora.layout().at(name);
      for (int64_t i = 0; i < t.numel; ++i) ASSERT_EQ(rounded[t.offset + i], qlora.param(name)[i]) << name;
    }
    EXPECT_NE(rounded, base);
    std::vector<float> merged = rounded;
    llm::merge_lora_into(fixture().imported.config, adapter, merged);
    const std::vector<double> unmerged = run(qlora);
    EXPECT_LT(
        scaled_error(plain_logits(merged), unmerged,
                     std::string("nf4 merged vs QLoRA model, double_quant ") + (double_quant ? "on" : "off")),
        kTolerance);
  }
}

// ---- Saving ----

llm::ModelConfig small_config() {
  llm::ModelConfig c;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.d_ff = 48;
  c.n_layers = 2;
  c.vocab_size = 50;
  c.max_seq_len = 16;
  c.attention_bias = true;
  c.tie_word_embeddings = false;
  return c;
}

TEST(PeftSave, RoundTripAndConfigFields) {
  const llm::ModelConfig config = small_config();
  llm::LoraSettings s;
  s.enabled = true;
  s.preset = "attention_only";
  s.r = 3;
  s.alpha = 5.5;
  s.dropout = 0.1;
  s.rslora = true;
  llm::ParameterLayout layout(config);
  const size_t base_total = layout.total_elements();
  const std::vector<llm::LoraModule> modules = llm::lora_modules(config, s);
  llm::add_lora_tensors(layout, modules, s.r);
  std::vector<float> params(layout.total_elements());
  for (size_t i = 0; i < params.size(); ++i) params[i] = std::sin(0.37f * static_cast<float>(i)) * 0.3f;

  TempDir tmp;
  const std::string dir = tmp.sub("out/adapter");  // the folder is created
  llm::save_peft_adapter(dir, config, s, layout, params.data(), "org/base-model");

  // adapter_config.json: PEFT's LoraConfig keys.
  const json j = llm::parse_json_file(dir + "/adapter_config.json");
  EXPECT_EQ(j["peft_type"], "LORA");
  EXPECT_EQ(j["task_type"], "CAUSAL_LM");
  EXPECT_EQ(j["r"], 3);
  EXPECT_EQ(j["lora_alpha"].get<double>(), 5.5);
  EXPECT_DOUBLE_EQ(j["lora_dropout"].get<double>(), 0.1);
  EXPECT_EQ(j["target_modules"], (json{"q_proj", "k_proj", "v_proj", "o_proj"}));
  EXPECT_EQ(j["use_rslora"], true);
  EXPECT_EQ(j["use_dora"], false);
  EXPECT_EQ(j["bias"], "none");
  EXPECT_EQ(j["fan_in_fan_out"], false);
  EXPECT_EQ(j["inference_mode"], true);
  EXPECT_EQ(j["init_lora_weights"], true);
  EXPECT_EQ(j["base_model_name_or_path"], "org/base-model");
  EXPECT_TRUE(j["modules_to_save"].is_null());
  EXPECT_TRUE(j["layers_to_transform"].is_null());
  EXPECT_EQ(j["rank_pattern"], json::object());
  EXPECT_EQ(j["alpha_pattern"], json::object());
  // No temporary files are left behind.
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.push_back(e.path().filename().string());
  std::sort(files.begin(), files.end());
  EXPECT_EQ(files, (std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"}));

  // adapter_model.safetensors: PEFT's names and shapes, nothing else.
  const llm::SafetensorsFile file(dir + "/adapter_model.safetensors");
  EXPECT_EQ(file.tensors().size(), 2 * modules.size());
  for (const auto& m : modules) {
    const llm::SafetensorsTensor* a = file.find("base_model.model." + m.prefix + ".lora_A.weight");
    const llm::SafetensorsTensor* b = file.find("base_model.model." + m.prefix + ".lora_B.weight");
    ASSERT_NE(a, nullptr) << m.prefix;
    ASSERT_NE(b, nullptr) << m.prefix;
    EXPECT_EQ(a->shape, (std::vector<int64_t>{3, m.in_features}));
    EXPECT_EQ(b->shape, (std::vector<int64_t>{m.out_features, 3}));
    EXPECT_EQ(a->dtype, llm::SafeDType::kF32);
  }
  EXPECT_NE(file.find("base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"), nullptr);

  // Loading gives back the settings and every value bit for bit.
  const llm::PeftAdapter back = llm::load_peft_adapter(dir, config);
  EXPECT_EQ(back.settings.r, 3);
  EXPECT_EQ(back.settings.alpha, 5.5);
  EXPECT_DOUBLE_EQ(back.settings.dropout, 0.1);
  EXPECT_TRUE(back.settings.rslora);
  EXPECT_EQ(back.settings.target_modules, (std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj"}));
  EXPECT_EQ(back.base_model_name_or_path, "org/base-model");
  ASSERT_EQ(back.modules.size(), modules.size());
  std::vector<float> again(layout.total_elements(), 0.0f);
  std::copy(params.begin(), params.begin() + static_cast<long>(base_total), again.begin());
  llm::copy_adapter_tensors(back, layout, again.data());
  EXPECT_EQ(again, params);

  // From the trainable tensors alone, each at its grad_offset (as a backend reads them for a LoRA run):
  // the same files, byte for byte.
  std::vector<float> trainable = llm::gather_trainable(layout, params.data());
  const std::string from_trainable = tmp.sub("from_trainable");
  llm::save_peft_adapter_from_trainable(from_trainable, config, s, layout, trainable, "org/base-model");
  const auto bytes = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  for (const char* file : {"/adapter_model.safetensors", "/adapter_config.json"})
    EXPECT_EQ(bytes(dir + file), bytes(from_trainable + file)) << file;
  trainable.pop_back();
  EXPECT_THROW(llm::save_peft_adapter_from_trainable(tmp.sub("short"), config, s, layout, trainable, ""),
               llm::AdapterError);

  // An integer alpha is written as an integer, as PEFT does; bf16 rounds each value once.
  s.alpha = 16;
  const std::string dir16 = tmp.sub("bf16");
  llm::save_peft_adapter(dir16, config, s, layout, params.data(), "", llm::SafeDType::kBF16);
  const json j16 = llm::parse_json_file(dir16 + "/adapter_config.json");
  EXPECT_TRUE(j16["lora_alpha"].is_number_integer());
  EXPECT_TRUE(j16["base_model_name_or_path"].is_null());
  const llm::PeftAdapter b16 = llm::load_peft_adapter(dir16, config);
  for (const auto& [name, values] : b16.tensors) {
    const llm::TensorInfo& t = layout.at(name);
    for (size_t i = 0; i < values.size(); ++i) {
      ASSERT_EQ(values[i], llm::bf16_to_float(llm::float_to_bf16(params[t.offset + i]))) << name;
    }
  }
}

// PEFT's adapter, loaded and saved again by us, is the same adapter: same names, shapes, values. With
// LLM_PEFT_EXPORT_DIR set, the saved folder is kept there so that dev/reference/peft_fixtures.py
// --check-adapter can load it with PEFT.
TEST(PeftSave, ResavedFixtureAdapterIsIdentical) {
  for (const char* key : {"adapter", "adapter_rslora"}) {
    const llm::PeftAdapter a = load_fixture_adapter(key);
    const llm::ModelConfig& config = fixture().imported.config;
    llm::ParameterLayout layout(config);
    llm::add_lora_tensors(layout, llm::lora_modules(config, a.settings), a.settings.r);
    std::vector<float> params(layout.total_elements(), 0.0f);
    llm::copy_adapter_tensors(a, layout, params.data());
    TempDir tmp;
    const char* keep = std::getenv("LLM_PEFT_EXPORT_DIR");
    const std::string dir = keep != nullptr ? std::string(keep) + "/" + key : tmp.sub(key);
    llm::save_peft_adapter(dir, config, a.settings, layout, params.data(), a.base_model_name_or_path);
    const llm::SafetensorsFile theirs(kFixtures + "/" + key + "/adapter_model.safetensors");
    const llm::SafetensorsFile ours(dir + "/adapter_model.safetensors");
    ASSERT_EQ(ours.tensors().size(), theirs.tensors().size());
    for (const auto& t : theirs.tensors()) {
      const llm::SafetensorsTensor* o = ours.find(t.name);
      ASSERT_NE(o, nullptr) << t.name;
      EXPECT_EQ(o->shape, t.shape);
      EXPECT_EQ(ours.read_floats(t.name), theirs.read_floats(t.name)) << t.name;
    }
    const json mine = llm::parse_json_file(dir + "/adapter_config.json");
    const json peft = llm::parse_json_file(kFixtures + "/" + key + "/adapter_config.json");
    for (const char* field :
         {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias",
          "fan_in_fan_out", "base_model_name_or_path", "modules_to_save", "rank_pattern", "alpha_pattern",
          "layers_to_transform", "init_lora_weights"}) {
      EXPECT_EQ(mine[field], peft[field]) << key << " " << field;
    }
    std::vector<std::string> want = peft["target_modules"].get<std::vector<std::string>>();
    std::vector<std::string> got = mine["target_modules"].get<std::vector<std::string>>();
    std::sort(want.begin(), want.end());
    std::sort(got.begin(), got.end());
    EXPECT_EQ(got, want) << key;  // PEFT writes a set: the order is arbitrary
  }
}

TEST(PeftSave, RefusesBadInput) {
  const llm::ModelConfig config = small_config();
  llm::LoraSettings s;
  s.enabled = true;
  s.preset = "minimal";
  s.r = 2;
  llm::ParameterLayout layout(config);
  std::vector<float> plain(layout.total_elements(), 0.0f);
  TempDir tmp;
  // A layout without the adapter tensors.
  try {
    llm::save_peft_adapter(tmp.sub("a"), config, s, layout, plain.data(), "");
    FAIL() << "expected an error";
  } catch (const llm::AdapterError& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.self_attn.q_proj.lora_A.weight"), std::string::npos)
        << e.what();
  }
  // A layout made with another rank.
  llm::add_lora_tensors(layout, llm::lora_modules(config, s), 4);
  std::vector<float> params(layout.total_elements(), 0.0f);
  try {
    llm::save_peft_adapter(tmp.sub("b"), config, s, layout, params.data(), "");
    FAIL() << "expected an error";
  } catch (const llm::AdapterError& e) {
    EXPECT_NE(std::string(e.what()).find("has shape [4, 32], the adapter needs [2, 32]"), std::string::npos)
        << e.what();
  }
  s.enabled = false;
  EXPECT_THROW(llm::save_peft_adapter(tmp.sub("c"), config, s, layout, params.data(), ""), llm::AdapterError);
  EXPECT_FALSE(fs::exists(tmp.sub("a")));  // checked before anything is written
}

// ---- Load errors: each broken folder gives the intended message ----

// A writable copy of the fixture adapter whose config and tensors a test can change.
class BrokenAdapter : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = tmp_.sub("adapter");
    fs::create_directories(dir_);
    tensors_.clear();
    config_ = llm::parse_json_file(kFixtures + "/adapter/adapter_config.json");
    const llm::SafetensorsFile file(kFixtures + "/adapter/adapter_model.safetensors");
    for (const auto& t : file.tensors()) tensors_.push_back({t.name, t.shape, file.read_floats(t.name)});
  }

  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float> values;
  };

  void write() {
    std::ofstream(dir_ + "/adapter_config.json") << config_.dump(2);
    std::vector<llm::SafetensorsWriteTensor> list;
    for (const auto& t : tensors_) list.push_back({t.name, t.shape, t.values.data()});
    llm::write_safetensors(dir_ + "/adapter_model.safetensors", list, llm::SafeDType::kF32);
  }

  // The message of the error loading the folder gives; fails the test when it loads.
  std::string error() {
    try {
      llm::load_peft_adapter(dir_, fixture().imported.config);
    } catch (const llm::AdapterError& e) {
      return e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not an AdapterError: " << e.what();
      return e.what();
    }
    ADD_FAILURE() << "the broken adapter loaded";
    return "";
  }

  // Writes the folder and checks that the error names each of `parts`.
  void expect_error(const std::vector<std::string>& parts) {
    write();
    const std::string message = error();
    for (const auto& part : parts) EXPECT_NE(message.find(part), std::string::npos) << message;
  }

  Tensor& tensor(const std::string& name) {
    for (auto& t : tensors_)
      if (t.name == name) return t;
    throw std::runtime_error("no fixture tensor " + name);
  }
  void erase(const std::string& name) {
    tensors_.erase(
        std::remove_if(tensors_.begin(), tensors_.end(), [&](const Tensor& t) { return t.name == name; }),
        tensors_.end());
  }

  TempDir tmp_;
  std::string dir_;
  json config_;
  std::vector<Tensor> tensors_;
};

const std::string kQA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const std::string kQB = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

TEST_F(BrokenAdapter, UnchangedCopyLoads) {
  write();
  const llm::PeftAdapter a = llm::load_peft_adapter(dir_, fixture().imported.config);
  EXPECT_EQ(a.modules.size(), 14u);
}

TEST_F(BrokenAdapter, MissingFolderAndFiles) {
  try {
    llm::load_peft_adapter(tmp_.sub("nowhere"), fixture().imported.config);
    FAIL();
  } catch (const llm::AdapterError& e) {
    EXPECT_NE(std::string(e.what()).find("nowhere: no such adapter folder"), std::string::npos) << e.what();
  }
  write();
  fs::remove(dir_ + "/adapter_config.json");
  EXPECT_NE(error().find(dir_ + "/adapter_config.json: missing"), std::string::npos);
  write();
  fs::remove(dir_ + "/adapter_model.safetensors");
  EXPECT_NE(error().find(dir_ + "/adapter_model.safetensors: missing"), std::string::npos);
  std::ofstream(dir_ + "/adapter_model.bin") << "pickle";
  EXPECT_NE(error().find("adapter_model.bin: PyTorch pickle adapters are not supported"), std::string::npos);
}

TEST_F(BrokenAdapter, MalformedConfig) {
  write();
  std::ofstream(dir_ + "/adapter_config.json") << "{\"r\": 4,\n \"peft_type\": }";
  const std::string m = error();
  EXPECT_NE(m.find("adapter_config.json:2:"), std::string::npos) << m;
  EXPECT_NE(m.find("malformed JSON"), std::string::npos) << m;
  std::ofstream(dir_ + "/adapter_config.json") << "[1, 2]";
  EXPECT_NE(error().find("adapter_config.json: expected a JSON object"), std::string::npos);
}

TEST_F(BrokenAdapter, PeftType) {
  config_["peft_type"] = "PREFIX_TUNING";
  expect_error({"adapter_config.json: peft_type", "\"PREFIX_TUNING\" is not supported"});
  config_.erase("peft_type");
  expect_error({"adapter_config.json: peft_type: missing"});
}

TEST_F(BrokenAdapter, TaskType) {
  config_["task_type"] = "SEQ_CLS";
  expect_error({"adapter_config.json: task_type", "\"SEQ_CLS\" is not supported"});
}

TEST_F(BrokenAdapter, FanInFanOut) {
  config_["fan_in_fan_out"] = true;
  expect_error({"adapter_config.json: fan_in_fan_out: true is not supported"});
}

TEST_F(BrokenAdapter, Dora) {
  config_["use_dora"] = true;
  expect_error({"adapter_config.json: use_dora: DoRA adapters are not supported"});
}

TEST_F(BrokenAdapter, RankAndAlphaPatterns) {
  config_["rank_pattern"] = {{"q_proj", 8}};
  expect_error({"adapter_config.json: rank_pattern", "not supported", "q_proj"});
  config_["rank_pattern"] = json::object();
  config_["alpha_pattern"] = {{"model.layers.0.self_attn.v_proj", 32}};
  expect_error({"adapter_config.json: alpha_pattern", "not supported"});
}

TEST_F(BrokenAdapter, OtherUnsupportedOptions) {
  const std::vector<std::pair<std::string, json>> cases = {
      {"bias", "all"},
      {"modules_to_save", json{"lm_head"}},
      {"lora_bias", true},
      {"use_qalora", true},
      {"layer_replication", json{json{0, 2}}},
      {"alora_invocation_tokens", json{5, 6}},
      {"target_parameters", json{"mlp.experts.down_proj"}},
      {"init_lora_weights", "pissa_niter_4"},
      {"init_lora_weights", "loftq"},
  };
  for (const auto& [key, value] : cases) {
    const json saved = config_;
    config_[key] = value;
    expect_error({"adapter_config.json: " + key, "not supported"});
    config_ = saved;
  }
  // Harmless options load.
  config_["init_lora_weights"] = "gaussian";
  config_["layers_to_transform"] = nullptr;
  config_["velora_config"] = nullptr;
  write();
  EXPECT_NO_THROW(llm::load_peft_adapter(dir_, fixture().imported.config));
}

TEST_F(BrokenAdapter, RankAndAlphaValues) {
  config_.erase("r");
  expect_error({"adapter_config.json: r: missing"});
  config_["r"] = 0;
  expect_error({"adapter_config.json: r: expected an integer >= 1, found 0"});
  config_["r"] = "4";
  expect_error({"adapter_config.json: r: expected an integer >= 1, found \"4\""});
  config_["r"] = 4;
  config_["lora_alpha"] = -1;
  expect_error({"adapter_config.json: lora_alpha: expected a number > 0, found -1"});
  config_["lora_alpha"] = 8;
  config_["use_rslora"] = "yes";
  expect_error({"adapter_config.json: use_rslora: expected true or false"});
}

TEST_F(BrokenAdapter, RankDisagreesWithTensors) {
  config_["r"] = 8;
  // The first tensor checked is named with its shape and the one r = 8 implies.
  expect_error({"adapter_model.safetensors: tensor base_model.model.model.layers.", "has shape [",
                ", expected [", "(r = 8 from adapter_config.json"});
}

TEST_F(BrokenAdapter, TargetModules) {
  config_["target_modules"] = {"q_proj",    "k_proj",  "v_proj",    "o_proj",
                               "gate_proj", "up_proj", "down_proj", "lm_head"};
  expect_error({"adapter_config.json: target_modules", "\"lm_head\" is not supported"});
  config_["target_modules"] = {"q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  expect_error({"has k_proj adapters, but", "adapter_config.json target_modules does not list k_proj"});
  config_["target_modules"] = 7;
  expect_error({"adapter_config.json: target_modules: expected a list of module names or a string"});
  // A regular expression (PEFT's string form): the tensors decide.
  config_["target_modules"] = ".*proj";
  write();
  EXPECT_EQ(llm::load_peft_adapter(dir_, fixture().imported.config).modules.size(), 14u);
}

TEST_F(BrokenAdapter, ListedModuleWithoutTensors) {
  for (int l = 0; l < 2; ++l) {
    erase("base_model.model.model.layers." + std::to_string(l) + ".mlp.up_proj.lora_A.weight");
    erase("base_model.model.model.layers." + std::to_string(l) + ".mlp.up_proj.lora_B.weight");
  }
  expect_error({"adapter_config.json: target_modules lists up_proj, but", "has no up_proj tensors"});
}

TEST_F(BrokenAdapter, TensorNamesThatDoNotMap) {
  const Tensor saved = tensor(kQA);
  for (const std::string& bad :
       {std::string("base_model.model.lm_head.lora_A.weight"),
        std::string("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"),
        std::string("model.layers.0.self_attn.q_proj.lora_A.weight"),
        std::string("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"),
        std::string("base_model.model.model.embed_tokens.lora_embedding_A")}) {
    tensor(kQA).name = bad;
    expect_error({"adapter_model.safetensors: tensor " + bad + " does not map onto this model"});
    tensor(bad).name = kQA;
  }
  // A base weight saved alongside (modules_to_save / bias "all" style) does not map either.
  tensors_.push_back({"base_model.model.model.layers.0.self_attn.q_proj.bias", {64}, std::vector<float>(64)});
  expect_error({"tensor base_model.model.model.layers.0.self_attn.q_proj.bias does not map onto this model"});
}

TEST_F(BrokenAdapter, WrongShape) {
  Tensor& b = tensor(kQB);
  b.shape = {32, 8};  // 256 values, like [64, 4], but the wrong shape
  expect_error({"tensor " + kQB + " has shape [32, 8], expected [64, 4]"});
}

TEST_F(BrokenAdapter, MissingHalfOfAPair) {
  erase(kQB);
  expect_error(
      {"adapter_model.safetensors: tensor " + kQB + " is missing (its pair " + kQA + " is present)"});
  SetUp();
  erase(kQA);
  expect_error({"tensor " + kQA + " is missing (its pair " + kQB + " is present)"});
}

TEST_F(BrokenAdapter, NoTensorsOrBadValues) {
  tensor(kQA).values[5] = std::nanf("");
  expect_error({"tensor " + kQA + " holds a NaN or infinite value"});
  tensors_.clear();
  expect_error({"adapter_model.safetensors: holds no LoRA tensors"});
}

TEST_F(BrokenAdapter, CorruptSafetensors) {
  write();
  std::ofstream(dir_ + "/adapter_model.safetensors", std::ios::binary | std::ios::trunc) << "\x08garbage";
  EXPECT_NE(error().find("adapter_model.safetensors"), std::string::npos);
}

TEST_F(BrokenAdapter, AdapterForAnotherModel) {
  write();
  llm::ModelConfig other = fixture().imported.config;
  other.d_model = 96;
  other.n_heads = 6;
  other.n_kv_heads = 3;
  try {
    llm::load_peft_adapter(dir_, other);
    FAIL();
  } catch (const llm::AdapterError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("adapter_model.safetensors: tensor base_model.model.model.layers."), std::string::npos)
        << m;
    EXPECT_NE(m.find("in / "), std::string::npos) << m;
  }
}

// ---- Merging and copying ----

TEST(PeftMerge, ChecksSizes) {
  const llm::PeftAdapter a = load_fixture_adapter("adapter");
  std::vector<float> short_arena(10);
  try {
    llm::merge_lora_into(fixture().imported.config, a, short_arena);
    FAIL();
  } catch (const llm::AdapterError& e) {
    EXPECT_NE(std::string(e.what()).find("the parameter arena holds 10 values"), std::string::npos);
  }
  llm::PeftAdapter broken = a;
  broken.tensors.at("model.layers.1.self_attn.v_proj.lora_B.weight").pop_back();
  std::vector<float> params = fixture().base;
  EXPECT_THROW(llm::merge_lora_into(fixture().imported.config, broken, params), llm::AdapterError);
  // An adapter on only some layers (PEFT's layers_to_transform) merges just those.
  llm::PeftAdapter layer1 = a;
  layer1.modules.erase(std::remove_if(layer1.modules.begin(), layer1.modules.end(),
                                      [](const llm::LoraModule& m) { return m.layer == 0; }),
                       layer1.modules.end());
  std::vector<float> merged = fixture().base;
  llm::merge_lora_into(fixture().imported.config, layer1, merged);
  const llm::ParameterLayout layout(fixture().imported.config);
  const llm::TensorInfo& q0 = layout.at("model.layers.0.self_attn.q_proj.weight");
  const llm::TensorInfo& q1 = layout.at("model.layers.1.self_attn.q_proj.weight");
  EXPECT_TRUE(std::equal(merged.begin() + q0.offset, merged.begin() + q0.offset + q0.numel,
                         fixture().base.begin() + q0.offset));
  EXPECT_FALSE(std::equal(merged.begin() + q1.offset, merged.begin() + q1.offset + q1.numel,
                          fixture().base.begin() + q1.offset));
}

TEST(PeftMerge, CopyNeedsMatchingLayout) {
  const llm::PeftAdapter rs = load_fixture_adapter("adapter_rslora");  // q_proj, v_proj, r 6
  const llm::ModelConfig& config = fixture().imported.config;
  llm::LoraSettings all;
  all.enabled = true;
  all.preset = "all";
  all.r = 6;
  llm::ParameterLayout layout(config);
  llm::add_lora_tensors(layout, llm::lora_modules(config, all), all.r);
  std::vector<float> params(layout.total_elements());
  try {
    llm::copy_adapter_tensors(rs, layout, params.data());
    FAIL();
  } catch (const llm::AdapterError& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.self_attn.k_proj.lora_A.weight"), std::string::npos)
        << e.what();
  }
  const llm::ParameterLayout plain(config);
  std::vector<float> base(plain.total_elements());
  EXPECT_THROW(llm::copy_adapter_tensors(rs, plain, base.data()), llm::AdapterError);
}

// ---- ./merge_lora end to end (when the binary has been built) ----

std::string merge_tool() {
  return std::string(LLM_SOURCE_DIR) + "/merge_lora";
}

int run_tool(const std::string& args, const std::string& log) {
  const int status = std::system((merge_tool() + " " + args + " >" + log + " 2>&1").c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(MergeLoraTool, EndToEnd) {
  if (!fs::exists(merge_tool())) GTEST_SKIP() << merge_tool() << " is not built (make merge_lora)";
  TempDir tmp;
  const std::string log = tmp.sub("log.txt");
  const std::string base = kFixtures + "/base";
  ASSERT_EQ(
      run_tool("--base " + base + " --adapter " + kFixtures + "/adapter --out " + tmp.sub("merged"), log), 0);
  const llm::HfConfigImport imported = llm::load_hf_config(tmp.sub("merged"));
  const std::vector<float> merged = llm::load_hf_parameters(tmp.sub("merged"), imported.config);
  std::vector<float> want = fixture().base;
  llm::merge_lora_into(fixture().imported.config, load_fixture_adapter("adapter"), want);
  EXPECT_EQ(merged, want);  // f32 output: bit for bit the library's merge
  EXPECT_TRUE(fs::exists(tmp.sub("merged") + "/generation_config.json"));
  EXPECT_LT(scaled_error(plain_logits(merged), expected_logits("adapter"), "./merge_lora output"),
            kTolerance);

  // --nf4: merged into the NF4 round trip of the base.
  ASSERT_EQ(run_tool("--base " + base + " --adapter " + kFixtures + "/adapter_rslora --out " +
                         tmp.sub("nf4") + " --nf4 --no-double-quant --dtype f32",
                     log),
            0);
  llm::QuantSettings q;
  q.nf4 = true;
  q.double_quant = false;
  std::vector<float> want_nf4 = fixture().base;
  llm::nf4_round_trip_base(fixture().imported.config, q, want_nf4);
  llm::merge_lora_into(fixture().imported.config, load_fixture_adapter("adapter_rslora"), want_nf4);
  EXPECT_EQ(llm::load_hf_parameters(tmp.sub("nf4"), imported.config), want_nf4);

  // Usage errors exit 2, refused inputs 1 (with the reason), and nothing is written.
  EXPECT_EQ(run_tool("--base " + base + " --out " + tmp.sub("x"), log), 2);
  EXPECT_EQ(run_tool("--base " + base + " --adapter a --out b --bogus", log), 2);
  EXPECT_EQ(run_tool("--base " + base + " --adapter a --out b --no-double-quant", log), 2);
  EXPECT_EQ(run_tool("--base " + base + " --adapter " + base + " --out " + tmp.sub("x"), log), 1);
  std::ifstream in(log);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("adapter_config.json: missing"), std::string::npos) << text;
  EXPECT_FALSE(fs::exists(tmp.sub("x")));
  // GGUF needs the tokenizer, which this base has not: refused before anything is written.
  EXPECT_EQ(run_tool("--base " + base + " --adapter " + kFixtures + "/adapter --out " + tmp.sub("y") +
                         " --gguf-out " + tmp.sub("y.gguf"),
                     log),
            1);
  EXPECT_FALSE(fs::exists(tmp.sub("y")));
}

}  // namespace
