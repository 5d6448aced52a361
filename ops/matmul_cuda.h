// The cuBLAS path of Matmul (ops/matmul.cc): strided-batched GEMMs on a CUDA
// device. Each host thread has one cuBLAS handle per device (created on first
// use), bound before every call to the thread's current stream for that
// device, with a workspace of its own per stream (so GEMMs on two streams
// never share scratch memory and results stay deterministic).
#ifndef LONGCTX_OPS_MATMUL_CUDA_H_
#define LONGCTX_OPS_MATMUL_CUDA_H_

#include <cstdint>

#include "core/device.h"
#include "core/dtype.h"

namespace lc {
namespace internal {

// A GEMM operand as a strided matrix: element (i, j) of the rows x cols
// matrix lies at data[i * row_stride + j * col_stride] (in elements). Used by
// the CPU and the CUDA paths of Matmul.
struct MatrixLayout {
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  int64_t col_stride;
};

// Whether cuBLAS reads the matrix in place: its columns are adjacent
// (col_stride 1) or its rows are (row_stride 1), and the other stride steps
// past a whole column or row.
bool CublasReadsInPlace(const MatrixLayout& m);

// For p in [0, batch):
//   c + p * c_batch_stride = (a + p * a_batch_stride) (b + p * b_batch_stride)
// where a is la.rows x la.cols, b is la.cols x lb.cols (lb.rows == la.cols)
// and c is dense row-major la.rows x lb.cols; strides are in elements (0
// shares a matrix across the batch). a, b and c are device pointers of
// `dtype` on CUDA device `device`; a and b must satisfy CublasReadsInPlace;
// all sizes are > 0. Runs on the thread's current stream for `device`.
// float64 computes in float64; float32 in float32, or with inputs rounded to
// TF32 when allow_tf32; bfloat16 in float32 with one rounding of the result.
void GemmCuda(DType dtype, Device device, const void* a, const MatrixLayout& la,
              int64_t a_batch_stride, const void* b, const MatrixLayout& lb,
              int64_t b_batch_stride, void* c, int64_t c_batch_stride,
              int64_t batch, bool allow_tf32);

}  // namespace internal
}  // namespace lc

#endif  // LONGCTX_OPS_MATMUL_CUDA_H_
