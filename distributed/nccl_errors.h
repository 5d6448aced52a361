// Translation of CUDA and NCCL results into absl::Status for the NCCL backend:
// failed calls become Internal (NCCL's remote and system errors Unavailable)
// errors naming the call, and an NCCL communicator's asynchronous state
// becomes ready, busy or its error. Internal to distributed/.
#ifndef LONGCTX_DISTRIBUTED_NCCL_ERRORS_H_
#define LONGCTX_DISTRIBUTED_NCCL_ERRORS_H_

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lc {
namespace distributed_internal {

// Internal: "<what>: <error name> (<error string>)".
absl::Status CudaFailure(cudaError_t error, absl::string_view what);

// OK for cudaSuccess, else CudaFailure.
absl::Status CheckCuda(cudaError_t error, absl::string_view what);

// "<what>: NCCL error: ..." with NCCL's last error message: Unavailable for
// a remote or system error (a peer or the network failed), else Internal.
absl::Status NcclFailure(ncclResult_t result, absl::string_view what);

// OK when the NCCL communicator is idle, false while it still works on the
// last call (ncclInProgress), its error otherwise.
absl::StatusOr<bool> NcclReady(ncclComm_t comm, absl::string_view what);

}  // namespace distributed_internal
}  // namespace lc

#endif  // LONGCTX_DISTRIBUTED_NCCL_ERRORS_H_
