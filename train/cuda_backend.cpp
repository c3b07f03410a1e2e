#include "train/cuda_backend.h"

#include <stdexcept>

#include "kernels/cuda_runtime.h"
#include "llm/json_config.h"
#include "llm/model.h"

namespace llm {

namespace {

// Checks the device and the optimizer before any GPU memory is touched; returns the config unchanged.
const ModelConfig& checked(const ModelConfig& config, const OptimizerConfig& optimizer) {
  require_cuda_device();
  if (optimizer.name != "adamw") {
    throw ConfigError(
        "optimizer \"" + optimizer.name +
        "\" is not yet available on device \"cuda\" (the CUDA backend implements adamw; lion, "
        "muon, sophia, adafactor and adamw_8bit run on the CPU only for now): use \"optimizer\": "
        "\"adamw\" or \"device\": \"cpu\"");
  }
  return config;
}

cuda::CudaModelOptions model_options(const BackendOptions& options, cuda::Precision precision) {
  cuda::CudaModelOptions o;
  o.max_batch = options.max_batch;
  o.max_seq = options.max_seq;
  o.recompute = options.recompute;
  o.precision = precision;
  return o;
}

}  // namespace

void require_cuda_device() {
  if (cuda::device_count() > 0) return;
  std::string reason = cuda::unavailable_reason();
  const std::string prefix = "no usable CUDA device: ";
  if (reason.compare(0, prefix.size(), prefix) == 0) reason = reason.substr(prefix.size());
  if (reason.empty()) reason = "no CUDA device found";
  throw ConfigError("device \"cuda\" requested but no usable CUDA device: " + reason);
}

std::string resolve_device(const std::string& device) {
  if (device == "auto") return cuda::device_count() > 0 ? "cuda" : "cpu";
  if (device == "cpu" || device == "cuda") return device;
  throw ConfigError("key \"device\": expected one of auto, cpu, cuda; found \"" + device + "\"");
}

CudaBackend::CudaBackend(const ModelConfig& config, const OptimizerConfig& optimizer,
                         const BackendOptions& options, cuda::Precision precision)
    : model_(checked(config, optimizer), model_options(options, precision)), seed_(options.seed) {
  // The same initial weights as the CPU backend: initialised on the host by llm::Model (whose
  // activation buffers are planned for a single token), then uploaded.
  Model<float> host(config, ModelOptions{1, 1, false});
  host.init_weights(options.seed);
  model_.upload_parameters(host.parameters());
  const std::vector<ParamView> views =
      make_param_views(host.layout(), host.parameters().data(), host.gradients().data(), options.weight_decay,
                       options.no_decay_names, options.decay_names);
  cuda::CudaAdamW adam;
  adam.beta1 = optimizer.adamw_beta1;
  adam.beta2 = optimizer.adamw_beta2;
  adam.eps = optimizer.adamw_eps;
  for (const ParamView& v : views) {
    adam.weight_decay.push_back(v.weight_decay);
    adam.lr_scale.push_back(v.lr_scale);
  }
  model_.adamw_init(adam);
}

double CudaBackend::forward_backward(const TokenBatch& b, double grad_scale, uint64_t dropout_counter) {
  model_.set_training(true);
  model_.set_dropout_rng(seed_, dropout_counter);
  return model_.forward_backward(b.inputs, b.targets, b.B, b.T, b.positions, b.doc_ids, grad_scale);
}

double CudaBackend::evaluate(const TokenBatch& b) {
  model_.set_training(false);
  return model_.forward(b.inputs, b.targets, b.B, b.T, b.positions, b.doc_ids);
}

std::vector<float> CudaBackend::next_token_logits(const std::vector<int32_t>& tokens) {
  return model_.next_token_logits(tokens);
}

void CudaBackend::update_hessian_estimate(const TokenBatch& /*batch*/, int /*batch_tokens*/,
                                          uint64_t /*sample_counter*/) {
  throw std::logic_error("update_hessian_estimate: Sophia is not available on device \"cuda\"");
}

std::vector<StateBuffer> CudaBackend::optimizer_state() {
  std::vector<StateBuffer> out;
  size_t t = 0;
  for (const auto& info : model_.layout().tensors()) {
    if (!info.trainable) continue;
    out.push_back({"adamw.m." + std::to_string(t), model_.download_adamw_state(0, t)});
    out.push_back({"adamw.v." + std::to_string(t), model_.download_adamw_state(1, t)});
    ++t;
  }
  return out;
}

void CudaBackend::load_optimizer_state(const std::vector<StateBuffer>& state) {
  std::vector<StateSlot> slots;
  size_t t = 0;
  for (const auto& info : model_.layout().tensors()) {
    if (!info.trainable) continue;
    const size_t n = static_cast<size_t>(info.numel);
    slots.push_back({"adamw.m." + std::to_string(t), n, info.name});
    slots.push_back({"adamw.v." + std::to_string(t), n, info.name});
    ++t;
  }
  check_state_layout("adamw", state, slots);
  for (size_t i = 0; i < t; ++i) {
    model_.upload_adamw_state(0, i, state[2 * i].data);
    model_.upload_adamw_state(1, i, state[2 * i + 1].data);
  }
}

std::unique_ptr<TrainBackend> make_backend(const std::string& device, const ModelConfig& config,
                                           const OptimizerConfig& optimizer, const BackendOptions& options,
                                           cuda::Precision precision) {
  if (resolve_device(device) == "cuda")
    return std::make_unique<CudaBackend>(config, optimizer, options, precision);
  return std::make_unique<CpuBackend>(config, optimizer, options);
}

}  // namespace llm
