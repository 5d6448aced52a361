#include "core/random.h"

#include <cmath>
#include <cstdint>
#include <utility>

#include "core/philox.h"
#include "gtest/gtest.h"

namespace lc {
namespace {

// Known-answer vectors of Philox-4x32-10 from the Random123 distribution
// (kat_vectors): counter words c0..c3, key words k0, k1.
TEST(RandomTest, PhiloxMatchesRandom123KnownAnswers) {
  EXPECT_EQ(Philox(0, 0, 0),
            (std::array<uint32_t, 4>{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu,
                                     0x9b00dbd8u}));
  EXPECT_EQ(Philox(~0ull, ~0ull, ~0ull),
            (std::array<uint32_t, 4>{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u,
                                     0x6d5451fdu}));
  // counter = (243f6a88, 85a308d3, 13198a2e, 03707344),
  // key = (a4093822, 299f31d0).
  EXPECT_EQ(Philox(0x299f31d0a4093822ull, 0x0370734413198a2eull,
                   0x85a308d3243f6a88ull),
            (std::array<uint32_t, 4>{0xd16cfe09u, 0x94fdccebu, 0x5001e420u,
                                     0x24126ea1u}));
}

TEST(RandomTest, DrawsDependOnlyOnSeedOffsetAndIndex) {
  Generator a(42), b(42), c(43);
  Tensor x = Rand({3, 4}, a, DType::kFloat64);
  EXPECT_EQ(x.ToVector(), Rand({3, 4}, b, DType::kFloat64).ToVector());
  EXPECT_NE(x.ToVector(), Rand({3, 4}, c, DType::kFloat64).ToVector());
  // The second draw of a generator continues the stream at the next offset.
  EXPECT_EQ(a.offset(), 1u);
  Tensor y = Rand({5}, a);
  const std::vector<double> yv = y.ToVector();
  for (uint64_t i = 0; i < 5; ++i) {
    EXPECT_EQ(yv[i], UniformAt(42, 1, i)) << i;
  }
  // Element i does not depend on the shape of the draw.
  Generator d(42);
  const std::vector<double> flat = Rand({12}, d, DType::kFloat64).ToVector();
  EXPECT_EQ(flat, x.ToVector());
}

TEST(RandomTest, UniformAndNormalHaveTheRightMoments) {
  Generator gen(7);
  const int n = 200000;
  const std::vector<double> u = Rand({n}, gen, DType::kFloat64).ToVector();
  const std::vector<double> z = Randn({n}, gen, DType::kFloat64).ToVector();
  double su = 0, sz = 0, szz = 0;
  for (int i = 0; i < n; ++i) {
    ASSERT_GE(u[i], 0.0);
    ASSERT_LT(u[i], 1.0);
    ASSERT_TRUE(std::isfinite(z[i]));
    su += u[i];
    sz += z[i];
    szz += z[i] * z[i];
  }
  // Standard errors at n = 2e5: mean of U(0,1) 6.5e-4, mean of N(0,1)
  // 2.2e-3, variance 3.2e-3; the bounds are about 5 standard errors.
  EXPECT_NEAR(su / n, 0.5, 0.004);
  EXPECT_NEAR(sz / n, 0.0, 0.012);
  EXPECT_NEAR(szz / n, 1.0, 0.016);
}

// Attention dropout once drew pair (t, u) of stream s from element
// (s * n + t) * n + u, which wraps in 64 bits: with n = 2^31 stream 4 adds
// 4 n^2 = 2^64, with n = 2^32 stream 1 adds n^2 = 2^64, so those streams
// drew the same numbers as stream 0. Their counters now differ (the stream
// has its own word); stream 0 stays element t * n + u of a plain draw.
TEST(RandomTest, AttentionDropoutStreamsNeverShareADraw) {
  const uint64_t seed = 42, offset = 3;
  for (const auto& [n, stream] :
       {std::pair<uint64_t, uint64_t>{uint64_t{1} << 31, 4},
        {uint64_t{1} << 32, 1}}) {
    for (uint64_t t : {uint64_t{0}, uint64_t{5}, n - 1}) {
      for (uint64_t u : {uint64_t{0}, uint64_t{7}, n - 2}) {
        ASSERT_EQ((stream * n + t) * n + u, t * n + u) << "the old collision";
        const float other =
            AttentionDropoutUniform(seed, offset, stream, n, t, u);
        const float first = AttentionDropoutUniform(seed, offset, 0, n, t, u);
        EXPECT_NE(other, first) << "n " << n << " stream " << stream << " ("
                                << t << ", " << u << ")";
        EXPECT_EQ(first, UniformAt(seed, offset, t * n + u));
      }
    }
  }
}

TEST(RandomTest, RejectsIntegerDtypes) {
  Generator gen(1);
  EXPECT_THROW(Rand({2}, gen, DType::kInt64), Error);
}

}  // namespace
}  // namespace lc
