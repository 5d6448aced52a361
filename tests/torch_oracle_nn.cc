// Oracle ops for the matmul, norm, embedding, loss, rope, shape-op and layer
// suites. Attributes: "transpose_a"/"transpose_b" (0 or 1), "eps", "dim",
// "ignore_index" and "base" as numbers, cross_entropy's "reduction" ("mean",
// the default, or "sum") as a string, split sizes as the list "sizes";
// dropout's "p", "seed" and "offset" as numbers.
// Optional tensor inputs (norm weight and bias, linear bias) may be
// undefined.
#include <string>
#include <vector>

#include "core/check.h"
#include "core/random.h"
#include "tests/torch_oracle_registry.h"

namespace lc {
namespace testing {
namespace {

bool Flag(const OracleAttrs& attrs, const std::string& key) {
  return attrs.has(key) && attrs.number(key) != 0;
}

int64_t Dim(const OracleAttrs& attrs) {
  return static_cast<int64_t>(attrs.number("dim"));
}

LC_REGISTER_TORCH_OP(matmul, [](const TorchTensors& in,
                                const OracleAttrs& attrs) {
  const torch::Tensor a =
      Flag(attrs, "transpose_a") ? in[0].transpose(-1, -2) : in[0];
  const torch::Tensor b =
      Flag(attrs, "transpose_b") ? in[1].transpose(-1, -2) : in[1];
  return TorchTensors{torch::matmul(a, b)};
});

LC_REGISTER_TORCH_OP(layer_norm, [](const TorchTensors& in,
                                    const OracleAttrs& attrs) {
  return TorchTensors{torch::layer_norm(in[0], {in[0].size(-1)}, in[1], in[2],
                                        attrs.number("eps"))};
});

// torch 1.13 has no rms_norm: x * rsqrt(mean(x^2) + eps) * weight.
LC_REGISTER_TORCH_OP(rms_norm, [](const TorchTensors& in,
                                  const OracleAttrs& attrs) {
  torch::Tensor y =
      in[0] * torch::rsqrt(in[0].pow(2).mean(-1, /*keepdim=*/true) +
                           attrs.number("eps"));
  if (in[1].defined()) y = y * in[1];
  return TorchTensors{y};
});

LC_REGISTER_TORCH_OP(embedding, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{torch::embedding(in[0], in[1])};
});

LC_REGISTER_TORCH_OP(cross_entropy, [](const TorchTensors& in,
                                       const OracleAttrs& attrs) {
  namespace F = torch::nn::functional;
  F::CrossEntropyFuncOptions options;
  options.ignore_index(static_cast<int64_t>(attrs.number("ignore_index")));
  if (attrs.has("reduction")) {
    const std::string& reduction = attrs.string("reduction");
    LC_CHECK(reduction == "mean" || reduction == "sum")
        << "cross_entropy: reduction " << reduction;
    if (reduction == "sum") options.reduction(torch::kSum);
  }
  return TorchTensors{F::cross_entropy(in[0], in[1], options)};
});

// HF LLaMA's rotary embedding: cat(freqs, freqs) angles and rotate_half.
LC_REGISTER_TORCH_OP(rope, [](const TorchTensors& in,
                              const OracleAttrs& attrs) {
  const torch::Tensor& x = in[0];  // [batch, n, heads, head_dim]
  const int64_t head_dim = x.size(-1);
  const torch::Tensor inv_freq =
      torch::pow(attrs.number("base"),
                 -torch::arange(0, head_dim, 2, torch::kFloat64) / head_dim);
  const torch::Tensor freqs =
      torch::outer(in[1].to(torch::kFloat64), inv_freq);  // [n, head_dim / 2]
  const torch::Tensor angles =
      torch::cat({freqs, freqs}, -1).unsqueeze(0).unsqueeze(2);
  const std::vector<torch::Tensor> halves = x.chunk(2, -1);
  const torch::Tensor rotated = torch::cat({-halves[1], halves[0]}, -1);
  return TorchTensors{x * angles.cos() + rotated * angles.sin()};
});

LC_REGISTER_TORCH_OP(concat,
                     [](const TorchTensors& in, const OracleAttrs& attrs) {
                       return TorchTensors{torch::cat(in, Dim(attrs))};
                     });

LC_REGISTER_TORCH_OP(split, [](const TorchTensors& in,
                               const OracleAttrs& attrs) {
  return torch::split_with_sizes(in[0], attrs.list("sizes"), Dim(attrs));
});

LC_REGISTER_TORCH_OP(index_select, [](const TorchTensors& in,
                                      const OracleAttrs& attrs) {
  return TorchTensors{torch::index_select(in[0], Dim(attrs), in[1])};
});

LC_REGISTER_TORCH_OP(linear, [](const TorchTensors& in, const OracleAttrs&) {
  return TorchTensors{torch::linear(in[0], in[1], in[2])};
});

// Dropout from the same Philox draws as ops/dropout.h: x * mask / (1 - p)
// with mask[i] = UniformAt(seed, offset, i) >= p for i the row-major index
// of each element (attributes "p", "seed", "offset").
LC_REGISTER_TORCH_OP(dropout, [](const TorchTensors& in,
                                 const OracleAttrs& attrs) {
  const double p = attrs.number("p");
  const auto seed = static_cast<uint64_t>(attrs.number("seed"));
  const auto offset = static_cast<uint64_t>(attrs.number("offset"));
  const torch::Tensor& x = in[0];
  std::vector<double> mask(x.numel());
  for (size_t i = 0; i < mask.size(); ++i) {
    mask[i] = UniformAt(seed, offset, i) >= p ? 1.0 : 0.0;
  }
  const torch::Tensor keep =
      torch::tensor(mask, torch::kFloat64).reshape(x.sizes());
  return TorchTensors{x * keep / (1 - p)};
});

}  // namespace
}  // namespace testing
}  // namespace lc
