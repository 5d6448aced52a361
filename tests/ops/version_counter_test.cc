// Version counters in the ops (NOTE [ Version counters ] in core/autograd.h):
// each op that reads a tensor in backward declares it, so backward refuses
// the graph once that tensor is written in place; ops that read none accept
// the write.
#include <vector>

#include "core/autograd.h"
#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/reduce.h"
#include "ops/shape_ops.h"
#include "ops/softmax.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using testing::ExpectError;

Tensor Leaf(const std::vector<double>& values, const Shape& shape) {
  Tensor t = FromVector(values, shape, DType::kFloat64);
  t.set_requires_grad(true);
  return t;
}

TEST(VersionCounterOpsTest,
     MulRefusesAnInputWrittenSinceAndBackpropsOtherwise) {
  const Tensor a = Leaf({1, 2, 3, 4, 5, 6}, {2, 3});
  const Tensor b = FromVector({6, 5, 4, 3, 2, 1}, {2, 3}, DType::kFloat64);
  Sum(Mul(a, b)).backward();
  EXPECT_EQ(a.grad().ToVector(), b.ToVector());

  const Tensor y = Sum(Mul(a, b));
  CopyInto(b, ZerosLike(b));
  ExpectError([&] { y.backward(); },
              {"backward of Mul: input 1 [2, 3] saved at version 0, now "
               "version 1: it was modified in place after the op used it; "
               "clone it before modifying"});
}

TEST(VersionCounterOpsTest, MatmulRefusesAWriteThroughAViewOfItsInput) {
  const Tensor a = Leaf({1, 2, 3, 4}, {2, 2});
  const Tensor y = Sum(Matmul(a, Leaf({1, 0, 0, 1}, {2, 2})));
  AddInPlace(a.detach().slice(1, 1, 2), Ones({2, 1}, DType::kFloat64));
  ExpectError([&] { y.backward(); },
              {"backward of Matmul: input 0 [2, 2] saved at version 0, now "
               "version 1"});
}

TEST(VersionCounterOpsTest, SoftmaxRefusesItsOutputWrittenSince) {
  const Tensor x = Leaf({1, 2, 3}, {3});
  const Tensor y = Softmax(x, 0);
  const Tensor loss = Sum(y);  // Sum reads no input
  y.detach().set({0}, 0);
  ExpectError([&] { loss.backward(); },
              {"backward of Softmax: output 0 [3] saved at version 0, now "
               "version 1"});
}

TEST(VersionCounterOpsTest, IndexSelectRefusesItsIndicesWrittenSince) {
  const Tensor x = Leaf({1, 2, 3}, {3});
  const Tensor indices = FromVector({2, 0}, {2}, DType::kInt64);
  const Tensor y = Sum(IndexSelect(x, 0, indices));
  indices.set({0}, 1);
  ExpectError([&] { y.backward(); },
              {"backward of IndexSelect: saved tensor 0 [2] saved at version "
               "0, now version 1"});
}

TEST(VersionCounterOpsTest, OpsThatReadNoInputAcceptAWrite) {
  const Tensor a = Leaf({1, 2}, {2});
  const Tensor b = FromVector({3, 4}, {2}, DType::kFloat64);
  const Tensor y = Sum(Add(a, b).slice(0, 0, 2));
  CopyInto(b, ZerosLike(b));
  y.backward();
  EXPECT_EQ(a.grad().ToVector(), (std::vector<double>{1, 1}));
}

}  // namespace
}  // namespace lc
