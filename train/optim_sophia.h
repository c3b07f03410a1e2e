// SophiaG: Second-order Clipped Stochastic Optimization with the Gauss-Newton-Bartlett Hessian
// estimator (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
// Model Pre-training"; official code github.com/Liuhong99/Sophia, sophia.py).
//
// Per element, with gradient g, momentum m and Hessian-diagonal EMA h (both zero at the start):
//
//   p = p - lr wd p                                      decoupled weight decay, first
//   m = b1 m + (1 - b1) g
//   p = p - lr sign(m) min(|m| / (rho bs h + 1e-15), 1)  clipped, Hessian-preconditioned step
//
// and after every k-th step (steps k, 2k, ...; wants_hessian_estimate says when) the trainer draws
// labels y^ from the model's own output distribution on a batch of bs tokens, computes the gradient
// g^ of the mean cross-entropy against y^, and calls update_hessian_estimate with it:
//
//   h = b2 h + (1 - b2) g^ (.) g^
//
// bs g^ (.) g^ is the Gauss-Newton-Bartlett estimate of diag(H); like the official code we keep the
// EMA of g^ (.) g^ and apply the factor bs (the batch_tokens of the latest estimate) in the step.
// Until the first estimate h = 0, so the step is lr sign(m) (the ratio clamps at 1).
//
// Defaults (LLM-Lab, and the official code): sophia_beta1 0.965, sophia_beta2 0.99, sophia_rho 0.04,
// sophia_k 10. State: m and h (8 bytes per parameter) plus bs.
#pragma once

#include "train/optimizer.h"

namespace llm {

class Sophia : public Optimizer {
 public:
  Sophia(double beta1, double beta2, double rho, int k) : beta1_(beta1), beta2_(beta2), rho_(rho), k_(k) {}
  std::string name() const override { return "sophia"; }
  double state_bytes_per_param() const override { return 8.0; }
  void init(const std::vector<ParamView>& params) override;
  void step(const std::vector<ParamView>& params, double lr, int64_t step) override;
  std::vector<StateBuffer> state() const override;
  void load_state(const std::vector<StateBuffer>& state) override;

  // True after steps k, 2k, ...: the trainer then computes g^ and calls update_hessian_estimate.
  bool wants_hessian_estimate(int64_t step) const override { return step > 0 && step % k_ == 0; }
  // `params[i].grad` holds g^, the gradient of the mean loss over `batch_tokens` sampled labels.
  void update_hessian_estimate(const std::vector<ParamView>& params, int batch_tokens) override;

 private:
  std::vector<StateSlot> slots() const;

  double beta1_, beta2_, rho_;
  int k_;
  double batch_tokens_ = 0.0;  // bs of the latest estimate
  std::vector<std::vector<float>> m_, h_;
  std::vector<std::string> tensor_names_;
};

}  // namespace llm
