// Oracle ops for the element-wise, activation, reduction and softmax suites.
// Scalars come as numbers ("scalar", "exponent", "dim", "keepdim"), dim lists
// and shapes as lists ("dims", "shape") and the GELU approximation as the
// string "approximate" ("none" or "tanh").
#include "tests/torch_oracle_registry.h"

namespace lc {
namespace testing {
namespace {

bool KeepDim(const OracleAttrs& attrs) {
  return attrs.has("keepdim") && attrs.number("keepdim") != 0;
}

int64_t Dim(const OracleAttrs& attrs) {
  return static_cast<int64_t>(attrs.number("dim"));
}

LC_REGISTER_TORCH_OP(add, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{in[0] + in[1]};
});
LC_REGISTER_TORCH_OP(sub, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{in[0] - in[1]};
});
LC_REGISTER_TORCH_OP(mul, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{in[0] * in[1]};
});
LC_REGISTER_TORCH_OP(div, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{in[0] / in[1]};
});

LC_REGISTER_TORCH_OP(add_scalar,
                     [](const TorchTensors& in, const OracleAttrs& attrs) {
                       return TorchTensors{in[0] + attrs.number("scalar")};
                     });
LC_REGISTER_TORCH_OP(mul_scalar,
                     [](const TorchTensors& in, const OracleAttrs& attrs) {
                       return TorchTensors{in[0] * attrs.number("scalar")};
                     });
LC_REGISTER_TORCH_OP(pow_scalar, [](const TorchTensors& in,
                                    const OracleAttrs& attrs) {
  return TorchTensors{torch::pow(in[0], attrs.number("exponent"))};
});

LC_REGISTER_TORCH_OP(neg, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{-in[0]};
});
LC_REGISTER_TORCH_OP(exp, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{torch::exp(in[0])};
});
LC_REGISTER_TORCH_OP(log, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{torch::log(in[0])};
});
LC_REGISTER_TORCH_OP(sqrt, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{torch::sqrt(in[0])};
});
LC_REGISTER_TORCH_OP(rsqrt, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{torch::rsqrt(in[0])};
});
LC_REGISTER_TORCH_OP(tanh, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{torch::tanh(in[0])};
});
LC_REGISTER_TORCH_OP(square, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{torch::square(in[0])};
});

LC_REGISTER_TORCH_OP(relu, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{torch::relu(in[0])};
});
LC_REGISTER_TORCH_OP(silu, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{torch::silu(in[0])};
});
LC_REGISTER_TORCH_OP(gelu, [](const TorchTensors& in,
                              const OracleAttrs& attrs) {
  return TorchTensors{torch::gelu(in[0], attrs.string("approximate"))};
});

// Over attrs "dims" when given, else over all elements.
LC_REGISTER_TORCH_OP(sum, [](const TorchTensors& in, const OracleAttrs& attrs) {
  if (!attrs.has("dims")) return TorchTensors{torch::sum(in[0])};
  return TorchTensors{torch::sum(in[0], attrs.list("dims"), KeepDim(attrs))};
});
LC_REGISTER_TORCH_OP(mean, [](const TorchTensors& in,
                              const OracleAttrs& attrs) {
  if (!attrs.has("dims")) return TorchTensors{torch::mean(in[0])};
  return TorchTensors{torch::mean(in[0], attrs.list("dims"), KeepDim(attrs))};
});
LC_REGISTER_TORCH_OP(max, [](const TorchTensors& in, const OracleAttrs& attrs) {
  return TorchTensors{
      std::get<0>(torch::max(in[0], Dim(attrs), KeepDim(attrs)))};
});
LC_REGISTER_TORCH_OP(sum_to_shape, [](const TorchTensors& in,
                                      const OracleAttrs& attrs) {
  return TorchTensors{in[0].sum_to_size(attrs.list("shape"))};
});

LC_REGISTER_TORCH_OP(softmax,
                     [](const TorchTensors& in, const OracleAttrs& attrs) {
                       return TorchTensors{torch::softmax(in[0], Dim(attrs))};
                     });
LC_REGISTER_TORCH_OP(log_softmax, [](const TorchTensors& in,
                                     const OracleAttrs& attrs) {
  return TorchTensors{torch::log_softmax(in[0], Dim(attrs))};
});

}  // namespace
}  // namespace testing
}  // namespace lc
