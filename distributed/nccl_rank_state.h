// The NCCL backend's per-rank state (RankState), shared by a rank's
// Communicator and its Works, and what it is built from: the transfers
// (Transfer), the lanes that carry each rank's sends (Lane), a device guard
// and the polling backoff. RankState's methods live with their concern:
// nccl_bootstrap.cc joins the group (Init), nccl_transport.cc moves the
// point-to-point messages (header protocol, lanes, progress engine),
// nccl_collectives.cc runs the collectives, and nccl_rank_state.cc holds what
// they share (argument checks, polling, aborting, teardown). Internal to
// distributed/.
#ifndef LONGCTX_DISTRIBUTED_NCCL_RANK_STATE_H_
#define LONGCTX_DISTRIBUTED_NCCL_RANK_STATE_H_

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/tensor.h"
#include "distributed/communicator.h"
#include "distributed/communicator_util.h"
#include "distributed/nccl_communicator.h"
#include "distributed/nccl_descriptor.h"

namespace lc {
namespace distributed_internal {

using Clock = std::chrono::steady_clock;

// Point-to-point transfers with other ranks that may be in flight on one rank
// at once: each holds a header slot until it completes.
constexpr int kHeaderSlots = 1024;
// Polling: yield this many times, then sleep between polls.
constexpr int kSpinPolls = 1000;
constexpr std::chrono::microseconds kPollSleep{50};

// Makes `device` current on this thread for its lifetime.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    cudaSetDevice(device);
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Spins briefly, then sleeps: polls stay cheap on short waits and idle on
// long ones.
class Backoff {
 public:
  void Pause() {
    if (++polls_ <= kSpinPolls) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(kPollSleep);
    }
  }

 private:
  int polls_ = 0;
};

// One Send or Recv.
struct Transfer {
  ~Transfer() {
    DeviceGuard guard(device);
    for (cudaEvent_t event : {posted, header_copied, done}) {
      if (event != nullptr) cudaEventDestroy(event);
    }
  }

  std::string Describe() const {
    return DescribeTransfer(is_send, rank, peer, tag);
  }

  bool is_send = false;
  int rank = 0;
  int peer = 0;
  int tag = 0;
  int device = 0;
  Tensor tensor;  // detached; keeps the buffer alive until the transfer ends
  Descriptor descriptor;  // this side's tag, dtype and shape
  int64_t bytes = 0;
  int slot = -1;  // header slot (transfers with another rank)
  // Steps of the transfer put on its stream so far (see IssueStepLocked).
  int steps_issued = 0;
  cudaEvent_t posted = nullptr;         // the default stream's work at post
  cudaEvent_t header_copied = nullptr;  // a receive's header is on the host
  cudaEvent_t done = nullptr;
  bool done_recorded = false;
  bool finished = false;
  absl::Status status;  // once finished
};

// The NCCL communicator that carries one rank's sends, with its stream.
struct Lane {
  int owner = 0;  // the sending rank
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  // Transfers on this lane not yet wholly on the stream, in posting order.
  std::deque<std::shared_ptr<Transfer>> unissued;
};

// Everything a rank owns, shared by its Communicator and its Works (a Work
// may outlive the Communicator; it then reports Aborted).
class RankState {
 public:
  RankState(int rank, int size, int device, std::chrono::milliseconds timeout)
      : rank_(rank), size_(size), device_(device), timeout_(timeout) {}
  ~RankState();

  // Joins the group and creates the streams, lanes and buffers. `cancelled`
  // (may be null) stops the wait early when set.
  absl::Status Init(const NcclUniqueId& id, const std::atomic<bool>* cancelled);

  int rank() const { return rank_; }
  int size() const { return size_; }

  absl::StatusOr<std::shared_ptr<Transfer>> Post(bool is_send,
                                                 const Tensor& tensor, int peer,
                                                 int tag);
  absl::Status Wait(const std::shared_ptr<Transfer>& transfer);
  // `tensor`: AllReduceSum's and Broadcast's tensor, AllGather's input;
  // `output`: AllGather's output.
  absl::Status Collective(CollectiveKind kind, const Tensor& tensor,
                          const Tensor& output, int root);
  void Abort(const absl::Status& reason);

  CommStats stats() const {
    absl::MutexLock lock(&mu_);
    return stats_;
  }
  void ResetStats() {
    absl::MutexLock lock(&mu_);
    stats_ = CommStats();
  }

 private:
  using Ready = std::function<absl::StatusOr<bool>()>;

  // InvalidArgument, prefixed by `what`, unless `t` is a contiguous tensor of
  // this rank's device with at most kMaxDims dimensions.
  absl::Status CheckTensor(const std::string& what, const Tensor& t) const;
  absl::Status CheckCollective(CollectiveKind kind, const Tensor& tensor,
                               const Tensor& output, int root) const;
  // This thread's current stream of the rank's device (CurrentCudaStream),
  // where the tensors' producers and readers run.
  absl::StatusOr<cudaStream_t> CallerStream(const std::string& what) const;
  // Waits for an NCCL communicator being created (init or split).
  absl::Status WaitForComm(ncclComm_t comm, Clock::time_point deadline,
                           const std::atomic<bool>* cancelled,
                           const std::string& what) const;

  absl::Status PostToSelfLocked(const std::shared_ptr<Transfer>& t)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Puts the lane's unissued transfers on its stream as far as NCCL allows.
  absl::Status ProgressLaneLocked(Lane& lane)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Puts the next step of `t` on the lane's stream; true when NCCL took the
  // call asynchronously (ncclInProgress: the next step must wait).
  absl::StatusOr<bool> IssueStepLocked(Lane& lane, Transfer& t)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Advances every lane and completes the transfers whose data arrived. A
  // header mismatch is returned as an error (the communicator cannot go on).
  absl::Status ProgressLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FinishLocked(Transfer& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status TimeoutLocked(const Transfer& t)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string MismatchMessage(const Transfer& t, const Descriptor& got) const;

  // Polls `ready` (with mu_ held, never after an abort) until it returns
  // true, advancing the transfers meanwhile. The failure it detects, or
  // `on_timeout()` past the deadline, aborts the rank and is returned;
  // after an abort (by anyone) it returns Aborted.
  absl::Status PollUntil(Clock::time_point deadline, const std::string& what,
                         const Ready& ready,
                         const std::function<absl::Status()>& on_timeout)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Runs `launch` (NCCL calls on the main communicator), then `after` (CUDA
  // work on its stream, may be null) once NCCL took the calls, and waits for
  // all of it to finish.
  absl::Status RunOnMain(
      Clock::time_point deadline, const std::string& what,
      const std::function<absl::StatusOr<ncclResult_t>()>& launch,
      const std::function<absl::Status()>& after) ABSL_LOCKS_EXCLUDED(mu_);

  void AbortLocked(const absl::Status& reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status AbortedLocked(const std::string& what) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Destroys the retired transfers, outside mu_.
  void ReleaseRetired() ABSL_LOCKS_EXCLUDED(mu_);
  // Declared before a MutexLock on mu_, runs ReleaseRetired once that lock
  // is released.
  class ReleaseRetiredOnExit {
   public:
    explicit ReleaseRetiredOnExit(RankState* state) : state_(state) {}
    ~ReleaseRetiredOnExit() { state_->ReleaseRetired(); }
    ReleaseRetiredOnExit(const ReleaseRetiredOnExit&) = delete;
    ReleaseRetiredOnExit& operator=(const ReleaseRetiredOnExit&) = delete;

   private:
    RankState* state_;
  };

  char* HostHeader(int slot) const {
    return header_host_ + slot * kDescriptorBytes;
  }
  char* DeviceHeader(int slot) const {
    return header_device_ + slot * kDescriptorBytes;
  }

  const int rank_;
  const int size_;
  const int device_;
  const std::chrono::milliseconds timeout_;

  // Held for a whole collective: the description buffers are its own.
  absl::Mutex collective_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  int64_t collectives_ ABSL_GUARDED_BY(collective_mu_) = 0;

  mutable absl::Mutex mu_;
  bool aborted_ ABSL_GUARDED_BY(mu_) = false;
  std::string abort_reason_ ABSL_GUARDED_BY(mu_);
  ncclComm_t main_ ABSL_GUARDED_BY(mu_) = nullptr;  // collectives
  cudaStream_t main_stream_ = nullptr;
  cudaStream_t self_stream_ = nullptr;  // copies to this rank itself
  cudaEvent_t collective_posted_ = nullptr;
  cudaEvent_t collective_done_ = nullptr;
  // Lane j carries rank j's sends (empty for size 1).
  std::vector<Lane> lanes_ ABSL_GUARDED_BY(mu_);
  // Unmatched transfers to this rank itself, by tag.
  std::map<int, std::deque<std::shared_ptr<Transfer>>> self_sends_
      ABSL_GUARDED_BY(mu_);
  std::map<int, std::deque<std::shared_ptr<Transfer>>> self_recvs_
      ABSL_GUARDED_BY(mu_);
  // Transfers wholly on their streams, not yet seen complete.
  std::list<std::shared_ptr<Transfer>> in_flight_ ABSL_GUARDED_BY(mu_);
  // Transfers this rank is done with. Dropping one may free its tensor's
  // buffer, and a free may end in a device-wide synchronize (the allocator
  // releasing memory; transfers that wait for a peer included): never under
  // mu_, which Abort needs.
  std::vector<std::shared_ptr<Transfer>> retired_ ABSL_GUARDED_BY(mu_);
  // kHeaderSlots descriptors, pinned on the host and on the device.
  char* header_host_ = nullptr;
  char* header_device_ = nullptr;
  std::vector<int> free_slots_ ABSL_GUARDED_BY(mu_);
  // Collective descriptions: size_ received ones, then this rank's own.
  char* exchange_host_ = nullptr;
  char* exchange_device_ = nullptr;
  CommStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace distributed_internal
}  // namespace lc

#endif  // LONGCTX_DISTRIBUTED_NCCL_RANK_STATE_H_
