#include "core/autograd.h"

#include <atomic>
#include <mutex>
#include <queue>
#include <unordered_map>
#include <unordered_set>

#include "core/status.h"

namespace lc {
namespace {

bool& GradModeFlag() {
  thread_local bool enabled = true;
  return enabled;
}

std::atomic<uint64_t> next_sequence_nr{0};

// The AccumulateGrad of a leaf, created once and shared by every graph that
// uses the leaf.
std::shared_ptr<Node> GradAccumulator(const std::shared_ptr<TensorImpl>& leaf) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  std::shared_ptr<Node> node = leaf->grad_accumulator.lock();
  if (node == nullptr) {
    node = std::make_shared<AccumulateGrad>(leaf);
    leaf->grad_accumulator = node;
  }
  return node;
}

Edge EdgeTo(const Tensor& t) {
  if (!t.defined() || !t.requires_grad()) return Edge{};
  if (t.is_leaf()) return Edge{GradAccumulator(t.impl_ptr()), 0};
  return Edge{t.grad_fn(), t.output_nr()};
}

// slot += g, where slot may be undefined (no gradient yet). The sum goes to a
// new buffer: slot may alias a tensor an op or the caller still holds.
void AccumulateInto(Tensor& slot, const Tensor& g) {
  if (!slot.defined()) {
    slot = g;
    return;
  }
  Tensor sum = slot.clone();
  AddInPlace(sum, g);
  slot = sum;
}

}  // namespace

Node::Node(std::string name)
    : name_(std::move(name)), sequence_nr_(next_sequence_nr++) {}

void Node::SaveVersions(absl::Span<const Tensor> saved,
                        absl::Span<const Tensor> inputs,
                        absl::Span<Tensor* const> outputs) {
  for (size_t k = 0; k < saved.size(); ++k) {
    const Tensor& t = saved[k];
    if (!t.defined()) continue;
    const std::shared_ptr<uint64_t>& counter = t.impl().version;
    SavedVersion entry{counter, *counter, "saved tensor", static_cast<int>(k),
                       t.shape()};
    // Named after the first input, else output, whose data it shares.
    bool named = false;
    auto name_after = [&](const char* role, size_t index, const Tensor& other) {
      if (named || !other.defined() || other.impl().version != counter) return;
      entry.role = role;
      entry.index = static_cast<int>(index);
      named = true;
    };
    for (size_t i = 0; i < inputs.size(); ++i) {
      name_after("input", i, inputs[i]);
    }
    for (size_t i = 0; i < outputs.size(); ++i) {
      name_after("output", i, *outputs[i]);
    }
    saved_versions_.push_back(std::move(entry));
  }
}

void Node::CheckSavedVersions() const {
  for (const SavedVersion& saved : saved_versions_) {
    LC_REQUIRE(*saved.counter == saved.version, "backward of ", name_, ": ",
               saved.role, " ", saved.index, " ", ShapeToString(saved.shape),
               " saved at version ", saved.version, ", now version ",
               *saved.counter,
               ": it was modified in place after the op used it; clone it "
               "before modifying");
  }
}

AccumulateGrad::AccumulateGrad(std::shared_ptr<TensorImpl> leaf)
    : Node("AccumulateGrad"), leaf_(std::move(leaf)) {
  set_outputs(
      {OutputInfo{leaf_->shape, leaf_->dtype, leaf_->storage->device()}});
}

Tensors AccumulateGrad::Apply(Tensors grad_outputs) {
  const Tensor& g = grad_outputs[0];
  LC_CHECK(g.shape() == leaf_->shape && g.dtype() == leaf_->dtype)
      << "gradient " << ShapeToString(g.shape()) << " " << DTypeName(g.dtype())
      << " for a leaf " << ShapeToString(leaf_->shape) << " "
      << DTypeName(leaf_->dtype);
  if (leaf_->grad == nullptr) {
    // A copy: the incoming gradient may be a view of a buffer someone else
    // owns (the caller's grad_output, say).
    leaf_->grad = g.clone().impl_ptr();
  } else {
    AddInPlace(Tensor(leaf_->grad), g);
  }
  return {};
}

FunctionNode::FunctionNode(std::string name, BackwardFn backward,
                           MissingGrad missing)
    : Node(std::move(name)),
      backward_(std::move(backward)),
      missing_(missing) {}

Tensors FunctionNode::Apply(Tensors grad_outputs) {
  LC_CHECK(backward_ != nullptr) << name() << " ran after its release";
  return backward_(grad_outputs);
}

bool GradEnabled() { return GradModeFlag(); }

GradModeGuard::GradModeGuard(bool enabled) : previous_(GradModeFlag()) {
  GradModeFlag() = enabled;
}

GradModeGuard::~GradModeGuard() { GradModeFlag() = previous_; }

bool NeedsGrad(absl::Span<const Tensor> inputs) {
  if (!GradEnabled()) return false;
  for (const Tensor& t : inputs) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

void SetHistory(const std::shared_ptr<Node>& node,
                absl::Span<const Tensor> inputs,
                absl::Span<Tensor* const> outputs) {
  node->next_edges_.clear();
  for (const Tensor& t : inputs) node->next_edges_.push_back(EdgeTo(t));
  node->outputs_.clear();
  for (size_t i = 0; i < outputs.size(); ++i) {
    TensorImpl& impl = outputs[i]->impl();
    node->outputs_.push_back(
        OutputInfo{impl.shape, impl.dtype, impl.storage->device()});
    impl.grad_fn = node;
    impl.output_nr = static_cast<int>(i);
    impl.requires_grad = true;
  }
}

void RecordOp(std::string name, absl::Span<const Tensor> inputs,
              absl::Span<Tensor* const> outputs, BackwardFn backward,
              MissingGrad missing) {
  RecordOp(std::move(name), inputs, outputs, /*saved=*/{}, std::move(backward),
           missing);
}

void RecordOp(std::string name, absl::Span<const Tensor> inputs,
              absl::Span<Tensor* const> outputs, absl::Span<const Tensor> saved,
              BackwardFn backward, MissingGrad missing) {
  auto node = std::make_shared<FunctionNode>(std::move(name),
                                             std::move(backward), missing);
  node->SaveVersions(saved, inputs, outputs);
  SetHistory(node, inputs, outputs);
}

class Engine {
 public:
  static void Run(absl::Span<const Tensor> roots,
                  absl::Span<const Tensor> grad_roots, bool retain_graph);
};

void Engine::Run(absl::Span<const Tensor> roots,
                 absl::Span<const Tensor> grad_roots, bool retain_graph) {
  LC_REQUIRE(roots.size() == grad_roots.size(), "backward: ", roots.size(),
             " roots but ", grad_roots.size(),
             " gradients (expected one each)");
  std::unordered_map<Node*, Tensors> buffers;
  std::vector<std::shared_ptr<Node>> root_nodes;
  for (size_t i = 0; i < roots.size(); ++i) {
    const Tensor& root = roots[i];
    LC_REQUIRE(root.defined() && root.requires_grad(), "backward: root ", i,
               " does not require grad (no input of the computation that "
               "made it requires grad)");
    Tensor grad = grad_roots[i];
    if (!grad.defined()) {
      LC_REQUIRE(root.numel() == 1, "backward: root ", i, " has shape ",
                 ShapeToString(root.shape()),
                 "; a gradient is needed for a tensor of more than one "
                 "element");
      grad = Ones(root.shape(), root.dtype(), root.device());
    }
    LC_REQUIRE(grad.shape() == root.shape() && grad.dtype() == root.dtype(),
               "backward: gradient ", ShapeToString(grad.shape()), " ",
               DTypeName(grad.dtype()), " for root ", i, " of ",
               ShapeToString(root.shape()), " ", DTypeName(root.dtype()),
               " (expected the same shape and dtype)");
    Edge edge = EdgeTo(root);
    Tensors& buffer = buffers[edge.node.get()];
    buffer.resize(edge.node->outputs_.size());
    AccumulateInto(buffer[edge.output_nr], grad);
    root_nodes.push_back(edge.node);
  }

  // Count, for every reachable node, the edges that lead into it.
  std::unordered_map<Node*, int> dependencies;
  std::unordered_set<Node*> seen;
  std::vector<Node*> stack;
  for (const auto& node : root_nodes) {
    if (seen.insert(node.get()).second) stack.push_back(node.get());
  }
  while (!stack.empty()) {
    Node* node = stack.back();
    stack.pop_back();
    LC_REQUIRE(!node->released_, "backward: the graph through ", node->name(),
               " was already freed by an earlier backward (pass "
               "retain_graph = true to backpropagate twice)");
    node->CheckSavedVersions();
    for (const Edge& edge : node->next_edges_) {
      if (edge.node == nullptr) continue;
      ++dependencies[edge.node.get()];
      if (seen.insert(edge.node.get()).second) stack.push_back(edge.node.get());
    }
  }

  // Run ready nodes, latest created first.
  auto later = [](Node* a, Node* b) {
    return a->sequence_nr() < b->sequence_nr();
  };
  std::priority_queue<Node*, std::vector<Node*>, decltype(later)> ready(later);
  for (Node* node : seen) {
    if (dependencies[node] == 0) ready.push(node);
  }
  NoGradGuard no_grad;
  while (!ready.empty()) {
    Node* node = ready.top();
    ready.pop();
    Tensors grads = std::move(buffers[node]);
    buffers.erase(node);
    bool any = false;
    for (const Tensor& g : grads) any = any || g.defined();
    Tensors input_grads;
    if (any) {
      grads.resize(node->outputs_.size());
      for (size_t i = 0; i < grads.size(); ++i) {
        if (grads[i].defined() || !node->MaterializesGrads()) continue;
        const OutputInfo& info = node->outputs_[i];
        grads[i] = Zeros(info.shape, info.dtype, info.device);
      }
      input_grads = node->Apply(std::move(grads));
      LC_CHECK(input_grads.empty() ||
               input_grads.size() == node->next_edges_.size())
          << node->name() << " returned " << input_grads.size()
          << " gradients for " << node->next_edges_.size() << " inputs";
      // Leaves' accumulators outlive the graph; everything else is freed.
      if (!retain_graph && dynamic_cast<AccumulateGrad*>(node) == nullptr) {
        node->ReleaseSaved();
        node->saved_versions_.clear();
        node->released_ = true;
      }
    }
    for (size_t i = 0; i < node->next_edges_.size(); ++i) {
      const Edge& edge = node->next_edges_[i];
      if (edge.node == nullptr) continue;
      if (i < input_grads.size() && input_grads[i].defined()) {
        const Tensor& g = input_grads[i];
        const OutputInfo& info = edge.node->outputs_[edge.output_nr];
        LC_CHECK(g.shape() == info.shape)
            << node->name() << " gave a gradient of shape "
            << ShapeToString(g.shape()) << " for input " << i << " of shape "
            << ShapeToString(info.shape);
        Tensors& buffer = buffers[edge.node.get()];
        buffer.resize(edge.node->outputs_.size());
        AccumulateInto(buffer[edge.output_nr], g);
      }
      if (--dependencies[edge.node.get()] == 0) ready.push(edge.node.get());
    }
  }
}

void Backward(absl::Span<const Tensor> roots,
              absl::Span<const Tensor> grad_roots, bool retain_graph) {
  Engine::Run(roots, grad_roots, retain_graph);
}

}  // namespace lc
