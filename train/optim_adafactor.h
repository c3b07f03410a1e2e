// Adafactor (Shazeer and Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost"),
// with the semantics of transformers.optimization.Adafactor, which the PyTorch fixture uses.
// (torch.optim.Adafactor, PyTorch >= 2.5, is a different variant: no update clipping, no parameter
// scaling, a different decay schedule and epsilon placement; it is not what this file computes.)
//
// Step t (from 1) on a tensor P with gradient G, with row/column second moments R and C for
// tensors of two or more dimensions (the last two dimensions form the matrix; leading ones batch it)
// and a full second moment V for vectors:
//
//   rho_t   = adafactor_relative_step ? min(adafactor_warmup_init ? 1e-6 t : 1e-2, 1 / sqrt(t)) : lr
//   alpha_t = adafactor_scale_parameter ? max(eps2, RMS(P)) rho_t : rho_t
//   beta2_t = 1 - t^decay_rate                                  (decay_rate -0.8; beta2_1 = 0)
//   matrix: R = beta2_t R + (1 - beta2_t) rowmean(G^2 + eps1)    (one value per row)
//           C = beta2_t C + (1 - beta2_t) colmean(G^2 + eps1)    (one value per column)
//           U = G / sqrt((R / mean(R)) C^T)                     (the rank-1 estimate of E[G^2])
//   vector: V = beta2_t V + (1 - beta2_t) (G^2 + eps1);  U = G / sqrt(V)
//   U = U / max(1, RMS(U) / clip_threshold)                     (update clipping)
//   U = alpha_t U
//   with beta1 > 0: M = beta1 M + (1 - beta1) U;  U = M          (first moment of the scaled update)
//   P = P - wd alpha_t P - U                                     (weight decay as transformers does it,
//                                                                 scaled by alpha_t, from the old P)
//
// RMS(X) = sqrt(mean(X^2)). The scheduled learning rate `lr` (times the tensor's lr_scale) is rho_t
// unless adafactor_relative_step is set; then the schedule is ignored, as in transformers.
//
// Defaults (transformers' Adafactor, except that relative_step is off so the trainer's schedule
// applies): adafactor_eps1 1e-30, adafactor_eps2 1e-3, adafactor_clip_threshold 1.0,
// adafactor_decay_rate -0.8, adafactor_beta1 0 (no first moment; transformers' beta1=None),
// adafactor_scale_parameter true, adafactor_relative_step false, adafactor_warmup_init false
// (needs relative_step). State: rows + cols per matrix, numel per vector, plus numel with beta1.
#pragma once

#include "train/optimizer.h"

namespace llm {

struct AdafactorOptions {
  double eps1 = 1e-30, eps2 = 1e-3, clip_threshold = 1.0, decay_rate = -0.8, beta1 = 0.0;
  bool scale_parameter = true, relative_step = false, warmup_init = false;
};

class Adafactor : public Optimizer {
 public:
  explicit Adafactor(const AdafactorOptions& options) : o_(options) {}
  std::string name() const override { return "adafactor"; }
  // Exact after init; before it, the bound for vectors (4 bytes, 8 with beta1).
  double state_bytes_per_param() const override;
  void init(const std::vector<ParamView>& params) override;
  void step(const std::vector<ParamView>& params, double lr, int64_t step) override;
  std::vector<StateBuffer> state() const override;
  void load_state(const std::vector<StateBuffer>& state) override;

 private:
  struct TensorState {
    std::string tensor;
    bool factored = false;
    int64_t batch = 1, rows = 0, cols = 0;  // factored: numel = batch rows cols
    std::vector<float> row, col;            // factored: batch x rows, batch x cols
    std::vector<float> full;                // not factored: numel
    std::vector<float> first;               // beta1 > 0: numel
  };
  std::vector<StateSlot> slots() const;

  AdafactorOptions o_;
  std::vector<TensorState> s_;
  size_t numel_ = 0;
};

}  // namespace llm
