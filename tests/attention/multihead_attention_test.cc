#include "attention/multihead_attention.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/autograd.h"
#include "distributed/thread_communicator.h"
#include "gtest/gtest.h"
#include "ops/elementwise.h"
#include "ops/linear.h"
#include "ops/matmul.h"
#include "ops/softmax.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

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

}  // namespace
}  // namespace lc
