// AdamW against a hand computation and torch.optim.AdamW, its state dict,
// the warmup + cosine schedule, and gradient clipping on one and two ranks.
#include "train/optimizer.h"

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "core/random.h"
#include "distributed/thread_communicator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "ops/reduce.h"
#include "tests/op_test_util.h"
#include "tests/torch_oracle.h"
#include "train/schedule.h"

namespace lc {
namespace {

using ::lc::testing::ExpectAllClose;
using ::lc::testing::ExpectError;
using ::lc::testing::OracleAttrs;
using ::lc::testing::RunTorchOp;
using ::lc::testing::TestGenerator;
using ::testing::AllOf;
using ::testing::HasSubstr;

Tensor Leaf(const std::vector<double>& values, const Shape& shape,
            DType dtype = DType::kFloat64) {
  Tensor t = FromVector(values, shape, dtype);
  t.set_requires_grad(true);
  return t;
}

TEST(AdamWTest, MatchesHandComputationWithDecoupledDecayAndBiasCorrection) {
  const Tensor w = Leaf({1.0, -2.0}, {1, 2});  // a matrix: decayed
  const Tensor b = Leaf({0.5}, {1});           // a vector: not decayed
  AdamWOptions options;
  options.beta1 = 0.9;
  options.beta2 = 0.99;
  options.eps = 1e-8;
  options.weight_decay = 0.1;
  absl::StatusOr<AdamW> adam = AdamW::Create({{"w", w}, {"b", b}}, options);
  ASSERT_TRUE(adam.ok()) << adam.status();

  const double lr = 0.01;
  const std::vector<std::vector<double>> grads_w = {{0.3, -0.4}, {-0.1, 0.2}};
  const std::vector<double> grads_b = {1.0, 0.5};
  // Hand computation, step by step.
  std::vector<double> pw = {1.0, -2.0}, mw = {0, 0}, vw = {0, 0};
  double pb = 0.5, mb = 0, vb = 0;
  for (int t = 1; t <= 2; ++t) {
    w.set_grad(FromVector(grads_w[t - 1], {1, 2}, DType::kFloat64));
    b.set_grad(FromVector({grads_b[t - 1]}, {1}, DType::kFloat64));
    adam->Step(lr);
    const double c1 = 1 - std::pow(0.9, t), c2 = 1 - std::pow(0.99, t);
    for (int i = 0; i < 2; ++i) {
      const double g = grads_w[t - 1][i];
      pw[i] *= 1 - lr * 0.1;
      mw[i] = 0.9 * mw[i] + 0.1 * g;
      vw[i] = 0.99 * vw[i] + 0.01 * g * g;
      pw[i] -= lr * (mw[i] / c1) / (std::sqrt(vw[i] / c2) + 1e-8);
    }
    const double g = grads_b[t - 1];
    mb = 0.9 * mb + 0.1 * g;
    vb = 0.99 * vb + 0.01 * g * g;
    pb -= lr * (mb / c1) / (std::sqrt(vb / c2) + 1e-8);
  }
  EXPECT_EQ(adam->step_count(), 2);
  for (int i = 0; i < 2; ++i) EXPECT_NEAR(w.at({0, i}), pw[i], 1e-12);
  EXPECT_NEAR(b.at({0}), pb, 1e-12);
  // The first step of Adam moves every coordinate by about lr.
  EXPECT_NEAR(pb, 0.5 - 0.02, 1e-3);
}

TEST(AdamWTest, MatchesTorchAdamW) {
  Generator gen = TestGenerator();
  const Tensor p0 = Randn({3, 4}, gen, DType::kFloat64);
  Tensors inputs = {p0};
  for (int t = 0; t < 5; ++t)
    inputs.push_back(Randn({3, 4}, gen, DType::kFloat64));
  OracleAttrs attrs;
  attrs.numbers = {{"lr", 0.01},
                   {"beta1", 0.9},
                   {"beta2", 0.999},
                   {"eps", 1e-8},
                   {"weight_decay", 0.05}};
  const Tensor expected = RunTorchOp("adamw", inputs, attrs).outputs[0];

  const Tensor p = p0.clone();
  p.set_requires_grad(true);
  AdamWOptions options;
  options.weight_decay = 0.05;
  absl::StatusOr<AdamW> adam = AdamW::Create({{"p", p}}, options);
  ASSERT_TRUE(adam.ok()) << adam.status();
  for (int t = 1; t <= 5; ++t) {
    p.set_grad(inputs[t]);
    adam->Step(0.01);
  }
  ExpectAllClose(p, expected, {1e-12, 1e-12}, "AdamW vs torch");
}

TEST(AdamWTest, Float32ParametersStayFloat32AndSkipMissingGradients) {
  const Tensor p = Leaf({1, 2, 3}, {3}, DType::kFloat32);
  const Tensor idle = Leaf({4}, {1}, DType::kFloat32);
  absl::StatusOr<AdamW> adam = AdamW::Create({{"p", p}, {"idle", idle}});
  ASSERT_TRUE(adam.ok());
  p.set_grad(FromVector({1, -1, 0}, {3}, DType::kFloat32));
  adam->Step(0.1);
  EXPECT_EQ(p.dtype(), DType::kFloat32);
  EXPECT_NEAR(p.at({0}), 0.9, 1e-6);
  EXPECT_NEAR(p.at({1}), 2.1, 1e-6);
  EXPECT_EQ(p.at({2}), 3);
  EXPECT_EQ(idle.at({0}), 4);  // no gradient: untouched
}

TEST(AdamWTest, StateDictRoundTripContinuesIdentically) {
  Generator gen = TestGenerator();
  const std::vector<Tensor> grads = {Randn({2, 3}, gen), Randn({2, 3}, gen),
                                     Randn({2, 3}, gen)};
  const Tensor start = Randn({2, 3}, gen);
  auto fresh = [&] {
    Tensor p = start.clone();
    p.set_requires_grad(true);
    return p;
  };
  // Uninterrupted: three steps.
  const Tensor a = fresh();
  AdamW adam_a = *AdamW::Create({{"layer.weight", a}});
  for (const Tensor& g : grads) {
    a.set_grad(g);
    adam_a.Step(0.1);
  }
  // One step, state saved, a new optimizer loads it and does two more.
  const Tensor b = fresh();
  AdamW adam_b = *AdamW::Create({{"layer.weight", b}});
  b.set_grad(grads[0]);
  adam_b.Step(0.1);
  std::map<std::string, Tensor> state = adam_b.StateDict();
  EXPECT_EQ(state.count("optimizer.m.layer.weight"), 1);
  EXPECT_EQ(state.count("optimizer.v.layer.weight"), 1);
  EXPECT_EQ(state.at("optimizer.step").item(), 1);
  for (auto& [name, tensor] : state) tensor = tensor.clone();
  AdamW adam_c = *AdamW::Create({{"layer.weight", b}});
  ASSERT_TRUE(adam_c.LoadStateDict(state).ok());
  EXPECT_EQ(adam_c.step_count(), 1);
  for (int t = 1; t < 3; ++t) {
    b.set_grad(grads[t]);
    adam_c.Step(0.1);
  }
  EXPECT_EQ(a.ToVector(), b.ToVector());  // bit-identical
}

TEST(AdamWTest, LoadStateDictErrorsNameTheKey) {
  const Tensor p = Leaf({1, 2}, {2});
  AdamW adam = *AdamW::Create({{"p", p}});
  std::map<std::string, Tensor> state = adam.StateDict();
  state.erase("optimizer.v.p");
  absl::Status status = adam.LoadStateDict(state);
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(status.message(), HasSubstr("optimizer.v.p"));
  state = adam.StateDict();
  state["optimizer.m.p"] = Zeros({3}, DType::kFloat64);
  status = adam.LoadStateDict(state);
  EXPECT_THAT(status.message(), AllOf(HasSubstr("optimizer.m.p"),
                                      HasSubstr("[3]"), HasSubstr("[2]")));
}

TEST(AdamWTest, CreateRejectsBadOptionsAndParameters) {
  const Tensor p = Leaf({1}, {1});
  AdamWOptions bad_beta;
  bad_beta.beta1 = 1.0;
  EXPECT_THAT(AdamW::Create({{"p", p}}, bad_beta).status().message(),
              HasSubstr("betas"));
  EXPECT_THAT(AdamW::Create({{"p", p}, {"p", p}}).status().message(),
              HasSubstr("two parameters are named p"));
  const Tensor ids = FromVector({1}, {1}, DType::kInt64);
  EXPECT_THAT(AdamW::Create({{"ids", ids}}).status().message(),
              HasSubstr("int64"));
}

TEST(LrScheduleTest, WarmupThenCosineToMinimum) {
  const LrSchedule s{1.0, 0.1, 4, 14};
  ASSERT_TRUE(ValidateLrSchedule(s).ok());
  EXPECT_DOUBLE_EQ(LearningRate(s, 0), 0.25);
  EXPECT_DOUBLE_EQ(LearningRate(s, 3), 1.0);
  EXPECT_DOUBLE_EQ(LearningRate(s, 4), 1.0);     // first step after warmup
  EXPECT_NEAR(LearningRate(s, 9), 0.55, 1e-12);  // halfway: (max + min) / 2
  EXPECT_NEAR(LearningRate(s, 14), 0.1, 1e-12);
  EXPECT_NEAR(LearningRate(s, 100), 0.1, 1e-12);  // stays at the floor
  for (int64_t step = 4; step < 14; ++step) {
    EXPECT_GE(LearningRate(s, step), LearningRate(s, step + 1));
  }
  EXPECT_DOUBLE_EQ(LearningRate({2.0, 0, 0, 10}, 0), 2.0);  // no warmup
  EXPECT_THAT(ValidateLrSchedule({1.0, 2.0, 0, 10}).message(),
              HasSubstr("min_lr"));
  EXPECT_THAT(ValidateLrSchedule({1.0, 0, 0, 0}).message(),
              HasSubstr("total steps"));
}

TEST(ClipGradNormTest, ScalesToMaxNormAndReturnsTheNormBefore) {
  const Tensor a = Leaf({0, 0}, {2});
  const Tensor b = Leaf({0}, {1});
  a.set_grad(FromVector({3, 0}, {2}, DType::kFloat64));
  b.set_grad(FromVector({4}, {1}, DType::kFloat64));
  absl::StatusOr<double> norm = ClipGradNorm({a, b}, 1.0);
  ASSERT_TRUE(norm.ok());
  EXPECT_DOUBLE_EQ(*norm, 5.0);
  EXPECT_NEAR(a.grad().at({0}), 0.6, 1e-6);
  EXPECT_NEAR(b.grad().at({0}), 0.8, 1e-6);
  // Below the limit, and with max_norm 0: measured, unchanged.
  EXPECT_NEAR(*ClipGradNorm({a, b}, 10.0), 1.0, 1e-6);
  EXPECT_NEAR(a.grad().at({0}), 0.6, 1e-6);
  EXPECT_NEAR(*ClipGradNorm({a, b}, 0.0), 1.0, 1e-6);
}

TEST(ClipGradNormTest, SameNormAndScalingOnEveryRank) {
  std::vector<double> norms(2), clipped(2);
  const absl::Status status = RunRanks(2, [&](Communicator& comm) {
    const Tensor p = Leaf({0, 0}, {2});
    p.set_grad(FromVector({6, 8}, {2}, DType::kFloat64));
    LC_ASSIGN_OR_RETURN(norms[comm.rank()], ClipGradNorm({p}, 2.0, &comm));
    clipped[comm.rank()] = p.grad().at({1});
    return absl::OkStatus();
  });
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(norms[0], 10.0);
  EXPECT_EQ(norms[1], 10.0);
  EXPECT_NEAR(clipped[0], 1.6, 1e-6);
  EXPECT_EQ(clipped[0], clipped[1]);
}

TEST(ClipGradNormTest, RanksWithDifferentGradientsFail) {
  const absl::Status status = RunRanks(2, [&](Communicator& comm) {
    const Tensor p = Leaf({0}, {1});
    p.set_grad(FromVector({1.0 + comm.rank()}, {1}, DType::kFloat64));
    return ClipGradNorm({p}, 1.0, &comm).status();
  });
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(status.message(), AllOf(HasSubstr("gradient norm"),
                                      HasSubstr("AllReduceGradients")));
}

TEST(AdamWTest, StepInvalidatesGraphsThatSavedTheParameter) {
  const Tensor p = Leaf({1, 2}, {2});
  auto optimizer = AdamW::Create({{"p", p}});
  ASSERT_TRUE(optimizer.ok()) << optimizer.status();
  const Tensor loss = Sum(Mul(p, p));
  loss.backward(Tensor(), /*retain_graph=*/true);
  optimizer->Step(0.1);
  ExpectError([&] { loss.backward(); },
              {"backward of Mul: input 0 [2] saved at version 0, now version "
               "1"});
}

TEST(ClipGradNormTest, CountsAsAWriteOfTheGradients) {
  const Tensor p = Leaf({1, 2}, {2});
  p.set_grad(FromVector({30, 40}, {2}, DType::kFloat64));
  const uint64_t before = p.grad().version();
  ASSERT_TRUE(ClipGradNorm({p}, /*max_norm=*/1, nullptr).ok());
  EXPECT_EQ(p.grad().version(), before + 1);
}

}  // namespace
}  // namespace lc
