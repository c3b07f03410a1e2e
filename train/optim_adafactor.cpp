// Adafactor on the CPU; the algorithm and its defaults are in optim_adafactor.h.
#include "train/optim_adafactor.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace llm {

namespace {

double rms(const float* x, size_t n) {
  double sum = 0.0;
  for (size_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  return std::sqrt(sum / static_cast<double>(n));
}

}  // namespace

double Adafactor::state_bytes_per_param() const {
  if (numel_ == 0) return o_.beta1 > 0.0 ? 8.0 : 4.0;
  size_t floats = 0;
  for (const auto& t : s_) floats += t.row.size() + t.col.size() + t.full.size() + t.first.size();
  return 4.0 * static_cast<double>(floats) / static_cast<double>(numel_);
}

void Adafactor::init(const std::vector<ParamView>& params) {
  s_.clear();
  numel_ = 0;
  for (const auto& p : params) {
    TensorState t;
    t.tensor = p.info->name;
    const size_t n = static_cast<size_t>(p.info->numel);
    const auto& shape = p.info->shape;
    t.factored = shape.size() >= 2;
    if (t.factored) {
      t.rows = shape[shape.size() - 2];
      t.cols = shape[shape.size() - 1];
      t.batch = (t.rows * t.cols) > 0 ? p.info->numel / (t.rows * t.cols) : 0;
      t.row.assign(static_cast<size_t>(t.batch * t.rows), 0.0f);
      t.col.assign(static_cast<size_t>(t.batch * t.cols), 0.0f);
    } else {
      t.full.assign(n, 0.0f);
    }
    if (o_.beta1 > 0.0) t.first.assign(n, 0.0f);
    numel_ += n;
    s_.push_back(std::move(t));
  }
}

void Adafactor::step(const std::vector<ParamView>& params, double lr, int64_t step) {
  if (params.size() != s_.size())
    throw std::logic_error("Adafactor::step: the tensors differ from those given to init");
  const double t_step = static_cast<double>(step);
  const double beta2t = 1.0 - std::pow(t_step, o_.decay_rate);
  std::vector<double> update, row_mean, col_mean;
  for (size_t ti = 0; ti < params.size(); ++ti) {
    const ParamView& p = params[ti];
    TensorState& s = s_[ti];
    const size_t n = static_cast<size_t>(p.info->numel);
    if (n == 0) continue;

    double rel = lr;
    if (o_.relative_step) rel = std::min(o_.warmup_init ? 1e-6 * t_step : 1e-2, 1.0 / std::sqrt(t_step));
    rel *= p.lr_scale;
    const double alpha = o_.scale_parameter ? std::max(o_.eps2, rms(p.param, n)) * rel : rel;

    update.resize(n);
    if (s.factored) {
      const int64_t R = s.rows, C = s.cols;
      for (int64_t b = 0; b < s.batch; ++b) {
        const float* g = p.grad + b * R * C;
        float* vr = s.row.data() + b * R;
        float* vc = s.col.data() + b * C;
        row_mean.assign(static_cast<size_t>(R), 0.0);
        col_mean.assign(static_cast<size_t>(C), 0.0);
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t c = 0; c < C; ++c) {
            const double sq = static_cast<double>(g[r * C + c]) * g[r * C + c] + o_.eps1;
            row_mean[r] += sq;
            col_mean[c] += sq;
          }
        }
        double vr_mean = 0.0;
        for (int64_t r = 0; r < R; ++r) {
          vr[r] = static_cast<float>(beta2t * vr[r] + (1.0 - beta2t) * row_mean[r] / static_cast<double>(C));
          vr_mean += vr[r];
        }
        vr_mean /= static_cast<double>(R);
        for (int64_t c = 0; c < C; ++c) {
          vc[c] = static_cast<float>(beta2t * vc[c] + (1.0 - beta2t) * col_mean[c] / static_cast<double>(R));
        }
        for (int64_t r = 0; r < R; ++r) {
          const double row_factor = 1.0 / std::sqrt(vr[r] / vr_mean);
          for (int64_t c = 0; c < C; ++c) {
            update[b * R * C + r * C + c] = g[r * C + c] * row_factor / std::sqrt(static_cast<double>(vc[c]));
          }
        }
      }
    } else {
      float* v = s.full.data();
      for (size_t i = 0; i < n; ++i) {
        const double g = p.grad[i];
        v[i] = static_cast<float>(beta2t * v[i] + (1.0 - beta2t) * (g * g + o_.eps1));
        update[i] = g / std::sqrt(static_cast<double>(v[i]));
      }
    }

    double sum = 0.0;
    for (double u : update) sum += u * u;
    const double clip = std::max(1.0, std::sqrt(sum / static_cast<double>(n)) / o_.clip_threshold);
    for (double& u : update) u = alpha * (u / clip);
    if (o_.beta1 > 0.0) {
      float* m = s.first.data();
      for (size_t i = 0; i < n; ++i) {
        m[i] = static_cast<float>(o_.beta1 * m[i] + (1.0 - o_.beta1) * update[i]);
        update[i] = m[i];
      }
    }
    for (size_t i = 0; i < n; ++i) {
      double w = p.param[i];
      w -= p.weight_decay * alpha * w;
      w -= update[i];
      p.param[i] = static_cast<float>(w);
    }
  }
}

std::vector<StateSlot> Adafactor::slots() const {
  std::vector<StateSlot> out;
  for (size_t t = 0; t < s_.size(); ++t) {
    const TensorState& s = s_[t];
    const std::string i = std::to_string(t);
    if (s.factored) {
      out.push_back({"adafactor.row." + i, s.row.size(), s.tensor});
      out.push_back({"adafactor.col." + i, s.col.size(), s.tensor});
    } else {
      out.push_back({"adafactor.v." + i, s.full.size(), s.tensor});
    }
    if (o_.beta1 > 0.0) out.push_back({"adafactor.m." + i, s.first.size(), s.tensor});
  }
  return out;
}

std::vector<StateBuffer> Adafactor::state() const {
  std::vector<StateBuffer> out;
  for (size_t t = 0; t < s_.size(); ++t) {
    const TensorState& s = s_[t];
    const std::string i = std::to_string(t);
    if (s.factored) {
      out.push_back({"adafactor.row." + i, s.row});
      out.push_back({"adafactor.col." + i, s.col});
    } else {
      out.push_back({"adafactor.v." + i, s.full});
    }
    if (o_.beta1 > 0.0) out.push_back({"adafactor.m." + i, s.first});
  }
  return out;
}

void Adafactor::load_state(const std::vector<StateBuffer>& state) {
  check_state_layout(name(), state, slots());
  size_t k = 0;
  for (auto& s : s_) {
    if (s.factored) {
      s.row = state[k++].data;
      s.col = state[k++].data;
    } else {
      s.full = state[k++].data;
    }
    if (o_.beta1 > 0.0) s.first = state[k++].data;
  }
}

}  // namespace llm
