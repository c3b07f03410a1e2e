#include "train/schedule.h"

#include <algorithm>
#include <cmath>

namespace llm {

double learning_rate_at(const ScheduleConfig& c, int64_t step) {
  if (c.warmup_steps > 0 && step <= c.warmup_steps) {
    return c.lr * static_cast<double>(step) / static_cast<double>(c.warmup_steps);
  }
  if (c.scheduler == "none") return c.lr;
  const double span = static_cast<double>(std::max<int64_t>(1, c.total_steps - c.warmup_steps));
  const double progress = std::clamp(static_cast<double>(step - c.warmup_steps) / span, 0.0, 1.0);
  const double floor = c.min_lr_ratio * c.lr;
  double shape = 1.0;
  if (c.scheduler == "linear") {
    shape = 1.0 - progress;
  } else if (c.scheduler == "cosine") {
    shape = 0.5 * (1.0 + std::cos(M_PI * progress));
  } else if (c.scheduler == "polynomial") {
    shape = std::pow(1.0 - progress, c.polynomial_power);
  }
  return floor + (c.lr - floor) * shape;
}

}  // namespace llm
