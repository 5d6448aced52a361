#include "distributed/sequence_parallel.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/autograd.h"
#include "core/random.h"
#include "core/status.h"
#include "distributed/thread_communicator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/op_test_util.h"

namespace lc {
namespace {

using ::lc::testing::ExpectError;
using ::lc::testing::TestGenerator;
using ::testing::AllOf;
using ::testing::HasSubstr;

const SequenceLayout kLayouts[] = {SequenceLayout::kContiguous,
                                   SequenceLayout::kZigzag};

std::string Label(int64_t n, int k, SequenceLayout layout) {
  return absl::StrCat(SequenceLayoutName(layout), " n=", n, " k=", k);
}

TEST(ParseSequenceLayoutTest, ParsesBothNamesAndRejectsOthers) {
  EXPECT_EQ(*ParseSequenceLayout("contiguous"), SequenceLayout::kContiguous);
  EXPECT_EQ(*ParseSequenceLayout("zigzag"), SequenceLayout::kZigzag);
  const absl::StatusOr<SequenceLayout> bad = ParseSequenceLayout("striped");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(),
              AllOf(HasSubstr("\"striped\""), HasSubstr("\"zigzag\"")));
}

// Every position of [0, n) is held by exactly one rank; all chunks (the spans,
// empty ones included) differ in size by at most one, larger ones first; a
// zigzag rank r holds chunks r and 2k-1-r, in that order.
TEST(RankSpansTest, CoverTheSequenceOnceWithBalancedChunks) {
  for (SequenceLayout layout : kLayouts) {
    for (int k = 1; k <= 9; ++k) {
      for (int64_t n = 0; n <= 45; ++n) {
        SCOPED_TRACE(Label(n, k, layout));
        const int num_chunks = layout == SequenceLayout::kZigzag ? 2 * k : k;
        std::vector<PositionSpan> chunks(num_chunks);
        std::vector<int> owner(n, -1);
        for (int rank = 0; rank < k; ++rank) {
          const std::vector<PositionSpan> spans = RankSpans(n, k, rank, layout);
          ASSERT_EQ(spans.size(), layout == SequenceLayout::kZigzag ? 2u : 1u);
          chunks[rank] = spans[0];
          if (layout == SequenceLayout::kZigzag) {
            chunks[2 * k - 1 - rank] = spans[1];
          }
          int64_t count = 0;
          for (const PositionSpan& span : spans) {
            ASSERT_LE(0, span.begin);
            ASSERT_LE(span.begin, span.end);
            ASSERT_LE(span.end, n);
            count += span.size();
            for (int64_t t = span.begin; t < span.end; ++t) {
              EXPECT_EQ(owner[t], -1) << "position " << t << " held twice";
              owner[t] = rank;
            }
          }
          EXPECT_EQ(RankTokenCount(n, k, rank, layout), count);
        }
        for (int64_t t = 0; t < n; ++t) {
          EXPECT_NE(owner[t], -1) << "position " << t << " held by no rank";
        }
        // Chunk c starts where chunk c-1 ends; sizes are non-increasing and
        // within one of each other.
        int64_t expected_begin = 0;
        for (int c = 0; c < num_chunks; ++c) {
          EXPECT_EQ(chunks[c].begin, expected_begin) << "chunk " << c;
          expected_begin = chunks[c].end;
          if (c > 0) {
            EXPECT_LE(chunks[c].size(), chunks[c - 1].size()) << "chunk " << c;
          }
          EXPECT_LE(chunks[0].size() - chunks[c].size(), 1) << "chunk " << c;
        }
        EXPECT_EQ(expected_begin, n);
      }
    }
  }
}

TEST(RankSpansTest, ExamplesAndBadArguments) {
  // n = 10 over 2 ranks in zigzag: chunks [0,3) [3,6) [6,8) [8,10).
  const std::vector<PositionSpan> rank0 =
      RankSpans(10, 2, 0, SequenceLayout::kZigzag);
  const std::vector<PositionSpan> rank1 =
      RankSpans(10, 2, 1, SequenceLayout::kZigzag);
  EXPECT_EQ(rank0[0].begin, 0);
  EXPECT_EQ(rank0[0].end, 3);
  EXPECT_EQ(rank0[1].begin, 8);
  EXPECT_EQ(rank0[1].end, 10);
  EXPECT_EQ(rank1[0].begin, 3);
  EXPECT_EQ(rank1[0].end, 6);
  EXPECT_EQ(rank1[1].begin, 6);
  EXPECT_EQ(rank1[1].end, 8);
  ExpectError([] { RankSpans(-1, 2, 0, SequenceLayout::kContiguous); },
              {"n = -1", ">= 0"});
  ExpectError([] { RankSpans(8, 0, 0, SequenceLayout::kContiguous); },
              {"k = 0"});
  ExpectError([] { RankSpans(8, 4, 4, SequenceLayout::kZigzag); },
              {"rank 4", "0 <= rank < k = 4"});
}

// Sequence lengths to test for k ranks: not divisible by k (or 2k), shorter
// than k, shorter than 2k, and empty.
std::vector<int64_t> Lengths(int k) {
  std::vector<int64_t> lengths = {0, 1, 3, 2 * k - 1, 2 * k + 1, 4 * k + 3};
  std::sort(lengths.begin(), lengths.end());
  lengths.erase(std::unique(lengths.begin(), lengths.end()), lengths.end());
  return lengths;
}

TEST(SequenceParallelTest, SplitThenGatherRestoresTheSequence) {
  Generator gen = TestGenerator();
  for (SequenceLayout layout : kLayouts) {
    for (int k : {1, 2, 3, 4, 8}) {
      for (int64_t n : Lengths(k)) {
        SCOPED_TRACE(Label(n, k, layout));
        const Tensor x = Randn({2, n, 3, 2}, gen, DType::kFloat64);
        std::vector<Tensor> gathered(k);
        const absl::Status status = RunRanks(k, [&](Communicator& comm) {
          const Tensor local = SplitSequence(x, k, comm.rank(), layout);
          const int64_t count = RankTokenCount(n, k, comm.rank(), layout);
          if (local.shape() != Shape{2, count, 3, 2}) {
            return absl::InternalError(absl::StrCat(
                "rank ", comm.rank(), " got local ",
                ShapeToString(local.shape()), ", expected ", count, " tokens"));
          }
          LC_ASSIGN_OR_RETURN(gathered[comm.rank()],
                              GatherSequence(comm, local, n, layout));
          return absl::OkStatus();
        });
        ASSERT_TRUE(status.ok()) << status;
        for (int r = 0; r < k; ++r) {
          ASSERT_EQ(gathered[r].shape(), x.shape()) << "rank " << r;
          EXPECT_EQ(gathered[r].ToVector(), x.ToVector()) << "rank " << r;
        }
      }
    }
  }
}

TEST(SequenceParallelTest, SplitHoldsTheRanksPositionsInSpanOrder) {
  // x[0, t, 0] = t makes the positions visible.
  const Tensor x = Arange(0, 11, 1, DType::kFloat64).view({1, 11, 1});
  const Tensor local = SplitSequence(x, 3, 1, SequenceLayout::kZigzag);
  // 6 chunks of 11: [0,2) [2,4) [4,6) [6,8) [8,10) [10,11); rank 1 holds 1, 4.
  EXPECT_EQ(local.ToVector(), (std::vector<double>{2, 3, 8, 9}));
  ExpectError([] { SplitSequence(Zeros({5}), 2, 0, SequenceLayout::kZigzag); },
              {"SplitSequence", "[5]", "[batch, n, ...]"});
}

// The gradient of SplitSequence is the incoming gradient placed at the rank's
// positions, zero elsewhere.
TEST(SequenceParallelTest, SplitSequenceGradientScattersBack) {
  Generator gen = TestGenerator();
  for (SequenceLayout layout : kLayouts) {
    for (int k : {1, 3, 4}) {
      const int64_t n = 2 * k + 3;
      for (int rank = 0; rank < k; ++rank) {
        SCOPED_TRACE(Label(n, k, layout) + " rank " + std::to_string(rank));
        const Tensor x = Randn({2, n, 3}, gen, DType::kFloat64);
        x.set_requires_grad(true);
        const Tensor local = SplitSequence(x, k, rank, layout);
        const Tensor g = Randn(local.shape(), gen, DType::kFloat64);
        local.backward(g);
        const Tensor expected = Zeros(x.shape(), DType::kFloat64);
        int64_t offset = 0;
        for (const PositionSpan& span : RankSpans(n, k, rank, layout)) {
          CopyInto(expected.slice(1, span.begin, span.end),
                   g.slice(1, offset, offset + span.size()));
          offset += span.size();
        }
        ASSERT_TRUE(x.grad().defined());
        EXPECT_EQ(x.grad().ToVector(), expected.ToVector());
      }
    }
  }
}

TEST(SequenceParallelTest, GatherRejectsALocalOfTheWrongLength) {
  const absl::Status status = RunRanks(
      2,
      [](Communicator& comm) {
        // n = 7 over 2 contiguous ranks: 4 and 3 tokens; rank 1 passes 4.
        return GatherSequence(comm, Zeros({1, 4, 2}), 7,
                              SequenceLayout::kContiguous)
            .status();
      },
      [] {
        ThreadGroupOptions options;
        options.timeout = std::chrono::milliseconds(30000);
        return options;
      }());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(),
              AllOf(HasSubstr("rank 1: GatherSequence on rank 1"),
                    HasSubstr("[1, 4, 2]"),
                    HasSubstr("contiguous layout of n = 7 tokens over 2 "
                              "ranks gives this rank 3 tokens")));
}

// Parameters of every dtype, small (packed) and large (reduced in place),
// with the first parameter's gradient undefined on rank 1.
TEST(AllReduceGradientsTest, SumsEveryGradientOnEveryRank) {
  constexpr int kRanks = 3;
  Generator gen = TestGenerator();
  struct ParamSpec {
    Shape shape;
    DType dtype;
  };
  const std::vector<ParamSpec> specs = {
      {{3, 4}, DType::kFloat32},
      {{128, 160}, DType::kFloat32},  // 80 KiB: reduced in place
      {{5}, DType::kFloat64},
      {{7, 2}, DType::kBFloat16},
      {{6}, DType::kFloat32},
  };
  std::vector<std::vector<Tensor>> params(kRanks);
  std::vector<std::vector<double>> expected_sums(specs.size());
  for (int r = 0; r < kRanks; ++r) {
    for (size_t i = 0; i < specs.size(); ++i) {
      const Tensor p = Randn(specs[i].shape, gen, specs[i].dtype);
      p.set_requires_grad(true);
      const bool undefined = r == 1 && i == 0;
      std::vector<double> g(NumElements(specs[i].shape), 0.0);
      if (!undefined) {
        const Tensor grad = Randn(specs[i].shape, gen, specs[i].dtype);
        p.set_grad(grad);
        g = grad.ToVector();
      }
      std::vector<double>& sum = expected_sums[i];
      if (r == 0) {
        sum = g;
      } else {
        for (size_t j = 0; j < sum.size(); ++j) sum[j] += g[j];
      }
      params[r].push_back(p);
    }
  }
  std::vector<CommStats> stats(kRanks);
  const absl::Status status = RunRanks(kRanks, [&](Communicator& comm) {
    LC_RETURN_IF_ERROR(AllReduceGradients(comm, params[comm.rank()]));
    stats[comm.rank()] = comm.stats();
    return absl::OkStatus();
  });
  ASSERT_TRUE(status.ok()) << status;
  for (int r = 0; r < kRanks; ++r) {
    for (size_t i = 0; i < specs.size(); ++i) {
      SCOPED_TRACE(absl::StrCat("rank ", r, " parameter ", i));
      const Tensor grad = params[r][i].grad();
      ASSERT_TRUE(grad.defined());
      const Tensor expected =
          FromVector(expected_sums[i], specs[i].shape, specs[i].dtype);
      EXPECT_EQ(grad.dtype(), specs[i].dtype);
      EXPECT_EQ(grad.ToVector(), expected.ToVector());
    }
    // One collective for the large gradient and one per packed dtype
    // (float32, float64, bfloat16), each sent to 2 peers.
    EXPECT_EQ(stats[r].messages_sent, 4 * (kRanks - 1)) << "rank " << r;
  }
}

TEST(AllReduceGradientsTest, RejectsUndefinedAndIntegerParameters) {
  const std::vector<Tensor> undefined = {Zeros({2}), Tensor()};
  const std::vector<Tensor> integer = {Zeros({2}, DType::kInt64)};
  const absl::Status status = RunRanks(1, [&](Communicator& comm) {
    const absl::Status a = AllReduceGradients(comm, undefined);
    EXPECT_EQ(a.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(a.message(), HasSubstr("parameter 1 is an undefined tensor"));
    const absl::Status b = AllReduceGradients(comm, integer);
    EXPECT_EQ(b.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(b.message(), HasSubstr("parameter 0 has dtype int64"));
    return absl::OkStatus();
  });
  EXPECT_TRUE(status.ok()) << status;
}

}  // namespace
}  // namespace lc
