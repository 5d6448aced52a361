#include "tests/op_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <utility>

#include "gtest/gtest.h"

namespace lc {
namespace testing {

Tolerance DefaultTolerance(DType dtype) {
  switch (dtype) {
    case DType::kFloat64:
      return {1e-10, 1e-12};
    case DType::kBFloat16:
      return {1e-2, 1e-2};
    default:
      // atol 1e-5: gradients are often near-cancelling sums of O(1) terms,
      // whose float32 rounding reaches a few 1e-6 in absolute terms.
      return {1e-5, 1e-5};
  }
}

Generator TestGenerator(uint64_t salt) {
  const ::testing::TestInfo* info =
      ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = "no-test";
  if (info != nullptr) {
    name = std::string(info->test_suite_name()) + "." + info->name();
  }
  // FNV-1a: stable across processes (absl::HashOf is seeded per process),
  // so a failing test draws the same inputs when rerun.
  uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char c : name) hash = (hash ^ c) * 0x100000001b3ull;
  for (int i = 0; i < 8; ++i) {
    hash = (hash ^ ((salt >> (8 * i)) & 0xff)) * 0x100000001b3ull;
  }
  return Generator(hash);
}

void ExpectAllClose(const Tensor& actual, const Tensor& expected, Tolerance tol,
                    const std::string& what) {
  ASSERT_TRUE(actual.defined()) << what << ": actual is undefined";
  ASSERT_TRUE(expected.defined()) << what << ": expected is undefined";
  ASSERT_EQ(actual.shape(), expected.shape())
      << what << ": shape " << ShapeToString(actual.shape()) << " vs "
      << ShapeToString(expected.shape());
  const std::vector<double> a = actual.ToVector();
  const std::vector<double> e = expected.ToVector();
  int failures = 0;
  double worst = 0;
  size_t worst_index = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    // Equal infinities (lse of a query with no key) match; NaN never does.
    const double err = a[i] == e[i] ? 0.0 : std::abs(a[i] - e[i]);
    const double allowed = tol.atol + tol.rtol * std::abs(e[i]);
    const bool ok = err <= allowed;
    if (!ok) {
      ++failures;
      if (!(err <= worst)) {
        worst = err;
        worst_index = i;
      }
    }
  }
  EXPECT_EQ(failures, 0) << what << ": " << failures << " of " << a.size()
                         << " elements differ; worst at flat index "
                         << worst_index << ": " << a[worst_index] << " vs "
                         << e[worst_index] << " (rtol " << tol.rtol << ", atol "
                         << tol.atol << ")";
}

namespace {

// Fresh leaves with the values of `inputs` (floating ones require grad).
Tensors MakeLeaves(const Tensors& inputs) {
  Tensors leaves;
  for (const Tensor& t : inputs) {
    if (!t.defined()) {
      leaves.push_back(t);
      continue;
    }
    Tensor leaf = t.detach();
    if (IsFloating(t.dtype())) leaf.set_requires_grad(true);
    leaves.push_back(leaf);
  }
  return leaves;
}

}  // namespace

void ExpectMatchesTorch(const std::string& torch_op, const OpFn& fn,
                        const Tensors& inputs, const OracleAttrs& attrs,
                        const Tolerance* tol) {
  const Tolerance t =
      tol != nullptr ? *tol : DefaultTolerance(inputs[0].dtype());
  Tensors leaves = MakeLeaves(inputs);
  Tensors outputs = fn(leaves);
  Generator gen = TestGenerator(0x9e3779b97f4a7c15ull);
  Tensors grad_outputs, roots, root_grads;
  for (const Tensor& y : outputs) {
    if (!IsFloating(y.dtype()) || !y.requires_grad()) {
      grad_outputs.push_back(Tensor());
      continue;
    }
    Tensor g = Randn(y.shape(), gen, y.dtype());
    grad_outputs.push_back(g);
    roots.push_back(y);
    root_grads.push_back(g);
  }
  if (!roots.empty()) Backward(roots, root_grads);
  OracleResult expected = RunTorchOp(torch_op, inputs, attrs, grad_outputs);
  ASSERT_EQ(outputs.size(), expected.outputs.size())
      << torch_op << ": output count";
  for (size_t i = 0; i < outputs.size(); ++i) {
    ExpectAllClose(outputs[i], expected.outputs[i], t,
                   torch_op + " output " + std::to_string(i));
  }
  for (size_t i = 0; i < leaves.size(); ++i) {
    if (!leaves[i].defined() || !leaves[i].requires_grad()) continue;
    const Tensor& want =
        expected.input_grads.empty() ? Tensor() : expected.input_grads[i];
    const Tensor got = leaves[i].grad();
    if (!want.defined()) {
      // Torch found no path to this input; ours must give none or zeros.
      if (got.defined()) {
        ExpectAllClose(got, ZerosLike(got).to(DType::kFloat64), t,
                       torch_op + " grad of input " + std::to_string(i));
      }
      continue;
    }
    ASSERT_TRUE(got.defined()) << torch_op << ": no gradient for input " << i;
    ExpectAllClose(got, want, t,
                   torch_op + " grad of input " + std::to_string(i));
  }
}

void ExpectGradientsMatchFiniteDifferences(const OpFn& fn,
                                           const Tensors& inputs, double eps,
                                           double tol) {
  Generator gen = TestGenerator(0x51ed27ull);
  Tensors leaves = MakeLeaves(inputs);
  Tensors outputs = fn(leaves);
  Tensors weights;
  for (const Tensor& y : outputs) {
    weights.push_back(IsFloating(y.dtype()) ? Randn(y.shape(), gen, y.dtype())
                                            : Tensor());
  }
  Tensors roots, root_grads;
  for (size_t k = 0; k < outputs.size(); ++k) {
    if (!weights[k].defined() || !outputs[k].requires_grad()) continue;
    roots.push_back(outputs[k]);
    root_grads.push_back(weights[k]);
  }
  ASSERT_FALSE(roots.empty()) << "no differentiable output";
  Backward(roots, root_grads);

  // L(x) = sum_k <w_k, fn(x)_k>, evaluated without grad.
  auto loss = [&](const Tensors& xs) {
    NoGradGuard no_grad;
    Tensors ys = fn(xs);
    double total = 0;
    for (size_t k = 0; k < ys.size(); ++k) {
      if (!weights[k].defined()) continue;
      const std::vector<double> y = ys[k].ToVector();
      const std::vector<double> w = weights[k].ToVector();
      for (size_t j = 0; j < y.size(); ++j) total += w[j] * y[j];
    }
    return total;
  };

  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].defined() || !IsFloating(inputs[i].dtype())) continue;
    ASSERT_EQ(inputs[i].dtype(), DType::kFloat64)
        << "finite differences need float64 inputs";
    const Tensor analytic = leaves[i].grad();
    const std::vector<double> g =
        analytic.defined() ? analytic.ToVector()
                           : std::vector<double>(inputs[i].numel(), 0.0);
    Tensors xs;
    for (const Tensor& t : inputs) xs.push_back(t.defined() ? t.clone() : t);
    Tensor x = xs[i];
    const Shape strides = ContiguousStrides(x.shape());
    for (int64_t flat = 0; flat < x.numel(); ++flat) {
      std::vector<int64_t> index(x.dim());
      for (int64_t d = 0, rem = flat; d < x.dim(); ++d) {
        index[d] = rem / strides[d];
        rem %= strides[d];
      }
      const double original = x.at(index);
      x.set(index, original + eps);
      const double plus = loss(xs);
      x.set(index, original - eps);
      const double minus = loss(xs);
      x.set(index, original);
      const double numeric = (plus - minus) / (2 * eps);
      EXPECT_NEAR(g[flat], numeric, tol * std::max(1.0, std::abs(numeric)))
          << "input " << i << " element " << flat;
    }
  }
}

const char* StridedLayoutName(StridedLayout layout) {
  return layout == StridedLayout::kEveryOther ? "every other element"
                                              : "transposed";
}

Tensor NonContiguousCopy(const Tensor& t, StridedLayout layout) {
  LC_CHECK_GE(t.dim(), 1);
  Tensor view;
  if (layout == StridedLayout::kTransposed && t.dim() >= 2) {
    // A contiguous block from element 1 of the buffer holding dims 0 and 1
    // swapped, viewed back in t's order.
    Shape swapped = t.shape();
    std::swap(swapped[0], swapped[1]);
    Tensor buffer = Zeros({t.numel() + 1}, t.dtype(), t.device());
    view = buffer.slice(0, 1, t.numel() + 1).view(swapped).transpose(0, 1);
  } else {
    // Elements 1, 3, 5, ... of a last dim twice as wide plus one.
    Shape wide = t.shape();
    wide.back() = 2 * wide.back() + 1;
    Tensor buffer = Zeros(wide, t.dtype(), t.device());
    view = buffer.slice(-1, 1, wide.back(), 2);
  }
  CopyInto(view, t.detach());
  LC_CHECK_EQ(view.offset(), 1);
  return view;
}

namespace {

// Host memory for "CUDA" buffers (see ScopedHostCudaAllocator).
class HostAllocator : public Allocator {
 public:
  void* Allocate(int64_t bytes, Device) override {
    return std::malloc(std::max<int64_t>(bytes, 1));
  }
  void Deallocate(void* ptr, int64_t, Device) override { std::free(ptr); }
};

HostAllocator& HostCudaAllocator() {
  static HostAllocator* allocator = new HostAllocator();  // never freed
  return *allocator;
}

}  // namespace

ScopedHostCudaAllocator::ScopedHostCudaAllocator() {
  SetAllocator(DeviceType::kCuda, &HostCudaAllocator());
}

ScopedHostCudaAllocator::~ScopedHostCudaAllocator() {
  SetAllocator(DeviceType::kCuda, nullptr);
}

}  // namespace testing
}  // namespace lc
