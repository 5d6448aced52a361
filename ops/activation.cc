#include "ops/activation.h"

#include <cmath>

#include "ops/elementwise_kernel.h"

namespace lc {
namespace {

constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kGeluTanhCubic = 0.044715;

template <typename T>
T Sigmoid(T v) {
  return 1 / (1 + std::exp(-v));
}

}  // namespace

Tensor Relu(const Tensor& x) {
  return UnaryOp(
      "Relu", x, SavedForBackward::kOutput,
      [](auto v) { return v < 0 ? decltype(v)(0) : v; },
      ElementwiseBackward(
          "Relu", [](auto g, auto y) { return y > 0 ? g : decltype(g)(0); }));
}

Tensor Silu(const Tensor& x) {
  return UnaryOp(
      "Silu", x, SavedForBackward::kInput,
      [](auto v) { return v * Sigmoid(v); },
      ElementwiseBackward("Silu", [](auto g, auto x) {
        const auto s = Sigmoid(x);
        return g * s * (1 + x * (1 - s));
      }));
}

Tensor Gelu(const Tensor& x, GeluApproximation approximation) {
  if (approximation == GeluApproximation::kTanh) {
    return UnaryOp(
        "Gelu", x, SavedForBackward::kInput,
        [](auto v) {
          const auto t =
              std::tanh(kSqrt2OverPi * (v + kGeluTanhCubic * v * v * v));
          return 0.5 * v * (1 + t);
        },
        ElementwiseBackward("Gelu", [](auto g, auto x) {
          const auto t =
              std::tanh(kSqrt2OverPi * (x + kGeluTanhCubic * x * x * x));
          const auto inner_derivative =
              kSqrt2OverPi * (1 + 3 * kGeluTanhCubic * x * x);
          return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * inner_derivative);
        }));
  }
  return UnaryOp(
      "Gelu", x, SavedForBackward::kInput,
      [](auto v) { return 0.5 * v * (1 + std::erf(v * kSqrtHalf)); },
      ElementwiseBackward("Gelu", [](auto g, auto x) {
        const auto cdf = 0.5 * (1 + std::erf(x * kSqrtHalf));
        const auto pdf = kInvSqrt2Pi * std::exp(-0.5 * x * x);
        return g * (cdf + x * pdf);
      }));
}

}  // namespace lc
