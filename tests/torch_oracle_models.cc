// Oracle op for the models suite: the transformer language model of
// models/transformer_lm.h written with torch ops, for the same weights.
//
// transformer_lm: inputs tokens, targets (int64 [batch, n]; target -100 is
// ignored), counts ([batch, heads, n, n], detached: the number of attention
// patterns allowing each (query, key) pair, attention/reference_attention.h
// PairCounts), then the model's parameters in NamedParameters order:
//   embed.weight,
//   per block: norm1.weight (, norm1.bias), attn.{q,k,v,out}_proj.{weight,
//   bias}, norm2.weight (, norm2.bias), mlp.fc1.{weight,bias},
//   mlp.fc2.{weight,bias},
//   final_norm.weight (, final_norm.bias), lm_head.weight (untied only).
// Attr numbers: layers, heads, rms (1: RMSNorm eps 1e-6 without bias, 0:
// LayerNorm eps 1e-5 with bias), tied (0 or 1), rope_base, global_count;
// optional softcap (> 0: every attention score s becomes softcap *
// tanh(s / softcap)).
// Outputs: loss (sum of cross-entropy over non-ignored targets divided by
// global_count) and logits [batch, n, vocab].
#include <limits>

#include "tests/torch_oracle_registry.h"

namespace lc {
namespace testing {
namespace {

// Pre-norm transformer pieces, HF conventions.
torch::Tensor Norm(const torch::Tensor& x, const TorchTensors& in, size_t& next,
                   bool rms) {
  if (rms) {
    const torch::Tensor& w = in[next++];
    return x * torch::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + 1e-6) * w;
  }
  const torch::Tensor& w = in[next++];
  const torch::Tensor& b = in[next++];
  return torch::layer_norm(x, {x.size(-1)}, w, b, 1e-5);
}

torch::Tensor Affine(const torch::Tensor& x, const TorchTensors& in,
                     size_t& next) {
  const torch::Tensor& w = in[next++];
  const torch::Tensor& b = in[next++];
  return torch::nn::functional::linear(x, w, b);
}

// x [b, n, h, d] rotated like HF LLaMA: angles t * base^(-2i/d) for
// i < d/2, duplicated over both halves, and rotate_half.
torch::Tensor Rotary(const torch::Tensor& x, double base) {
  const int64_t n = x.size(1), d = x.size(3);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const torch::Tensor inv_freq =
      torch::pow(base, -2.0 * torch::arange(d / 2, f64) / d);
  const torch::Tensor angle =
      torch::outer(torch::arange(n, f64), inv_freq);  // [n, d/2]
  const torch::Tensor full = torch::cat({angle, angle}, -1).view({1, n, 1, d});
  const torch::Tensor x1 = x.slice(-1, 0, d / 2), x2 = x.slice(-1, d / 2);
  const torch::Tensor rotated = torch::cat({-x2, x1}, -1);
  return x * torch::cos(full) + rotated * torch::sin(full);
}

// Attention of q, k, v [b, n, h, d] weighting pair (t, u) by counts[t, u]
// (one softmax; rows without an allowed key give 0), scores soft-capped
// when softcap > 0.
torch::Tensor CountedAttention(const torch::Tensor& q_in,
                               const torch::Tensor& k_in,
                               const torch::Tensor& v_in,
                               const torch::Tensor& counts, double softcap) {
  const double inf = std::numeric_limits<double>::infinity();
  const torch::Tensor q = q_in.permute({0, 2, 1, 3});  // [b, h, n, d]
  const torch::Tensor k = k_in.permute({0, 2, 1, 3});
  const torch::Tensor v = v_in.permute({0, 2, 1, 3});
  torch::Tensor s =
      torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(q.size(-1) * 1.0);
  if (softcap > 0) s = softcap * torch::tanh(s / softcap);
  const torch::Tensor allowed = counts > 0;
  const torch::Tensor logits =
      torch::where(allowed, s + torch::log(counts), torch::full_like(s, -inf));
  const torch::Tensor has_key = allowed.any(-1, /*keepdim=*/true);
  const torch::Tensor lse = torch::logsumexp(
      torch::where(has_key, logits, torch::zeros_like(logits)), -1,
      /*keepdim=*/true);
  const torch::Tensor p = torch::exp(logits - lse);  // 0 where not allowed
  return torch::matmul(p, v).permute({0, 2, 1, 3});
}

LC_REGISTER_TORCH_OP(transformer_lm, [](const TorchTensors& in,
                                        const OracleAttrs& attrs) {
  const torch::Tensor& tokens = in[0];
  const torch::Tensor& targets = in[1];
  const torch::Tensor counts = in[2].detach();
  const int64_t layers = static_cast<int64_t>(attrs.number("layers"));
  const int64_t heads = static_cast<int64_t>(attrs.number("heads"));
  const bool rms = attrs.number("rms") != 0;
  const bool tied = attrs.number("tied") != 0;
  const double rope_base = attrs.number("rope_base");
  const double softcap = attrs.has("softcap") ? attrs.number("softcap") : 0;
  size_t next = 3;
  const torch::Tensor& embed = in[next++];
  const int64_t b = tokens.size(0), n = tokens.size(1), e = embed.size(1);

  torch::Tensor x = torch::embedding(embed, tokens);
  for (int64_t layer = 0; layer < layers; ++layer) {
    const torch::Tensor h = Norm(x, in, next, rms);
    const torch::Tensor q = Affine(h, in, next).view({b, n, heads, -1});
    const torch::Tensor k = Affine(h, in, next).view({b, n, heads, -1});
    const torch::Tensor v = Affine(h, in, next).view({b, n, heads, -1});
    const torch::Tensor o =
        CountedAttention(Rotary(q, rope_base), Rotary(k, rope_base), v, counts,
                         softcap)
            .reshape({b, n, e});
    x = x + Affine(o, in, next);
    const torch::Tensor h2 = Norm(x, in, next, rms);
    const torch::Tensor hidden = torch::gelu(Affine(h2, in, next));
    x = x + Affine(hidden, in, next);
  }
  x = Norm(x, in, next, rms);
  const torch::Tensor& head = tied ? embed : in[next++];
  const torch::Tensor logits = torch::matmul(x, head.t());
  namespace F = torch::nn::functional;
  const torch::Tensor loss =
      F::cross_entropy(
          logits.reshape({b * n, -1}), targets.reshape({b * n}),
          F::CrossEntropyFuncOptions().ignore_index(-100).reduction(
              torch::kSum)) /
      attrs.number("global_count");
  return TorchTensors{loss, logits};
});

}  // namespace
}  // namespace testing
}  // namespace lc
