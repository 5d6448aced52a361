// Oracle op for the attention suites: attention under explicit per-pair
// weights (SPEC section 2), with torch ops and torch autograd.
//
// masked_attention: inputs q, k, v [batch, n, heads, head_dim] (differentiated)
// and counts, keep [batch, heads, n, n] (detached: they get no gradient) -
// counts[t, u] is the number of patterns allowing the pair (0 = not allowed)
// and keep[t, u] the sum of their dropout keep factors (keep = counts without
// dropout); attr number "scale", optional attr number "softcap" (> 0: s
// becomes softcap * tanh(s / softcap)). With s = scale * q.k per head:
//   lse = logsumexp_u(s + log counts)   (-inf for a row with no allowed key)
//   out = (keep * exp(s - lse)) @ v      (0 for a row with no allowed key)
// Outputs out [batch, n, heads, head_dim] and lse [batch, heads, n]. Rows with
// no allowed key give no NaN in any gradient. Optional attr number
// "empty_lse" replaces the -inf lse of such rows (for comparisons that cannot
// match -inf with -inf).
#include <limits>

#include "tests/torch_oracle_registry.h"

namespace lc {
namespace testing {
namespace {

LC_REGISTER_TORCH_OP(masked_attention, [](const TorchTensors& in,
                                          const OracleAttrs& attrs) {
  const torch::Tensor q = in[0].permute({0, 2, 1, 3});  // [b, h, n, d]
  const torch::Tensor k = in[1].permute({0, 2, 1, 3});
  const torch::Tensor v = in[2].permute({0, 2, 1, 3});
  const torch::Tensor counts = in[3].detach();  // [b, h, n, n]
  const torch::Tensor keep = in[4].detach();
  const double inf = std::numeric_limits<double>::infinity();

  torch::Tensor s =
      attrs.number("scale") * torch::matmul(q, k.transpose(-1, -2));
  if (attrs.has("softcap")) {
    const double cap = attrs.number("softcap");
    s = cap * torch::tanh(s / cap);
  }
  const torch::Tensor allowed = counts > 0;
  const torch::Tensor neg_inf = torch::full_like(s, -inf);
  // Scores of allowed pairs, -inf elsewhere; where() sends no gradient to
  // the unselected side, so s gets none from disallowed pairs.
  const torch::Tensor allowed_s = torch::where(allowed, s, neg_inf);
  // log counts weights a pair once per pattern; log 0 = -inf is never
  // selected (allowed_s is already -inf there).
  const torch::Tensor logits =
      torch::where(allowed, allowed_s + torch::log(counts), neg_inf);
  const torch::Tensor has_key = allowed.any(-1, /*keepdim=*/true);
  // logsumexp of an all -inf row is -inf with NaN gradients: take it over
  // zeros for such rows, and put -inf back below.
  const torch::Tensor safe_lse = torch::logsumexp(
      torch::where(has_key, logits, torch::zeros_like(logits)), -1,
      /*keepdim=*/true);
  // exp(-inf - finite) = 0 for disallowed pairs and for empty rows, so their
  // out rows are 0; keep = 0 drops a pair.
  const torch::Tensor p = keep * torch::exp(allowed_s - safe_lse);
  const torch::Tensor out = torch::matmul(p, v).permute({0, 2, 1, 3});
  const double empty =
      attrs.has("empty_lse") ? attrs.number("empty_lse") : -inf;
  const torch::Tensor lse =
      torch::where(has_key, safe_lse, torch::full_like(safe_lse, empty))
          .squeeze(-1);
  return TorchTensors{out, lse};
});

}  // namespace
}  // namespace testing
}  // namespace lc
