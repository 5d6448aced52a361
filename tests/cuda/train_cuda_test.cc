// Training on a GPU: bfloat16 mixed-precision and float32 runs against the
// CPU float32 run of the same model, seed and data; exact resume and
// recomputation on CUDA; the fused multi-tensor AdamW and the CUDA gradient
// clipping against their CPU twins; bad input. Each case takes well under a
// second of GPU time (a 2-layer model of width 128 over 512 tokens).
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/autograd.h"
#include "core/safetensors.h"
#include "gtest/gtest.h"
#include "models/transformer_lm.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "tests/cuda/cuda_test_util.h"
#include "train/checkpoint.h"
#include "train/optimizer.h"
#include "train/trainer.h"

namespace lc {
namespace {

namespace fs = std::filesystem;

using TrainCudaTest = CudaTest;

// Passkey retrieval over 512 tokens with 2 layers of width 128 and 2 heads
// (head_dim 64: the tensor-core path of the bfloat16 attention kernels),
// dilated segments 128 and 512 with rates 1 and 4.
TrainOptions SmallOptions(Device device, DType dtype) {
  TrainOptions o;
  TransformerConfig& m = o.model;
  m.context = 512;
  m.d_model = 128;
  m.num_layers = 2;
  m.num_heads = 2;
  m.attention.type = AttentionType::kRingDilated;
  m.attention.dilated.segment_lengths = {128, 512};
  m.attention.dilated.dilation_rates = {1, 4};
  m.attention.causal = true;
  m.device = device;
  m.dtype = dtype;
  o.data.context = m.context;
  o.data.queries = 32;
  o.data.num_keys = 8;
  std::tie(o.data.position_stride, o.data.position_offset) =
      LongestPatternAlignment(m);
  o.steps = 5;
  o.batch = 2;
  o.warmup = 2;
  o.eval_batches = 1;
  o.seed = 5;
  return o;
}

TrainResult MustTrain(const TrainOptions& options) {
  absl::StatusOr<TrainResult> result = Train(options);
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? *std::move(result) : TrainResult();
}

std::string FreshDir(const std::string& name) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/", name);
  fs::remove_all(dir);
  return dir;
}

// Both runs start from the same float32 weights (initialized on the CPU)
// and see the same batches. The first loss differs only by the bfloat16
// rounding of weights and activations (2^-8 relative per rounding, a few
// dozen roundings along the path, partly cancelling): measured well below
// 1e-2. The later ones differ more: AdamW's first steps move every weight by
// about lr whatever its gradient's size, so a weight whose gradient bfloat16
// flips in sign moves the other way; the losses of the first 5 steps stay
// within 2e-2 relative (the bfloat16 tolerance of the GPU suite).
TEST_F(TrainCudaTest, BfloatSixteenLossesTrackTheCpuFloat32Run) {
  const TrainResult cpu =
      MustTrain(SmallOptions(Device::Cpu(), DType::kFloat32));
  const TrainResult gpu =
      MustTrain(SmallOptions(Device::Cuda(0), DType::kBFloat16));
  ASSERT_EQ(cpu.steps.size(), 5u);
  ASSERT_EQ(gpu.steps.size(), 5u);
  for (size_t i = 0; i < cpu.steps.size(); ++i) {
    EXPECT_NEAR(gpu.steps[i].loss, cpu.steps[i].loss,
                2e-2 * std::abs(cpu.steps[i].loss))
        << "step " << i + 1;
  }
  EXPECT_NEAR(gpu.steps[0].grad_norm, cpu.steps[0].grad_norm,
              2e-2 * cpu.steps[0].grad_norm);
  // The masters and the AdamW state stay float32, under the CPU's names.
  ASSERT_EQ(gpu.final_state.size(), cpu.final_state.size());
  for (const auto& [name, tensor] : cpu.final_state) {
    ASSERT_EQ(gpu.final_state.count(name), 1u) << name;
    const Tensor& g = gpu.final_state.at(name);
    EXPECT_EQ(g.dtype(), tensor.dtype()) << name;
    EXPECT_TRUE(g.device().is_cpu()) << name;
  }
  EXPECT_GT(gpu.peak_bytes, 0);
}

// Float32 on CUDA (TF32 off) computes the CPU's function with sums in other
// orders (GEMM blocking, attention tiles, reductions): the first loss and
// gradient norm agree to about 1e-6. AdamW amplifies such differences in
// the weights (see TrainerTest.TwoAndFourRanksGiveTheLossesOfOne: elements
// whose gradient is near eps or changes sign move by other fractions of lr),
// so the later losses get 1e-4 relative rather than 1e-5.
TEST_F(TrainCudaTest, Float32LossesMatchTheCpuRun) {
  const bool tf32 = AllowTf32();
  SetAllowTf32(false);
  const TrainResult cpu =
      MustTrain(SmallOptions(Device::Cpu(), DType::kFloat32));
  const TrainResult gpu =
      MustTrain(SmallOptions(Device::Cuda(0), DType::kFloat32));
  SetAllowTf32(tf32);
  ASSERT_EQ(cpu.steps.size(), 5u);
  ASSERT_EQ(gpu.steps.size(), 5u);
  EXPECT_NEAR(gpu.steps[0].loss, cpu.steps[0].loss,
              1e-5 * std::abs(cpu.steps[0].loss));
  EXPECT_NEAR(gpu.steps[0].grad_norm, cpu.steps[0].grad_norm,
              1e-5 * cpu.steps[0].grad_norm);
  for (size_t i = 0; i < cpu.steps.size(); ++i) {
    EXPECT_NEAR(gpu.steps[i].loss, cpu.steps[i].loss,
                1e-4 * std::abs(cpu.steps[i].loss))
        << "step " << i + 1;
  }
  ASSERT_FALSE(cpu.evals.empty());
  ASSERT_FALSE(gpu.evals.empty());
  EXPECT_NEAR(gpu.evals.back().loss, cpu.evals.back().loss,
              1e-4 * std::abs(cpu.evals.back().loss));
}

// An interrupted bfloat16 run with dropout, resumed from its checkpoint on
// the GPU, continues bit for bit: with deterministic attention (cuDNN's
// forward, our backward) every CUDA kernel of the step sums in a fixed
// order, the masters, moments and dropout stream come back exactly, and the
// bfloat16 copies are remade from the masters. The checkpoint is an
// ordinary one: float32 tensors under the model's names.
TEST_F(TrainCudaTest, ResumeOnTheGpuIsBitIdentical) {
  TrainOptions base = SmallOptions(Device::Cuda(0), DType::kBFloat16);
  base.model.dropout = 0.1;
  base.model.attention.deterministic = true;
  base.steps = 6;
  const TrainResult reference = MustTrain(base);
  ASSERT_EQ(reference.steps.size(), 6u);

  const std::string dir = FreshDir("cuda_resume");
  TrainOptions first = base;
  first.checkpoint_dir = dir;
  first.stop_after = 3;
  const TrainResult stopped = MustTrain(first);
  ASSERT_EQ(stopped.steps.size(), 3u);

  absl::StatusOr<SafetensorsFile> file =
      ReadSafetensors(CheckpointPath(dir, 3));
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(file->tensors.count("embed.weight"), 1u);
  EXPECT_EQ(file->tensors.at("embed.weight").dtype(), DType::kFloat32);
  EXPECT_EQ(file->tensors.count("blocks.1.attn.q_proj.weight"), 1u);
  EXPECT_EQ(file->tensors.count("optimizer.m.embed.weight"), 1u);

  TrainOptions second = base;
  second.checkpoint_dir = dir;
  second.resume = true;
  const TrainResult resumed = MustTrain(second);
  ASSERT_EQ(resumed.first_step, 3);
  ASSERT_EQ(resumed.steps.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(stopped.steps[i].loss, reference.steps[i].loss) << i;
    EXPECT_EQ(resumed.steps[i].loss, reference.steps[3 + i].loss) << i;
    EXPECT_EQ(resumed.steps[i].grad_norm, reference.steps[3 + i].grad_norm)
        << i;
  }
  ASSERT_EQ(resumed.final_state.size(), reference.final_state.size());
  for (const auto& [name, tensor] : reference.final_state) {
    EXPECT_EQ(resumed.final_state.at(name).ToVector(), tensor.ToVector())
        << name;
  }
}

// Recomputation reruns each block in backward, on CUDA and through the
// bfloat16 copies of the masters: same losses and gradients as storing the
// activations, up to the order in which a few gradients are summed.
TEST_F(TrainCudaTest, RecomputationGivesTheSameSteps) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(DTypeName(dtype));
    TrainOptions stored = SmallOptions(Device::Cuda(0), dtype);
    stored.steps = 3;
    TrainOptions recomputed = stored;
    recomputed.model.recompute = true;
    const TrainResult a = MustTrain(stored);
    const TrainResult b = MustTrain(recomputed);
    ASSERT_EQ(a.steps.size(), 3u);
    ASSERT_EQ(b.steps.size(), 3u);
    // The first forward is the same computation: equal losses. Gradients
    // (and so the later steps) may differ by the order of float32 sums; in
    // bfloat16 such a difference can flip a rounding, hence the bfloat16
    // tolerance there.
    EXPECT_NEAR(b.steps[0].loss, a.steps[0].loss,
                1e-6 * std::abs(a.steps[0].loss));
    const double tol = dtype == DType::kBFloat16 ? 2e-2 : 1e-5;
    EXPECT_NEAR(b.steps[0].grad_norm, a.steps[0].grad_norm,
                tol * a.steps[0].grad_norm);
    for (int i = 1; i < 3; ++i) {
      EXPECT_NEAR(b.steps[i].loss, a.steps[i].loss,
                  tol * std::abs(a.steps[i].loss))
          << "step " << i + 1;
    }
  }
}

// A parameter and its gradient for each of `shapes`, on the CPU (float32).
struct ParameterSet {
  std::vector<std::pair<std::string, Tensor>> params;
  std::vector<std::vector<Tensor>> grads;  // per step, per parameter
};

// Odd sizes (a tensor crossing several 16384-element chunks, one-element and
// 3-D tensors), more than the 48 tensors of one launch, vectors (not
// decayed) and matrices (decayed), and one parameter that never gets a
// gradient (skipped: its moments keep their values).
ParameterSet MakeParameterSet(int steps) {
  std::vector<Shape> shapes = {{7}, {33, 17}, {65537}, {5, 7, 9}, {1}, {1, 1}};
  for (int i = 0; i < 54; ++i) {
    shapes.push_back(i % 2 == 0 ? Shape{i * 37 + 1} : Shape{i + 1, 13});
  }
  ParameterSet set;
  for (size_t i = 0; i < shapes.size(); ++i) {
    set.params.emplace_back(
        absl::StrCat("p", i),
        RandomNormal(shapes[i], DType::kFloat32, Device::Cpu(),
                     SeedOfCase(absl::StrCat("adamw param ", i)))
            .set_requires_grad(true));
  }
  for (int t = 0; t < steps; ++t) {
    std::vector<Tensor> step_grads;
    for (size_t i = 0; i < shapes.size(); ++i) {
      // Gradients of mixed scales, some tiny (near eps after squaring).
      const double scale = std::pow(10.0, -static_cast<double>(i % 7));
      step_grads.push_back(MulScalar(
          RandomNormal(shapes[i], DType::kFloat32, Device::Cpu(),
                       SeedOfCase(absl::StrCat("adamw grad ", t, " ", i))),
          scale));
    }
    set.grads.push_back(std::move(step_grads));
  }
  return set;
}

// Copies of `params` on `device`, as leaves requiring grad.
std::vector<std::pair<std::string, Tensor>> OnDevice(
    const std::vector<std::pair<std::string, Tensor>>& params, Device device) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& [name, p] : params) {
    out.emplace_back(name,
                     p.detach().clone().to(device).set_requires_grad(true));
  }
  return out;
}

// Expects every element of `actual` within one float32 rounding of
// `expected` (the kernel is meant to be bit-identical: it rounds each
// float64 product and sum on its own, as the CPU does, and nvcc may not fuse
// them).
void ExpectWithinOneRounding(const Tensor& actual, const Tensor& expected,
                             const std::string& what) {
  const std::vector<double> a = actual.to(Device::Cpu()).ToVector();
  const std::vector<double> e = expected.ToVector();
  ASSERT_EQ(a.size(), e.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    const double ulp = std::max(std::abs(e[i]), 1e-30) * std::ldexp(1.0, -23);
    ASSERT_LE(std::abs(a[i] - e[i]), ulp)
        << what << "[" << i << "]: " << a[i] << " vs CPU " << e[i];
  }
}

TEST_F(TrainCudaTest, FusedAdamWEqualsTheCpuAdamW) {
  constexpr int kSteps = 3;
  const ParameterSet set = MakeParameterSet(kSteps);
  for (bool decay_vectors : {false, true}) {
    SCOPED_TRACE(absl::StrCat("decay_vectors ", decay_vectors));
    const auto cpu_params = OnDevice(set.params, Device::Cpu());
    const auto gpu_params = OnDevice(set.params, Device::Cuda(0));
    AdamWOptions options;
    options.weight_decay = 0.1;
    options.decay_vectors = decay_vectors;
    absl::StatusOr<AdamW> cpu = AdamW::Create(cpu_params, options);
    absl::StatusOr<AdamW> gpu = AdamW::Create(gpu_params, options);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    for (int t = 0; t < kSteps; ++t) {
      for (size_t i = 0; i + 1 < set.params.size(); ++i) {  // last: no grad
        cpu_params[i].second.set_grad(set.grads[t][i]);
        gpu_params[i].second.set_grad(set.grads[t][i].to(Device::Cuda(0)));
      }
      const double lr = 1e-3 * (t + 1);
      cpu->Step(lr);
      gpu->Step(lr);
    }
    const std::map<std::string, Tensor> cpu_state = cpu->StateDict();
    const std::map<std::string, Tensor> gpu_state = gpu->StateDict();
    for (size_t i = 0; i < set.params.size(); ++i) {
      const std::string& name = set.params[i].first;
      ExpectWithinOneRounding(gpu_params[i].second, cpu_params[i].second, name);
      for (const char* moment : {"m", "v"}) {
        const std::string key = absl::StrCat("optimizer.", moment, ".", name);
        EXPECT_TRUE(gpu_state.at(key).device().is_cuda()) << key;
        ExpectWithinOneRounding(gpu_state.at(key), cpu_state.at(key), key);
      }
    }
    EXPECT_EQ(gpu_state.at("optimizer.step").item(), kSteps);
    // The untouched parameter kept its moments at zero.
    const std::string idle = set.params.back().first;
    EXPECT_EQ(gpu_state.at("optimizer.m." + idle).to(Device::Cpu()).ToVector(),
              std::vector<double>(set.params.back().second.numel(), 0.0));
  }
}

TEST_F(TrainCudaTest, ClipGradNormMatchesTheCpu) {
  const ParameterSet set = MakeParameterSet(1);
  const auto cpu_params = OnDevice(set.params, Device::Cpu());
  const auto gpu_params = OnDevice(set.params, Device::Cuda(0));
  std::vector<Tensor> cpu_list, gpu_list;
  for (size_t i = 0; i < set.params.size(); ++i) {
    cpu_list.push_back(cpu_params[i].second);
    gpu_list.push_back(gpu_params[i].second);
    if (i + 1 == set.params.size()) break;  // one parameter without a grad
    cpu_list.back().set_grad(set.grads[0][i].clone());  // scaled in place
    // A transposed (non-contiguous) gradient where the shape allows one.
    const Tensor g = set.grads[0][i].to(Device::Cuda(0));
    gpu_list.back().set_grad(
        g.dim() == 2 ? g.transpose(0, 1).contiguous().transpose(0, 1) : g);
  }
  absl::StatusOr<double> cpu_norm = ClipGradNorm(cpu_list, 0.5);
  absl::StatusOr<double> gpu_norm = ClipGradNorm(gpu_list, 0.5);
  ASSERT_TRUE(cpu_norm.ok()) << cpu_norm.status();
  ASSERT_TRUE(gpu_norm.ok()) << gpu_norm.status();
  ASSERT_GT(*cpu_norm, 0.5);
  // Float64 sums of float32 squares in another order.
  EXPECT_NEAR(*gpu_norm, *cpu_norm, 1e-12 * *cpu_norm);
  for (size_t i = 0; i + 1 < set.params.size(); ++i) {
    ExpectCudaClose(gpu_list[i].grad(), cpu_list[i].grad(), 1e-7,
                    absl::StrCat("clipped grad ", i));
  }
  // Bit-identical on every run.
  for (size_t i = 0; i + 1 < set.params.size(); ++i) {
    gpu_list[i].set_grad(set.grads[0][i].to(Device::Cuda(0)));
  }
  absl::StatusOr<double> again = ClipGradNorm(gpu_list, 0);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *gpu_norm);
}

TEST_F(TrainCudaTest, BadInputIsAClearError) {
  const Tensor cpu = Zeros({3}).set_requires_grad(true);
  const Tensor gpu =
      Zeros({3}, DType::kFloat32, Device::Cuda(0)).set_requires_grad(true);
  absl::StatusOr<AdamW> mixed = AdamW::Create({{"a", cpu}, {"b", gpu}});
  EXPECT_EQ(mixed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(mixed.status().message().find("b is on cuda:0"), std::string::npos)
      << mixed.status();
  const Tensor gpu64 =
      Zeros({3}, DType::kFloat64, Device::Cuda(0)).set_requires_grad(true);
  absl::StatusOr<AdamW> f64 = AdamW::Create({{"w", gpu64}});
  EXPECT_EQ(f64.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(f64.status().message().find("w is float64"), std::string::npos)
      << f64.status();

  absl::StatusOr<AdamW> ok = AdamW::Create({{"g", gpu}});
  ASSERT_TRUE(ok.ok());
  gpu.set_grad(Zeros({3}));  // on the CPU
  try {
    ok->Step(1e-3);
    ADD_FAILURE() << "expected an error for a CPU gradient";
  } catch (const Error& e) {
    EXPECT_NE(e.status().message().find("gradient of g"), std::string::npos)
        << e.status();
  }
  cpu.set_grad(Ones({3}));
  gpu.set_grad(Ones({3}, DType::kFloat32, Device::Cuda(0)));
  absl::StatusOr<double> norm = ClipGradNorm({cpu, gpu}, 1.0);
  EXPECT_EQ(norm.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(norm.status().message().find("cpu and cuda:0"), std::string::npos)
      << norm.status();

  TransformerConfig config =
      SmallOptions(Device::Cuda(99), DType::kBFloat16).model;
  const absl::Status status = ValidateTransformerConfig(config);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("device cuda:99"), std::string::npos)
      << status;

  // Token ids on the device are checked there.
  config.device = Device::Cuda(0);
  Generator gen(0);
  absl::StatusOr<std::shared_ptr<TransformerLM>> model =
      TransformerLM::Create(config, gen);
  ASSERT_TRUE(model.ok()) << model.status();
  Tensor tokens = Zeros({1, 8}, DType::kInt64);
  tokens.set({0, 3}, 300);
  try {
    (*model)->Forward(tokens.to(Device::Cuda(0)));
    ADD_FAILURE() << "expected an error for token 300";
  } catch (const Error& e) {
    EXPECT_NE(e.status().message().find("token id 300 at [0, 3]"),
              std::string::npos)
        << e.status();
  }
}

}  // namespace
}  // namespace lc
