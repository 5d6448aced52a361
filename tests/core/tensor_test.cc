#include "core/tensor.h"

#include "core/autograd.h"
#include "core/random.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using testing::ExpectError;
using ::testing::HasSubstr;

TEST(TensorTest, FactoriesFillShapeDtypeAndValues) {
  Tensor z = Zeros({2, 3}, DType::kFloat64);
  EXPECT_EQ(z.shape(), (Shape{2, 3}));
  EXPECT_EQ(z.strides(), (Shape{3, 1}));
  EXPECT_EQ(z.dtype(), DType::kFloat64);
  EXPECT_TRUE(z.device().is_cpu());
  EXPECT_EQ(z.ToVector(), std::vector<double>(6, 0.0));
  EXPECT_EQ(Ones({4}, DType::kBFloat16).ToVector(), std::vector<double>(4, 1));
  EXPECT_EQ(Full({2}, 2.5).ToVector(), (std::vector<double>{2.5, 2.5}));
  EXPECT_EQ(Arange(1, 2, 0.25, DType::kFloat64).ToVector(),
            (std::vector<double>{1, 1.25, 1.5, 1.75}));
  EXPECT_EQ(Arange(0, 5, 1, DType::kInt64).ToVector(),
            (std::vector<double>{0, 1, 2, 3, 4}));
  EXPECT_EQ(Full({}, 7).item(), 7);
  EXPECT_EQ(Zeros({0, 3}).numel(), 0);
}

TEST(TensorTest, FactoriesRejectBadArguments) {
  ExpectError([] { Zeros({2, -1}); }, {"negative size", "[2, -1]"});
  ExpectError([] { FromVector({1, 2, 3}, {2, 2}); }, {"3 values", "[2, 2]"});
  ExpectError([] { Arange(0, 1, 0); }, {"step 0"});
}

TEST(TensorTest, ElementAccessChecksIndices) {
  Tensor t = Arange(0, 6, 1, DType::kFloat32).reshape({2, 3});
  EXPECT_EQ(t.at({1, 2}), 5);
  t.set({0, 1}, 42);
  EXPECT_EQ(t.at({0, 1}), 42);
  ExpectError([&] { t.at({2, 0}); }, {"index 2", "size 2"});
  ExpectError([&] { t.at({0}); }, {"rank 1", "expected rank 2"});
  ExpectError([&] { t.item(); }, {"6 elements", "expected 1"});
}

TEST(TensorTest, ViewsShareStorageWithoutCopies) {
  Tensor t = Arange(0, 24, 1, DType::kFloat64).reshape({2, 3, 4});
  Tensor p = t.permute({2, 0, 1});
  EXPECT_EQ(p.shape(), (Shape{4, 2, 3}));
  EXPECT_EQ(p.storage(), t.storage());
  EXPECT_FALSE(p.is_contiguous());
  EXPECT_EQ(p.at({3, 1, 2}), t.at({1, 2, 3}));

  Tensor tr = t.transpose(0, 2);
  EXPECT_EQ(tr.at({3, 2, 1}), t.at({1, 2, 3}));

  // A strided slice is dilation: every second element starting at 1.
  Tensor s = t.slice(2, 1, 4, 2);
  EXPECT_EQ(s.shape(), (Shape{2, 3, 2}));
  EXPECT_EQ(s.storage(), t.storage());
  EXPECT_EQ(s.at({1, 1, 0}), t.at({1, 1, 1}));
  EXPECT_EQ(s.at({1, 1, 1}), t.at({1, 1, 3}));
  s.set({0, 0, 1}, -1);
  EXPECT_EQ(t.at({0, 0, 3}), -1);

  Tensor neg = t.slice(1, -2, 100);
  EXPECT_EQ(neg.shape(), (Shape{2, 2, 4}));
  EXPECT_EQ(neg.at({0, 0, 0}), t.at({0, 1, 0}));

  Tensor u = t.unsqueeze(1);
  EXPECT_EQ(u.shape(), (Shape{2, 1, 3, 4}));
  EXPECT_EQ(u.squeeze(1).shape(), t.shape());
  EXPECT_EQ(t.reshape({-1, 4}).shape(), (Shape{6, 4}));
  EXPECT_EQ(t.reshape({6, 4}).storage(), t.storage());
}

TEST(TensorTest, ReshapeOfStridedCopiesAndViewRefuses) {
  Tensor t = Arange(0, 6, 1, DType::kFloat64).reshape({2, 3});
  Tensor tr = t.transpose(0, 1);
  Tensor r = tr.reshape({6});
  EXPECT_NE(r.storage(), t.storage());
  EXPECT_EQ(r.ToVector(), (std::vector<double>{0, 3, 1, 4, 2, 5}));
  ExpectError([&] { tr.view({6}); }, {"not contiguous"});
  ExpectError([&] { t.reshape({4, 2}); }, {"[2, 3]", "[4, 2]"});
  ExpectError([&] { t.permute({0, 0}); }, {"repeats"});
  ExpectError([&] { t.transpose(0, 2); }, {"dim 2", "rank 2"});
  ExpectError([&] { t.squeeze(0); }, {"size 2", "expected 1"});
  ExpectError([&] { t.slice(0, 0, 1, 0); }, {"step 0"});
}

TEST(TensorTest, ContiguousAndDtypeConversions) {
  Generator gen = testing::TestGenerator();
  Tensor t = Randn({3, 5}, gen, DType::kFloat64);
  Tensor tr = t.transpose(0, 1);
  Tensor c = tr.contiguous();
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_EQ(c.ToVector(), tr.ToVector());
  EXPECT_EQ(t.contiguous().storage(), t.storage());

  Tensor f = t.to(DType::kFloat32);
  const std::vector<double> tv = t.ToVector(), fv = f.ToVector();
  for (size_t i = 0; i < tv.size(); ++i) {
    EXPECT_EQ(fv[i], static_cast<double>(static_cast<float>(tv[i])));
  }
  // bfloat16 keeps 8 significant bits and rounds to nearest even:
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7 and rounds to 1.
  Tensor b =
      FromVector({1.0 + 1.0 / 256, 1.0 + 3.0 / 256, -2.5}, {3}, DType::kFloat64)
          .to(DType::kBFloat16);
  EXPECT_EQ(b.ToVector(), (std::vector<double>{1.0, 1.0 + 4.0 / 256, -2.5}));
}

TEST(TensorTest, PrintingNamesShapeDtypeAndValues) {
  Tensor t = Arange(0, 3, 1, DType::kFloat64);
  const std::string s = t.ToString();
  EXPECT_THAT(s, HasSubstr("[3]"));
  EXPECT_THAT(s, HasSubstr("float64"));
  EXPECT_THAT(s, HasSubstr("0, 1, 2"));
  EXPECT_EQ(Tensor().ToString(), "Tensor(undefined)");
}

TEST(TensorTest, CopyIntoConvertsAndChecksShapes) {
  Tensor dst = Zeros({2, 2}, DType::kFloat32);
  Tensor src = Arange(0, 4, 1, DType::kInt64).reshape({2, 2}).transpose(0, 1);
  CopyInto(dst, src);
  EXPECT_EQ(dst.ToVector(), (std::vector<double>{0, 2, 1, 3}));
  ExpectError([&] { CopyInto(dst, Zeros({4})); }, {"[2, 2]", "[4]"});
}

// Views are differentiable: their gradients scatter back to the base.
TEST(TensorTest, ViewGradientsMatchFiniteDifferences) {
  Generator gen = testing::TestGenerator();
  Tensor x = Randn({3, 4, 2}, gen, DType::kFloat64);
  testing::ExpectGradientsMatchFiniteDifferences(
      [](const Tensors& in) -> Tensors {
        const Tensor& t = in[0];
        return {t.permute({2, 0, 1}).slice(2, 1, 4, 2).reshape({-1}),
                t.transpose(0, 1).contiguous().unsqueeze(0),
                t.slice(0, 1, 2).squeeze(0).clone()};
      },
      {x}, 1e-6, 1e-8);
}

TEST(TensorTest, DtypeConversionIsDifferentiable) {
  Tensor x = FromVector({1, 2, 3}, {3}, DType::kFloat64);
  x.set_requires_grad(true);
  Tensor y = x.to(DType::kFloat32);
  y.backward(FromVector({0.5, 0.25, 2}, {3}, DType::kFloat32));
  ASSERT_TRUE(x.grad().defined());
  EXPECT_EQ(x.grad().dtype(), DType::kFloat64);
  EXPECT_EQ(x.grad().ToVector(), (std::vector<double>{0.5, 0.25, 2}));
}

}  // namespace
}  // namespace lc
