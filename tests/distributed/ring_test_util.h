// Helpers of the ring tests (CPU and GPU): a Communicator that fails one
// chosen Send, and moving [batch, n, ...] tensors between whole-sequence and
// per-rank form outside the ranks.
#ifndef LONGCTX_TESTS_DISTRIBUTED_RING_TEST_UTIL_H_
#define LONGCTX_TESTS_DISTRIBUTED_RING_TEST_UTIL_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "core/tensor.h"
#include "distributed/communicator.h"
#include "distributed/sequence_parallel.h"
#include "ops/shape_ops.h"

namespace lc {
namespace testing {

// Forwards everything to `inner`, except that the `fail_at`-th Send (1 =
// the first; 0: none) is refused with an Unavailable error.
class FailingCommunicator : public Communicator {
 public:
  FailingCommunicator(Communicator& inner, int fail_at)
      : inner_(inner), fail_at_(fail_at) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  absl::StatusOr<std::unique_ptr<Work>> Send(const Tensor& tensor, int dst,
                                             int tag) override {
    if (++sends_ == fail_at_) {
      return absl::UnavailableError(
          absl::StrCat("injected failure of send ", sends_));
    }
    return inner_.Send(tensor, dst, tag);
  }
  absl::StatusOr<std::unique_ptr<Work>> Recv(const Tensor& tensor, int src,
                                             int tag) override {
    return inner_.Recv(tensor, src, tag);
  }
  absl::Status StartBatch() override { return inner_.StartBatch(); }
  absl::Status EndBatch() override { return inner_.EndBatch(); }
  absl::Status AllReduceSum(const Tensor& tensor) override {
    return inner_.AllReduceSum(tensor);
  }
  absl::Status AllGather(const Tensor& input, const Tensor& output) override {
    return inner_.AllGather(input, output);
  }
  absl::Status Broadcast(const Tensor& tensor, int root) override {
    return inner_.Broadcast(tensor, root);
  }
  absl::Status Barrier() override { return inner_.Barrier(); }
  void Abort(const absl::Status& reason) override { inner_.Abort(reason); }
  CommStats stats() const override { return inner_.stats(); }
  void ResetStats() override { inner_.ResetStats(); }

 private:
  Communicator& inner_;
  const int fail_at_;
  int sends_ = 0;
};

// This rank's rows of a [batch, heads, n] statistic (lse).
inline Tensor SplitStat(const Tensor& stat, int k, int rank,
                        SequenceLayout layout) {
  return SplitSequence(stat.transpose(1, 2), k, rank, layout).transpose(1, 2);
}

// The whole [batch, n, ...] tensor from each rank's rows (RankSpans order).
inline Tensor GatherRows(const std::vector<Tensor>& per_rank, int64_t n,
                         SequenceLayout layout) {
  const int k = static_cast<int>(per_rank.size());
  // Every non-empty span of every rank, sorted by position.
  std::vector<std::pair<int64_t, Tensor>> by_position;
  for (int r = 0; r < k; ++r) {
    int64_t row = 0;
    for (const PositionSpan& span : RankSpans(n, k, r, layout)) {
      if (span.size() > 0) {
        by_position.push_back(
            {span.begin, per_rank[r].slice(1, row, row + span.size())});
      }
      row += span.size();
    }
  }
  std::sort(by_position.begin(), by_position.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<Tensor> ordered;
  for (auto& [begin, t] : by_position) ordered.push_back(t);
  return Concat(ordered, 1);
}

}  // namespace testing
}  // namespace lc

#endif  // LONGCTX_TESTS_DISTRIBUTED_RING_TEST_UTIL_H_
