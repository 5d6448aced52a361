// Test helpers shared by the op and layer suites: comparison of an op's
// forward and gradients with the libtorch oracle, finite-difference gradient
// checks in float64, fresh random inputs, and tolerances per dtype.
#ifndef LONGCTX_TESTS_OP_TEST_UTIL_H_
#define LONGCTX_TESTS_OP_TEST_UTIL_H_

#include <functional>
#include <string>
#include <vector>

#include "core/autograd.h"
#include "core/memory.h"
#include "core/random.h"
#include "gtest/gtest.h"
#include "tests/torch_oracle.h"

namespace lc {
namespace testing {

using OpFn = std::function<Tensors(const Tensors& inputs)>;

// Tolerances from the dtype's unit roundoff: float64 ~1e-16 (we allow 1e-10
// for accumulated rounding), float32 ~6e-8 (1e-5 relative and absolute after
// accumulation over long, partly cancelling reductions), bfloat16 ~4e-3
// (1e-2 relative).
struct Tolerance {
  double rtol;
  double atol;
};
Tolerance DefaultTolerance(DType dtype);

// A fresh generator for this test: seeded from the running test's full name
// and `salt`, so every test draws different inputs, repeatably.
Generator TestGenerator(uint64_t salt = 0);

// Every element of `actual` is within atol + rtol * |expected| of `expected`
// (shapes must match; NaN never matches). `what` labels the failure.
void ExpectAllClose(const Tensor& actual, const Tensor& expected, Tolerance tol,
                    const std::string& what);

// Runs `fn` on `inputs` (floating ones made leaves with requires_grad),
// backpropagates fresh random output gradients, runs the oracle op `torch_op`
// on the same inputs and gradients, and compares outputs and every input
// gradient within `tol` (DefaultTolerance of inputs[0]'s dtype when omitted).
void ExpectMatchesTorch(const std::string& torch_op, const OpFn& fn,
                        const Tensors& inputs, const OracleAttrs& attrs = {},
                        const Tolerance* tol = nullptr);

// Checks the analytic gradients of fn against central finite differences of
// L = sum_k <g_k, fn(x)_k> for fresh random g, element by element, for
// every floating input (which must be float64). `eps` is the step h; the
// difference must be within `tol` * max(1, |numeric|), numeric being the
// central difference (L(x + h) - L(x - h)) / 2h. The defaults rest on its
// error for smooth ops with O(1) values and derivatives in float64:
// truncation O(h^2 |d^3L/dx^3|) ~ 1e-12, and rounding of the two
// evaluations ~ eps_64 |L| / h ~ 1e-16 / 1e-6 = 1e-10; tol = 1e-6 leaves
// four orders of magnitude of headroom for larger sums and derivatives,
// while a wrong gradient is off by O(1).
void ExpectGradientsMatchFiniteDifferences(const OpFn& fn,
                                           const Tensors& inputs,
                                           double eps = 1e-6,
                                           double tol = 1e-6);

// Expects fn() to throw lc::Error whose message contains every piece.
template <typename Fn>
void ExpectError(Fn&& fn, const std::vector<std::string>& pieces) {
  try {
    fn();
    ADD_FAILURE() << "expected an lc::Error mentioning " << pieces.front();
  } catch (const Error& e) {
    const std::string message(e.status().message());
    for (const std::string& piece : pieces) {
      EXPECT_NE(message.find(piece), std::string::npos)
          << "error message \"" << message << "\" lacks \"" << piece << "\"";
    }
  }
}

// How NonContiguousCopy lays out its view. Both views start at element 1 of
// their buffer, so ops also see a nonzero offset.
enum class StridedLayout {
  // Every other element of the last dim (inner stride 2).
  kEveryOther,
  // Dims 0 and 1 swapped in memory: outer strides out of order, the last
  // dim contiguous. A tensor of one dim gets kEveryOther.
  kTransposed,
};
inline constexpr StridedLayout kStridedLayouts[] = {StridedLayout::kEveryOther,
                                                    StridedLayout::kTransposed};
const char* StridedLayoutName(StridedLayout layout);

// A strided (non-contiguous, offset) view with the same values as `t` on
// t's device, so tests can feed views to ops.
Tensor NonContiguousCopy(const Tensor& t,
                         StridedLayout layout = StridedLayout::kEveryOther);

// While alive, CUDA tensors are allocated in host memory, so a test without
// a GPU can build CUDA tensors (never running a kernel on them) to check the
// device checks that ops make before any kernel. Restores the default CUDA
// allocator when destroyed (buffers made meanwhile are still freed to the
// host: a buffer remembers its allocator).
class ScopedHostCudaAllocator {
 public:
  ScopedHostCudaAllocator();
  ~ScopedHostCudaAllocator();
  ScopedHostCudaAllocator(const ScopedHostCudaAllocator&) = delete;
  ScopedHostCudaAllocator& operator=(const ScopedHostCudaAllocator&) = delete;
};

}  // namespace testing
}  // namespace lc

#endif  // LONGCTX_TESTS_OP_TEST_UTIL_H_
