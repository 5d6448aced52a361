#include "ops/elementwise.h"

#include "core/autograd.h"
#include "ops/cpu_kernel.h"
#include "ops/device_kernel.h"
#include "ops/elementwise_functors.h"
#include "ops/elementwise_kernel.h"
#include "ops/reduce.h"

namespace lc {
namespace {

// The driver of the broadcasting binary ops: y = forward(a, b) element-wise
// over BroadcastShapes(a, b) (forward a binary functor for MapElements).
// grad_a(g, a, b) and grad_b(g, a, b) return the gradients at the broadcast
// shape (a and b are undefined there unless `save_inputs`); they are summed
// back to each input's shape and only computed for inputs that need them.
template <typename Forward, typename GradA, typename GradB>
Tensor BinaryOp(const char* op, const Tensor& a, const Tensor& b,
                bool save_inputs, const Forward& forward, const GradA& grad_a,
                const GradB& grad_b) {
  CheckFloatingInputs(op, {a, b});
  if (ComputesOnFloat32Copies(a)) {
    return ComputeInFloat32(
        [&](const Tensor& a32, const Tensor& b32) {
          return BinaryOp(op, a32, b32, save_inputs, forward, grad_a, grad_b);
        },
        a, b);
  }
  const Shape shape = BroadcastShapes(a.shape(), b.shape(), op);
  Tensor y = MapElements<2>(op, {a, b}, shape, forward);
  if (NeedsGrad({a, b})) {
    RecordOp(
        op, {a, b}, {&y}, /*saved=*/save_inputs ? Tensors{a, b} : Tensors{},
        [a_shape = a.shape(), b_shape = b.shape(), needs_a = a.requires_grad(),
         needs_b = b.requires_grad(), a = save_inputs ? a.detach() : Tensor(),
         b = save_inputs ? b.detach() : Tensor(), grad_a,
         grad_b](const Tensors& g) -> Tensors {
          Tensors grads(2);
          if (needs_a) grads[0] = SumToShape(grad_a(g[0], a, b), a_shape);
          if (needs_b) grads[1] = SumToShape(grad_b(g[0], a, b), b_shape);
          return grads;
        });
  }
  return y;
}

}  // namespace

Tensor Add(const Tensor& a, const Tensor& b) {
  const auto pass_through = [](const Tensor& g, const Tensor&, const Tensor&) {
    return g;
  };
  return BinaryOp("Add", a, b, /*save_inputs=*/false, AddFn(), pass_through,
                  pass_through);
}

Tensor Sub(const Tensor& a, const Tensor& b) {
  return BinaryOp(
      "Sub", a, b, /*save_inputs=*/false, SubFn(),
      [](const Tensor& g, const Tensor&, const Tensor&) { return g; },
      [](const Tensor& g, const Tensor&, const Tensor&) { return Neg(g); });
}

Tensor Mul(const Tensor& a, const Tensor& b) {
  return BinaryOp(
      "Mul", a, b, /*save_inputs=*/true, MulFn(),
      [](const Tensor& g, const Tensor&, const Tensor& b) { return Mul(g, b); },
      [](const Tensor& g, const Tensor& a, const Tensor&) {
        return Mul(g, a);
      });
}

Tensor Div(const Tensor& a, const Tensor& b) {
  return BinaryOp(
      "Div", a, b, /*save_inputs=*/true, DivFn(),
      [](const Tensor& g, const Tensor&, const Tensor& b) { return Div(g, b); },
      [](const Tensor& g, const Tensor& a, const Tensor& b) {
        return MapElements<3>("Div", {g, a, b}, g.shape(), DivGradBFn());
      });
}

Tensor AddScalar(const Tensor& x, double scalar) {
  return UnaryOp("AddScalar", x, SavedForBackward::kNothing,
                 AddScalarFn{scalar},
                 [](const Tensor& g, const Tensor&) { return g; });
}

Tensor MulScalar(const Tensor& x, double scalar) {
  return UnaryOp("MulScalar", x, SavedForBackward::kNothing,
                 MulScalarFn{scalar}, [scalar](const Tensor& g, const Tensor&) {
                   return MulScalar(g, scalar);
                 });
}

Tensor PowScalar(const Tensor& x, double exponent) {
  return UnaryOp("PowScalar", x, SavedForBackward::kInput,
                 PowScalarFn{exponent},
                 [exponent](const Tensor& g, const Tensor& x) {
                   // x^0 is constant; exponent * x^-1 would give NaN at 0.
                   if (exponent == 0) return ZerosLike(g);
                   return MapElements<2>("PowScalar", {g, x}, x.shape(),
                                         PowScalarGradFn{exponent});
                 });
}

Tensor Neg(const Tensor& x) {
  return UnaryOp("Neg", x, SavedForBackward::kNothing, NegFn(),
                 [](const Tensor& g, const Tensor&) { return Neg(g); });
}

Tensor Exp(const Tensor& x) {
  return UnaryOp("Exp", x, SavedForBackward::kOutput, ExpFn(),
                 ElementwiseBackward("Exp", MulFn()));  // g * y
}

Tensor Log(const Tensor& x) {
  return UnaryOp("Log", x, SavedForBackward::kInput, LogFn(),
                 ElementwiseBackward("Log", DivFn()));  // g / x
}

Tensor Sqrt(const Tensor& x) {
  return UnaryOp("Sqrt", x, SavedForBackward::kOutput, SqrtFn(),
                 ElementwiseBackward("Sqrt", SqrtGradFn()));
}

Tensor Rsqrt(const Tensor& x) {
  return UnaryOp("Rsqrt", x, SavedForBackward::kOutput, RsqrtFn(),
                 ElementwiseBackward("Rsqrt", RsqrtGradFn()));
}

Tensor Tanh(const Tensor& x) {
  return UnaryOp("Tanh", x, SavedForBackward::kOutput, TanhFn(),
                 ElementwiseBackward("Tanh", TanhGradFn()));
}

Tensor Square(const Tensor& x) {
  return UnaryOp("Square", x, SavedForBackward::kInput, SquareFn(),
                 ElementwiseBackward("Square", SquareGradFn()));
}

}  // namespace lc
