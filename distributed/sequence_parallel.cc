#include "distributed/sequence_parallel.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "ops/shape_ops.h"

namespace lc {
namespace {

// Gradients smaller than this are packed together before the all-reduce.
constexpr int64_t kFuseBelowBytes = 64 * 1024;

// Chunk c of an n-token sequence cut into num_chunks chunks whose sizes
// differ by at most one (the first n % num_chunks are one token longer).
PositionSpan Chunk(int64_t n, int64_t num_chunks, int64_t c) {
  const int64_t base = n / num_chunks;
  const int64_t extra = n % num_chunks;
  const int64_t begin = c * base + std::min(c, extra);
  return {begin, begin + base + (c < extra ? 1 : 0)};
}

}  // namespace

absl::StatusOr<SequenceLayout> ParseSequenceLayout(const std::string& text) {
  if (text == "contiguous") return SequenceLayout::kContiguous;
  if (text == "zigzag") return SequenceLayout::kZigzag;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown sequence layout \"", text,
                   "\" (expected \"contiguous\" or \"zigzag\")"));
}

std::string SequenceLayoutName(SequenceLayout layout) {
  return layout == SequenceLayout::kZigzag ? "zigzag" : "contiguous";
}

std::vector<PositionSpan> RankSpans(int64_t n, int k, int rank,
                                    SequenceLayout layout) {
  LC_REQUIRE(n >= 0, "RankSpans: sequence length n = ", n, " (expected >= 0)");
  LC_REQUIRE(k >= 1, "RankSpans: k = ", k, " ranks (expected >= 1)");
  LC_REQUIRE(rank >= 0 && rank < k, "RankSpans: rank ", rank,
             " is out of range (expected 0 <= rank < k = ", k, ")");
  if (layout == SequenceLayout::kContiguous) return {Chunk(n, k, rank)};
  return {Chunk(n, 2 * k, rank), Chunk(n, 2 * k, 2 * k - 1 - rank)};
}

int64_t RankTokenCount(int64_t n, int k, int rank, SequenceLayout layout) {
  int64_t count = 0;
  for (const PositionSpan& span : RankSpans(n, k, rank, layout)) {
    count += span.size();
  }
  return count;
}

Tensor SplitSequence(const Tensor& x, int k, int rank, SequenceLayout layout) {
  LC_REQUIRE(x.defined(), "SplitSequence: x is an undefined tensor");
  LC_REQUIRE(x.dim() >= 2, "SplitSequence: x has shape ",
             ShapeToString(x.shape()), " (expected [batch, n, ...])");
  std::vector<Tensor> pieces;
  for (const PositionSpan& span : RankSpans(x.size(1), k, rank, layout)) {
    pieces.push_back(x.slice(1, span.begin, span.end));
  }
  return Concat(pieces, 1);
}

absl::StatusOr<Tensor> GatherSequence(Communicator& communicator,
                                      const Tensor& local, int64_t n,
                                      SequenceLayout layout) {
  const int k = communicator.size();
  const int rank = communicator.rank();
  const std::string where = absl::StrCat("GatherSequence on rank ", rank, ": ");
  if (!local.defined()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "local is an undefined tensor"));
  }
  if (n < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "sequence length n = ", n, " (expected >= 0)"));
  }
  const int64_t count = RankTokenCount(n, k, rank, layout);
  if (local.dim() < 2 || local.size(1) != count) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, "local has shape ", ShapeToString(local.shape()), " but the ",
        SequenceLayoutName(layout), " layout of n = ", n, " tokens over ", k,
        " ranks gives this rank ", count, " tokens (expected [batch, ", count,
        ", ...])"));
  }
  int64_t max_count = 0;
  for (int r = 0; r < k; ++r) {
    max_count = std::max(max_count, RankTokenCount(n, k, r, layout));
  }

  Tensor padded = local.detach();
  if (count < max_count || !local.is_contiguous()) {
    Shape padded_shape = local.shape();
    padded_shape[1] = max_count;
    padded = Zeros(padded_shape, local.dtype(), local.device());
    CopyInto(padded.slice(1, 0, count), local.detach());
  }
  Shape gathered_shape = padded.shape();
  gathered_shape.insert(gathered_shape.begin(), k);
  const Tensor gathered = Empty(gathered_shape, local.dtype(), local.device());
  LC_RETURN_IF_ERROR(communicator.AllGather(padded, gathered));

  Shape out_shape = local.shape();
  out_shape[1] = n;
  Tensor out = Empty(out_shape, local.dtype(), local.device());
  for (int r = 0; r < k; ++r) {
    const Tensor tokens = gathered.slice(0, r, r + 1).squeeze(0);
    int64_t offset = 0;
    for (const PositionSpan& span : RankSpans(n, k, r, layout)) {
      CopyInto(out.slice(1, span.begin, span.end),
               tokens.slice(1, offset, offset + span.size()));
      offset += span.size();
    }
  }
  return out;
}

absl::Status AllReduceGradients(Communicator& communicator,
                                const std::vector<Tensor>& params) {
  const std::string where =
      absl::StrCat("AllReduceGradients on rank ", communicator.rank(), ": ");
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].defined()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "parameter ", i, " is an undefined tensor"));
    }
    if (!IsFloating(params[i].dtype())) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "parameter ", i, " has dtype ", DTypeName(params[i].dtype()),
          " (expected float32, float64 or bfloat16)"));
    }
  }
  // Large dense gradients are reduced where they are, in parameter order;
  // the others are packed per dtype, in parameter order. A group of one has
  // nothing to add: its missing gradients become zeros, as on more ranks.
  std::map<DType, std::vector<Tensor>> packed;
  for (const Tensor& param : params) {
    Tensor grad = param.grad();
    if (!grad.defined()) {
      grad = Zeros(param.shape(), param.dtype(), param.device());
      param.set_grad(grad);
    }
    if (communicator.size() == 1) continue;
    if (grad.is_contiguous() &&
        grad.numel() * DTypeSize(grad.dtype()) >= kFuseBelowBytes) {
      LC_RETURN_IF_ERROR(communicator.AllReduceSum(grad));
    } else {
      packed[grad.dtype()].push_back(grad);
    }
  }
  for (const auto& [dtype, grads] : packed) {
    int64_t total = 0;
    for (const Tensor& grad : grads) total += grad.numel();
    const Tensor flat = Empty({total}, dtype, grads.front().device());
    int64_t offset = 0;
    for (const Tensor& grad : grads) {
      CopyInto(flat.slice(0, offset, offset + grad.numel()).view(grad.shape()),
               grad);
      offset += grad.numel();
    }
    LC_RETURN_IF_ERROR(communicator.AllReduceSum(flat));
    offset = 0;
    for (const Tensor& grad : grads) {
      CopyInto(grad,
               flat.slice(0, offset, offset + grad.numel()).view(grad.shape()));
      offset += grad.numel();
    }
  }
  return absl::OkStatus();
}

}  // namespace lc
