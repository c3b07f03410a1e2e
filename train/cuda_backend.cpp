#include "train/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "kernels/cpu/nf4.h"
#include "kernels/cuda_optimizers.h"
#include "kernels/cuda_runtime.h"
#include "llm/json_config.h"
#include "llm/model.h"
#include "train/optim_muon.h"

namespace llm {

namespace cuda_optim {

// The largest 8-bit AdamW block the GPU kernel takes (kMaxBlock in kernels/optim_adamw8bit.cuh: the
// block's fresh m and v wait in shared memory).
constexpr int kMaxBlock8bit = 4096;

std::string megabytes(size_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f MB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return text;
}

// `n` elements of device memory for `what`; a failure names it and says what to change.
template <typename T>
std::unique_ptr<cuda::DeviceArray<T>> device_array(size_t n, const std::string& what) {
  try {
    return std::make_unique<cuda::DeviceArray<T>>(n);
  } catch (const std::exception& e) {
    throw std::runtime_error("could not allocate the " + what + " on the GPU (" + megabytes(n * sizeof(T)) +
                             "): " + e.what() +
                             "; use a smaller model or an optimizer with less state (adamw_8bit, adafactor)");
  }
}

// Per-tensor pieces of one device allocation, each starting on a 256-byte boundary.
template <typename T>
class Pieces {
 public:
  size_t add(size_t count) {
    constexpr size_t kAlign = 256 / sizeof(T);
    offsets_.push_back(total_);
    sizes_.push_back(count);
    total_ += (count + kAlign - 1) / kAlign * kAlign;
    return sizes_.size() - 1;
  }
  // Allocates every piece, each byte set to `fill_byte` (asynchronously: cuda::synchronize() before
  // work on another stream reads it).
  void allocate(const std::string& what, unsigned char fill_byte) {
    array_ = device_array<T>(std::max<size_t>(total_, 1), what);
    array_->fill_bytes(fill_byte);
  }
  T* at(size_t i) { return array_->data() + offsets_.at(i); }
  size_t size(size_t i) const { return sizes_.at(i); }
  size_t count() const { return sizes_.size(); }
  size_t bytes() const { return total_ * sizeof(T); }
  // Piece i to the host; the caller has synchronized the stream that writes it.
  std::vector<T> download(size_t i) const {
    std::vector<T> out(sizes_.at(i));
    array_->download(out.data(), offsets_[i], out.size());
    return out;
  }
  // size(i) values into piece i; cuda::synchronize() before another stream reads them.
  void upload(size_t i, const T* values) { array_->upload(values, offsets_.at(i), sizes_[i]); }

 private:
  std::vector<size_t> offsets_, sizes_;
  size_t total_ = 0;
  std::unique_ptr<cuda::DeviceArray<T>> array_;
};

// fp32 state buffers named and ordered as the CPU optimizer's (one piece per StateBuffer).
class NamedState {
 public:
  size_t add(const std::string& name, size_t size, const std::string& tensor) {
    slots_.push_back({name, size, tensor});
    return pieces_.add(size);
  }
  void allocate(const std::string& what) { pieces_.allocate(what, 0); }  // zeroed
  float* at(size_t i) { return pieces_.at(i); }
  const std::vector<StateSlot>& slots() const { return slots_; }
  size_t bytes() const { return pieces_.bytes(); }
  // Host copies in slot order; the caller has synchronized the model's stream.
  std::vector<StateBuffer> download() const {
    std::vector<StateBuffer> out;
    out.reserve(slots_.size());
    for (size_t i = 0; i < slots_.size(); ++i) out.push_back({slots_[i].name, pieces_.download(i)});
    return out;
  }
  // state[i] into piece i for every slot (the state has been checked against slots()); waits until the
  // copies have landed.
  void upload(const std::vector<StateBuffer>& state) {
    for (size_t i = 0; i < slots_.size(); ++i) pieces_.upload(i, state[i].data.data());
    cuda::synchronize();
  }

 private:
  std::vector<StateSlot> slots_;
  Pieces<float> pieces_;
};

// One trainable tensor as the GPU optimizers see it: the CPU's ParamView with device pointers.
struct GpuTensor {
  const TensorInfo* info = nullptr;
  size_t n = 0;
  float* param = nullptr;       // fp32 master weights
  const float* grad = nullptr;  // fp32 gradients
  double weight_decay = 0.0, lr_scale = 1.0;
};

// The trainable tensors of `model` in layout order with the groups of `views` (the same tensors, from
// make_param_views on the host model).
std::vector<GpuTensor> gpu_tensors(cuda::CudaModel& model, const std::vector<ParamView>& views) {
  std::vector<GpuTensor> out;
  float* master = model.device_master();
  const float* grads = model.device_gradients();
  size_t k = 0;
  for (const TensorInfo& info : model.layout().tensors()) {
    if (!info.trainable) continue;
    if (k >= views.size() || views[k].info->name != info.name) {
      throw std::logic_error("CudaBackend: the optimizer's tensors differ from the model's at " + info.name);
    }
    GpuTensor t;
    t.info = &info;
    t.n = static_cast<size_t>(info.numel);
    t.param = master + model.device_offset(info.name);
    t.grad = grads + info.grad_offset;
    t.weight_decay = views[k].weight_decay;
    t.lr_scale = views[k].lr_scale;
    out.push_back(t);
    ++k;
  }
  if (k != views.size()) throw std::logic_error("CudaBackend: the optimizer has more tensors than the model");
  return out;
}

std::vector<float> pack_codes(const std::vector<uint8_t>& codes) {
  std::vector<float> out((codes.size() + 3) / 4, 0.0f);
  if (!codes.empty()) std::memcpy(out.data(), codes.data(), codes.size());
  return out;
}

}  // namespace cuda_optim

using cuda_optim::GpuTensor;
using cuda_optim::NamedState;
using cuda_optim::Pieces;

// The GPU side of one optimizer: steps over the model's master weights and gradients on the model's
// stream, state in the CPU optimizer's StateBuffer names and layouts.
class CudaOptimizer {
 public:
  CudaOptimizer(cuda::CudaModel& model, std::vector<GpuTensor> tensors)
      : model_(model), tensors_(std::move(tensors)), stream_(model.cuda_stream()) {}
  virtual ~CudaOptimizer() = default;
  CudaOptimizer(const CudaOptimizer&) = delete;
  CudaOptimizer& operator=(const CudaOptimizer&) = delete;

  // One update with the scheduled learning rate; step counts from 1.
  virtual void step(double lr, int64_t step) = 0;
  // Whether step() also writes the working copy (else the backend refreshes it from the master).
  virtual bool writes_working_copy() const { return false; }
  virtual std::vector<StateBuffer> state() = 0;
  virtual void load_state(const std::vector<StateBuffer>& state) = 0;
  // Device bytes beyond what CudaModel::memory_plan() counts: state, and per-step scratch.
  virtual size_t state_bytes() const = 0;
  virtual size_t scratch_bytes() const { return 0; }
  // Sophia: as Optimizer's hooks; the gradients of the sampled-label loss are in the gradient arena.
  virtual bool keeps_hessian_estimate() const { return false; }
  virtual bool wants_hessian_estimate(int64_t /*step*/) const { return false; }
  virtual void update_hessian_estimate(int /*batch_tokens*/) {
    throw std::logic_error("update_hessian_estimate: this optimizer keeps no Hessian estimate");
  }

 protected:
  cuda::CudaModel& model_;
  std::vector<GpuTensor> tensors_;
  void* stream_;
};

namespace cuda_optim {

// AdamW: the model's own fused step, which writes the bf16 working copy as it goes.
class AdamWOnGpu final : public CudaOptimizer {
 public:
  AdamWOnGpu(cuda::CudaModel& model, std::vector<GpuTensor> tensors, const OptimizerConfig& c)
      : CudaOptimizer(model, std::move(tensors)) {
    cuda::CudaAdamW adam;
    adam.beta1 = c.adamw_beta1;
    adam.beta2 = c.adamw_beta2;
    adam.eps = c.adamw_eps;
    for (const GpuTensor& t : tensors_) {
      adam.weight_decay.push_back(t.weight_decay);
      adam.lr_scale.push_back(t.lr_scale);
    }
    model_.adamw_init(adam);
  }
  void step(double lr, int64_t step) override { model_.adamw_step(lr, step); }
  bool writes_working_copy() const override { return true; }
  std::vector<StateBuffer> state() override {
    std::vector<StateBuffer> out;
    for (size_t t = 0; t < tensors_.size(); ++t) {
      out.push_back({"adamw.m." + std::to_string(t), model_.download_adamw_state(0, t)});
      out.push_back({"adamw.v." + std::to_string(t), model_.download_adamw_state(1, t)});
    }
    return out;
  }
  void load_state(const std::vector<StateBuffer>& state) override {
    std::vector<StateSlot> slots;
    for (size_t t = 0; t < tensors_.size(); ++t) {
      slots.push_back({"adamw.m." + std::to_string(t), tensors_[t].n, tensors_[t].info->name});
      slots.push_back({"adamw.v." + std::to_string(t), tensors_[t].n, tensors_[t].info->name});
    }
    check_state_layout("adamw", state, slots);
    for (size_t t = 0; t < tensors_.size(); ++t) {
      model_.upload_adamw_state(0, t, state[2 * t].data);
      model_.upload_adamw_state(1, t, state[2 * t + 1].data);
    }
  }
  size_t state_bytes() const override { return 0; }  // in the model's plan
};

// Lion: m per tensor ("lion.m.<t>").
class LionOnGpu final : public CudaOptimizer {
 public:
  LionOnGpu(cuda::CudaModel& model, std::vector<GpuTensor> tensors, const OptimizerConfig& c)
      : CudaOptimizer(model, std::move(tensors)), beta1_(c.lion_beta1), beta2_(c.lion_beta2) {
    for (size_t t = 0; t < tensors_.size(); ++t)
      m_.add("lion.m." + std::to_string(t), tensors_[t].n, tensors_[t].info->name);
    m_.allocate("Lion momentum");
  }
  void step(double lr, int64_t /*step*/) override {
    for (size_t t = 0; t < tensors_.size(); ++t) {
      const GpuTensor& p = tensors_[t];
      cuda::lion_step(p.param, m_.at(t), p.grad, p.n, lr * p.lr_scale, beta1_, beta2_, p.weight_decay,
                      stream_);
    }
  }
  std::vector<StateBuffer> state() override {
    model_.synchronize();
    return m_.download();
  }
  void load_state(const std::vector<StateBuffer>& state) override {
    check_state_layout("lion", state, m_.slots());
    model_.synchronize();
    m_.upload(state);
  }
  size_t state_bytes() const override { return m_.bytes(); }

 private:
  double beta1_, beta2_;
  NamedState m_;
};

// SophiaG: m and h per tensor, interleaved ("sophia.m.<t>", "sophia.h.<t>"), then the batch tokens of the
// latest Hessian estimate as a float pair ("sophia.batch_tokens": high part, remainder).
class SophiaOnGpu final : public CudaOptimizer {
 public:
  SophiaOnGpu(cuda::CudaModel& model, std::vector<GpuTensor> tensors, const OptimizerConfig& c)
      : CudaOptimizer(model, std::move(tensors)),
        beta1_(c.sophia_beta1),
        beta2_(c.sophia_beta2),
        rho_(c.sophia_rho),
        k_(c.sophia_k) {
    for (size_t t = 0; t < tensors_.size(); ++t) {
      s_.add("sophia.m." + std::to_string(t), tensors_[t].n, tensors_[t].info->name);
      s_.add("sophia.h." + std::to_string(t), tensors_[t].n, tensors_[t].info->name);
    }
    s_.allocate("Sophia state (m and h)");
  }
  void step(double lr, int64_t /*step*/) override {
    for (size_t t = 0; t < tensors_.size(); ++t) {
      const GpuTensor& p = tensors_[t];
      cuda::sophia_step(p.param, s_.at(2 * t), s_.at(2 * t + 1), p.grad, p.n, lr * p.lr_scale, beta1_, rho_,
                        batch_tokens_, p.weight_decay, stream_);
    }
  }
  bool keeps_hessian_estimate() const override { return true; }
  bool wants_hessian_estimate(int64_t step) const override { return step > 0 && step % k_ == 0; }
  void update_hessian_estimate(int batch_tokens) override {
    if (batch_tokens < 1) {
      throw std::invalid_argument("Sophia::update_hessian_estimate: batch_tokens must be positive, found " +
                                  std::to_string(batch_tokens));
    }
    batch_tokens_ = batch_tokens;
    for (size_t t = 0; t < tensors_.size(); ++t) {
      const GpuTensor& p = tensors_[t];
      cuda::sophia_hessian_step(s_.at(2 * t + 1), p.grad, p.n, beta2_, stream_);
    }
  }
  std::vector<StateBuffer> state() override {
    model_.synchronize();
    std::vector<StateBuffer> out = s_.download();
    const float high = static_cast<float>(batch_tokens_);
    out.push_back({"sophia.batch_tokens", {high, static_cast<float>(batch_tokens_ - high)}});
    return out;
  }
  void load_state(const std::vector<StateBuffer>& state) override {
    std::vector<StateSlot> slots = s_.slots();
    slots.push_back({"sophia.batch_tokens", 2, ""});
    check_state_layout("sophia", state, slots);
    const std::vector<float>& saved = state.back().data;
    const double bs = static_cast<double>(saved[0]) + static_cast<double>(saved[1]);
    if (!(bs >= 0.0) || std::isinf(bs) || bs != std::floor(bs)) {
      throw std::runtime_error("sophia state buffer \"sophia.batch_tokens\" holds " + std::to_string(bs) +
                               ", expected a whole token count >= 0");
    }
    model_.synchronize();
    s_.upload(state);
    batch_tokens_ = bs;
  }
  size_t state_bytes() const override { return s_.bytes(); }

 private:
  double beta1_, beta2_, rho_;
  int k_;
  double batch_tokens_ = 0.0;
  NamedState s_;
};

// Adafactor: per tensor "adafactor.row.<t>" and "adafactor.col.<t>" (two or more dimensions: the last
// two form the matrix, leading ones batch it) or "adafactor.v.<t>" (a vector), then "adafactor.m.<t>"
// when beta1 > 0.
class AdafactorOnGpu final : public CudaOptimizer {
 public:
  AdafactorOnGpu(cuda::CudaModel& model, std::vector<GpuTensor> tensors, const OptimizerConfig& c)
      : CudaOptimizer(model, std::move(tensors)) {
    hyper_.eps1 = c.adafactor_eps1;
    hyper_.eps2 = c.adafactor_eps2;
    hyper_.clip_threshold = c.adafactor_clip_threshold;
    hyper_.decay_rate = c.adafactor_decay_rate;
    hyper_.beta1 = c.adafactor_beta1;
    hyper_.scale_parameter = c.adafactor_scale_parameter;
    hyper_.relative_step = c.adafactor_relative_step;
    hyper_.warmup_init = c.adafactor_warmup_init;
    size_t scratch = 1;
    for (size_t t = 0; t < tensors_.size(); ++t) {
      const TensorInfo& info = *tensors_[t].info;
      const std::string i = std::to_string(t);
      Layout l;
      if (info.shape.size() >= 2) {
        l.factored = true;
        l.rows = info.shape[info.shape.size() - 2];
        l.cols = info.shape[info.shape.size() - 1];
        l.matrices = l.rows * l.cols > 0 ? info.numel / (l.rows * l.cols) : 0;
        l.row = s_.add("adafactor.row." + i, static_cast<size_t>(l.matrices * l.rows), info.name);
        l.col = s_.add("adafactor.col." + i, static_cast<size_t>(l.matrices * l.cols), info.name);
      } else {
        l.full = s_.add("adafactor.v." + i, tensors_[t].n, info.name);
      }
      if (hyper_.beta1 > 0.0) l.first = s_.add("adafactor.m." + i, tensors_[t].n, info.name);
      scratch = std::max(scratch, l.factored ? cuda::adafactor_scratch_doubles(l.matrices, l.rows, l.cols)
                                             : cuda::adafactor_scratch_doubles(1, 0, 0));
      layouts_.push_back(l);
    }
    s_.allocate("Adafactor state");
    scratch_ = cuda_optim::device_array<double>(scratch, "Adafactor scratch");
  }
  void step(double lr, int64_t step) override {
    for (size_t t = 0; t < tensors_.size(); ++t) {
      const GpuTensor& p = tensors_[t];
      if (p.n == 0) continue;
      const Layout& l = layouts_[t];
      cuda::adafactor_step(p.param, piece(l.row), piece(l.col), piece(l.full), piece(l.first), p.grad,
                           scratch_->data(), scratch_->size(), p.n, l.matrices, l.rows, l.cols, lr,
                           p.lr_scale, p.weight_decay, step, hyper_, stream_);
    }
  }
  std::vector<StateBuffer> state() override {
    model_.synchronize();
    return s_.download();
  }
  void load_state(const std::vector<StateBuffer>& state) override {
    check_state_layout("adafactor", state, s_.slots());
    model_.synchronize();
    s_.upload(state);
  }
  size_t state_bytes() const override { return s_.bytes(); }
  size_t scratch_bytes() const override { return scratch_->size() * sizeof(double); }

 private:
  static constexpr size_t kNone = static_cast<size_t>(-1);
  struct Layout {
    bool factored = false;
    int64_t matrices = 1, rows = 0, cols = 0;  // a vector: 1, 0, 0
    size_t row = kNone, col = kNone, full = kNone, first = kNone;
  };
  float* piece(size_t i) { return i == kNone ? nullptr : s_.at(i); }

  cuda::AdafactorHyper hyper_;
  std::vector<Layout> layouts_;
  NamedState s_;
  std::unique_ptr<cuda::DeviceArray<double>> scratch_;
};

// 8-bit AdamW: per tensor "adamw_8bit.m_codes.<t>" (bytes packed four to a float), "m_absmax.<t>",
// "v_codes.<t>", "v_absmax.<t>"; fresh codes are 127 (m) and 0 (v), fresh absmax 0.
class AdamW8bitOnGpu final : public CudaOptimizer {
 public:
  AdamW8bitOnGpu(cuda::CudaModel& model, std::vector<GpuTensor> tensors, const OptimizerConfig& c)
      : CudaOptimizer(model, std::move(tensors)),
        beta1_(c.adamw_beta1),
        beta2_(c.adamw_beta2),
        eps_(c.adamw_eps),
        block_(c.adamw_8bit_block_size) {
    // As AdamW8bit::init; a block of 0 would divide by zero below.
    if (block_ < 1) throw std::invalid_argument("adamw_8bit block size must be positive");
    for (const GpuTensor& t : tensors_) {
      const size_t blocks = (t.n + static_cast<size_t>(block_) - 1) / static_cast<size_t>(block_);
      m_codes_.add(t.n);
      v_codes_.add(t.n);
      m_absmax_.add(blocks);
      v_absmax_.add(blocks);
    }
    m_codes_.allocate("8-bit AdamW first-moment codes", 127);
    v_codes_.allocate("8-bit AdamW second-moment codes", 0);
    m_absmax_.allocate("8-bit AdamW first-moment absmax", 0);
    v_absmax_.allocate("8-bit AdamW second-moment absmax", 0);
  }
  void step(double lr, int64_t step) override {
    for (size_t t = 0; t < tensors_.size(); ++t) {
      const GpuTensor& p = tensors_[t];
      cuda::adamw8bit_step(p.param, m_codes_.at(t), m_absmax_.at(t), v_codes_.at(t), v_absmax_.at(t), p.grad,
                           p.n, block_, lr * p.lr_scale, beta1_, beta2_, eps_, p.weight_decay, step, stream_);
    }
  }
  std::vector<StateBuffer> state() override {
    model_.synchronize();
    std::vector<StateBuffer> out;
    for (size_t t = 0; t < tensors_.size(); ++t) {
      const std::string i = std::to_string(t);
      out.push_back({"adamw_8bit.m_codes." + i, cuda_optim::pack_codes(m_codes_.download(t))});
      out.push_back({"adamw_8bit.m_absmax." + i, m_absmax_.download(t)});
      out.push_back({"adamw_8bit.v_codes." + i, cuda_optim::pack_codes(v_codes_.download(t))});
      out.push_back({"adamw_8bit.v_absmax." + i, v_absmax_.download(t)});
    }
    return out;
  }
  void load_state(const std::vector<StateBuffer>& state) override {
    std::vector<StateSlot> slots;
    for (size_t t = 0; t < tensors_.size(); ++t) {
      const std::string i = std::to_string(t), &tensor = tensors_[t].info->name;
      const size_t packed = (tensors_[t].n + 3) / 4;
      slots.push_back({"adamw_8bit.m_codes." + i, packed, tensor});
      slots.push_back({"adamw_8bit.m_absmax." + i, m_absmax_.size(t), tensor});
      slots.push_back({"adamw_8bit.v_codes." + i, packed, tensor});
      slots.push_back({"adamw_8bit.v_absmax." + i, v_absmax_.size(t), tensor});
    }
    check_state_layout("adamw_8bit", state, slots);
    for (size_t t = 0; t < tensors_.size(); ++t) {
      for (size_t k : {4 * t + 1, 4 * t + 3}) {
        for (float a : state[k].data) {
          if (!(a >= 0.0f) || std::isinf(a)) {
            throw std::runtime_error("adamw_8bit state buffer \"" + state[k].name + "\" holds an absmax of " +
                                     std::to_string(a) + ", expected a finite value >= 0");
          }
        }
      }
    }
    model_.synchronize();
    for (size_t t = 0; t < tensors_.size(); ++t) {
      // The codes are the first n bytes of the packed floats.
      m_codes_.upload(t, reinterpret_cast<const uint8_t*>(state[4 * t].data.data()));
      m_absmax_.upload(t, state[4 * t + 1].data.data());
      v_codes_.upload(t, reinterpret_cast<const uint8_t*>(state[4 * t + 2].data.data()));
      v_absmax_.upload(t, state[4 * t + 3].data.data());
    }
    cuda::synchronize();
  }
  size_t state_bytes() const override {
    return m_codes_.bytes() + v_codes_.bytes() + m_absmax_.bytes() + v_absmax_.bytes();
  }

 private:
  double beta1_, beta2_, eps_;
  int block_;
  Pieces<uint8_t> m_codes_, v_codes_;
  Pieces<float> m_absmax_, v_absmax_;
};

// Muon on the 2-D hidden matrices ("muon.momentum.<j>", j counting those), AdamW at
// muon_adamw_lr_scale x lr on the rest ("muon.adamw.m.<j>", "muon.adamw.v.<j>", j counting those),
// as train/optim_muon.cpp groups and names them.
class MuonOnGpu final : public CudaOptimizer {
 public:
  MuonOnGpu(cuda::CudaModel& model, std::vector<GpuTensor> tensors, const OptimizerConfig& c,
            cuda::MuonPrecision precision)
      : CudaOptimizer(model, std::move(tensors)),
        momentum_(c.muon_momentum),
        nesterov_(c.muon_nesterov),
        ns_steps_(c.muon_ns_steps),
        adamw_lr_scale_(c.muon_adamw_lr_scale),
        beta1_(c.adamw_beta1),
        beta2_(c.adamw_beta2),
        eps_(c.adamw_eps),
        precision_(precision) {
    for (size_t t = 0; t < tensors_.size(); ++t)
      (muon_updates(*tensors_[t].info) ? muon_ : adamw_).push_back(t);
    size_t workspace = 1;
    for (size_t j = 0; j < muon_.size(); ++j) {
      const GpuTensor& p = tensors_[muon_[j]];
      s_.add("muon.momentum." + std::to_string(j), p.n, p.info->name);
      workspace =
          std::max(workspace, cuda::muon_workspace_bytes(p.info->shape[0], p.info->shape[1], precision_));
    }
    for (size_t j = 0; j < adamw_.size(); ++j) {
      const GpuTensor& p = tensors_[adamw_[j]];
      s_.add("muon.adamw.m." + std::to_string(j), p.n, p.info->name);
      s_.add("muon.adamw.v." + std::to_string(j), p.n, p.info->name);
    }
    s_.allocate("Muon state (momentum, and AdamW's m and v)");
    workspace_ = cuda_optim::device_array<uint8_t>(workspace, "Muon Newton-Schulz workspace");
  }
  void step(double lr, int64_t step) override {
    for (size_t j = 0; j < muon_.size(); ++j) {
      const GpuTensor& p = tensors_[muon_[j]];
      cuda::muon_step(p.param, s_.at(j), p.grad, workspace_->data(), workspace_->size(), p.info->shape[0],
                      p.info->shape[1], lr * p.lr_scale, p.weight_decay, momentum_, nesterov_, ns_steps_,
                      precision_, stream_);
    }
    const size_t base = muon_.size();
    for (size_t j = 0; j < adamw_.size(); ++j) {
      const GpuTensor& p = tensors_[adamw_[j]];
      cuda::adamw_step(p.param, s_.at(base + 2 * j), s_.at(base + 2 * j + 1), p.grad, p.n,
                       lr * adamw_lr_scale_ * p.lr_scale, beta1_, beta2_, eps_, p.weight_decay, step,
                       stream_);
    }
  }
  std::vector<StateBuffer> state() override {
    model_.synchronize();
    return s_.download();
  }
  void load_state(const std::vector<StateBuffer>& state) override {
    check_state_layout("muon", state, s_.slots());
    model_.synchronize();
    s_.upload(state);
  }
  size_t state_bytes() const override { return s_.bytes(); }
  size_t scratch_bytes() const override { return workspace_->size(); }

 private:
  double momentum_;
  bool nesterov_;
  int ns_steps_;
  double adamw_lr_scale_, beta1_, beta2_, eps_;
  cuda::MuonPrecision precision_;
  std::vector<size_t> muon_, adamw_;  // indices into tensors_
  NamedState s_;
  std::unique_ptr<cuda::DeviceArray<uint8_t>> workspace_;
};

std::unique_ptr<CudaOptimizer> make_cuda_optimizer(const OptimizerConfig& c, cuda::CudaModel& model,
                                                   std::vector<GpuTensor> tensors,
                                                   cuda::Precision precision) {
  if (c.name == "adamw") return std::make_unique<AdamWOnGpu>(model, std::move(tensors), c);
  if (c.name == "lion") return std::make_unique<LionOnGpu>(model, std::move(tensors), c);
  if (c.name == "sophia") return std::make_unique<SophiaOnGpu>(model, std::move(tensors), c);
  if (c.name == "adafactor") return std::make_unique<AdafactorOnGpu>(model, std::move(tensors), c);
  if (c.name == "adamw_8bit") return std::make_unique<AdamW8bitOnGpu>(model, std::move(tensors), c);
  if (c.name == "muon") {
    // Newton-Schulz in the training precision: bf16 as in the reference Muon, fp32 in the test mode.
    const cuda::MuonPrecision ns =
        precision == cuda::Precision::kFp32 ? cuda::MuonPrecision::kFloat32 : cuda::MuonPrecision::kBf16;
    return std::make_unique<MuonOnGpu>(model, std::move(tensors), c, ns);
  }
  throw std::logic_error("make_cuda_optimizer: no GPU implementation of \"" + c.name + "\"");
}

}  // namespace cuda_optim

namespace {

// Checks the device and the optimizer before any GPU memory is touched; returns the config unchanged.
const ModelConfig& checked(const ModelConfig& config, const OptimizerConfig& optimizer) {
  require_cuda_device();
  make_optimizer(optimizer);  // an unknown name: a ConfigError listing the known ones
  const std::string why = cuda_optimizer_unsupported(optimizer);
  if (!why.empty()) throw ConfigError(why);
  return config;
}

cuda::CudaModelOptions model_options(const BackendOptions& options, cuda::Precision precision) {
  cuda::CudaModelOptions o;
  o.max_batch = options.max_batch;
  o.max_seq = options.max_seq;
  o.recompute = options.recompute;
  o.precision = precision;
  o.lora = options.lora;
  o.quant = options.quant;
  o.neftune_alpha = options.neftune_alpha;
  // A base that follows (run_sft streams it tensor by tensor) is quantised as it arrives: the host never
  // holds its fp32 NF4 weights all at once.
  if (options.quant.nf4 && !options.init_base) o.quantize_on_upload = nf4_quantize_weights;
  return o;
}

}  // namespace

std::string cuda_optimizer_unsupported(const OptimizerConfig& optimizer) {
  if (optimizer.name == "adamw_8bit" && optimizer.adamw_8bit_block_size > cuda_optim::kMaxBlock8bit) {
    return "adamw_8bit_block_size " + std::to_string(optimizer.adamw_8bit_block_size) + " is above " +
           std::to_string(cuda_optim::kMaxBlock8bit) +
           ", the largest block the GPU kernel takes: use a block size up to " +
           std::to_string(cuda_optim::kMaxBlock8bit) + " on device \"cuda\", or \"device\": \"cpu\"";
  }
  return "";
}

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
    : model_(checked(config, optimizer), model_options(options, precision)),
      seed_(options.seed),
      optimizer_name_(optimizer.name) {
  // The same initial weights as the CPU backend (adapters included).
  if (options.init_base) {
    // Initialised on the host by llm::Model (its activation buffers planned for a single token).
    Model<float> host(config, ModelOptions{1, 1, false, options.lora, options.quant});
    host.init_weights(options.seed);
    model_.upload_parameters(host.parameters());
  } else if (options.lora.enabled) {
    // A base model's weights come next (write_base_parameters): no host copy of the whole arena, only
    // the fresh adapters. The base stays zero until then (the model zeroes its buffers).
    model_.upload_trainable_parameters(initial_lora_adapters(config, options.lora, model_.layout()));
  }
  // The CPU backend's groups (weight decay by role and name, lr_scale), from the same layout.
  const std::vector<ParamView> views = make_param_views(
      model_.layout(), nullptr, nullptr, options.weight_decay, options.no_decay_names, options.decay_names);
  optimizer_ =
      cuda_optim::make_cuda_optimizer(optimizer, model_, cuda_optim::gpu_tensors(model_, views), precision);
  cuda::synchronize();  // the fresh state's fills land before the model's stream uses them
}

CudaBackend::~CudaBackend() {
  // The optimizer's buffers are freed first: let the model's stream finish with them. A destructor
  // must not throw.
  try {
    model_.synchronize();
  } catch (...) {
  }
}

void CudaBackend::quantize_base_nf4() {
  model_.quantize_base_nf4(nf4_quantize_weights);
}

MemoryPlan CudaBackend::memory_plan() const {
  MemoryPlan plan = model_.memory_plan();
  plan.optimizer_state += optimizer_->state_bytes();
  plan.scratch += optimizer_->scratch_bytes();
  return plan;
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

void CudaBackend::optimizer_step(double lr, int64_t step) {
  optimizer_->step(lr, step);
  if (!optimizer_->writes_working_copy()) model_.refresh_working_copy();
}

bool CudaBackend::wants_hessian_estimate(int64_t step) const {
  return optimizer_->wants_hessian_estimate(step);
}

// As CpuBackend::update_hessian_estimate: labels drawn from the model's softmax (dropout off) with the
// same Philox key and counters, positions the batch ignores kept ignored, the mean cross-entropy of
// those labels backpropagated, the squared gradients folded into h, and the gradients zeroed.
void CudaBackend::update_hessian_estimate(const TokenBatch& b, int batch_tokens, uint64_t sample_counter) {
  if (!optimizer_->keeps_hessian_estimate()) {
    throw std::logic_error("update_hessian_estimate: optimizer \"" + optimizer_name_ +
                           "\" keeps no Hessian estimate");
  }
  const size_t N = static_cast<size_t>(b.B) * static_cast<size_t>(b.T);
  std::vector<int32_t> sampled = model_.sample_labels(b.inputs, b.B, b.T, b.positions, b.doc_ids,
                                                      seed_ ^ 0x50f1a5eedull, sample_counter * N);
  if (b.targets) {
    for (size_t n = 0; n < N; ++n)
      if (b.targets[n] == -100) sampled[n] = -100;
  }
  model_.zero_grad();
  model_.set_training(false);
  model_.forward_backward(b.inputs, sampled.data(), b.B, b.T, b.positions, b.doc_ids, 1.0);
  optimizer_->update_hessian_estimate(batch_tokens);
  model_.zero_grad();
}

std::vector<StateBuffer> CudaBackend::optimizer_state() {
  return optimizer_->state();
}

void CudaBackend::load_optimizer_state(const std::vector<StateBuffer>& state) {
  optimizer_->load_state(state);
}

std::unique_ptr<TrainBackend> make_backend(const std::string& device, const ModelConfig& config,
                                           const OptimizerConfig& optimizer, const BackendOptions& options,
                                           cuda::Precision precision) {
  const std::string resolved = resolve_device(device);
  // "auto" stays on the CPU only for a setting the GPU lacks; "cuda" says why instead.
  if (resolved == "cuda" && (device == "cuda" || cuda_optimizer_unsupported(optimizer).empty()))
    return std::make_unique<CudaBackend>(config, optimizer, options, precision);
  return std::make_unique<CpuBackend>(config, optimizer, options);
}

}  // namespace llm
