// The threads backend of the communicator: k ranks as threads of one process,
// for CPU tensors or CUDA tensors (of one device or several). RunRanks is how
// tests and users run a function on k ranks, e.g. k ranks on one GPU.
//
// Point-to-point: a group holds, per (src, dst, tag), FIFO queues of posted
// sends and receives. When a send and a receive match, whichever was posted
// second copies the bytes straight from the send tensor into the receive
// tensor (no staging buffer: each transfer has its own pair of tensors, so
// messages in flight never share memory); both Works complete after the copy.
// As with NCCL and MPI, the send tensor must stay valid and unchanged, and the
// receive tensor unread, until the Work completes. A shape or dtype mismatch,
// or a CPU tensor matched with a CUDA one, fails both sides with
// InvalidArgument naming both tensors.
//
// CUDA tensors: a Send or Recv records an event on the poster's current
// stream (CurrentCudaStream of the tensor's device): the send tensor's
// producers, the receive buffer's last readers. The matching thread queues
// the copy (cudaMemcpyAsync, device to device, between devices a peer copy)
// on a copy stream of the sending rank (one per rank index and receiving
// device, apart from every rank's compute, kept for the life of the
// process), after both events, and records a
// `copied` event; no host thread waits for the GPU. Work::Wait returns once
// the copy is queued and makes the waiting thread's current stream wait for
// it on the device: work queued there afterwards (reading the received
// tensor, overwriting or freeing the sent one) follows the copy, while
// compute queued before it overlaps the copy. The caching allocator is told
// (RecordStream) that both blocks are in use on the copy stream, so neither
// is reused before the copy ends.
//
// Waiting: Work::Wait and every collective wait at most the group's timeout
// for the peers; past it they return DeadlineExceeded naming the op, rank,
// peer and tag (a pending transfer is withdrawn, so a late peer cannot write
// into it). Abort(reason) wakes every waiter on every rank with Aborted
// carrying the reason; every later call returns Aborted too.
//
// Collectives are a rendezvous of all ranks, counted by generation (each
// rank's n-th collective meets the other ranks' n-th). Every rank contributes
// its tensor; the last to arrive checks that all ranks called the same
// collective with matching shapes and dtypes (InvalidArgument on every rank
// naming each rank's tensor otherwise) and computes the result, which each
// rank then copies into its own tensor. A rank that does not arrive within the
// timeout makes the collective fail with DeadlineExceeded on every rank,
// including, when it finally arrives, the late one; later collectives stay
// aligned. AllReduceSum adds in rank order 0, 1, ..., k-1 in float64 for
// floating dtypes (in int64 for int64; uint8 is not supported) and rounds
// once, so the result is bit-identical on every rank and every run, and on
// CUDA to the CPU's.
//
// Collectives of CUDA tensors (every rank's on a CUDA device; a mix of CPU
// and CUDA tensors is InvalidArgument on every rank) stay on the GPU: each
// rank records an event after its tensor's producers; the last rank to
// arrive queues the collective on the collective stream of rank 0's device
// (one per device, kept for the life of the process; inputs of other
// devices are copied there), after every event: the float64
// sum in rank order (int64 sums on the host, after waiting for the inputs),
// the gathered stack or the root's copy. Each rank's current streams (of its
// tensors' devices) then wait for that on the device and copy the result
// into its tensor: the call returns without waiting for the GPU, and work
// the rank queues afterwards sees the result.
//
// Stats: a completed point-to-point transfer counts one message and its bytes
// on the sender (sent) and the receiver (received). Collectives count as a
// direct exchange with every peer: AllReduceSum and AllGather count size - 1
// messages of the rank's tensor (AllGather: its input) both sent and
// received; Broadcast counts size - 1 messages sent on the root and one
// message received on every other rank; Barrier counts nothing. Failed
// operations count nothing.
//
// Thread safety: each rank uses its own Communicator from its own thread, all
// concurrently; Abort and stats may be called from any thread.
#ifndef LONGCTX_DISTRIBUTED_THREAD_COMMUNICATOR_H_
#define LONGCTX_DISTRIBUTED_THREAD_COMMUNICATOR_H_

#include <chrono>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "distributed/communicator.h"

namespace lc {

struct ThreadGroupOptions {
  // How long a Wait or a collective waits for the peers (> 0).
  std::chrono::milliseconds timeout{60000};
};

// The communicators of a new group of `size` ranks (>= 1), by rank. They
// share the group; each may outlive the others. Throws lc::Error for a size
// < 1 or a timeout <= 0.
std::vector<std::unique_ptr<Communicator>> MakeThreadGroup(
    int size, const ThreadGroupOptions& options = {});

// Runs fn(communicator of rank i) on k threads of a new group and joins them.
// An lc::Error thrown by fn becomes its Status, any other exception an
// Internal error with its what(). As soon as a rank fails, the group is
// aborted so the other ranks stop waiting at once. Returns OK when every rank
// succeeded, else the first failure in time (the root cause, not the Aborted
// errors it caused in the others), prefixed with "rank i: ".
absl::Status RunRanks(int k,
                      const std::function<absl::Status(Communicator&)>& fn,
                      const ThreadGroupOptions& options = {});

}  // namespace lc

#endif  // LONGCTX_DISTRIBUTED_THREAD_COMMUNICATOR_H_
