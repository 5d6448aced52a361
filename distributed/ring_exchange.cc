#include "distributed/ring_exchange.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status.h"

namespace lc {

RingExchange::RingExchange(Communicator& comm, int members, int first_tag)
    : comm_(comm), members_(members), first_tag_(first_tag) {
  LC_REQUIRE(members >= 1, "RingExchange: ", members,
             " members per bundle (expected >= 1)");
  for (std::vector<Tensor>& slot : slots_) slot.resize(members);
}

RingExchange::~RingExchange() {
  if (pending_.empty()) return;
  comm_.Abort(absl::AbortedError(
      absl::StrCat("rank ", comm_.rank(),
                   " left a ring exchange with transfers in flight")));
  for (std::unique_ptr<Work>& work : pending_) work->Wait().IgnoreError();
}

absl::StatusOr<std::vector<Tensor>> RingExchange::Post(
    const std::vector<Tensor>& send, const std::vector<TensorSpec>& receive) {
  const int size = comm_.size(), rank = comm_.rank();
  return PostPeers(send, (rank + 1) % size, receive, (rank + size - 1) % size);
}

absl::StatusOr<std::vector<Tensor>> RingExchange::PostPeers(
    const std::vector<Tensor>& send, int dst,
    const std::vector<TensorSpec>& receive, int src) {
  const auto members = static_cast<size_t>(members_);
  if ((!send.empty() && send.size() != members) ||
      (!receive.empty() && receive.size() != members)) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("RingExchange on rank ", comm_.rank(), ": a step sends ",
                     send.size(), " and receives ", receive.size(),
                     " tensors (expected ", members_, " or none)")));
  }
  std::vector<Tensor> received;
  if (!receive.empty()) {
    std::vector<Tensor>& slot = slots_[next_slot_];
    next_slot_ ^= 1;
    for (size_t i = 0; i < members; ++i) {
      const TensorSpec& spec = receive[i];
      const int64_t numel = NumElements(spec.shape);
      Tensor& buffer = slot[i];
      if (!buffer.defined() || buffer.numel() < numel ||
          buffer.dtype() != spec.dtype || buffer.device() != spec.device) {
        buffer = Tensor();  // free the old buffer before allocating
        buffer = Empty({numel}, spec.dtype, spec.device);
      }
      received.push_back(buffer.slice(0, 0, numel).view(spec.shape));
    }
  }
  absl::Status status = comm_.StartBatch();
  if (!status.ok()) return Fail(status);
  for (size_t i = 0; i < send.size() && status.ok(); ++i) {
    absl::StatusOr<std::unique_ptr<Work>> work =
        comm_.Send(send[i], dst, first_tag_ + static_cast<int>(i));
    if (!work.ok()) {
      status = work.status();
      break;
    }
    pending_.push_back(*std::move(work));
    ++tensors_sent_;
    bytes_sent_ += send[i].numel() * DTypeSize(send[i].dtype());
  }
  for (size_t i = 0; i < received.size() && status.ok(); ++i) {
    absl::StatusOr<std::unique_ptr<Work>> work =
        comm_.Recv(received[i], src, first_tag_ + static_cast<int>(i));
    if (!work.ok()) {
      status = work.status();
      break;
    }
    pending_.push_back(*std::move(work));
  }
  // The batch is closed even after a failed post (an open NCCL group would
  // hang the next call).
  const absl::Status ended = comm_.EndBatch();
  if (status.ok()) status = ended;
  if (!status.ok()) return Fail(status);
  return received;
}

absl::Status RingExchange::Wait() {
  absl::Status first;
  for (std::unique_ptr<Work>& work : pending_) {
    const absl::Status status = work->Wait();
    if (!status.ok() && first.ok()) {
      first = status;
      // The remaining transfers (here and on the other ranks) end at once
      // instead of each waiting out the timeout.
      comm_.Abort(first);
    }
  }
  pending_.clear();
  return first;
}

absl::Status RingExchange::Fail(absl::Status status) {
  comm_.Abort(status);
  for (std::unique_ptr<Work>& work : pending_) work->Wait().IgnoreError();
  pending_.clear();
  return status;
}

}  // namespace lc
