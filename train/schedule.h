// Learning-rate schedules, as a pure function of the step.
//
// Step s counts optimizer updates from 1. With W warmup steps and S total steps:
//   warmup (s <= W):  lr * s / W                          (linear from lr/W up to lr)
//   then, with progress p = (s - W) / (S - W) in [0, 1] and floor m = min_lr_ratio * lr:
//     none:        lr
//     linear:      m + (lr - m) (1 - p)
//     cosine:      m + (lr - m) (1 + cos(pi p)) / 2
//     polynomial:  m + (lr - m) (1 - p)^power
// These are transformers' get_*_schedule_with_warmup curves (which decay to 0, i.e. min_lr_ratio 0),
// evaluated at the update being taken rather than the one before, so the first update uses lr/W and
// not 0.
#pragma once

#include <cstdint>
#include <string>

namespace llm {

struct ScheduleConfig {
  std::string scheduler = "cosine";  // none | cosine | linear | polynomial
  double lr = 3e-4;
  int64_t warmup_steps = 1000;
  int64_t total_steps = 10000;
  double min_lr_ratio = 0.0;
  double polynomial_power = 1.0;
};

double learning_rate_at(const ScheduleConfig& config, int64_t step);

}  // namespace llm
