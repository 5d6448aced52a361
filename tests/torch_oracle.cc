// Conversion between lc and torch tensors, the op registry, and
// RunTorchOp.
#include <map>
#include <mutex>

#include "gtest/gtest.h"
#include "tests/torch_oracle_registry.h"

namespace lc {
namespace testing {
namespace {

std::map<std::string, TorchOpFn>& Registry() {
  static auto* registry = new std::map<std::string, TorchOpFn>();
  return *registry;
}

// A float64 (floating inputs) / int64 / uint8 torch copy of `t`.
torch::Tensor ToTorch(const Tensor& t) {
  const std::vector<double> values = t.ToVector();
  torch::Tensor out =
      torch::tensor(values, torch::TensorOptions().dtype(torch::kFloat64));
  out = out.reshape(std::vector<int64_t>(t.shape().begin(), t.shape().end()));
  if (t.dtype() == DType::kInt64) return out.to(torch::kInt64);
  if (t.dtype() == DType::kUInt8) return out.to(torch::kUInt8);
  return out;
}

Tensor FromTorch(const torch::Tensor& t) {
  torch::Tensor dense = t.detach().to(torch::kFloat64).contiguous();
  std::vector<double> values(dense.data_ptr<double>(),
                             dense.data_ptr<double>() + dense.numel());
  Shape shape(t.sizes().begin(), t.sizes().end());
  const bool is_int = t.scalar_type() == torch::kInt64;
  const bool is_byte =
      t.scalar_type() == torch::kUInt8 || t.scalar_type() == torch::kBool;
  return FromVector(values, shape,
                    is_int    ? DType::kInt64
                    : is_byte ? DType::kUInt8
                              : DType::kFloat64);
}

}  // namespace

double OracleAttrs::number(const std::string& key) const {
  auto it = numbers.find(key);
  LC_CHECK(it != numbers.end()) << "oracle attribute " << key << " missing";
  return it->second;
}

const std::vector<int64_t>& OracleAttrs::list(const std::string& key) const {
  auto it = lists.find(key);
  LC_CHECK(it != lists.end()) << "oracle attribute " << key << " missing";
  return it->second;
}

const std::string& OracleAttrs::string(const std::string& key) const {
  auto it = strings.find(key);
  LC_CHECK(it != strings.end()) << "oracle attribute " << key << " missing";
  return it->second;
}

bool OracleAttrs::has(const std::string& key) const {
  return numbers.count(key) || lists.count(key) || strings.count(key);
}

bool RegisterTorchOp(const std::string& name, TorchOpFn fn) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  LC_CHECK(Registry().emplace(name, std::move(fn)).second)
      << "oracle op " << name << " registered twice";
  return true;
}

OracleResult RunTorchOp(const std::string& name, const Tensors& inputs,
                        const OracleAttrs& attrs, const Tensors& grad_outputs) {
  auto it = Registry().find(name);
  LC_CHECK(it != Registry().end()) << "no oracle op named " << name;
  torch::AutoGradMode grad_mode(true);
  TorchTensors torch_inputs;
  for (const Tensor& t : inputs) {
    torch::Tensor x = t.defined() ? ToTorch(t) : torch::Tensor();
    if (t.defined() && IsFloating(t.dtype())) x.set_requires_grad(true);
    torch_inputs.push_back(x);
  }
  TorchTensors torch_outputs = it->second(torch_inputs, attrs);
  OracleResult result;
  for (const torch::Tensor& y : torch_outputs) {
    result.outputs.push_back(FromTorch(y));
  }
  if (!grad_outputs.empty()) {
    LC_CHECK_EQ(grad_outputs.size(), torch_outputs.size());
    TorchTensors roots, grads;
    for (size_t i = 0; i < grad_outputs.size(); ++i) {
      if (!grad_outputs[i].defined() || !torch_outputs[i].requires_grad()) {
        continue;
      }
      roots.push_back(torch_outputs[i]);
      grads.push_back(ToTorch(grad_outputs[i]));
    }
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    for (const torch::Tensor& x : torch_inputs) {
      result.input_grads.push_back(
          x.defined() && x.grad().defined() ? FromTorch(x.grad()) : Tensor());
    }
  }
  return result;
}

}  // namespace testing
}  // namespace lc
