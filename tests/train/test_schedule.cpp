// The learning-rate schedules against values worked out by hand from the formulas in train/schedule.h.
//
// Setup for most tests: lr 1e-3, 10 warmup steps, 110 total steps, so after warmup the progress is
// p = (s - 10) / 100: step 11 is p = 0.01, step 35 is p = 0.25, step 60 is p = 0.5, step 110 is p = 1.
// Cosine values use (1 + cos(pi p)) / 2 = cos^2(pi p / 2): at p = 0.25 that is (2 + sqrt 2) / 4, at
// p = 0.01 it is cos^2(pi / 200) = 0.99975328018286... The only rounding is in the last bits of a
// double, so the comparisons allow 1e-12 relative.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "train/schedule.h"

namespace {

using llm::learning_rate_at;
using llm::ScheduleConfig;

ScheduleConfig config(const std::string& scheduler, double min_lr_ratio = 0.0, double power = 1.0) {
  ScheduleConfig c;
  c.scheduler = scheduler;
  c.lr = 1e-3;
  c.warmup_steps = 10;
  c.total_steps = 110;
  c.min_lr_ratio = min_lr_ratio;
  c.polynomial_power = power;
  return c;
}

void expect_lr(const ScheduleConfig& c, int64_t step, double expected) {
  const double got = learning_rate_at(c, step);
  EXPECT_NEAR(got, expected, 1e-12 * std::max(1e-3, std::fabs(expected)))
      << c.scheduler << " at step " << step << " (warmup " << c.warmup_steps << ", total " << c.total_steps
      << ", min_lr_ratio " << c.min_lr_ratio << ")";
}

constexpr double kSqrt2 = 1.4142135623730951;

TEST(Schedule, WarmupIsLinearForEveryScheduler) {
  for (const char* name : {"none", "cosine", "linear", "polynomial"}) {
    const ScheduleConfig c = config(name);
    expect_lr(c, 1, 1e-4);  // lr * 1 / 10: the first update does not use lr 0
    expect_lr(c, 5, 5e-4);
    expect_lr(c, 10, 1e-3);  // the warmup boundary reaches the full rate
  }
}

TEST(Schedule, None) {
  const ScheduleConfig c = config("none", /*min_lr_ratio=*/0.5);  // no decay, so no floor either
  expect_lr(c, 11, 1e-3);
  expect_lr(c, 60, 1e-3);
  expect_lr(c, 110, 1e-3);
  expect_lr(c, 500, 1e-3);
}

TEST(Schedule, Cosine) {
  const ScheduleConfig c = config("cosine");
  expect_lr(c, 11, 9.997532801828658e-4);  // lr cos^2(pi / 200)
  expect_lr(c, 35, 1e-3 * (2.0 + kSqrt2) / 4.0);
  expect_lr(c, 60, 5e-4);
  expect_lr(c, 85, 1e-3 * (2.0 - kSqrt2) / 4.0);
  expect_lr(c, 110, 0.0);
}

TEST(Schedule, Linear) {
  const ScheduleConfig c = config("linear");
  expect_lr(c, 11, 9.9e-4);
  expect_lr(c, 35, 7.5e-4);
  expect_lr(c, 60, 5e-4);
  expect_lr(c, 110, 0.0);
}

TEST(Schedule, Polynomial) {
  const ScheduleConfig square = config("polynomial", 0.0, 2.0);
  expect_lr(square, 11, 1e-3 * 0.99 * 0.99);
  expect_lr(square, 35, 1e-3 * 0.5625);  // (1 - 0.25)^2
  expect_lr(square, 60, 2.5e-4);         // (1 - 0.5)^2
  expect_lr(square, 110, 0.0);
  // Power 1 is the linear schedule.
  const ScheduleConfig one = config("polynomial", 0.0, 1.0);
  expect_lr(one, 11, 9.9e-4);
  expect_lr(one, 60, 5e-4);
  expect_lr(one, 110, 0.0);
}

TEST(Schedule, MinLrRatioIsTheFloor) {
  // floor m = 0.1 lr = 1e-4; lr(s) = m + (lr - m) shape(p).
  const ScheduleConfig cosine = config("cosine", 0.1);
  expect_lr(cosine, 10, 1e-3);  // warmup is not affected by the floor
  expect_lr(cosine, 35, 1e-4 + 9e-4 * (2.0 + kSqrt2) / 4.0);
  expect_lr(cosine, 60, 5.5e-4);
  expect_lr(cosine, 110, 1e-4);
  expect_lr(cosine, 111, 1e-4);  // past the end it stays at the floor
  expect_lr(cosine, 10000, 1e-4);

  const ScheduleConfig linear = config("linear", 0.1);
  expect_lr(linear, 11, 1e-4 + 9e-4 * 0.99);
  expect_lr(linear, 60, 5.5e-4);
  expect_lr(linear, 110, 1e-4);

  const ScheduleConfig polynomial = config("polynomial", 0.1, 2.0);
  expect_lr(polynomial, 60, 1e-4 + 9e-4 * 0.25);
  expect_lr(polynomial, 110, 1e-4);
  expect_lr(polynomial, 200, 1e-4);

  // Ratio 1 keeps the rate constant after warmup.
  const ScheduleConfig flat = config("cosine", 1.0);
  expect_lr(flat, 60, 1e-3);
  expect_lr(flat, 110, 1e-3);
}

TEST(Schedule, NoWarmup) {
  // With no warmup the decay starts at step 1: p = s / 100 over 100 total steps.
  for (const char* name : {"none", "cosine", "linear", "polynomial"}) {
    ScheduleConfig c = config(name);
    c.warmup_steps = 0;
    c.total_steps = 100;
    const bool none = std::string(name) == "none";
    expect_lr(c, 1, none ? 1e-3 : (std::string(name) == "cosine" ? 9.997532801828658e-4 : 9.9e-4));
    expect_lr(c, 50, none ? 1e-3 : 5e-4);
    expect_lr(c, 100, none ? 1e-3 : 0.0);
  }
}

TEST(Schedule, WarmupLongerThanTheRun) {
  // total <= warmup: the run ends inside warmup, and past it the decay span is clamped (no division by 0).
  ScheduleConfig c = config("cosine");
  c.warmup_steps = 10;
  c.total_steps = 5;
  expect_lr(c, 5, 5e-4);
  EXPECT_TRUE(std::isfinite(learning_rate_at(c, 11)));
  c.total_steps = 10;
  expect_lr(c, 10, 1e-3);
  expect_lr(c, 11, 0.0);
}

}  // namespace
