#include "train/evaluation.h"

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "core/autograd.h"
#include "core/status.h"
#include "distributed/sequence_parallel.h"
#include "ops/loss.h"

namespace lc {
namespace train_internal {
namespace {

constexpr int kMaxBuckets = 4;

std::vector<DistanceBucket> MakeBuckets(int64_t min_distance,
                                        int64_t max_distance) {
  std::vector<DistanceBucket> buckets;
  const int64_t span = max_distance - min_distance + 1;
  if (span < 1) return buckets;
  const int64_t count = std::min<int64_t>(kMaxBuckets, span);
  for (int64_t k = 0; k < count; ++k) {
    DistanceBucket bucket;
    bucket.min_distance = min_distance + span * k / count;
    bucket.max_distance = min_distance + span * (k + 1) / count - 1;
    buckets.push_back(bucket);
  }
  return buckets;
}

// Where each global position of the sequence sits among this rank's tokens
// (-1 when another rank holds it).
std::vector<int64_t> LocalIndex(int64_t n, int k, int rank,
                                SequenceLayout layout) {
  std::vector<int64_t> local(n, -1);
  int64_t next = 0;
  for (const PositionSpan& span : RankSpans(n, k, rank, layout)) {
    for (int64_t t = span.begin; t < span.end; ++t) local[t] = next++;
  }
  return local;
}

}  // namespace

int64_t CountScored(const Tensor& targets) {
  const Tensor dense = targets.contiguous();
  const int64_t* data = dense.data<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < dense.numel(); ++i) count += data[i] != -100;
  return count;
}

absl::StatusOr<EvalResult> Evaluate(const TrainOptions& options,
                                    const DataSource& data, RankState& state,
                                    Communicator& comm) {
  const int k = comm.size();
  const int rank = comm.rank();
  const int64_t n = options.model.context;
  const SequenceLayout layout = options.model.attention.layout;
  const SequenceParallelContext sp{&comm, n};
  const SequenceParallelContext* sp_ptr = k > 1 ? &sp : nullptr;
  const std::vector<int64_t> local = LocalIndex(n, k, rank, layout);
  const bool synthetic = options.data.task != TaskType::kText;
  std::vector<DistanceBucket> buckets =
      synthetic ? MakeBuckets(options.data.min_distance, data.max_distance())
                : std::vector<DistanceBucket>();
  // [loss sum, scored, answers, correct, per bucket: answers, correct]
  std::vector<double> sums(4 + 2 * buckets.size(), 0.0);

  state.model->Eval();
  NoGradGuard no_grad;
  const absl::Status status = StatusFromCall([&] {
    for (int64_t e = 0; e < options.eval_batches; ++e) {
      const Batch batch = data.MakeBatch(options.batch, e, DataSplit::kEval);
      const Tensor tokens = SplitSequence(batch.tokens, k, rank, layout);
      const Tensor targets = SplitSequence(batch.targets, k, rank, layout);
      Tensor logits = state.model->Forward(tokens, sp_ptr);
      if (logits.dtype() == DType::kBFloat16) {
        logits = logits.to(DType::kFloat32);
      }
      const int64_t rows = logits.size(0) * logits.size(1);
      sums[0] += CrossEntropy(logits.reshape({rows, logits.size(2)}),
                              targets.to(logits.device()).reshape({rows}), -100,
                              LossReduction::kSum)
                     .item();
      sums[1] += CountScored(targets);
      logits = logits.to(Device::Cpu());  // read below element by element
      for (const Answer& answer : batch.answers) {
        const int64_t i = local[answer.position];
        if (i < 0) continue;
        const int64_t target = batch.targets.at({answer.row, answer.position});
        int64_t best = 0;
        double best_logit = -std::numeric_limits<double>::infinity();
        for (int64_t c = 0; c < logits.size(2); ++c) {
          const double value = logits.at({answer.row, i, c});
          if (value > best_logit) {
            best_logit = value;
            best = c;
          }
        }
        const double correct = best == target ? 1 : 0;
        sums[2] += 1;
        sums[3] += correct;
        for (size_t b = 0; b < buckets.size(); ++b) {
          if (answer.distance >= buckets[b].min_distance &&
              answer.distance <= buckets[b].max_distance) {
            sums[4 + 2 * b] += 1;
            sums[5 + 2 * b] += correct;
          }
        }
      }
    }
  });
  state.model->Train();
  LC_RETURN_IF_ERROR(status);
  const Tensor reduced =
      FromVector(sums, {static_cast<int64_t>(sums.size())}, DType::kFloat64);
  LC_RETURN_IF_ERROR(comm.AllReduceSum(reduced));
  const std::vector<double> total = reduced.ToVector();
  EvalResult result;
  result.step = state.step;
  result.loss = total[1] > 0 ? total[0] / total[1] : 0;
  result.answers = static_cast<int64_t>(total[2]);
  result.accuracy = total[2] > 0 ? total[3] / total[2] : 0;
  result.chance = data.chance_accuracy();
  for (size_t b = 0; b < buckets.size(); ++b) {
    buckets[b].answers = static_cast<int64_t>(total[4 + 2 * b]);
    buckets[b].accuracy =
        total[4 + 2 * b] > 0 ? total[5 + 2 * b] / total[4 + 2 * b] : 0;
  }
  result.buckets = std::move(buckets);
  return result;
}

}  // namespace train_internal
}  // namespace lc
