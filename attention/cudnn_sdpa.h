// cuDNN's fused flash attention (its SDPA graphs, built with the cuDNN
// backend API: no cudnn-frontend) on bfloat16 [b, h, s, d] views with
// arbitrary row, head and batch strides, forward with the rows'
// log-sum-exp and backward by recomputation. It backs lc::Attention where it
// applies (attention_cudnn.h); nothing else calls it. Execution plans are
// built once per shape and thread (cuDNN picks the engine by its
// heuristics) and reused. Plain C++: includable by g++.
#ifndef LONGCTX_ATTENTION_CUDNN_SDPA_H_
#define LONGCTX_ATTENTION_CUDNN_SDPA_H_

#include <array>
#include <cstdint>

#include "absl/status/status.h"

namespace lc {

// b x h independent problems of s queries against s keys and values of
// head_dim d, every tensor (q, k, v, out and their gradients) a bfloat16
// view with these element strides for dims b, h and s (d's stride is 1).
struct CudnnSdpaShape {
  int device = 0;
  int64_t b = 0, h = 0, s = 0, d = 0;
  std::array<int64_t, 3> strides{};
  bool causal = false;  // query i sees keys j <= i
  float scale = 1;
};

// out = softmax(scale * q k^T) v per problem; stats ([b, h, s] float32,
// contiguous) = each row's log-sum-exp of scale * q k^T. Queued on the
// thread's current stream of the device. Unimplemented when cuDNN has no
// engine for the shape (the caller falls back to its own kernels);
// Internal for a failing launch.
absl::Status CudnnSdpaForward(const CudnnSdpaShape& shape, const void* q,
                              const void* k, const void* v, void* out,
                              float* stats);

// dq, dk, dv (written, not added) of the forward above for the output
// gradient grad_out, from its out and stats (which may be the merged result
// of a larger softmax: the gradient is then that of this problem's pairs).
// dq is added up in float32 with atomics (a [b, h, s, d] float32 workspace),
// so results may differ in the last bits from run to run. (cuDNN's
// deterministic pattern keeps a float32 dq per key tile instead: 16 GiB of
// workspace for issue 7's 1M-token dilated call, and 33% slower, measured;
// callers that need determinism run their own backward.)
absl::Status CudnnSdpaBackward(const CudnnSdpaShape& shape, const void* q,
                               const void* k, const void* v, const void* out,
                               const void* grad_out, const float* stats,
                               void* dq, void* dk, void* dv);

}  // namespace lc

#endif  // LONGCTX_ATTENTION_CUDNN_SDPA_H_
