// The NCCL backend of the communicator: one rank per CUDA device, on
// contiguous CUDA tensors of the communicator's device (float32, float64,
// bfloat16, int64, uint8). Two ways to start k ranks: RunNcclRanks (k threads
// of one process, rank i on device i) and CreateNcclCommunicatorFromEnv (one
// process per rank, started by a torchrun-style launcher; rank 0 hands the
// NCCL unique id to the others through tcp_rendezvous.h).
//
// Multi-GPU runs in this workplace keep NVLink SHARP (multicast) off: set
// NCCL_NVLS_ENABLE=0 in the environment of every run that uses this backend.
//
// Point-to-point: NCCL runs the operations of one NCCL communicator one after
// another, so a Send and a Recv posted separately on one NCCL communicator
// deadlock in a ring once messages outgrow NCCL's buffers (every rank's send
// waits for a receive queued behind its neighbour's send). Instead, the sends
// of rank j travel on an NCCL communicator of their own (split from the main
// one at construction, with its own high-priority CUDA stream): rank j only
// sends on it and every other rank only receives from j on it, so any order
// of posted Sends and Recvs completes as soon as its partners are posted.
// Send and Recv return at once (they never wait for the peer): compute
// launched after them overlaps the transfer. A transfer to the rank itself
// is a device-to-device copy matched by tag on this rank.
//
// Matching: NCCL has no tags, so messages between two ranks match in the
// order they were posted, whatever their tags: post them in the same order on
// both sides (the ring exchange does). Every message carries a 128-byte
// header (tag, dtype, shape) that the receiver checks when it arrives: a tag,
// shape or dtype mismatch is InvalidArgument on the receiving rank, and
// aborts its communicator (the sending rank's later calls then time out, or
// are aborted by RunNcclRanks).
//
// Streams: a transfer or collective first waits (on the GPU) for the work
// already queued on the calling thread's current stream of the device
// (CurrentCudaStream, where the core launches its kernels) when it is
// posted; Work::Wait and the collectives return once the data is in place,
// so later work on any stream may use it. Caution: the caching CUDA
// allocator returns memory to the driver (cudaFree, after synchronizing the
// device) when an allocation runs out of memory or on EmptyCudaCache, which
// waits for every transfer in flight; such a release between a Send and the
// Recv that its peer's Send waits for would deadlock the ring outside any
// timeout, so post all of a step's Sends and Recvs before allocating more.
//
// Collectives run on the main NCCL communicator. Each first all-gathers a
// 128-byte description of every rank's call (collective, dtype, shape, root),
// so ranks that call different collectives or pass different tensors all get
// InvalidArgument naming every rank's call, instead of corrupt data or a hang;
// Barrier is that exchange alone. AllReduceSum is NCCL's sum (the same result
// on every rank; not bit-identical to the threads backend's float64 sums) and,
// like the threads backend, refuses uint8.
//
// Waiting: Work::Wait and every collective wait at most the timeout (from
// the call), polling the operation's CUDA event and the NCCL error state;
// past the timeout the rank's NCCL communicators are aborted (ncclCommAbort)
// and the call returns DeadlineExceeded. The call that detects a failure
// returns it; every later call on the rank returns Aborted carrying it.
// Abort(reason) aborts this rank's NCCL communicators; RunNcclRanks aborts
// every rank of the process as soon as one fails, while separate processes
// see a failed peer as a DeadlineExceeded.
//
// Stats count like the threads backend: a completed point-to-point transfer
// counts one message and its bytes on each side; AllReduceSum and AllGather
// count size - 1 messages of the rank's tensor (AllGather: its input) sent
// and received; Broadcast counts size - 1 messages sent on the root and one
// received elsewhere; Barrier and failed operations count nothing.
//
// Thread safety: a rank's Communicator and its Works may be used from any
// thread (calls are serialized); Abort and stats may be called at any time.
#ifndef LONGCTX_DISTRIBUTED_NCCL_COMMUNICATOR_H_
#define LONGCTX_DISTRIBUTED_NCCL_COMMUNICATOR_H_

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "distributed/communicator.h"

namespace lc {

inline constexpr int kNcclUniqueIdBytes = 128;

// The bytes of an ncclUniqueId: made by one rank, given to every rank of the
// group (over the rendezvous, or shared by threads).
class NcclUniqueId {
 public:
  // InvalidArgument unless `bytes` has exactly kNcclUniqueIdBytes bytes.
  static absl::StatusOr<NcclUniqueId> FromBytes(absl::string_view bytes);
  const std::string& bytes() const { return bytes_; }

 private:
  explicit NcclUniqueId(std::string bytes) : bytes_(std::move(bytes)) {}
  std::string bytes_;
};

// A fresh unique id (ncclGetUniqueId; needs no GPU).
absl::StatusOr<NcclUniqueId> NewNcclUniqueId();

// Joins rank `rank` of `size` (>= 1) on CUDA device `device`, waiting at most
// `timeout` (> 0) for the other ranks to join; the same timeout bounds every
// later call. FailedPrecondition when the device does not exist,
// InvalidArgument for bad arguments, DeadlineExceeded when some rank does not
// join in time. Every rank must call it concurrently (threads or processes).
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(
    int rank, int size, int device, const NcclUniqueId& id,
    std::chrono::milliseconds timeout);

// One process per rank: reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
// LOCAL_RANK (the device; default RANK) as torchrun sets them, exchanges the
// unique id over TCP (rank 0 serves it on MASTER_PORT) and joins. Each of the
// two phases waits at most `timeout`. Errors name the variable at fault.
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicatorFromEnv(
    std::chrono::milliseconds timeout);

// Runs fn(communicator of rank i) on k threads of this process, rank i on
// CUDA device i, and joins them. An lc::Error thrown by fn becomes its
// Status, any other exception an Internal error with its what(). As soon as
// a rank fails (joining or in fn), every other rank is aborted. Returns OK
// when every rank succeeded, else the first failure in time prefixed with
// "rank i: ". FailedPrecondition when the machine has fewer than k devices.
absl::Status RunNcclRanks(
    int k, const std::function<absl::Status(Communicator&)>& fn,
    std::chrono::milliseconds timeout = std::chrono::milliseconds(60000));

}  // namespace lc

#endif  // LONGCTX_DISTRIBUTED_NCCL_COMMUNICATOR_H_
