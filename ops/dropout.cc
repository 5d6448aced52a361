#include "ops/dropout.h"

#include "core/autograd.h"
#include "ops/cpu_kernel.h"
#include "ops/device_kernel.h"
#include "ops/dropout_cuda.h"

namespace lc {
namespace {

void CheckProbability(const char* op, double p) {
  LC_REQUIRE(p >= 0 && p < 1, op, ": p = ", p, " (expected 0 <= p < 1)");
}

// out[i] = UniformAt(seed, offset, i) >= p ? in[i] * scale : 0 for dense in
// and out of n elements. The forward applies it to x, the backward to the
// output gradient (the same mask).
template <typename T>
void DropoutLoop(const T* in, int64_t n, uint64_t seed, uint64_t offset,
                 double p, double scale, T* out) {
#pragma omp parallel for schedule(static) if (n > 16384)
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = UniformAt(seed, offset, static_cast<uint64_t>(i)) >= p;
    out[i] = keep ? static_cast<T>(in[i] * scale) : T(0);
  }
}

// out[i] = UniformAt(seed, offset, i) >= p ? in[i] / (1 - p) : 0 for every
// row-major index i of `in` (any strides); out is contiguous, of in's shape,
// dtype and device.
using DropoutKernel = void(const Tensor& in, uint64_t seed, uint64_t offset,
                           double p, const Tensor& out);

// DropoutKernel on the CPU.
void DropoutCpu(const Tensor& in, uint64_t seed, uint64_t offset, double p,
                const Tensor& out) {
  const Tensor dense = in.contiguous();
  LC_DISPATCH_FLOATING(in.dtype(), "Dropout", [&] {
    DropoutLoop(dense.data<scalar_t>(), dense.numel(), seed, offset, p,
                1.0 / (1.0 - p), out.data<scalar_t>());
  });
}

constexpr PerDevice<DropoutKernel*> kDropout = {DropoutCpu,
                                                internal::DropoutCuda};

// Applies the mask to a tensor of any strides, indexing it row-major.
Tensor ApplyMask(const Tensor& t, uint64_t seed, uint64_t offset, double p) {
  Tensor out = Empty(t.shape(), t.dtype(), t.device());
  kDropout.For(t.device())(t, seed, offset, p, out);
  return out;
}

}  // namespace

Tensor Dropout(const Tensor& x, double p, bool training, Generator* gen) {
  CheckFloatingInputs("Dropout", {x});
  CheckProbability("Dropout", p);
  if (!training || p == 0) return x;
  if (ComputesOnFloat32Copies(x)) {
    return ComputeInFloat32(
        [&](const Tensor& x32) { return Dropout(x32, p, training, gen); }, x);
  }
  Generator& generator = gen != nullptr ? *gen : DefaultGenerator();
  const uint64_t seed = generator.seed();
  const uint64_t offset = generator.NextOffset();
  Tensor out = ApplyMask(x.detach(), seed, offset, p);
  if (NeedsGrad({x})) {
    RecordOp("Dropout", {x}, {&out},
             [seed, offset, p](const Tensors& g) -> Tensors {
               return {ApplyMask(g[0], seed, offset, p)};
             });
  }
  return out;
}

namespace nn {

Dropout::Dropout(double p) : p_(p) { CheckProbability("nn::Dropout", p); }

Tensor Dropout::Forward(const Tensor& x) const {
  return ::lc::Dropout(x, p_, is_training());
}

}  // namespace nn
}  // namespace lc
