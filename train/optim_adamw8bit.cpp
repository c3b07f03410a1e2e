// 8-bit AdamW on the CPU; the algorithm, the codes and the defaults are in optim_adamw8bit.h.
#include "train/optim_adamw8bit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace llm {

namespace q8 {

namespace {

struct Code {
  std::array<float, 256> value{};
  std::array<float, 256> midpoint{};  // midpoint[i] lies between value[i] and value[i + 1]
  int count = 0;                      // codes in use (ascending)
};

Code make_code(bool is_signed) {
  Code c;
  std::vector<double> v;
  if (is_signed) {
    for (int j = 0; j <= 126; ++j) v.push_back(-std::exp2(-j / 8.0));
    v.push_back(0.0);
    for (int j = 126; j >= 0; --j) v.push_back(std::exp2(-j / 8.0));
  } else {
    v.push_back(0.0);
    for (int j = 254; j >= 0; --j) v.push_back(std::exp2(-j / 8.0));
  }
  c.count = static_cast<int>(v.size());
  for (int i = 0; i < 256; ++i) c.value[i] = static_cast<float>(i < c.count ? v[i] : v.back());
  for (int i = 0; i + 1 < c.count; ++i) {
    c.midpoint[i] = static_cast<float>(0.5 * (static_cast<double>(c.value[i]) + c.value[i + 1]));
  }
  return c;
}

const Code& code(bool is_signed) {
  static const Code s = make_code(true);
  static const Code u = make_code(false);
  return is_signed ? s : u;
}

uint8_t nearest(const Code& c, float x) {
  // The first midpoint >= x marks the nearest code; ties (x equal to a midpoint) go to the lower code.
  const float* begin = c.midpoint.data();
  const float* end = begin + (c.count - 1);
  return static_cast<uint8_t>(std::lower_bound(begin, end, x) - begin);
}

}  // namespace

const std::array<float, 256>& signed_code() {
  return code(true).value;
}
const std::array<float, 256>& unsigned_code() {
  return code(false).value;
}
uint8_t quantize_signed(float x) {
  return nearest(code(true), x);
}
uint8_t quantize_unsigned(float x) {
  return nearest(code(false), x);
}

float quantize_block(uint8_t* codes, const float* x, size_t n, bool is_signed) {
  float absmax = 0.0f;
  for (size_t i = 0; i < n; ++i) absmax = std::max(absmax, std::fabs(x[i]));
  const Code& c = code(is_signed);
  const uint8_t zero = is_signed ? 127 : 0;
  for (size_t i = 0; i < n; ++i) codes[i] = absmax > 0.0f ? nearest(c, x[i] / absmax) : zero;
  return absmax;
}

void dequantize_block(float* x, const uint8_t* codes, size_t n, float absmax, bool is_signed) {
  const auto& value = code(is_signed).value;
  for (size_t i = 0; i < n; ++i) x[i] = value[codes[i]] * absmax;
}

}  // namespace q8

namespace {

size_t block_count(size_t n, int block) {
  return (n + static_cast<size_t>(block) - 1) / static_cast<size_t>(block);
}

std::vector<float> pack_codes(const std::vector<uint8_t>& codes) {
  std::vector<float> out((codes.size() + 3) / 4, 0.0f);
  if (!codes.empty()) std::memcpy(out.data(), codes.data(), codes.size());
  return out;
}

}  // namespace

void AdamW8bit::init(const std::vector<ParamView>& params) {
  if (block_ < 1) throw std::invalid_argument("adamw_8bit block size must be positive");
  s_.clear();
  for (const auto& p : params) {
    TensorState t;
    t.tensor = p.info->name;
    const size_t n = static_cast<size_t>(p.info->numel);
    t.m_codes.assign(n, 127);  // the signed code's zero
    t.v_codes.assign(n, 0);
    t.m_absmax.assign(block_count(n, block_), 0.0f);
    t.v_absmax.assign(block_count(n, block_), 0.0f);
    s_.push_back(std::move(t));
  }
}

void AdamW8bit::step(const std::vector<ParamView>& params, double lr, int64_t step) {
  if (params.size() != s_.size())
    throw std::logic_error("AdamW8bit::step: the tensors differ from those given to init");
  const double bias1 = 1.0 - std::pow(beta1_, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(beta2_, static_cast<double>(step));
  const size_t block = static_cast<size_t>(block_);
  std::vector<float> m(block), v(block);
  for (size_t t = 0; t < params.size(); ++t) {
    const ParamView& p = params[t];
    TensorState& s = s_[t];
    const double tensor_lr = lr * p.lr_scale;
    const size_t n = static_cast<size_t>(p.info->numel);
    for (size_t b = 0, start = 0; start < n; ++b, start += block) {
      const size_t len = std::min(block, n - start);
      q8::dequantize_block(m.data(), s.m_codes.data() + start, len, s.m_absmax[b], true);
      q8::dequantize_block(v.data(), s.v_codes.data() + start, len, s.v_absmax[b], false);
      for (size_t i = 0; i < len; ++i) {
        const double g = p.grad[start + i];
        const double mi = beta1_ * m[i] + (1.0 - beta1_) * g;
        const double vi = beta2_ * v[i] + (1.0 - beta2_) * g * g;
        m[i] = static_cast<float>(mi);
        v[i] = static_cast<float>(vi);
        double w = p.param[start + i];
        w -= tensor_lr * p.weight_decay * w;
        if (vi > 0.0) w -= tensor_lr * (mi / bias1) / (std::sqrt(vi / bias2) + eps_);
        p.param[start + i] = static_cast<float>(w);
      }
      s.m_absmax[b] = q8::quantize_block(s.m_codes.data() + start, m.data(), len, true);
      s.v_absmax[b] = q8::quantize_block(s.v_codes.data() + start, v.data(), len, false);
    }
  }
}

std::vector<float> AdamW8bit::first_moment(size_t t) const {
  const TensorState& s = s_.at(t);
  std::vector<float> out(s.m_codes.size());
  for (size_t b = 0, start = 0; start < out.size(); ++b, start += static_cast<size_t>(block_)) {
    const size_t len = std::min(static_cast<size_t>(block_), out.size() - start);
    q8::dequantize_block(out.data() + start, s.m_codes.data() + start, len, s.m_absmax[b], true);
  }
  return out;
}

std::vector<float> AdamW8bit::second_moment(size_t t) const {
  const TensorState& s = s_.at(t);
  std::vector<float> out(s.v_codes.size());
  for (size_t b = 0, start = 0; start < out.size(); ++b, start += static_cast<size_t>(block_)) {
    const size_t len = std::min(static_cast<size_t>(block_), out.size() - start);
    q8::dequantize_block(out.data() + start, s.v_codes.data() + start, len, s.v_absmax[b], false);
  }
  return out;
}

std::vector<StateSlot> AdamW8bit::slots() const {
  std::vector<StateSlot> out;
  for (size_t t = 0; t < s_.size(); ++t) {
    const TensorState& s = s_[t];
    const std::string i = std::to_string(t);
    const size_t packed = (s.m_codes.size() + 3) / 4;
    out.push_back({"adamw_8bit.m_codes." + i, packed, s.tensor});
    out.push_back({"adamw_8bit.m_absmax." + i, s.m_absmax.size(), s.tensor});
    out.push_back({"adamw_8bit.v_codes." + i, packed, s.tensor});
    out.push_back({"adamw_8bit.v_absmax." + i, s.v_absmax.size(), s.tensor});
  }
  return out;
}

std::vector<StateBuffer> AdamW8bit::state() const {
  std::vector<StateBuffer> out;
  for (size_t t = 0; t < s_.size(); ++t) {
    const TensorState& s = s_[t];
    const std::string i = std::to_string(t);
    out.push_back({"adamw_8bit.m_codes." + i, pack_codes(s.m_codes)});
    out.push_back({"adamw_8bit.m_absmax." + i, s.m_absmax});
    out.push_back({"adamw_8bit.v_codes." + i, pack_codes(s.v_codes)});
    out.push_back({"adamw_8bit.v_absmax." + i, s.v_absmax});
  }
  return out;
}

void AdamW8bit::load_state(const std::vector<StateBuffer>& state) {
  check_state_layout(name(), state, slots());
  for (size_t t = 0; t < s_.size(); ++t) {
    for (size_t k : {4 * t + 1, 4 * t + 3}) {
      for (float a : state[k].data) {
        if (!(a >= 0.0f) || std::isinf(a)) {
          throw std::runtime_error("adamw_8bit state buffer \"" + state[k].name + "\" holds an absmax of " +
                                   std::to_string(a) + ", expected a finite value >= 0");
        }
      }
    }
  }
  for (size_t t = 0; t < s_.size(); ++t) {
    TensorState& s = s_[t];
    if (!s.m_codes.empty()) {
      std::memcpy(s.m_codes.data(), state[4 * t].data.data(), s.m_codes.size());
      std::memcpy(s.v_codes.data(), state[4 * t + 2].data.data(), s.v_codes.size());
    }
    s.m_absmax = state[4 * t + 1].data;
    s.v_absmax = state[4 * t + 3].data;
  }
}

}  // namespace llm
