// RankState's shared machinery: teardown, argument checks, the caller's
// stream, the polling loop every wait goes through, and aborting.
#include "distributed/nccl_rank_state.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "core/cuda.h"
#include "core/status.h"
#include "distributed/nccl_errors.h"

namespace lc {
namespace distributed_internal {

RankState::~RankState() {
  absl::MutexLock lock(&mu_);
  DeviceGuard guard(device_);
  AbortLocked(absl::CancelledError("the communicator was destroyed"));
  for (const Lane& lane : lanes_) {
    if (lane.stream != nullptr) {
      cudaStreamSynchronize(lane.stream);
      cudaStreamDestroy(lane.stream);
    }
  }
  for (cudaStream_t stream : {main_stream_, self_stream_}) {
    if (stream != nullptr) {
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
  }
  for (cudaEvent_t event : {collective_posted_, collective_done_}) {
    if (event != nullptr) cudaEventDestroy(event);
  }
  for (char* host : {header_host_, exchange_host_}) {
    if (host != nullptr) cudaFreeHost(host);
  }
  for (char* device : {header_device_, exchange_device_}) {
    if (device != nullptr) cudaFree(device);
  }
}

absl::Status RankState::CheckTensor(const std::string& what,
                                    const Tensor& t) const {
  LC_RETURN_IF_ERROR(CheckDefined(what, t));
  if (t.device() != Device::Cuda(device_)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " ", DescribeTensor(t), " is on ", t.device().ToString(),
        " but the NCCL communicator of rank ", rank_, " runs on cuda:", device_,
        " (expected a CUDA tensor of that device; move it with "
        ".to(Device::Cuda(",
        device_, ")))"));
  }
  LC_RETURN_IF_ERROR(CheckContiguous(what, t));
  if (t.dim() > kMaxDims) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " ", DescribeTensor(t), " has ", t.dim(),
        " dimensions (the NCCL backend takes at most ", kMaxDims, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<cudaStream_t> RankState::CallerStream(
    const std::string& what) const {
  cudaStream_t stream = nullptr;
  const absl::Status status =
      StatusFromCall([&] { stream = CurrentCudaStream(device_); });
  if (!status.ok()) {
    return absl::Status(status.code(),
                        absl::StrCat(what, ": ", status.message()));
  }
  return stream;
}

absl::Status RankState::PollUntil(
    Clock::time_point deadline, const std::string& what, const Ready& ready,
    const std::function<absl::Status()>& on_timeout) {
  Backoff backoff;
  for (;;) {
    {
      ReleaseRetiredOnExit release(this);
      absl::MutexLock lock(&mu_);
      if (aborted_) return AbortedLocked(what);
      DeviceGuard guard(device_);
      absl::Status status = ProgressLocked();
      if (status.ok()) {
        absl::StatusOr<bool> done = ready();
        if (done.ok() && *done) return absl::OkStatus();
        status = done.status();
      }
      if (status.ok() && Clock::now() >= deadline) status = on_timeout();
      if (!status.ok()) {
        AbortLocked(status);
        return status;
      }
    }
    backoff.Pause();
  }
}

void RankState::AbortLocked(const absl::Status& reason) {
  if (aborted_) return;
  aborted_ = true;
  abort_reason_ = reason.ToString();
  DeviceGuard guard(device_);
  // Stops the kernels still running on this rank's streams. The main
  // communicator first: that also stops a split still in progress.
  if (main_ != nullptr) ncclCommAbort(main_);
  main_ = nullptr;
  for (Lane& lane : lanes_) {
    if (lane.comm != nullptr) ncclCommAbort(lane.comm);
    lane.comm = nullptr;
    for (auto& t : lane.unissued) retired_.push_back(std::move(t));
    lane.unissued.clear();
  }
  for (auto* queues : {&self_sends_, &self_recvs_}) {
    for (auto& [tag, queue] : *queues) {
      for (auto& t : queue) retired_.push_back(std::move(t));
    }
    queues->clear();
  }
  for (auto& t : in_flight_) retired_.push_back(std::move(t));
  in_flight_.clear();
}

absl::Status RankState::AbortedLocked(const std::string& what) const {
  return absl::AbortedError(
      absl::StrCat(what, ": the NCCL communicator of rank ", rank_,
                   " was aborted: ", abort_reason_));
}

void RankState::Abort(const absl::Status& reason) {
  ReleaseRetiredOnExit release(this);
  absl::MutexLock lock(&mu_);
  AbortLocked(reason);
}

void RankState::ReleaseRetired() {
  std::vector<std::shared_ptr<Transfer>> retired;
  {
    absl::MutexLock lock(&mu_);
    retired.swap(retired_);
  }
}

}  // namespace distributed_internal
}  // namespace lc
