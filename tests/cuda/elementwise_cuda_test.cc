// GPU checks of the element-wise ops and activations (ops/elementwise.h,
// ops/activation.h): each op on CUDA in float64, float32 and bfloat16 against
// the same op on the CPU in float64 on the same values, forward and backward
// (through a random upstream gradient), for contiguous, misaligned,
// transposed, strided and broadcast inputs of odd sizes; and the errors for
// inputs on two devices or of a non-floating dtype.
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"
#include "gtest/gtest.h"
#include "ops/activation.h"
#include "ops/elementwise.h"
#include "tests/cuda/cuda_test_util.h"

namespace lc {
namespace {

// The reference input: a CUDA tensor's values on the CPU in float64.
Tensor Cpu64(const Tensor& t) {
  return t.to(Device::Cpu()).to(DType::kFloat64);
}

// How a test input lies in CUDA memory.
enum class Layout {
  kContiguous,
  kOffset,      // contiguous, one element into its buffer (misaligned)
  kTransposed,  // the last two dims swapped
  kSliced,      // every other element of the last dim, from the second
};

std::string LayoutName(Layout layout) {
  switch (layout) {
    case Layout::kContiguous:
      return "contiguous";
    case Layout::kOffset:
      return "offset";
    case Layout::kTransposed:
      return "transposed";
    case Layout::kSliced:
      return "sliced";
  }
  return "?";
}

// A leaf CUDA tensor of `shape` and `dtype` laid out as `layout`, its values
// standard normal, or 0.5 + a square of one where `positive` (for Log, Sqrt,
// Rsqrt, fractional powers and divisors).
Tensor CudaInput(const Shape& shape, DType dtype, Layout layout,
                 const std::string& name, bool positive = false) {
  Shape base = shape;
  const size_t rank = shape.size();
  switch (layout) {
    case Layout::kContiguous:
      break;
    case Layout::kOffset:
      base[0] += 1;
      break;
    case Layout::kTransposed:
      std::swap(base[rank - 2], base[rank - 1]);
      break;
    case Layout::kSliced:
      base[rank - 1] = 2 * base[rank - 1] + 1;
      break;
  }
  Tensor values =
      RandomNormal(base, DType::kFloat64, Device::Cpu(), SeedOfCase(name));
  if (positive) values = AddScalar(Square(values), 0.5);
  const Tensor t = values.to(dtype).to(Device::Cuda(0));
  switch (layout) {
    case Layout::kContiguous:
      return t;
    case Layout::kOffset:
      return t.slice(0, 1, base[0]);
    case Layout::kTransposed:
      return t.transpose(-2, -1);
    case Layout::kSliced:
      return t.slice(-1, 1, base[rank - 1], 2);
  }
  return t;
}

using UnaryFn = std::function<Tensor(const Tensor&)>;
using BinaryFn = std::function<Tensor(const Tensor&, const Tensor&)>;

struct UnaryCase {
  std::string name;
  UnaryFn op;
  bool positive;  // the op needs positive inputs
};

std::vector<UnaryCase> UnaryCases() {
  return {
      {"Neg", Neg, false},
      {"Exp", Exp, false},
      {"Log", Log, true},
      {"Sqrt", Sqrt, true},
      {"Rsqrt", Rsqrt, true},
      {"Tanh", Tanh, false},
      {"Square", Square, false},
      {"AddScalar", [](const Tensor& x) { return AddScalar(x, 0.75); }, false},
      {"MulScalar", [](const Tensor& x) { return MulScalar(x, -1.5); }, false},
      {"PowScalar2.5", [](const Tensor& x) { return PowScalar(x, 2.5); }, true},
      {"PowScalar3", [](const Tensor& x) { return PowScalar(x, 3.0); }, false},
      {"PowScalar0", [](const Tensor& x) { return PowScalar(x, 0.0); }, false},
      {"Relu", Relu, false},
      {"Silu", Silu, false},
      {"GeluErf", [](const Tensor& x) { return Gelu(x); }, false},
      {"GeluTanh",
       [](const Tensor& x) { return Gelu(x, GeluApproximation::kTanh); },
       false},
  };
}

// Runs op on CUDA inputs and on their float64 CPU copies and compares the
// outputs, then backpropagates one random gradient through both and compares
// the inputs' gradients.
void ExpectOpMatchesCpu(
    const std::string& what,
    const std::function<Tensor(const std::vector<Tensor>&)>& op,
    const std::vector<Tensor>& cuda_inputs) {
  SCOPED_TRACE(what);
  const DType dtype = cuda_inputs[0].dtype();
  const double tol = CudaRelativeTolerance(dtype);
  std::vector<Tensor> cpu_inputs;
  for (const Tensor& t : cuda_inputs) {
    cpu_inputs.push_back(Cpu64(t).set_requires_grad(true));
    t.set_requires_grad(true);
  }
  const Tensor y = op(cuda_inputs);
  const Tensor y_ref = op(cpu_inputs);
  ASSERT_TRUE(y.device() == Device::Cuda(0)) << y.device();
  ASSERT_EQ(y.dtype(), dtype);
  ExpectCudaClose(y, y_ref, tol, what + " forward");
  const Tensor g = RandomNormal(y.shape(), dtype, Device::Cuda(0),
                                SeedOfCase(what + " gradient"));
  y.backward(g);
  y_ref.backward(Cpu64(g));
  for (size_t k = 0; k < cuda_inputs.size(); ++k) {
    const Tensor grad = cuda_inputs[k].grad();
    ASSERT_TRUE(grad.defined()) << "input " << k;
    EXPECT_EQ(grad.dtype(), dtype);
    ExpectCudaClose(grad, cpu_inputs[k].grad(), tol,
                    what + " gradient of input " + std::to_string(k));
  }
}

class ElementwiseCudaTest : public CudaTest {};

TEST_F(ElementwiseCudaTest, UnaryOpsMatchCpuForwardAndBackward) {
  // Odd sizes: the vectorized path's tail, a misaligned start, rank 0 and
  // an empty tensor.
  const std::vector<std::pair<Shape, Layout>> inputs = {
      {{1000003}, Layout::kContiguous}, {{1000003}, Layout::kOffset},
      {{33, 65}, Layout::kTransposed},  {{33, 65}, Layout::kSliced},
      {{}, Layout::kContiguous},        {{3, 0, 5}, Layout::kContiguous},
  };
  for (const UnaryCase& c : UnaryCases()) {
    for (DType dtype : kFloatingDTypes) {
      for (const auto& [shape, layout] : inputs) {
        const std::string what = c.name + " " + DTypeName(dtype) + " " +
                                 ShapeToString(shape) + " " +
                                 LayoutName(layout);
        ExpectOpMatchesCpu(
            what, [&](const std::vector<Tensor>& x) { return c.op(x[0]); },
            {CudaInput(shape, dtype, layout, what, c.positive)});
      }
    }
  }
}

TEST_F(ElementwiseCudaTest, BinaryOpsBroadcastAndMatchCpu) {
  const std::vector<std::pair<std::string, BinaryFn>> ops = {
      {"Add", Add}, {"Sub", Sub}, {"Mul", Mul}, {"Div", Div}};
  struct Operands {
    Shape a;
    Layout a_layout;
    Shape b;
  };
  const std::vector<Operands> operands = {
      {{1000003}, Layout::kContiguous, {1000003}},
      {{1000003}, Layout::kOffset, {1000003}},
      {{33, 65}, Layout::kTransposed, {65}},
      {{5, 1, 7}, Layout::kSliced, {3, 1}},
      {{4097}, Layout::kContiguous, {}},
      {{}, Layout::kContiguous, {33, 2}},
      // A row repeated over the leading dims (a bias): 16-byte packets when
      // the row is a multiple of 8 elements, one by one when it is not, on
      // either side of the op.
      {{37, 64}, Layout::kContiguous, {64}},
      {{2, 3, 16}, Layout::kContiguous, {16}},
      {{37, 65}, Layout::kContiguous, {65}},
      {{48}, Layout::kContiguous, {9, 48}},
  };
  for (const auto& [name, op] : ops) {
    for (DType dtype : kFloatingDTypes) {
      for (const Operands& o : operands) {
        const std::string what =
            name + " " + DTypeName(dtype) + " " + ShapeToString(o.a) + " " +
            LayoutName(o.a_layout) + " with " + ShapeToString(o.b);
        // Divisors stay away from 0.
        ExpectOpMatchesCpu(
            what, [&](const std::vector<Tensor>& x) { return op(x[0], x[1]); },
            {CudaInput(o.a, dtype, o.a_layout, what + " a"),
             CudaInput(o.b, dtype, Layout::kContiguous, what + " b",
                       /*positive=*/name == "Div")});
      }
    }
  }
}

TEST_F(ElementwiseCudaTest, InputsOnTwoDevicesAreAClearError) {
  const Tensor on_cuda = Ones({4}, DType::kFloat32, Device::Cuda(0));
  const Tensor on_cpu = Ones({4}, DType::kFloat32);
  try {
    Add(on_cuda, on_cpu);
    ADD_FAILURE() << "expected an error for inputs on two devices";
  } catch (const Error& e) {
    const std::string message(e.status().message());
    EXPECT_NE(message.find("Add"), std::string::npos) << message;
    EXPECT_NE(message.find("cuda:0"), std::string::npos) << message;
    EXPECT_NE(message.find("cpu"), std::string::npos) << message;
  }
}

TEST_F(ElementwiseCudaTest, ViewOfTooManyDimsIsAClearError) {
  // Every second element along each of 9 dims: no two dims merge, and the
  // kernels index at most 8.
  Tensor x = Ones(Shape(9, 3), DType::kFloat32, Device::Cuda(0));
  for (int64_t d = 0; d < 9; ++d) x = x.slice(d, 0, 3, 2);
  try {
    Add(x, x);
    ADD_FAILURE() << "expected an error for a 9-dim strided view";
  } catch (const Error& e) {
    const std::string message(e.status().message());
    EXPECT_NE(message.find("9 dims"), std::string::npos) << message;
    EXPECT_NE(message.find("at most 8"), std::string::npos) << message;
  }
}

TEST_F(ElementwiseCudaTest, NonFloatingInputIsAClearError) {
  const Tensor ints = Zeros({4}, DType::kInt64, Device::Cuda(0));
  try {
    Gelu(ints);
    ADD_FAILURE() << "expected an error for an int64 input";
  } catch (const Error& e) {
    const std::string message(e.status().message());
    EXPECT_NE(message.find("Gelu"), std::string::npos) << message;
    EXPECT_NE(message.find("int64"), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace lc
