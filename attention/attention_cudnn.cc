#include "attention/attention_cudnn.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status.h"

namespace lc {
namespace {

// lse's entries of a launch's rows: [batch, h, segments, s], a view of lse
// ([batch, heads, n]).
Tensor LseView(const CudnnAttentionLaunch& l, const Tensor& lse) {
  const int64_t batch = lse.size(0), heads = lse.size(1), n = lse.size(2);
  return lse.reshape({batch, heads, n / l.segment, l.segment})
      .slice(1, l.head0, l.head0 + (l.shape.h - 1) * l.head_step + 1,
             l.head_step)
      .slice(3, l.offset, l.segment, l.rate);
}

// A launch's stats ([b = batch x segments, h, s], contiguous) in LseView's
// order.
Tensor StatsView(const CudnnAttentionLaunch& l, const Tensor& stats,
                 int64_t batch) {
  return stats.view({batch, l.shape.b / batch, l.shape.h, l.shape.s})
      .permute({0, 2, 1, 3});
}

// Unimplemented unless every tensor's data is 16-byte aligned, as cuDNN's
// kernels need (a contiguous view can start anywhere in its storage; the
// launches' row offsets are multiples of 16 bytes for head_dim % 8 == 0).
absl::Status CheckAligned(std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors) {
    const auto address = reinterpret_cast<uintptr_t>(t->raw_data());
    if (address % 16 != 0) {
      return absl::UnimplementedError(absl::StrCat(
          "cuDNN attention does not run this call: a tensor's data starts ",
          address % 16,
          " bytes past a 16-byte boundary (it needs 16-byte "
          "aligned data)"));
    }
  }
  return absl::OkStatus();
}

// The launch's first row in a contiguous bfloat16 [batch, n, heads,
// head_dim] buffer like q.
char* FirstRow(const CudnnAttentionLaunch& l, const Tensor& t) {
  const int64_t heads = t.size(2), head_dim = t.size(3);
  return static_cast<char*>(t.raw_data()) +
         (l.offset * heads + l.head0) * head_dim * DTypeSize(t.dtype());
}

}  // namespace

absl::StatusOr<std::vector<CudnnAttentionLaunch>> CudnnAttentionLaunches(
    const AttentionProblem& p) {
  const DType dtype = p.dtype;
  const int device = p.device.index;
  auto no = [](auto... why) {
    return absl::UnimplementedError(
        absl::StrCat("cuDNN attention does not run this call: ", why...));
  };
  if (dtype != DType::kBFloat16) {
    return no("inputs are ", DTypeName(dtype), " (it takes bfloat16)");
  }
  if (p.head_dim % 8 != 0 || p.head_dim > 128) {
    return no("head_dim ", p.head_dim, " (it takes multiples of 8 up to 128)");
  }
  if (p.pattern.block_mask != nullptr) return no("a block mask is set");
  if (p.dropout > 0) return no("dropout ", p.dropout, " (it takes 0)");
  if (p.max_patterns > 1) {
    return no("a head has ", p.max_patterns,
              " dilated patterns (it takes one per head)");
  }
  // Heads by pattern (segment W = min(w, n), rate, offset), in head order.
  std::map<std::tuple<int64_t, int64_t, int64_t>, std::vector<int64_t>> heads;
  for (int64_t h = 0; h < p.heads; ++h) {
    const std::vector<DilatedPattern>& patterns = p.pattern.head_patterns[h];
    if (patterns.empty()) continue;
    const DilatedPattern& d = patterns[0];
    heads[{std::min(d.segment_length, p.n), d.dilation_rate, d.offset}]
        .push_back(h);
  }
  std::vector<CudnnAttentionLaunch> launches;
  for (const auto& [pattern, members] : heads) {
    const auto [segment, rate, offset] = pattern;
    if (p.n % segment != 0) {
      return no("segment length ", segment, " does not divide n = ", p.n);
    }
    const int64_t rows =
        offset < segment ? (segment - offset + rate - 1) / rate : 0;
    if (rows == 0) continue;
    // One launch per run of heads with a constant step.
    for (size_t first = 0; first < members.size();) {
      const int64_t step =
          first + 1 < members.size() ? members[first + 1] - members[first] : 1;
      size_t last = first + 1;
      while (last < members.size() &&
             members[last] - members[last - 1] == step) {
        ++last;
      }
      CudnnAttentionLaunch l;
      l.head0 = members[first];
      l.head_step = step;
      l.segment = segment;
      l.rate = rate;
      l.offset = offset;
      l.shape.device = device;
      l.shape.b = p.batch * (p.n / segment);
      l.shape.h = static_cast<int64_t>(last - first);
      l.shape.s = rows;
      l.shape.d = p.head_dim;
      const int64_t row = p.heads * p.head_dim;  // elements per token
      l.shape.strides = {segment * row, step * p.head_dim, rate * row};
      l.shape.causal = p.plan.causal;
      l.shape.scale = static_cast<float>(p.scale);
      launches.push_back(l);
      first = last;
    }
  }
  return launches;
}

absl::Status CudnnAttentionForward(
    const std::vector<CudnnAttentionLaunch>& launches, const Tensor& q,
    const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse) {
  LC_RETURN_IF_ERROR(CheckAligned({&q, &k, &v, &out}));
  for (const CudnnAttentionLaunch& l : launches) {
    // stats: [b, h, s] float32.
    const Tensor stats =
        Empty({l.shape.b, l.shape.h, l.shape.s}, DType::kFloat32, q.device());
    LC_RETURN_IF_ERROR(CudnnSdpaForward(l.shape, FirstRow(l, q), FirstRow(l, k),
                                        FirstRow(l, v), FirstRow(l, out),
                                        stats.data<float>()));
    LC_RETURN_IF_ERROR(StatusFromCall(
        [&] { CopyInto(LseView(l, lse), StatsView(l, stats, q.size(0))); }));
  }
  return absl::OkStatus();
}

absl::Status CudnnAttentionBackward(
    const std::vector<CudnnAttentionLaunch>& launches, const Tensor& q,
    const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& grad_out,
    const Tensor& lse, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  LC_RETURN_IF_ERROR(
      CheckAligned({&q, &k, &v, &out, &grad_out, &dq, &dk, &dv}));
  for (const CudnnAttentionLaunch& l : launches) {
    // stats: [b, h, s] float32, the launch's rows of lse.
    const Tensor stats =
        Empty({l.shape.b, l.shape.h, l.shape.s}, DType::kFloat32, q.device());
    LC_RETURN_IF_ERROR(StatusFromCall(
        [&] { CopyInto(StatsView(l, stats, q.size(0)), LseView(l, lse)); }));
    LC_RETURN_IF_ERROR(CudnnSdpaBackward(
        l.shape, FirstRow(l, q), FirstRow(l, k), FirstRow(l, v),
        FirstRow(l, out), FirstRow(l, grad_out), stats.data<float>(),
        FirstRow(l, dq), FirstRow(l, dk), FirstRow(l, dv)));
  }
  return absl::OkStatus();
}

}  // namespace lc
