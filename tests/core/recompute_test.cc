#include "core/recompute.h"

#include <cmath>
#include <memory>

#include "core/random.h"
#include "gtest/gtest.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

// Test-local ops on float64 vectors, so this suite depends on core alone.
// y = sin(x) * noise, noise[i] = 0.5 + UniformAt(default generator): a
// smooth op that draws from the thread's default generator like dropout.
Tensor NoisySin(const Tensor& x) {
  Generator& gen = DefaultGenerator();
  const uint64_t offset = gen.NextOffset();
  const uint64_t seed = gen.seed();
  Tensor xc = x.contiguous();
  Tensor y = Empty(x.shape(), DType::kFloat64);
  std::vector<double> noise(x.numel());
  for (int64_t i = 0; i < x.numel(); ++i) {
    noise[i] = 0.5 + UniformAt(seed, offset, i);
    y.data<double>()[i] = std::sin(xc.data<double>()[i]) * noise[i];
  }
  if (NeedsGrad({x})) {
    RecordOp("NoisySin", {x}, {&y},
             [xs = xc.detach(), noise](const Tensors& g) -> Tensors {
               Tensor gc = g[0].contiguous();
               Tensor dx = Empty(xs.shape(), DType::kFloat64);
               for (int64_t i = 0; i < xs.numel(); ++i) {
                 dx.data<double>()[i] = gc.data<double>()[i] * noise[i] *
                                        std::cos(xs.data<double>()[i]);
               }
               return {dx};
             });
  }
  return y;
}

// Eight NoisySin layers: without recomputation, each saves its input.
Tensors Block(const Tensors& in) {
  Tensor h = in[0];
  for (int i = 0; i < 8; ++i) h = NoisySin(h);
  return {h};
}

TEST(RecomputeTest, SameGradientsAsWithoutAndLessPeakMemory) {
  const int64_t n = 1 << 15;  // 256 KiB per float64 activation
  Generator gen = testing::TestGenerator();
  Tensor x0 = Randn({n}, gen, DType::kFloat64);
  Tensor g = Randn({n}, gen, DType::kFloat64);

  // Four blocks in a row, each recomputed or not.
  auto run = [&](bool recompute, Tensor* grad, Tensor* out) {
    DefaultGenerator() = Generator(1234);
    Tensor x = x0.detach();
    x.set_requires_grad(true);
    auto tracker = std::make_shared<MemoryTracker>();
    {
      MemoryScope scope(tracker);
      Tensor y = x;
      for (int b = 0; b < 4; ++b) {
        y = recompute ? Recompute(Block, {y})[0] : Block({y})[0];
      }
      *out = y.detach();
      y.backward(g);
    }
    *grad = x.grad();
    return tracker->stats().peak_bytes;
  };
  Tensor grad_plain, grad_recompute, out_plain, out_recompute;
  const int64_t peak_plain = run(false, &grad_plain, &out_plain);
  const int64_t peak_recompute = run(true, &grad_recompute, &out_recompute);
  // Same function, same noise (the generator is replayed): bit-identical.
  EXPECT_EQ(out_recompute.ToVector(), out_plain.ToVector());
  EXPECT_EQ(grad_recompute.ToVector(), grad_plain.ToVector());
  // Without recomputation all 32 activations are alive before backward; with
  // it, the 4 block outputs, plus one block's 8 while it is recomputed.
  EXPECT_LT(peak_recompute, peak_plain / 2);
  RecordProperty("peak_plain_bytes", std::to_string(peak_plain));
  RecordProperty("peak_recompute_bytes", std::to_string(peak_recompute));

  // The recomputed block's forward holds no activations besides its output.
  DefaultGenerator() = Generator(1234);
  auto tracker = std::make_shared<MemoryTracker>();
  Tensor x = x0.detach();
  x.set_requires_grad(true);
  MemoryScope scope(tracker);
  Tensor y = Recompute(Block, {x})[0];
  EXPECT_LE(tracker->stats().current_bytes, n * 8);
}

// A parameter captured by fn (not among its inputs) gets its gradient
// through the recomputation, equal to the gradient without recomputation.
TEST(RecomputeTest, GradientsReachParametersUsedInside) {
  Generator gen = testing::TestGenerator();
  Tensor w = Randn({5}, gen, DType::kFloat64);
  w.set_requires_grad(true);
  Tensor x = Randn({5}, gen, DType::kFloat64);  // no grad needed
  auto fn = [&](const Tensors& in) -> Tensors {
    return {NoisySin(w), NoisySin(in[0])};
  };
  DefaultGenerator() = Generator(31);
  Backward({fn({x})[0]}, {Ones({5}, DType::kFloat64)});
  const std::vector<double> want = w.grad().ToVector();
  w.set_grad(Tensor());
  DefaultGenerator() = Generator(31);
  Tensors out = Recompute(fn, {x});
  ASSERT_TRUE(out[0].requires_grad());
  Backward({out[0]}, {Ones({5}, DType::kFloat64)});
  ASSERT_TRUE(w.grad().defined());
  EXPECT_EQ(w.grad().ToVector(), want);
}

TEST(RecomputeTest, GradientsMatchFiniteDifferences) {
  Generator gen = testing::TestGenerator();
  Tensor x = Randn({6}, gen, DType::kFloat64);
  testing::ExpectGradientsMatchFiniteDifferences(
      [](const Tensors& in) -> Tensors {
        DefaultGenerator() = Generator(99);
        return Recompute(Block, in);
      },
      {x}, 1e-6, 1e-7);
}

}  // namespace
}  // namespace lc
