#include "distributed/nccl_errors.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace lc {
namespace distributed_internal {

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

absl::StatusOr<bool> NcclReady(ncclComm_t comm, absl::string_view what) {
  ncclResult_t state = ncclSuccess;
  const ncclResult_t result = ncclCommGetAsyncError(comm, &state);
  if (result != ncclSuccess) return NcclFailure(result, what);
  if (state == ncclInProgress) return false;
  if (state != ncclSuccess) return NcclFailure(state, what);
  return true;
}

}  // namespace distributed_internal
}  // namespace lc
