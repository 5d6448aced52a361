// lc::Attention on cuDNN's fused flash attention (cudnn_sdpa.h): which
// problems it can run and how a dilated pattern maps onto cuDNN's batched
// [b, h, s, d] problems without copies. Each set of heads that shares one
// pattern (w, r, o) is one launch: its b = batch x segments problems are the
// segments' selected rows (positions o, o + r, ... of each), which are
// strided views of q, k, v: dilation stays a stride. Internal to attention/.
#ifndef LONGCTX_ATTENTION_ATTENTION_CUDNN_H_
#define LONGCTX_ATTENTION_ATTENTION_CUDNN_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "attention/attention_kernel.h"
#include "attention/cudnn_sdpa.h"
#include "core/tensor.h"

namespace lc {

// One cuDNN launch: heads head0, head0 + head_step, ... (shape.h of them),
// all under the pattern with segments of `segment` tokens (the whole
// sequence when shorter), rate `rate` and offset `offset`.
struct CudnnAttentionLaunch {
  CudnnSdpaShape shape;
  int64_t head0 = 0, head_step = 1;
  int64_t segment = 0, rate = 1, offset = 0;
};

// The launches that run the calls of problem p (on a CUDA device) on cuDNN,
// or Unimplemented saying what keeps cuDNN from running them: a head with
// more than one pattern, a block mask, dropout, a segment length that does
// not divide n, a head_dim that is not a multiple of 8 up to 128, or inputs
// that are not bfloat16. (A call with a key padding mask runs on ours: see
// kCudnnNoPaddingMask.)
absl::StatusOr<std::vector<CudnnAttentionLaunch>> CudnnAttentionLaunches(
    const AttentionProblem& p);

// Why cuDNN does not run a call with a key padding mask.
inline constexpr char kCudnnNoPaddingMask[] =
    "cuDNN attention does not run this call: a key padding mask is set";

// out ([batch, n, heads, head_dim] bfloat16, contiguous; rows no launch
// selects keep their values) and lse ([batch, heads, n] float32, likewise)
// of contiguous q, k, v. Unimplemented when cuDNN has no engine for a
// launch or a tensor's data is not 16-byte aligned (callers then recompute
// everything on their own kernels: earlier launches may have written).
absl::Status CudnnAttentionForward(
    const std::vector<CudnnAttentionLaunch>& launches, const Tensor& q,
    const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse);

// dq, dk, dv (like q; rows no launch selects keep their values) from the
// forward's out and lse and the output gradient grad_out.
absl::Status CudnnAttentionBackward(
    const std::vector<CudnnAttentionLaunch>& launches, const Tensor& q,
    const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& grad_out,
    const Tensor& lse, const Tensor& dq, const Tensor& dk, const Tensor& dv);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_ATTENTION_CUDNN_H_
