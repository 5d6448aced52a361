#include "ops/norm.h"

#include <cmath>
#include <vector>

#include "core/autograd.h"
#include "ops/cpu_kernel.h"
#include "ops/device_kernel.h"
#include "ops/norm_cuda.h"

namespace lc {
namespace {

// Forward of both norms, per row r of x [rows, dim] (dense), in double:
//   mean_r = mean_d x (0 unless `center`),
//   rstd_r = 1 / sqrt(mean_d (x - mean_r)^2 + eps),
//   y = (x - mean_r) * rstd_r * w + b   (w, b may be null: 1 and 0).
template <typename T>
void NormForwardLoop(const T* x, const T* w, const T* b, int64_t rows,
                     int64_t dim, double eps, bool center, T* y, double* mean,
                     double* rstd) {
#pragma omp parallel for schedule(static) if (rows * dim > 4096)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    double mu = 0;
    if (center) {
      for (int64_t d = 0; d < dim; ++d) mu += xr[d];
      mu /= dim;
    }
    double sq = 0;
    for (int64_t d = 0; d < dim; ++d) {
      const double c = xr[d] - mu;
      sq += c * c;
    }
    const double rs = 1.0 / std::sqrt(sq / dim + eps);
    T* yr = y + r * dim;
    for (int64_t d = 0; d < dim; ++d) {
      double v = (xr[d] - mu) * rs;
      if (w != nullptr) v *= w[d];
      if (b != nullptr) v += b[d];
      yr[d] = static_cast<T>(v);
    }
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// Backward of NormForwardLoop for output gradient g [rows, dim]: with
// xhat = (x - mean) * rstd and gw = g * w,
//   dx = rstd * (gw - mean_d gw [if center] - xhat * mean_d(gw * xhat)),
//   dw = sum_r g * xhat,  db = sum_r g   (dw, db written when non-null).
template <typename T>
void NormBackwardLoop(const T* x, const T* w, const double* mean,
                      const double* rstd, const T* g, int64_t rows, int64_t dim,
                      bool center, T* dx, T* dw, T* db) {
#pragma omp parallel for schedule(static) if (rows * dim > 4096)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    const T* gr = g + r * dim;
    const double mu = mean[r];
    const double rs = rstd[r];
    double sum_gw = 0;
    double sum_gw_xhat = 0;
    for (int64_t d = 0; d < dim; ++d) {
      const double gw =
          w != nullptr ? gr[d] * static_cast<double>(w[d]) : gr[d];
      sum_gw += gw;
      sum_gw_xhat += gw * (xr[d] - mu) * rs;
    }
    const double mean_gw = center ? sum_gw / dim : 0.0;
    const double mean_gw_xhat = sum_gw_xhat / dim;
    T* dxr = dx + r * dim;
    for (int64_t d = 0; d < dim; ++d) {
      const double gw =
          w != nullptr ? gr[d] * static_cast<double>(w[d]) : gr[d];
      const double xhat = (xr[d] - mu) * rs;
      dxr[d] = static_cast<T>(rs * (gw - mean_gw - xhat * mean_gw_xhat));
    }
  }
  if (dw == nullptr && db == nullptr) return;
  std::vector<double> sum_w(dw != nullptr ? dim : 0, 0.0);
  std::vector<double> sum_b(db != nullptr ? dim : 0, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    const T* gr = g + r * dim;
    const double mu = mean[r];
    const double rs = rstd[r];
    for (int64_t d = 0; d < dim; ++d) {
      if (dw != nullptr) sum_w[d] += gr[d] * (xr[d] - mu) * rs;
      if (db != nullptr) sum_b[d] += gr[d];
    }
  }
  for (int64_t d = 0; d < dim; ++d) {
    if (dw != nullptr) dw[d] = static_cast<T>(sum_w[d]);
    if (db != nullptr) db[d] = static_cast<T>(sum_b[d]);
  }
}

template <typename T>
T* DataOrNull(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

// The op's name in the CPU kernels' errors.
const char* OpName(bool center) { return center ? "LayerNorm" : "RmsNorm"; }

// For dense x [rows, dim] and weight, bias [dim] (dense, x's dtype, or
// undefined for 1 and 0) on one device:
//   mean[r] = mean_d x[r, d] when center, else 0,
//   rstd[r] = 1 / sqrt(mean_d (x[r, d] - mean[r])^2 + eps),
//   y[r, d] = (x[r, d] - mean[r]) * rstd[r] * weight[d] + bias[d];
// y dense [rows, dim] of x's dtype, mean and rstd dense [rows] of
// StatsDType.
using NormForwardKernel = void(const Tensor& x, const Tensor& weight,
                               const Tensor& bias, double eps, bool center,
                               const Tensor& y, const Tensor& mean,
                               const Tensor& rstd);

// NormForwardKernel on the CPU, in float64.
void NormForwardCpu(const Tensor& x, const Tensor& weight, const Tensor& bias,
                    double eps, bool center, const Tensor& y,
                    const Tensor& mean, const Tensor& rstd) {
  const int64_t dim = x.size(-1);
  LC_DISPATCH_FLOATING(x.dtype(), OpName(center), [&] {
    NormForwardLoop<scalar_t>(x.data<scalar_t>(), DataOrNull<scalar_t>(weight),
                              DataOrNull<scalar_t>(bias), x.numel() / dim, dim,
                              eps, center, y.data<scalar_t>(),
                              mean.data<double>(), rstd.data<double>());
  });
}

// The backward of NormForwardKernel for the output gradient g (dense [rows,
// dim]): with xhat = (x - mean) * rstd and gw = g * weight,
//   dx = rstd * (gw - mean_d gw [when center] - xhat * mean_d(gw * xhat)),
//   dweight = sum_r g * xhat,  dbias = sum_r g,
// dx dense [rows, dim] and dweight, dbias dense [dim] of x's dtype; dweight
// and dbias may be undefined (not computed).
using NormBackwardKernel = void(const Tensor& x, const Tensor& weight,
                                const Tensor& mean, const Tensor& rstd,
                                const Tensor& g, bool center, const Tensor& dx,
                                const Tensor& dweight, const Tensor& dbias);

// NormBackwardKernel on the CPU, in float64.
void NormBackwardCpu(const Tensor& x, const Tensor& weight, const Tensor& mean,
                     const Tensor& rstd, const Tensor& g, bool center,
                     const Tensor& dx, const Tensor& dweight,
                     const Tensor& dbias) {
  const int64_t dim = x.size(-1);
  LC_DISPATCH_FLOATING(x.dtype(), OpName(center), [&] {
    NormBackwardLoop<scalar_t>(
        x.data<scalar_t>(), DataOrNull<scalar_t>(weight), mean.data<double>(),
        rstd.data<double>(), g.data<scalar_t>(), x.numel() / dim, dim, center,
        dx.data<scalar_t>(), DataOrNull<scalar_t>(dweight),
        DataOrNull<scalar_t>(dbias));
  });
}

constexpr PerDevice<NormForwardKernel*> kNormForward = {
    NormForwardCpu, internal::NormForwardCuda};
constexpr PerDevice<NormBackwardKernel*> kNormBackward = {
    NormBackwardCpu, internal::NormBackwardCuda};

// LayerNorm (center) and RmsNorm (!center) over the last dim of x; `op`
// names the op in errors and in the graph.
Tensor NormalizeLastDim(const char* op, const Tensor& x, const Tensor& weight,
                        const Tensor& bias, double eps, bool center) {
  Tensors inputs = {x};
  if (weight.defined()) inputs.push_back(weight);
  if (bias.defined()) inputs.push_back(bias);
  CheckFloatingInputs(op, inputs);
  LC_REQUIRE(x.dim() >= 1, op, ": expected x with at least 1 dim, got ",
             ShapeToString(x.shape()));
  const int64_t dim = x.size(-1);
  LC_REQUIRE(dim > 0, op, ": x ", ShapeToString(x.shape()),
             " has an empty last dim (expected at least 1 element)");
  for (const Tensor* param : {&weight, &bias}) {
    LC_REQUIRE(!param->defined() || param->shape() == Shape{dim}, op, ": ",
               param == &weight ? "weight" : "bias", " has shape ",
               ShapeToString(param->shape()), " but x ",
               ShapeToString(x.shape()), " needs [", dim, "]");
  }
  LC_REQUIRE(eps >= 0, op, ": eps = ", eps, " (expected >= 0)");
  if (ComputesOnFloat32Copies(x)) {
    return ComputeInFloat32(
        [&](const Tensor& x32) {
          // weight and bias, when given, are bfloat16 like x.
          return NormalizeLastDim(
              op, x32, weight.defined() ? weight.to(DType::kFloat32) : weight,
              bias.defined() ? bias.to(DType::kFloat32) : bias, eps, center);
        },
        x);
  }

  const int64_t rows = x.numel() / dim;
  const Tensor xc = x.detach().contiguous();
  const Tensor wc = weight.defined() ? weight.detach().contiguous() : Tensor();
  const Tensor bc = bias.defined() ? bias.detach().contiguous() : Tensor();
  Tensor out = Empty(x.shape(), x.dtype(), x.device());
  // Saved in float64 on the CPU so that the backward's xhat has no float32
  // rounding: for short rows its result is a small difference of large terms.
  // CUDA keeps them in the compute type (float32 for float32 and bfloat16).
  const DType stats_dtype = StatsDType(x.device(), x.dtype());
  const Tensor mean = Empty({rows}, stats_dtype, x.device());
  const Tensor rstd = Empty({rows}, stats_dtype, x.device());
  kNormForward.For(x.device())(xc, wc, bc, eps, center, out, mean, rstd);
  if (NeedsGrad(inputs)) {
    RecordOp(op, inputs, {&out}, /*saved=*/{xc, wc},
             [xc, wc, mean, rstd, dim, center,
              has_bias = bias.defined()](const Tensors& g) -> Tensors {
               const Tensor gc = g[0].contiguous();
               const Device device = xc.device();
               Tensors grads = {Empty(xc.shape(), xc.dtype(), device)};
               if (wc.defined()) {
                 grads.push_back(Empty({dim}, xc.dtype(), device));
               }
               if (has_bias) grads.push_back(Empty({dim}, xc.dtype(), device));
               const Tensor dw = wc.defined() ? grads[1] : Tensor();
               const Tensor db = has_bias ? grads.back() : Tensor();
               kNormBackward.For(device)(xc, wc, mean, rstd, gc, center,
                                         grads[0], dw, db);
               return grads;
             });
  }
  return out;
}

}  // namespace

Tensor LayerNorm(const Tensor& x, const Tensor& weight, const Tensor& bias,
                 double eps) {
  return NormalizeLastDim("LayerNorm", x, weight, bias, eps, /*center=*/true);
}

Tensor RmsNorm(const Tensor& x, const Tensor& weight, double eps) {
  return NormalizeLastDim("RmsNorm", x, weight, Tensor(), eps,
                          /*center=*/false);
}

namespace nn {

LayerNorm::LayerNorm(int64_t dim, double eps, bool bias, DType dtype)
    : eps_(eps) {
  LC_REQUIRE(dim > 0, "nn::LayerNorm: dim = ", dim, " (expected > 0)");
  weight_ = RegisterParameter("weight", Ones({dim}, dtype));
  if (bias) bias_ = RegisterParameter("bias", Zeros({dim}, dtype));
}

Tensor LayerNorm::Forward(const Tensor& x) const {
  return ::lc::LayerNorm(x, weight_, bias_, eps_);
}

RMSNorm::RMSNorm(int64_t dim, double eps, DType dtype) : eps_(eps) {
  LC_REQUIRE(dim > 0, "nn::RMSNorm: dim = ", dim, " (expected > 0)");
  weight_ = RegisterParameter("weight", Ones({dim}, dtype));
}

Tensor RMSNorm::Forward(const Tensor& x) const {
  return RmsNorm(x, weight_, eps_);
}

}  // namespace nn
}  // namespace lc
