// SophiaG on the CPU; the algorithm and its defaults are in optim_sophia.h.
#include "train/optim_sophia.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace llm {

void Sophia::init(const std::vector<ParamView>& params) {
  m_.clear();
  h_.clear();
  tensor_names_.clear();
  batch_tokens_ = 0.0;
  for (const auto& p : params) {
    m_.emplace_back(static_cast<size_t>(p.info->numel), 0.0f);
    h_.emplace_back(static_cast<size_t>(p.info->numel), 0.0f);
    tensor_names_.push_back(p.info->name);
  }
}

void Sophia::step(const std::vector<ParamView>& params, double lr, int64_t /*step*/) {
  if (params.size() != m_.size())
    throw std::logic_error("Sophia::step: the tensors differ from those given to init");
  const double curvature_scale = rho_ * batch_tokens_;
  for (size_t t = 0; t < params.size(); ++t) {
    const ParamView& p = params[t];
    const double tensor_lr = lr * p.lr_scale;
    float* m = m_[t].data();
    const float* h = h_[t].data();
    for (int64_t i = 0; i < p.info->numel; ++i) {
      double w = p.param[i];
      w -= tensor_lr * p.weight_decay * w;
      const double mi = beta1_ * m[i] + (1.0 - beta1_) * p.grad[i];
      m[i] = static_cast<float>(mi);
      const double ratio = std::min(std::fabs(mi) / (curvature_scale * h[i] + 1e-15), 1.0);
      const double sign = mi > 0.0 ? 1.0 : (mi < 0.0 ? -1.0 : 0.0);
      w -= tensor_lr * sign * ratio;
      p.param[i] = static_cast<float>(w);
    }
  }
}

void Sophia::update_hessian_estimate(const std::vector<ParamView>& params, int batch_tokens) {
  if (params.size() != h_.size()) {
    throw std::logic_error("Sophia::update_hessian_estimate: the tensors differ from those given to init");
  }
  if (batch_tokens < 1) {
    throw std::invalid_argument("Sophia::update_hessian_estimate: batch_tokens must be positive, found " +
                                std::to_string(batch_tokens));
  }
  batch_tokens_ = batch_tokens;
  for (size_t t = 0; t < params.size(); ++t) {
    const ParamView& p = params[t];
    float* h = h_[t].data();
    for (int64_t i = 0; i < p.info->numel; ++i) {
      const double g = p.grad[i];
      h[i] = static_cast<float>(beta2_ * h[i] + (1.0 - beta2_) * g * g);
    }
  }
}

std::vector<StateSlot> Sophia::slots() const {
  std::vector<StateSlot> out;
  for (size_t t = 0; t < m_.size(); ++t) {
    out.push_back({"sophia.m." + std::to_string(t), m_[t].size(), tensor_names_[t]});
    out.push_back({"sophia.h." + std::to_string(t), h_[t].size(), tensor_names_[t]});
  }
  out.push_back({"sophia.batch_tokens", 2, ""});
  return out;
}

std::vector<StateBuffer> Sophia::state() const {
  std::vector<StateBuffer> out;
  for (size_t t = 0; t < m_.size(); ++t) {
    out.push_back({"sophia.m." + std::to_string(t), m_[t]});
    out.push_back({"sophia.h." + std::to_string(t), h_[t]});
  }
  // bs as a float pair (high part, remainder): exact for any token count below 2^48.
  const float high = static_cast<float>(batch_tokens_);
  out.push_back({"sophia.batch_tokens", {high, static_cast<float>(batch_tokens_ - high)}});
  return out;
}

void Sophia::load_state(const std::vector<StateBuffer>& state) {
  check_state_layout(name(), state, slots());
  const std::vector<float>& saved = state.back().data;
  const double bs = static_cast<double>(saved[0]) + static_cast<double>(saved[1]);
  if (!(bs >= 0.0) || std::isinf(bs) || bs != std::floor(bs)) {
    throw std::runtime_error("sophia state buffer \"sophia.batch_tokens\" holds " + std::to_string(bs) +
                             ", expected a whole token count >= 0");
  }
  for (size_t t = 0; t < m_.size(); ++t) {
    m_[t] = state[2 * t].data;
    h_[t] = state[2 * t + 1].data;
  }
  batch_tokens_ = bs;
}

}  // namespace llm
