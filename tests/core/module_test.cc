#include "core/module.h"

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/random.h"
#include "core/safetensors.h"
#include "core/status.h"
#include "gtest/gtest.h"

namespace lc {
namespace {

constexpr int64_t kDim = 4;

class Linear : public Module {
 public:
  Linear(int64_t in, int64_t out, Generator& gen)
      : weight(RegisterParameter("weight", Randn({out, in}, gen))),
        bias(RegisterParameter("bias", Randn({out}, gen))) {}
  Tensor weight;
  Tensor bias;
};

class Attention : public Module {
 public:
  explicit Attention(Generator& gen)
      : q_proj(RegisterModule("q_proj",
                              std::make_shared<Linear>(kDim, kDim, gen))),
        k_proj(RegisterModule("k_proj",
                              std::make_shared<Linear>(kDim, kDim, gen))) {}
  std::shared_ptr<Linear> q_proj;
  std::shared_ptr<Linear> k_proj;
};

class Norm : public Module {
 public:
  explicit Norm(Generator& gen)
      : scale(RegisterParameter("scale", Randn({kDim}, gen))),
        running_mean(RegisterBuffer("running_mean", Randn({kDim}, gen))) {}
  Tensor scale;
  Tensor running_mean;
};

class Block : public Module {
 public:
  explicit Block(Generator& gen)
      : attn(RegisterModule("attn", std::make_shared<Attention>(gen))),
        norm(RegisterModule("norm", std::make_shared<Norm>(gen))) {}
  std::shared_ptr<Attention> attn;
  std::shared_ptr<Norm> norm;
};

// Children named "0", "1", ...
class Sequence : public Module {
 public:
  void Append(std::shared_ptr<Module> module) {
    RegisterModule(absl::StrCat(NamedChildren().size()), std::move(module));
  }
};

// An embedding, two blocks and a head, plus an int64 buffer.
class Toy : public Module {
 public:
  explicit Toy(uint64_t seed) : gen_(seed) {
    embed = RegisterParameter("embed", Randn({10, kDim}, gen_));
    step = RegisterBuffer(
        "step", FromVector({static_cast<double>(seed)}, {}, DType::kInt64));
    blocks = RegisterModule("blocks", std::make_shared<Sequence>());
    for (int i = 0; i < 2; ++i) blocks->Append(std::make_shared<Block>(gen_));
    head = RegisterModule("head", std::make_shared<Linear>(kDim, 3, gen_));
  }
  Generator gen_;
  Tensor embed;
  Tensor step;
  std::shared_ptr<Sequence> blocks;
  std::shared_ptr<Linear> head;
};

// Exposes the registration methods.
class Open : public Module {
 public:
  using Module::RegisterBuffer;
  using Module::RegisterModule;
  using Module::RegisterParameter;
};

const std::vector<std::string> kParameterNames = {
    "embed",
    "blocks.0.attn.q_proj.weight",
    "blocks.0.attn.q_proj.bias",
    "blocks.0.attn.k_proj.weight",
    "blocks.0.attn.k_proj.bias",
    "blocks.0.norm.scale",
    "blocks.1.attn.q_proj.weight",
    "blocks.1.attn.q_proj.bias",
    "blocks.1.attn.k_proj.weight",
    "blocks.1.attn.k_proj.bias",
    "blocks.1.norm.scale",
    "head.weight",
    "head.bias",
};
const std::vector<std::string> kBufferNames = {
    "step", "blocks.0.norm.running_mean", "blocks.1.norm.running_mean"};

template <typename Named>
std::vector<std::string> Names(const Named& named) {
  std::vector<std::string> names;
  for (const auto& entry : named) names.push_back(entry.first);
  return names;
}

// The values of every state dict entry.
std::map<std::string, std::vector<double>> Values(const Module& module) {
  std::map<std::string, std::vector<double>> values;
  for (const auto& [name, tensor] : module.StateDict()) {
    values[name] = tensor.ToVector();
  }
  return values;
}

std::string TempPath(const std::string& name) {
  return absl::StrCat(testing::TempDir(), "/", name);
}

bool AllTraining(const Module& module, bool training) {
  if (module.is_training() != training) return false;
  for (const auto& [name, child] : module.NamedChildren()) {
    if (!AllTraining(*child, training)) return false;
  }
  return true;
}

TEST(ModuleTest, NamesParametersAndBuffersWithDottedPaths) {
  const Toy toy(1);
  EXPECT_EQ(Names(toy.NamedParameters()), kParameterNames);
  EXPECT_EQ(Names(toy.NamedBuffers()), kBufferNames);
  EXPECT_EQ(Names(toy.NamedChildren()),
            (std::vector<std::string>{"blocks", "head"}));

  const std::vector<Tensor> parameters = toy.Parameters();
  ASSERT_EQ(parameters.size(), kParameterNames.size());
  int64_t numel = 0;
  for (const Tensor& p : parameters) {
    EXPECT_TRUE(p.requires_grad());
    EXPECT_TRUE(p.is_leaf());
    numel += p.numel();
  }
  // embed 10x4, per block 2 x (4x4 + 4) + 4, head 3x4 + 3.
  EXPECT_EQ(numel, 40 + 2 * (2 * 20 + 4) + 15);
  // The parameters are the module's tensors, not copies.
  EXPECT_EQ(parameters[0].impl_ptr(), toy.embed.impl_ptr());
  EXPECT_EQ(parameters.back().impl_ptr(), toy.head->bias.impl_ptr());
  for (const auto& [name, buffer] : toy.NamedBuffers()) {
    EXPECT_FALSE(buffer.requires_grad()) << name;
  }
}

TEST(ModuleTest, RegisterParameterMakesALeafThatRequiresGrad) {
  Open module;
  const Tensor value = Ones({2, 3});
  const Tensor parameter = module.RegisterParameter("w", value);
  EXPECT_TRUE(parameter.requires_grad());
  EXPECT_TRUE(parameter.is_leaf());
  EXPECT_FALSE(value.requires_grad());
  EXPECT_EQ(parameter.raw_data(), value.raw_data());  // shares the data

  const Tensor buffer = module.RegisterBuffer("b", Zeros({2}));
  EXPECT_FALSE(buffer.requires_grad());
  EXPECT_EQ(Names(module.NamedParameters()), std::vector<std::string>{"w"});
  EXPECT_EQ(Names(module.NamedBuffers()), std::vector<std::string>{"b"});
}

TEST(ModuleTest, RejectsBadNamesAndValues) {
  Open module;
  module.RegisterParameter("w", Ones({1}));
  module.RegisterBuffer("b", Ones({1}));
  module.RegisterModule("child", std::make_shared<Open>());
  auto error_of = [](auto&& register_call) -> std::string {
    try {
      register_call();
    } catch (const Error& e) {
      return std::string(e.status().message());
    }
    return "no error";
  };
  for (const std::string name : {"w", "b", "child"}) {
    EXPECT_TRUE(absl::StrContains(
        error_of([&] { module.RegisterParameter(name, Ones({1})); }),
        absl::StrCat("RegisterParameter: name \"", name,
                     "\" is already used")));
    EXPECT_TRUE(absl::StrContains(
        error_of([&] { module.RegisterBuffer(name, Ones({1})); }),
        absl::StrCat("RegisterBuffer: name \"", name, "\" is already used")));
  }
  for (const std::string name : {"", "a.b"}) {
    EXPECT_TRUE(absl::StrContains(
        error_of([&] { module.RegisterParameter(name, Ones({1})); }),
        "must be non-empty and contain no dot"));
  }
  EXPECT_TRUE(absl::StrContains(
      error_of(
          [&] { module.RegisterParameter("ids", Zeros({2}, DType::kInt64)); }),
      "RegisterParameter: ids is int64, expected a floating dtype"));
  EXPECT_TRUE(absl::StrContains(
      error_of([&] { module.RegisterBuffer("undefined", Tensor()); }),
      "RegisterBuffer: undefined is undefined"));
}

TEST(ModuleTest, TrainAndEvalReachEverySubmodule) {
  Toy toy(2);
  EXPECT_TRUE(AllTraining(toy, true));
  toy.Eval();
  EXPECT_TRUE(AllTraining(toy, false));
  EXPECT_FALSE(toy.blocks->NamedChildren()[1].second->is_training());
  toy.Train();
  EXPECT_TRUE(AllTraining(toy, true));
  toy.blocks->Train(false);
  EXPECT_TRUE(toy.is_training());
  EXPECT_TRUE(AllTraining(*toy.blocks, false));
  EXPECT_TRUE(toy.head->is_training());
}

TEST(ModuleTest, ZeroGradClearsEveryGradient) {
  Toy toy(3);
  for (const Tensor& p : toy.Parameters()) p.set_grad(Ones(p.shape()));
  ASSERT_TRUE(
      toy.blocks->NamedChildren()[1].second->Parameters()[0].grad().defined());
  toy.ZeroGrad();
  for (const auto& [name, p] : toy.NamedParameters()) {
    EXPECT_FALSE(p.grad().defined()) << name;
  }
}

TEST(ModuleTest, StateDictHoldsParametersAndBuffers) {
  const Toy toy(4);
  const std::map<std::string, Tensor> state = toy.StateDict();
  std::vector<std::string> expected = kParameterNames;
  expected.insert(expected.end(), kBufferNames.begin(), kBufferNames.end());
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(Names(state), expected);
  EXPECT_EQ(state.at("embed").impl_ptr(), toy.embed.impl_ptr());
  EXPECT_EQ(state.at("step").dtype(), DType::kInt64);
}

TEST(ModuleTest, SaveAndLoadRoundTrip) {
  const Toy source(5);
  Toy target(6);
  ASSERT_NE(Values(source), Values(target));
  const void* embed_data = target.embed.raw_data();

  const std::string path = TempPath("toy.safetensors");
  ASSERT_TRUE(source.Save(path).ok());
  const absl::Status status = target.Load(path);
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(Values(target), Values(source));
  // Loaded in place: same tensors, still parameters.
  EXPECT_EQ(target.embed.raw_data(), embed_data);
  EXPECT_TRUE(target.embed.requires_grad());
  EXPECT_EQ(target.step.dtype(), DType::kInt64);
  EXPECT_EQ(target.step.item(), 5.0);

  const absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(Names(file->tensors), Names(source.StateDict()));
}

TEST(ModuleTest, LoadConvertsTheFileDType) {
  const Toy source(7);
  std::map<std::string, Tensor> state;
  for (const auto& [name, tensor] : source.StateDict()) {
    state[name] = tensor.dtype() == DType::kFloat32
                      ? tensor.detach().to(DType::kFloat64)
                      : tensor;
  }
  const std::string path = TempPath("toy_f64.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, state).ok());

  Toy target(8);
  const absl::Status status = target.Load(path);
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(target.embed.dtype(), DType::kFloat32);
  EXPECT_EQ(target.head->weight.dtype(), DType::kFloat32);
  EXPECT_EQ(Values(target), Values(source));  // float32 -> float64 is exact
}

TEST(ModuleTest, StrictLoadNamesMissingAndUnexpectedKeys) {
  const Toy source(9);
  Toy target(10);
  const auto before = Values(target);

  std::map<std::string, Tensor> state = source.StateDict();
  state.erase("blocks.1.norm.scale");
  state.erase("step");
  state["blocks.2.attn.q_proj.weight"] = Zeros({kDim, kDim});
  absl::Status status = target.LoadStateDict(state);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(),
                                "missing keys: blocks.1.norm.scale, step"))
      << status;
  EXPECT_TRUE(absl::StrContains(status.message(),
                                "unexpected keys: blocks.2.attn.q_proj.weight"))
      << status;
  EXPECT_EQ(Values(target), before);  // nothing was loaded

  // Not strict: the keys both sides have are loaded, the others ignored.
  status = target.LoadStateDict(state, /*strict=*/false);
  ASSERT_TRUE(status.ok()) << status;
  auto expected = Values(source);
  expected["blocks.1.norm.scale"] = before.at("blocks.1.norm.scale");
  expected["step"] = before.at("step");
  EXPECT_EQ(Values(target), expected);
}

TEST(ModuleTest, ShapeMismatchNamesTheKeyAndBothShapes) {
  Toy target(11);
  const auto before = Values(target);
  std::map<std::string, Tensor> state = Toy(12).StateDict();
  state["head.weight"] = Zeros({kDim, 3});
  for (const bool strict : {true, false}) {
    const absl::Status status = target.LoadStateDict(state, strict);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(
        status.message(), "key head.weight has shape [4, 3], expected [3, 4]"))
        << status;
    EXPECT_EQ(Values(target), before);
  }
}

TEST(ModuleTest, LoadErrorsNameThePath) {
  Toy target(13);
  const std::string missing = TempPath("no_such_checkpoint.safetensors");
  absl::Status status = target.Load(missing);
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(status.message(), missing)) << status;

  const std::string path = TempPath("partial.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"embed", Zeros({10, kDim})}}).ok());
  status = target.Load(path);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(), path)) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "missing keys: blocks.0."))
      << status;
  ASSERT_TRUE(target.Load(path, /*strict=*/false).ok());
  EXPECT_EQ(target.embed.ToVector(), std::vector<double>(10 * kDim, 0.0));
}

}  // namespace
}  // namespace lc
