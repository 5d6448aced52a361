// The element-wise formulas of ops/ (arithmetic, math functions, activations
// and their gradients) as small functors, each the one definition of its
// formula for the CPU loops (ops/elementwise_kernel.h) and the CUDA map kernel
// (ops/elementwise_cuda.cu). operator() is templated on the compute type T
// (float or double; bfloat16 computes in float) and computes in T: scalars
// the functor holds as double are rounded to T first.
#ifndef LONGCTX_OPS_ELEMENTWISE_FUNCTORS_H_
#define LONGCTX_OPS_ELEMENTWISE_FUNCTORS_H_

#include <cmath>

#include "core/philox.h"  // LC_HOST_DEVICE

namespace lc {

struct AddFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T a, T b) const {
    return a + b;
  }
};

struct SubFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T a, T b) const {
    return a - b;
  }
};

struct MulFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T a, T b) const {
    return a * b;
  }
};

struct DivFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T a, T b) const {
    return a / b;
  }
};

// d(a / b) / db times g: -g * a / b^2.
struct DivGradBFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T g, T a, T b) const {
    return -g * a / (b * b);
  }
};

struct AddScalarFn {
  double scalar;
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return v + static_cast<T>(scalar);
  }
};

struct MulScalarFn {
  double scalar;
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return v * static_cast<T>(scalar);
  }
};

struct PowScalarFn {
  double exponent;
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return std::pow(v, static_cast<T>(exponent));
  }
};

// The gradient of PowScalar for exponent != 0 (the caller returns zeros for
// 0, where exponent * x^-1 would give NaN at x = 0): g * e * x^(e - 1).
struct PowScalarGradFn {
  double exponent;
  template <typename T>
  LC_HOST_DEVICE T operator()(T g, T x) const {
    return g * static_cast<T>(exponent) *
           std::pow(x, static_cast<T>(exponent - 1));
  }
};

struct NegFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return -v;
  }
};

struct ExpFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return std::exp(v);
  }
};

struct LogFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return std::log(v);
  }
};

struct SqrtFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return std::sqrt(v);
  }
};

// The gradient of y = sqrt(x) from y: g / (2 y).
struct SqrtGradFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T g, T y) const {
    return g / (2 * y);
  }
};

struct RsqrtFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return 1 / std::sqrt(v);
  }
};

// The gradient of y = 1 / sqrt(x) from y: -g y^3 / 2.
struct RsqrtGradFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T g, T y) const {
    return static_cast<T>(-0.5) * g * y * y * y;
  }
};

struct TanhFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return std::tanh(v);
  }
};

// The gradient of y = tanh(x) from y: g (1 - y^2).
struct TanhGradFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T g, T y) const {
    return g * (1 - y * y);
  }
};

struct SquareFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return v * v;
  }
};

// The gradient of x^2: 2 g x.
struct SquareGradFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T g, T x) const {
    return 2 * g * x;
  }
};

// max(v, 0); NaN stays NaN.
struct ReluFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return v < 0 ? T(0) : v;
  }
};

// The gradient of y = relu(x) from y: g where y > 0, else 0 (0 at x = 0).
struct ReluGradFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T g, T y) const {
    return y > 0 ? g : T(0);
  }
};

template <typename T>
LC_HOST_DEVICE T Sigmoid(T v) {
  return 1 / (1 + std::exp(-v));
}

// x * sigmoid(x).
struct SiluFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return v * Sigmoid(v);
  }
};

// The gradient of silu: g s (1 + x (1 - s)), s = sigmoid(x).
struct SiluGradFn {
  template <typename T>
  LC_HOST_DEVICE T operator()(T g, T x) const {
    const T s = Sigmoid(x);
    return g * s * (1 + x * (1 - s));
  }
};

// erf for float and double on the host and the device (libstdc++'s
// std::erf(float) is a host-only constexpr function).
LC_HOST_DEVICE inline float Erf(float v) { return ::erff(v); }
LC_HOST_DEVICE inline double Erf(double v) { return ::erf(v); }

// Constants of the GELU formulas.
struct GeluConstants {
  static constexpr double kSqrtHalf = 0.70710678118654752440;     // 1/sqrt(2)
  static constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/sqrt(2pi)
  static constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2/pi)
  static constexpr double kTanhCubic = 0.044715;
};

// Exact GELU: x Phi(x) = x (1 + erf(x / sqrt(2))) / 2.
struct GeluErfFn : GeluConstants {
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    return static_cast<T>(0.5) * v * (1 + Erf(v * static_cast<T>(kSqrtHalf)));
  }
};

// The gradient of exact GELU: g (Phi(x) + x phi(x)).
struct GeluErfGradFn : GeluConstants {
  template <typename T>
  LC_HOST_DEVICE T operator()(T g, T x) const {
    const T cdf =
        static_cast<T>(0.5) * (1 + Erf(x * static_cast<T>(kSqrtHalf)));
    const T pdf =
        static_cast<T>(kInvSqrt2Pi) * std::exp(static_cast<T>(-0.5) * x * x);
    return g * (cdf + x * pdf);
  }
};

// Tanh GELU: x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2.
struct GeluTanhFn : GeluConstants {
  template <typename T>
  LC_HOST_DEVICE T operator()(T v) const {
    const T t = std::tanh(static_cast<T>(kSqrt2OverPi) *
                          (v + static_cast<T>(kTanhCubic) * v * v * v));
    return static_cast<T>(0.5) * v * (1 + t);
  }
};

// The gradient of tanh GELU: g ((1 + t) / 2 + x (1 - t^2) u' / 2), with t the
// tanh above and u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
struct GeluTanhGradFn : GeluConstants {
  template <typename T>
  LC_HOST_DEVICE T operator()(T g, T x) const {
    const T t = std::tanh(static_cast<T>(kSqrt2OverPi) *
                          (x + static_cast<T>(kTanhCubic) * x * x * x));
    const T inner_derivative = static_cast<T>(kSqrt2OverPi) *
                               (1 + static_cast<T>(3 * kTanhCubic) * x * x);
    return g * (static_cast<T>(0.5) * (1 + t) +
                static_cast<T>(0.5) * x * (1 - t * t) * inner_derivative);
  }
};

}  // namespace lc

#endif  // LONGCTX_OPS_ELEMENTWISE_FUNCTORS_H_
