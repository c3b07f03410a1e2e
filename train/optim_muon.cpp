// Muon on the CPU; the algorithm, its defaults and its precision are in optim_muon.h.
#include "train/optim_muon.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace llm {

float round_to_bf16(float x) {
  if (std::isnan(x)) return x;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t lsb = (bits >> 16) & 1u;
  bits += 0x7fffu + lsb;  // round to nearest, ties to even
  bits &= 0xffff0000u;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

NsPrecision ns_precision_from_name(const std::string& name) {
  if (name == "fp64") return NsPrecision::kFloat64;
  if (name == "fp32") return NsPrecision::kFloat32;
  if (name == "bf16") return NsPrecision::kBf16;
  throw ConfigError("muon_ns_precision must be one of fp64, fp32, bf16; found \"" + name + "\"");
}

namespace {

// C = A B for row-major A (n x k) and B (k x m): sums in double, each result stored through `r`.
template <typename T, typename Round>
void matmul(std::vector<T>& c, const std::vector<T>& a, const std::vector<T>& b, int64_t n, int64_t k,
            int64_t m, Round r) {
  c.assign(static_cast<size_t>(n * m), T(0));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      double sum = 0.0;
      for (int64_t l = 0; l < k; ++l)
        sum += static_cast<double>(a[i * k + l]) * static_cast<double>(b[l * m + j]);
      c[i * m + j] = r(sum);
    }
  }
}

// NS5 with intermediates of type T, each stored through `r` (a double -> T rounding). The order of
// operations follows the PyTorch reference, so that the rounding emulation sees the same values.
template <typename T, typename In, typename Round>
void newton_schulz_impl(float* out, const In* g, int64_t rows, int64_t cols, int steps, Round r) {
  const double a = 3.4445, b = -4.7750, c = 2.0315;
  const bool transposed = rows > cols;
  const int64_t n = transposed ? cols : rows;  // X is n x k with n <= k
  const int64_t k = transposed ? rows : cols;
  std::vector<T> x(static_cast<size_t>(n * k));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < k; ++j) x[i * k + j] = r(transposed ? g[j * cols + i] : g[i * cols + j]);
  }
  double sq = 0.0;
  for (T v : x) sq += static_cast<double>(v) * static_cast<double>(v);
  const T norm = r(std::sqrt(sq));
  const T denom = r(static_cast<double>(norm) + 1e-7);
  for (T& v : x) v = r(static_cast<double>(v) / static_cast<double>(denom));

  std::vector<T> xt(static_cast<size_t>(k * n)), gram, ca, cgram, bx;
  std::vector<T> bmat(static_cast<size_t>(n * n));
  for (int s = 0; s < steps; ++s) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < k; ++j) xt[j * n + i] = x[i * k + j];
    }
    matmul(gram, x, xt, n, k, n, r);  // A = X X^T
    ca.resize(gram.size());
    for (size_t i = 0; i < gram.size(); ++i) ca[i] = r(c * static_cast<double>(gram[i]));
    matmul(cgram, ca, gram, n, n, n, r);  // (c A) A
    for (size_t i = 0; i < gram.size(); ++i) {
      // B = b A + (c A) A
      bmat[i] = r(static_cast<double>(r(b * static_cast<double>(gram[i]))) + static_cast<double>(cgram[i]));
    }
    matmul(bx, bmat, x, n, n, k, r);  // B X
    for (size_t i = 0; i < x.size(); ++i) {
      x[i] =
          r(static_cast<double>(r(a * static_cast<double>(x[i]))) + static_cast<double>(bx[i]));  // a X + B X
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const float v = static_cast<float>(x[i * k + j]);
      if (transposed) {
        out[j * cols + i] = v;
      } else {
        out[i * cols + j] = v;
      }
    }
  }
}

template <typename In>
void newton_schulz_dispatch(float* out, const In* g, int64_t rows, int64_t cols, int steps,
                            NsPrecision precision) {
  switch (precision) {
    case NsPrecision::kFloat64:
      newton_schulz_impl<double>(out, g, rows, cols, steps, [](double v) { return v; });
      break;
    case NsPrecision::kFloat32:
      newton_schulz_impl<float>(out, g, rows, cols, steps, [](double v) { return static_cast<float>(v); });
      break;
    case NsPrecision::kBf16:
      newton_schulz_impl<float>(out, g, rows, cols, steps,
                                [](double v) { return round_to_bf16(static_cast<float>(v)); });
      break;
  }
}

}  // namespace

void newton_schulz5(float* out, const float* g, int64_t rows, int64_t cols, int steps,
                    NsPrecision precision) {
  newton_schulz_dispatch(out, g, rows, cols, steps, precision);
}

void newton_schulz5(float* out, const double* g, int64_t rows, int64_t cols, int steps,
                    NsPrecision precision) {
  newton_schulz_dispatch(out, g, rows, cols, steps, precision);
}

bool muon_updates(const TensorInfo& info) {
  return info.role == TensorRole::kMatrix && info.shape.size() == 2;
}

Muon::Muon(double momentum, bool nesterov, int ns_steps, NsPrecision ns_precision, double adamw_lr_scale,
           double adamw_beta1, double adamw_beta2, double adamw_eps)
    : momentum_(momentum),
      nesterov_(nesterov),
      ns_steps_(ns_steps),
      ns_precision_(ns_precision),
      adamw_lr_scale_(adamw_lr_scale),
      adamw_(adamw_beta1, adamw_beta2, adamw_eps) {}

double Muon::state_bytes_per_param() const {
  size_t muon = 0, adamw = 0;
  for (const auto& b : buffer_) muon += b.size();
  for (size_t s : adamw_sizes_) adamw += s;
  if (muon + adamw == 0) return 8.0;
  return (4.0 * static_cast<double>(muon) + 8.0 * static_cast<double>(adamw)) /
         static_cast<double>(muon + adamw);
}

void Muon::init(const std::vector<ParamView>& params) {
  muon_index_.clear();
  adamw_index_.clear();
  buffer_.clear();
  muon_names_.clear();
  adamw_names_.clear();
  adamw_sizes_.clear();
  std::vector<ParamView> adamw_views;
  for (size_t t = 0; t < params.size(); ++t) {
    const TensorInfo& info = *params[t].info;
    if (muon_updates(info)) {
      muon_index_.push_back(t);
      buffer_.emplace_back(static_cast<size_t>(info.numel), 0.0f);
      muon_names_.push_back(info.name);
    } else {
      adamw_index_.push_back(t);
      adamw_views.push_back(params[t]);
      adamw_names_.push_back(info.name);
      adamw_sizes_.push_back(static_cast<size_t>(info.numel));
    }
  }
  adamw_.init(adamw_views);
}

void Muon::step(const std::vector<ParamView>& params, double lr, int64_t step) {
  if (params.size() != muon_index_.size() + adamw_index_.size()) {
    throw std::logic_error("Muon::step: the tensors differ from those given to init");
  }
  std::vector<double> direction;
  std::vector<float> ortho;
  for (size_t j = 0; j < muon_index_.size(); ++j) {
    const ParamView& p = params[muon_index_[j]];
    const int64_t rows = p.info->shape[0], cols = p.info->shape[1];
    const size_t n = static_cast<size_t>(p.info->numel);
    float* buf = buffer_[j].data();
    direction.resize(n);
    ortho.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const double g = p.grad[i];
      buf[i] = static_cast<float>(momentum_ * buf[i] + (1.0 - momentum_) * g);
      // From the stored (fp32) momentum, in double: NS5 amplifies the smallest perturbations.
      direction[i] = nesterov_ ? (1.0 - momentum_) * g + momentum_ * static_cast<double>(buf[i]) : buf[i];
    }
    newton_schulz5(ortho.data(), direction.data(), rows, cols, ns_steps_, ns_precision_);
    const double tensor_lr = lr * p.lr_scale;
    const double scale = std::sqrt(std::max(1.0, static_cast<double>(rows) / static_cast<double>(cols)));
    for (size_t i = 0; i < n; ++i) {
      double w = p.param[i];
      w -= tensor_lr * p.weight_decay * w;
      w -= tensor_lr * scale * ortho[i];
      p.param[i] = static_cast<float>(w);
    }
  }
  std::vector<ParamView> adamw_views;
  for (size_t t : adamw_index_) adamw_views.push_back(params[t]);
  adamw_.step(adamw_views, lr * adamw_lr_scale_, step);
}

std::vector<StateBuffer> Muon::state() const {
  std::vector<StateBuffer> out;
  for (size_t j = 0; j < buffer_.size(); ++j)
    out.push_back({"muon.momentum." + std::to_string(j), buffer_[j]});
  for (auto& b : adamw_.state()) out.push_back({"muon." + b.name, std::move(b.data)});
  return out;
}

void Muon::load_state(const std::vector<StateBuffer>& state) {
  std::vector<StateSlot> slots;
  for (size_t j = 0; j < buffer_.size(); ++j) {
    slots.push_back({"muon.momentum." + std::to_string(j), buffer_[j].size(), muon_names_[j]});
  }
  for (size_t j = 0; j < adamw_sizes_.size(); ++j) {
    slots.push_back({"muon.adamw.m." + std::to_string(j), adamw_sizes_[j], adamw_names_[j]});
    slots.push_back({"muon.adamw.v." + std::to_string(j), adamw_sizes_[j], adamw_names_[j]});
  }
  check_state_layout(name(), state, slots);
  for (size_t j = 0; j < buffer_.size(); ++j) buffer_[j] = state[j].data;
  std::vector<StateBuffer> adamw_state;
  for (size_t i = buffer_.size(); i < state.size(); ++i) {
    adamw_state.push_back({state[i].name.substr(5), state[i].data});  // drop "muon."
  }
  adamw_.load_state(adamw_state);
}

}  // namespace llm
