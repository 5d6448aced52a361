// SameKeys, the check behind whether a ring chunk's gradient accumulators
// travel on (issue 15, defect 6): equal row counts of one layout form mean
// equal keys, however the spans are cut, and equal counts of different keys
// abort instead of being taken for the same keys.
#include <vector>

#include "attention/attention_kernel.h"
#include "gtest/gtest.h"

namespace lc {
namespace {

// A packed layout of one head holding `spans` (rows counted from them).
TokenLayout Packed(const std::vector<LocalSpan>& spans) {
  TokenLayout layout;
  layout.head_spans = {spans};
  layout.head_row = {0};
  for (const LocalSpan& s : spans) {
    layout.rows += (s.end - s.begin + s.step - 1) / s.step;
  }
  return layout;
}

TEST(TokenLayoutTest, SameKeysIgnoresHowTheSpansAreCut) {
  // Positions 0, 2, 4, 6, 8 of pattern 0, as one span, with another end,
  // and in two pieces.
  const TokenLayout whole = Packed({{0, 10, 0, 2, 0}});
  EXPECT_TRUE(SameKeys(whole, Packed({{0, 9, 0, 2, 0}})));
  EXPECT_TRUE(SameKeys(whole, Packed({{0, 4, 0, 2, 0}, {4, 10, 2, 2, 0}})));
  // Fewer keys: not the same, and nothing to check.
  EXPECT_FALSE(SameKeys(whole, Packed({{0, 8, 0, 2, 0}})));
  // The unpacked form is never the packed one.
  EXPECT_FALSE(SameKeys(TokenLayoutOf({{0, 5}}), Packed({{0, 5, 0, 1, -1}})));
  EXPECT_TRUE(SameKeys(TokenLayoutOf({{0, 5}}), TokenLayoutOf({{0, 5}})));
}

TEST(TokenLayoutDeathTest, EqualCountsOfOtherKeysAbort) {
  // Positions 1, 3, 5, 7, 9: as many rows as 0, 2, ..., 8, but not a subset
  // of them, which no later layout of a trip may be.
  EXPECT_DEATH(SameKeys(Packed({{0, 10, 0, 2, 0}}), Packed({{1, 11, 0, 2, 0}})),
               "different keys");
  // The same positions under another pattern are other keys too.
  EXPECT_DEATH(SameKeys(Packed({{0, 10, 0, 2, 0}}), Packed({{0, 10, 0, 2, 1}})),
               "different keys");
}

}  // namespace
}  // namespace lc
