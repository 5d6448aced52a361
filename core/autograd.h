// Reverse-mode automatic differentiation. Each op that gets an input with
// requires_grad records a Node: the backward function plus edges to the
// nodes that made its inputs. Backward() runs reachable nodes in reverse
// topological order, sums gradients that meet, accumulates into leaves'
// .grad and frees each node's saved tensors once it ran. Gradients are not
// themselves differentiable (no double backward). Grad mode is per thread,
// so ranks running as threads do not disturb each other.
//
// NOTE [ Version counters ]
// A backward that reads a tensor's data (Mul reads its inputs, Softmax its
// output) computes wrong gradients, silently, if that data was written after
// the forward used it. So, as in PyTorch, every tensor has a version counter
// (TensorImpl::version) shared by all views and detached aliases of its data,
// and every in-place write through the public API bumps it: Tensor::set,
// CopyInto, AddInPlace, AdamW::Step on the parameters and ClipGradNorm on the
// gradients; other code that writes a tensor others may hold through
// data<T>() calls bump_version(). An op passes the tensors its backward
// reads to RecordOp (a custom node to Node::SaveVersions), which records
// their versions; Backward checks every reachable node before running any
// and throws lc::Error naming the op, the saved tensor and both versions if
// one changed, so no gradient is half accumulated. Writes an op makes into
// outputs it is still building happen before it records them, and
// recomputation (Recompute, which saves its inputs the same way) rebuilds
// its graph in backward with fresh versions. The counter is a plain integer:
// a tensor is never written by several threads at once (ranks running as
// threads own their tensors), and a bump is one increment.
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
  // Records the versions of `saved`, the tensors this node's backward will
  // read (NOTE [ Version counters ]); undefined ones are skipped. `inputs`
  // and `outputs` are the node's: an error names a saved tensor by the input
  // or output whose data it shares.
  void SaveVersions(absl::Span<const Tensor> saved,
                    absl::Span<const Tensor> inputs,
                    absl::Span<Tensor* const> outputs);

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
  // A tensor saved for backward: its version counter and version when saved,
  // and, for the error, its role ("input", "output" or "saved tensor"), index
  // and shape.
  struct SavedVersion {
    std::shared_ptr<const uint64_t> counter;
    uint64_t version;
    const char* role;
    int index;
    Shape shape;
  };
  // Throws lc::Error if a tensor SaveVersions recorded was written since.
  void CheckSavedVersions() const;

  std::string name_;
  std::vector<Edge> next_edges_;
  std::vector<SavedVersion> saved_versions_;
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
// This form is for ops whose backward reads no tensor's data (Add, views).
void RecordOp(std::string name, absl::Span<const Tensor> inputs,
              absl::Span<Tensor* const> outputs, BackwardFn backward,
              MissingGrad missing = MissingGrad::kZeros);
// The form for ops whose backward reads tensors: `saved` lists what it
// captures (inputs or outputs, detached or as aliases of their data, and
// other tensors it reads, such as indices), whose versions backward checks:
//   RecordOp("Mul", {a, b}, {&y}, /*saved=*/{a, b}, [a = a.detach(), ...
void RecordOp(std::string name, absl::Span<const Tensor> inputs,
              absl::Span<Tensor* const> outputs, absl::Span<const Tensor> saved,
              BackwardFn backward, MissingGrad missing = MissingGrad::kZeros);

// Backpropagates gradients `grad_roots` (one per root; undefined means 1 for
// one-element roots) from `roots` through the graph, accumulating into
// leaves. Throws lc::Error for a root that does not require grad, a missing
// or mis-shaped root gradient, a graph already freed by an earlier backward,
// or a saved tensor written in place since it was saved (NOTE [ Version
// counters ]); these are found before any gradient is computed.
void Backward(absl::Span<const Tensor> roots,
              absl::Span<const Tensor> grad_roots, bool retain_graph = false);

}  // namespace lc

#endif  // LONGCTX_CORE_AUTOGRAD_H_
