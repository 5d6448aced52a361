// Activation recomputation: run a block without keeping the activations it
// would save for backward, and recompute them when the gradient arrives
// ("activation checkpointing" in PyTorch; in this project a checkpoint is a
// saved training state, train/checkpoint.h).
#ifndef LONGCTX_CORE_RECOMPUTE_H_
#define LONGCTX_CORE_RECOMPUTE_H_

#include <functional>

#include "core/autograd.h"

namespace lc {

using RecomputeFn = std::function<Tensors(const Tensors& inputs)>;

// Returns fn(inputs), computed with grad mode off so that no intermediate
// tensor is kept. In backward, fn is run again with grad mode on (with this
// thread's default generator restored to its state at the first call, so
// dropout draws the same mask) and its gradients flow to `inputs` and to any
// parameters fn uses. fn must be deterministic given the inputs and the
// default generator.
Tensors Recompute(RecomputeFn fn, const Tensors& inputs);

}  // namespace lc

#endif  // LONGCTX_CORE_RECOMPUTE_H_
