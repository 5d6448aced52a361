// Module: the base of every layer and model. It owns named parameters,
// buffers and submodules ("blocks.0.attn.q_proj.weight"), a train/eval flag,
// and a state dict that round-trips through safetensors.
#ifndef LONGCTX_CORE_MODULE_H_
#define LONGCTX_CORE_MODULE_H_

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "core/tensor.h"

namespace lc {

class Module {
 public:
  virtual ~Module() = default;

  // Parameters of this module and all submodules, with dotted names, in
  // registration order.
  std::vector<std::pair<std::string, Tensor>> NamedParameters() const;
  std::vector<Tensor> Parameters() const;
  // Buffers (non-trainable state, e.g. running statistics), likewise.
  std::vector<std::pair<std::string, Tensor>> NamedBuffers() const;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> NamedChildren()
      const {
    return children_;
  }

  // Sets the mode of this module and every submodule.
  void Train(bool training = true);
  void Eval() { Train(false); }
  bool is_training() const { return training_; }

  // Clears the .grad of every parameter.
  void ZeroGrad();

  // Parameters and buffers by dotted name.
  std::map<std::string, Tensor> StateDict() const;
  // Copies values into the existing tensors (keeping their dtype and
  // device). Errors name the key: a missing or unexpected key (when strict)
  // or a shape mismatch.
  absl::Status LoadStateDict(const std::map<std::string, Tensor>& state,
                             bool strict = true);
  // The state dict as a safetensors file, and back.
  absl::Status Save(const std::string& path) const;
  absl::Status Load(const std::string& path, bool strict = true);

 protected:
  // Registers a parameter (made a leaf with requires_grad) and returns it.
  Tensor RegisterParameter(const std::string& name, Tensor value);
  Tensor RegisterBuffer(const std::string& name, Tensor value);
  template <typename M>
  std::shared_ptr<M> RegisterModule(const std::string& name,
                                    std::shared_ptr<M> module) {
    AddChild(name, module);
    return module;
  }

 private:
  // Checks the name (non-empty, no dot, unused) and appends the child.
  void AddChild(const std::string& name, std::shared_ptr<Module> module);

  bool training_ = true;
  std::vector<std::pair<std::string, Tensor>> parameters_;
  std::vector<std::pair<std::string, Tensor>> buffers_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
};

}  // namespace lc

#endif  // LONGCTX_CORE_MODULE_H_
