#include "distributed/nccl_communicator.h"

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/cuda.h"
#include "core/status.h"
#include "distributed/communicator_util.h"
#include "distributed/nccl_rank_state.h"

namespace lc {
namespace {

using distributed_internal::CallRank;
using distributed_internal::CollectiveKind;
using distributed_internal::RankState;
using distributed_internal::Transfer;

class NcclWork : public Work {
 public:
  NcclWork(std::shared_ptr<RankState> state, std::shared_ptr<Transfer> transfer)
      : state_(std::move(state)), transfer_(std::move(transfer)) {}
  absl::Status Wait() override { return state_->Wait(transfer_); }

 private:
  std::shared_ptr<RankState> state_;
  std::shared_ptr<Transfer> transfer_;
};

class NcclCommunicator : public Communicator {
 public:
  explicit NcclCommunicator(std::shared_ptr<RankState> state)
      : state_(std::move(state)) {}
  ~NcclCommunicator() override {
    state_->Abort(absl::CancelledError("the communicator was destroyed"));
  }

  int rank() const override { return state_->rank(); }
  int size() const override { return state_->size(); }

  absl::StatusOr<std::unique_ptr<Work>> Send(const Tensor& tensor, int dst,
                                             int tag) override {
    LC_ASSIGN_OR_RETURN(auto transfer, state_->Post(true, tensor, dst, tag));
    return std::unique_ptr<Work>(new NcclWork(state_, std::move(transfer)));
  }
  absl::StatusOr<std::unique_ptr<Work>> Recv(const Tensor& tensor, int src,
                                             int tag) override {
    LC_ASSIGN_OR_RETURN(auto transfer, state_->Post(false, tensor, src, tag));
    // NCCL writes the tensor through its pointer: an in-place write (NOTE [
    // Version counters ] in core/autograd.h), counted when it is posted.
    tensor.bump_version();
    return std::unique_ptr<Work>(new NcclWork(state_, std::move(transfer)));
  }
  absl::Status AllReduceSum(const Tensor& tensor) override {
    if (tensor.defined()) tensor.bump_version();
    return state_->Collective(CollectiveKind::kAllReduceSum, tensor, Tensor(),
                              0);
  }
  absl::Status AllGather(const Tensor& input, const Tensor& output) override {
    if (output.defined()) output.bump_version();
    return state_->Collective(CollectiveKind::kAllGather, input, output, 0);
  }
  absl::Status Broadcast(const Tensor& tensor, int root) override {
    if (tensor.defined() && root != rank()) tensor.bump_version();
    return state_->Collective(CollectiveKind::kBroadcast, tensor, Tensor(),
                              root);
  }
  absl::Status Barrier() override {
    return state_->Collective(CollectiveKind::kBarrier, Tensor(), Tensor(), 0);
  }
  void Abort(const absl::Status& reason) override { state_->Abort(reason); }
  CommStats stats() const override { return state_->stats(); }
  void ResetStats() override { state_->ResetStats(); }

 private:
  std::shared_ptr<RankState> state_;
};

absl::StatusOr<std::unique_ptr<Communicator>> Create(
    int rank, int size, int device, const NcclUniqueId& id,
    std::chrono::milliseconds timeout, const std::atomic<bool>* cancelled) {
  if (size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("CreateNcclCommunicator: size ", size, " must be >= 1"));
  }
  if (rank < 0 || rank >= size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CreateNcclCommunicator: rank ", rank,
        " is out of range (expected 0 <= rank < size=", size, ")"));
  }
  if (timeout <= std::chrono::milliseconds::zero()) {
    return absl::InvalidArgumentError(
        absl::StrCat("CreateNcclCommunicator: timeout ", timeout.count(),
                     " ms must be positive"));
  }
  const int devices = CudaDeviceCount();
  if (device < 0 || device >= devices) {
    return absl::FailedPreconditionError(absl::StrCat(
        "CreateNcclCommunicator: rank ", rank, " asks for CUDA device ", device,
        ", which does not exist (this machine has ", devices,
        " CUDA devices)"));
  }
  auto state = std::make_shared<RankState>(rank, size, device, timeout);
  LC_RETURN_IF_ERROR(state->Init(id, cancelled));
  return std::unique_ptr<Communicator>(new NcclCommunicator(std::move(state)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(
    int rank, int size, int device, const NcclUniqueId& id,
    std::chrono::milliseconds timeout) {
  return Create(rank, size, device, id, timeout, nullptr);
}

absl::Status RunNcclRanks(int k,
                          const std::function<absl::Status(Communicator&)>& fn,
                          std::chrono::milliseconds timeout) {
  if (k < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("RunNcclRanks: k=", k, " must be >= 1"));
  }
  const int devices = CudaDeviceCount();
  if (k > devices) {
    return absl::FailedPreconditionError(absl::StrCat(
        "RunNcclRanks: k=", k,
        " ranks need one CUDA device each, but this machine has ", devices));
  }
  LC_ASSIGN_OR_RETURN(const NcclUniqueId id, NewNcclUniqueId());
  std::atomic<bool> failed{false};
  absl::Mutex mu;
  absl::Status first_failure;
  std::vector<std::unique_ptr<Communicator>> communicators(k);
  // Records the first failure and aborts every other rank.
  const auto fail = [&](int r, const absl::Status& status) {
    const absl::Status failure(
        status.code(), absl::StrCat("rank ", r, ": ", status.message()));
    std::vector<Communicator*> others;
    {
      absl::MutexLock lock(&mu);
      if (!first_failure.ok()) return;  // an effect, not the cause
      first_failure = failure;
      failed = true;
      for (int i = 0; i < k; ++i) {
        if (i != r && communicators[i] != nullptr) {
          others.push_back(communicators[i].get());
        }
      }
    }
    for (Communicator* other : others) other->Abort(failure);
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < k; ++r) {
    threads.emplace_back([&, r] {
      absl::StatusOr<std::unique_ptr<Communicator>> created =
          Create(r, k, /*device=*/r, id, timeout, &failed);
      if (!created.ok()) {
        fail(r, created.status());
        return;
      }
      Communicator* communicator = created->get();
      {
        absl::MutexLock lock(&mu);
        communicators[r] = std::move(*created);
        if (!first_failure.ok()) communicator->Abort(first_failure);
      }
      const absl::Status status = CallRank(fn, *communicator);
      if (!status.ok()) fail(r, status);
    });
  }
  for (std::thread& thread : threads) thread.join();
  communicators.clear();
  return first_failure;
}

}  // namespace lc
