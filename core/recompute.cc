#include "core/recompute.h"

#include "core/random.h"

namespace lc {
namespace {

// Saves fn and its inputs; Apply reruns fn with grad mode on and
// backpropagates through the fresh graph.
class RecomputeNode : public Node {
 public:
  RecomputeNode(RecomputeFn fn, const Tensors& inputs, Generator generator)
      : Node("Recompute"), fn_(std::move(fn)), generator_(generator) {
    for (const Tensor& t : inputs) {
      inputs_.push_back(t.detach());
      input_requires_grad_.push_back(t.requires_grad());
    }
    // Recomputing from an input written since would give wrong gradients.
    SaveVersions(inputs_, inputs, {});
  }

  Tensors Apply(Tensors grad_outputs) override {
    GradModeGuard grad_mode(true);
    Tensors leaves;
    for (size_t i = 0; i < inputs_.size(); ++i) {
      Tensor leaf = inputs_[i].detach();
      if (input_requires_grad_[i]) leaf.set_requires_grad(true);
      leaves.push_back(leaf);
    }
    Generator& generator = DefaultGenerator();
    const Generator after_forward = generator;
    generator = generator_;
    Tensors outputs = fn_(leaves);
    generator = after_forward;

    Tensors roots, grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (!outputs[i].requires_grad()) continue;
      roots.push_back(outputs[i]);
      grads.push_back(grad_outputs[i]);
    }
    if (!roots.empty()) Backward(roots, grads);
    Tensors input_grads;
    for (const Tensor& leaf : leaves) input_grads.push_back(leaf.grad());
    return input_grads;
  }

  void ReleaseSaved() override {
    fn_ = nullptr;
    inputs_.clear();
  }

 private:
  RecomputeFn fn_;
  Tensors inputs_;  // detached: the saved values, without history
  std::vector<bool> input_requires_grad_;
  Generator generator_;
};

}  // namespace

Tensors Recompute(RecomputeFn fn, const Tensors& inputs) {
  const Generator generator = DefaultGenerator();
  Tensors detached;
  for (const Tensor& t : inputs) detached.push_back(t.detach());
  Tensors outputs;
  {
    NoGradGuard no_grad;
    outputs = fn(detached);
  }
  if (!GradEnabled()) return outputs;
  // Recorded even when no input requires grad: fn may use parameters that do.
  auto node = std::make_shared<RecomputeNode>(std::move(fn), inputs, generator);
  std::vector<Tensor*> output_ptrs;
  for (Tensor& t : outputs) output_ptrs.push_back(&t);
  SetHistory(node, inputs, output_ptrs);
  return outputs;
}

}  // namespace lc
