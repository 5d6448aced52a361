// GPU checks of the reductions (ops/reduce.h), softmax (ops/softmax.h) and
// dropout (ops/dropout.h): each op on CUDA in float64, float32 and bfloat16
// against the same op on the CPU in float64 on the same values, forward and
// backward (through a random upstream gradient), over contiguous, transposed
// and strided inputs with lines of 1, 33 and 4097 elements and more than a
// million elements in all; reductions bit-identical from run to run; Max's
// ties and NaNs resolved like the CPU's; dropout masks bit-identical to the
// CPU's for the same generator state.
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/random.h"
#include "core/status.h"
#include "core/tensor.h"
#include "gtest/gtest.h"
#include "ops/dropout.h"
#include "ops/reduce.h"
#include "ops/softmax.h"
#include "tests/cuda/cuda_test_util.h"

namespace lc {
namespace {

// A case's input: `shape` on CUDA in `dtype` with standard normal values;
// transposed means it is the transpose of a contiguous tensor (its first two
// dims swapped), sliced that it is every third element of the last dim of a
// wider one.
enum class Layout { kContiguous, kTransposed, kSliced };

struct Case {
  Shape shape;
  Layout layout;
};

std::string CaseName(const std::string& op, DType dtype, const Case& c) {
  const char* layouts[] = {"contiguous", "transposed", "sliced"};
  return op + " " + DTypeName(dtype) + " " + ShapeToString(c.shape) + " " +
         layouts[static_cast<int>(c.layout)];
}

Tensor CudaInput(const Case& c, DType dtype, const std::string& name) {
  Shape base = c.shape;
  if (c.layout == Layout::kTransposed) std::swap(base[0], base[1]);
  if (c.layout == Layout::kSliced) base.back() *= 3;
  const Tensor t =
      RandomNormal(base, dtype, Device::Cuda(0), SeedOfCase(name + " input"));
  if (c.layout == Layout::kTransposed) return t.transpose(0, 1);
  if (c.layout == Layout::kSliced) return t.slice(-1, 0, base.back(), 3);
  return t;
}

// What an op's outputs sum: nothing (their error is relative to their own
// size), or the input's elements (a sum or a mean of them).
enum class Sums { kNone, kSum, kMean };

// Runs op on a CUDA input x and on its float64 CPU copy, compares the
// outputs, then backpropagates one random gradient through both and compares
// x's gradients. A sum of r unit-variance terms may cancel to below its
// rounding error, which is about rtol * sqrt(r) (the norm of the terms); so
// sums are also allowed that much absolute error (over all outputs, divided
// by r for a mean).
void ExpectOpMatchesCpu(const std::string& what,
                        const std::function<Tensor(const Tensor&)>& op,
                        const Tensor& x, Sums sums = Sums::kNone) {
  SCOPED_TRACE(what);
  const double tol = CudaRelativeTolerance(x.dtype());
  const Tensor x_ref =
      x.to(Device::Cpu()).to(DType::kFloat64).set_requires_grad(true);
  x.set_requires_grad(true);
  const Tensor y = op(x);
  const Tensor y_ref = op(x_ref);
  ASSERT_TRUE(y.device() == Device::Cuda(0)) << y.device();
  ASSERT_EQ(y.dtype(), x.dtype());
  double atol = 0;
  if (sums != Sums::kNone && y.numel() > 0) {
    const double terms = static_cast<double>(x.numel()) / y.numel();
    atol = tol * std::sqrt(static_cast<double>(x.numel()));
    if (sums == Sums::kMean && terms > 0) atol /= terms;
  }
  ExpectCudaClose(y, y_ref, tol, what + " forward", atol);
  const Tensor g = RandomNormal(y.shape(), x.dtype(), Device::Cuda(0),
                                SeedOfCase(what + " gradient"));
  y.backward(g);
  y_ref.backward(g.to(Device::Cpu()).to(DType::kFloat64));
  ASSERT_TRUE(x.grad().defined());
  EXPECT_EQ(x.grad().dtype(), x.dtype());
  ExpectCudaClose(x.grad(), x_ref.grad(), tol, what + " gradient");
}

class ReduceSoftmaxDropoutCudaTest : public CudaTest {};

TEST_F(ReduceSoftmaxDropoutCudaTest, SumAndMeanMatchCpu) {
  struct SumCase {
    Case input;
    std::vector<int64_t> dims;  // empty: over all elements
    bool keepdim;
  };
  const std::vector<SumCase> cases = {
      {{{1000003}, Layout::kContiguous}, {}, false},
      {{{33, 4097}, Layout::kContiguous}, {1}, false},
      {{{33, 4097}, Layout::kContiguous}, {0}, true},
      {{{4097, 33}, Layout::kTransposed}, {1}, false},
      {{{4097, 33}, Layout::kTransposed}, {0, 1}, true},
      {{{5, 6, 7}, Layout::kSliced}, {0, 2}, false},
      {{{5, 6, 7}, Layout::kSliced}, {-2}, true},
      {{{4097, 1}, Layout::kContiguous}, {1}, false},
      {{{3, 0, 4}, Layout::kContiguous}, {1}, false},
      {{{}, Layout::kContiguous}, {}, false},
  };
  for (DType dtype : kFloatingDTypes) {
    for (const SumCase& c : cases) {
      for (bool mean : {false, true}) {
        // The mean of no elements is NaN on both devices.
        if (mean && NumElements(c.input.shape) == 0) continue;
        const std::string what =
            CaseName(mean ? "Mean" : "Sum", dtype, c.input) + " dims " +
            ShapeToString(c.dims) + (c.keepdim ? " keepdim" : "");
        ExpectOpMatchesCpu(
            what,
            [&](const Tensor& x) {
              if (c.dims.empty()) return mean ? Mean(x) : Sum(x);
              return mean ? Mean(x, c.dims, c.keepdim)
                          : Sum(x, c.dims, c.keepdim);
            },
            CudaInput(c.input, dtype, what), mean ? Sums::kMean : Sums::kSum);
      }
    }
  }
}

TEST_F(ReduceSoftmaxDropoutCudaTest, SumToShapeMatchesCpu) {
  const std::vector<Shape> targets = {{33, 1}, {65}, {7, 1, 65}, {}};
  for (DType dtype : kFloatingDTypes) {
    for (const Shape& target : targets) {
      const Case input{{7, 33, 65}, Layout::kSliced};
      const std::string what =
          CaseName("SumToShape", dtype, input) + " to " + ShapeToString(target);
      ExpectOpMatchesCpu(
          what, [&](const Tensor& x) { return SumToShape(x, target); },
          CudaInput(input, dtype, what), Sums::kSum);
    }
  }
}

TEST_F(ReduceSoftmaxDropoutCudaTest, MaxMatchesCpu) {
  struct MaxCase {
    Case input;
    int64_t dim;
    bool keepdim;
  };
  const std::vector<MaxCase> cases = {
      {{{33, 4097}, Layout::kContiguous}, 1, false},
      {{{33, 4097}, Layout::kContiguous}, 0, true},
      {{{4097, 33}, Layout::kTransposed}, -1, false},
      {{{5, 6, 7}, Layout::kSliced}, 1, true},
      {{{4097, 1}, Layout::kContiguous}, 1, false},
      {{{1000003}, Layout::kContiguous}, 0, false},
      {{{}, Layout::kContiguous}, 0, false},
  };
  for (DType dtype : kFloatingDTypes) {
    for (const MaxCase& c : cases) {
      const std::string what = CaseName("Max", dtype, c.input) + " dim " +
                               std::to_string(c.dim) +
                               (c.keepdim ? " keepdim" : "");
      ExpectOpMatchesCpu(
          what, [&](const Tensor& x) { return Max(x, c.dim, c.keepdim); },
          CudaInput(c.input, dtype, what));
    }
  }
}

TEST_F(ReduceSoftmaxDropoutCudaTest, MaxBreaksTiesAndTreatsNanLikeCpu) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // Rows: a tie (the first copy wins), NaNs (the first NaN wins), -0 vs +0
  // (equal: the first wins), and a tie across a row longer than a warp.
  std::vector<double> values = {1,    3,   3,  2,   0,  0,  //
                                1,    nan, 5,  nan, 2,  0,  //
                                -0.0, 0.0, -1, -2,  -3, -4};
  std::vector<double> long_row(100, 1.0);
  long_row[40] = long_row[77] = 7;
  for (DType dtype : kFloatingDTypes) {
    for (const auto& [data, shape] :
         {std::make_pair(values, Shape{3, 6}),
          std::make_pair(long_row, Shape{1, 100})}) {
      const Tensor x_cpu = FromVector(data, shape, dtype);
      const Tensor x = x_cpu.to(Device::Cuda(0)).set_requires_grad(true);
      x_cpu.set_requires_grad(true);
      const Tensor y = Max(x, 1);
      const Tensor y_cpu = Max(x_cpu, 1);
      const std::vector<double> got = y.to(Device::Cpu()).ToVector();
      const std::vector<double> want = y_cpu.ToVector();
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_TRUE(std::isnan(want[i])
                        ? std::isnan(got[i])
                        : got[i] == want[i] &&
                              std::signbit(got[i]) == std::signbit(want[i]))
            << DTypeName(dtype) << " row " << i << ": " << got[i] << " vs "
            << want[i];
      }
      y.backward(Ones(y.shape(), dtype, Device::Cuda(0)));
      y_cpu.backward(Ones(y_cpu.shape(), dtype));
      // The gradient marks the chosen element of each row.
      EXPECT_EQ(x.grad().to(Device::Cpu()).ToVector(), x_cpu.grad().ToVector())
          << DTypeName(dtype);
    }
  }
}

TEST_F(ReduceSoftmaxDropoutCudaTest, ReductionsAreBitIdenticalRunToRun) {
  for (DType dtype : kFloatingDTypes) {
    const Tensor long_line = RandomNormal({1000003}, dtype, Device::Cuda(0),
                                          SeedOfCase("long line"));
    const Tensor rows =
        RandomNormal({4097, 33}, dtype, Device::Cuda(0), SeedOfCase("rows"));
    const std::vector<std::function<Tensor()>> runs = {
        [&] { return Sum(long_line); },
        [&] { return Mean(long_line); },
        [&] { return Sum(rows, {0}); },  // sliced across blocks
        [&] { return Sum(rows.transpose(0, 1), {1}); },
        [&] { return Max(long_line, 0); },
        [&] { return SumToShape(rows, {33}); },
    };
    for (size_t k = 0; k < runs.size(); ++k) {
      const std::vector<double> first = runs[k]().to(Device::Cpu()).ToVector();
      for (int repeat = 0; repeat < 3; ++repeat) {
        EXPECT_EQ(runs[k]().to(Device::Cpu()).ToVector(), first)
            << DTypeName(dtype) << " reduction " << k << " repeat " << repeat;
      }
    }
  }
}

TEST_F(ReduceSoftmaxDropoutCudaTest, SoftmaxAndLogSoftmaxMatchCpu) {
  struct SoftmaxCase {
    Case input;
    int64_t dim;
  };
  const std::vector<SoftmaxCase> cases = {
      {{{33, 4097}, Layout::kContiguous}, -1},  // a block per row
      {{{4097, 33}, Layout::kContiguous}, 1},   // a warp per row
      {{{4097, 33}, Layout::kContiguous}, 0},   // strided rows
      {{{33, 4097}, Layout::kTransposed}, 0},   // strided view, dim 0
      {{{7, 33, 5}, Layout::kSliced}, 1},       // a middle dim, few rows
      {{{2, 3000, 3}, Layout::kContiguous}, 1},
      {{{1000, 1}, Layout::kContiguous}, 1},    // rows of 1
      {{{262, 4097}, Layout::kContiguous}, 1},  // over a million elements
      {{{}, Layout::kContiguous}, 0},
  };
  for (DType dtype : kFloatingDTypes) {
    for (const SoftmaxCase& c : cases) {
      for (bool log : {false, true}) {
        const std::string what =
            CaseName(log ? "LogSoftmax" : "Softmax", dtype, c.input) + " dim " +
            std::to_string(c.dim);
        ExpectOpMatchesCpu(
            what,
            [&](const Tensor& x) {
              return log ? LogSoftmax(x, c.dim) : Softmax(x, c.dim);
            },
            CudaInput(c.input, dtype, what));
      }
    }
  }
}

TEST_F(ReduceSoftmaxDropoutCudaTest, DropoutMaskIsBitIdenticalToCpu) {
  const std::vector<Case> cases = {
      {{1000003}, Layout::kContiguous},
      {{33, 65}, Layout::kTransposed},
      {{5, 6, 7}, Layout::kSliced},
  };
  for (DType dtype : kFloatingDTypes) {
    for (const Case& c : cases) {
      const std::string what = CaseName("Dropout", dtype, c);
      SCOPED_TRACE(what);
      const Tensor x = CudaInput(c, dtype, what);
      const Tensor x_cpu = x.to(Device::Cpu()).set_requires_grad(true);
      x.set_requires_grad(true);
      Generator gen(SeedOfCase(what)), gen_cpu(SeedOfCase(what));
      gen.set_offset(5);
      gen_cpu.set_offset(5);
      const double p = 0.3;
      const Tensor y = Dropout(x, p, /*training=*/true, &gen);
      const Tensor y_cpu = Dropout(x_cpu, p, /*training=*/true, &gen_cpu);
      EXPECT_EQ(gen.offset(), gen_cpu.offset());
      ASSERT_TRUE(y.device() == Device::Cuda(0)) << y.device();
      EXPECT_EQ(y.to(Device::Cpu()).ToVector(), y_cpu.ToVector());
      const Tensor g = RandomNormal(y.shape(), dtype, Device::Cuda(0),
                                    SeedOfCase(what + " g"));
      y.backward(g);
      y_cpu.backward(g.to(Device::Cpu()));
      EXPECT_EQ(x.grad().to(Device::Cpu()).ToVector(), x_cpu.grad().ToVector());
    }
  }
}

// Expects fn to throw lc::Error whose message contains every one of
// `parts`.
void ExpectErrorNaming(const std::function<void()>& fn,
                       const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected an error naming " << parts[0];
  } catch (const Error& e) {
    const std::string message(e.status().message());
    for (const std::string& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos) << message;
    }
  }
}

TEST_F(ReduceSoftmaxDropoutCudaTest, BadInputsAreClearErrors) {
  const Tensor x = Ones({4, 0}, DType::kFloat32, Device::Cuda(0));
  ExpectErrorNaming([] { Sum(Zeros({3}, DType::kInt64, Device::Cuda(0))); },
                    {"Sum", "int64"});
  ExpectErrorNaming([&] { Softmax(x, 2); }, {"Softmax", "dim 2"});
  ExpectErrorNaming([&] { Max(x, 1); }, {"Max", "size 0"});
  ExpectErrorNaming([&] { Dropout(x, 1.0, /*training=*/true); },
                    {"Dropout", "p = 1"});
}

}  // namespace
}  // namespace lc
