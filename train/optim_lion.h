// Lion: EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").
//
// Per element, with gradient g, momentum m (zero at the start), learning rate lr and weight decay wd:
//
//   c = b1 m + (1 - b1) g          interpolate the momentum and the new gradient
//   p = p - lr (sign(c) + wd p)    every coordinate moves by exactly lr (plus decoupled decay)
//   m = b2 m + (1 - b2) g          the momentum itself uses the slower b2
//
// sign(0) = 0. Defaults (LLM-Lab, and the paper): lion_beta1 = 0.9, lion_beta2 = 0.99. Because the
// update has unit size per coordinate, the paper suggests a learning rate 3-10x smaller than AdamW's
// and a weight decay 3-10x larger. State: m, 4 bytes per parameter.
#pragma once

#include "train/optimizer.h"

namespace llm {

class Lion : public Optimizer {
 public:
  Lion(double beta1, double beta2) : beta1_(beta1), beta2_(beta2) {}
  std::string name() const override { return "lion"; }
  double state_bytes_per_param() const override { return 4.0; }
  void init(const std::vector<ParamView>& params) override;
  void step(const std::vector<ParamView>& params, double lr, int64_t step) override;
  std::vector<StateBuffer> state() const override;
  void load_state(const std::vector<StateBuffer>& state) override;

 private:
  std::vector<StateSlot> slots() const;

  double beta1_, beta2_;
  std::vector<std::vector<float>> m_;  // one per tensor
  std::vector<std::string> tensor_names_;
};

}  // namespace llm
