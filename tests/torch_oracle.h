// The libtorch oracle for tests: runs a named op in PyTorch's C++ library
// (CPU, float64 copies of the inputs), backpropagates the given output
// gradients and returns outputs and input gradients as lc tensors. Only the
// oracle's own .cc files include torch/torch.h (it costs ~15 s per file).
#ifndef LONGCTX_TESTS_TORCH_ORACLE_H_
#define LONGCTX_TESTS_TORCH_ORACLE_H_

#include <map>
#include <string>
#include <vector>

#include "core/autograd.h"

namespace lc {
namespace testing {

// Non-tensor arguments of an oracle op, by name.
struct OracleAttrs {
  std::map<std::string, double> numbers;
  std::map<std::string, std::vector<int64_t>> lists;
  std::map<std::string, std::string> strings;

  // Lookups that fail the test (CHECK) when the key is missing.
  double number(const std::string& key) const;
  const std::vector<int64_t>& list(const std::string& key) const;
  const std::string& string(const std::string& key) const;
  bool has(const std::string& key) const;
};

struct OracleResult {
  Tensors outputs;      // float64 (or int64) CPU tensors
  Tensors input_grads;  // one per input; undefined for non-float inputs or
                        // inputs the outputs do not depend on
};

// Runs op `name` (registered with LC_REGISTER_TORCH_OP in a
// tests/torch_oracle_*.cc file). Floating inputs become float64 torch
// tensors with requires_grad; int64/uint8 inputs keep their type. When
// `grad_outputs` is non-empty (one per output; undefined entries are
// skipped), runs torch's backward and fills input_grads.
OracleResult RunTorchOp(const std::string& name, const Tensors& inputs,
                        const OracleAttrs& attrs = {},
                        const Tensors& grad_outputs = {});

}  // namespace testing
}  // namespace lc

#endif  // LONGCTX_TESTS_TORCH_ORACLE_H_
