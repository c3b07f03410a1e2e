// config.json import and export: the fixture configs (transformers v5 output), v4-style keys, the
// defaults transformers assumes, every option we refuse, and export -> import round trips.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "llm/hf_config.h"

namespace {

namespace fs = std::filesystem;
using llm::ConfigError;
using llm::HfConfigImport;
using llm::json;

const std::string kFixtures = std::string(LLM_SOURCE_DIR) + "/tests/fixtures/hf/";

json base(const std::string& arch = "LlamaForCausalLM") {
  return json{{"architectures", {arch}},  {"hidden_size", 64},
              {"intermediate_size", 128}, {"num_hidden_layers", 2},
              {"num_attention_heads", 4}, {"num_key_value_heads", 2},
              {"vocab_size", 100},        {"max_position_embeddings", 256}};
}

HfConfigImport import(const json& j, int max_seq_len = 0) {
  llm::HfImportOptions options;
  options.max_seq_len = max_seq_len;
  return llm::hf_config_from_json(j, "config.json", options);
}

// The error text for `j` ("" when it imports).
std::string error_of(const json& j) {
  try {
    import(j);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(HfConfig, FixtureConfigs) {
  const HfConfigImport llama = llm::load_hf_config(kFixtures + "llama_llama3");
  EXPECT_EQ(llama.architecture, "LlamaForCausalLM");
  const llm::ModelConfig& c = llama.config;
  EXPECT_EQ(c.tokenizer_name, kFixtures + "llama_llama3");
  EXPECT_EQ(c.d_model, 32);
  EXPECT_EQ(c.d_ff, 64);
  EXPECT_EQ(c.n_layers, 2);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.attention_type, "gqa");
  EXPECT_EQ(c.resolved_head_dim(), 8);
  EXPECT_EQ(c.vocab_size, 128);
  EXPECT_EQ(c.max_seq_len, 512);
  EXPECT_EQ(c.positional_encoding, "rope");
  EXPECT_EQ(c.rope_scaling, "llama3");
  EXPECT_EQ(c.rope_scaling_factor, 4.0);
  EXPECT_EQ(c.llama3_low_freq_factor, 1.0);
  EXPECT_EQ(c.llama3_high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_original_max_seq_len, 128);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.norm_type, "rmsnorm");
  EXPECT_EQ(c.norm_eps, 1e-5);
  EXPECT_EQ(c.activation, "swiglu");
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(llama.tokens.bos, 1);
  EXPECT_EQ(llama.tokens.eos, (std::vector<int64_t>{2}));
  EXPECT_EQ(llama.tokens.pad, -1);
  EXPECT_EQ(llama.torch_dtype, "float32");

  const HfConfigImport yarn = llm::load_hf_config(kFixtures + "llama_yarn");
  EXPECT_EQ(yarn.config.positional_encoding, "yarn");
  EXPECT_EQ(yarn.config.rope_scaling, "none");
  EXPECT_EQ(yarn.config.rope_scaling_factor, 4.0);
  EXPECT_EQ(yarn.config.rope_original_max_seq_len, 64);
  EXPECT_EQ(yarn.config.rope_theta, 100.0);
  EXPECT_EQ(yarn.config.yarn_attention_factor, 0.0);
  EXPECT_EQ(yarn.config.attention_type, "mha");

  const HfConfigImport qwen2 = llm::load_hf_config(kFixtures + "qwen2_tied");
  EXPECT_TRUE(qwen2.config.attention_bias);
  EXPECT_TRUE(qwen2.config.tie_word_embeddings);
  EXPECT_EQ(qwen2.config.sliding_window, 0);
  EXPECT_EQ(qwen2.config.rope_theta, 1e6);

  const HfConfigImport qwen3 = llm::load_hf_config(kFixtures + "qwen3_qknorm");
  EXPECT_TRUE(qwen3.config.qk_norm);
  EXPECT_FALSE(qwen3.config.attention_bias);
  EXPECT_EQ(qwen3.config.head_dim, 16);

  const HfConfigImport mistral = llm::load_hf_config(kFixtures + "mistral_window");
  EXPECT_EQ(mistral.config.sliding_window, 5);
  EXPECT_EQ(mistral.config.attention_type, "mqa");
}

TEST(HfConfig, V4RopeKeys) {
  json j = base();
  j["rope_theta"] = 500000;
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  HfConfigImport r = import(j);
  EXPECT_EQ(r.config.rope_theta, 500000.0);
  EXPECT_EQ(r.config.rope_scaling, "linear");
  EXPECT_EQ(r.config.rope_scaling_factor, 2.0);

  // Llama 3.1's own block.
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  r = import(j);
  EXPECT_EQ(r.config.rope_scaling, "llama3");
  EXPECT_EQ(r.config.rope_original_max_seq_len, 8192);

  // rope_scaling wins over rope_parameters, as in transformers v5.
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 7.0}};
  EXPECT_EQ(import(j).config.rope_scaling, "llama3");
  j.erase("rope_scaling");
  r = import(j);
  EXPECT_EQ(r.config.rope_scaling, "none");
  EXPECT_EQ(r.config.rope_theta, 7.0);

  // YaRN: factor derived from the lengths; mscale / mscale_all_dim give the attention factor.
  j["rope_parameters"] = {{"rope_type", "yarn"},
                          {"original_max_position_embeddings", 64},
                          {"mscale", 0.707},
                          {"mscale_all_dim", 1.0},
                          {"beta_fast", 16}};
  r = import(j);
  EXPECT_EQ(r.config.positional_encoding, "yarn");
  EXPECT_EQ(r.config.rope_scaling_factor, 4.0);  // 256 / 64
  EXPECT_NEAR(r.config.yarn_attention_factor, (0.1 * 0.707 * std::log(4.0) + 1) / (0.1 * std::log(4.0) + 1),
              1e-12);
  EXPECT_EQ(r.config.yarn_beta_fast, 16.0);
  EXPECT_EQ(r.config.yarn_beta_slow, 1.0);
  j["rope_parameters"]["attention_factor"] = 1.25;
  EXPECT_EQ(import(j).config.yarn_attention_factor, 1.25);

  // Per-layer-type parameters are accepted when they agree.
  j["rope_parameters"] = {{"full_attention", {{"rope_type", "default"}, {"rope_theta", 1e4}}},
                          {"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 1e4}}}};
  EXPECT_EQ(import(j).config.rope_theta, 1e4);
  j["rope_parameters"]["sliding_attention"]["rope_theta"] = 1e5;
  EXPECT_NE(error_of(j).find("different RoPE parameters per layer type"), std::string::npos);
}

TEST(HfConfig, DefaultsOfTheTransformersClasses) {
  json j = base();
  j.erase("num_key_value_heads");
  j.erase("max_position_embeddings");
  HfConfigImport r = import(j);
  EXPECT_EQ(r.config.n_kv_heads, 4);  // Llama: num_attention_heads
  EXPECT_EQ(r.config.max_seq_len, 2048);
  EXPECT_EQ(r.config.rope_theta, 10000.0);
  EXPECT_EQ(r.config.norm_eps, 1e-6);

  json m = base("MistralForCausalLM");
  r = import(m);
  EXPECT_EQ(r.config.sliding_window, 4096);  // absent: MistralConfig's default
  m["sliding_window"] = nullptr;
  EXPECT_EQ(import(m).config.sliding_window, 0);

  json q = base("Qwen3ForCausalLM");
  EXPECT_EQ(import(q).config.head_dim, 128);  // Qwen3Config's default head_dim

  // model_type alone names the architecture.
  json t = base();
  t.erase("architectures");
  t["model_type"] = "qwen2";
  EXPECT_EQ(import(t).architecture, "Qwen2ForCausalLM");
  EXPECT_TRUE(import(t).config.attention_bias);
}

TEST(HfConfig, QwenSlidingWindowOnlyWhenEveryLayerUsesIt) {
  json j = base("Qwen2ForCausalLM");
  j["sliding_window"] = 4;
  j["use_sliding_window"] = false;
  HfConfigImport r = import(j);
  EXPECT_EQ(r.config.sliding_window, 0);
  ASSERT_FALSE(r.notes.empty());
  EXPECT_NE(r.notes[0].find("sliding_window 4 is ignored"), std::string::npos);

  j["use_sliding_window"] = true;
  j["max_window_layers"] = 0;
  EXPECT_EQ(import(j).config.sliding_window, 4);
  j["max_window_layers"] = 2;  // no layer from 2 on: window unused
  EXPECT_EQ(import(j).config.sliding_window, 0);
  j["max_window_layers"] = 1;
  EXPECT_NE(error_of(j).find("mixes sliding-window and full-attention layers"), std::string::npos);
  j["layer_types"] = {"sliding_attention", "sliding_attention"};  // layer_types win
  EXPECT_EQ(import(j).config.sliding_window, 4);
  j["layer_types"] = {"sliding_attention"};
  EXPECT_NE(error_of(j).find("has 1 entries for 2 layers"), std::string::npos);
}

TEST(HfConfig, MaxSeqLenOverride) {
  json j = base();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  const HfConfigImport r = import(j, 32);
  EXPECT_EQ(r.config.max_seq_len, 32);
  EXPECT_EQ(r.max_position_embeddings, 256);
  EXPECT_EQ(r.config.rope_original_max_seq_len, 256);  // from the file, not the cap
}

TEST(HfConfig, UnsupportedAndBrokenConfigsAreRefused) {
  struct Case {
    const char* what;
    json config;
    const char* expected;
  };
  auto with = [](json j, const std::string& key, json value) {
    j[key] = std::move(value);
    return j;
  };
  auto without = [](json j, const std::string& key) {
    j.erase(key);
    return j;
  };
  const std::vector<Case> cases = {
      {"unsupported arch", with(base(), "architectures", {"GPT2LMHeadModel"}),
       "unsupported architecture GPT2LMHeadModel (supported: LlamaForCausalLM, Qwen2ForCausalLM, "
       "Qwen3ForCausalLM, MistralForCausalLM)"},
      {"unsupported model_type", with(without(base(), "architectures"), "model_type", "gemma"),
       "unsupported architecture model_type \"gemma\""},
      {"no arch", without(base(), "architectures"), "neither \"architectures\" nor \"model_type\""},
      {"two archs", with(base(), "architectures", {"LlamaForCausalLM", "X"}), "a list of one name"},
      {"missing hidden_size", without(base(), "hidden_size"), "key \"hidden_size\": missing (required)"},
      {"missing vocab", without(base(), "vocab_size"), "key \"vocab_size\": missing (required)"},
      {"string size", with(base(), "hidden_size", "64"), "key \"hidden_size\": expected an integer"},
      {"gelu", with(base(), "hidden_act", "gelu"), "only \"silu\""},
      {"llama o bias", with(base(), "attention_bias", true), "an o_proj bias is not supported"},
      {"qwen3 o bias", with(base("Qwen3ForCausalLM"), "attention_bias", true), "an o_proj bias"},
      {"mlp bias", with(base(), "mlp_bias", true), "MLP projections"},
      {"dynamic rope", with(base(), "rope_scaling", {{"type", "dynamic"}, {"factor", 2.0}}),
       "RoPE type \"dynamic\" is not supported (supported: default, linear, llama3, yarn)"},
      {"longrope", with(base(), "rope_parameters", {{"rope_type", "longrope"}}),
       "\"longrope\" is not supported"},
      {"linear no factor", with(base(), "rope_scaling", {{"type", "linear"}}), "needs a factor"},
      {"llama3 incomplete", with(base(), "rope_scaling", {{"rope_type", "llama3"}, {"factor", 8.0}}),
       "needs factor, low_freq_factor and high_freq_factor"},
      {"yarn no truncate",
       with(base(), "rope_parameters", {{"rope_type", "yarn"}, {"factor", 2.0}, {"truncate", false}}),
       "truncate"},
      {"partial rotary", with(base(), "partial_rotary_factor", 0.5), "partial rotary"},
      {"rope not object", with(base(), "rope_scaling", 3), "expected an object"},
      {"quantized", with(base(), "quantization_config", {{"quant_method", "gptq"}}), "quantized checkpoints"},
      {"heads not dividing", with(base(), "num_key_value_heads", 3), "must be divisible by n_kv_heads"},
      {"bad eos", with(base(), "eos_token_id", "</s>"), "key \"eos_token_id\""},
      {"negative bos", with(base(), "bos_token_id", -5), "key \"bos_token_id\""},
      {"top-level array", json::array({1, 2}), "expected a JSON object"},
      {"bad layer types", with(base("Qwen2ForCausalLM"), "layer_types", {"full_attention", "chunked"}),
       "expected only"},
      {"scaling below 1", with(base(), "rope_scaling", {{"type", "linear"}, {"factor", 0.5}}),
       "rope_scaling_factor must be at least 1"},
  };
  for (const auto& c : cases) {
    const std::string error = error_of(c.config);
    EXPECT_NE(error.find(c.expected), std::string::npos) << c.what << ": got \"" << error << "\"";
    if (c.config.is_object()) {
      EXPECT_EQ(error.rfind("config.json", 0), 0u) << c.what << ": " << error;
    }
  }
  // Deep nesting is refused before anything recurses over it.
  json deep = base();
  std::string text = deep.dump();
  text.insert(text.size() - 1, ",\"rope_scaling\":" + std::string(100000, '[') + std::string(100000, ']'));
  try {
    llm::hf_config_from_text(text, "config.json");
    ADD_FAILURE() << "expected an error";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("nested"), std::string::npos)
        << e.what();  // by the parser or the 8-level check
  }
  // Numbers out of range are malformed JSON, not a crash (found by dev/fuzz).
  EXPECT_THROW(llm::hf_config_from_text("{\"hidden_size\": 1e999}", "config.json"), ConfigError);
  EXPECT_THROW(llm::hf_config_from_text("\n694e6496\"f0-496\"f", "config.json"), ConfigError);
  // Every problem is reported at once.
  json many = base();
  many["hidden_act"] = "relu";
  many["mlp_bias"] = true;
  const std::string error = error_of(many);
  EXPECT_NE(error.find("hidden_act"), std::string::npos);
  EXPECT_NE(error.find("mlp_bias"), std::string::npos);
}

TEST(HfConfig, FolderErrors) {
  const fs::path dir = fs::temp_directory_path() / ("llm_hfcfg_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  EXPECT_THROW(llm::load_hf_config(dir.string()), ConfigError);  // no config.json
  EXPECT_THROW(llm::load_hf_config((dir / "nope").string()), ConfigError);
  std::ofstream(dir / "config.json") << "{\"hidden_size\": 32,\n  oops}";
  try {
    llm::load_hf_config(dir.string());
    ADD_FAILURE() << "expected an error";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("config.json:2:"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("malformed JSON"), std::string::npos) << e.what();
  }
  // generation_config.json's token ids take precedence.
  std::ofstream(dir / "config.json") << base().dump();
  std::ofstream(dir / "generation_config.json")
      << R"({"bos_token_id": 5, "eos_token_id": [6, 7], "pad_token_id": 0})";
  const HfConfigImport r = llm::load_hf_config(dir.string());
  EXPECT_EQ(r.tokens.bos, 5);
  EXPECT_EQ(r.tokens.eos, (std::vector<int64_t>{6, 7}));
  EXPECT_EQ(r.tokens.pad, 0);
  std::ofstream(dir / "generation_config.json") << R"({"eos_token_id": "x"})";
  EXPECT_THROW(llm::load_hf_config(dir.string()), ConfigError);
  fs::remove_all(dir);
}

TEST(HfConfig, ExportChoosesTheArchitecture) {
  llm::ModelConfig c = import(base()).config;
  EXPECT_EQ(llm::hf_architecture_for(c), "LlamaForCausalLM");
  c.sliding_window = 8;
  EXPECT_EQ(llm::hf_architecture_for(c), "MistralForCausalLM");
  c.attention_bias = true;
  EXPECT_EQ(llm::hf_architecture_for(c), "Qwen2ForCausalLM");
  c.attention_bias = false;
  c.qk_norm = true;
  EXPECT_EQ(llm::hf_architecture_for(c), "Qwen3ForCausalLM");
  c.attention_bias = true;
  EXPECT_THROW(llm::hf_architecture_for(c), ConfigError);
  llm::ModelConfig gpt;  // LLM-Lab defaults but GPT-2 style
  gpt.norm_type = "layernorm";
  gpt.activation = "gelu";
  gpt.positional_encoding = "learned";
  try {
    llm::hf_architecture_for(gpt);
    ADD_FAILURE() << "expected an error";
  } catch (const ConfigError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("norm_type \"layernorm\""), std::string::npos) << what;
    EXPECT_NE(what.find("activation \"gelu\""), std::string::npos) << what;
    EXPECT_NE(what.find("positional_encoding \"learned\""), std::string::npos) << what;
  }
}

TEST(HfConfig, ExportImportRoundTrip) {
  std::vector<json> configs;
  json llama3 = base();
  llama3["rope_scaling"] = {{"rope_type", "llama3"},
                            {"factor", 8.0},
                            {"low_freq_factor", 1.0},
                            {"high_freq_factor", 4.0},
                            {"original_max_position_embeddings", 64}};
  configs.push_back(llama3);
  json yarn = base();
  yarn["rope_parameters"] = {
      {"rope_type", "yarn"}, {"factor", 3.0}, {"attention_factor", 1.2}, {"beta_fast", 8}};
  configs.push_back(yarn);
  json linear = base("MistralForCausalLM");
  linear["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  linear["sliding_window"] = 16;
  configs.push_back(linear);
  json qwen2 = base("Qwen2ForCausalLM");
  qwen2["use_sliding_window"] = true;
  qwen2["sliding_window"] = 32;
  qwen2["max_window_layers"] = 0;
  qwen2["tie_word_embeddings"] = true;
  configs.push_back(qwen2);
  json qwen3 = base("Qwen3ForCausalLM");
  qwen3["head_dim"] = 32;
  qwen3["rms_norm_eps"] = 1e-5;
  configs.push_back(qwen3);
  for (const json& j : configs) {
    const HfConfigImport first = import(j);
    llm::HfSpecialTokens tokens;
    tokens.bos = 3;
    tokens.eos = {4, 9};
    const json exported = llm::hf_config_to_json(first.config, tokens, "bfloat16");
    const HfConfigImport second = import(exported);
    EXPECT_EQ(second.architecture, first.architecture) << j.dump();
    EXPECT_EQ(second.config.to_json(), first.config.to_json()) << exported.dump(1);
    EXPECT_EQ(second.tokens.eos, tokens.eos);
    EXPECT_EQ(second.tokens.bos, 3);
    EXPECT_EQ(second.torch_dtype, "bfloat16");
    EXPECT_TRUE(second.notes.empty()) << second.notes.front();
  }
  const json g = llm::hf_generation_config_to_json({1, {2}, -1});
  EXPECT_EQ(g, (json{{"bos_token_id", 1}, {"eos_token_id", 2}}));
}

}  // namespace
