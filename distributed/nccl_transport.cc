// The NCCL backend's point-to-point transport: posting Sends and Recvs, the
// header protocol (every message is its Descriptor, then its data; the
// receiver checks the header), the lanes (one NCCL communicator per sending
// rank) and the progress engine that puts transfers on their lanes' streams
// and completes them, copies to the rank itself, and Work::Wait.
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "distributed/nccl_errors.h"
#include "distributed/nccl_rank_state.h"

namespace lc {
namespace distributed_internal {

absl::StatusOr<std::shared_ptr<Transfer>> RankState::Post(bool is_send,
                                                          const Tensor& tensor,
                                                          int peer, int tag) {
  auto t = std::make_shared<Transfer>();
  t->is_send = is_send;
  t->rank = rank_;
  t->peer = peer;
  t->tag = tag;
  t->device = device_;
  if (peer < 0 || peer >= size_) {
    return absl::InvalidArgumentError(
        absl::StrCat(t->Describe(), ": peer rank ", peer,
                     " is out of range (expected 0 <= peer < ", size_, ")"));
  }
  LC_RETURN_IF_ERROR(
      CheckTensor(absl::StrCat(t->Describe(), ": the tensor"), tensor));
  t->tensor = tensor.detach();
  t->bytes = ByteSize(tensor);
  t->descriptor = Describe(tag, 0, tensor);
  LC_ASSIGN_OR_RETURN(const cudaStream_t caller, CallerStream(t->Describe()));

  // Unlike the waits, posting never frees retired transfers: a device-wide
  // synchronize between a rank's Send and its Recv could wait for that Send
  // forever.
  absl::MutexLock lock(&mu_);
  if (aborted_) return AbortedLocked(t->Describe());
  DeviceGuard guard(device_);
  const bool remote = peer != rank_;
  for (cudaEvent_t* event : {&t->posted, &t->done}) {
    LC_RETURN_IF_ERROR(
        CheckCuda(cudaEventCreateWithFlags(event, cudaEventDisableTiming),
                  "cudaEventCreateWithFlags"));
  }
  if (remote && !is_send) {
    LC_RETURN_IF_ERROR(CheckCuda(
        cudaEventCreateWithFlags(&t->header_copied, cudaEventDisableTiming),
        "cudaEventCreateWithFlags"));
  }
  // The tensor's producers (or, for a receive, its last readers) are on the
  // caller's current stream; the transfer starts after them.
  LC_RETURN_IF_ERROR(
      CheckCuda(cudaEventRecord(t->posted, caller), "cudaEventRecord"));
  absl::Status status;
  if (!remote) {
    status = PostToSelfLocked(t);
  } else {
    if (free_slots_.empty()) status = ProgressLocked();
    if (status.ok() && free_slots_.empty()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          t->Describe(), ": ", kHeaderSlots,
          " transfers with other ranks are already in flight on rank ", rank_,
          " (Wait for some first)"));
    }
    if (status.ok()) {
      t->slot = free_slots_.back();
      free_slots_.pop_back();
      if (is_send) {
        std::memcpy(HostHeader(t->slot), &t->descriptor, kDescriptorBytes);
      }
      Lane& lane = lanes_[is_send ? rank_ : peer];
      lane.unissued.push_back(t);
      status = ProgressLaneLocked(lane);
    }
  }
  if (!status.ok()) {
    AbortLocked(status);
    return status;
  }
  return t;
}

absl::Status RankState::PostToSelfLocked(const std::shared_ptr<Transfer>& t) {
  auto& partners = (t->is_send ? self_recvs_ : self_sends_)[t->tag];
  if (partners.empty()) {
    (t->is_send ? self_sends_ : self_recvs_)[t->tag].push_back(t);
    return absl::OkStatus();
  }
  const std::shared_ptr<Transfer> partner = std::move(partners.front());
  partners.pop_front();
  Transfer& send = t->is_send ? *t : *partner;
  Transfer& recv = t->is_send ? *partner : *t;
  if (!SameDescriptor(send.descriptor, recv.descriptor)) {
    const std::string mismatch = SendRecvMismatch(send.tensor, recv.tensor);
    for (Transfer* x : {&send, &recv}) {
      x->finished = true;
      x->status = absl::InvalidArgumentError(
          absl::StrCat(x->Describe(), ": ", mismatch));
    }
    return absl::OkStatus();
  }
  // The copy follows both tensors' producers (the two posts may come from
  // different streams).
  for (const Transfer* x : {&send, &recv}) {
    LC_RETURN_IF_ERROR(
        CheckCuda(cudaStreamWaitEvent(self_stream_, x->posted, 0),
                  "cudaStreamWaitEvent"));
  }
  if (send.bytes > 0) {
    LC_RETURN_IF_ERROR(CheckCuda(
        cudaMemcpyAsync(recv.tensor.raw_data(), send.tensor.raw_data(),
                        send.bytes, cudaMemcpyDeviceToDevice, self_stream_),
        absl::StrCat(t->Describe(), ": cudaMemcpyAsync")));
  }
  for (Transfer* x : {&send, &recv}) {
    LC_RETURN_IF_ERROR(
        CheckCuda(cudaEventRecord(x->done, self_stream_), "cudaEventRecord"));
    x->done_recorded = true;
  }
  in_flight_.push_back(t);
  in_flight_.push_back(partner);
  return absl::OkStatus();
}

absl::StatusOr<bool> RankState::IssueStepLocked(Lane& lane, Transfer& t) {
  const int step = t.steps_issued++;
  void* header = DeviceHeader(t.slot);
  const std::string what = absl::StrCat(t.Describe(), ": step ", step);
  // Every message is its header, then (unless empty) its data. A receive
  // copies the header to the host before receiving the data, so a timed-out
  // receive can still tell a mismatch from a missing sender.
  const int last_step = t.is_send ? 1 : 2;
  if (step == last_step) {
    LC_RETURN_IF_ERROR(CheckCuda(cudaEventRecord(t.done, lane.stream), what));
    t.done_recorded = true;
    return false;
  }
  ncclResult_t result = ncclSuccess;
  if (step == 0) {
    LC_RETURN_IF_ERROR(
        CheckCuda(cudaStreamWaitEvent(lane.stream, t.posted, 0), what));
  }
  if (t.is_send) {
    LC_RETURN_IF_ERROR(
        CheckCuda(cudaMemcpyAsync(header, HostHeader(t.slot), kDescriptorBytes,
                                  cudaMemcpyHostToDevice, lane.stream),
                  what));
    result = ncclGroupStart();
    if (result == ncclSuccess) {
      result = ncclSend(header, kDescriptorBytes, ncclUint8, t.peer, lane.comm,
                        lane.stream);
    }
    if (result == ncclSuccess && t.bytes > 0) {
      result = ncclSend(t.tensor.raw_data(), t.bytes, ncclUint8, t.peer,
                        lane.comm, lane.stream);
    }
    const ncclResult_t ended = ncclGroupEnd();
    if (result == ncclSuccess) result = ended;
  } else if (step == 0) {
    result = ncclRecv(header, kDescriptorBytes, ncclUint8, t.peer, lane.comm,
                      lane.stream);
  } else {
    LC_RETURN_IF_ERROR(
        CheckCuda(cudaMemcpyAsync(HostHeader(t.slot), header, kDescriptorBytes,
                                  cudaMemcpyDeviceToHost, lane.stream),
                  what));
    LC_RETURN_IF_ERROR(
        CheckCuda(cudaEventRecord(t.header_copied, lane.stream), what));
    if (t.bytes > 0) {
      result = ncclRecv(t.tensor.raw_data(), t.bytes, ncclUint8, t.peer,
                        lane.comm, lane.stream);
    }
  }
  if (result == ncclInProgress) return true;
  if (result != ncclSuccess) return NcclFailure(result, what);
  return false;
}

absl::Status RankState::ProgressLaneLocked(Lane& lane) {
  LC_ASSIGN_OR_RETURN(
      const bool idle,
      NcclReady(lane.comm,
                absl::StrCat("rank ", rank_, ": the NCCL communicator of rank ",
                             lane.owner, "'s sends")));
  if (!idle) return absl::OkStatus();
  while (!lane.unissued.empty()) {
    Transfer& t = *lane.unissued.front();
    while (!t.done_recorded) {
      LC_ASSIGN_OR_RETURN(const bool pending, IssueStepLocked(lane, t));
      if (pending) return absl::OkStatus();
    }
    in_flight_.push_back(std::move(lane.unissued.front()));
    lane.unissued.pop_front();
  }
  return absl::OkStatus();
}

std::string RankState::MismatchMessage(const Transfer& t,
                                       const Descriptor& got) const {
  return absl::StrCat(
      t.Describe(), ": rank ", t.peer, " sent ", DescriptorTensor(got),
      " with tag ", got.op, " but this receive expects ",
      DescriptorTensor(t.descriptor), " with tag ", t.tag,
      " (messages between two ranks match in posting order, whatever their "
      "tags: post them in the same order on both ranks); the communicator is "
      "aborted");
}

void RankState::FinishLocked(Transfer& t) {
  t.finished = true;
  t.status = absl::OkStatus();
  if (t.slot >= 0) {
    if (!t.is_send) {
      Descriptor got;
      std::memcpy(&got, HostHeader(t.slot), kDescriptorBytes);
      if (!SameDescriptor(got, t.descriptor)) {
        t.status = absl::InvalidArgumentError(MismatchMessage(t, got));
      }
    }
    free_slots_.push_back(t.slot);
    t.slot = -1;
  }
  if (!t.status.ok()) return;
  if (t.is_send) {
    stats_.bytes_sent += t.bytes;
    stats_.messages_sent += 1;
  } else {
    stats_.bytes_received += t.bytes;
    stats_.messages_received += 1;
  }
}

absl::Status RankState::ProgressLocked() {
  for (Lane& lane : lanes_) LC_RETURN_IF_ERROR(ProgressLaneLocked(lane));
  for (auto it = in_flight_.begin(); it != in_flight_.end();) {
    Transfer& t = **it;
    const cudaError_t query = cudaEventQuery(t.done);
    if (query == cudaErrorNotReady) {
      ++it;
      continue;
    }
    if (query != cudaSuccess) return CudaFailure(query, t.Describe());
    FinishLocked(t);
    retired_.push_back(std::move(*it));
    it = in_flight_.erase(it);
    if (!t.status.ok()) return t.status;
  }
  return absl::OkStatus();
}

absl::Status RankState::TimeoutLocked(const Transfer& t) {
  if (!t.is_send && t.slot >= 0 && t.steps_issued >= 2 &&
      cudaEventQuery(t.header_copied) == cudaSuccess) {
    Descriptor got;
    std::memcpy(&got, HostHeader(t.slot), kDescriptorBytes);
    if (!SameDescriptor(got, t.descriptor)) {
      return absl::InvalidArgumentError(MismatchMessage(t, got));
    }
  }
  const char* partner = t.is_send ? "Recv" : "Send";
  return absl::DeadlineExceededError(
      absl::StrCat(t.Describe(), ": ", DescribeTensor(t.tensor),
                   " did not complete within ", timeout_.count(),
                   " ms (did rank ", t.peer, " fail, or not post the matching ",
                   partner, "?); the communicator is aborted"));
}

absl::Status RankState::Wait(const std::shared_ptr<Transfer>& transfer) {
  const Clock::time_point deadline = Clock::now() + timeout_;
  const absl::Status status = PollUntil(
      deadline, transfer->Describe(),
      [&]() -> absl::StatusOr<bool> { return transfer->finished; },
      // PollUntil calls both with mu_ held.
      [&]()
          ABSL_NO_THREAD_SAFETY_ANALYSIS { return TimeoutLocked(*transfer); });
  absl::MutexLock lock(&mu_);
  return transfer->finished ? transfer->status : status;
}

}  // namespace distributed_internal
}  // namespace lc
