#include "ops/matmul_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <map>

#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/cuda.h"
#include "core/status.h"
#include "core/tensor.h"

namespace lc {
namespace internal {
namespace {

[[noreturn]] void ThrowCublasError(cublasStatus_t status, const char* expr,
                                   const char* file, int line) {
  throw Error(absl::InternalError(absl::StrCat(
      expr, " failed at ", file, ":", line, ": ", cublasGetStatusName(status),
      " (", cublasGetStatusString(status), ")")));
}

// Throws lc::Error naming the call, file and line unless the cuBLAS call
// `expr` returned CUBLAS_STATUS_SUCCESS.
#define LC_CUBLAS_CHECK(expr)                                         \
  do {                                                                \
    const cublasStatus_t lc_cublas_status_ = (expr);                  \
    if (lc_cublas_status_ != CUBLAS_STATUS_SUCCESS) {                 \
      ThrowCublasError(lc_cublas_status_, #expr, __FILE__, __LINE__); \
    }                                                                 \
  } while (false)

// cuBLAS's recommended workspace on Hopper.
constexpr int64_t kWorkspaceBytes = int64_t{32} << 20;

// This thread's cuBLAS handle for one device, the stream it is bound to, and
// a workspace per stream it has run on (allocated on that stream, so the
// caching allocator reuses it only after the work queued there).
struct CublasState {
  cublasHandle_t handle = nullptr;
  cudaStream_t stream = nullptr;
  std::map<cudaStream_t, Tensor> workspaces;
};

struct ThreadCublas {
  std::map<int, CublasState> devices;
  ~ThreadCublas() {
    for (auto& [device, state] : devices) {
      // cublasDestroy waits for the device. At the main thread's exit the
      // runtime may be going down; a failure to destroy is harmless then.
      cudaSetDevice(device);
      cublasDestroy(state.handle);
    }
  }
};

// The calling thread's handle for `device`, bound to its current stream and
// to that stream's workspace.
cublasHandle_t BoundHandle(int device) {
  SetCudaDevice(device);
  // Made first, so that the thread's streams outlive its cuBLAS state (thread
  // locals are destroyed in reverse order of construction).
  const cudaStream_t stream = CurrentCudaStream(device);
  thread_local ThreadCublas cublas;
  auto it = cublas.devices.find(device);
  if (it == cublas.devices.end()) {
    cublasHandle_t handle = nullptr;
    LC_CUBLAS_CHECK(cublasCreate(&handle));
    it = cublas.devices.emplace(device, CublasState{handle}).first;
  }
  CublasState& state = it->second;
  if (state.stream != stream || state.workspaces.empty()) {
    Tensor& workspace = state.workspaces[stream];
    if (!workspace.defined()) {
      workspace = Empty({kWorkspaceBytes}, DType::kUInt8, Device::Cuda(device));
    }
    // cublasSetStream resets the workspace to cuBLAS's default pool, so the
    // stream's own workspace is set after it.
    LC_CUBLAS_CHECK(cublasSetStream(state.handle, stream));
    LC_CUBLAS_CHECK(cublasSetWorkspace(state.handle, workspace.raw_data(),
                                       static_cast<size_t>(kWorkspaceBytes)));
    state.stream = stream;
  }
  return state.handle;
}

// How cuBLAS (column-major) reads the transpose of a matrix m: m^T, a
// cols x rows column-major matrix, is m's memory read with op N and leading
// dim row_stride when m's columns are adjacent; otherwise, when m's rows are
// adjacent, m's memory is m as a rows x cols column-major matrix, read with
// op T and leading dim col_stride. A dim of size 1 has any stride; its
// leading dim is then the smallest valid one.
struct CublasOperand {
  cublasOperation_t op;
  int64_t ld;
};

bool TransposedOperand(const MatrixLayout& m, CublasOperand* out) {
  if (m.col_stride == 1 || m.cols == 1) {
    const int64_t ld =
        m.rows == 1 ? std::max<int64_t>(1, m.cols) : m.row_stride;
    if (ld >= std::max<int64_t>(1, m.cols)) {
      *out = {CUBLAS_OP_N, ld};
      return true;
    }
  }
  if (m.row_stride == 1 || m.rows == 1) {
    const int64_t ld =
        m.cols == 1 ? std::max<int64_t>(1, m.rows) : m.col_stride;
    if (ld >= std::max<int64_t>(1, m.rows)) {
      *out = {CUBLAS_OP_T, ld};
      return true;
    }
  }
  return false;
}

}  // namespace

bool CublasReadsInPlace(const MatrixLayout& m) {
  CublasOperand unused;
  return TransposedOperand(m, &unused);
}

void GemmCuda(DType dtype, Device device, const void* a, const MatrixLayout& la,
              int64_t a_batch_stride, const void* b, const MatrixLayout& lb,
              int64_t b_batch_stride, void* c, int64_t c_batch_stride,
              int64_t batch, bool allow_tf32) {
  LC_CHECK(la.cols == lb.rows) << la.cols << " vs " << lb.rows;
  LC_CHECK(la.rows > 0 && la.cols > 0 && lb.cols > 0 && batch > 0);
  // c is row-major m x n, i.e. c^T is column-major n x m with leading dim n:
  // cuBLAS computes c^T = op(b)^T op(a)^T.
  CublasOperand op_b, op_a;
  LC_CHECK(TransposedOperand(lb, &op_b) && TransposedOperand(la, &op_a))
      << "GemmCuda: an operand cuBLAS cannot read in place";
  const double alpha64 = 1, beta64 = 0;
  const float alpha32 = 1, beta32 = 0;
  const void* alpha = &alpha32;
  const void* beta = &beta32;
  cudaDataType_t type;
  cublasComputeType_t compute;
  switch (dtype) {
    case DType::kFloat64:
      type = CUDA_R_64F;
      compute = CUBLAS_COMPUTE_64F;
      alpha = &alpha64;
      beta = &beta64;
      break;
    case DType::kFloat32:
      type = CUDA_R_32F;
      compute = allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
      break;
    case DType::kBFloat16:
      type = CUDA_R_16BF;
      compute = CUBLAS_COMPUTE_32F;
      break;
    default:
      LC_CHECK(false) << "GemmCuda: dtype " << DTypeName(dtype);
      return;
  }
  const cublasHandle_t handle = BoundHandle(device.index);
  LC_CUBLAS_CHECK(cublasGemmStridedBatchedEx_64(
      handle, op_b.op, op_a.op, /*m=*/lb.cols, /*n=*/la.rows, /*k=*/la.cols,
      alpha, b, type, op_b.ld, b_batch_stride, a, type, op_a.ld, a_batch_stride,
      beta, c, type, /*ldc=*/lb.cols, c_batch_stride, batch, compute,
      CUBLAS_GEMM_DEFAULT));
}

}  // namespace internal
}  // namespace lc
