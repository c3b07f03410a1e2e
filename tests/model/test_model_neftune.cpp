// NEFTune inside the whole model: noise on the embeddings in training only, the same noise for the same
// micro-step (so a resumed run draws it again), and gradients that pass a finite-difference check at the
// noisy forward (the noise is a constant shift, so the backward pass needs nothing new).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "llm/model.h"
#include "llm/model_layout.h"
#include "tests/gradcheck.h"

namespace {

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
  return c;
}

const int kB = 2, kT = 5;
const std::vector<int32_t> kInputs{1, 4, 2, 9, 0, 3, 3, 7, 10, 5};
const std::vector<int32_t> kTargets{4, 2, -100, 0, 6, 3, 7, 10, 5, -100};

ModelOptions with_neftune(double alpha, bool recompute = false) {
  ModelOptions o(kB, kT, recompute);
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

// The noise is alpha / sqrt(T * d_model) times U(-1, 1): a larger alpha moves the loss further.
TEST(ModelNeftune, ScaleFollowsAlphaOverSqrtOfRowLengthTimesWidth) {
  EXPECT_FLOAT_EQ(llm::layer::neftune_scale(5.0, 512, 4096),
                  static_cast<float>(5.0 / std::sqrt(512.0 * 4096.0)));
  const ModelConfig c = tiny_config();
  double previous_shift = 0.0;
  for (double alpha : {0.5, 5.0, 50.0}) {
    Model<double> plain(c, with_neftune(0.0));
    Model<double> noisy(c, with_neftune(alpha));
    plain.init_weights(3);
    noisy.init_weights(3);
    noisy.set_dropout_rng(11, 4);
    const double shift = std::abs(noisy.forward(kInputs.data(), kTargets.data(), kB, kT) -
                                  plain.forward(kInputs.data(), kTargets.data(), kB, kT));
    EXPECT_GT(shift, previous_shift) << alpha;
    previous_shift = shift;
  }
}

// Every parameter's gradient against central differences at the noisy forward, in double, with and
// without recompute.
void check_gradients(bool recompute) {
  const ModelConfig c = tiny_config();
  Model<double> model(c, with_neftune(5.0, recompute));
  model.init_weights(7);
  for (auto& w : model.parameters()) w *= 10.0;
  model.set_training(true);
  model.set_dropout_rng(123, 4);
  auto loss = [&]() { return model.forward(kInputs.data(), kTargets.data(), kB, kT); };
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

TEST(ModelNeftune, GradientCheck) {
  check_gradients(false);
}
TEST(ModelNeftune, GradientCheckRecompute) {
  check_gradients(true);
}

}  // namespace
