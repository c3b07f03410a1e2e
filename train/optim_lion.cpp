// Lion on the CPU; the algorithm and its defaults are in optim_lion.h.
#include "train/optim_lion.h"

#include <stdexcept>

namespace llm {

void Lion::init(const std::vector<ParamView>& params) {
  m_.clear();
  tensor_names_.clear();
  for (const auto& p : params) {
    m_.emplace_back(static_cast<size_t>(p.info->numel), 0.0f);
    tensor_names_.push_back(p.info->name);
  }
}

void Lion::step(const std::vector<ParamView>& params, double lr, int64_t /*step*/) {
  if (params.size() != m_.size())
    throw std::logic_error("Lion::step: the tensors differ from those given to init");
  for (size_t t = 0; t < params.size(); ++t) {
    const ParamView& p = params[t];
    const double tensor_lr = lr * p.lr_scale;
    float* m = m_[t].data();
    for (int64_t i = 0; i < p.info->numel; ++i) {
      const double g = p.grad[i];
      const double c = beta1_ * m[i] + (1.0 - beta1_) * g;
      const double sign = c > 0.0 ? 1.0 : (c < 0.0 ? -1.0 : 0.0);
      double w = p.param[i];
      w -= tensor_lr * p.weight_decay * w;
      w -= tensor_lr * sign;
      p.param[i] = static_cast<float>(w);
      m[i] = static_cast<float>(beta2_ * m[i] + (1.0 - beta2_) * g);
    }
  }
}

std::vector<StateSlot> Lion::slots() const {
  std::vector<StateSlot> out;
  for (size_t t = 0; t < m_.size(); ++t)
    out.push_back({"lion.m." + std::to_string(t), m_[t].size(), tensor_names_[t]});
  return out;
}

std::vector<StateBuffer> Lion::state() const {
  std::vector<StateBuffer> out;
  for (size_t t = 0; t < m_.size(); ++t) out.push_back({"lion.m." + std::to_string(t), m_[t]});
  return out;
}

void Lion::load_state(const std::vector<StateBuffer>& state) {
  check_state_layout(name(), state, slots());
  for (size_t t = 0; t < m_.size(); ++t) m_[t] = state[t].data;
}

}  // namespace llm
