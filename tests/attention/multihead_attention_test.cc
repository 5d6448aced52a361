#include "attention/multihead_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/autograd.h"
#include "distributed/thread_communicator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "ops/linear.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "ops/rope.h"
#include "ops/softmax.h"
#include "tests/attention/attention_test_util.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

MultiheadAttentionOptions SmallOptions() {
  MultiheadAttentionOptions options;
  options.embed_dim = 16;
  options.num_heads = 4;
  options.dtype = DType::kFloat64;
  options.attention.dilated.segment_lengths = {8, 16};
  options.attention.dilated.dilation_rates = {1, 2};
  options.attention.block_sparse.block_size = 4;
  options.attention.block_sparse.window = 4;
  return options;
}

TEST(MultiheadAttentionTest, EveryFactoryTypeConstructsRunsAndBackpropagates) {
  for (const char* type : {"dense", "dilated", "block_sparse", "ring_dilated",
                           "ring_block_sparse"}) {
    SCOPED_TRACE(type);
    Generator gen = testing::TestGenerator();
    auto mha = CreateMultiheadAttention(type, SmallOptions(), gen);
    ASSERT_TRUE(mha.ok()) << mha.status();
    Tensor x = Randn({2, 21, 16}, gen, DType::kFloat64);
    Tensor y = (*mha)->Forward(x);
    EXPECT_EQ(y.shape(), (Shape{2, 21, 16}));
    Backward({y}, {Randn(y.shape(), gen, DType::kFloat64)});
    for (const auto& [name, p] : (*mha)->NamedParameters()) {
      ASSERT_TRUE(p.grad().defined()) << name;
      double norm = 0;
      for (double g : p.grad().ToVector()) norm += g * g;
      EXPECT_GT(norm, 0) << name;
    }
  }
}

TEST(MultiheadAttentionTest, BadTypesAndOptionsAreClearErrors) {
  Generator gen(1);
  auto unknown = CreateMultiheadAttention("sparse_ring", SmallOptions(), gen);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("sparse_ring"), std::string::npos);

  MultiheadAttentionOptions bad_heads = SmallOptions();
  bad_heads.num_heads = 3;
  auto heads = CreateMultiheadAttention("dilated", bad_heads, gen);
  EXPECT_NE(heads.status().message().find("num_heads 3"), std::string::npos)
      << heads.status();

  MultiheadAttentionOptions bad_rates = SmallOptions();
  bad_rates.attention.dilated.dilation_rates = {1};
  auto rates = CreateMultiheadAttention("dilated", bad_rates, gen);
  EXPECT_NE(rates.status().message().find("different lengths"),
            std::string::npos)
      << rates.status();

  MultiheadAttentionOptions ranks = SmallOptions();
  ranks.attention.ranks = 2;
  EXPECT_EQ(CreateMultiheadAttention("dilated", ranks, gen).status().code(),
            absl::StatusCode::kInvalidArgument);

  MultiheadAttentionOptions window = SmallOptions();
  window.attention.window_right = -2;
  EXPECT_THAT(
      CreateMultiheadAttention("dense", window, gen).status().message(),
      AllOf(HasSubstr("window_right -2"), HasSubstr("-1 for unlimited")));
  for (double cap : {-1.0, std::numeric_limits<double>::infinity(),
                     std::numeric_limits<double>::quiet_NaN()}) {
    MultiheadAttentionOptions softcap = SmallOptions();
    softcap.attention.softcap = cap;
    EXPECT_THAT(
        CreateMultiheadAttention("dense", softcap, gen).status().message(),
        AllOf(HasSubstr(absl::StrCat("softcap ", cap)),
              HasSubstr("finite number > 0, or 0 for none")));
  }

  auto mha = CreateMultiheadAttention("dense", SmallOptions(), gen);
  ASSERT_TRUE(mha.ok());
  testing::ExpectError(
      [&] {
        (*mha)->Forward(Zeros({2, 5, 8}));
      },
      {"[2, 5, 8]", "expected [batch, n, 16]"});
}

// The ring types on k thread ranks give each rank its rows of the one-rank
// result, and parameter gradients that sum to the one-rank gradients.
TEST(MultiheadAttentionTest, RingTypesOnThreadRanksMatchOneRank) {
  for (const char* type : {"ring_dilated", "ring_block_sparse"}) {
    SCOPED_TRACE(type);
    const int k = 3;
    const int64_t n = 29;
    MultiheadAttentionOptions options = SmallOptions();
    options.attention.causal = true;
    options.attention.layout = SequenceLayout::kZigzag;
    Generator gen = testing::TestGenerator();
    auto single = CreateMultiheadAttention(type, options, gen);
    ASSERT_TRUE(single.ok()) << single.status();
    Tensor x = Randn({2, n, 16}, gen, DType::kFloat64);
    Tensor g = Randn({2, n, 16}, gen, DType::kFloat64);
    Tensor want = (*single)->Forward(x);
    want.backward(g);

    options.attention.ranks = k;
    std::vector<Tensor> outs(k);
    std::vector<std::map<std::string, Tensor>> grads(k);
    const absl::Status status = RunRanks(k, [&](Communicator& comm) {
      Generator same = testing::TestGenerator();  // same weights everywhere
      auto mha = CreateMultiheadAttention(type, options, same);
      if (!mha.ok()) return mha.status();
      SequenceParallelContext sp{&comm, n};
      const SequenceLayout layout = options.attention.layout;
      Tensor y = (*mha)->Forward(SplitSequence(x, k, comm.rank(), layout),
                                 Tensor(), &sp);
      y.backward(SplitSequence(g, k, comm.rank(), layout));
      outs[comm.rank()] = y;
      for (const auto& [name, p] : (*mha)->NamedParameters()) {
        grads[comm.rank()][name] = p.grad();
      }
      return absl::OkStatus();
    });
    ASSERT_TRUE(status.ok()) << status;
    const testing::Tolerance tol = testing::DefaultTolerance(DType::kFloat64);
    for (int r = 0; r < k; ++r) {
      testing::ExpectAllClose(
          outs[r], SplitSequence(want, k, r, options.attention.layout), tol,
          "out");
    }
    for (const auto& [name, p] : (*single)->NamedParameters()) {
      std::vector<double> sum(p.numel(), 0.0);
      for (int r = 0; r < k; ++r) {
        const std::vector<double> part = grads[r][name].ToVector();
        for (size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
      }
      testing::ExpectAllClose(FromVector(sum, p.shape(), DType::kFloat64),
                              p.grad(), tol, name);
    }
  }
}

TEST(MultiheadAttentionTest, NamesFollowTheTorchConvention) {
  Generator gen(2);
  MultiheadAttentionOptions options = SmallOptions();
  options.sub_layer_norm = true;
  auto mha = CreateMultiheadAttention("dilated", options, gen);
  ASSERT_TRUE(mha.ok());
  std::vector<std::string> names;
  for (const auto& [name, p] : (*mha)->NamedParameters()) names.push_back(name);
  EXPECT_EQ(names,
            (std::vector<std::string>{
                "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                "v_proj.weight", "v_proj.bias", "sub_norm.weight",
                "sub_norm.bias", "out_proj.weight", "out_proj.bias"}));
  options.fused_qkv = true;
  options.bias = false;
  auto fused = CreateMultiheadAttention("dilated", options, gen);
  ASSERT_TRUE(fused.ok());
  EXPECT_EQ((*fused)->NamedParameters().front().first, "qkv_proj.weight");
  EXPECT_EQ((*fused)->NamedParameters().front().second.shape(),
            (Shape{48, 16}));
}

// Dense attention through the module equals softmax(q k^T / sqrt(d)) v
// written with ops, and the fused projection equals separate ones holding
// the same weights.
TEST(MultiheadAttentionTest, DenseMatchesOpsAndFusedMatchesSeparate) {
  Generator gen = testing::TestGenerator();
  MultiheadAttentionOptions options = SmallOptions();
  auto mha = CreateMultiheadAttention("dense", options, gen);
  ASSERT_TRUE(mha.ok());
  options.fused_qkv = true;
  auto fused = CreateMultiheadAttention("dense", options, gen);
  ASSERT_TRUE(fused.ok());
  std::map<std::string, Tensor> state = (*mha)->StateDict();
  {
    NoGradGuard no_grad;
    std::map<std::string, Tensor> fused_state = (*fused)->StateDict();
    for (const char* part : {"weight", "bias"}) {
      Tensor dst = fused_state.at(absl::StrCat("qkv_proj.", part));
      int64_t row = 0;
      for (const char* proj : {"q_proj", "k_proj", "v_proj"}) {
        const Tensor& src = state.at(absl::StrCat(proj, ".", part));
        CopyInto(dst.slice(0, row, row + src.size(0)), src);
        row += src.size(0);
      }
    }
    CopyInto(fused_state.at("out_proj.weight"), state.at("out_proj.weight"));
    CopyInto(fused_state.at("out_proj.bias"), state.at("out_proj.bias"));
  }
  const int64_t b = 2, n = 9, h = 4, d = 4;
  Tensor x = Randn({b, n, 16}, gen, DType::kFloat64);
  Tensor y = (*mha)->Forward(x);
  testing::ExpectAllClose((*fused)->Forward(x), y,
                          testing::DefaultTolerance(DType::kFloat64), "fused");

  auto project = [&](const char* name) {
    return Linear(x, state.at(absl::StrCat(name, ".weight")),
                  state.at(absl::StrCat(name, ".bias")))
        .reshape({b, n, h, d})
        .permute({0, 2, 1, 3});  // [b, h, n, d]
  };
  Tensor q = project("q_proj"), k = project("k_proj"), v = project("v_proj");
  Tensor scores = MulScalar(Matmul(q, k, false, true), 1 / std::sqrt(d * 1.0));
  Tensor o =
      Matmul(Softmax(scores, -1), v).permute({0, 2, 1, 3}).reshape({b, n, 16});
  Tensor expected =
      Linear(o, state.at("out_proj.weight"), state.at("out_proj.bias"));
  testing::ExpectAllClose(y, expected,
                          testing::DefaultTolerance(DType::kFloat64), "dense");
}

TEST(MultiheadAttentionTest, InitGainScalesValueAndOutputProjections) {
  Generator gen(3);
  MultiheadAttentionOptions options = SmallOptions();
  options.embed_dim = 256;
  options.num_heads = 4;
  options.init_gain = 2.0;
  auto mha = CreateMultiheadAttention("dilated", options, gen);
  ASSERT_TRUE(mha.ok());
  auto stddev = [](const Tensor& t) {
    double s = 0;
    for (double x : t.ToVector()) s += x * x;
    return std::sqrt(s / t.numel());
  };
  const std::map<std::string, Tensor> state = (*mha)->StateDict();
  // Xavier normal: std = gain * sqrt(2 / (256 + 256)) = gain / 16. With
  // 65,536 draws the sample std is within 1% (standard error 0.28%).
  EXPECT_NEAR(stddev(state.at("q_proj.weight")), 1.0 / 16, 0.01 / 16);
  EXPECT_NEAR(stddev(state.at("v_proj.weight")), 2.0 / 16, 0.02 / 16);
  EXPECT_NEAR(stddev(state.at("out_proj.weight")), 2.0 / 16, 0.02 / 16);
  EXPECT_EQ(stddev(state.at("v_proj.bias")), 0.0);
}

TEST(MultiheadAttentionTest, DropoutOnlyWhileTraining) {
  Generator gen = testing::TestGenerator();
  MultiheadAttentionOptions options = SmallOptions();
  options.attention.dropout = 0.5;
  auto mha = CreateMultiheadAttention("dilated", options, gen);
  ASSERT_TRUE(mha.ok());
  Tensor x = Randn({1, 12, 16}, gen, DType::kFloat64);
  (*mha)->Eval();
  const std::vector<double> eval1 = (*mha)->Forward(x).ToVector();
  const std::vector<double> eval2 = (*mha)->Forward(x).ToVector();
  EXPECT_EQ(eval1, eval2);
  (*mha)->Train();
  EXPECT_NE((*mha)->Forward(x).ToVector(), eval1);
}

// The pattern the module's config describes for `heads` heads over n
// tokens, built from the options through the test's PatternSpec (for
// block-sparse types a non-empty segment list intersects the block mask).
AttentionPattern PatternOf(const AttentionConfig& config, int64_t heads,
                           int64_t n) {
  testing::PatternSpec spec;
  if (config.type == AttentionType::kDilated) spec.dilated = config.dilated;
  if (config.type == AttentionType::kBlockSparse) {
    spec.block_sparse = config.block_sparse;
    if (!config.dilated.segment_lengths.empty()) spec.dilated = config.dilated;
  }
  return testing::MakeAttentionCase("module", n, heads, spec).pattern;
}

// The module's forward written out with ops from its state dict (separate
// projections only): q, k, v projections (with bias when the module has
// one), heads split, rotary positions when given, Attention under the
// config's pattern with the padding mask, the sub-layer norm when the module
// has one, and the output projection.
Tensor ManualForward(const MultiheadDilatedAttention& mha, const Tensor& x,
                     const Tensor& key_padding_mask = Tensor(),
                     const Tensor& positions = Tensor()) {
  const MultiheadAttentionOptions& o = mha.options();
  const std::map<std::string, Tensor> state = mha.StateDict();
  auto param = [&](const std::string& name) {
    auto it = state.find(name);
    return it == state.end() ? Tensor() : it->second;
  };
  auto linear = [&](const Tensor& in, const std::string& name) {
    return Linear(in, param(name + ".weight"), param(name + ".bias"));
  };
  const int64_t b = x.size(0), n = x.size(1), e = o.embed_dim, h = o.num_heads;
  const Shape heads_shape = {b, n, h, e / h};
  Tensor q = linear(x, "q_proj").reshape(heads_shape);
  Tensor k = linear(x, "k_proj").reshape(heads_shape);
  const Tensor v = linear(x, "v_proj").reshape(heads_shape);
  if (positions.defined()) {
    q = ApplyRotary(q, positions, o.rope_base);
    k = ApplyRotary(k, positions, o.rope_base);
  }
  AttentionOptions options;
  options.causal = o.attention.causal;
  options.window_left = o.attention.window_left;
  options.window_right = o.attention.window_right;
  options.softcap = o.attention.softcap;
  options.scale = o.attention.scale;
  AttentionCallOptions call;
  call.key_padding_mask = key_padding_mask;
  Tensor out = Attention(q, k, v, PatternOf(o.attention, h, n), options, call)
                   .out.reshape({b, n, e});
  if (o.sub_layer_norm) {
    out = LayerNorm(out, param("sub_norm.weight"), param("sub_norm.bias"));
  }
  return linear(out, "out_proj");
}

// Overwrites every parameter of `mha` with fresh normal values (so biases
// and the sub-layer norm are not at their 0 / 1 init).
void RandomizeParameters(const MultiheadDilatedAttention& mha, Generator& gen) {
  NoGradGuard no_grad;
  for (const auto& [name, p] : mha.NamedParameters()) {
    CopyInto(p, Randn(p.shape(), gen, p.dtype()));
  }
}

// Every type that runs on one rank without a context, with and without
// biases and the sub-layer norm, causal and not, with and without a sliding
// window and soft-capping: the module equals the manual projections ->
// Attention -> (LayerNorm) -> out projection.
TEST(MultiheadAttentionTest, ForwardEqualsManualProjectionsAndAttention) {
  for (const char* type : {"dense", "dilated", "block_sparse"}) {
    for (bool bias : {true, false}) {
      for (bool sub_layer_norm : {false, true}) {
        for (bool causal : {false, true}) {
          for (bool windowed : {false, true}) {
            SCOPED_TRACE(absl::StrCat(type, bias ? " bias" : " no bias",
                                      sub_layer_norm ? " sub-LN" : "",
                                      causal ? " causal" : "",
                                      windowed ? " window, softcap" : ""));
            Generator gen = testing::TestGenerator();
            MultiheadAttentionOptions options = SmallOptions();
            options.bias = bias;
            options.sub_layer_norm = sub_layer_norm;
            options.attention.causal = causal;
            if (windowed) {
              options.attention.window_left = 3;
              options.attention.window_right = 1;
              options.attention.softcap = 0.7;
            }
            auto mha = CreateMultiheadAttention(type, options, gen);
            ASSERT_TRUE(mha.ok()) << mha.status();
            RandomizeParameters(**mha, gen);
            EXPECT_EQ((*mha)->StateDict().count("q_proj.bias"), bias ? 1u : 0u);
            const Tensor x = Randn({2, 21, 16}, gen, DType::kFloat64);
            testing::ExpectAllClose((*mha)->Forward(x), ManualForward(**mha, x),
                                    testing::DefaultTolerance(DType::kFloat64),
                                    "module vs manual");
          }
        }
      }
    }
  }
}

// The module keeps one attention plan while its inputs keep their shape and
// its mode, and makes a new one when they change: calls alternating between
// shapes, then in eval mode, each equal the manual forward (a stale plan
// would refuse the inputs or attend under the wrong length).
TEST(MultiheadAttentionTest, PlanFollowsTheInputsShapeAndMode) {
  for (const char* type : {"dilated", "block_sparse"}) {
    SCOPED_TRACE(type);
    Generator gen = testing::TestGenerator();
    MultiheadAttentionOptions options = SmallOptions();
    options.attention.causal = true;
    auto mha = CreateMultiheadAttention(type, options, gen);
    ASSERT_TRUE(mha.ok()) << mha.status();
    RandomizeParameters(**mha, gen);
    const Tensor a = Randn({2, 21, 16}, gen, DType::kFloat64);
    const Tensor b = Randn({1, 40, 16}, gen, DType::kFloat64);
    for (const Tensor* x : {&a, &a, &b, &a, &b}) {
      testing::ExpectAllClose((*mha)->Forward(*x), ManualForward(**mha, *x),
                              testing::DefaultTolerance(DType::kFloat64),
                              "module vs manual");
    }
    (*mha)->Eval();
    testing::ExpectAllClose((*mha)->Forward(b), ManualForward(**mha, b),
                            testing::DefaultTolerance(DType::kFloat64),
                            "eval after train");
  }
}

// sub_layer_norm: the output is out_proj(LayerNorm(o)) for the attention
// output o. With the output projection set to the identity and the norm to
// weight 1, bias 0, every output row is normalized: mean 0 and (biased)
// variance var / (var + eps) ~ 1, which no output without the norm would
// give; and the module equals the manual forward.
TEST(MultiheadAttentionTest, SubLayerNormNormalizesBeforeTheOutProjection) {
  Generator gen = testing::TestGenerator();
  MultiheadAttentionOptions options = SmallOptions();
  options.sub_layer_norm = true;
  auto mha = CreateMultiheadAttention("dilated", options, gen);
  ASSERT_TRUE(mha.ok()) << mha.status();
  RandomizeParameters(**mha, gen);
  std::map<std::string, Tensor> state = (*mha)->StateDict();
  {
    NoGradGuard no_grad;
    std::vector<double> identity(16 * 16, 0.0);
    for (int i = 0; i < 16; ++i) identity[i * 16 + i] = 1;
    CopyInto(state.at("out_proj.weight"),
             FromVector(identity, {16, 16}, DType::kFloat64));
    CopyInto(state.at("out_proj.bias"), Zeros({16}, DType::kFloat64));
    CopyInto(state.at("sub_norm.weight"), Ones({16}, DType::kFloat64));
    CopyInto(state.at("sub_norm.bias"), Zeros({16}, DType::kFloat64));
  }
  const Tensor x = Randn({2, 13, 16}, gen, DType::kFloat64);
  const std::vector<double> y = (*mha)->Forward(x).ToVector();
  // Each row of 16: mean 0, biased variance 1 - eps / (var + eps).
  for (size_t row = 0; row < y.size() / 16; ++row) {
    double mean = 0, var = 0;
    for (int c = 0; c < 16; ++c) mean += y[row * 16 + c] / 16;
    for (int c = 0; c < 16; ++c) {
      var += (y[row * 16 + c] - mean) * (y[row * 16 + c] - mean) / 16;
    }
    EXPECT_NEAR(mean, 0, 1e-12) << "row " << row;
    EXPECT_NEAR(var, 1, 1e-3) << "row " << row;  // eps 1e-5 / var
  }
  testing::ExpectAllClose((*mha)->Forward(x), ManualForward(**mha, x),
                          testing::DefaultTolerance(DType::kFloat64),
                          "module vs manual");
}

// A key padding mask passed to Forward reaches Attention: the module equals
// the manual forward with the mask; changing the input at padded positions
// leaves every other row unchanged; without the mask the change is visible.
TEST(MultiheadAttentionTest, KeyPaddingMaskThroughForward) {
  for (const char* type : {"dense", "dilated", "block_sparse"}) {
    SCOPED_TRACE(type);
    Generator gen = testing::TestGenerator();
    auto mha = CreateMultiheadAttention(type, SmallOptions(), gen);
    ASSERT_TRUE(mha.ok()) << mha.status();
    RandomizeParameters(**mha, gen);
    const int64_t b = 2, n = 19;
    std::vector<double> bits = Rand({b, n}, gen).ToVector();
    for (double& bit : bits) bit = bit < 0.3 ? 1 : 0;
    bits[0] = 0;  // key 0 is real in both sequences
    bits[n] = 0;
    bits[1] = 1;  // and key 1 padding
    const Tensor mask = FromVector(bits, {b, n}, DType::kUInt8);
    const Tensor x = Randn({b, n, 16}, gen, DType::kFloat64);
    const Tensor y = (*mha)->Forward(x, mask);
    testing::ExpectAllClose(y, ManualForward(**mha, x, mask),
                            testing::DefaultTolerance(DType::kFloat64),
                            "module vs manual with mask");
    std::vector<double> changed = x.ToVector();
    for (int64_t i = 0; i < b * n; ++i) {
      if (bits[i] == 0) continue;
      for (int c = 0; c < 16; ++c) changed[i * 16 + c] += 3.0 + c;
    }
    const Tensor x2 = FromVector(changed, x.shape(), DType::kFloat64);
    const std::vector<double> y1 = y.ToVector();
    const std::vector<double> y2 = (*mha)->Forward(x2, mask).ToVector();
    const std::vector<double> unmasked1 = (*mha)->Forward(x).ToVector();
    const std::vector<double> unmasked2 = (*mha)->Forward(x2).ToVector();
    double unmasked_change = 0;
    for (int64_t i = 0; i < b * n; ++i) {
      if (bits[i] != 0) continue;  // a padded query's own row may change
      for (int c = 0; c < 16; ++c) {
        EXPECT_NEAR(y1[i * 16 + c], y2[i * 16 + c], 1e-12)
            << "row " << i << " sees a padded token";
        unmasked_change =
            std::max(unmasked_change,
                     std::abs(unmasked1[i * 16 + c] - unmasked2[i * 16 + c]));
      }
    }
    EXPECT_GT(unmasked_change, 1e-3)
        << "without the mask the change must be visible";
  }
}

// Rotary positions given to Forward rotate q and k after the projections:
// the module equals the manual forward with ApplyRotary, positions that are
// not a constant shift change the output, and a constant shift does not
// (rotary attention depends on t - u only).
TEST(MultiheadAttentionTest, RotaryPositionsAtModuleLevel) {
  Generator gen = testing::TestGenerator();
  MultiheadAttentionOptions options = SmallOptions();
  options.attention.causal = true;
  auto mha = CreateMultiheadAttention("dilated", options, gen);
  ASSERT_TRUE(mha.ok()) << mha.status();
  RandomizeParameters(**mha, gen);
  const int64_t n = 21;
  const Tensor x = Randn({2, n, 16}, gen, DType::kFloat64);
  const Tensor positions = Arange(0, n, 1, DType::kInt64);
  const Tensor shifted = Arange(1000, 1000 + n, 1, DType::kInt64);
  const Tensor spread = Arange(0, 3 * n, 3, DType::kInt64);
  const testing::Tolerance tol = testing::DefaultTolerance(DType::kFloat64);
  const Tensor y = (*mha)->Forward(x, Tensor(), nullptr, positions);
  testing::ExpectAllClose(y, ManualForward(**mha, x, Tensor(), positions), tol,
                          "module vs manual with positions");
  testing::ExpectAllClose((*mha)->Forward(x, Tensor(), nullptr, spread),
                          ManualForward(**mha, x, Tensor(), spread), tol,
                          "module vs manual with spread positions");
  // Shifted by 1000: the same scores up to rounding of the angles.
  testing::ExpectAllClose((*mha)->Forward(x, Tensor(), nullptr, shifted), y,
                          {1e-9, 1e-9}, "constant shift");
  double differs = 0;
  const std::vector<double> a = y.ToVector(), c = (*mha)->Forward(x).ToVector();
  for (size_t i = 0; i < a.size(); ++i) {
    differs = std::max(differs, std::abs(a[i] - c[i]));
  }
  EXPECT_GT(differs, 1e-3) << "positions must change the output";
}

}  // namespace
}  // namespace lc
