#include "distributed/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "core/cuda.h"
#include "core/shape.h"
#include "core/status.h"
#include "distributed/tcp_rendezvous.h"

namespace lc {
namespace {

using Clock = std::chrono::steady_clock;

static_assert(kNcclUniqueIdBytes == NCCL_UNIQUE_ID_BYTES,
              "kNcclUniqueIdBytes must match nccl.h");

// Point-to-point transfers with other ranks that may be in flight on one rank
// at once: each holds a header slot until it completes.
constexpr int kHeaderSlots = 1024;
// Tensors of at most this many dimensions can be described on the wire.
constexpr int kMaxDims = 12;
// Polling: yield this many times, then sleep between polls.
constexpr int kSpinPolls = 1000;
constexpr std::chrono::microseconds kPollSleep{50};

// What a message carries ahead of its data, and what a rank contributes to
// the exchange that precedes every collective: 128 bytes the other side
// compares with its own.
struct Descriptor {
  int64_t op = 0;     // a message's tag; a collective's CollectiveKind
  int64_t root = 0;   // Broadcast's root
  int64_t dtype = 0;  // a DType, or kInvalidArguments
  int64_t ndim = 0;
  int64_t dims[kMaxDims] = {};
};
constexpr int64_t kDescriptorBytes = sizeof(Descriptor);
static_assert(kDescriptorBytes == 128, "Descriptor must stay 128 bytes");
// A rank whose collective arguments were wrong (it reports why itself).
constexpr int64_t kInvalidArguments = -1;

bool SameDescriptor(const Descriptor& a, const Descriptor& b) {
  return std::memcmp(&a, &b, sizeof(Descriptor)) == 0;
}

// "[2, 3] float32".
std::string DescriptorTensor(const Descriptor& d) {
  const Shape shape(d.dims, d.dims + std::clamp<int64_t>(d.ndim, 0, kMaxDims));
  const bool known =
      d.dtype >= 0 && d.dtype <= static_cast<int64_t>(DType::kUInt8);
  return absl::StrCat(ShapeToString(shape), " ",
                      known ? DTypeName(static_cast<DType>(d.dtype))
                            : absl::StrCat("dtype #", d.dtype));
}

int64_t ByteSize(const Tensor& t) { return t.numel() * DTypeSize(t.dtype()); }

// "[2, 3] float32 (24 bytes)", as the threads backend says it.
std::string DescribeTensor(const Tensor& t) {
  return absl::StrCat(ShapeToString(t.shape()), " ", DTypeName(t.dtype()), " (",
                      ByteSize(t), " bytes)");
}

absl::Status CudaFailure(cudaError_t error, absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorName(error),
                                          " (", cudaGetErrorString(error),
                                          ")"));
}

absl::Status CheckCuda(cudaError_t error, absl::string_view what) {
  return error == cudaSuccess ? absl::OkStatus() : CudaFailure(error, what);
}

absl::Status NcclFailure(ncclResult_t result, absl::string_view what) {
  const absl::StatusCode code =
      result == ncclRemoteError || result == ncclSystemError
          ? absl::StatusCode::kUnavailable
          : absl::StatusCode::kInternal;
  const std::string detail = ncclGetLastError(nullptr);
  return absl::Status(
      code,
      absl::StrCat(what, ": NCCL error: ", ncclGetErrorString(result),
                   detail.empty() ? "" : absl::StrCat(" (", detail, ")")));
}

// OK when the NCCL communicator is idle, false while it still works on the
// last call (ncclInProgress), its error otherwise.
absl::StatusOr<bool> NcclReady(ncclComm_t comm, absl::string_view what) {
  ncclResult_t state = ncclSuccess;
  const ncclResult_t result = ncclCommGetAsyncError(comm, &state);
  if (result != ncclSuccess) return NcclFailure(result, what);
  if (state == ncclInProgress) return false;
  if (state != ncclSuccess) return NcclFailure(state, what);
  return true;
}

ncclDataType_t NcclType(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return ncclFloat32;
    case DType::kFloat64:
      return ncclFloat64;
    case DType::kBFloat16:
      return ncclBfloat16;
    case DType::kInt64:
      return ncclInt64;
    case DType::kUInt8:
      return ncclUint8;
  }
  LC_CHECK(false) << "unknown dtype " << static_cast<int>(dtype);
  return ncclUint8;
}

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

enum class CollectiveKind : int64_t {
  kAllReduceSum,
  kAllGather,
  kBroadcast,
  kBarrier
};

std::string CollectiveName(int64_t kind) {
  switch (static_cast<CollectiveKind>(kind)) {
    case CollectiveKind::kAllReduceSum:
      return "AllReduceSum";
    case CollectiveKind::kAllGather:
      return "AllGather";
    case CollectiveKind::kBroadcast:
      return "Broadcast";
    case CollectiveKind::kBarrier:
      return "Barrier";
  }
  return absl::StrCat("collective #", kind);
}

// One Send or Recv.
struct Transfer {
  ~Transfer() {
    DeviceGuard guard(device);
    for (cudaEvent_t event : {posted, header_copied, done}) {
      if (event != nullptr) cudaEventDestroy(event);
    }
  }

  // "Send from rank 0 to rank 1 (tag 3)" or "Recv on rank 1 from rank 0
  // (tag 3)".
  std::string Describe() const {
    return is_send ? absl::StrCat("Send from rank ", rank, " to rank ", peer,
                                  " (tag ", tag, ")")
                   : absl::StrCat("Recv on rank ", rank, " from rank ", peer,
                                  " (tag ", tag, ")");
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
  void CountCollectiveLocked(CollectiveKind kind, int64_t bytes, int root)
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

absl::Status RankState::WaitForComm(ncclComm_t comm, Clock::time_point deadline,
                                    const std::atomic<bool>* cancelled,
                                    const std::string& what) const {
  Backoff backoff;
  for (;;) {
    LC_ASSIGN_OR_RETURN(const bool ready, NcclReady(comm, what));
    if (ready) return absl::OkStatus();
    if (cancelled != nullptr && cancelled->load()) {
      return absl::AbortedError(
          absl::StrCat(what, ": another rank of this process failed"));
    }
    if (Clock::now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          what, " did not finish within ", timeout_.count(),
          " ms (is every rank started, with the same unique id and world "
          "size?)"));
    }
    backoff.Pause();
  }
}

absl::Status RankState::Init(const NcclUniqueId& id,
                             const std::atomic<bool>* cancelled) {
  absl::MutexLock lock(&mu_);
  DeviceGuard guard(device_);
  const Clock::time_point deadline = Clock::now() + timeout_;
  const std::string who =
      absl::StrCat("rank ", rank_, " of ", size_, " (cuda:", device_, ")");
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every wait below is ours, and bounded
  ncclUniqueId nccl_id;
  std::memcpy(nccl_id.internal, id.bytes().data(), kNcclUniqueIdBytes);
  const std::string joining = absl::StrCat(who, " joining the NCCL group");
  ncclResult_t result =
      ncclCommInitRankConfig(&main_, size_, nccl_id, rank_, &config);
  if (result != ncclSuccess && result != ncclInProgress) {
    return NcclFailure(result, joining);
  }
  LC_RETURN_IF_ERROR(WaitForComm(main_, deadline, cancelled, joining));

  if (size_ > 1) {
    lanes_.resize(size_);
    for (int owner = 0; owner < size_; ++owner) {
      Lane& lane = lanes_[owner];
      lane.owner = owner;
      const std::string splitting = absl::StrCat(
          who, " creating the NCCL communicator for rank ", owner, "'s sends");
      // The split runs as a job of the parent and writes the child's handle
      // when it is done, possibly after a timeout here; so the handle lives
      // on the heap and is leaked (8 bytes) when the split does not finish.
      auto child = std::make_unique<ncclComm_t>(nullptr);
      result = ncclCommSplit(main_, /*color=*/0, /*key=*/rank_, child.get(),
                             &config);
      if (result != ncclSuccess && result != ncclInProgress) {
        return NcclFailure(result, splitting);
      }
      const absl::Status split =
          WaitForComm(main_, deadline, cancelled, splitting);
      if (!split.ok()) {
        child.release();
        return split;
      }
      lane.comm = *child;
      if (lane.comm == nullptr) {
        return absl::InternalError(absl::StrCat(
            splitting, ": ncclCommSplit returned no communicator"));
      }
      LC_RETURN_IF_ERROR(
          WaitForComm(lane.comm, deadline, cancelled, splitting));
    }
  }

  int least_priority = 0;
  int greatest_priority = 0;
  LC_RETURN_IF_ERROR(CheckCuda(
      cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority),
      "cudaDeviceGetStreamPriorityRange"));
  for (Lane& lane : lanes_) {
    LC_RETURN_IF_ERROR(
        CheckCuda(cudaStreamCreateWithPriority(
                      &lane.stream, cudaStreamNonBlocking, greatest_priority),
                  "cudaStreamCreateWithPriority"));
  }
  for (cudaStream_t* stream : {&main_stream_, &self_stream_}) {
    LC_RETURN_IF_ERROR(
        CheckCuda(cudaStreamCreateWithPriority(stream, cudaStreamNonBlocking,
                                               greatest_priority),
                  "cudaStreamCreateWithPriority"));
  }
  for (cudaEvent_t* event : {&collective_posted_, &collective_done_}) {
    LC_RETURN_IF_ERROR(
        CheckCuda(cudaEventCreateWithFlags(event, cudaEventDisableTiming),
                  "cudaEventCreateWithFlags"));
  }
  const size_t header_bytes = kHeaderSlots * kDescriptorBytes;
  const size_t exchange_bytes = (size_ + 1) * kDescriptorBytes;
  LC_RETURN_IF_ERROR(
      CheckCuda(cudaHostAlloc(reinterpret_cast<void**>(&header_host_),
                              header_bytes, cudaHostAllocPortable),
                "cudaHostAlloc"));
  LC_RETURN_IF_ERROR(
      CheckCuda(cudaHostAlloc(reinterpret_cast<void**>(&exchange_host_),
                              exchange_bytes, cudaHostAllocPortable),
                "cudaHostAlloc"));
  LC_RETURN_IF_ERROR(CheckCuda(
      cudaMalloc(reinterpret_cast<void**>(&header_device_), header_bytes),
      "cudaMalloc"));
  LC_RETURN_IF_ERROR(CheckCuda(
      cudaMalloc(reinterpret_cast<void**>(&exchange_device_), exchange_bytes),
      "cudaMalloc"));
  free_slots_.reserve(kHeaderSlots);
  for (int slot = kHeaderSlots - 1; slot >= 0; --slot) {
    free_slots_.push_back(slot);
  }
  return absl::OkStatus();
}

absl::Status RankState::CheckTensor(const std::string& what,
                                    const Tensor& t) const {
  if (!t.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is undefined"));
  }
  if (t.device() != Device::Cuda(device_)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " ", DescribeTensor(t), " is on ", t.device().ToString(),
        " but the NCCL communicator of rank ", rank_, " runs on cuda:", device_,
        " (expected a CUDA tensor of that device; move it with "
        ".to(Device::Cuda(",
        device_, ")))"));
  }
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " ", DescribeTensor(t), " has strides ",
        ShapeToString(t.strides()),
        " (expected a contiguous tensor; call contiguous() first)"));
  }
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

Descriptor Describe(int64_t op, int64_t root, const Tensor& t) {
  Descriptor d;
  d.op = op;
  d.root = root;
  d.dtype = static_cast<int64_t>(t.dtype());
  d.ndim = t.dim();
  for (int64_t i = 0; i < t.dim(); ++i) d.dims[i] = t.size(i);
  return d;
}

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
    const std::string mismatch = absl::StrCat(
        "the sent tensor ", DescribeTensor(send.tensor),
        " does not match the receive tensor ", DescribeTensor(recv.tensor),
        " (expected the same shape and dtype)");
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

absl::Status RankState::RunOnMain(
    Clock::time_point deadline, const std::string& what,
    const std::function<absl::StatusOr<ncclResult_t>()>& launch,
    const std::function<absl::Status()>& after) {
  {
    absl::MutexLock lock(&mu_);
    if (aborted_) return AbortedLocked(what);
    DeviceGuard guard(device_);
    const absl::StatusOr<ncclResult_t> result = launch();
    absl::Status status = result.status();
    if (status.ok() && *result != ncclSuccess && *result != ncclInProgress) {
      status = NcclFailure(*result, what);
    }
    if (!status.ok()) {
      AbortLocked(status);
      return status;
    }
  }
  bool enqueued = false;
  return PollUntil(
      deadline, what,
      // Called with mu_ held.
      [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS -> absl::StatusOr<bool> {
        LC_ASSIGN_OR_RETURN(const bool idle, NcclReady(main_, what));
        if (!enqueued) {
          if (!idle) return false;
          if (after) LC_RETURN_IF_ERROR(after());
          LC_RETURN_IF_ERROR(
              CheckCuda(cudaEventRecord(collective_done_, main_stream_), what));
          enqueued = true;
        }
        const cudaError_t query = cudaEventQuery(collective_done_);
        if (query == cudaErrorNotReady) return false;
        LC_RETURN_IF_ERROR(CheckCuda(query, what));
        return true;
      },
      [&] {
        return absl::DeadlineExceededError(absl::StrCat(
            what, " did not complete within ", timeout_.count(),
            " ms (did a rank fail, or not call it?); the communicator is "
            "aborted"));
      });
}

absl::Status RankState::CheckCollective(CollectiveKind kind,
                                        const Tensor& tensor,
                                        const Tensor& output, int root) const {
  switch (kind) {
    case CollectiveKind::kAllReduceSum:
      LC_RETURN_IF_ERROR(CheckTensor("the tensor", tensor));
      if (tensor.dtype() == DType::kUInt8) {
        return absl::InvalidArgumentError(
            "the tensor is uint8 (AllReduceSum takes float32, float64, "
            "bfloat16 or int64)");
      }
      return absl::OkStatus();
    case CollectiveKind::kAllGather: {
      LC_RETURN_IF_ERROR(CheckTensor("the input", tensor));
      LC_RETURN_IF_ERROR(CheckTensor("the output", output));
      Shape expected = tensor.shape();
      expected.insert(expected.begin(), size_);
      if (output.shape() != expected || output.dtype() != tensor.dtype()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the output ", DescribeTensor(output), " does not fit the input ",
            DescribeTensor(tensor), " (expected ", ShapeToString(expected), " ",
            DTypeName(tensor.dtype()), ")"));
      }
      // NCCL allows one overlap: the input being output[rank] itself.
      const auto* in = static_cast<const char*>(tensor.raw_data());
      const auto* out = static_cast<const char*>(output.raw_data());
      const int64_t bytes = ByteSize(tensor);
      const bool overlap = in < out + size_ * bytes && out < in + bytes;
      if (bytes > 0 && overlap && in != out + rank_ * bytes) {
        return absl::InvalidArgumentError(
            "the input overlaps the output (only the input being "
            "output[rank] is allowed)");
      }
      return absl::OkStatus();
    }
    case CollectiveKind::kBroadcast:
      LC_RETURN_IF_ERROR(CheckTensor("the tensor", tensor));
      if (root < 0 || root >= size_) {
        return absl::InvalidArgumentError(absl::StrCat(
            "root ", root, " is out of range (expected 0 <= root < ", size_,
            ")"));
      }
      return absl::OkStatus();
    case CollectiveKind::kBarrier:
      return absl::OkStatus();
  }
  return absl::OkStatus();
}

absl::Status RankState::Collective(CollectiveKind kind, const Tensor& tensor,
                                   const Tensor& output, int root) {
  absl::MutexLock collective_lock(&collective_mu_);
  const std::string what =
      absl::StrCat(CollectiveName(static_cast<int64_t>(kind)), " (collective #",
                   collectives_++, ") on rank ", rank_);
  // A rank whose own arguments are wrong still takes part in the exchange,
  // so that every rank learns at once that this collective failed.
  const absl::Status local = CheckCollective(kind, tensor, output, root);
  Descriptor mine;
  if (local.ok() && kind != CollectiveKind::kBarrier) {
    mine = Describe(0, 0, tensor);
  }
  mine.op = static_cast<int64_t>(kind);
  mine.root = kind == CollectiveKind::kBroadcast ? root : 0;
  if (!local.ok()) mine.dtype = kInvalidArguments;

  const Clock::time_point deadline = Clock::now() + timeout_;
  char* own_host = exchange_host_ + size_ * kDescriptorBytes;
  char* own_device = exchange_device_ + size_ * kDescriptorBytes;
  std::memcpy(own_host, &mine, kDescriptorBytes);
  // RunOnMain calls `send_own` and `launch` with mu_ held.
  const auto send_own =
      [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS -> absl::StatusOr<ncclResult_t> {
    LC_RETURN_IF_ERROR(
        CheckCuda(cudaMemcpyAsync(own_device, own_host, kDescriptorBytes,
                                  cudaMemcpyHostToDevice, main_stream_),
                  what));
    return ncclAllGather(own_device, exchange_device_, kDescriptorBytes,
                         ncclUint8, main_, main_stream_);
  };
  const auto fetch_all = [&] {
    return CheckCuda(cudaMemcpyAsync(exchange_host_, exchange_device_,
                                     size_ * kDescriptorBytes,
                                     cudaMemcpyDeviceToHost, main_stream_),
                     what);
  };
  const absl::Status exchanged =
      RunOnMain(deadline, absl::StrCat(what, ", comparing the ranks' calls"),
                send_own, fetch_all);
  if (!exchanged.ok()) return exchanged;
  if (!local.ok()) {
    return absl::Status(local.code(),
                        absl::StrCat(what, ": ", local.message()));
  }
  std::vector<Descriptor> calls(size_);
  std::memcpy(calls.data(), exchange_host_, size_ * kDescriptorBytes);
  const auto per_rank = [&](const auto& describe) {
    std::vector<std::string> parts;
    for (int r = 0; r < size_; ++r) {
      parts.push_back(absl::StrCat("rank ", r, " ", describe(calls[r])));
    }
    return absl::StrJoin(parts, ", ");
  };
  const auto disagree = [&](const auto& field) {
    return std::any_of(calls.begin(), calls.end(), [&](const Descriptor& d) {
      return field(d) != field(mine);
    });
  };
  std::vector<int> invalid;
  for (int r = 0; r < size_; ++r) {
    if (calls[r].dtype == kInvalidArguments) invalid.push_back(r);
  }
  std::string mismatch;
  if (disagree([](const Descriptor& d) { return d.op; })) {
    mismatch = absl::StrCat(
        "the ranks called different collectives: ",
        per_rank([](const Descriptor& d) { return CollectiveName(d.op); }),
        " (expected every rank to call the same collectives in the same "
        "order)");
  } else if (!invalid.empty()) {
    mismatch = absl::StrCat("rank(s) ", absl::StrJoin(invalid, ", "),
                            " passed invalid arguments (see their errors)");
  } else if (disagree([](const Descriptor& d) { return d.root; })) {
    mismatch = absl::StrCat(
        "the ranks name different roots: ", per_rank([](const Descriptor& d) {
          return absl::StrCat("root ", d.root);
        }),
        " (expected one root)");
  } else if (std::any_of(calls.begin(), calls.end(), [&](const Descriptor& d) {
               return !SameDescriptor(d, mine);
             })) {
    mismatch = absl::StrCat(
        "the tensors differ across ranks: ", per_rank(DescriptorTensor),
        " (expected one shape and dtype on every rank)");
  }
  if (!mismatch.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", mismatch));
  }
  if (kind == CollectiveKind::kBarrier) return absl::OkStatus();

  const int64_t bytes = ByteSize(tensor);
  if (tensor.numel() > 0) {
    LC_ASSIGN_OR_RETURN(const cudaStream_t caller, CallerStream(what));
    const auto launch =
        [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS -> absl::StatusOr<ncclResult_t> {
      LC_RETURN_IF_ERROR(
          CheckCuda(cudaEventRecord(collective_posted_, caller), what));
      LC_RETURN_IF_ERROR(CheckCuda(
          cudaStreamWaitEvent(main_stream_, collective_posted_, 0), what));
      void* data = tensor.raw_data();
      const size_t count = static_cast<size_t>(tensor.numel());
      const ncclDataType_t type = NcclType(tensor.dtype());
      switch (kind) {
        case CollectiveKind::kAllReduceSum:
          return ncclAllReduce(data, data, count, type, ncclSum, main_,
                               main_stream_);
        case CollectiveKind::kAllGather:
          return ncclAllGather(data, output.raw_data(), count, type, main_,
                               main_stream_);
        case CollectiveKind::kBroadcast:
          return ncclBroadcast(data, data, count, type, root, main_,
                               main_stream_);
        case CollectiveKind::kBarrier:
          break;
      }
      return ncclSuccess;
    };
    const absl::Status done = RunOnMain(deadline, what, launch, nullptr);
    if (!done.ok()) return done;
  }
  absl::MutexLock lock(&mu_);
  CountCollectiveLocked(kind, bytes, root);
  return absl::OkStatus();
}

void RankState::CountCollectiveLocked(CollectiveKind kind, int64_t bytes,
                                      int root) {
  const int64_t peers = size_ - 1;
  if (kind == CollectiveKind::kBroadcast) {
    if (rank_ == root) {
      stats_.bytes_sent += peers * bytes;
      stats_.messages_sent += peers;
    } else {
      stats_.bytes_received += bytes;
      stats_.messages_received += 1;
    }
    return;
  }
  stats_.bytes_sent += peers * bytes;
  stats_.messages_sent += peers;
  stats_.bytes_received += peers * bytes;
  stats_.messages_received += peers;
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

// fn's status, with exceptions turned into one.
absl::Status CallRank(const std::function<absl::Status(Communicator&)>& fn,
                      Communicator& communicator) {
  try {
    return fn(communicator);
  } catch (const Error& e) {
    return e.status();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("exception: ", e.what()));
  }
}

}  // namespace

absl::StatusOr<NcclUniqueId> NcclUniqueId::FromBytes(absl::string_view bytes) {
  if (bytes.size() != kNcclUniqueIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("an NCCL unique id has ", kNcclUniqueIdBytes,
                     " bytes, got ", bytes.size()));
  }
  return NcclUniqueId(std::string(bytes));
}

absl::StatusOr<NcclUniqueId> NewNcclUniqueId() {
  ncclUniqueId id;
  const ncclResult_t result = ncclGetUniqueId(&id);
  if (result != ncclSuccess) return NcclFailure(result, "ncclGetUniqueId");
  return NcclUniqueId::FromBytes(
      absl::string_view(id.internal, kNcclUniqueIdBytes));
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(
    int rank, int size, int device, const NcclUniqueId& id,
    std::chrono::milliseconds timeout) {
  return Create(rank, size, device, id, timeout, nullptr);
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicatorFromEnv(
    std::chrono::milliseconds timeout) {
  LC_ASSIGN_OR_RETURN(const LaunchEnvironment env,
                      ReadLaunchEnvironment(timeout));
  const RendezvousConfig& config = env.rendezvous;
  const int devices = CudaDeviceCount();
  if (env.local_rank >= devices) {
    return absl::FailedPreconditionError(
        absl::StrCat("LOCAL_RANK=", env.local_rank, " (rank ", config.rank,
                     "'s CUDA device) does not exist: this machine has ",
                     devices, " CUDA devices"));
  }
  std::string payload;
  if (config.rank == 0) {
    LC_ASSIGN_OR_RETURN(const NcclUniqueId id, NewNcclUniqueId());
    payload = id.bytes();
  }
  LC_ASSIGN_OR_RETURN(const std::string bytes,
                      ExchangeRendezvous(config, payload));
  LC_ASSIGN_OR_RETURN(const NcclUniqueId id, NcclUniqueId::FromBytes(bytes));
  return CreateNcclCommunicator(config.rank, config.world_size, env.local_rank,
                                id, timeout);
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
