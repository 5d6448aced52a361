// Registration of oracle ops, for the tests/torch_oracle_*.cc files only
// (this header includes torch/torch.h):
//   LC_REGISTER_TORCH_OP(exp, [](const TorchTensors& in, const OracleAttrs&) {
//     return TorchTensors{torch::exp(in[0])};
//   });
#ifndef LONGCTX_TESTS_TORCH_ORACLE_REGISTRY_H_
#define LONGCTX_TESTS_TORCH_ORACLE_REGISTRY_H_

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "tests/torch_oracle.h"

namespace lc {
namespace testing {

using TorchTensors = std::vector<torch::Tensor>;
using TorchOpFn =
    std::function<TorchTensors(const TorchTensors&, const OracleAttrs&)>;

// Returns true so it can initialize a static.
bool RegisterTorchOp(const std::string& name, TorchOpFn fn);

}  // namespace testing
}  // namespace lc

#define LC_REGISTER_TORCH_OP(name, ...)             \
  static const bool lc_torch_op_registered_##name = \
      ::lc::testing::RegisterTorchOp(#name, __VA_ARGS__)

#endif  // LONGCTX_TESTS_TORCH_ORACLE_REGISTRY_H_
