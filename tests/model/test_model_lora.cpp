// LoRA and QLoRA inside the whole model: a fresh adapter leaves the logits unchanged, the adapters'
// gradients pass a finite-difference check (with LoRA dropout on), only the adapters are trainable,
// merging the adapter into the base weights gives the same logits, and the NF4 model computes exactly
// what a plain model with the NF4-round-tripped weights computes. Also NEFTune, the other fine-tuning
// option inside the model: noise on the embeddings in training only, drawn per micro-step.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels/cpu/lora.h"
#include "kernels/cpu/nf4.h"
#include "llm/model.h"
#include "llm/model_layout.h"
#include "tests/gradcheck.h"

namespace {

using llm::LoraSettings;
using llm::Model;
using llm::ModelConfig;
using llm::ModelOptions;

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 13;
  c.d_model = 8;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.attention_type = "gqa";
  c.d_ff = 12;
  c.n_layers = 2;
  c.max_seq_len = 8;
  c.attention_bias = true;
  return c;
}

const int kB = 2, kT = 5;
const std::vector<int32_t> kInputs{1, 4, 2, 9, 0, 3, 3, 7, 10, 5};
const std::vector<int32_t> kTargets{4, 2, -100, 0, 6, 3, 7, 10, 5, -100};

LoraSettings lora_all(int r = 3) {
  LoraSettings s;
  s.enabled = true;
  s.preset = "all";
  s.r = r;
  s.alpha = 6.0;
  s.dropout = 0.0;
  s.init_seed = 5;
  return s;
}

// Copies the base tensors of `from` into `to` (by name) and gives every lora_B random values.
template <typename T>
void copy_base(const Model<T>& from, Model<T>& to) {
  for (const auto& t : from.layout().tensors()) {
    if (t.role == llm::TensorRole::kLora) continue;
    std::copy(from.param(t.name), from.param(t.name) + t.numel, to.param(t.name));
  }
}

template <typename T>
void randomise_lora_b(Model<T>& model, double scale) {
  for (const auto& t : model.layout().tensors()) {
    if (t.name.find("lora_B") == std::string::npos) continue;
    const auto v = llm::test::random_vector(t.numel, t.offset + 17, -scale, scale);
    std::copy(v.begin(), v.end(), model.param(t.name));
  }
}

TEST(ModelLora, PresetsPickTheirModules) {
  const ModelConfig c = tiny_config();
  LoraSettings s = lora_all();
  s.preset = "minimal";
  auto modules = llm::lora_modules(c, s);
  ASSERT_EQ(modules.size(), 4u);  // q, v in two layers
  EXPECT_EQ(modules[0].prefix, "model.layers.0.self_attn.q_proj");
  EXPECT_EQ(modules[1].prefix, "model.layers.0.self_attn.v_proj");
  EXPECT_EQ(modules[1].in_features, 8);
  EXPECT_EQ(modules[1].out_features, 4);  // one kv head of dim 4
  s.preset = "ffn_only";
  EXPECT_EQ(llm::lora_modules(c, s).size(), 6u);
  s.preset = "custom";
  s.target_modules = {"o_proj", "down_proj"};
  modules = llm::lora_modules(c, s);
  ASSERT_EQ(modules.size(), 4u);
  EXPECT_EQ(modules[0].prefix, "model.layers.0.self_attn.o_proj");
  EXPECT_EQ(modules[0].in_features, 8);
  EXPECT_EQ(modules[1].prefix, "model.layers.0.mlp.down_proj");
  EXPECT_EQ(modules[1].in_features, 12);
  s.target_modules = {"qproj"};
  try {
    llm::lora_modules(c, s);
    FAIL() << "expected an error for an unknown module";
  } catch (const llm::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("unknown module \"qproj\""), std::string::npos) << e.what();
  }
  s.preset = "everything";
  EXPECT_THROW(llm::lora_modules(c, s), llm::ConfigError);
}

TEST(ModelLora, OnlyAdaptersAreTrainableAndAppendedAfterTheBase) {
  const ModelConfig c = tiny_config();
  Model<float> plain(c, ModelOptions(kB, kT, false));
  Model<float> lora(c, ModelOptions(kB, kT, false, lora_all()));
  size_t adapter_elements = 0;
  for (const auto& t : lora.layout().tensors()) {
    if (t.role == llm::TensorRole::kLora) {
      EXPECT_TRUE(t.trainable) << t.name;
      EXPECT_GE(t.offset, plain.layout().total_elements()) << t.name;
      adapter_elements += static_cast<size_t>(t.numel);
    } else {
      EXPECT_FALSE(t.trainable) << t.name;
      EXPECT_EQ(t.offset, plain.layout().at(t.name).offset) << t.name;
    }
  }
  // 2 layers x (q 8->8, k 8->4, v 8->4, o 8->8, gate 8->12, up 8->12, down 12->8), r = 3.
  const size_t per_layer = 3 * ((8 + 8) + (8 + 4) + (8 + 4) + (8 + 8) + (8 + 12) + (8 + 12) + (12 + 8));
  EXPECT_EQ(adapter_elements, 2 * per_layer);
  EXPECT_EQ(lora.layout().trainable_elements(), adapter_elements);
  EXPECT_EQ(lora.gradients().size(), adapter_elements);
}

// initial_lora_adapters gives exactly what Model::init_lora writes, without a model.
TEST(ModelLora, InitialAdaptersWithoutAModelAreInitLoras) {
  const ModelConfig c = tiny_config();
  Model<float> lora(c, ModelOptions(kB, kT, false, lora_all()));
  lora.init_lora();
  const std::vector<float> fresh = llm::initial_lora_adapters(c, lora_all(), lora.layout());
  ASSERT_EQ(fresh.size(), lora.layout().trainable_elements());
  size_t nonzero = 0;
  for (const auto& t : lora.layout().tensors()) {
    if (!t.trainable) continue;
    for (int64_t i = 0; i < t.numel; ++i) {
      ASSERT_EQ(fresh[t.grad_offset + i], lora.parameters()[t.offset + i]) << t.name;
      nonzero += fresh[t.grad_offset + i] != 0.0f;
    }
  }
  EXPECT_GT(nonzero, 0u);
}

TEST(ModelLora, FreshAdapterGivesExactlyTheBaseLogits) {
  const ModelConfig c = tiny_config();
  Model<float> plain(c, ModelOptions(kB, kT, false));
  plain.init_weights(3);
  Model<float> lora(c, ModelOptions(kB, kT, false, lora_all()));
  lora.init_weights(99);  // A random, B zero
  copy_base(plain, lora);
  const double base_loss = plain.forward(kInputs.data(), kTargets.data(), kB, kT);
  const double lora_loss = lora.forward(kInputs.data(), kTargets.data(), kB, kT);
  EXPECT_EQ(base_loss, lora_loss);
  const size_t n = static_cast<size_t>(kB) * kT * c.vocab_size;
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(plain.logits()[i], lora.logits()[i]) << i;
  // A is initialised inside kaiming_uniform(a = sqrt(5))'s bound 1/sqrt(fan_in), and not all zero.
  const float* a = lora.param("model.layers.1.mlp.down_proj.lora_A.weight");
  double sum_abs = 0.0;
  for (int i = 0; i < 3 * 12; ++i) {
    EXPECT_LE(std::fabs(a[i]), 1.0f / std::sqrt(12.0f));
    sum_abs += std::fabs(a[i]);
  }
  EXPECT_GT(sum_abs, 0.0);
}

// Analytic adapter gradients against central differences, in double, with LoRA dropout on and rsLoRA.
void check_lora_gradients(bool recompute, bool rslora, double dropout) {
  const ModelConfig c = tiny_config();
  LoraSettings s = lora_all();
  s.rslora = rslora;
  s.dropout = dropout;
  Model<double> model(c, ModelOptions(kB, kT, recompute, s));
  model.init_weights(7);
  for (auto& w : model.parameters()) w *= 10.0;
  randomise_lora_b(model, 1.0);
  model.set_training(true);
  model.set_dropout_rng(123, 4);
  auto loss = [&]() { return model.forward(kInputs.data(), kTargets.data(), kB, kT); };
  model.zero_grad();
  loss();
  model.backward_mean_cross_entropy();
  const std::vector<double> analytic_all = model.gradients();
  std::vector<double>& params = model.parameters();
  int checked = 0;
  for (const auto& t : model.layout().tensors()) {
    if (!t.trainable) {
      EXPECT_EQ(model.grad(t.name), nullptr) << t.name;
      continue;
    }
    std::vector<double> x(params.begin() + t.offset, params.begin() + t.offset + t.numel);
    std::vector<double> analytic(analytic_all.begin() + t.grad_offset,
                                 analytic_all.begin() + t.grad_offset + t.numel);
    auto loss_at = [&]() {
      std::copy(x.begin(), x.end(), params.begin() + t.offset);
      return loss();
    };
    llm::test::expect_gradient(t.name, x, analytic, loss_at, 1e-6, 1e-8, 1e-5);
    std::copy(x.begin(), x.end(), params.begin() + t.offset);
    ++checked;
  }
  EXPECT_EQ(checked, 2 * 7 * 2);  // A and B of 7 modules in 2 layers
}

TEST(ModelLora, GradientCheck) {
  check_lora_gradients(false, false, 0.0);
}
TEST(ModelLora, GradientCheckRsloraDropoutRecompute) {
  check_lora_gradients(true, true, 0.25);
}

TEST(ModelLora, DropoutChangesTrainingButNotEvaluation) {
  const ModelConfig c = tiny_config();
  LoraSettings s = lora_all();
  s.dropout = 0.5;
  Model<float> model(c, ModelOptions(kB, kT, false, s));
  model.init_weights(3);
  randomise_lora_b(model, 0.5);
  model.set_training(false);
  const double eval1 = model.forward(kInputs.data(), kTargets.data(), kB, kT);
  model.set_dropout_rng(1, 1);
  const double eval2 = model.forward(kInputs.data(), kTargets.data(), kB, kT);
  EXPECT_EQ(eval1, eval2);
  model.set_training(true);
  const double train1 = model.forward(kInputs.data(), kTargets.data(), kB, kT);
  EXPECT_NE(train1, eval1);
  const double train1_again = model.forward(kInputs.data(), kTargets.data(), kB, kT);
  EXPECT_EQ(train1, train1_again);  // same counter, same masks
}

ModelOptions with_neftune(double alpha) {
  ModelOptions o(kB, kT, false);
  o.neftune_alpha = alpha;
  return o;
}

TEST(ModelNeftune, NoiseInTrainingOnlyAndTheSameForTheSameMicroStep) {
  const ModelConfig c = tiny_config();
  Model<float> plain(c, with_neftune(0.0));
  Model<float> noisy(c, with_neftune(5.0));
  plain.init_weights(3);
  noisy.init_weights(3);
  for (Model<float>* m : {&plain, &noisy}) m->set_dropout_rng(11, 4);

  // Evaluation: no noise, the plain model's loss bit for bit.
  plain.set_training(false);
  noisy.set_training(false);
  const double eval_plain = plain.forward(kInputs.data(), kTargets.data(), kB, kT);
  EXPECT_EQ(noisy.forward(kInputs.data(), kTargets.data(), kB, kT), eval_plain);

  // Training: noise, the same for the same (seed, micro-step), other noise for the next micro-step.
  plain.set_training(true);
  noisy.set_training(true);
  EXPECT_EQ(plain.forward(kInputs.data(), kTargets.data(), kB, kT), eval_plain);  // no dropout configured
  const double train = noisy.forward(kInputs.data(), kTargets.data(), kB, kT);
  EXPECT_NE(train, eval_plain);
  EXPECT_EQ(noisy.forward(kInputs.data(), kTargets.data(), kB, kT), train);
  noisy.set_dropout_rng(11, 5);
  EXPECT_NE(noisy.forward(kInputs.data(), kTargets.data(), kB, kT), train);
}

// The noise is alpha / sqrt(T * d_model) times the same U(-1, 1) draws: for small alpha the loss moves
// linearly in alpha (first order), so doubling alpha doubles the shift.
TEST(ModelNeftune, NoiseScalesWithAlpha) {
  EXPECT_FLOAT_EQ(llm::layer::neftune_scale(5.0, 512, 4096),
                  static_cast<float>(5.0 / std::sqrt(512.0 * 4096.0)));
  const ModelConfig c = tiny_config();
  const auto shift_at = [&](double alpha) {
    Model<double> plain(c, ModelOptions(kB, kT, false));
    Model<double> noisy(c, with_neftune(alpha));
    plain.init_weights(3);
    noisy.init_weights(3);
    noisy.set_dropout_rng(11, 4);
    return noisy.forward(kInputs.data(), kTargets.data(), kB, kT) -
           plain.forward(kInputs.data(), kTargets.data(), kB, kT);
  };
  const double once = shift_at(1e-3), twice = shift_at(2e-3);
  ASSERT_NE(once, 0.0);
  EXPECT_NEAR(twice / once, 2.0, 0.02);
}

TEST(ModelLora, MergedEqualsUnmerged) {
  const ModelConfig c = tiny_config();
  const LoraSettings s = lora_all();
  Model<float> lora(c, ModelOptions(kB, kT, false, s));
  lora.init_weights(3);
  randomise_lora_b(lora, 0.3);
  Model<float> merged(c, ModelOptions(kB, kT, false));
  copy_base(lora, merged);
  for (const auto& m : lora.lora_modules()) {
    float* w = merged.param(m.prefix + ".weight");
    llm::ref::lora_merge(w, w, lora.param(m.a_name()), lora.param(m.b_name()), m.in_features, m.out_features,
                         s.r, s.scale());
  }
  lora.set_training(false);
  merged.set_training(false);
  lora.forward(kInputs.data(), kTargets.data(), kB, kT);
  merged.forward(kInputs.data(), kTargets.data(), kB, kT);
  double max_diff = 0.0, max_logit = 0.0, max_change = 0.0;
  Model<float> base(c, ModelOptions(kB, kT, false));
  copy_base(lora, base);
  base.forward(kInputs.data(), kTargets.data(), kB, kT);
  for (int i = 0; i < kB * kT * c.vocab_size; ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(lora.logits()[i] - merged.logits()[i])));
    max_logit = std::max(max_logit, static_cast<double>(std::fabs(merged.logits()[i])));
    max_change = std::max(max_change, static_cast<double>(std::fabs(merged.logits()[i] - base.logits()[i])));
  }
  EXPECT_LT(max_diff, 1e-5 * std::max(1.0, max_logit));
  EXPECT_GT(max_change, 1e-3);  // the adapter really changes the output
}

TEST(ModelLora, Nf4NeedsLora) {
  llm::QuantSettings q;
  q.nf4 = true;
  EXPECT_THROW(Model<float>(tiny_config(), ModelOptions(kB, kT, false, {}, q)), llm::ConfigError);
}

void check_qlora_matches_dequantised(bool double_quant) {
  ModelConfig c = tiny_config();
  c.d_model = 64;  // whole NF4 blocks and a partial one (d_ff 100)
  c.d_ff = 100;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 13;
  llm::QuantSettings q;
  q.nf4 = true;
  q.double_quant = double_quant;
  const LoraSettings s = lora_all(4);
  Model<float> qlora(c, ModelOptions(kB, kT, false, s, q));
  qlora.init_weights(11);
  randomise_lora_b(qlora, 0.2);
  // The reference: the same weights round-tripped through NF4 by the CPU reference ops, in a model
  // without quantisation.
  Model<float> reference(c, ModelOptions(kB, kT, false, s));
  std::copy(qlora.parameters().begin(), qlora.parameters().end(), reference.parameters().begin());
  const auto names = llm::nf4_quantized_tensors(c);
  EXPECT_EQ(names.size(), 2u * 7u);
  for (const auto& name : names) {
    const size_t n = static_cast<size_t>(reference.layout().at(name).numel);
    float* w = reference.param(name);
    std::vector<uint8_t> packed((n + 1) / 2);
    std::vector<float> absmax(llm::ref::blocks_for(n, 64));
    llm::ref::nf4_quantize(packed.data(), absmax.data(), w, n);
    if (double_quant) {
      std::vector<uint8_t> qa(absmax.size());
      std::vector<float> state2(llm::ref::blocks_for(absmax.size(), 256));
      float offset = 0.0f;
      llm::ref::nf4_double_quantize(qa.data(), state2.data(), &offset, absmax.data(), absmax.size());
      llm::ref::nf4_double_dequantize(absmax.data(), qa.data(), state2.data(), offset, absmax.size());
    }
    llm::ref::nf4_dequantize(w, packed.data(), absmax.data(), n);
  }
  const std::vector<float> before = qlora.parameters();
  qlora.quantize_base_nf4();
  EXPECT_EQ(qlora.nf4_tensors().size(), names.size());
  // The quantisation changed the base matrices and nothing else.
  for (const auto& t : qlora.layout().tensors()) {
    const bool quantised = std::find(names.begin(), names.end(), t.name) != names.end();
    bool changed = false;
    for (int64_t i = 0; i < t.numel; ++i) changed |= before[t.offset + i] != qlora.param(t.name)[i];
    EXPECT_EQ(changed, quantised) << t.name;
  }
  qlora.set_training(false);
  reference.set_training(false);
  EXPECT_EQ(qlora.forward(kInputs.data(), kTargets.data(), kB, kT),
            reference.forward(kInputs.data(), kTargets.data(), kB, kT));
  for (int i = 0; i < kB * kT * c.vocab_size; ++i) ASSERT_EQ(qlora.logits()[i], reference.logits()[i]) << i;

  // The plan counts about half a byte per base parameter for the NF4 weights.
  const llm::MemoryPlan plan = qlora.memory_plan(8.0);
  const double per_param = static_cast<double>(plan.nf4_base) / static_cast<double>(plan.nf4_params);
  EXPECT_GT(per_param, 0.5);
  EXPECT_LT(per_param, double_quant ? 0.53 : 0.57);
  EXPECT_NE(plan.describe().find("nf4 base"), std::string::npos);
}

TEST(ModelLora, QloraForwardEqualsDequantisedForward) {
  check_qlora_matches_dequantised(true);
}
TEST(ModelLora, QloraForwardEqualsDequantisedForwardNoDoubleQuant) {
  check_qlora_matches_dequantised(false);
}

}  // namespace

namespace {

// A model far larger than any machine's memory is refused with a message, not a bare bad_alloc.
TEST(ModelMemory, OutOfMemoryIsAClearError) {
  ModelConfig c = tiny_config();
  c.vocab_size = 2000000;
  c.d_model = 262144;  // 2M x 256K embedding: 2 TB of fp32
  c.n_heads = 2048;
  c.n_kv_heads = 2048;
  c.attention_type = "mha";
  c.d_ff = 128;
  try {
    Model<float> model(c, ModelOptions(1, 2, false));
    FAIL() << "expected an out-of-memory error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("out of memory allocating the parameters"), std::string::npos)
        << e.what();
  }
}

}  // namespace
