#include "core/module.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/autograd.h"
#include "core/safetensors.h"
#include "core/status.h"

namespace lc {
namespace {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;
using NamedChildren =
    std::vector<std::pair<std::string, std::shared_ptr<Module>>>;

// Throws lc::Error unless `name` is non-empty, has no dot and is not yet
// used by a parameter, buffer or submodule of this module.
void CheckNewName(const char* what, const std::string& name,
                  const NamedTensors& parameters, const NamedTensors& buffers,
                  const NamedChildren& children) {
  LC_REQUIRE(!name.empty() && name.find('.') == std::string::npos, what,
             ": name \"", name, "\" must be non-empty and contain no dot");
  auto taken = [&name](const auto& named) {
    for (const auto& entry : named) {
      if (entry.first == name) return true;
    }
    return false;
  };
  LC_REQUIRE(!taken(parameters) && !taken(buffers) && !taken(children), what,
             ": name \"", name,
             "\" is already used by a parameter, buffer or submodule");
}

// `own` followed by what `get` returns for each child, with the child's name
// and a dot prepended.
template <typename Get>
NamedTensors WithChildren(NamedTensors own, const NamedChildren& children,
                          Get get) {
  for (const auto& [child_name, child] : children) {
    for (auto& [name, tensor] : get(*child)) {
      own.emplace_back(absl::StrCat(child_name, ".", name), std::move(tensor));
    }
  }
  return own;
}

}  // namespace

std::vector<std::pair<std::string, Tensor>> Module::NamedParameters() const {
  return WithChildren(parameters_, children_, [](const Module& child) {
    return child.NamedParameters();
  });
}

std::vector<Tensor> Module::Parameters() const {
  std::vector<Tensor> result;
  for (auto& [name, tensor] : NamedParameters()) {
    result.push_back(std::move(tensor));
  }
  return result;
}

std::vector<std::pair<std::string, Tensor>> Module::NamedBuffers() const {
  return WithChildren(buffers_, children_,
                      [](const Module& child) { return child.NamedBuffers(); });
}

void Module::Train(bool training) {
  training_ = training;
  for (const auto& [name, child] : children_) child->Train(training);
}

void Module::ZeroGrad() {
  for (const Tensor& parameter : Parameters()) parameter.set_grad(Tensor());
}

std::map<std::string, Tensor> Module::StateDict() const {
  std::map<std::string, Tensor> state;
  for (const NamedTensors& tensors : {NamedParameters(), NamedBuffers()}) {
    for (const auto& [name, tensor] : tensors) {
      LC_REQUIRE(state.emplace(name, tensor).second, "StateDict: two tensors ",
                 "are named ", name, " (a submodule name contains a dot?)");
    }
  }
  return state;
}

absl::Status Module::LoadStateDict(const std::map<std::string, Tensor>& state,
                                   bool strict) {
  const std::map<std::string, Tensor> own = StateDict();
  std::vector<std::string> problems;
  if (strict) {
    std::vector<std::string> missing;
    for (const auto& [name, tensor] : own) {
      if (state.count(name) == 0) missing.push_back(name);
    }
    std::vector<std::string> unexpected;
    for (const auto& [name, tensor] : state) {
      if (own.count(name) == 0) unexpected.push_back(name);
    }
    if (!missing.empty()) {
      problems.push_back(
          absl::StrCat("missing keys: ", absl::StrJoin(missing, ", ")));
    }
    if (!unexpected.empty()) {
      problems.push_back(
          absl::StrCat("unexpected keys: ", absl::StrJoin(unexpected, ", ")));
    }
  }
  for (const auto& [name, tensor] : state) {
    const auto it = own.find(name);
    if (it == own.end()) continue;
    if (!tensor.defined()) {
      problems.push_back(absl::StrCat("key ", name, " holds no tensor"));
    } else if (tensor.shape() != it->second.shape()) {
      problems.push_back(absl::StrCat(
          "key ", name, " has shape ", ShapeToString(tensor.shape()),
          ", expected ", ShapeToString(it->second.shape())));
    }
  }
  if (!problems.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("LoadStateDict: ", absl::StrJoin(problems, "; "),
                     " (nothing was loaded)"));
  }
  return StatusFromCall([&] {
    NoGradGuard no_grad;
    for (const auto& [name, tensor] : state) {
      const auto it = own.find(name);
      if (it != own.end()) CopyInto(it->second, tensor);
    }
  });
}

absl::Status Module::Save(const std::string& path) const {
  return WriteSafetensors(path, StateDict());
}

absl::Status Module::Load(const std::string& path, bool strict) {
  LC_ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(path));
  const absl::Status status = LoadStateDict(file.tensors, strict);
  if (!status.ok()) {
    return absl::Status(status.code(),
                        absl::StrCat("loading ", path, ": ", status.message()));
  }
  return absl::OkStatus();
}

Tensor Module::RegisterParameter(const std::string& name, Tensor value) {
  CheckNewName("RegisterParameter", name, parameters_, buffers_, children_);
  LC_REQUIRE(value.defined(), "RegisterParameter: ", name, " is undefined");
  LC_REQUIRE(IsFloating(value.dtype()), "RegisterParameter: ", name, " is ",
             DTypeName(value.dtype()),
             ", expected a floating dtype (parameters get gradients)");
  Tensor parameter = value.detach();
  parameter.set_requires_grad(true);
  parameters_.emplace_back(name, parameter);
  return parameter;
}

void Module::AddChild(const std::string& name, std::shared_ptr<Module> module) {
  CheckNewName("RegisterModule", name, parameters_, buffers_, children_);
  LC_REQUIRE(module != nullptr, "RegisterModule: ", name, " is null");
  children_.emplace_back(name, std::move(module));
}

Tensor Module::RegisterBuffer(const std::string& name, Tensor value) {
  CheckNewName("RegisterBuffer", name, parameters_, buffers_, children_);
  LC_REQUIRE(value.defined(), "RegisterBuffer: ", name, " is undefined");
  Tensor buffer = value.detach();
  buffers_.emplace_back(name, buffer);
  return buffer;
}

}  // namespace lc
