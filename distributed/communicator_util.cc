#include "distributed/communicator_util.h"

#include <exception>

#include "absl/strings/str_cat.h"
#include "core/shape.h"
#include "core/status.h"

namespace lc {
namespace distributed_internal {

std::string CollectiveName(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kAllReduceSum:
      return "AllReduceSum";
    case CollectiveKind::kAllGather:
      return "AllGather";
    case CollectiveKind::kBroadcast:
      return "Broadcast";
    case CollectiveKind::kBarrier:
      return "Barrier";
  }
  return absl::StrCat("collective #", static_cast<int64_t>(kind));
}

std::string CollectiveLabel(CollectiveKind kind, int64_t number, int rank) {
  return absl::StrCat(CollectiveName(kind), " (collective #", number,
                      ") on rank ", rank);
}

int64_t ByteSize(const Tensor& t) { return t.numel() * DTypeSize(t.dtype()); }

std::string DescribeTensor(const Tensor& t) {
  return absl::StrCat(ShapeToString(t.shape()), " ", DTypeName(t.dtype()), " (",
                      ByteSize(t), " bytes)");
}

std::string DescribeTransfer(bool is_send, int rank, int peer, int tag) {
  return is_send ? absl::StrCat("Send from rank ", rank, " to rank ", peer,
                                " (tag ", tag, ")")
                 : absl::StrCat("Recv on rank ", rank, " from rank ", peer,
                                " (tag ", tag, ")");
}

absl::Status CheckDefined(const std::string& what, const Tensor& t) {
  if (!t.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is undefined"));
  }
  return absl::OkStatus();
}

absl::Status CheckContiguous(const std::string& what, const Tensor& t) {
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " ", DescribeTensor(t), " has strides ",
        ShapeToString(t.strides()),
        " (expected a contiguous tensor; call contiguous() first)"));
  }
  return absl::OkStatus();
}

std::string SendRecvMismatch(const Tensor& sent, const Tensor& received) {
  return absl::StrCat("the sent tensor ", DescribeTensor(sent),
                      " does not match the receive tensor ",
                      DescribeTensor(received),
                      " (expected the same shape and dtype)");
}

void CountCollective(CollectiveKind kind, int64_t bytes, int size, int rank,
                     int root, CommStats& stats) {
  const int64_t peers = size - 1;
  if (kind == CollectiveKind::kBroadcast) {
    if (rank == root) {
      stats.bytes_sent += peers * bytes;
      stats.messages_sent += peers;
    } else {
      stats.bytes_received += bytes;
      stats.messages_received += 1;
    }
    return;
  }
  stats.bytes_sent += peers * bytes;
  stats.messages_sent += peers;
  stats.bytes_received += peers * bytes;
  stats.messages_received += peers;
}

absl::Status CallRank(const std::function<absl::Status(Communicator&)>& fn,
                      Communicator& communicator) {
  try {
    return fn(communicator);
  } catch (const Error& e) {
    return e.status();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("uncaught exception: ", e.what()));
  } catch (...) {
    return absl::InternalError("uncaught exception of a non-std type");
  }
}

}  // namespace distributed_internal
}  // namespace lc
