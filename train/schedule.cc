#include "train/schedule.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace lc {

absl::Status ValidateLrSchedule(const LrSchedule& schedule) {
  if (!(schedule.max_lr > 0 && std::isfinite(schedule.max_lr))) {
    return absl::InvalidArgumentError(
        absl::StrCat("learning rate max_lr = ", schedule.max_lr,
                     " (expected a finite number > 0)"));
  }
  if (!(schedule.min_lr >= 0 && schedule.min_lr <= schedule.max_lr)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "min_lr = ", schedule.min_lr,
        " (expected 0 <= min_lr <= max_lr = ", schedule.max_lr, ")"));
  }
  if (schedule.warmup_steps < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "warmup steps = ", schedule.warmup_steps, " (expected >= 0)"));
  }
  if (schedule.total_steps < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "total steps = ", schedule.total_steps, " (expected >= 1)"));
  }
  return absl::OkStatus();
}

double LearningRate(const LrSchedule& schedule, int64_t step) {
  if (step < schedule.warmup_steps) {
    return schedule.max_lr * static_cast<double>(step + 1) /
           static_cast<double>(schedule.warmup_steps);
  }
  const int64_t decay_steps =
      std::max<int64_t>(1, schedule.total_steps - schedule.warmup_steps);
  const double progress = std::clamp(
      static_cast<double>(step - schedule.warmup_steps) / decay_steps, 0.0,
      1.0);
  return schedule.min_lr + (schedule.max_lr - schedule.min_lr) *
                               (1 + std::cos(M_PI * progress)) / 2;
}

}  // namespace lc
