// GPU checks of Embedding (ops/embedding.h), IndexSelect, Concat and Split
// (ops/shape_ops.h), CrossEntropy (ops/loss.h; mean and sum) and ApplyRotary
// (ops/rope.h):
// each op on CUDA in float64, float32 and bfloat16 against the same op on the
// CPU in float64 on the same values, forward and backward (through a random
// upstream gradient), for odd sizes, strided inputs, and index tensors on the
// host and on the device; embedding and cross-entropy gradients bit-identical
// from run to run; and the errors for out-of-range indices and targets on
// CUDA and for tensors on two devices.
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ops/embedding.h"
#include "ops/loss.h"
#include "ops/rope.h"
#include "ops/shape_ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace lc {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// An int64 CPU tensor of `shape` with values uniform in [low, high).
Tensor RandomIndices(const Shape& shape, int64_t low, int64_t high,
                     uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> dist(low, high - 1);
  std::vector<double> values(NumElements(shape));
  for (double& v : values) v = static_cast<double>(dist(rng));
  return FromVector(values, shape, DType::kInt64);
}

// `indices` on the device of `like` when on_device, else on the CPU.
Tensor IndicesFor(const Tensor& indices, const Tensor& like, bool on_device) {
  return on_device ? indices.to(like.device()) : indices;
}

std::string Where(bool on_device) {
  return on_device ? " indices on device" : " indices on host";
}

class EmbeddingLossRopeCudaTest : public CudaTest {};

TEST_F(EmbeddingLossRopeCudaTest, EmbeddingMatchesCpu) {
  struct EmbeddingCase {
    int64_t vocab;
    int64_t dim;
    Shape indices;
  };
  const std::vector<EmbeddingCase> cases = {
      {50, 33, {4, 77}}, {1, 1, {5}}, {1000, 130, {3000}}, {7, 64, {2, 3, 5}}};
  for (const EmbeddingCase& c : cases) {
    for (DType dtype : kFloatingDTypes) {
      for (bool on_device : {false, true}) {
        const std::string name = "Embedding [" + std::to_string(c.vocab) +
                                 ", " + std::to_string(c.dim) + "] " +
                                 ShapeToString(c.indices) + " " +
                                 DTypeName(dtype) + Where(on_device);
        const Tensor indices =
            RandomIndices(c.indices, 0, c.vocab, SeedOfCase(name + " indices"));
        ExpectLeavesMatchCpu(
            name,
            [&](const std::vector<Tensor>& in) {
              return Embedding(in[0], IndicesFor(indices, in[0], on_device));
            },
            {{c.vocab, c.dim}}, dtype, CudaRelativeTolerance(dtype));
      }
    }
  }
}

TEST_F(EmbeddingLossRopeCudaTest, EmbeddingGradientIsBitIdenticalAcrossRuns) {
  // 100000 lookups of 7 rows: each row's gradient sums ~14000 terms.
  const Tensor indices = RandomIndices({100000}, 0, 7, 11).to(Device::Cuda(0));
  const Tensor weight =
      RandomNormal({7, 64}, DType::kFloat32, Device::Cuda(0), 12);
  const Tensor g =
      RandomNormal({100000, 64}, DType::kFloat32, Device::Cuda(0), 13);
  std::vector<double> runs[2];
  for (std::vector<double>& run : runs) {
    const Tensor w = weight.detach().set_requires_grad(true);
    Embedding(w, indices).backward(g);
    run = w.grad().ToVector();
  }
  EXPECT_EQ(runs[0], runs[1]);
}

TEST_F(EmbeddingLossRopeCudaTest, OutOfRangeEmbeddingIndexIsAnError) {
  const Tensor weight = Ones({50, 4}, DType::kFloat32, Device::Cuda(0));
  const Tensor indices = FromVector({1, 2, 3, 50, -1}, {5}, DType::kInt64);
  for (bool on_device : {false, true}) {
    SCOPED_TRACE(Where(on_device));
    const absl::Status s = StatusFromCall(
        [&] { Embedding(weight, IndicesFor(indices, weight, on_device)); });
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()),
                AllOf(HasSubstr("Embedding"), HasSubstr("value 50"),
                      HasSubstr("position 3"), HasSubstr("< 50")));
    const absl::Status negative = StatusFromCall([&] {
      Embedding(weight, IndicesFor(FromVector({-1}, {1}, DType::kInt64), weight,
                                   on_device));
    });
    EXPECT_THAT(std::string(negative.message()),
                AllOf(HasSubstr("Embedding"), HasSubstr("value -1")));
  }
}

TEST_F(EmbeddingLossRopeCudaTest, IndicesOnAnotherDeviceAreAnError) {
  const Tensor indices =
      FromVector({0, 1}, {2}, DType::kInt64, Device::Cuda(0));
  const absl::Status s = StatusFromCall([&] {
    Embedding(Ones({3, 4}), indices);
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("Embedding"), HasSubstr("indices"),
                    HasSubstr("cuda:0"), HasSubstr("expected cpu")));
  const absl::Status rope = StatusFromCall([&] {
    ApplyRotary(Ones({1, 2, 1, 4}), indices);
  });
  EXPECT_THAT(std::string(rope.message()),
              AllOf(HasSubstr("ApplyRotary"), HasSubstr("positions"),
                    HasSubstr("cuda:0")));
}

TEST_F(EmbeddingLossRopeCudaTest, IndexSelectMatchesCpu) {
  const Tensor indices = FromVector({0, 8, 8, 3, 8, 1}, {6}, DType::kInt64);
  for (DType dtype : kFloatingDTypes) {
    for (bool on_device : {false, true}) {
      const std::string suffix =
          std::string(" ") + DTypeName(dtype) + Where(on_device);
      for (int64_t dim : {0, 1, 2}) {
        // x [9, 9, 9] viewed transposed: every dim has size 9 > max index.
        ExpectLeavesMatchCpu(
            "IndexSelect dim " + std::to_string(dim) + suffix,
            [&](const std::vector<Tensor>& in) {
              return IndexSelect(in[0].transpose(0, 2), dim,
                                 IndicesFor(indices, in[0], on_device));
            },
            {{9, 9, 9}}, dtype, CudaRelativeTolerance(dtype));
      }
    }
  }
}

TEST_F(EmbeddingLossRopeCudaTest, IndexSelectGathersIntegerTensors) {
  std::vector<double> values(60);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 1e12 + i;
  const Tensor indices = FromVector({2, 0, 2}, {3}, DType::kInt64);
  for (DType dtype : {DType::kInt64, DType::kUInt8}) {
    SCOPED_TRACE(DTypeName(dtype));
    std::vector<double> v = values;
    if (dtype == DType::kUInt8) {
      for (size_t i = 0; i < v.size(); ++i) v[i] = i;
    }
    const Tensor x = FromVector(v, {4, 3, 5}, dtype);
    const Tensor expected = IndexSelect(x, 1, indices);
    const Tensor actual = IndexSelect(x.to(Device::Cuda(0)), 1, indices);
    ASSERT_EQ(actual.dtype(), dtype);
    EXPECT_EQ(actual.ToVector(), expected.ToVector());
  }
}

TEST_F(EmbeddingLossRopeCudaTest, ConcatAndSplitMatchCpu) {
  for (DType dtype : kFloatingDTypes) {
    const std::string suffix = std::string(" ") + DTypeName(dtype);
    ExpectLeavesMatchCpu(
        "Concat" + suffix,
        [](const std::vector<Tensor>& in) {
          return Concat({in[0], in[1].transpose(0, 1), in[2]}, 1);
        },
        {{3, 4}, {5, 3}, {3, 1}}, dtype, CudaRelativeTolerance(dtype));
    ExpectLeavesMatchCpu(
        "Split" + suffix,
        [](const std::vector<Tensor>& in) {
          const std::vector<Tensor> pieces = Split(in[0], {2, 0, 3}, 1);
          return Concat({pieces[2], pieces[1], pieces[0]}, 1);
        },
        {{4, 5}}, dtype, CudaRelativeTolerance(dtype));
  }
}

TEST_F(EmbeddingLossRopeCudaTest, CrossEntropyMatchesCpu) {
  struct LossCase {
    int64_t rows;
    int64_t classes;
    bool transposed;  // logits are the transpose of a [classes, rows] leaf
  };
  const std::vector<LossCase> cases = {{1, 1, false},     {1, 7, false},
                                       {33, 256, false},  {1000, 33, false},
                                       {64, 5000, false}, {40, 9, true}};
  for (const LossCase& c : cases) {
    for (DType dtype : kFloatingDTypes) {
      for (bool on_device : {false, true}) {
        const std::string name = "CrossEntropy [" + std::to_string(c.rows) +
                                 ", " + std::to_string(c.classes) + "]" +
                                 (c.transposed ? " transposed " : " ") +
                                 DTypeName(dtype) + Where(on_device);
        // About one row in five ignored (-100).
        std::vector<double> targets =
            RandomIndices({c.rows}, 0, c.classes, SeedOfCase(name + " targets"))
                .ToVector();
        const std::vector<double> ignore =
            RandomIndices({c.rows}, 0, 5, SeedOfCase(name + " ignore"))
                .ToVector();
        for (size_t i = 0; i < targets.size(); ++i) {
          if (ignore[i] == 0 && c.rows > 1) targets[i] = -100;
        }
        const Tensor target = FromVector(targets, {c.rows}, DType::kInt64);
        ExpectLeavesMatchCpu(
            name,
            [&](const std::vector<Tensor>& in) {
              const Tensor logits =
                  c.transposed ? in[0].transpose(0, 1) : in[0];
              return CrossEntropy(logits, IndicesFor(target, in[0], on_device));
            },
            {c.transposed ? Shape{c.classes, c.rows}
                          : Shape{c.rows, c.classes}},
            dtype, CudaRelativeTolerance(dtype));
      }
    }
  }
}

// reduction kSum: the same rows summed in a fixed order without the
// division, forward and backward, against the CPU in float64.
TEST_F(EmbeddingLossRopeCudaTest, CrossEntropySumMatchesCpu) {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {1, 7}, {33, 256}, {1000, 33}, {2500, 17}};
  for (const auto& [rows, classes] : shapes) {
    for (DType dtype : kFloatingDTypes) {
      for (bool on_device : {false, true}) {
        const std::string name = "CrossEntropy sum [" + std::to_string(rows) +
                                 ", " + std::to_string(classes) + "] " +
                                 DTypeName(dtype) + Where(on_device);
        // About one row in five ignored (-100), more than one row summed.
        std::vector<double> targets =
            RandomIndices({rows}, 0, classes, SeedOfCase(name + " targets"))
                .ToVector();
        const std::vector<double> ignore =
            RandomIndices({rows}, 0, 5, SeedOfCase(name + " ignore"))
                .ToVector();
        for (size_t i = 0; i < targets.size(); ++i) {
          if (ignore[i] == 0 && rows > 1) targets[i] = -100;
        }
        const Tensor target = FromVector(targets, {rows}, DType::kInt64);
        ExpectLeavesMatchCpu(
            name,
            [&](const std::vector<Tensor>& in) {
              return CrossEntropy(in[0], IndicesFor(target, in[0], on_device),
                                  -100, LossReduction::kSum);
            },
            {{rows, classes}}, dtype, CudaRelativeTolerance(dtype));
      }
    }
  }
}

TEST_F(EmbeddingLossRopeCudaTest, CrossEntropyWithOtherIgnoreIndex) {
  const Tensor target = FromVector({3, 1, 3, 0}, {4}, DType::kInt64);
  for (DType dtype : kFloatingDTypes) {
    ExpectLeavesMatchCpu(
        std::string("CrossEntropy ignore_index 3 ") + DTypeName(dtype),
        [&](const std::vector<Tensor>& in) {
          return CrossEntropy(in[0], target.to(in[0].device()),
                              /*ignore_index=*/3);
        },
        {{4, 5}}, dtype, CudaRelativeTolerance(dtype));
  }
}

TEST_F(EmbeddingLossRopeCudaTest, CrossEntropyOfOnlyIgnoredRowsIsZero) {
  const Tensor logits =
      RandomNormal({3, 4}, DType::kFloat32, Device::Cuda(0), 21)
          .set_requires_grad(true);
  const Tensor target =
      FromVector({-100, -100, -100}, {3}, DType::kInt64, Device::Cuda(0));
  const Tensor loss = CrossEntropy(logits, target);
  EXPECT_EQ(loss.item(), 0.0);
  loss.backward();
  EXPECT_EQ(logits.grad().ToVector(), std::vector<double>(12, 0.0));
}

TEST_F(EmbeddingLossRopeCudaTest, CrossEntropySumOfOnlyIgnoredRowsIsZero) {
  const Tensor logits =
      RandomNormal({3, 4}, DType::kFloat32, Device::Cuda(0), 22)
          .set_requires_grad(true);
  const Tensor target =
      FromVector({-100, -100, -100}, {3}, DType::kInt64, Device::Cuda(0));
  const Tensor loss = CrossEntropy(logits, target, -100, LossReduction::kSum);
  EXPECT_EQ(loss.item(), 0.0);
  loss.backward();
  EXPECT_EQ(logits.grad().ToVector(), std::vector<double>(12, 0.0));
}

TEST_F(EmbeddingLossRopeCudaTest, CrossEntropyIsBitIdenticalAcrossRuns) {
  const Tensor logits =
      RandomNormal({4096, 1000}, DType::kFloat32, Device::Cuda(0), 31);
  const Tensor target = RandomIndices({4096}, 0, 1000, 32).to(Device::Cuda(0));
  for (LossReduction reduction : {LossReduction::kMean, LossReduction::kSum}) {
    SCOPED_TRACE(reduction == LossReduction::kMean ? "mean" : "sum");
    std::vector<double> losses, grads[2];
    for (std::vector<double>& grad : grads) {
      const Tensor x = logits.detach().set_requires_grad(true);
      const Tensor loss = CrossEntropy(x, target, -100, reduction);
      losses.push_back(loss.item());
      loss.backward();
      grad = x.grad().ToVector();
    }
    EXPECT_EQ(losses[0], losses[1]);
    EXPECT_EQ(grads[0], grads[1]);
  }
}

TEST_F(EmbeddingLossRopeCudaTest, OutOfRangeTargetIsAnError) {
  const Tensor logits = Ones({4, 5}, DType::kFloat32, Device::Cuda(0));
  for (bool on_device : {false, true}) {
    SCOPED_TRACE(Where(on_device));
    const Tensor high = FromVector({0, 5, 1, -100}, {4}, DType::kInt64);
    const absl::Status s = StatusFromCall(
        [&] { CrossEntropy(logits, IndicesFor(high, logits, on_device)); });
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()),
                AllOf(HasSubstr("CrossEntropy"), HasSubstr("target 5"),
                      HasSubstr("row 1"), HasSubstr("< 5")));
    const Tensor negative = FromVector({0, 1, -1, 2}, {4}, DType::kInt64);
    const absl::Status n = StatusFromCall(
        [&] { CrossEntropy(logits, IndicesFor(negative, logits, on_device)); });
    EXPECT_THAT(std::string(n.message()),
                AllOf(HasSubstr("target -1"), HasSubstr("row 2"),
                      HasSubstr("ignore_index = -100")));
  }
}

TEST_F(EmbeddingLossRopeCudaTest, ApplyRotaryMatchesCpu) {
  enum class Layout { kContiguous, kTransposed, kSliced };
  struct RopeCase {
    Shape x;  // [batch, n, heads, head_dim]
    Layout layout;
  };
  const std::vector<RopeCase> cases = {{{1, 1, 1, 2}, Layout::kContiguous},
                                       {{2, 5, 3, 8}, Layout::kContiguous},
                                       {{2, 33, 4, 64}, Layout::kContiguous},
                                       {{1, 7, 2, 130}, Layout::kTransposed},
                                       {{3, 9, 2, 16}, Layout::kSliced},
                                       // The largest head_dim: a 16 KiB
                                       // frequency table per block.
                                       {{1, 3, 1, 4096}, Layout::kContiguous}};
  for (const RopeCase& c : cases) {
    // The leaf the case's x is a view of: [batch, heads, n, head_dim] for
    // transposed, twice the head_dim for sliced (every other element).
    Shape leaf = c.x;
    if (c.layout == Layout::kTransposed) std::swap(leaf[1], leaf[2]);
    if (c.layout == Layout::kSliced) leaf[3] *= 2;
    for (DType dtype : kFloatingDTypes) {
      for (bool on_device : {false, true}) {
        const std::string name = "ApplyRotary " + ShapeToString(c.x) + " " +
                                 std::to_string(static_cast<int>(c.layout)) +
                                 " " + DTypeName(dtype) + Where(on_device);
        // Global positions of a rank's slice of a long sequence.
        const Tensor positions =
            RandomIndices({c.x[1]}, 0, 5000, SeedOfCase(name + " positions"));
        ExpectLeavesMatchCpu(
            name,
            [&](const std::vector<Tensor>& in) {
              Tensor x = in[0];
              if (c.layout == Layout::kTransposed) x = x.transpose(1, 2);
              if (c.layout == Layout::kSliced) x = x.slice(3, 0, leaf[3], 2);
              return ApplyRotary(x, IndicesFor(positions, in[0], on_device));
            },
            {leaf}, dtype, CudaRelativeTolerance(dtype));
      }
    }
  }
}

}  // namespace
}  // namespace lc
