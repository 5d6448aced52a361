// Reverse-mode automatic differentiation. Each op that gets an input with
// requires_grad records a Node: the backward function plus edges to the
// nodes that made its inputs. Backward() runs reachable nodes in reverse
// topological order, sums gradients that meet, accumulates into leaves'
// .grad and frees each node's saved tensors once it ran. Gradients are not
// themselves differentiable (no double backward). Grad mode is per thread,
// so ranks running as threads do not disturb each other.
#ifndef LONGCTX_CORE_AUTOGRAD_H_
#define LONGCTX_CORE_AUTOGRAD_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "core/tensor.h"

namespace lc {

using Tensors = std::vector<Tensor>;

class Node;

// Where a gradient goes: output `output_nr` of `node`.
struct Edge {
  std::shared_ptr<Node> node;
  int output_nr = 0;
};

// What the engine needs to know of an output to make a zero gradient for it
// when none flowed back.
struct OutputInfo {
  Shape shape;
  DType dtype = DType::kFloat32;
  Device device;
};

class Node {
 public:
  explicit Node(std::string name);
  virtual ~Node() = default;
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  // Gets one gradient per output (the engine passes zeros for outputs that got
  // none) and returns one gradient per next edge, undefined where the input
  // needs none.
  virtual Tensors Apply(Tensors grad_outputs) = 0;
  // Whether Apply gets zeros (true) or undefined tensors for outputs that
  // got no gradient (it always gets at least one defined gradient).
  virtual bool MaterializesGrads() const { return true; }
  // Drops the tensors saved for backward; called after Apply unless the
  // graph is retained.
  virtual void ReleaseSaved() {}

  const std::string& name() const { return name_; }
  const std::vector<Edge>& next_edges() const { return next_edges_; }
  const std::vector<OutputInfo>& outputs() const { return outputs_; }
  bool released() const { return released_; }
  // Increases with creation order; the engine uses it to break ties.
  uint64_t sequence_nr() const { return sequence_nr_; }

 protected:
  void set_outputs(std::vector<OutputInfo> outputs) {
    outputs_ = std::move(outputs);
  }

 private:
  friend void SetHistory(const std::shared_ptr<Node>&, absl::Span<const Tensor>,
                         absl::Span<Tensor* const>);
  friend class Engine;
  std::string name_;
  std::vector<Edge> next_edges_;
  std::vector<OutputInfo> outputs_;
  bool released_ = false;
  uint64_t sequence_nr_;
};

// The backward of a leaf: adds the incoming gradient to the leaf's .grad.
class AccumulateGrad : public Node {
 public:
  explicit AccumulateGrad(std::shared_ptr<TensorImpl> leaf);
  Tensors Apply(Tensors grad_outputs) override;

 private:
  std::shared_ptr<TensorImpl> leaf_;
};

// What a FunctionNode's backward gets for an output no gradient reached:
// zeros of the output's shape (the default), or an undefined tensor, for
// ops that can skip the work (PyTorch's ctx.set_materialize_grads(False)).
enum class MissingGrad { kZeros, kUndefined };

// A node whose backward is a function; saved tensors live in its captures
// and are freed by ReleaseSaved.
using BackwardFn = std::function<Tensors(const Tensors& grad_outputs)>;
class FunctionNode : public Node {
 public:
  FunctionNode(std::string name, BackwardFn backward,
               MissingGrad missing = MissingGrad::kZeros);
  Tensors Apply(Tensors grad_outputs) override;
  void ReleaseSaved() override { backward_ = nullptr; }
  bool MaterializesGrads() const override {
    return missing_ == MissingGrad::kZeros;
  }

 private:
  BackwardFn backward_;
  MissingGrad missing_;
};

// Whether gradients are recorded on this thread (default: yes).
bool GradEnabled();
// Sets grad mode for its lifetime and restores the previous one.
class GradModeGuard {
 public:
  explicit GradModeGuard(bool enabled);
  ~GradModeGuard();
  GradModeGuard(const GradModeGuard&) = delete;
  GradModeGuard& operator=(const GradModeGuard&) = delete;

 private:
  bool previous_;
};
class NoGradGuard : public GradModeGuard {
 public:
  NoGradGuard() : GradModeGuard(false) {}
};

// For op authors: true when grad mode is on and an input requires grad.
bool NeedsGrad(absl::Span<const Tensor> inputs);
// Makes `node` the grad_fn of `outputs` (which become non-leaves requiring
// grad) with one edge per input (none for inputs without requires_grad).
void SetHistory(const std::shared_ptr<Node>& node,
                absl::Span<const Tensor> inputs,
                absl::Span<Tensor* const> outputs);
// The usual way an op records itself:
//   if (NeedsGrad({x})) RecordOp("Exp", {x}, {&y}, [y = y.detach()](
//       const Tensors& g) -> Tensors { return {Mul(g[0], y)}; });
// Capture saved tensors detached (no history), so the graph has no cycles.
void RecordOp(std::string name, absl::Span<const Tensor> inputs,
              absl::Span<Tensor* const> outputs, BackwardFn backward,
              MissingGrad missing = MissingGrad::kZeros);

// Backpropagates gradients `grad_roots` (one per root; undefined means 1 for
// one-element roots) from `roots` through the graph, accumulating into
// leaves. Throws lc::Error for a root that does not require grad, a missing
// or mis-shaped root gradient, or a graph already freed by an earlier
// backward.
void Backward(absl::Span<const Tensor> roots,
              absl::Span<const Tensor> grad_roots, bool retain_graph = false);

}  // namespace lc

#endif  // LONGCTX_CORE_AUTOGRAD_H_
