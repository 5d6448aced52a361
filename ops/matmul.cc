#include "ops/matmul.h"

#include <omp.h>

#include <Eigen/Core>
#include <array>
#include <atomic>
#include <vector>

#include "core/autograd.h"
#include "ops/cpu_kernel.h"
#include "ops/device_kernel.h"
#include "ops/matmul_cuda.h"
#include "ops/reduce.h"

namespace lc {
namespace {

using internal::MatrixLayout;

std::atomic<bool> allow_tf32{false};

// The layout of op(t) for the last two dims of `t`.
MatrixLayout LayoutOf(const Tensor& t, bool transpose) {
  if (transpose) return {t.size(-1), t.size(-2), t.stride(-1), t.stride(-2)};
  return {t.size(-2), t.size(-1), t.stride(-2), t.stride(-1)};
}

// Eigen can multiply a matrix in place when its columns (row-major) or its
// rows (column-major) are adjacent in memory.
bool IsRowMajor(const MatrixLayout& m) {
  return m.col_stride == 1 || m.cols <= 1;
}
bool IsColMajor(const MatrixLayout& m) {
  return m.row_stride == 1 || m.rows <= 1;
}
bool EigenReadsInPlace(const MatrixLayout& m) {
  return IsRowMajor(m) || IsColMajor(m);
}

template <typename T, int Order>
using ConstMatrixMap =
    Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Order>,
               Eigen::Unaligned, Eigen::OuterStride<>>;

// Calls fn with an Eigen map of the matrix `m` at `data` (no copy).
template <typename T, typename Fn>
void WithEigenMap(const T* data, const MatrixLayout& m, Fn&& fn) {
  if (IsRowMajor(m)) {
    fn(ConstMatrixMap<T, Eigen::RowMajor>(data, m.rows, m.cols,
                                          Eigen::OuterStride<>(m.row_stride)));
  } else {
    fn(ConstMatrixMap<T, Eigen::ColMajor>(data, m.rows, m.cols,
                                          Eigen::OuterStride<>(m.col_stride)));
  }
}

// c[m, n] (dense, row-major) = a[m, k] * b[k, n] for operands laid out as
// `la` and `lb`, through Eigen's GEMM (multi-threaded with OpenMP unless
// called inside a parallel region).
template <typename T>
void Gemm(const T* a, const MatrixLayout& la, const T* b,
          const MatrixLayout& lb, T* c) {
  Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>
      out(c, la.rows, lb.cols);
  WithEigenMap(a, la, [&](const auto& a_map) {
    WithEigenMap(b, lb,
                 [&](const auto& b_map) { out.noalias() = a_map * b_map; });
  });
}

// c + oc = (a + oa) (b + ob) for every offset triple (oa, ob, oc). Many small
// products run one per thread; otherwise each uses Eigen's threads.
template <typename T>
void GemmBatch(const T* a, const MatrixLayout& la, const T* b,
               const MatrixLayout& lb, T* c,
               const std::vector<std::array<int64_t, 3>>& offsets) {
  const int64_t num = static_cast<int64_t>(offsets.size());
  const bool per_thread =
      num > 1 && (num >= omp_get_max_threads() ||
                  la.rows * la.cols * lb.cols <= (int64_t{1} << 18));
#pragma omp parallel for schedule(static) if (per_thread)
  for (int64_t i = 0; i < num; ++i) {
    Gemm(a + offsets[i][0], la, b + offsets[i][1], lb, c + offsets[i][2]);
  }
}

// Strides of t's batch dims (all but the last two) read as broadcast to
// `batch`, 0 on broadcast dims.
Shape BatchStrides(const Tensor& t, const Shape& batch) {
  Shape full = batch;
  full.push_back(t.size(-2));
  full.push_back(t.size(-1));
  Shape strides = BroadcastStrides(t, full);
  strides.resize(batch.size());
  return strides;
}

// Whether op(a)'s rows, across all batch dims, form one matrix with a uniform
// row stride while b is shared by every batch: then the batched product is a
// single GEMM with batch * m rows.
bool BatchFoldsIntoRows(const Shape& batch, const Shape& a_strides,
                        const Shape& b_strides, const MatrixLayout& la) {
  int64_t expected = la.row_stride * la.rows;
  for (int64_t d = static_cast<int64_t>(batch.size()) - 1; d >= 0; --d) {
    if (batch[d] == 1) continue;
    if (b_strides[d] != 0 || a_strides[d] != expected) return false;
    expected *= batch[d];
  }
  return true;
}

// The batch dims of a product as fewer dims: size-1 dims dropped, and each
// dim merged into the next outer one when every operand steps over both as
// one (outer stride == inner size * inner stride). strides[k] are operand
// k's strides over the merged dims.
template <size_t N>
struct CoalescedBatch {
  Shape sizes;
  std::array<Shape, N> strides;
};

template <size_t N>
CoalescedBatch<N> CoalesceBatch(const Shape& batch,
                                const std::array<Shape, N>& strides) {
  CoalescedBatch<N> out;
  for (size_t d = 0; d < batch.size(); ++d) {
    if (batch[d] == 1) continue;
    bool mergeable = !out.sizes.empty();
    for (size_t k = 0; k < N && mergeable; ++k) {
      mergeable = out.strides[k].back() == batch[d] * strides[k][d];
    }
    if (mergeable) {
      out.sizes.back() *= batch[d];
      for (size_t k = 0; k < N; ++k) out.strides[k].back() = strides[k][d];
    } else {
      out.sizes.push_back(batch[d]);
      for (size_t k = 0; k < N; ++k) out.strides[k].push_back(strides[k][d]);
    }
  }
  return out;
}

// Whether t has every batch dim of the product itself (is broadcast along
// none of them).
bool HasFullBatch(const Tensor& t, const Shape& batch) {
  return Shape(t.shape().begin(), t.shape().end() - 2) == batch;
}

// out [batch..., m, n] (dense, not empty) = op(a) @ op(b) for operands of
// one floating dtype on out's device that the device's GEMM reads in place
// (MatmulKernels::reads_in_place), with k > 0 and the batch dims `batch`.
using MatmulKernel = void(Tensor a, bool transpose_a, Tensor b,
                          bool transpose_b, const Shape& batch,
                          const Tensor& out);

// MatmulKernel on the CPU through Eigen's GEMMs: one GEMM with the batch
// folded into the rows where it folds, else one per batch entry.
void MatmulCpu(Tensor a, bool transpose_a, Tensor b, bool transpose_b,
               const Shape& batch, const Tensor& out) {
  MatrixLayout la = LayoutOf(a, transpose_a);
  const MatrixLayout lb = LayoutOf(b, transpose_b);
  const Shape a_strides = BatchStrides(a, batch);
  const Shape b_strides = BatchStrides(b, batch);
  const Shape out_strides = BatchStrides(out, batch);
  std::vector<std::array<int64_t, 3>> offsets;
  if (BatchFoldsIntoRows(batch, a_strides, b_strides, la)) {
    la.rows *= NumElements(batch);
    offsets.push_back({0, 0, 0});
  } else {
    ForEachOffset<3>(batch, {&a_strides, &b_strides, &out_strides},
                     [&](int64_t oa, int64_t ob, int64_t oc) {
                       offsets.push_back({oa, ob, oc});
                     });
  }
  LC_DISPATCH_FLOATING(a.dtype(), "Matmul", [&] {
    GemmBatch(a.data<scalar_t>(), la, b.data<scalar_t>(), lb,
              out.data<scalar_t>(), offsets);
  });
}

// MatmulKernel on CUDA through cuBLAS. The batch dims go into one
// strided-batched GEMM when they coalesce into one dim; when they do not,
// each operand that is not broadcast along a batch dim is made contiguous
// (so its batch dims coalesce), and any dims still apart (mixed broadcasts)
// are looped over on the host, one strided-batched GEMM each.
void MatmulCuda(Tensor a, bool transpose_a, Tensor b, bool transpose_b,
                const Shape& batch, const Tensor& out) {
  auto coalesce = [&] {
    return CoalesceBatch<3>(batch,
                            {BatchStrides(a, batch), BatchStrides(b, batch),
                             BatchStrides(out, batch)});
  };
  CoalescedBatch<3> dims = coalesce();
  if (dims.sizes.size() > 1) {
    if (HasFullBatch(a, batch)) a = a.contiguous();
    if (HasFullBatch(b, batch)) b = b.contiguous();
    dims = coalesce();
  }
  MatrixLayout la = LayoutOf(a, transpose_a);
  const MatrixLayout lb = LayoutOf(b, transpose_b);
  MatrixLayout folded = la;
  folded.rows *= NumElements(batch);
  if (BatchFoldsIntoRows(batch, BatchStrides(a, batch), BatchStrides(b, batch),
                         la) &&
      internal::CublasReadsInPlace(folded)) {
    la = folded;
    dims = CoalescedBatch<3>();
  }
  // The innermost coalesced dim is the GEMM's batch; the others are looped.
  int64_t count = 1;
  std::array<int64_t, 3> inner_strides = {0, 0, 0};
  std::array<Shape, 3> outer_strides;
  if (!dims.sizes.empty()) {
    count = dims.sizes.back();
    dims.sizes.pop_back();
    for (size_t k = 0; k < 3; ++k) {
      inner_strides[k] = dims.strides[k].back();
      dims.strides[k].pop_back();
      outer_strides[k] = dims.strides[k];
    }
  }
  const int64_t elem = DTypeSize(a.dtype());
  const char* a_data = static_cast<const char*>(a.raw_data());
  const char* b_data = static_cast<const char*>(b.raw_data());
  char* out_data = static_cast<char*>(out.raw_data());
  const bool tf32 = AllowTf32();
  ForEachOffset<3>(
      dims.sizes, {&outer_strides[0], &outer_strides[1], &outer_strides[2]},
      [&](int64_t oa, int64_t ob, int64_t oc) {
        internal::GemmCuda(a.dtype(), a.device(), a_data + oa * elem, la,
                           inner_strides[0], b_data + ob * elem, lb,
                           inner_strides[1], out_data + oc * elem,
                           inner_strides[2], count, tf32);
      });
}

// A device's GEMM and the operand layouts it reads in place (others are
// copied to contiguous first).
struct MatmulKernels {
  bool (*reads_in_place)(const MatrixLayout& m);
  MatmulKernel* gemm;
};

constexpr PerDevice<MatmulKernels> kMatmul = {
    {EigenReadsInPlace, MatmulCpu}, {internal::CublasReadsInPlace, MatmulCuda}};

// out[batch..., m, n] = op(a) @ op(b) for a and b of one floating dtype
// (float32 or float64 on the CPU; also bfloat16 on CUDA) on one device, whose
// shapes were validated. Not differentiable.
Tensor MatmulForward(Tensor a, Tensor b, bool transpose_a, bool transpose_b) {
  const MatmulKernels& kernels = kMatmul.For(a.device());
  if (!kernels.reads_in_place(LayoutOf(a, transpose_a))) a = a.contiguous();
  if (!kernels.reads_in_place(LayoutOf(b, transpose_b))) b = b.contiguous();
  const MatrixLayout la = LayoutOf(a, transpose_a);
  const MatrixLayout lb = LayoutOf(b, transpose_b);
  const Shape batch =
      BroadcastShapes(Shape(a.shape().begin(), a.shape().end() - 2),
                      Shape(b.shape().begin(), b.shape().end() - 2), "Matmul");
  Shape out_shape = batch;
  out_shape.push_back(la.rows);
  out_shape.push_back(lb.cols);
  // The product over an empty inner dim is 0 (and cuBLAS takes no empty
  // inner dim).
  if (la.cols == 0) return Zeros(out_shape, a.dtype(), a.device());
  Tensor out = Empty(out_shape, a.dtype(), a.device());
  if (out.numel() > 0) kernels.gemm(a, transpose_a, b, transpose_b, batch, out);
  return out;
}

}  // namespace

Tensor Matmul(const Tensor& a, const Tensor& b, bool transpose_a,
              bool transpose_b) {
  CheckFloatingInputs("Matmul", {a, b});
  LC_REQUIRE(a.dim() >= 2 && b.dim() >= 2,
             "Matmul: expected inputs with at least 2 dims, got a ",
             ShapeToString(a.shape()), " and b ", ShapeToString(b.shape()));
  const int64_t k_a = transpose_a ? a.size(-2) : a.size(-1);
  const int64_t k_b = transpose_b ? b.size(-1) : b.size(-2);
  LC_REQUIRE(k_a == k_b, "Matmul: inner dims differ: a ",
             ShapeToString(a.shape()), (transpose_a ? " (transposed)" : ""),
             " has k = ", k_a, " but b ", ShapeToString(b.shape()),
             (transpose_b ? " (transposed)" : ""), " has k = ", k_b,
             " (expected equal)");
  if (ComputesOnFloat32Copies(a)) {
    return ComputeInFloat32(
        [&](const Tensor& a32, const Tensor& b32) {
          return Matmul(a32, b32, transpose_a, transpose_b);
        },
        a, b);
  }
  Tensor out = MatmulForward(a.detach(), b.detach(), transpose_a, transpose_b);
  if (NeedsGrad({a, b})) {
    RecordOp("Matmul", {a, b}, {&out}, /*saved=*/{a, b},
             [a = a.detach(), b = b.detach(), transpose_a, transpose_b,
              needs_a = a.requires_grad(),
              needs_b = b.requires_grad()](const Tensors& g) -> Tensors {
               // With c = op(a) op(b): d op(a) = g op(b)^T, d op(b) = op(a)^T
               // g, transposed back when the operand was, then summed over the
               // batch dims the operand was broadcast along.
               Tensor grad_a, grad_b;
               if (needs_a) {
                 grad_a = transpose_a ? Matmul(b, g[0], transpose_b, true)
                                      : Matmul(g[0], b, false, !transpose_b);
                 grad_a = SumToShape(grad_a, a.shape());
               }
               if (needs_b && b.dim() == 2 && a.dim() > 2 && !transpose_a) {
                 // b is shared by every batch: one GEMM over the batch folded
                 // into the inner dim sums the per-batch products.
                 const Tensor a_rows = a.reshape({-1, a.size(-1)});
                 const Tensor g_rows = g[0].reshape({-1, g[0].size(-1)});
                 grad_b = transpose_b ? Matmul(g_rows, a_rows, true, false)
                                      : Matmul(a_rows, g_rows, true, false);
               } else if (needs_b) {
                 grad_b = transpose_b ? Matmul(g[0], a, true, transpose_a)
                                      : Matmul(a, g[0], !transpose_a, false);
                 grad_b = SumToShape(grad_b, b.shape());
               }
               return {grad_a, grad_b};
             });
  }
  return out;
}

void SetAllowTf32(bool allow) { allow_tf32.store(allow); }

bool AllowTf32() { return allow_tf32.load(); }

}  // namespace lc
