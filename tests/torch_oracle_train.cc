// Oracle ops for the training suite: torch.optim.AdamW (libtorch's C++
// implementation of the same algorithm). "adamw": inputs p, g_1, ..., g_T;
// runs T steps with gradients g_t at a constant learning rate and returns
// the updated p. Attributes: "lr", "beta1", "beta2", "eps", "weight_decay".
#include <torch/optim/adamw.h>

#include "tests/torch_oracle_registry.h"

namespace lc {
namespace testing {
namespace {

LC_REGISTER_TORCH_OP(adamw, [](const TorchTensors& in,
                               const OracleAttrs& attrs) {
  torch::Tensor param = in[0].detach().clone().set_requires_grad(true);
  torch::optim::AdamW optimizer(
      {param}, torch::optim::AdamWOptions(attrs.number("lr"))
                   .betas({attrs.number("beta1"), attrs.number("beta2")})
                   .eps(attrs.number("eps"))
                   .weight_decay(attrs.number("weight_decay")));
  for (size_t t = 1; t < in.size(); ++t) {
    param.mutable_grad() = in[t].detach().clone();
    optimizer.step();
  }
  return TorchTensors{param.detach()};
});

}  // namespace
}  // namespace testing
}  // namespace lc
