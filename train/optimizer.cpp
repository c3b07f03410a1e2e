#include "train/optimizer.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

#include "train/optim_adafactor.h"
#include "train/optim_adamw8bit.h"
#include "train/optim_lion.h"
#include "train/optim_muon.h"
#include "train/optim_sophia.h"

namespace llm {

namespace {

std::string number(double value) {
  std::ostringstream s;
  s << value;
  return s.str();
}

std::string prefix_of(const std::string& buffer_name) {
  return buffer_name.substr(0, buffer_name.find('.'));
}

}  // namespace

const std::vector<std::string>& optimizer_names() {
  static const std::vector<std::string> names = {"adamw", "adamw_8bit", "lion",
                                                 "muon",  "sophia",     "adafactor"};
  return names;
}

void read_optimizer_config(KeyReader& r, OptimizerConfig& c) {
  r.get_choice("optimizer", c.name, optimizer_names());
  r.get("adamw_beta1", c.adamw_beta1);
  r.get("adamw_beta2", c.adamw_beta2);
  r.get("adamw_eps", c.adamw_eps);
  r.get("lion_beta1", c.lion_beta1);
  r.get("lion_beta2", c.lion_beta2);
  r.get("muon_momentum", c.muon_momentum);
  r.get("muon_nesterov", c.muon_nesterov);
  r.get("muon_ns_steps", c.muon_ns_steps);
  r.get("muon_adamw_lr_scale", c.muon_adamw_lr_scale);
  r.get_choice("muon_ns_precision", c.muon_ns_precision, {"fp64", "fp32", "bf16"});
  r.get("sophia_beta1", c.sophia_beta1);
  r.get("sophia_beta2", c.sophia_beta2);
  r.get("sophia_rho", c.sophia_rho);
  r.get("sophia_k", c.sophia_k);
  r.get("adafactor_eps1", c.adafactor_eps1);
  r.get("adafactor_eps2", c.adafactor_eps2);
  r.get("adafactor_clip_threshold", c.adafactor_clip_threshold);
  r.get("adafactor_decay_rate", c.adafactor_decay_rate);
  r.get("adafactor_beta1", c.adafactor_beta1);
  r.get("adafactor_scale_parameter", c.adafactor_scale_parameter);
  r.get("adafactor_relative_step", c.adafactor_relative_step);
  r.get("adafactor_warmup_init", c.adafactor_warmup_init);
  r.get("adamw_8bit_block_size", c.adamw_8bit_block_size);
}

std::vector<std::string> validate_optimizer_config(const OptimizerConfig& c) {
  std::vector<std::string> p;
  auto beta = [&p](const char* key, double value) {
    if (!(value >= 0.0 && value < 1.0))
      p.push_back(std::string(key) + " must be in [0, 1), found " + number(value));
  };
  auto positive = [&p](const char* key, double value) {
    if (!(value > 0.0) || std::isinf(value))
      p.push_back(std::string(key) + " must be positive, found " + number(value));
  };
  auto int_range = [&p](const char* key, int value, int lo, int hi) {
    if (value < lo || value > hi) {
      p.push_back(std::string(key) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                  "], found " + std::to_string(value));
    }
  };
  beta("adamw_beta1", c.adamw_beta1);
  beta("adamw_beta2", c.adamw_beta2);
  positive("adamw_eps", c.adamw_eps);
  beta("lion_beta1", c.lion_beta1);
  beta("lion_beta2", c.lion_beta2);
  beta("muon_momentum", c.muon_momentum);
  int_range("muon_ns_steps", c.muon_ns_steps, 1, 100);
  positive("muon_adamw_lr_scale", c.muon_adamw_lr_scale);
  if (c.muon_ns_precision != "fp64" && c.muon_ns_precision != "fp32" && c.muon_ns_precision != "bf16") {
    p.push_back("muon_ns_precision must be one of fp64, fp32, bf16, found \"" + c.muon_ns_precision + "\"");
  }
  beta("sophia_beta1", c.sophia_beta1);
  beta("sophia_beta2", c.sophia_beta2);
  positive("sophia_rho", c.sophia_rho);
  int_range("sophia_k", c.sophia_k, 1, 1000000);
  positive("adafactor_eps1", c.adafactor_eps1);
  positive("adafactor_eps2", c.adafactor_eps2);
  positive("adafactor_clip_threshold", c.adafactor_clip_threshold);
  if (!(c.adafactor_decay_rate >= -1.0 && c.adafactor_decay_rate < 0.0)) {
    p.push_back("adafactor_decay_rate must be in [-1, 0) (the default is -0.8), found " +
                number(c.adafactor_decay_rate));
  }
  beta("adafactor_beta1", c.adafactor_beta1);
  if (c.adafactor_warmup_init && !c.adafactor_relative_step) {
    p.push_back("adafactor_warmup_init = true needs adafactor_relative_step = true");
  }
  int_range("adamw_8bit_block_size", c.adamw_8bit_block_size, 16, 1 << 20);
  return p;
}

std::unique_ptr<Optimizer> make_optimizer(const OptimizerConfig& c) {
  if (c.name == "adamw") return std::make_unique<AdamW>(c.adamw_beta1, c.adamw_beta2, c.adamw_eps);
  if (c.name == "adamw_8bit") {
    return std::make_unique<AdamW8bit>(c.adamw_beta1, c.adamw_beta2, c.adamw_eps, c.adamw_8bit_block_size);
  }
  if (c.name == "lion") return std::make_unique<Lion>(c.lion_beta1, c.lion_beta2);
  if (c.name == "muon") {
    return std::make_unique<Muon>(c.muon_momentum, c.muon_nesterov, c.muon_ns_steps,
                                  ns_precision_from_name(c.muon_ns_precision), c.muon_adamw_lr_scale,
                                  c.adamw_beta1, c.adamw_beta2, c.adamw_eps);
  }
  if (c.name == "sophia")
    return std::make_unique<Sophia>(c.sophia_beta1, c.sophia_beta2, c.sophia_rho, c.sophia_k);
  if (c.name == "adafactor") {
    AdafactorOptions o;
    o.eps1 = c.adafactor_eps1;
    o.eps2 = c.adafactor_eps2;
    o.clip_threshold = c.adafactor_clip_threshold;
    o.decay_rate = c.adafactor_decay_rate;
    o.beta1 = c.adafactor_beta1;
    o.scale_parameter = c.adafactor_scale_parameter;
    o.relative_step = c.adafactor_relative_step;
    o.warmup_init = c.adafactor_warmup_init;
    return std::make_unique<Adafactor>(o);
  }
  std::string list;
  for (const auto& n : optimizer_names()) list += (list.empty() ? "" : ", ") + n;
  std::string message = "optimizer \"" + c.name + "\" is unknown; expected one of " + list;
  const std::string near = nearest_key(c.name, optimizer_names());
  if (!near.empty()) message += " (did you mean \"" + near + "\"?)";
  throw ConfigError(message);
}

void check_state_layout(const std::string& optimizer, const std::vector<StateBuffer>& state,
                        const std::vector<StateSlot>& expected) {
  if (!state.empty() && !expected.empty() && prefix_of(state[0].name) != prefix_of(expected[0].name)) {
    throw std::runtime_error("the optimizer state was saved by another optimizer (its first buffer is \"" +
                             state[0].name + "\"; " + optimizer + " expects \"" + expected[0].name +
                             "\"): resume with the optimizer it was saved with, or start without its state");
  }
  if (state.size() != expected.size()) {
    throw std::runtime_error(optimizer + " state has " + std::to_string(state.size()) +
                             " buffers, expected " + std::to_string(expected.size()) +
                             " (was it saved by another optimizer, or for other trainable tensors?)");
  }
  for (size_t i = 0; i < state.size(); ++i) {
    const StateSlot& want = expected[i];
    const std::string tensor = want.tensor.empty() ? "" : " (tensor " + want.tensor + ")";
    if (state[i].name != want.name) {
      throw std::runtime_error(optimizer + " state buffer " + std::to_string(i) + " is \"" + state[i].name +
                               "\", expected \"" + want.name + "\"" + tensor);
    }
    if (state[i].data.size() != want.size) {
      throw std::runtime_error(optimizer + " state buffer \"" + want.name + "\"" + tensor + " has " +
                               std::to_string(state[i].data.size()) + " values, expected " +
                               std::to_string(want.size));
    }
  }
}

std::vector<ParamView> make_param_views(const ParameterLayout& layout, float* params, const float* grads,
                                        double weight_decay, const std::vector<std::string>& no_decay_names,
                                        const std::vector<std::string>& decay_names) {
  auto matches = [](const std::string& name, const std::vector<std::string>& patterns) {
    for (const auto& p : patterns) {
      if (name.find(p) != std::string::npos) return true;
    }
    return false;
  };
  std::vector<ParamView> views;
  for (const auto& t : layout.tensors()) {
    if (!t.trainable) continue;
    ParamView v;
    v.info = &t;
    v.param = params != nullptr ? params + t.offset : nullptr;
    v.grad = grads != nullptr ? grads + t.grad_offset : nullptr;
    bool decay = t.role != TensorRole::kNorm && t.role != TensorRole::kBias;
    if (matches(t.name, no_decay_names)) decay = false;
    if (matches(t.name, decay_names)) decay = true;
    v.weight_decay = decay ? weight_decay : 0.0;
    views.push_back(v);
  }
  return views;
}

void AdamW::init(const std::vector<ParamView>& params) {
  m_.clear();
  v_.clear();
  tensor_names_.clear();
  for (const auto& p : params) {
    m_.emplace_back(static_cast<size_t>(p.info->numel), 0.0f);
    v_.emplace_back(static_cast<size_t>(p.info->numel), 0.0f);
    tensor_names_.push_back(p.info->name);
  }
}

void AdamW::step(const std::vector<ParamView>& params, double lr, int64_t step) {
  if (params.size() != m_.size())
    throw std::logic_error("AdamW::step: the tensors differ from those given to init");
  const double bias1 = 1.0 - std::pow(beta1_, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(beta2_, static_cast<double>(step));
  for (size_t t = 0; t < params.size(); ++t) {
    const ParamView& p = params[t];
    const double tensor_lr = lr * p.lr_scale;
    float* m = m_[t].data();
    float* v = v_[t].data();
    for (int64_t i = 0; i < p.info->numel; ++i) {
      const double g = p.grad[i];
      const double mi = beta1_ * m[i] + (1.0 - beta1_) * g;
      const double vi = beta2_ * v[i] + (1.0 - beta2_) * g * g;
      m[i] = static_cast<float>(mi);
      v[i] = static_cast<float>(vi);
      double w = p.param[i];
      w -= tensor_lr * p.weight_decay * w;  // decoupled: applied to the weight, not the gradient
      w -= tensor_lr * (mi / bias1) / (std::sqrt(vi / bias2) + eps_);
      p.param[i] = static_cast<float>(w);
    }
  }
}

std::vector<StateSlot> AdamW::slots() const {
  std::vector<StateSlot> out;
  for (size_t t = 0; t < m_.size(); ++t) {
    out.push_back({"adamw.m." + std::to_string(t), m_[t].size(), tensor_names_[t]});
    out.push_back({"adamw.v." + std::to_string(t), v_[t].size(), tensor_names_[t]});
  }
  return out;
}

std::vector<StateBuffer> AdamW::state() const {
  std::vector<StateBuffer> out;
  for (size_t t = 0; t < m_.size(); ++t) {
    out.push_back({"adamw.m." + std::to_string(t), m_[t]});
    out.push_back({"adamw.v." + std::to_string(t), v_[t]});
  }
  return out;
}

void AdamW::load_state(const std::vector<StateBuffer>& state) {
  check_state_layout(name(), state, slots());
  for (size_t t = 0; t < m_.size(); ++t) {
    m_[t] = state[2 * t].data;
    v_[t] = state[2 * t + 1].data;
  }
}

}  // namespace llm
