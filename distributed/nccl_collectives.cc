// The NCCL backend's collectives: argument checks, the exchange of every
// rank's call that precedes each collective (so that mismatched calls fail on
// every rank), and the NCCL collective itself on the main communicator.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/check.h"
#include "core/shape.h"
#include "core/status.h"
#include "distributed/nccl_errors.h"
#include "distributed/nccl_rank_state.h"

namespace lc {
namespace distributed_internal {
namespace {

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

}  // namespace

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
  const std::string what = CollectiveLabel(kind, collectives_++, rank_);
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
    mismatch = DifferentCollectives(calls, [](const Descriptor& d) {
      return static_cast<CollectiveKind>(d.op);
    });
  } else if (!invalid.empty()) {
    mismatch = absl::StrCat("rank(s) ", absl::StrJoin(invalid, ", "),
                            " passed invalid arguments (see their errors)");
  } else if (disagree([](const Descriptor& d) { return d.root; })) {
    mismatch =
        DifferentRoots(calls, [](const Descriptor& d) { return d.root; });
  } else if (std::any_of(calls.begin(), calls.end(), [&](const Descriptor& d) {
               return !SameDescriptor(d, mine);
             })) {
    mismatch = DifferentTensors(calls, DescriptorTensor);
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
  CountCollective(kind, bytes, size_, rank_, root, stats_);
  return absl::OkStatus();
}

}  // namespace distributed_internal
}  // namespace lc
