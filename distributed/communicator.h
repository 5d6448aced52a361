// The communicator interface of the distributed runtime: a rank's view of a
// group of `size` ranks, with asynchronous point-to-point transfers (what the
// attention ring uses) and blocking collectives (gradient all-reduce). Every
// call returns a Status; a transfer that does not complete within the
// communicator's timeout, or a group aborted because some rank failed, is an
// error on every rank rather than a hang. Backends: threads of one process
// (thread_communicator.h) and NCCL (nccl_communicator.h).
#ifndef LONGCTX_DISTRIBUTED_COMMUNICATOR_H_
#define LONGCTX_DISTRIBUTED_COMMUNICATOR_H_

#include <chrono>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace lc {

// Completion of an asynchronous transfer.
class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the transfer is done: OK, or an error when it failed, timed
  // out (DeadlineExceeded) or the group was aborted (Aborted). For CUDA
  // tensors "done" is stream-ordered, as for every CUDA op: work queued
  // afterwards on the calling thread's current stream of the tensor's device
  // follows the transfer (a backend may return before the GPU has finished
  // it; the threads backend does).
  virtual absl::Status Wait() = 0;
};

// Bytes and messages this rank has moved since the last reset.
struct CommStats {
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
  int64_t messages_sent = 0;
  int64_t messages_received = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Starts sending `tensor` (contiguous; it must stay unchanged until the
  // Work completes) to rank `dst`. Sends and receives between a pair of
  // ranks match in the order they were posted, per `tag`.
  virtual absl::StatusOr<std::unique_ptr<Work>> Send(const Tensor& tensor,
                                                     int dst, int tag = 0) = 0;
  // Starts receiving into `tensor` (contiguous, of the shape and dtype the
  // sender sends; a mismatch is an error) from rank `src`.
  virtual absl::StatusOr<std::unique_ptr<Work>> Recv(const Tensor& tensor,
                                                     int src, int tag = 0) = 0;

  // Transfers posted between StartBatch() and EndBatch() are issued as one
  // group (on NCCL one ncclGroupStart/ncclGroupEnd), so that, for example, a
  // ring's send to the next rank and receive from the previous one cannot
  // deadlock whatever order the ranks post them in. Backends whose posts
  // never block need not override these.
  virtual absl::Status StartBatch() { return absl::OkStatus(); }
  virtual absl::Status EndBatch() { return absl::OkStatus(); }

  // Collectives, blocking, in place; every rank calls them in the same order
  // with tensors of the same shape and dtype (a mismatch is an error on every
  // rank). For CUDA tensors blocking is stream-ordered as for Work::Wait.
  virtual absl::Status AllReduceSum(const Tensor& tensor) = 0;
  // output [size, ...input shape] receives every rank's input, by rank.
  virtual absl::Status AllGather(const Tensor& input, const Tensor& output) = 0;
  virtual absl::Status Broadcast(const Tensor& tensor, int root) = 0;
  virtual absl::Status Barrier() = 0;

  // Fails the group: every pending and later call on every rank returns an
  // Aborted error carrying `reason`.
  virtual void Abort(const absl::Status& reason) = 0;

  virtual CommStats stats() const = 0;
  virtual void ResetStats() = 0;
};

}  // namespace lc

#endif  // LONGCTX_DISTRIBUTED_COMMUNICATOR_H_
