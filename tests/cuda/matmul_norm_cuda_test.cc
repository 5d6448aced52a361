// GPU checks of Matmul (ops/matmul.h), Linear (ops/linear.h) and the norms
// (ops/norm.h): each op on CUDA in float64, float32 and bfloat16 against the
// same op on the CPU in float64 on the same values, forward and backward
// (through a random upstream gradient), for odd sizes, transposed, permuted
// and strided operands and broadcast batch dims; float32 GEMMs with TF32 on
// and off; norm weight gradients bit-identical from run to run; and the error
// for inputs on two devices.
#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ops/linear.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "tests/cuda/cuda_test_util.h"

namespace lc {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// Restores AllowTf32() when it goes out of scope.
class Tf32Guard {
 public:
  explicit Tf32Guard(bool allow) : previous_(AllowTf32()) {
    SetAllowTf32(allow);
  }
  ~Tf32Guard() { SetAllowTf32(previous_); }

 private:
  bool previous_;
};

class MatmulNormCudaTest : public CudaTest {};

struct MatmulCase {
  std::string name;
  Shape a;  // the shapes of the leaves; `view` may transpose or slice them
  Shape b;
  bool transpose_a;
  bool transpose_b;
  std::function<Tensor(const Tensor&)> view_a;
  std::function<Tensor(const Tensor&)> view_b;
};

Tensor Same(const Tensor& t) { return t; }

std::vector<MatmulCase> MatmulCases() {
  std::vector<MatmulCase> cases;
  // Odd sizes (m, k, n not multiples of 8; rows and columns of 1) in every
  // transpose combination: [m, k] x [k, n] read through the flags.
  const std::vector<std::array<int64_t, 3>> sizes = {
      {1, 1, 1}, {7, 13, 5}, {1, 33, 17}, {65, 1, 3}, {127, 255, 129}};
  for (const auto& [m, k, n] : sizes) {
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      cases.push_back({"m" + std::to_string(m) + " k" + std::to_string(k) +
                           " n" + std::to_string(n) + " ta" +
                           std::to_string(ta) + " tb" + std::to_string(tb),
                       ta ? Shape{k, m} : Shape{m, k},
                       tb ? Shape{n, k} : Shape{k, n}, ta, tb, Same, Same});
    }
  }
  // Batched, both operands with every batch dim.
  cases.push_back(
      {"batched", {3, 7, 13}, {3, 13, 5}, false, false, Same, Same});
  cases.push_back(
      {"batched transposed", {3, 13, 7}, {3, 5, 13}, true, true, Same, Same});
  // A 2-D operand shared by every batch (batch stride 0): b folds into one
  // GEMM with a's rows; with transpose_a it is a strided-batched GEMM.
  cases.push_back(
      {"shared b", {2, 3, 7, 13}, {13, 5}, false, false, Same, Same});
  cases.push_back(
      {"shared b, transposed a", {5, 13, 7}, {5, 13}, true, true, Same, Same});
  cases.push_back({"shared a", {7, 13}, {4, 13, 5}, false, false, Same, Same});
  // Mixed broadcasts: [2, 1] x [1, 4] batch dims do not coalesce.
  cases.push_back({"mixed broadcast",
                   {2, 1, 7, 13},
                   {1, 4, 13, 5},
                   false,
                   false,
                   Same,
                   Same});
  // Views: a permuted [7, 2, 13] -> [2, 7, 13] (row stride 26, batch stride
  // 13: read in place), b's every other column (column stride 2: made
  // contiguous), a 4-D permute whose batch dims do not coalesce.
  cases.push_back({"permuted a, sliced b",
                   {7, 2, 13},
                   {13, 10},
                   false,
                   false,
                   [](const Tensor& t) {
                     return t.permute({1, 0, 2});
                   },
                   [](const Tensor& t) { return t.slice(1, 0, 10, 2); }});
  cases.push_back({"4-D permuted",
                   {2, 5, 3, 8},
                   {2, 3, 8, 6},
                   false,
                   false,
                   [](const Tensor& t) {
                     return t.permute({0, 2, 1, 3});
                   },
                   Same});
  cases.push_back({"transposed views as operands",
                   {9, 11},
                   {6, 9},
                   false,
                   false,
                   [](const Tensor& t) { return t.transpose(0, 1); },
                   [](const Tensor& t) { return t.transpose(0, 1); }});
  return cases;
}

TEST_F(MatmulNormCudaTest, MatmulMatchesCpu) {
  for (const MatmulCase& c : MatmulCases()) {
    for (DType dtype : kFloatingDTypes) {
      ExpectLeavesMatchCpu(
          "Matmul " + c.name + " " + DTypeName(dtype),
          [&c](const std::vector<Tensor>& in) {
            return Matmul(c.view_a(in[0]), c.view_b(in[1]), c.transpose_a,
                          c.transpose_b);
          },
          {c.a, c.b}, dtype, CudaRelativeTolerance(dtype));
    }
  }
}

TEST_F(MatmulNormCudaTest, MatmulWithEmptyInnerDimIsZero) {
  const Tensor a = Zeros({3, 0}, DType::kFloat32, Device::Cuda(0));
  const Tensor b = Zeros({0, 4}, DType::kFloat32, Device::Cuda(0));
  const Tensor c = Matmul(a, b);
  ASSERT_EQ(c.shape(), (Shape{3, 4}));
  EXPECT_EQ(c.ToVector(), std::vector<double>(12, 0.0));
}

TEST_F(MatmulNormCudaTest, Float32MatmulWithTf32OnAndOff) {
  for (bool tf32 : {false, true}) {
    Tf32Guard guard(tf32);
    // TF32 keeps 10 of float32's 23 mantissa bits: each input is rounded by
    // up to 2^-11 (2^-10 if truncated) relative, so a product's relative
    // error is about 1e-3 at worst and less in the norm over many elements;
    // 2e-3 bounds it. Without TF32 the float32 tolerance holds.
    ExpectLeavesMatchCpu(
        std::string("Matmul float32 tf32 ") + (tf32 ? "on" : "off"),
        [](const std::vector<Tensor>& in) {
          return Matmul(in[0], in[1], false, true);
        },
        {{256, 513}, {384, 513}}, DType::kFloat32,
        tf32 ? 2e-3 : CudaRelativeTolerance(DType::kFloat32));
  }
}

TEST_F(MatmulNormCudaTest, MatmulOfTensorsOnTwoDevicesIsAnError) {
  const Tensor a = Ones({2, 3}, DType::kFloat32, Device::Cuda(0));
  const Tensor b = Ones({3, 4}, DType::kFloat32);
  const absl::Status s = StatusFromCall([&] { Matmul(a, b); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("Matmul"), HasSubstr("cuda:0"), HasSubstr("cpu"),
                    HasSubstr("one device")));
}

TEST_F(MatmulNormCudaTest, LinearMatchesCpu) {
  for (DType dtype : kFloatingDTypes) {
    const std::string suffix = std::string(" ") + DTypeName(dtype);
    ExpectLeavesMatchCpu(
        "Linear with bias" + suffix,
        [](const std::vector<Tensor>& in) {
          return Linear(in[0], in[1], in[2]);
        },
        {{3, 5, 7}, {6, 7}, {6}}, dtype, CudaRelativeTolerance(dtype));
    ExpectLeavesMatchCpu(
        "Linear without bias, transposed x" + suffix,
        [](const std::vector<Tensor>& in) {
          return Linear(in[0].transpose(0, 1), in[1], Tensor());
        },
        {{5, 3, 33}, {17, 33}}, dtype, CudaRelativeTolerance(dtype));
    ExpectLeavesMatchCpu(
        "Linear of one vector" + suffix,
        [](const std::vector<Tensor>& in) {
          return Linear(in[0], in[1], in[2]);
        },
        {{9}, {1, 9}, {1}}, dtype, CudaRelativeTolerance(dtype));
  }
}

struct NormCase {
  Shape x;
  bool transposed;  // x is the transpose of its first two dims
};

// Rows of at least 3 elements: for 1 (RmsNorm) or 2 (LayerNorm) elements the
// input gradient is only its component along the normalized row, a
// difference of nearly equal terms (relative size eps / variance) that no
// floating type resolves to a relative tolerance.
std::vector<NormCase> NormCases() {
  return {{{1, 7}, false},   {{4, 3}, false},       {{300, 64}, false},
          {{5, 129}, false}, {{2, 3, 1000}, false}, {{17, 4099}, false},
          {{33, 40}, true},  {{1000, 33}, false}};
}

Tensor NormInput(const Tensor& leaf, const NormCase& c) {
  return c.transposed ? leaf.transpose(0, 1) : leaf;
}

Shape LeafShape(const NormCase& c) {
  Shape shape = c.x;
  if (c.transposed) std::swap(shape[0], shape[1]);
  return shape;
}

TEST_F(MatmulNormCudaTest, LayerNormMatchesCpu) {
  for (const NormCase& c : NormCases()) {
    const Shape dim = {c.x.back()};
    for (DType dtype : kFloatingDTypes) {
      const std::string name = "LayerNorm " + ShapeToString(c.x) +
                               (c.transposed ? " transposed " : " ") +
                               DTypeName(dtype);
      ExpectLeavesMatchCpu(
          name + " with weight and bias",
          [&c](const std::vector<Tensor>& in) {
            return LayerNorm(NormInput(in[0], c), in[1], in[2]);
          },
          {LeafShape(c), dim, dim}, dtype, CudaRelativeTolerance(dtype));
      ExpectLeavesMatchCpu(
          name + " without parameters",
          [&c](const std::vector<Tensor>& in) {
            return LayerNorm(NormInput(in[0], c), Tensor(), Tensor());
          },
          {LeafShape(c)}, dtype, CudaRelativeTolerance(dtype));
    }
  }
}

TEST_F(MatmulNormCudaTest, RmsNormMatchesCpu) {
  for (const NormCase& c : NormCases()) {
    const Shape dim = {c.x.back()};
    for (DType dtype : kFloatingDTypes) {
      const std::string name = "RmsNorm " + ShapeToString(c.x) +
                               (c.transposed ? " transposed " : " ") +
                               DTypeName(dtype);
      ExpectLeavesMatchCpu(
          name + " with weight",
          [&c](const std::vector<Tensor>& in) {
            return RmsNorm(NormInput(in[0], c), in[1]);
          },
          {LeafShape(c), dim}, dtype, CudaRelativeTolerance(dtype));
      ExpectLeavesMatchCpu(
          name + " without weight",
          [&c](const std::vector<Tensor>& in) {
            return RmsNorm(NormInput(in[0], c), Tensor());
          },
          {LeafShape(c)}, dtype, CudaRelativeTolerance(dtype));
    }
  }
}

TEST_F(MatmulNormCudaTest, NormGradientsAreBitIdenticalAcrossRuns) {
  // 5000 rows: 79 chunks of partial sums per column.
  const Tensor x =
      RandomNormal({5000, 257}, DType::kFloat32, Device::Cuda(0), 1);
  const Tensor g =
      RandomNormal({5000, 257}, DType::kFloat32, Device::Cuda(0), 2);
  const Tensor w = RandomNormal({257}, DType::kFloat32, Device::Cuda(0), 3);
  const Tensor b = RandomNormal({257}, DType::kFloat32, Device::Cuda(0), 4);
  std::vector<std::vector<double>> runs[2];
  for (auto& run : runs) {
    const Tensor xl = x.detach().set_requires_grad(true);
    const Tensor wl = w.detach().set_requires_grad(true);
    const Tensor bl = b.detach().set_requires_grad(true);
    LayerNorm(xl, wl, bl).backward(g);
    const Tensor wr = w.detach().set_requires_grad(true);
    RmsNorm(x, wr).backward(g);
    run = {xl.grad().ToVector(), wl.grad().ToVector(), bl.grad().ToVector(),
           wr.grad().ToVector()};
  }
  EXPECT_EQ(runs[0], runs[1]);
}

TEST_F(MatmulNormCudaTest, NormOfTensorsOnTwoDevicesIsAnError) {
  const Tensor x = Ones({2, 3}, DType::kFloat32, Device::Cuda(0));
  const absl::Status s =
      StatusFromCall([&] { LayerNorm(x, Ones({3}), Tensor()); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr("LayerNorm"), HasSubstr("one device")));
}

}  // namespace
}  // namespace lc
