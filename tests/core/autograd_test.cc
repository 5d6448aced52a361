#include "core/autograd.h"

#include <memory>
#include <thread>

#include "core/random.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using testing::ExpectError;
using ::testing::HasSubstr;

Tensor Leaf(const std::vector<double>& values) {
  Tensor t = FromVector(values, {static_cast<int64_t>(values.size())},
                        DType::kFloat64);
  t.set_requires_grad(true);
  return t;
}

TEST(AutogradTest, SharedInputAccumulatesBothGradients) {
  Tensor x = Leaf({1, 2, 3});
  Tensor a = x.slice(0, 0, 2);  // x[0], x[1]
  Tensor b = x.slice(0, 1, 3);  // x[1], x[2]
  Backward({a, b}, {FromVector({10, 20}, {2}, DType::kFloat64),
                    FromVector({100, 200}, {2}, DType::kFloat64)});
  EXPECT_EQ(x.grad().ToVector(), (std::vector<double>{10, 120, 200}));
}

TEST(AutogradTest, GradientsAccumulateAcrossBackwardCalls) {
  Tensor x = Leaf({1, 2});
  x.clone().backward(FromVector({1, 1}, {2}, DType::kFloat64));
  x.clone().backward(FromVector({2, 3}, {2}, DType::kFloat64));
  EXPECT_EQ(x.grad().ToVector(), (std::vector<double>{3, 4}));
  x.set_grad(Tensor());
  EXPECT_FALSE(x.grad().defined());
}

TEST(AutogradTest, GraphIsFreedAfterBackward) {
  auto tracker = std::make_shared<MemoryTracker>();
  Tensor x = Leaf({1, 2, 3});
  Tensor y;
  {
    MemoryScope scope(tracker);
    Tensor saved = Zeros({1 << 16}, DType::kFloat64);  // 512 KiB
    y = x.clone();
    RecordOp("HoldsSaved", {x}, {&y},
             [saved](const Tensors& g) -> Tensors { return {g[0]}; });
  }
  const int64_t before = tracker->stats().current_bytes;
  EXPECT_GE(before, (1 << 16) * 8);
  y.backward(Ones({3}, DType::kFloat64));
  EXPECT_LE(tracker->stats().current_bytes, before - (1 << 16) * 8);
  ExpectError([&] { y.backward(Ones({3}, DType::kFloat64)); },
              {"already freed"});
}

TEST(AutogradTest, RetainGraphAllowsASecondBackward) {
  Tensor x = Leaf({1, 2});
  Tensor y = x.clone();
  y.backward(Ones({2}, DType::kFloat64), /*retain_graph=*/true);
  y.backward(Ones({2}, DType::kFloat64));
  EXPECT_EQ(x.grad().ToVector(), (std::vector<double>{2, 2}));
}

TEST(AutogradTest, NoGradGuardRecordsNothing) {
  Tensor x = Leaf({1, 2});
  {
    NoGradGuard no_grad;
    EXPECT_FALSE(GradEnabled());
    Tensor y = x.clone();
    EXPECT_FALSE(y.requires_grad());
    EXPECT_TRUE(y.is_leaf());
  }
  EXPECT_TRUE(GradEnabled());
  EXPECT_TRUE(x.clone().requires_grad());
}

TEST(AutogradTest, GradModeIsPerThread) {
  NoGradGuard no_grad;
  bool other_thread_enabled = false;
  std::thread([&] { other_thread_enabled = GradEnabled(); }).join();
  EXPECT_TRUE(other_thread_enabled);
  EXPECT_FALSE(GradEnabled());
}

TEST(AutogradTest, BadBackwardCallsAreClearErrors) {
  ExpectError([] { Zeros({2}).backward(Ones({2})); },
              {"does not require grad"});
  Tensor x = Leaf({1, 2});
  ExpectError([&] { x.clone().backward(); }, {"more than one element"});
  ExpectError([&] { x.clone().backward(Ones({3}, DType::kFloat64)); },
              {"expected the same shape"});
  ExpectError([&] { x.clone().set_requires_grad(false); }, {"only leaf"});
  ExpectError([] { Zeros({2}, DType::kInt64).set_requires_grad(true); },
              {"int64"});
}

TEST(AutogradTest, UnusedOutputOfMultiOutputNodeGetsZeros) {
  Tensor x = Leaf({1, 2});
  Tensor a = Empty({2}, DType::kFloat64), b = Empty({2}, DType::kFloat64);
  Tensors seen;
  RecordOp("TwoOutputs", {x}, {&a, &b}, [&seen](const Tensors& g) -> Tensors {
    seen = g;
    return {g[0]};
  });
  b.backward(FromVector({5, 6}, {2}, DType::kFloat64));
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0].ToVector(), (std::vector<double>{0, 0}));
  EXPECT_EQ(seen[1].ToVector(), (std::vector<double>{5, 6}));
}

// MissingGrad::kUndefined: the unused output's gradient arrives undefined.
TEST(AutogradTest, UnusedOutputGetsUndefinedWhenTheOpAsks) {
  Tensor x = Leaf({1, 2});
  Tensor a = Empty({2}, DType::kFloat64), b = Empty({2}, DType::kFloat64);
  Tensors seen;
  RecordOp(
      "TwoOutputs", {x}, {&a, &b},
      [&seen](const Tensors& g) -> Tensors {
        seen = g;
        return {g[1]};
      },
      MissingGrad::kUndefined);
  b.backward(FromVector({5, 6}, {2}, DType::kFloat64));
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_FALSE(seen[0].defined());
  EXPECT_EQ(seen[1].ToVector(), (std::vector<double>{5, 6}));
  EXPECT_EQ(x.grad().ToVector(), (std::vector<double>{5, 6}));
}

}  // namespace
}  // namespace lc
