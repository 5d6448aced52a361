// The learning-rate schedule of training: linear warmup to a peak, then
// cosine decay to a floor.
#ifndef LONGCTX_TRAIN_SCHEDULE_H_
#define LONGCTX_TRAIN_SCHEDULE_H_

#include <cstdint>

#include "absl/status/status.h"

namespace lc {

struct LrSchedule {
  double max_lr = 1e-3;
  double min_lr = 0;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
};

// Checks 0 <= min_lr <= max_lr, max_lr finite, warmup_steps >= 0 and
// total_steps >= 1;
// errors name the value.
absl::Status ValidateLrSchedule(const LrSchedule& schedule);

// The learning rate of step `step` (0-based):
//   step < warmup:  max_lr * (step + 1) / warmup
//   after:          min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2,
//                   p = (step - warmup) / (total - warmup), clamped to [0, 1]
// so the first step after warmup runs at max_lr and the rate reaches min_lr
// at step total_steps (and stays there beyond it).
double LearningRate(const LrSchedule& schedule, int64_t step);

}  // namespace lc

#endif  // LONGCTX_TRAIN_SCHEDULE_H_
