// Helpers that both communicator backends (thread_communicator.cc and the
// NCCL backend) share, so that they name collectives, tensors and transfers,
// check arguments, word their mismatch errors and count statistics the same
// way. Internal to distributed/.
#ifndef LONGCTX_DISTRIBUTED_COMMUNICATOR_UTIL_H_
#define LONGCTX_DISTRIBUTED_COMMUNICATOR_UTIL_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/tensor.h"
#include "distributed/communicator.h"

namespace lc {
namespace distributed_internal {

// The NCCL backend sends a collective's kind to the other ranks as an
// int64_t.
enum class CollectiveKind : int64_t {
  kAllReduceSum,
  kAllGather,
  kBroadcast,
  kBarrier
};

// "AllReduceSum"; "collective #7" for a value that names no kind (an NCCL
// rank's corrupt description).
std::string CollectiveName(CollectiveKind kind);

// "AllReduceSum (collective #3) on rank 1": the prefix of a collective's
// errors; `number` counts the rank's collectives from 0.
std::string CollectiveLabel(CollectiveKind kind, int64_t number, int rank);

int64_t ByteSize(const Tensor& t);

// "[2, 3] float32 (24 bytes)".
std::string DescribeTensor(const Tensor& t);

// "Send from rank 0 to rank 1 (tag 3)" or "Recv on rank 1 from rank 0
// (tag 3)".
std::string DescribeTransfer(bool is_send, int rank, int peer, int tag);

// InvalidArgument "<what> is undefined" unless `t` is defined.
absl::Status CheckDefined(const std::string& what, const Tensor& t);
// InvalidArgument naming `what` and the strides unless `t` is contiguous.
absl::Status CheckContiguous(const std::string& what, const Tensor& t);

// Why a matched Send and Recv fail: their tensors' shapes or dtypes differ.
std::string SendRecvMismatch(const Tensor& sent, const Tensor& received);

// "rank 0 <describe(calls[0])>, rank 1 <describe(calls[1])>, ...": every
// rank's part of a collective, `calls` indexed by rank.
template <typename Call, typename Describe>
std::string PerRank(const std::vector<Call>& calls, const Describe& describe) {
  std::vector<std::string> parts;
  for (size_t r = 0; r < calls.size(); ++r) {
    parts.push_back(absl::StrCat("rank ", r, " ", describe(calls[r])));
  }
  return absl::StrJoin(parts, ", ");
}

// Why a collective fails when its ranks disagree, naming every rank's part:
// `kind`, `root` and `tensor` read a rank's call (its CollectiveKind, its root,
// its tensor as the backend describes it).
template <typename Call, typename KindOf>
std::string DifferentCollectives(const std::vector<Call>& calls,
                                 const KindOf& kind) {
  return absl::StrCat(
      "the ranks called different collectives: ",
      PerRank(calls,
              [&](const Call& call) { return CollectiveName(kind(call)); }),
      " (expected every rank to call the same collectives in the same "
      "order)");
}
template <typename Call, typename RootOf>
std::string DifferentRoots(const std::vector<Call>& calls, const RootOf& root) {
  return absl::StrCat("the ranks name different roots: ",
                      PerRank(calls,
                              [&](const Call& call) {
                                return absl::StrCat("root ", root(call));
                              }),
                      " (expected one root)");
}
template <typename Call, typename TensorOf>
std::string DifferentTensors(const std::vector<Call>& calls,
                             const TensorOf& tensor) {
  return absl::StrCat(
      "the tensors differ across ranks: ", PerRank(calls, tensor),
      " (expected one shape and dtype on every rank)");
}

// Adds to `stats` (rank `rank`'s of `size`) a completed collective other
// than Barrier, of `bytes`-byte tensors, counted as the backends document:
// Broadcast sends size - 1 messages on the root and receives one elsewhere;
// AllReduceSum and AllGather send and receive size - 1 messages each.
void CountCollective(CollectiveKind kind, int64_t bytes, int size, int rank,
                     int root, CommStats& stats);

// The status of fn on one rank, with exceptions turned into errors.
absl::Status CallRank(const std::function<absl::Status(Communicator&)>& fn,
                      Communicator& communicator);

}  // namespace distributed_internal
}  // namespace lc

#endif  // LONGCTX_DISTRIBUTED_COMMUNICATOR_UTIL_H_
