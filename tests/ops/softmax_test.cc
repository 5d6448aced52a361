#include "ops/softmax.h"

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/random.h"
#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using testing::DefaultTolerance;
using testing::ExpectAllClose;
using testing::ExpectError;
using testing::ExpectGradientsMatchFiniteDifferences;
using testing::ExpectMatchesTorch;
using testing::kStridedLayouts;
using testing::NonContiguousCopy;
using testing::OracleAttrs;
using testing::StridedLayout;
using testing::StridedLayoutName;
using testing::TestGenerator;

struct SoftmaxCase {
  std::string torch_op;
  std::function<Tensor(const Tensor&, int64_t)> fn;
};

std::vector<SoftmaxCase> SoftmaxCases() {
  return {{"softmax", Softmax}, {"log_softmax", LogSoftmax}};
}

OracleAttrs DimAttrs(int64_t dim) {
  return OracleAttrs{{{"dim", static_cast<double>(dim)}}, {}, {}};
}

TEST(SoftmaxTest, MatchesTorch) {
  Generator gen = TestGenerator();
  for (const SoftmaxCase& op : SoftmaxCases()) {
    for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
      for (int64_t dim : {0, 1, -1}) {
        SCOPED_TRACE(op.torch_op + " " + DTypeName(dtype) + " dim " +
                     std::to_string(dim));
        const auto fn = [&](const Tensors& in) -> Tensors {
          return {op.fn(in[0], dim)};
        };
        ExpectMatchesTorch(op.torch_op, fn, {Randn({3, 4, 5}, gen, dtype)},
                           DimAttrs(dim));
        for (StridedLayout layout : kStridedLayouts) {
          SCOPED_TRACE(StridedLayoutName(layout));
          ExpectMatchesTorch(
              op.torch_op, fn,
              {NonContiguousCopy(Randn({4, 3, 6}, gen, dtype), layout)},
              DimAttrs(dim));
        }
      }
      SCOPED_TRACE(op.torch_op + " " + DTypeName(dtype) + " 1-D and scalar");
      const auto last = [&](const Tensors& in) -> Tensors {
        return {op.fn(in[0], -1)};
      };
      ExpectMatchesTorch(op.torch_op, last, {Randn({17}, gen, dtype)},
                         DimAttrs(-1));
      ExpectMatchesTorch(op.torch_op, last, {Randn({}, gen, dtype)},
                         DimAttrs(-1));
    }
  }
}

TEST(SoftmaxTest, MatchesTorchInBFloat16) {
  Generator gen = TestGenerator();
  for (const SoftmaxCase& op : SoftmaxCases()) {
    SCOPED_TRACE(op.torch_op);
    const Tensor x = Randn({4, 8}, gen, DType::kBFloat16);
    EXPECT_EQ(op.fn(x, 1).dtype(), DType::kBFloat16);
    ExpectMatchesTorch(
        op.torch_op,
        [&](const Tensors& in) -> Tensors { return {op.fn(in[0], 1)}; }, {x},
        DimAttrs(1));
  }
}

TEST(SoftmaxTest, GradientsMatchFiniteDifferences) {
  Generator gen = TestGenerator();
  for (const SoftmaxCase& op : SoftmaxCases()) {
    for (int64_t dim : {0, 1, 2}) {
      SCOPED_TRACE(op.torch_op + " dim " + std::to_string(dim));
      ExpectGradientsMatchFiniteDifferences(
          [&](const Tensors& in) -> Tensors { return {op.fn(in[0], dim)}; },
          {NonContiguousCopy(Randn({2, 3, 4}, gen, DType::kFloat64))});
    }
    SCOPED_TRACE(op.torch_op + " strided output gradient");
    ExpectGradientsMatchFiniteDifferences(
        [&](const Tensors& in) -> Tensors {
          return {op.fn(in[0], 0).transpose(0, 1)};
        },
        {Randn({4, 5}, gen, DType::kFloat64)});
  }
}

TEST(SoftmaxTest, LargeInputsDoNotOverflow) {
  Generator gen = TestGenerator();
  // exp(1000) overflows float64, so this only works with the maximum
  // subtracted. Both ops are invariant to the shift by 1000; `unshifted`
  // subtracts it exactly (Sterbenz), so the rounding of x + 1000 in float32
  // does not count against the tolerance.
  for (DType dtype : {DType::kFloat64, DType::kFloat32}) {
    SCOPED_TRACE(DTypeName(dtype));
    const Tensor shifted = Randn({3, 6}, gen, dtype) + 1000.0;
    const Tensor unshifted = shifted - 1000.0;
    ExpectAllClose(Softmax(shifted, 1), Softmax(unshifted, 1),
                   DefaultTolerance(dtype), "softmax");
    ExpectAllClose(LogSoftmax(shifted, 1), LogSoftmax(unshifted, 1),
                   DefaultTolerance(dtype), "log_softmax");
  }
}

TEST(SoftmaxTest, BadInputsAreRejected) {
  const Tensor x = Zeros({2, 3});
  ExpectError([&] { Softmax(x, 2); }, {"Softmax", "dim 2", "rank 2"});
  ExpectError([&] { LogSoftmax(x, -3); }, {"LogSoftmax", "dim -3", "rank 2"});
  ExpectError([] { Softmax(Zeros({2}, DType::kInt64), 0); },
              {"Softmax", "int64"});
  ExpectError([] { LogSoftmax(Tensor(), 0); }, {"LogSoftmax", "undefined"});
}

}  // namespace
}  // namespace lc
