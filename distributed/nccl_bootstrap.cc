// The NCCL backend's bootstrap: the unique id (made by one rank, handed to
// the others over the TCP rendezvous when ranks are processes), joining the
// group (ncclCommInitRankConfig, one split per sending rank's lane) and
// creating the rank's streams, events and header buffers.
#include <cstring>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/cuda.h"
#include "core/status.h"
#include "distributed/nccl_communicator.h"
#include "distributed/nccl_errors.h"
#include "distributed/nccl_rank_state.h"
#include "distributed/tcp_rendezvous.h"

namespace lc {
namespace distributed_internal {

static_assert(kNcclUniqueIdBytes == NCCL_UNIQUE_ID_BYTES,
              "kNcclUniqueIdBytes must match nccl.h");

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

}  // namespace distributed_internal

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
  if (result != ncclSuccess) {
    return distributed_internal::NcclFailure(result, "ncclGetUniqueId");
  }
  return NcclUniqueId::FromBytes(
      absl::string_view(id.internal, kNcclUniqueIdBytes));
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

}  // namespace lc
