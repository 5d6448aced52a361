// Version counters (NOTE [ Version counters ] in core/autograd.h): in-place
// writes bump a counter shared by every view of the data, and backward
// refuses a graph whose saved tensors were written since it saved them.
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/autograd.h"
#include "core/recompute.h"
#include "gtest/gtest.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using testing::ExpectError;

// Test-local ops on float64 vectors, so this suite depends on core alone.
// y = a * b element-wise; its backward reads both inputs, like Mul.
Tensor Product(const Tensor& a, const Tensor& b) {
  const Tensor ac = a.contiguous(), bc = b.contiguous();
  Tensor y = Empty(a.shape(), DType::kFloat64);
  for (int64_t i = 0; i < y.numel(); ++i) {
    y.data<double>()[i] = ac.data<double>()[i] * bc.data<double>()[i];
  }
  if (NeedsGrad({a, b})) {
    RecordOp("Product", {a, b}, {&y}, /*saved=*/{ac, bc},
             [ac = ac.detach(), bc = bc.detach()](const Tensors& g) -> Tensors {
               return {Product(g[0], bc), Product(g[0], ac)};
             });
  }
  return y;
}

// y = x * x; its backward reads its output (dy/dx = 2 sqrt(y) for x > 0),
// like Softmax.
Tensor SquareOfPositive(const Tensor& x) {
  Tensor y = Product(x.detach(), x.detach());
  if (NeedsGrad({x})) {
    RecordOp("SquareOfPositive", {x}, {&y}, /*saved=*/{y},
             [y = y.detach()](const Tensors& g) -> Tensors {
               Tensor dx = Empty(y.shape(), DType::kFloat64);
               for (int64_t i = 0; i < y.numel(); ++i) {
                 dx.data<double>()[i] =
                     2 * std::sqrt(y.data<double>()[i]) * g[0].at({i});
               }
               return {dx};
             });
  }
  return y;
}

Tensor Leaf(const std::vector<double>& values) {
  Tensor t = FromVector(values, {static_cast<int64_t>(values.size())},
                        DType::kFloat64);
  t.set_requires_grad(true);
  return t;
}

Tensor Vector(const std::vector<double>& values) {
  return FromVector(values, {static_cast<int64_t>(values.size())},
                    DType::kFloat64);
}

TEST(VersionCounterTest, InPlaceWritesBumpACounterEveryViewShares) {
  const Tensor x = Zeros({2, 3}, DType::kFloat64);
  const Tensor row = x.slice(0, 1, 2);
  const Tensor alias = x.detach();
  const Tensor copy = x.clone();
  const uint64_t copy_version = copy.version();
  EXPECT_EQ(x.version(), 0u);
  x.set({0, 0}, 1);
  CopyInto(row, Ones({1, 3}, DType::kFloat64));
  AddInPlace(alias.transpose(0, 1), Ones({3, 2}, DType::kFloat64));
  for (const Tensor& view : {x, row, alias}) EXPECT_EQ(view.version(), 3u);
  EXPECT_EQ(copy.version(), copy_version);  // its own data
  // A failed write writes nothing and counts nothing.
  ExpectError([&] { CopyInto(x, Ones({3}, DType::kFloat64)); }, {"CopyInto"});
  ExpectError([&] { x.set({2, 0}, 1); }, {"out of range"});
  EXPECT_EQ(x.version(), 3u);
}

TEST(VersionCounterTest, UnmodifiedGraphBackpropsAsBefore) {
  const Tensor a = Leaf({1, 2, 3}), b = Leaf({4, 5, 6});
  Product(a, b).backward(Vector({1, 10, 100}));
  EXPECT_EQ(a.grad().ToVector(), (std::vector<double>{4, 50, 600}));
  EXPECT_EQ(b.grad().ToVector(), (std::vector<double>{1, 20, 300}));
}

TEST(VersionCounterTest, SavedInputWrittenInPlaceIsRefusedBeforeAnyGradient) {
  const std::string refused =
      "backward of Product: input 1 [3] saved at version 0, now version 1: it "
      "was modified in place after the op used it; clone it before modifying";
  const std::vector<std::function<void(const Tensor&)>> writes = {
      [](const Tensor& t) {
        CopyInto(t, Vector({7, 8, 9}));
      },
      [](const Tensor& t) {
        AddInPlace(t, Vector({7, 8, 9}));
      },
      [](const Tensor& t) { t.set({1}, 7); },
  };
  for (const auto& write : writes) {
    const Tensor a = Leaf({1, 2, 3}), b = Leaf({4, 5, 6});
    const Tensor y = Product(a, b);
    write(b.detach());  // the data, not the autograd leaf: allowed to write
    try {
      y.backward(Vector({1, 1, 1}));
      ADD_FAILURE() << "backward ran on a modified input";
    } catch (const Error& e) {
      EXPECT_EQ(e.status().message(), refused);
    }
    EXPECT_FALSE(a.grad().defined());
    EXPECT_FALSE(b.grad().defined());
  }
}

TEST(VersionCounterTest, WritesThroughAnyViewOfSavedDataAreRefused) {
  {
    // The op saved a view; the write goes to another view of the same data.
    const Tensor x = Leaf({1, 2, 3, 4});
    const Tensor y = Product(x.slice(0, 0, 2), x.slice(0, 2, 4));
    x.detach().slice(0, 3, 4).set({0}, 0);
    ExpectError(
        [&] {
          y.backward(Vector({1, 1}));
        },
        {"backward of Product: input 0 [2]", "now version 1"});
  }
  {
    // The op saved the whole tensor; the write goes through a slice of it.
    const Tensor a = Leaf({1, 2, 3}), b = Vector({4, 5, 6});
    const Tensor y = Product(a, b);
    CopyInto(b.slice(0, 0, 3, 2), Vector({0, 0}));
    ExpectError(
        [&] {
          y.backward(Vector({1, 1, 1}));
        },
        {"backward of Product: input 1 [3]"});
  }
}

TEST(VersionCounterTest, SavedOutputWrittenInPlaceIsRefused) {
  const Tensor x = Leaf({1, 2});
  const Tensor y = SquareOfPositive(x);
  AddInPlace(y.detach(), Vector({1, 1}));
  ExpectError(
      [&] {
        y.backward(Vector({1, 1}));
      },
      {"backward of SquareOfPositive: output 0 [2] saved at version 0, "
       "now version 1"});
}

TEST(VersionCounterTest, WritesAfterBackwardOrToACloneAreFine) {
  const Tensor a = Leaf({1, 2}), b = Vector({3, 4});
  const Tensor y = Product(a, b.clone());
  CopyInto(b, Vector({0, 0}));  // the op saved a clone: its own data
  y.backward(Vector({1, 1}));
  EXPECT_EQ(a.grad().ToVector(), (std::vector<double>{3, 4}));
  CopyInto(b, Vector({5, 6}));  // the graph is gone
  a.set_grad(Tensor());
  Product(a, b).backward(Vector({1, 1}));
  EXPECT_EQ(a.grad().ToVector(), (std::vector<double>{5, 6}));
}

TEST(VersionCounterTest, RetainedGraphIsRefusedOnceAnInputIsWritten) {
  const Tensor a = Leaf({1, 2}), b = Vector({3, 4});
  const Tensor y = Product(a, b);
  y.backward(Vector({1, 1}), /*retain_graph=*/true);
  b.set({0}, 0);
  ExpectError(
      [&] {
        y.backward(Vector({1, 1}));
      },
      {"backward of Product: input 1"});
  EXPECT_EQ(a.grad().ToVector(), (std::vector<double>{3, 4}));
}

TEST(VersionCounterTest, RecomputeRebuildsVersionsAndRefusesAWrittenInput) {
  const Tensor w = Leaf({2, 3});
  auto block = [&](const Tensors& in) -> Tensors {
    return {Product(Product(in[0], w), in[0])};
  };
  // Recomputation in backward records fresh versions: gradients as without.
  const Tensor x = Leaf({1, 2});
  Recompute(block, {x})[0].backward(Vector({1, 1}));
  EXPECT_EQ(x.grad().ToVector(), (std::vector<double>{4, 12}));  // 2 w x
  EXPECT_EQ(w.grad().ToVector(), (std::vector<double>{1, 4}));   // x^2

  const Tensor z = Leaf({1, 2});
  const Tensor input = Product(z, Vector({1, 1}));
  const Tensor out = Recompute(block, {input})[0];
  input.detach().set({0}, 5);
  ExpectError(
      [&] {
        out.backward(Vector({1, 1}));
      },
      {"backward of Recompute: input 0 [2] saved at version 0, now "
       "version 1"});
}

}  // namespace
}  // namespace lc
