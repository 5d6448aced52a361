#include "ops/softmax.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/autograd.h"
#include "ops/cpu_kernel.h"
#include "ops/device_kernel.h"
#include "ops/softmax_cuda.h"

namespace lc {
namespace {

// Softmax works on the lines of a tensor along dim d. ForEachOffset over the
// returned shape (`shape` with dim d of size 1) visits the first element of
// every line; the lines have `*length` elements. A scalar is one line of
// length 1.
Shape LineStarts(const Shape& shape, int64_t d, int64_t* length) {
  Shape starts = shape;
  *length = 1;
  if (!shape.empty()) {
    *length = shape[d];
    starts[d] = 1;
  }
  return starts;
}

// The stride between elements of t's lines along dim d.
int64_t LineStep(const Tensor& t, int64_t d) {
  return t.dim() == 0 ? 0 : t.stride(d);
}

// The op's name in the CPU kernels' errors.
const char* OpName(bool log) { return log ? "LogSoftmax" : "Softmax"; }

// For every line of x along dim d (x of any strides; y contiguous, of x's
// shape, dtype and device):
//   softmax:     y = exp(x - max) / sum(exp(x - max))
//   log-softmax: y = (x - max) - log(sum(exp(x - max)))
using SoftmaxForwardKernel = void(const Tensor& x, int64_t d, bool log,
                                  const Tensor& y);

// SoftmaxForwardKernel on the CPU; sums accumulate in float64.
void SoftmaxForwardCpu(const Tensor& x, int64_t d, bool log, const Tensor& y) {
  int64_t length;
  const Shape starts = LineStarts(x.shape(), d, &length);
  const int64_t x_step = LineStep(x, d);
  const int64_t y_step = LineStep(y, d);
  LC_DISPATCH_FLOATING(x.dtype(), OpName(log), [&] {
    const scalar_t* in = x.data<scalar_t>();
    scalar_t* out = y.data<scalar_t>();
    ForEachOffset<2>(
        starts, {&x.strides(), &y.strides()},
        [&](int64_t x_offset, int64_t y_offset) {
          const scalar_t* xl = in + x_offset;
          scalar_t* yl = out + y_offset;
          scalar_t max = -std::numeric_limits<scalar_t>::infinity();
          for (int64_t k = 0; k < length; ++k) {
            max = std::max(max, xl[k * x_step]);
          }
          double sum = 0;
          for (int64_t k = 0; k < length; ++k) {
            const scalar_t e = std::exp(xl[k * x_step] - max);
            if (!log) yl[k * y_step] = e;
            sum += e;
          }
          if (log) {
            const double log_sum = std::log(sum);
            for (int64_t k = 0; k < length; ++k) {
              yl[k * y_step] =
                  static_cast<scalar_t>((xl[k * x_step] - max) - log_sum);
            }
          } else {
            const double inv_sum = 1 / sum;
            for (int64_t k = 0; k < length; ++k) {
              yl[k * y_step] = static_cast<scalar_t>(yl[k * y_step] * inv_sum);
            }
          }
        });
  });
}

// The gradient of the forward given its output y and the output gradient g
// (one shape, any strides), for every line along dim d (gx contiguous, of y's
// shape, dtype and device):
//   softmax:     gx = y * (g - sum(g * y))
//   log-softmax: gx = g - exp(y) * sum(g)
using SoftmaxBackwardKernel = void(const Tensor& g, const Tensor& y, int64_t d,
                                   bool log, const Tensor& gx);

// SoftmaxBackwardKernel on the CPU; sums accumulate in float64.
void SoftmaxBackwardCpu(const Tensor& g, const Tensor& y, int64_t d, bool log,
                        const Tensor& gx) {
  int64_t length;
  const Shape starts = LineStarts(y.shape(), d, &length);
  const int64_t gx_step = LineStep(gx, d);
  const int64_t g_step = LineStep(g, d);
  const int64_t y_step = LineStep(y, d);
  LC_DISPATCH_FLOATING(y.dtype(), OpName(log), [&] {
    const scalar_t* g_data = g.data<scalar_t>();
    const scalar_t* y_data = y.data<scalar_t>();
    scalar_t* gx_data = gx.data<scalar_t>();
    ForEachOffset<3>(
        starts, {&gx.strides(), &g.strides(), &y.strides()},
        [&](int64_t gx_offset, int64_t g_offset, int64_t y_offset) {
          scalar_t* gxl = gx_data + gx_offset;
          const scalar_t* gl = g_data + g_offset;
          const scalar_t* yl = y_data + y_offset;
          double dot = 0;
          for (int64_t k = 0; k < length; ++k) {
            dot += log ? gl[k * g_step] : gl[k * g_step] * yl[k * y_step];
          }
          for (int64_t k = 0; k < length; ++k) {
            const scalar_t gk = gl[k * g_step];
            const scalar_t yk = yl[k * y_step];
            gxl[k * gx_step] = static_cast<scalar_t>(
                log ? gk - std::exp(yk) * dot : yk * (gk - dot));
          }
        });
  });
}

constexpr PerDevice<SoftmaxForwardKernel*> kSoftmaxForward = {
    SoftmaxForwardCpu, internal::SoftmaxForwardCuda};
constexpr PerDevice<SoftmaxBackwardKernel*> kSoftmaxBackward = {
    SoftmaxBackwardCpu, internal::SoftmaxBackwardCuda};

// Softmax or log-softmax with autograd; bfloat16 computes in float32.
Tensor SoftmaxOp(const char* op, const Tensor& x, int64_t dim, bool log) {
  CheckFloatingInputs(op, {x});
  if (ComputesOnFloat32Copies(x)) {
    return ComputeInFloat32(
        [&](const Tensor& x32) { return SoftmaxOp(op, x32, dim, log); }, x);
  }
  const int64_t d = NormalizeDim(dim, x.dim(), op);
  Tensor y = Empty(x.shape(), x.dtype(), x.device());
  kSoftmaxForward.For(x.device())(x, d, log, y);
  if (NeedsGrad({x})) {
    RecordOp(op, {x}, {&y}, /*saved=*/{y},
             [op, y = y.detach(), d, log](const Tensors& g) -> Tensors {
               CheckFloatingInputs(op, {g[0], y});
               Tensor gx = Empty(y.shape(), y.dtype(), y.device());
               kSoftmaxBackward.For(y.device())(g[0], y, d, log, gx);
               return {gx};
             });
  }
  return y;
}

}  // namespace

Tensor Softmax(const Tensor& x, int64_t dim) {
  return SoftmaxOp("Softmax", x, dim, /*log=*/false);
}

Tensor LogSoftmax(const Tensor& x, int64_t dim) {
  return SoftmaxOp("LogSoftmax", x, dim, /*log=*/true);
}

}  // namespace lc
