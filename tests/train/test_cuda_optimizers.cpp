// The GPU optimizer steps (kernels/cuda_optimizers.h) against the CPU optimizer classes of train/ on the
// same tensors and gradients for 5 steps, in fp32: parameters and state must agree to a relative error
// (||gpu - cpu|| / ||cpu|| per tensor) below 1e-5. The tensors mix roles and shapes: wide and tall
// matrices with odd sizes (Muon transposes the tall one), an embedding, a norm, a bias, a length not a
// multiple of the 8-bit block size, and 3-D tensors and tall ones (several row chunks of the column
// statistics) for Adafactor's factoring.
//
// Muon: the parameters meet 1e-5 (the orthogonalised step is lr-scaled), but NS5 in fp32 on the GPU
// (cuBLASLt sums in fp32) and on the CPU (sums in fp64) are two correct programs whose outputs differ by
// about 1e-6 of the largest entry and more along small singular directions, because each NS step
// multiplies rounding errors by up to a = 3.4445 (train/optim_muon.h). So the orthogonaliser alone is
// held to 1e-4 in fp32, and to 5e-2 in bf16 against the CPU's bf16 twin (rounding flips in bf16 are
// 4e-3 each and NS amplifies them).
//
// Without a GPU every test skips with the reason printed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_optimizers.h"
#include "kernels/cuda_runtime.h"
#include "llm/params.h"
#include "tests/train/backend_test_helpers.h"
#include "train/optim_adafactor.h"
#include "train/optim_adamw8bit.h"
#include "train/optim_lion.h"
#include "train/optim_muon.h"
#include "train/optim_sophia.h"
#include "train/optimizer.h"

namespace {

using llm::ParamView;
using llm::TensorInfo;
using llm::TensorRole;
using llm::cuda::DeviceArray;

constexpr double kTol = 1e-5;
constexpr int kSteps = 5;

double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return INFINITY;
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    diff += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    norm += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
}

// Host tensors (parameters and gradients), a device copy of the parameters, and the CPU views.
struct Problem {
  std::vector<TensorInfo> infos;
  std::vector<std::vector<float>> params, grads;
  std::vector<std::unique_ptr<DeviceArray<float>>> d_params, d_grads;
  std::mt19937 rng{1234};

  explicit Problem(bool with_3d = false) {
    add("attn.w", {24, 40}, TensorRole::kMatrix);
    add("mlp.down", {40, 24}, TensorRole::kMatrix);
    add("embed", {37, 16}, TensorRole::kEmbedding);
    add("norm", {40}, TensorRole::kNorm);
    add("bias", {300}, TensorRole::kBias);
    if (with_3d) {
      add("experts", {3, 8, 12}, TensorRole::kMatrix);
      // Adafactor's column statistics in several row chunks of 64 (the last one partial).
      add("tall", {300, 7}, TensorRole::kEmbedding);
      add("tall_experts", {2, 130, 5}, TensorRole::kMatrix);
    }
    std::normal_distribution<float> normal(0.0f, 0.5f);
    for (size_t t = 0; t < infos.size(); ++t) {
      for (float& x : params[t]) x = normal(rng);
      d_params.push_back(std::make_unique<DeviceArray<float>>(params[t]));
      d_grads.push_back(std::make_unique<DeviceArray<float>>(params[t].size()));
    }
  }
  void add(const std::string& name, std::vector<int64_t> shape, TensorRole role) {
    TensorInfo t;
    t.name = name;
    t.shape = std::move(shape);
    t.role = role;
    t.numel = 1;
    for (int64_t d : t.shape) t.numel *= d;
    infos.push_back(t);
    params.emplace_back(static_cast<size_t>(t.numel), 0.0f);
    grads.emplace_back(static_cast<size_t>(t.numel), 0.0f);
  }
  // Fresh gradients on host and device (different scales per tensor, some exact zeros).
  void new_gradients() {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (size_t t = 0; t < infos.size(); ++t) {
      const float scale = 0.01f * static_cast<float>(t + 1);
      for (size_t i = 0; i < grads[t].size(); ++i) grads[t][i] = i % 17 == 3 ? 0.0f : scale * normal(rng);
      d_grads[t]->upload(grads[t]);
    }
  }
  std::vector<ParamView> views() {
    std::vector<ParamView> v;
    for (size_t t = 0; t < infos.size(); ++t) {
      ParamView p;
      p.info = &infos[t];
      p.param = params[t].data();
      p.grad = grads[t].data();
      const bool decay = infos[t].role != TensorRole::kNorm && infos[t].role != TensorRole::kBias;
      p.weight_decay = decay ? 0.1 : 0.0;
      p.lr_scale = t == 2 ? 0.5 : 1.0;
      v.push_back(p);
    }
    return v;
  }
  void expect_params_match(const std::string& what, double tol = kTol) {
    for (size_t t = 0; t < infos.size(); ++t) {
      const double rel = relative_error(d_params[t]->download(), params[t]);
      EXPECT_LE(rel, tol) << what << ": parameter " << infos[t].name << " relative error " << rel;
    }
  }
};

void expect_state(const std::string& what, const std::vector<float>& gpu, const std::vector<float>& cpu,
                  double tol = kTol) {
  const double rel = relative_error(gpu, cpu);
  EXPECT_LE(rel, tol) << what << " relative error " << rel;
}

std::vector<std::unique_ptr<DeviceArray<float>>> zero_states(const Problem& p) {
  std::vector<std::unique_ptr<DeviceArray<float>>> out;
  for (const auto& t : p.infos) {
    out.push_back(
        std::make_unique<DeviceArray<float>>(std::vector<float>(static_cast<size_t>(t.numel), 0.0f)));
  }
  return out;
}

TEST(CudaOptimizers, AdamWMatchesCpu) {
  SKIP_WITHOUT_GPU();
  Problem p;
  llm::AdamW cpu(0.9, 0.999, 1e-8);
  auto views = p.views();
  cpu.init(views);
  auto m = zero_states(p), v = zero_states(p);
  const double lr = 3e-3;
  for (int s = 1; s <= kSteps; ++s) {
    p.new_gradients();
    cpu.step(views, lr, s);
    for (size_t t = 0; t < p.infos.size(); ++t) {
      llm::cuda::adamw_step(p.d_params[t]->data(), m[t]->data(), v[t]->data(), p.d_grads[t]->data(),
                            p.params[t].size(), lr * views[t].lr_scale, 0.9, 0.999, 1e-8,
                            views[t].weight_decay, s);
    }
  }
  p.expect_params_match("adamw");
  const auto state = cpu.state();  // m0, v0, m1, ... or all m then all v: match by name
  for (const auto& b : state) {
    const bool is_m = b.name.find(".m.") != std::string::npos;
    const size_t t = std::stoul(b.name.substr(b.name.rfind('.') + 1));
    expect_state(b.name, (is_m ? m : v)[t]->download(), b.data);
  }
}

TEST(CudaOptimizers, LionMatchesCpu) {
  SKIP_WITHOUT_GPU();
  Problem p;
  llm::Lion cpu(0.9, 0.999);  // 0.999: a float 1 - beta2 would be 1.3e-5 off and show in m
  auto views = p.views();
  cpu.init(views);
  auto m = zero_states(p);
  const double lr = 3e-4;
  for (int s = 1; s <= kSteps; ++s) {
    p.new_gradients();
    cpu.step(views, lr, s);
    for (size_t t = 0; t < p.infos.size(); ++t) {
      llm::cuda::lion_step(p.d_params[t]->data(), m[t]->data(), p.d_grads[t]->data(), p.params[t].size(),
                           lr * views[t].lr_scale, 0.9, 0.999, views[t].weight_decay);
    }
  }
  p.expect_params_match("lion");
  const auto state = cpu.state();
  for (size_t t = 0; t < state.size(); ++t) expect_state(state[t].name, m[t]->download(), state[t].data);
}

TEST(CudaOptimizers, SophiaMatchesCpu) {
  SKIP_WITHOUT_GPU();
  Problem p;
  const int k = 2;  // Hessian estimates after steps 2 and 4, so steps 3 to 5 use them
  // beta2 0.999: a float 1 - beta2 would be 1.3e-5 off and show in h.
  llm::Sophia cpu(0.965, 0.999, 0.04, k);
  auto views = p.views();
  cpu.init(views);
  auto m = zero_states(p), h = zero_states(p);
  const double lr = 1e-3;
  const int batch_tokens = 64;
  double gpu_tokens = 0.0;
  for (int s = 1; s <= kSteps; ++s) {
    p.new_gradients();
    cpu.step(views, lr, s);
    for (size_t t = 0; t < p.infos.size(); ++t) {
      llm::cuda::sophia_step(p.d_params[t]->data(), m[t]->data(), h[t]->data(), p.d_grads[t]->data(),
                             p.params[t].size(), lr * views[t].lr_scale, 0.965, 0.04, gpu_tokens,
                             views[t].weight_decay);
    }
    if (cpu.wants_hessian_estimate(s)) {
      p.new_gradients();  // stands for the sampled-label gradient
      cpu.update_hessian_estimate(views, batch_tokens);
      for (size_t t = 0; t < p.infos.size(); ++t) {
        llm::cuda::sophia_hessian_step(h[t]->data(), p.d_grads[t]->data(), p.params[t].size(), 0.999);
      }
      gpu_tokens = batch_tokens;
    }
  }
  p.expect_params_match("sophia");
  const auto state = cpu.state();
  for (size_t t = 0; t < p.infos.size(); ++t) {
    expect_state(state[2 * t].name, m[t]->download(), state[2 * t].data);
    expect_state(state[2 * t + 1].name, h[t]->download(), state[2 * t + 1].data);
  }
}

void run_adafactor(const llm::AdafactorOptions& o, const std::string& what) {
  Problem p(/*with_3d=*/true);
  llm::Adafactor cpu(o);
  auto views = p.views();
  cpu.init(views);
  llm::cuda::AdafactorHyper hyper;
  hyper.eps1 = o.eps1;
  hyper.eps2 = o.eps2;
  hyper.clip_threshold = o.clip_threshold;
  hyper.decay_rate = o.decay_rate;
  hyper.beta1 = o.beta1;
  hyper.scale_parameter = o.scale_parameter;
  hyper.relative_step = o.relative_step;
  hyper.warmup_init = o.warmup_init;
  struct Gpu {
    std::unique_ptr<DeviceArray<float>> row, col, full, first;
    std::unique_ptr<DeviceArray<double>> scratch;
    int64_t matrices = 1, rows = 0, cols = 0;
  };
  std::vector<Gpu> g(p.infos.size());
  for (size_t t = 0; t < p.infos.size(); ++t) {
    const auto& shape = p.infos[t].shape;
    const size_t n = static_cast<size_t>(p.infos[t].numel);
    if (shape.size() >= 2) {
      g[t].rows = shape[shape.size() - 2];
      g[t].cols = shape[shape.size() - 1];
      g[t].matrices = p.infos[t].numel / (g[t].rows * g[t].cols);
      g[t].row = std::make_unique<DeviceArray<float>>(std::vector<float>(g[t].matrices * g[t].rows, 0.0f));
      g[t].col = std::make_unique<DeviceArray<float>>(std::vector<float>(g[t].matrices * g[t].cols, 0.0f));
    } else {
      g[t].full = std::make_unique<DeviceArray<float>>(std::vector<float>(n, 0.0f));
    }
    if (o.beta1 > 0.0) g[t].first = std::make_unique<DeviceArray<float>>(std::vector<float>(n, 0.0f));
    g[t].scratch = std::make_unique<DeviceArray<double>>(
        llm::cuda::adafactor_scratch_doubles(g[t].matrices, g[t].rows, g[t].cols));
  }
  auto ptr = [](const std::unique_ptr<DeviceArray<float>>& a) { return a ? a->data() : nullptr; };
  const double lr = 1e-2;
  for (int s = 1; s <= kSteps; ++s) {
    p.new_gradients();
    cpu.step(views, lr, s);
    for (size_t t = 0; t < p.infos.size(); ++t) {
      llm::cuda::adafactor_step(p.d_params[t]->data(), ptr(g[t].row), ptr(g[t].col), ptr(g[t].full),
                                ptr(g[t].first), p.d_grads[t]->data(), g[t].scratch->data(),
                                g[t].scratch->size(), p.params[t].size(), g[t].matrices, g[t].rows, g[t].cols,
                                lr, views[t].lr_scale, views[t].weight_decay, s, hyper);
    }
  }
  p.expect_params_match(what);
  // State order per tensor: row, col (factored) or v; then m with beta1.
  const auto state = cpu.state();
  size_t k = 0;
  for (size_t t = 0; t < p.infos.size(); ++t) {
    if (g[t].row) {
      expect_state(what + " " + state[k].name, g[t].row->download(), state[k].data);
      ++k;
      expect_state(what + " " + state[k].name, g[t].col->download(), state[k].data);
      ++k;
    } else {
      expect_state(what + " " + state[k].name, g[t].full->download(), state[k].data);
      ++k;
    }
    if (g[t].first) {
      expect_state(what + " " + state[k].name, g[t].first->download(), state[k].data);
      ++k;
    }
  }
}

TEST(CudaOptimizers, AdafactorMatchesCpu) {
  SKIP_WITHOUT_GPU();
  run_adafactor(llm::AdafactorOptions{}, "adafactor (defaults)");
}

TEST(CudaOptimizers, AdafactorFirstMomentRelativeStepMatchesCpu) {
  SKIP_WITHOUT_GPU();
  llm::AdafactorOptions o;
  o.beta1 = 0.9;
  o.relative_step = true;
  o.scale_parameter = false;
  o.clip_threshold = 0.5;  // clipping active
  run_adafactor(o, "adafactor (beta1, relative step)");
}

TEST(CudaOptimizers, AdamW8bitMatchesCpuCodeForCode) {
  SKIP_WITHOUT_GPU();
  Problem p;
  const int block = 64;  // several blocks per tensor, and short last blocks (300, 592, 960 elements)
  llm::AdamW8bit cpu(0.9, 0.999, 1e-8, block);
  auto views = p.views();
  cpu.init(views);
  std::vector<std::unique_ptr<DeviceArray<uint8_t>>> mc, vc;
  std::vector<std::unique_ptr<DeviceArray<float>>> ma, va;
  for (const auto& t : p.infos) {
    const size_t n = static_cast<size_t>(t.numel), blocks = (n + block - 1) / block;
    mc.push_back(std::make_unique<DeviceArray<uint8_t>>(std::vector<uint8_t>(n, 127)));
    vc.push_back(std::make_unique<DeviceArray<uint8_t>>(std::vector<uint8_t>(n, 0)));
    ma.push_back(std::make_unique<DeviceArray<float>>(std::vector<float>(blocks, 0.0f)));
    va.push_back(std::make_unique<DeviceArray<float>>(std::vector<float>(blocks, 0.0f)));
  }
  const double lr = 3e-3;
  for (int s = 1; s <= kSteps; ++s) {
    p.new_gradients();
    cpu.step(views, lr, s);
    for (size_t t = 0; t < p.infos.size(); ++t) {
      llm::cuda::adamw8bit_step(p.d_params[t]->data(), mc[t]->data(), ma[t]->data(), vc[t]->data(),
                                va[t]->data(), p.d_grads[t]->data(), p.params[t].size(), block,
                                lr * views[t].lr_scale, 0.9, 0.999, 1e-8, views[t].weight_decay, s);
    }
  }
  p.expect_params_match("adamw_8bit");
  // The state: packed codes (compare the bytes) and absmax, per tensor.
  const auto state = cpu.state();
  for (size_t t = 0; t < p.infos.size(); ++t) {
    const size_t n = p.params[t].size();
    const auto m_codes = mc[t]->download(), v_codes = vc[t]->download();
    const auto* cpu_m = reinterpret_cast<const uint8_t*>(state[4 * t].data.data());
    const auto* cpu_v = reinterpret_cast<const uint8_t*>(state[4 * t + 2].data.data());
    size_t m_diff = 0, v_diff = 0;
    for (size_t i = 0; i < n; ++i) {
      m_diff += m_codes[i] != cpu_m[i];
      v_diff += v_codes[i] != cpu_v[i];
    }
    EXPECT_EQ(m_diff, 0u) << p.infos[t].name << ": first-moment codes that differ";
    EXPECT_EQ(v_diff, 0u) << p.infos[t].name << ": second-moment codes that differ";
    EXPECT_EQ(ma[t]->download(), state[4 * t + 1].data) << p.infos[t].name << " m absmax";
    EXPECT_EQ(va[t]->download(), state[4 * t + 3].data) << p.infos[t].name << " v absmax";
  }
}

void run_muon(llm::cuda::MuonPrecision precision, double tol, const std::string& what) {
  Problem p;
  const bool fp32 = precision == llm::cuda::MuonPrecision::kFloat32;
  llm::Muon cpu(0.95, true, 5, fp32 ? llm::NsPrecision::kFloat32 : llm::NsPrecision::kBf16, 0.1, 0.9, 0.999,
                1e-8);
  auto views = p.views();
  cpu.init(views);
  auto momentum = zero_states(p), m = zero_states(p), v = zero_states(p);
  std::vector<std::unique_ptr<DeviceArray<uint8_t>>> ws(p.infos.size());
  for (size_t t = 0; t < p.infos.size(); ++t) {
    if (!llm::muon_updates(p.infos[t])) continue;
    ws[t] = std::make_unique<DeviceArray<uint8_t>>(
        llm::cuda::muon_workspace_bytes(p.infos[t].shape[0], p.infos[t].shape[1], precision));
  }
  const double lr = 0.02;
  for (int s = 1; s <= kSteps; ++s) {
    p.new_gradients();
    cpu.step(views, lr, s);
    for (size_t t = 0; t < p.infos.size(); ++t) {
      const double tensor_lr = lr * views[t].lr_scale;
      if (ws[t]) {
        llm::cuda::muon_step(p.d_params[t]->data(), momentum[t]->data(), p.d_grads[t]->data(), ws[t]->data(),
                             ws[t]->size(), p.infos[t].shape[0], p.infos[t].shape[1], tensor_lr,
                             views[t].weight_decay, 0.95, true, 5, precision);
      } else {
        llm::cuda::adamw_step(p.d_params[t]->data(), m[t]->data(), v[t]->data(), p.d_grads[t]->data(),
                              p.params[t].size(), tensor_lr * 0.1, 0.9, 0.999, 1e-8, views[t].weight_decay,
                              s);
      }
    }
  }
  // The AdamW side does not go through NS5: fp32 accuracy in both precisions.
  for (size_t t = 0; t < p.infos.size(); ++t) {
    const double rel = relative_error(p.d_params[t]->download(), p.params[t]);
    EXPECT_LE(rel, ws[t] ? tol : kTol)
        << what << ": parameter " << p.infos[t].name << " relative error " << rel;
  }
  // The momentum buffers in tensor order, then AdamW's m and v per remaining tensor.
  const auto state = cpu.state();
  size_t j = 0;
  for (size_t t = 0; t < p.infos.size(); ++t) {
    if (!ws[t]) continue;
    expect_state(what + " " + state[j].name, momentum[t]->download(), state[j].data);
    ++j;
  }
  for (size_t t = 0; t < p.infos.size(); ++t) {
    if (ws[t]) continue;
    expect_state(what + " " + state[j].name, m[t]->download(), state[j].data);
    expect_state(what + " " + state[j + 1].name, v[t]->download(), state[j + 1].data);
    j += 2;
  }
  EXPECT_EQ(j, state.size()) << what << ": state buffers not compared";
}

TEST(CudaOptimizers, MuonFp32MatchesCpu) {
  SKIP_WITHOUT_GPU();
  run_muon(llm::cuda::MuonPrecision::kFloat32, kTol, "muon fp32");
}

TEST(CudaOptimizers, MuonBf16CloseToCpuBf16) {
  SKIP_WITHOUT_GPU();
  // Parameter-level: the bf16 orthogonaliser differs by up to a few percent, scaled by lr = 0.02.
  run_muon(llm::cuda::MuonPrecision::kBf16, 2e-3, "muon bf16");
}

void check_orthogonalizer(llm::cuda::MuonPrecision precision, double tol) {
  const bool fp32 = precision == llm::cuda::MuonPrecision::kFloat32;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{24, 40}, {65, 33}, {128, 128}}) {
    std::vector<float> g(static_cast<size_t>(rows * cols));
    for (float& x : g) x = normal(rng);
    std::vector<float> want(g.size());
    llm::newton_schulz5(want.data(), g.data(), rows, cols, 5,
                        fp32 ? llm::NsPrecision::kFloat32 : llm::NsPrecision::kBf16);
    DeviceArray<float> in(g), out(g.size());
    DeviceArray<uint8_t> ws(llm::cuda::muon_workspace_bytes(rows, cols, precision));
    llm::cuda::muon_orthogonalize(out.data(), in.data(), ws.data(), ws.size(), rows, cols, 5, precision);
    const double rel = relative_error(out.download(), want);
    EXPECT_LE(rel, tol) << "NS5 " << rows << "x" << cols << (fp32 ? " fp32" : " bf16") << ": relative error "
                        << rel;
  }
}

TEST(CudaOptimizers, NewtonSchulzFp32MatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_orthogonalizer(llm::cuda::MuonPrecision::kFloat32, 1e-4);
}

TEST(CudaOptimizers, NewtonSchulzBf16CloseToCpuBf16) {
  SKIP_WITHOUT_GPU();
  check_orthogonalizer(llm::cuda::MuonPrecision::kBf16, 5e-2);
}

}  // namespace
