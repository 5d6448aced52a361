// Differentiable element-wise arithmetic: binary ops with NumPy broadcasting,
// ops with a scalar, unary math functions and the operators + - * / on
// tensors. Inputs may be float32, float64 or bfloat16 (computed in float32),
// of any strides, on the CPU or a CUDA device (all inputs of a call on one
// device and of one dtype); outputs are new contiguous tensors there.
#ifndef LONGCTX_OPS_ELEMENTWISE_H_
#define LONGCTX_OPS_ELEMENTWISE_H_

#include "core/tensor.h"

namespace lc {

// a op b for a, b of one dtype whose shapes broadcast (NumPy rules); the
// result has the broadcast shape. Gradients are summed back to each input's
// shape.
Tensor Add(const Tensor& a, const Tensor& b);
Tensor Sub(const Tensor& a, const Tensor& b);
Tensor Mul(const Tensor& a, const Tensor& b);
Tensor Div(const Tensor& a, const Tensor& b);

// x + scalar, x * scalar and x ^ exponent; same shape as x.
Tensor AddScalar(const Tensor& x, double scalar);
Tensor MulScalar(const Tensor& x, double scalar);
Tensor PowScalar(const Tensor& x, double exponent);

// Unary functions; same shape as x. Log, Sqrt and Rsqrt give NaN (or inf at
// 0) outside their domain, like libm.
Tensor Neg(const Tensor& x);
Tensor Exp(const Tensor& x);
Tensor Log(const Tensor& x);
Tensor Sqrt(const Tensor& x);
Tensor Rsqrt(const Tensor& x);  // 1 / sqrt(x)
Tensor Tanh(const Tensor& x);
Tensor Square(const Tensor& x);  // x * x

inline Tensor operator+(const Tensor& a, const Tensor& b) { return Add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return Sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return Mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return Div(a, b); }

inline Tensor operator+(const Tensor& x, double s) { return AddScalar(x, s); }
inline Tensor operator-(const Tensor& x, double s) { return AddScalar(x, -s); }
inline Tensor operator*(const Tensor& x, double s) { return MulScalar(x, s); }
inline Tensor operator/(const Tensor& x, double s) {
  return MulScalar(x, 1.0 / s);
}

inline Tensor operator+(double s, const Tensor& x) { return AddScalar(x, s); }
inline Tensor operator-(double s, const Tensor& x) {
  return AddScalar(Neg(x), s);
}
inline Tensor operator*(double s, const Tensor& x) { return MulScalar(x, s); }
inline Tensor operator/(double s, const Tensor& x) {
  return MulScalar(PowScalar(x, -1.0), s);
}

inline Tensor operator-(const Tensor& x) { return Neg(x); }

}  // namespace lc

#endif  // LONGCTX_OPS_ELEMENTWISE_H_
