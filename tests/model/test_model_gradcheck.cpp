// Whole-model gradient check in double precision: every parameter's analytic gradient against central
// finite differences of the mean cross-entropy, over the matrix of positional encodings x attention
// types x norms x activations, plus the options that change the graph (biases, QK-norm, windows,
// untied head, dropout, rope scaling, packed documents, recompute, NEFTune noise).
#include <gtest/gtest.h>

#include <string>
#include <tuple>
#include <vector>

#include "llm/model.h"
#include "tests/gradcheck.h"

namespace {

using llm::Model;
using llm::ModelConfig;

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.attention_type = "gqa";
  c.d_ff = 12;
  c.n_layers = 2;
  c.max_seq_len = 8;
  c.norm_eps = 1e-5;
  return c;
}

struct Batch {
  int B = 2, T = 5;
  std::vector<int32_t> inputs{1, 4, 2, 9, 0, 3, 3, 7, 10, 5};
  std::vector<int32_t> targets{4, 2, -100, 0, 6, 3, 7, 10, 5, -100};
  std::vector<int32_t> positions, doc_ids;
};

// Checks every parameter of a model built from `config` on `batch`.
void check_model_gradients(const ModelConfig& config, const Batch& batch, bool recompute = false,
                           double neftune_alpha = 0.0) {
  llm::ModelOptions options;
  options.max_batch = batch.B;
  options.max_seq = batch.T;
  options.recompute = recompute;
  options.neftune_alpha = neftune_alpha;
  Model<double> model(config, options);
  model.init_weights(7);
  // Larger weights than the training init, so every path carries a gradient well above rounding.
  for (auto& w : model.parameters()) w *= 10.0;
  for (const auto& t : model.layout().tensors()) {
    if (t.role == llm::TensorRole::kNorm || t.role == llm::TensorRole::kBias) {
      double* w = model.param(t.name);
      const auto jitter = llm::test::random_vector(t.numel, t.offset + 1, -0.3, 0.3);
      for (int64_t i = 0; i < t.numel; ++i) w[i] += jitter[i];
    }
  }
  model.set_dropout_rng(123, 4);
  const int32_t* positions = batch.positions.empty() ? nullptr : batch.positions.data();
  const int32_t* docs = batch.doc_ids.empty() ? nullptr : batch.doc_ids.data();
  auto loss = [&]() {
    return model.forward(batch.inputs.data(), batch.targets.data(), batch.B, batch.T, positions, docs);
  };

  model.zero_grad();
  loss();
  model.backward_mean_cross_entropy();
  const std::vector<double> analytic_all = model.gradients();

  std::vector<double>& params = model.parameters();
  for (const auto& t : model.layout().tensors()) {
    std::vector<double> x(params.begin() + t.offset, params.begin() + t.offset + t.numel);
    std::vector<double> analytic(analytic_all.begin() + t.grad_offset,
                                 analytic_all.begin() + t.grad_offset + t.numel);
    auto loss_at = [&]() {
      std::copy(x.begin(), x.end(), params.begin() + t.offset);
      return loss();
    };
    llm::test::expect_gradient(t.name, x, analytic, loss_at, 1e-6, 1e-8, 1e-5);
    std::copy(x.begin(), x.end(), params.begin() + t.offset);
  }
}

using MatrixParam = std::tuple<std::string, std::string, std::string, std::string>;

class ModelGradCheck : public ::testing::TestWithParam<MatrixParam> {};

TEST_P(ModelGradCheck, EveryParameter) {
  ModelConfig c = tiny_config();
  std::tie(c.positional_encoding, c.attention_type, c.norm_type, c.activation) = GetParam();
  c.n_kv_heads = c.attention_type == "mha" ? 2 : 1;
  if (c.attention_type == "gqa") {  // a real group: 4 query heads over 2 K/V heads
    c.n_heads = 4;
    c.n_kv_heads = 2;
  }
  if (c.positional_encoding == "yarn") {
    c.rope_scaling_factor = 4.0;
    c.rope_original_max_seq_len = 2;
  }
  check_model_gradients(c, Batch{});
}

std::string matrix_name(const ::testing::TestParamInfo<MatrixParam>& info) {
  return std::get<0>(info.param) + "_" + std::get<1>(info.param) + "_" + std::get<2>(info.param) + "_" +
         std::get<3>(info.param);
}

INSTANTIATE_TEST_SUITE_P(
    Architectures, ModelGradCheck,
    ::testing::Combine(::testing::Values("sinusoidal", "learned", "rope", "alibi", "yarn"),
                       ::testing::Values("mha", "mqa", "gqa"), ::testing::Values("layernorm", "rmsnorm"),
                       ::testing::Values("relu", "gelu", "silu", "leaky_relu", "swiglu")),
    matrix_name);

TEST(ModelGradCheckOptions, AttentionBiasQkNormUntiedHead) {
  ModelConfig c = tiny_config();
  c.attention_bias = true;
  c.qk_norm = true;
  c.tie_word_embeddings = false;
  check_model_gradients(c, Batch{});
}

TEST(ModelGradCheckOptions, SlidingWindowAndLlama3Scaling) {
  ModelConfig c = tiny_config();
  c.sliding_window = 2;
  c.rope_scaling = "llama3";
  c.rope_scaling_factor = 8.0;
  c.rope_original_max_seq_len = 4;
  c.rope_theta = 50.0;  // puts the head's few frequencies on both sides of the llama3 band
  check_model_gradients(c, Batch{});
}

TEST(ModelGradCheckOptions, GeluTanhAndLinearRopeScaling) {
  ModelConfig c = tiny_config();
  c.activation = "gelu";
  c.gelu_approximation = "tanh";
  c.rope_scaling = "linear";
  c.rope_scaling_factor = 2.0;
  check_model_gradients(c, Batch{});
}

TEST(ModelGradCheckOptions, Dropout) {
  ModelConfig c = tiny_config();
  c.dropout = 0.25;
  check_model_gradients(c, Batch{});
}

TEST(ModelGradCheckOptions, PackedDocumentsWithRestartingPositions) {
  ModelConfig c = tiny_config();
  Batch b;
  b.doc_ids = {0, 0, 1, 1, 1, 0, 0, 0, 0, 2};
  b.positions = {0, 1, 0, 1, 2, 0, 1, 2, 3, 0};
  check_model_gradients(c, b);
}

TEST(ModelGradCheckOptions, Recompute) {
  ModelConfig c = tiny_config();
  c.dropout = 0.1;
  check_model_gradients(c, Batch{}, /*recompute=*/true);
}

// NEFTune's noise is a constant shift of the embeddings, so the backward pass needs nothing new: every
// gradient at the noisy forward passes, with and without recompute.
TEST(ModelGradCheckOptions, NeftuneNoise) {
  check_model_gradients(tiny_config(), Batch{}, /*recompute=*/false, /*neftune_alpha=*/5.0);
  check_model_gradients(tiny_config(), Batch{}, /*recompute=*/true, /*neftune_alpha=*/5.0);
}

}  // namespace
