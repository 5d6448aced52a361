// Optimization for training: AdamW (decoupled weight decay, bias
// correction; its state round-trips through a state dict for checkpoints) and
// global-norm gradient clipping that every rank of a sequence-parallel group
// applies identically. On the CPU and on a CUDA device, where both run as
// multi-tensor kernels (train/optimizer_cuda.h) with the CPU's arithmetic.
#ifndef LONGCTX_TRAIN_OPTIMIZER_H_
#define LONGCTX_TRAIN_OPTIMIZER_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/tensor.h"
#include "distributed/communicator.h"

namespace lc {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  // Whether parameters with fewer than 2 dimensions (biases, norm gains) are
  // decayed too. Off: only matrices decay (the GPT-2 recipe).
  bool decay_vectors = false;
};

// Checks betas in [0, 1), a finite eps > 0 and a finite weight_decay >= 0;
// errors name the value.
absl::Status ValidateAdamWOptions(const AdamWOptions& options);

// AdamW as torch.optim.AdamW computes it. The parameters are the master
// weights (leaves updated in place: float32 or float64 on the CPU, float32 on
// one CUDA device); the moments m and v have the parameter's dtype and
// device. On CUDA one fused kernel launch updates up to 48 tensors at once,
// with the same float64 arithmetic as the CPU loop (equal results). For step t
// = 1, 2, ... and each parameter p with gradient g (elementwise, in float64,
// rounded once to p's dtype):
//   p <- p * (1 - lr * weight_decay)            (decoupled; only decayed p)
//   m <- beta1 * m + (1 - beta1) * g
//   v <- beta2 * v + (1 - beta2) * g^2
//   p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// A parameter whose .grad is undefined is skipped (its moments keep their
// values; t still counts the optimizer's steps).
class AdamW {
 public:
  // `params` with their names (Module::NamedParameters()); the names key the
  // state dict. Errors: duplicate names, non-floating or non-contiguous
  // parameters, parameters on several devices, float64 on CUDA, options that
  // ValidateAdamWOptions refuses.
  static absl::StatusOr<AdamW> Create(
      std::vector<std::pair<std::string, Tensor>> params,
      const AdamWOptions& options = {});

  // One update of every parameter with a gradient, at learning rate `lr`.
  // Throws lc::Error for a gradient whose shape, dtype or device differs from
  // its parameter's.
  void Step(double lr);

  // Updates done so far (t of the last Step).
  int64_t step_count() const { return step_count_; }
  const AdamWOptions& options() const { return options_; }

  // The optimizer state: "optimizer.m.<param name>" and
  // "optimizer.v.<param name>" (the moments, views of the live state, on the
  // parameters' device) and "optimizer.step" (int64 CPU scalar).
  std::map<std::string, Tensor> StateDict() const;
  // Restores a state written by StateDict() (extra keys without the
  // "optimizer." prefix are ignored, so a whole checkpoint can be passed).
  // Errors name the key: missing, wrong shape, wrong step dtype. Nothing is
  // changed on error.
  absl::Status LoadStateDict(const std::map<std::string, Tensor>& state);

 private:
  AdamW(std::vector<std::pair<std::string, Tensor>> params,
        const AdamWOptions& options);

  struct ParamState {
    std::string name;
    Tensor param;
    Tensor m;
    Tensor v;
    bool decay = true;
  };
  std::vector<ParamState> params_;
  Device device_;  // of every parameter
  AdamWOptions options_;
  int64_t step_count_ = 0;
};

// Scales the gradients of `params` in place so that their global L2 norm is
// at most `max_norm` (coefficient max_norm / (norm + 1e-6) when the norm
// exceeds max_norm, as torch.nn.utils.clip_grad_norm_), and returns the norm
// before clipping. max_norm <= 0 only measures. Parameters without a .grad
// count as zero. Gradients: float32/float64 on the CPU, or float32 on one
// CUDA device, where the norm is a multi-tensor reduction in a fixed order
// (bit-identical on every run) and reading it is the call's one wait for the
// device.
//
// Across ranks: call it after AllReduceGradients, when every rank holds the
// same summed gradients. The norm (a float64 sum of squares over the
// parameters in order) is then already the global norm, and bit-identical on
// every rank, so every rank clips by the same factor. With `comm`, the ranks
// confirm this by gathering their norms: ranks whose norms differ (their
// gradients, and so their weights, would drift apart) get an Internal error
// naming both norms. Without `comm` (one rank) nothing is exchanged.
absl::StatusOr<double> ClipGradNorm(const std::vector<Tensor>& params,
                                    double max_norm,
                                    Communicator* comm = nullptr);

}  // namespace lc

#endif  // LONGCTX_TRAIN_OPTIMIZER_H_
