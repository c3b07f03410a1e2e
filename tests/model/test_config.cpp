// The model config: LLM-Lab names and defaults, and one clear message per validation problem.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "llm/config.h"
#include "llm/memory_plan.h"
#include "llm/params.h"

namespace {

using llm::ConfigError;
using llm::json;
using llm::ModelConfig;

ModelConfig parse(const std::string& text) {
  return llm::model_config_from_json(llm::parse_json_text(text, "cfg.json"), "cfg.json");
}

// The message of the ConfigError that parsing `text` throws ("" when it does not throw).
std::string error_of(const std::string& text) {
  try {
    parse(text);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(Config, DefaultsAreLlmLabs) {
  const ModelConfig c = parse("{}");
  EXPECT_EQ(c.positional_encoding, "rope");
  EXPECT_EQ(c.attention_type, "gqa");
  EXPECT_EQ(c.norm_type, "rmsnorm");
  EXPECT_EQ(c.activation, "swiglu");
  EXPECT_EQ(c.d_model, 896);
  EXPECT_EQ(c.n_heads, 14);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.d_ff, 4864);
  EXPECT_EQ(c.n_layers, 24);
  EXPECT_EQ(c.vocab_size, 151936);
  EXPECT_EQ(c.max_seq_len, 1024);
  EXPECT_DOUBLE_EQ(c.dropout, 0.0);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-6);
}

TEST(Config, ParameterCountMatchesQwen25HalfB) {
  // Qwen2.5-0.5B: the LLM-Lab default shape with Q/K/V bias and tied embeddings has 494,032,768
  // parameters (the figure its model card's safetensors total gives).
  ModelConfig c = parse(R"({"attention_bias": true})");
  EXPECT_EQ(llm::count_parameters(c).total(), 494032768);
  // The layout allocates exactly what the count says.
  EXPECT_EQ(llm::ParameterLayout(c).total_elements(), 494032768u);
}

// 6 N + 12 L H Q T, counted by hand for a small config: per layer Q 8x8, K and V 4x8, O 8x8 (192) and a
// gated MLP 3x8x12 (288); two layers and an 11x8 head give N = 1048; attention 12 x 2 x 2 x 4 x T.
TEST(Config, TrainingFlopsPerToken) {
  llm::ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.attention_type = "gqa";
  c.d_ff = 12;
  c.n_layers = 2;
  c.max_seq_len = 16;
  EXPECT_DOUBLE_EQ(llm::training_flops_per_token(c, 5), 6.0 * 1048 + 12.0 * 2 * 2 * 4 * 5);
  c.tie_word_embeddings = false;  // the head is a matmul either way: the same count
  EXPECT_DOUBLE_EQ(llm::training_flops_per_token(c, 5), 6.0 * 1048 + 12.0 * 2 * 2 * 4 * 5);
}

TEST(Config, ParameterCountAgreesWithLayoutAcrossOptions) {
  for (const char* text :
       {R"({"norm_type": "layernorm", "activation": "gelu", "positional_encoding": "learned"})",
        R"({"tie_word_embeddings": false, "qk_norm": true, "head_dim": 128})",
        R"({"attention_type": "mha"})"}) {
    const ModelConfig c = parse(text);
    EXPECT_EQ(static_cast<size_t>(llm::count_parameters(c).total()), llm::ParameterLayout(c).total_elements())
        << text;
  }
}

TEST(Config, MhaAndMqaFixKvHeadsWhenNotGiven) {
  EXPECT_EQ(parse(R"({"attention_type": "mha"})").n_kv_heads, 14);
  EXPECT_EQ(parse(R"({"attention_type": "mqa"})").n_kv_heads, 1);
}

TEST(ConfigErrors, DModelDivisibleByHeads) {
  EXPECT_NE(error_of(R"({"d_model": 900})").find("d_model (900) must be divisible by n_heads (14)"),
            std::string::npos);
}

TEST(ConfigErrors, HeadsDivisibleByKvHeads) {
  EXPECT_NE(error_of(R"({"n_kv_heads": 4})").find("n_heads (14) must be divisible by n_kv_heads (4)"),
            std::string::npos);
}

TEST(ConfigErrors, RopeNeedsEvenHeadDim) {
  const std::string e = error_of(R"({"d_model": 42, "n_heads": 14})");  // head dim 3
  EXPECT_NE(e.find("needs an even head dimension, found 3"), std::string::npos) << e;
  EXPECT_EQ(error_of(R"({"d_model": 42, "n_heads": 14, "positional_encoding": "alibi"})"), "");
}

TEST(ConfigErrors, UnknownKeySuggestsNearest) {
  const std::string e = error_of(R"({"n_head": 8})");
  EXPECT_NE(e.find("cfg.json: unknown key \"n_head\" (did you mean \"n_heads\"?)"), std::string::npos) << e;
  EXPECT_NE(error_of(R"({"dmodel": 8})").find("did you mean \"d_model\""), std::string::npos);
  // Far from every key: no suggestion.
  const std::string far = error_of(R"({"completely_unrelated_setting": 1})");
  EXPECT_NE(far.find("unknown key"), std::string::npos);
  EXPECT_EQ(far.find("did you mean"), std::string::npos);
}

TEST(ConfigErrors, WrongTypes) {
  EXPECT_NE(error_of(R"({"d_model": "big"})")
                .find("key \"d_model\": expected an integer, found a string (\"big\")"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"d_model": 8.5})").find("key \"d_model\": expected an integer"), std::string::npos);
  EXPECT_NE(error_of(R"({"attention_bias": 1})").find("key \"attention_bias\": expected true or false"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"norm_eps": "tiny"})").find("key \"norm_eps\": expected a number"),
            std::string::npos);
  EXPECT_NE(error_of(R"([1, 2])").find("expected a JSON object"), std::string::npos);
}

TEST(ConfigErrors, UnknownChoiceListsChoicesAndSuggests) {
  const std::string e = error_of(R"({"norm_type": "rms_norm"})");
  EXPECT_NE(e.find("expected one of layernorm, rmsnorm; found \"rms_norm\" (did you mean \"rmsnorm\"?)"),
            std::string::npos)
      << e;
  EXPECT_NE(error_of(R"({"activation": "tanh"})").find("relu, gelu, silu, leaky_relu, swiglu"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"positional_encoding": "rotary"})").find("sinusoidal, learned, rope, alibi, yarn"),
            std::string::npos);
}

TEST(ConfigErrors, MalformedJsonGivesLineAndColumn) {
  const std::string e = error_of("{\n  \"d_model\": 8,\n  \"n_heads\": ,\n}");
  EXPECT_NE(e.find("cfg.json:3:14: malformed JSON"), std::string::npos) << e;
}

TEST(ConfigErrors, AttentionTypeConsistency) {
  EXPECT_NE(
      error_of(R"({"attention_type": "mha", "n_kv_heads": 2})").find("needs n_kv_heads equal to n_heads"),
      std::string::npos);
  EXPECT_NE(error_of(R"({"attention_type": "mqa", "n_kv_heads": 2})").find("needs n_kv_heads 1"),
            std::string::npos);
}

TEST(ConfigErrors, Ranges) {
  EXPECT_NE(error_of(R"({"dropout": 1.5})").find("dropout must be in [0, 1)"), std::string::npos);
  EXPECT_NE(error_of(R"({"n_layers": 0})").find("n_layers must be positive"), std::string::npos);
  EXPECT_NE(error_of(R"({"sliding_window": -3})").find("sliding_window must be 0 (none) or positive"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"norm_eps": 0})").find("norm_eps must be in (0, 1)"), std::string::npos);
  EXPECT_NE(error_of(R"({"rope_scaling": "llama3", "positional_encoding": "alibi"})")
                .find("rope_scaling \"llama3\" needs positional_encoding \"rope\""),
            std::string::npos);
  EXPECT_NE(error_of(R"({"rope_scaling_factor": 0.5})").find("rope_scaling_factor must be at least 1"),
            std::string::npos);
}

TEST(ConfigErrors, EveryProblemIsReportedOncePerLine) {
  const std::string e = error_of(R"({"n_head": 8, "d_model": "x", "activation": "tanh"})");
  EXPECT_EQ(std::count(e.begin(), e.end(), '\n'), 2) << e;
}

TEST(ConfigErrors, MissingFileIsNamed) {
  try {
    llm::load_model_config("/nonexistent/model.json");
    FAIL() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/model.json"), std::string::npos);
  }
}

TEST(Config, RoundTripThroughJson) {
  const ModelConfig c = parse(R"({"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "activation": "gelu"})");
  const ModelConfig again = llm::model_config_from_json(c.to_json(), "again");
  EXPECT_EQ(again.to_json(), c.to_json());
}

TEST(MemoryPlan, RecomputeSavesActivationsAndCountsAreExact) {
  const ModelConfig c = parse(R"({"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "n_layers": 4,
                                  "vocab_size": 300, "max_seq_len": 32})");
  const size_t params = llm::ParameterLayout(c).total_elements();
  const auto full = llm::plan_memory(c, 2, 32, false, params, params, 4, 8.0);
  const auto recompute = llm::plan_memory(c, 2, 32, true, params, params, 4, 8.0);
  EXPECT_EQ(full.parameters, params * 4);
  EXPECT_EQ(full.gradients, params * 4);
  EXPECT_EQ(full.optimizer_state, params * 8);
  EXPECT_LT(recompute.activations, full.activations);
  const size_t layer = llm::layer_activation_sizes(c, 2, 32).total();
  EXPECT_EQ(full.activations - recompute.activations, 3 * layer * 4);
}

}  // namespace

namespace {

TEST(ConfigOverrides, DottedKeysReachNestedObjects) {
  llm::json object = llm::json::parse(R"({"lr": 1e-3, "model": {"d_model": 32}})");
  llm::apply_override(object, "model.d_model=64");
  llm::apply_override(object, "lr=0.5");
  llm::apply_override(object, "datasets=[\"a.txt\", \"b.txt\"]");
  llm::apply_override(object, "name=plain text");
  EXPECT_EQ(object["model"]["d_model"], 64);
  EXPECT_EQ(object["lr"], 0.5);
  EXPECT_EQ(object["datasets"].size(), 2u);
  EXPECT_EQ(object["name"], "plain text");
  EXPECT_THROW(llm::apply_override(object, "lr.x=1"), llm::ConfigError);
  EXPECT_THROW(llm::apply_override(object, "no_equals_sign"), llm::ConfigError);
}

}  // namespace

namespace {

TEST(ConfigErrors, HostileJsonIsAnErrorNotACrash) {
  EXPECT_NE(error_of(R"({"d_model": 1e999})").find("malformed JSON"), std::string::npos);
  const std::string deep = std::string(1000, '[') + std::string(1000, ']');
  EXPECT_NE(error_of(deep).find("nested deeper than"), std::string::npos);
}

}  // namespace
