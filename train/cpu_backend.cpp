#include "train/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "llm/sampling.h"

namespace llm {

namespace {

ModelOptions model_options(const BackendOptions& options) {
  ModelOptions o(options.max_batch, options.max_seq, options.recompute, options.lora, options.quant);
  o.neftune_alpha = options.neftune_alpha;
  return o;
}

}  // namespace

CpuBackend::CpuBackend(const ModelConfig& config, const OptimizerConfig& optimizer,
                       const BackendOptions& options)
    : model_(config, model_options(options)), optimizer_(make_optimizer(optimizer)), seed_(options.seed) {
  if (options.init_base) {
    model_.init_weights(options.seed);
  } else {
    model_.init_lora();
  }
  views_ = make_param_views(model_.layout(), model_.parameters().data(), model_.gradients().data(),
                            options.weight_decay, options.no_decay_names, options.decay_names);
  optimizer_->init(views_);
}

double CpuBackend::forward_backward(const TokenBatch& b, double grad_scale, uint64_t dropout_counter) {
  model_.set_training(true);
  model_.set_dropout_rng(seed_, dropout_counter);
  const double loss = model_.forward(b.inputs, b.targets, b.B, b.T, b.positions, b.doc_ids);
  model_.backward_mean_cross_entropy(grad_scale);
  return loss;
}

double CpuBackend::evaluate(const TokenBatch& b) {
  model_.set_training(false);
  return model_.forward(b.inputs, b.targets, b.B, b.T, b.positions, b.doc_ids);
}

std::vector<float> CpuBackend::next_token_logits(const std::vector<int32_t>& tokens) {
  if (tokens.empty()) throw std::invalid_argument("next_token_logits needs at least one token");
  model_.set_training(false);
  const int max_seq = model_.options().max_seq;
  // Keep the most recent max_seq tokens (no KV cache yet: the whole window is recomputed).
  const size_t start = tokens.size() > static_cast<size_t>(max_seq) ? tokens.size() - max_seq : 0;
  const int T = static_cast<int>(tokens.size() - start);
  model_.forward(tokens.data() + start, nullptr, 1, T);
  const int V = model_.config().vocab_size;
  const float* last = model_.logits() + static_cast<size_t>(T - 1) * V;
  return std::vector<float>(last, last + V);
}

double CpuBackend::grad_norm() {
  double sum = 0.0;
  for (float g : model_.gradients()) sum += static_cast<double>(g) * g;
  return std::sqrt(sum);
}

void CpuBackend::scale_grads(double factor) {
  for (float& g : model_.gradients()) g = static_cast<float>(g * factor);
}

void CpuBackend::optimizer_step(double lr, int64_t step) {
  optimizer_->step(views_, lr, step);
}

void CpuBackend::update_hessian_estimate(const TokenBatch& b, int batch_tokens, uint64_t sample_counter) {
  model_.set_training(false);
  model_.forward(b.inputs, nullptr, b.B, b.T, b.positions, b.doc_ids);
  const int V = model_.config().vocab_size;
  const size_t N = static_cast<size_t>(b.B) * b.T;
  // One label per position drawn from softmax(logits); positions the batch ignores stay ignored.
  std::vector<int32_t> sampled(N);
  std::vector<float> row(V);
  for (size_t n = 0; n < N; ++n) {
    if (b.targets && b.targets[n] == -100) {
      sampled[n] = -100;
      continue;
    }
    std::copy(model_.logits() + n * V, model_.logits() + (n + 1) * V, row.begin());
    sampled[n] = sample_token(row, 1.0, 0, seed_ ^ 0x50f1a5eedull, sample_counter * N + n);
  }
  model_.zero_grad();
  model_.forward(b.inputs, sampled.data(), b.B, b.T, b.positions, b.doc_ids);
  model_.backward_mean_cross_entropy(1.0);
  optimizer_->update_hessian_estimate(views_, batch_tokens);
  model_.zero_grad();
}

void CpuBackend::write_parameters(const std::vector<float>& values) {
  if (values.size() != model_.parameters().size()) {
    throw std::invalid_argument("parameter count " + std::to_string(values.size()) +
                                " does not match the model's " + std::to_string(model_.parameters().size()));
  }
  // Copy in place: the optimizer's views point into this arena.
  std::copy(values.begin(), values.end(), model_.parameters().begin());
}

std::vector<float> CpuBackend::read_trainable_parameters() {
  return gather_trainable(layout(), model_.parameters().data());
}

void CpuBackend::write_trainable_parameters(const std::vector<float>& values) {
  check_trainable_count(values.size());
  scatter_trainable(layout(), values.data(), model_.parameters().data());
}

void CpuBackend::write_base_parameters(const std::vector<float>& values) {
  check_base_count(values.size());
  std::copy(values.begin(), values.end(), model_.parameters().begin());
}

void CpuBackend::write_tensor(const std::string& name, const std::vector<float>& values) {
  const TensorInfo& t = checked_tensor(name, values.size());
  std::copy(values.begin(), values.end(), model_.parameters().begin() + t.offset);
}

}  // namespace llm
