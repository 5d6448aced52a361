#include "ops/rope.h"

#include <cmath>
#include <limits>
#include <vector>

#include "core/autograd.h"
#include "ops/cpu_kernel.h"
#include "ops/device_kernel.h"
#include "ops/rope_cuda.h"
#include "ops/shape_ops.h"

namespace lc {
namespace {

// out = x rotated by sign * angle (see ApplyRotary) for dense x and out
// [batch, n, heads, head_dim]; sign = -1 is the inverse rotation, which is
// also the backward of sign = +1.
template <typename T>
void RotaryLoop(const T* x, const int64_t* positions, int64_t batch, int64_t n,
                int64_t heads, int64_t head_dim, double base, double sign,
                T* out) {
  const int64_t half = head_dim / 2;
  std::vector<T> cos_table(n * half);
  std::vector<T> sin_table(n * half);
  for (int64_t i = 0; i < half; ++i) {
    const double inv_freq = std::pow(base, -2.0 * i / head_dim);
    for (int64_t t = 0; t < n; ++t) {
      const double angle = static_cast<double>(positions[t]) * inv_freq;
      cos_table[t * half + i] = static_cast<T>(std::cos(angle));
      sin_table[t * half + i] = static_cast<T>(sign * std::sin(angle));
    }
  }
  const int64_t vectors = batch * n * heads;
#pragma omp parallel for schedule(static) if (vectors * head_dim > 4096)
  for (int64_t v = 0; v < vectors; ++v) {
    const int64_t t = (v / heads) % n;
    const T* cs = cos_table.data() + t * half;
    const T* sn = sin_table.data() + t * half;
    const T* xv = x + v * head_dim;
    T* ov = out + v * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const T lo = xv[i];
      const T hi = xv[i + half];
      ov[i] = lo * cs[i] - hi * sn[i];
      ov[i + half] = hi * cs[i] + lo * sn[i];
    }
  }
}

// out = x rotated by sign * angle for x [batch, n, heads, head_dim] (any
// strides) and positions (dense int64 [n]) on one device; out is dense, of
// x's shape and dtype.
using RotaryKernel = void(const Tensor& x, const Tensor& positions, double base,
                          double sign, const Tensor& out);

// RotaryKernel on the CPU.
void RotaryCpu(const Tensor& x, const Tensor& positions, double base,
               double sign, const Tensor& out) {
  const Tensor xc = x.contiguous();
  LC_DISPATCH_FLOATING(x.dtype(), "ApplyRotary", [&] {
    RotaryLoop(xc.data<scalar_t>(), positions.data<int64_t>(), x.size(0),
               x.size(1), x.size(2), x.size(3), base, sign,
               out.data<scalar_t>());
  });
}

// A device's rotation and the largest head_dim it takes.
struct Rotary {
  RotaryKernel* rotate;
  int64_t max_head_dim;
};

constexpr PerDevice<Rotary> kRotary = {
    {RotaryCpu, std::numeric_limits<int64_t>::max()},
    {internal::RotaryCuda, internal::kMaxRotaryHeadDimCuda}};

// Rotates a [batch, n, heads, head_dim] tensor by sign * angle; positions
// are dense int64 on x's device.
Tensor Rotate(const Tensor& x, const Tensor& positions, double base,
              double sign) {
  Tensor out = Empty(x.shape(), x.dtype(), x.device());
  kRotary.For(x.device()).rotate(x, positions, base, sign, out);
  return out;
}

}  // namespace

Tensor ApplyRotary(const Tensor& x, const Tensor& positions, double base) {
  CheckFloatingInputs("ApplyRotary", {x});
  LC_REQUIRE(x.dim() == 4, "ApplyRotary: x has shape ",
             ShapeToString(x.shape()),
             " (expected 4-D [batch, n, heads, head_dim])");
  LC_REQUIRE(x.size(3) % 2 == 0, "ApplyRotary: head_dim = ", x.size(3),
             " of x ", ShapeToString(x.shape()), " is odd (expected even)");
  CheckIndexTensor("ApplyRotary", "positions", positions, x.device());
  LC_REQUIRE(positions.shape() == Shape{x.size(1)},
             "ApplyRotary: positions have shape ",
             ShapeToString(positions.shape()), " but x has shape ",
             ShapeToString(x.shape()), " (expected [", x.size(1), "])");
  LC_REQUIRE(base > 0, "ApplyRotary: base = ", base, " (expected > 0)");
  // Only CUDA has a limit, so the message names it.
  const int64_t max_head_dim = kRotary.For(x.device()).max_head_dim;
  LC_REQUIRE(x.size(3) <= max_head_dim, "ApplyRotary: head_dim = ", x.size(3),
             " of x ", ShapeToString(x.shape()), " on ", x.device().ToString(),
             " (expected at most ", max_head_dim, " on CUDA)");
  if (ComputesOnFloat32Copies(x)) {
    return ComputeInFloat32(
        [&](const Tensor& x32) { return ApplyRotary(x32, positions, base); },
        x);
  }
  const Tensor pos = positions.to(x.device()).contiguous();
  Tensor out = Rotate(x.detach(), pos, base, 1.0);
  if (NeedsGrad({x})) {
    RecordOp("ApplyRotary", {x}, {&out}, /*saved=*/{pos},
             [pos, base](const Tensors& g) -> Tensors {
               return {Rotate(g[0], pos, base, -1.0)};
             });
  }
  return out;
}

}  // namespace lc
