#include "train/optimizer.h"

#include <cmath>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/autograd.h"
#include "core/status.h"
#include "train/optimizer_cuda.h"

namespace lc {
namespace {

constexpr char kPrefix[] = "optimizer.";
constexpr char kStepKey[] = "optimizer.step";

std::string MomentKey(const char* moment, const std::string& name) {
  return absl::StrCat(kPrefix, moment, ".", name);
}

// The AdamW update of one parameter, elementwise in float64.
template <typename T>
void UpdateParameter(T* p, T* m, T* v, const T* g, int64_t n, double decay,
                     double beta1, double beta2, double step_size,
                     double bias_correction2_sqrt, double eps) {
  for (int64_t i = 0; i < n; ++i) {
    const double grad = static_cast<double>(g[i]);
    const double mi = beta1 * static_cast<double>(m[i]) + (1 - beta1) * grad;
    const double vi =
        beta2 * static_cast<double>(v[i]) + (1 - beta2) * grad * grad;
    m[i] = static_cast<T>(mi);
    v[i] = static_cast<T>(vi);
    const double denom = std::sqrt(vi) / bias_correction2_sqrt + eps;
    p[i] = static_cast<T>(static_cast<double>(p[i]) * decay -
                          step_size * mi / denom);
  }
}

template <typename T>
double SumOfSquares(const Tensor& grad) {
  const Tensor dense = grad.contiguous();
  const T* data = dense.data<T>();
  double sum = 0;
  for (int64_t i = 0; i < dense.numel(); ++i) {
    const double x = static_cast<double>(data[i]);
    sum += x * x;
  }
  return sum;
}

template <typename T>
void ScaleInPlace(const Tensor& grad, double factor) {
  T* data = grad.data<T>();
  for (int64_t i = 0; i < grad.numel(); ++i) {
    data[i] = static_cast<T>(static_cast<double>(data[i]) * factor);
  }
}

}  // namespace

absl::Status ValidateAdamWOptions(const AdamWOptions& options) {
  auto in_unit_interval = [](double b) { return b >= 0 && b < 1; };
  if (!in_unit_interval(options.beta1) || !in_unit_interval(options.beta2)) {
    return absl::InvalidArgumentError(
        absl::StrCat("AdamW: betas (", options.beta1, ", ", options.beta2,
                     ") must lie in [0, 1)"));
  }
  if (!(options.eps > 0 && std::isfinite(options.eps))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AdamW: eps = ", options.eps, " (expected a finite number > 0)"));
  }
  if (!(options.weight_decay >= 0 && std::isfinite(options.weight_decay))) {
    return absl::InvalidArgumentError(
        absl::StrCat("AdamW: weight_decay = ", options.weight_decay,
                     " (expected a finite number >= 0)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<AdamW> AdamW::Create(
    std::vector<std::pair<std::string, Tensor>> params,
    const AdamWOptions& options) {
  LC_RETURN_IF_ERROR(ValidateAdamWOptions(options));
  std::set<std::string> names;
  for (const auto& [name, param] : params) {
    if (!names.insert(name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("AdamW: two parameters are named ", name));
    }
    if (!param.defined()) {
      return absl::InvalidArgumentError(
          absl::StrCat("AdamW: parameter ", name, " is undefined"));
    }
    if (param.dtype() != DType::kFloat32 && param.dtype() != DType::kFloat64) {
      return absl::InvalidArgumentError(absl::StrCat(
          "AdamW: parameter ", name, " is ", DTypeName(param.dtype()),
          " (expected float32 or float64 master weights)"));
    }
    if (param.device() != params.front().second.device()) {
      return absl::InvalidArgumentError(
          absl::StrCat("AdamW: parameter ", name, " is on ",
                       param.device().ToString(), " but ", params.front().first,
                       " on ", params.front().second.device().ToString(),
                       " (expected every parameter on one device)"));
    }
    if (param.device().is_cuda() && param.dtype() != DType::kFloat32) {
      return absl::UnimplementedError(absl::StrCat(
          "AdamW: parameter ", name, " is ", DTypeName(param.dtype()), " on ",
          param.device().ToString(),
          " (the CUDA AdamW takes float32 master weights)"));
    }
    if (!param.is_contiguous()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "AdamW: parameter ", name, " is not contiguous (updated in place)"));
    }
  }
  return AdamW(std::move(params), options);
}

AdamW::AdamW(std::vector<std::pair<std::string, Tensor>> params,
             const AdamWOptions& options)
    : device_(params.empty() ? Device::Cpu() : params.front().second.device()),
      options_(options) {
  for (auto& [name, param] : params) {
    ParamState state;
    state.name = name;
    state.param = param;
    state.m = Zeros(param.shape(), param.dtype(), device_);
    state.v = Zeros(param.shape(), param.dtype(), device_);
    state.decay = options.decay_vectors || param.dim() >= 2;
    params_.push_back(std::move(state));
  }
}

void AdamW::Step(double lr) {
  ++step_count_;
  const double t = static_cast<double>(step_count_);
  const double bias_correction1 = 1 - std::pow(options_.beta1, t);
  const double bias_correction2 = 1 - std::pow(options_.beta2, t);
  const double step_size = lr / bias_correction1;
  const double bias_correction2_sqrt = std::sqrt(bias_correction2);
  std::vector<MultiTensorEntry> cuda_entries;
  std::vector<Tensor> cuda_grads;  // alive until the kernels are queued
  for (ParamState& state : params_) {
    const Tensor grad_tensor = state.param.grad();
    if (!grad_tensor.defined()) continue;
    LC_REQUIRE(grad_tensor.shape() == state.param.shape() &&
                   grad_tensor.dtype() == state.param.dtype() &&
                   grad_tensor.device() == device_,
               "AdamW: the gradient of ", state.name, " is ",
               DTypeName(grad_tensor.dtype()), " ",
               ShapeToString(grad_tensor.shape()), " on ",
               grad_tensor.device().ToString(), ", expected ",
               DTypeName(state.param.dtype()), " ",
               ShapeToString(state.param.shape()), " on ", device_.ToString());
    const Tensor grad = grad_tensor.contiguous();
    const double decay = state.decay ? 1 - lr * options_.weight_decay : 1.0;
    // Written in place below: a graph that saved the parameter must refuse
    // to backpropagate (NOTE [ Version counters ] in core/autograd.h).
    state.param.bump_version();
    if (device_.is_cuda()) {
      cuda_entries.push_back({state.param.data<float>(), grad.data<float>(),
                              state.m.data<float>(), state.v.data<float>(),
                              state.param.numel(), decay});
      cuda_grads.push_back(grad);
    } else if (state.param.dtype() == DType::kFloat32) {
      UpdateParameter<float>(state.param.data<float>(), state.m.data<float>(),
                             state.v.data<float>(), grad.data<float>(),
                             state.param.numel(), decay, options_.beta1,
                             options_.beta2, step_size, bias_correction2_sqrt,
                             options_.eps);
    } else {
      UpdateParameter<double>(state.param.data<double>(),
                              state.m.data<double>(), state.v.data<double>(),
                              grad.data<double>(), state.param.numel(), decay,
                              options_.beta1, options_.beta2, step_size,
                              bias_correction2_sqrt, options_.eps);
    }
  }
  if (!cuda_entries.empty()) {
    AdamWStepCuda(device_.index, cuda_entries,
                  {options_.beta1, options_.beta2, options_.eps, step_size,
                   bias_correction2_sqrt});
  }
}

std::map<std::string, Tensor> AdamW::StateDict() const {
  std::map<std::string, Tensor> state;
  for (const ParamState& param : params_) {
    state[MomentKey("m", param.name)] = param.m;
    state[MomentKey("v", param.name)] = param.v;
  }
  state[kStepKey] =
      FromVector({static_cast<double>(step_count_)}, {}, DType::kInt64);
  return state;
}

absl::Status AdamW::LoadStateDict(const std::map<std::string, Tensor>& state) {
  auto find = [&](const std::string& key) -> absl::StatusOr<Tensor> {
    const auto it = state.find(key);
    if (it == state.end() || !it->second.defined()) {
      return absl::NotFoundError(
          absl::StrCat("AdamW::LoadStateDict: missing key ", key));
    }
    return it->second;
  };
  LC_ASSIGN_OR_RETURN(const Tensor step, find(kStepKey));
  if (step.dtype() != DType::kInt64 || step.numel() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AdamW::LoadStateDict: ", kStepKey, " is ", DTypeName(step.dtype()),
        " ", ShapeToString(step.shape()), " (expected one int64)"));
  }
  std::vector<std::pair<Tensor, Tensor>> copies;  // (destination, source)
  for (const ParamState& param : params_) {
    for (const auto& [moment, destination] :
         {std::pair<const char*, Tensor>{"m", param.m}, {"v", param.v}}) {
      const std::string key = MomentKey(moment, param.name);
      LC_ASSIGN_OR_RETURN(const Tensor source, find(key));
      if (source.shape() != destination.shape()) {
        return absl::InvalidArgumentError(
            absl::StrCat("AdamW::LoadStateDict: ", key, " has shape ",
                         ShapeToString(source.shape()), ", expected ",
                         ShapeToString(destination.shape())));
      }
      copies.emplace_back(destination, source);
    }
  }
  for (const auto& [destination, source] : copies) {
    CopyInto(destination, source);
  }
  step_count_ = static_cast<int64_t>(step.item());
  return absl::OkStatus();
}

absl::StatusOr<double> ClipGradNorm(const std::vector<Tensor>& params,
                                    double max_norm, Communicator* comm) {
  std::optional<Device> device;  // of the gradients
  for (const Tensor& param : params) {
    const Tensor grad = param.grad();
    if (!grad.defined()) continue;
    if (!device) device = grad.device();
    if (grad.device() != *device) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ClipGradNorm: gradients on ", device->ToString(), " and ",
          grad.device().ToString(), " (expected one device)"));
    }
    const bool supported =
        grad.dtype() == DType::kFloat32 ||
        (grad.dtype() == DType::kFloat64 && device->is_cpu());
    if (!supported) {
      return absl::InvalidArgumentError(
          absl::StrCat("ClipGradNorm: a gradient is ", DTypeName(grad.dtype()),
                       " on ", device->ToString(),
                       " (expected float32/64 on the CPU, float32 on CUDA)"));
    }
  }
  // The defined gradients, made contiguous once (the kernels below walk
  // dense memory, and the scaling writes through to param.grad()).
  std::vector<Tensor> grads;
  for (const Tensor& param : params) {
    Tensor grad = param.grad();
    if (!grad.defined()) continue;
    if (!grad.is_contiguous()) {
      grad = grad.contiguous();
      param.set_grad(grad);
    }
    grads.push_back(grad);
  }
  const bool cuda = device && device->is_cuda();
  std::vector<MultiTensorEntry> cuda_entries;
  double sum_of_squares = 0;
  if (cuda) {
    for (const Tensor& grad : grads) {
      MultiTensorEntry entry;
      entry.grad = grad.data<float>();
      entry.numel = grad.numel();
      cuda_entries.push_back(entry);
    }
    sum_of_squares = SumOfSquaresCuda(device->index, cuda_entries);
  } else {
    for (const Tensor& grad : grads) {
      sum_of_squares += grad.dtype() == DType::kFloat32
                            ? SumOfSquares<float>(grad)
                            : SumOfSquares<double>(grad);
    }
  }
  const double norm = std::sqrt(sum_of_squares);
  if (comm != nullptr && comm->size() > 1) {
    const Tensor mine = FromVector({norm}, {1}, DType::kFloat64);
    Tensor all = Zeros({comm->size(), 1}, DType::kFloat64);
    LC_RETURN_IF_ERROR(comm->AllGather(mine, all));
    for (int r = 0; r < comm->size(); ++r) {
      // Ranks whose norms are both NaN agree (NaN != NaN): the step is then
      // skipped alike on every rank (see OptimizerStep in train/trainer.h).
      const double other = all.at({r, 0});
      if (other != norm && !(std::isnan(other) && std::isnan(norm))) {
        return absl::InternalError(absl::StrFormat(
            "ClipGradNorm: rank %d has gradient norm %.17g but rank %d has "
            "%.17g; the ranks' gradients differ (all-reduce them with "
            "AllReduceGradients before clipping)",
            comm->rank(), norm, r, all.at({r, 0})));
      }
    }
  }
  if (max_norm > 0 && norm > max_norm) {
    const double factor = max_norm / (norm + 1e-6);
    // Scaled in place below (NOTE [ Version counters ] in core/autograd.h).
    for (const Tensor& grad : grads) grad.bump_version();
    if (cuda) {
      ScaleCuda(device->index, cuda_entries, factor);
      return norm;
    }
    NoGradGuard no_grad;
    for (const Tensor& grad : grads) {
      if (grad.dtype() == DType::kFloat32) {
        ScaleInPlace<float>(grad, factor);
      } else {
        ScaleInPlace<double>(grad, factor);
      }
    }
  }
  return norm;
}

}  // namespace lc
