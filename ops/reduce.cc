#include "ops/reduce.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/autograd.h"
#include "ops/cpu_kernel.h"
#include "ops/device_kernel.h"
#include "ops/elementwise_functors.h"
#include "ops/elementwise_kernel.h"
#include "ops/reduce_cuda.h"

namespace lc {
namespace {

// The dims of a rank-`rank` tensor that `dims` names, as a mask (of size 1
// for a scalar, whose dim 0 / -1 reduces nothing, like torch).
std::vector<bool> ReduceMask(const char* op, const std::vector<int64_t>& dims,
                             int64_t rank) {
  LC_REQUIRE(!dims.empty(), op,
             ": dims is empty (expected at least one dim; use the overload "
             "without dims to reduce all elements)");
  std::vector<bool> mask(std::max<int64_t>(rank, 1), false);
  for (int64_t dim : dims) {
    const int64_t d = NormalizeDim(dim, rank, op);
    LC_REQUIRE(!mask[d], op, ": dims ", ShapeToString(dims), " name dim ", d,
               " twice (expected distinct dims of a tensor of rank ", rank,
               ")");
    mask[d] = true;
  }
  return mask;
}

// x's shape with the masked dims set to 1.
Shape KeepDimShape(const Shape& shape, const std::vector<bool>& mask) {
  Shape keep = shape;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (mask[d]) keep[d] = 1;
  }
  return keep;
}

// out = scale * (sum of x over the masked dims), out contiguous of the
// kept dims, x's dtype and device (x of any strides).
using SumKernel = void(const Tensor& x, const std::vector<bool>& mask,
                       double scale, const Tensor& out);

// SumKernel on the CPU for float32/float64 x, accumulated in float64 in
// row-major order of x.
void SumCpu(const Tensor& x, const std::vector<bool>& mask, double scale,
            const Tensor& out) {
  const Shape keep_shape = KeepDimShape(x.shape(), mask);
  // The accumulator is row-major over keep_shape; reduced dims stride 0.
  Shape acc_strides = ContiguousStrides(keep_shape);
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (mask[d]) acc_strides[d] = 0;
  }
  std::vector<double> acc(NumElements(keep_shape), 0.0);
  LC_DISPATCH_FLOATING(x.dtype(), "Sum", [&] {
    const scalar_t* in = x.data<scalar_t>();
    ForEachOffset<2>(x.shape(), {&x.strides(), &acc_strides},
                     [&](int64_t x_offset, int64_t acc_offset) {
                       acc[acc_offset] += in[x_offset];
                     });
    scalar_t* y = out.data<scalar_t>();
    for (size_t i = 0; i < acc.size(); ++i) {
      y[i] = static_cast<scalar_t>(acc[i] * scale);
    }
  });
}

constexpr PerDevice<SumKernel*> kSum = {SumCpu, internal::SumCuda};

// Differentiable y = scale * (sum of x over the masked dims): on the CPU for
// float32/float64 x, on CUDA for any floating x, in a fixed order on both
// (deterministic).
Tensor SumOverMask(const char* op, const Tensor& x,
                   const std::vector<bool>& mask, bool keepdim, double scale) {
  const Shape keep_shape = KeepDimShape(x.shape(), mask);
  Shape out_shape;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (keepdim || !mask[d]) out_shape.push_back(keep_shape[d]);
  }
  Tensor y = Empty(out_shape, x.dtype(), x.device());
  kSum.For(x.device())(x, mask, scale, y);
  if (NeedsGrad({x})) {
    RecordOp(op, {x}, {&y},
             [op, x_shape = x.shape(), keep_shape,
              scale](const Tensors& g) -> Tensors {
               // Every element of x gets scale times the gradient of its sum.
               return {MapElements<1>(op, {g[0].reshape(keep_shape)}, x_shape,
                                      MulScalarFn{scale})};
             });
  }
  return y;
}

// The maximum of x along dim d (size > 0; a scalar is one line of length 1)
// for every line m, row-major over x's shape with dim d of size 1: out[m]
// (contiguous, x's dtype) and argmax[m] (contiguous int64), the index along
// d of the first maximal element, NaN counting as the maximum.
using MaxKernel = void(const Tensor& x, int64_t d, const Tensor& out,
                       const Tensor& argmax);

// MaxKernel on the CPU.
void MaxCpu(const Tensor& x, int64_t d, const Tensor& out,
            const Tensor& argmax) {
  const int64_t length = x.dim() == 0 ? 1 : x.size(d);
  const int64_t x_step = x.dim() == 0 ? 0 : x.stride(d);
  const Shape& keep_shape = argmax.shape();
  const Shape line_strides = ContiguousStrides(keep_shape);
  int64_t* best_index = argmax.data<int64_t>();
  LC_DISPATCH_FLOATING(x.dtype(), "Max", [&] {
    const scalar_t* in = x.data<scalar_t>();
    scalar_t* y = out.data<scalar_t>();
    ForEachOffset<2>(keep_shape, {&x.strides(), &line_strides},
                     [&](int64_t x_offset, int64_t line) {
                       const scalar_t* p = in + x_offset;
                       int64_t best = 0;
                       for (int64_t k = 1; k < length; ++k) {
                         const scalar_t v = p[k * x_step];
                         const scalar_t m = p[best * x_step];
                         if (v > m || (std::isnan(v) && !std::isnan(m))) {
                           best = k;
                         }
                       }
                       y[line] = p[best * x_step];
                       best_index[line] = best;
                     });
  });
}

// The gradient of the maximum: gx (contiguous, x's shape and dtype) =
// g_keep[m] at index argmax[m] along d of line m and 0 elsewhere; g_keep has
// x's shape with dim d of size 1 (any strides).
using MaxBackwardKernel = void(const Tensor& g_keep, const Tensor& argmax,
                               int64_t d, const Tensor& gx);

// MaxBackwardKernel on the CPU.
void MaxBackwardCpu(const Tensor& g_keep, const Tensor& argmax, int64_t d,
                    const Tensor& gx) {
  const Shape& keep_shape = g_keep.shape();
  const Shape line_strides = ContiguousStrides(keep_shape);
  const int64_t* best_index = argmax.data<int64_t>();
  const int64_t gx_step = gx.dim() == 0 ? 0 : gx.stride(d);
  LC_DISPATCH_FLOATING(gx.dtype(), "Max", [&] {
    const scalar_t* in = g_keep.data<scalar_t>();
    scalar_t* out = gx.data<scalar_t>();
    std::fill_n(out, gx.numel(), scalar_t(0));
    ForEachOffset<3>(
        keep_shape, {&gx.strides(), &g_keep.strides(), &line_strides},
        [&](int64_t gx_offset, int64_t g_offset, int64_t line) {
          out[gx_offset + best_index[line] * gx_step] = in[g_offset];
        });
  });
}

constexpr PerDevice<MaxKernel*> kMax = {MaxCpu, internal::MaxCuda};
constexpr PerDevice<MaxBackwardKernel*> kMaxBackward = {
    MaxBackwardCpu, internal::MaxBackwardCuda};

// The number of elements of x that one output of a reduction over `mask`
// sums.
double ReducedCount(const Tensor& x, const std::vector<bool>& mask) {
  int64_t count = 1;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (mask[d]) count *= x.size(d);
  }
  return static_cast<double>(count);
}

// Every dim of x (a scalar's mask has one entry, like ReduceMask's).
std::vector<bool> AllDims(const Tensor& x) {
  return std::vector<bool>(std::max<int64_t>(x.dim(), 1), true);
}

}  // namespace

Tensor Sum(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  CheckFloatingInputs("Sum", {x});
  if (ComputesOnFloat32Copies(x)) {
    return ComputeInFloat32(
        [&](const Tensor& x32) { return Sum(x32, dims, keepdim); }, x);
  }
  return SumOverMask("Sum", x, ReduceMask("Sum", dims, x.dim()), keepdim,
                     /*scale=*/1);
}

Tensor Sum(const Tensor& x) {
  CheckFloatingInputs("Sum", {x});
  if (ComputesOnFloat32Copies(x)) {
    return ComputeInFloat32([](const Tensor& x32) { return Sum(x32); }, x);
  }
  return SumOverMask("Sum", x, AllDims(x), /*keepdim=*/false, /*scale=*/1);
}

Tensor Mean(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  CheckFloatingInputs("Mean", {x});
  if (ComputesOnFloat32Copies(x)) {
    return ComputeInFloat32(
        [&](const Tensor& x32) { return Mean(x32, dims, keepdim); }, x);
  }
  const std::vector<bool> mask = ReduceMask("Mean", dims, x.dim());
  return SumOverMask("Mean", x, mask, keepdim, 1 / ReducedCount(x, mask));
}

Tensor Mean(const Tensor& x) {
  CheckFloatingInputs("Mean", {x});
  if (ComputesOnFloat32Copies(x)) {
    return ComputeInFloat32([](const Tensor& x32) { return Mean(x32); }, x);
  }
  const std::vector<bool> mask = AllDims(x);
  return SumOverMask("Mean", x, mask, /*keepdim=*/false,
                     1 / ReducedCount(x, mask));
}

Tensor Max(const Tensor& x, int64_t dim, bool keepdim) {
  CheckFloatingInputs("Max", {x});
  if (ComputesOnFloat32Copies(x)) {
    return ComputeInFloat32(
        [&](const Tensor& x32) { return Max(x32, dim, keepdim); }, x);
  }
  const int64_t rank = x.dim();
  const int64_t d = NormalizeDim(dim, rank, "Max");
  // A scalar is one line of length 1.
  const int64_t length = rank == 0 ? 1 : x.size(d);
  LC_REQUIRE(length > 0, "Max: dim ", dim, " of shape ",
             ShapeToString(x.shape()),
             " has size 0 (expected a non-empty dim to take the maximum of)");
  // One line per element of keep_shape.
  Shape keep_shape = x.shape();
  Shape out_shape = x.shape();
  if (rank > 0) {
    keep_shape[d] = 1;
    if (keepdim) {
      out_shape[d] = 1;
    } else {
      out_shape.erase(out_shape.begin() + d);
    }
  }
  Tensor y = Empty(out_shape, x.dtype(), x.device());
  const Tensor argmax = Empty(keep_shape, DType::kInt64, x.device());
  kMax.For(x.device())(x, d, y, argmax);
  if (NeedsGrad({x})) {
    RecordOp("Max", {x}, {&y},
             [x_shape = x.shape(), keep_shape, d,
              argmax](const Tensors& g) -> Tensors {
               Tensor gx = Empty(x_shape, g[0].dtype(), g[0].device());
               kMaxBackward.For(gx.device())(g[0].reshape(keep_shape), argmax,
                                             d, gx);
               return {gx};
             });
  }
  return y;
}

Tensor SumToShape(const Tensor& x, const Shape& shape) {
  CheckFloatingInputs("SumToShape", {x});
  if (x.shape() == shape) return x;
  const int64_t lead = x.dim() - static_cast<int64_t>(shape.size());
  bool broadcasts = lead >= 0;
  std::vector<int64_t> dims;
  for (int64_t d = 0; broadcasts && d < x.dim(); ++d) {
    const int64_t size = d < lead ? 1 : shape[d - lead];
    if (d < lead || (size == 1 && x.size(d) != 1)) {
      dims.push_back(d);
    } else {
      broadcasts = size == x.size(d);
    }
  }
  LC_REQUIRE(broadcasts, "SumToShape: shape ", ShapeToString(shape),
             " does not broadcast to the tensor's shape ",
             ShapeToString(x.shape()),
             " (expected each size to be 1 or equal, right-aligned, and no "
             "more dims)");
  return Sum(x, dims, /*keepdim=*/true).reshape(shape);
}

}  // namespace lc
