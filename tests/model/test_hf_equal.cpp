// Hugging Face folders against transformers itself: each fixture (written by
// dev/reference/hf_fixtures.py) is a tiny random model saved with save_pretrained, plus the logits,
// loss and every parameter gradient transformers computed for one batch. The folder is imported
// (config.json -> ModelConfig, safetensors -> parameters by name) into Model<double> and run forward
// and backward on the CPU reference ops.
//
// Metric, per tensor: relative error ||ours - theirs||_2 / ||theirs||_2. Bounds: logits and loss 1e-4,
// gradients 1e-3. (transformers ran in float64 but keeps softmax, RMSNorm statistics and RoPE angles in
// float32, so ~1e-7 is the floor.)
//
// Also: load -> save -> load round trips (F32 exact, sharded, BF16 rounding), and the weight checks
// (missing, unexpected, wrong-shaped tensors; tied lm_head).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "kernels/cuda_model.h"
#include "kernels/cuda_runtime.h"
#include "llm/hf_config.h"
#include "llm/hf_model.h"
#include "llm/model.h"
#include "llm/safetensors.h"
#include "tests/gpu_skip.h"

namespace {

namespace fs = std::filesystem;
using llm::json;

const std::string kFixtures = std::string(LLM_SOURCE_DIR) + "/tests/fixtures/hf/";

double relative_error(const double* a, const float* b, size_t n) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < n; ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    ref += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(ref), 1e-30);
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

// A fresh temporary folder, removed at the end of the test.
class TempDir {
 public:
  explicit TempDir(const std::string& tag)
      : path_(fs::temp_directory_path() / ("llm_hf_" + tag + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

class HfEqual : public ::testing::TestWithParam<const char*> {};

TEST_P(HfEqual, LogitsLossAndGradientsMatchTransformers) {
  const std::string dir = kFixtures + GetParam();
  const llm::HfConfigImport imported = llm::load_hf_config(dir);
  const json inputs = read_json(dir + "/inputs.json");
  const int B = inputs["B"], T = inputs["T"];
  EXPECT_EQ(imported.architecture, inputs["architecture"].get<std::string>());

  llm::ModelOptions options;
  options.max_batch = B;
  options.max_seq = T;
  llm::Model<double> model(imported.config, options);
  std::vector<std::string> notes;
  llm::load_hf_weights(dir, model, &notes);
  model.set_training(false);

  std::vector<int32_t> ids, targets;
  for (const auto& row : inputs["inputs"])
    for (const auto& v : row) ids.push_back(v.get<int32_t>());
  for (const auto& row : inputs["targets"])
    for (const auto& v : row) targets.push_back(v.get<int32_t>());
  ASSERT_EQ(ids.size(), static_cast<size_t>(B * T));

  const double loss = model.forward(ids.data(), targets.data(), B, T);
  const double ref_loss = inputs["loss"].get<double>();
  EXPECT_LT(std::abs(loss - ref_loss) / std::abs(ref_loss), 1e-4) << "loss " << loss << " vs " << ref_loss;

  const llm::SafetensorsFile reference(dir + "/reference.safetensors");
  const std::vector<float> ref_logits = reference.read_floats("logits");
  const size_t V = static_cast<size_t>(imported.config.vocab_size);
  ASSERT_EQ(ref_logits.size(), static_cast<size_t>(B * T) * V);
  const double logits_error = relative_error(model.logits(), ref_logits.data(), ref_logits.size());
  EXPECT_LT(logits_error, 1e-4);

  model.zero_grad();
  model.backward_mean_cross_entropy();
  double worst = 0;
  std::string worst_name;
  size_t matched = 0;
  for (const llm::TensorInfo& t : model.layout().tensors()) {
    const llm::SafetensorsTensor* ref = reference.find("grad." + t.name);
    ASSERT_NE(ref, nullptr) << "no reference gradient for " << t.name;
    const std::vector<float> g = reference.read_floats("grad." + t.name);
    const double e = relative_error(model.grad(t.name), g.data(), g.size());
    EXPECT_LT(e, 1e-3) << t.name;
    if (e > worst) {
      worst = e;
      worst_name = t.name;
    }
    ++matched;
  }
  // Every reference gradient belongs to a parameter (tied heads appear once, as the embedding).
  EXPECT_EQ(matched + 1, reference.tensors().size());
  std::printf("%s: loss %.8f (ref %.8f), logits rel err %.2e, worst gradient rel err %.2e (%s)\n", GetParam(),
              loss, ref_loss, logits_error, worst, worst_name.c_str());
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfEqual,
                         ::testing::Values("llama_llama3", "llama_yarn", "qwen2_tied", "qwen3_qknorm",
                                           "mistral_window"));

// ---------------------------------------------------------------------------------------------------------
// Round trips

// The bf16 floor of each gradient of a fixture: its relative error against transformers' gradient when
// the one change is every parameter rounded to bf16 (as the CUDA model's bf16 working copy is), computed
// by the CPU reference in float64. Here it is 2 to 7 %: bf16 storage alone puts these gradients past 2e-2.
std::map<std::string, double> bf16_weight_rounding_floor(const std::string& dir, int B, int T,
                                                         const std::vector<int32_t>& ids,
                                                         const std::vector<int32_t>& targets) {
  const llm::HfConfigImport imported = llm::load_hf_config(dir);
  llm::ModelOptions options;
  options.max_batch = B;
  options.max_seq = T;
  llm::Model<double> model(imported.config, options);
  const std::vector<float> params = llm::load_hf_parameters(dir, imported.config);
  for (size_t i = 0; i < params.size(); ++i)
    model.parameters()[i] = llm::bf16_to_float(llm::float_to_bf16(params[i]));
  model.set_training(false);
  model.forward(ids.data(), targets.data(), B, T);
  model.zero_grad();
  model.backward_mean_cross_entropy();
  const llm::SafetensorsFile reference(dir + "/reference.safetensors");
  std::map<std::string, double> floor;
  for (const llm::TensorInfo& t : model.layout().tensors()) {
    const std::vector<float> g = reference.read_floats("grad." + t.name);
    floor[t.name] = relative_error(model.grad(t.name), g.data(), g.size());
  }
  return floor;
}

// PyTorch's own bf16 run of these fixtures (dev/reference/hf_bf16_floor.py) lands at 1.05 to 2.9 times the
// floor per gradient tensor; a bf16 gradient may be off by up to this many floors, or by 2e-2 where that is
// larger. (A wrong term or scale is off by tens of percent, far past this.)
constexpr double kBf16FloorFactor = 4.0;

// The same fixtures on the CUDA backend in bf16 (storage bf16, compute fp32): loss and the last position's
// logits within 2e-2 relative; every gradient within the larger of 2e-2 and kBf16FloorFactor floors.
// Skips without a GPU.
class HfEqualCuda : public ::testing::TestWithParam<const char*> {};

TEST_P(HfEqualCuda, LossLogitsAndGradientsMatchTransformersInBf16) {
  SKIP_WITHOUT_GPU();
  const std::string dir = kFixtures + GetParam();
  const llm::HfConfigImport imported = llm::load_hf_config(dir);
  const json inputs = read_json(dir + "/inputs.json");
  const int B = inputs["B"], T = inputs["T"];
  std::vector<int32_t> ids, targets;
  for (const auto& row : inputs["inputs"])
    for (const auto& v : row) ids.push_back(v.get<int32_t>());
  for (const auto& row : inputs["targets"])
    for (const auto& v : row) targets.push_back(v.get<int32_t>());

  llm::cuda::CudaModelOptions options;
  options.max_batch = B;
  options.max_seq = T;
  options.precision = llm::cuda::Precision::kBf16;
  llm::cuda::CudaModel model(imported.config, options);
  model.upload_parameters(llm::load_hf_parameters(dir, imported.config));
  model.set_training(false);
  model.zero_grad();
  const double loss = model.forward_backward(ids.data(), targets.data(), B, T, nullptr, nullptr, 1.0);
  const double ref_loss = inputs["loss"].get<double>();
  EXPECT_LT(std::abs(loss - ref_loss) / std::abs(ref_loss), 2e-2) << "loss " << loss << " vs " << ref_loss;

  const llm::SafetensorsFile reference(dir + "/reference.safetensors");
  const std::vector<float> ref_logits = reference.read_floats("logits");
  const size_t V = static_cast<size_t>(imported.config.vocab_size);
  const std::vector<float> last = model.next_token_logits(std::vector<int32_t>(ids.begin(), ids.begin() + T));
  const std::vector<double> last_d(last.begin(), last.end());
  EXPECT_LT(relative_error(last_d.data(), ref_logits.data() + (T - 1) * V, V), 2e-2);

  const std::vector<float> grads = model.download_gradients();
  const std::map<std::string, double> floor = bf16_weight_rounding_floor(dir, B, T, ids, targets);
  double worst_ratio = 0.0;
  for (const llm::TensorInfo& t : model.layout().tensors()) {
    const std::vector<float> g = reference.read_floats("grad." + t.name);
    const std::vector<double> ours(grads.begin() + t.grad_offset, grads.begin() + t.grad_offset + t.numel);
    const double e = relative_error(ours.data(), g.data(), g.size()), f = floor.at(t.name);
    EXPECT_LT(e, std::max(2e-2, kBf16FloorFactor * f))
        << t.name << " (bf16 weight-rounding floor " << f << ")";
    worst_ratio = std::max(worst_ratio, e / f);
  }
  std::printf("%s: worst gradient error over its bf16 weight-rounding floor %.2f\n", GetParam(), worst_ratio);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfEqualCuda,
                         ::testing::Values("llama_llama3", "llama_yarn", "qwen2_tied", "qwen3_qknorm",
                                           "mistral_window"));

std::vector<float> load_params(const std::string& dir, llm::ModelConfig* config = nullptr) {
  const llm::HfConfigImport imported = llm::load_hf_config(dir);
  if (config) *config = imported.config;
  return llm::load_hf_parameters(dir, imported.config);
}

class HfRoundTrip : public ::testing::TestWithParam<const char*> {};

TEST_P(HfRoundTrip, LoadSaveLoadIsIdentical) {
  const std::string src = kFixtures + GetParam();
  llm::ModelConfig config;
  const std::vector<float> params = load_params(src, &config);
  const llm::HfConfigImport imported = llm::load_hf_config(src);
  TempDir out(std::string("rt_") + GetParam());
  llm::HfExportOptions options;
  options.tokens = imported.tokens;
  options.source_dir = src;
  options.max_shard_bytes = 40'000;  // forces several shards and an index for these ~100 KB models
  const llm::ParameterLayout layout(config);
  const auto files = llm::save_hf_folder(out.str(), config, layout, params.data(), options);
  EXPECT_TRUE(fs::exists(out.str() + "/model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(out.str() + "/model.safetensors"));
  EXPECT_TRUE(fs::exists(out.str() + "/generation_config.json"));

  llm::ModelConfig again_config;
  const std::vector<float> again = load_params(out.str(), &again_config);
  EXPECT_EQ(again, params);
  // Streamed one tensor at a time (from the shards), in layout order: the same values.
  std::vector<float> streamed;
  size_t next_offset = 0;
  llm::read_hf_tensors(out.str(), again_config, nullptr,
                       [&](const llm::TensorInfo& t, const std::vector<float>& values) {
                         EXPECT_EQ(t.offset, next_offset) << t.name;
                         next_offset = t.offset + values.size();
                         streamed.insert(streamed.end(), values.begin(), values.end());
                       });
  EXPECT_EQ(streamed, params);
  json a = config.to_json(), b = again_config.to_json();
  a.erase("tokenizer_name");
  b.erase("tokenizer_name");
  EXPECT_EQ(a, b);
  const llm::HfConfigImport re = llm::load_hf_config(out.str());
  EXPECT_EQ(re.architecture, imported.architecture);
  EXPECT_EQ(re.tokens.bos, imported.tokens.bos);
  EXPECT_EQ(re.tokens.eos, imported.tokens.eos);
  EXPECT_EQ(re.tokens.pad, imported.tokens.pad);
  // Each shard is a valid file that begins its data 8-byte aligned.
  for (const auto& f : files) {
    if (f.rfind("model-", 0) != 0) continue;
    std::ifstream in(out.str() + "/" + f, std::ios::binary);
    uint64_t n = 0;
    in.read(reinterpret_cast<char*>(&n), 8);
    EXPECT_EQ(n % 8, 0u) << f;
    const llm::SafetensorsFile shard(out.str() + "/" + f);
    EXPECT_EQ(shard.metadata().at("format"), "pt");
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfRoundTrip,
                         ::testing::Values("llama_llama3", "llama_yarn", "qwen2_tied", "qwen3_qknorm",
                                           "mistral_window"));

TEST(HfSave, Bf16AndF16RoundToNearest) {
  const std::string src = kFixtures + "qwen3_qknorm";
  llm::ModelConfig config;
  const std::vector<float> params = load_params(src, &config);
  const llm::ParameterLayout layout(config);
  for (const auto dtype : {llm::SafeDType::kBF16, llm::SafeDType::kF16}) {
    TempDir out(std::string("lowp_") + llm::safe_dtype_name(dtype));
    llm::HfExportOptions options;
    options.dtype = dtype;
    llm::save_hf_folder(out.str(), config, layout, params.data(), options);
    EXPECT_TRUE(fs::exists(out.str() + "/model.safetensors"));
    const llm::HfConfigImport imported = llm::load_hf_config(out.str());
    EXPECT_EQ(imported.torch_dtype, llm::torch_dtype_name(dtype));
    const std::vector<float> again = llm::load_hf_parameters(out.str(), imported.config);
    ASSERT_EQ(again.size(), params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const float expected = dtype == llm::SafeDType::kBF16
                                 ? llm::bf16_to_float(llm::float_to_bf16(params[i]))
                                 : llm::half_to_float(llm::float_to_half(params[i]));
      ASSERT_EQ(again[i], expected) << i;
    }
  }
}

TEST(HfSave, CopiesTokenizerFilesAndTiedModelsHaveNoHead) {
  const std::string src = kFixtures + "qwen2_tied";
  TempDir source("tok_src");
  for (const auto& f : fs::directory_iterator(src))
    fs::copy_file(f.path(), source.str() + "/" + f.path().filename().string());
  std::ofstream(source.str() + "/tokenizer.json") << "{\"model\": {}}";
  std::ofstream(source.str() + "/tokenizer_config.json") << "{}";
  llm::ModelConfig config;
  const std::vector<float> params = load_params(source.str(), &config);
  EXPECT_EQ(config.tokenizer_name, source.str());
  TempDir out("tok_out");
  const auto files = llm::save_hf_folder(out.str(), config, llm::ParameterLayout(config), params.data());
  EXPECT_TRUE(fs::exists(out.str() + "/tokenizer.json"));
  EXPECT_TRUE(fs::exists(out.str() + "/tokenizer_config.json"));
  EXPECT_FALSE(fs::exists(out.str() + "/special_tokens_map.json"));
  const llm::SafetensorsFolder folder(out.str());
  EXPECT_EQ(folder.find("lm_head.weight"), nullptr);
  EXPECT_NE(folder.find("model.embed_tokens.weight"), nullptr);
}

// ---------------------------------------------------------------------------------------------------------
// Weight checks

// Writes the fixture's tensors (optionally edited) into a fresh folder with the fixture's config.json.
struct EditedFolder {
  TempDir dir;
  std::vector<std::vector<float>> storage;
  std::vector<llm::SafetensorsWriteTensor> tensors;

  EditedFolder(const std::string& fixture, const std::string& tag) : dir(tag) {
    fs::copy_file(kFixtures + fixture + "/config.json", dir.str() + "/config.json");
    const llm::SafetensorsFile file(kFixtures + fixture + "/model.safetensors");
    storage.reserve(file.tensors().size() + 4);
    for (const auto& t : file.tensors()) {
      storage.push_back(file.read_floats(t.name));
      tensors.push_back({t.name, t.shape, storage.back().data()});
    }
  }
  void add(const std::string& name, std::vector<int64_t> shape, std::vector<float> values) {
    storage.push_back(std::move(values));
    tensors.push_back({name, std::move(shape), storage.back().data()});
  }
  void remove(const std::string& name) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].name == name) tensors.erase(tensors.begin() + static_cast<long>(i));
    }
  }
  llm::SafetensorsWriteTensor* find(const std::string& name) {
    for (auto& t : tensors)
      if (t.name == name) return &t;
    return nullptr;
  }
  // Loads the folder; returns the error text ("" when it loads).
  std::string load(std::vector<std::string>* notes = nullptr) {
    llm::write_safetensors(dir.str() + "/model.safetensors", tensors, llm::SafeDType::kF32);
    try {
      const llm::HfConfigImport imported = llm::load_hf_config(dir.str());
      llm::load_hf_parameters(dir.str(), imported.config, notes);
    } catch (const std::exception& e) {
      return e.what();
    }
    return "";
  }
};

TEST(HfWeights, MissingUnexpectedAndMisshapenTensorsAreNamed) {
  EditedFolder f("llama_llama3", "bad_weights");
  f.remove("model.layers.1.mlp.up_proj.weight");
  f.add("model.layers.0.mlp.extra.weight", {2, 2}, {1, 2, 3, 4});
  llm::SafetensorsWriteTensor* k = f.find("model.layers.0.self_attn.k_proj.weight");
  ASSERT_NE(k, nullptr);
  k->shape = {32, 16};  // same bytes, wrong shape
  const std::string error = f.load();
  EXPECT_NE(error.find("missing tensor model.layers.1.mlp.up_proj.weight [64, 32]"), std::string::npos)
      << error;
  EXPECT_NE(error.find("unexpected tensor model.layers.0.mlp.extra.weight"), std::string::npos) << error;
  EXPECT_NE(
      error.find(
          "tensor model.layers.0.self_attn.k_proj.weight has shape [32, 16], the config needs [16, 32]"),
      std::string::npos)
      << error;
  EXPECT_NE(error.find("3 problems"), std::string::npos) << error;
  // The check alone says the same, and the streaming reader hands nothing on.
  const llm::HfConfigImport imported = llm::load_hf_config(f.dir.str());
  try {
    llm::check_hf_parameters(f.dir.str(), imported.config);
    ADD_FAILURE() << "check_hf_parameters accepted the folder";
  } catch (const llm::HfModelError& e) {
    EXPECT_EQ(std::string(e.what()), error);
  }
  size_t handed = 0;
  EXPECT_THROW(llm::read_hf_tensors(f.dir.str(), imported.config, nullptr,
                                    [&](const llm::TensorInfo&, const std::vector<float>&) { ++handed; }),
               llm::HfModelError);
  EXPECT_EQ(handed, 0u);
}

TEST(HfWeights, TiedHeadEqualToEmbeddingIsAcceptedElseRefused) {
  {
    EditedFolder f("qwen2_tied", "tied_ok");
    const auto* e = f.find("model.embed_tokens.weight");
    ASSERT_NE(e, nullptr);
    f.add("lm_head.weight", e->shape, std::vector<float>(e->data, e->data + 128 * 32));
    std::vector<std::string> notes;
    EXPECT_EQ(f.load(&notes), "");
    ASSERT_EQ(notes.size(), 1u);
    EXPECT_NE(notes[0].find("lm_head.weight"), std::string::npos);
  }
  {
    EditedFolder f("qwen2_tied", "tied_bad");
    const auto* e = f.find("model.embed_tokens.weight");
    std::vector<float> head(e->data, e->data + 128 * 32);
    head[7] += 1.0f;
    f.add("lm_head.weight", e->shape, head);
    const std::string error = f.load();
    EXPECT_NE(error.find("tie_word_embeddings is true but it differs"), std::string::npos) << error;
  }
  {
    EditedFolder f("llama_llama3", "untied_missing");
    f.remove("lm_head.weight");
    EXPECT_NE(f.load().find("missing tensor lm_head.weight"), std::string::npos);
  }
}

TEST(HfWeights, RotaryInvFreqBuffersAreIgnored) {
  EditedFolder f("mistral_window", "inv_freq");
  f.add("model.layers.0.self_attn.rotary_emb.inv_freq", {4}, {1, 0.1f, 0.01f, 0.001f});
  std::vector<std::string> notes;
  EXPECT_EQ(f.load(&notes), "");
  EXPECT_EQ(notes.size(), 1u);
}

TEST(HfWeights, HalfPrecisionFilesLoad) {
  // The same tensors stored as BF16 load as their BF16 values.
  EditedFolder f("qwen3_qknorm", "bf16_load");
  llm::write_safetensors(f.dir.str() + "/model.safetensors", f.tensors, llm::SafeDType::kBF16);
  const llm::HfConfigImport imported = llm::load_hf_config(f.dir.str());
  const std::vector<float> params = llm::load_hf_parameters(f.dir.str(), imported.config);
  const llm::ParameterLayout layout(imported.config);
  const llm::TensorInfo& t = layout.at("model.layers.1.self_attn.k_norm.weight");
  const float* src = f.find(t.name)->data;
  for (int64_t i = 0; i < t.numel; ++i)
    EXPECT_EQ(params[t.offset + i], llm::bf16_to_float(llm::float_to_bf16(src[i])));
}

TEST(HfWeights, FolderWithoutWeightsSaysSo) {
  TempDir dir("no_weights");
  std::ofstream(dir.str() + "/pytorch_model.bin") << "x";
  try {
    llm::SafetensorsFolder folder(dir.str());
    FAIL() << "expected an error";
  } catch (const llm::SafetensorsError& e) {
    EXPECT_NE(std::string(e.what()).find("pytorch_model.bin"), std::string::npos) << e.what();
  }
}

}  // namespace
