#include "attention/ring_agreement.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status.h"

namespace lc {
namespace {

// 64-bit FNV-1a of a sequence of integers and bytes.
class Fingerprint {
 public:
  void Add(int64_t x) {
    for (int i = 0; i < 8; ++i) AddByte(static_cast<uint8_t>(x >> (8 * i)));
  }
  void AddBytes(const uint8_t* data, int64_t count) {
    for (int64_t i = 0; i < count; ++i) AddByte(data[i]);
  }
  int64_t value() const { return static_cast<int64_t>(hash_); }

 private:
  void AddByte(uint8_t byte) { hash_ = (hash_ ^ byte) * 1099511628211ull; }
  uint64_t hash_ = 14695981039346656037ull;
};

int64_t PatternFingerprint(const AttentionPattern& pattern) {
  Fingerprint f;
  f.Add(static_cast<int64_t>(pattern.head_patterns.size()));
  for (const std::vector<DilatedPattern>& head : pattern.head_patterns) {
    f.Add(static_cast<int64_t>(head.size()));
    for (const DilatedPattern& d : head) {
      f.Add(d.segment_length);
      f.Add(d.dilation_rate);
      f.Add(d.offset);
    }
  }
  return f.value();
}

int64_t BlockMaskFingerprint(const BlockMask* mask) {
  Fingerprint f;
  f.Add(mask != nullptr);
  if (mask != nullptr) {
    f.Add(mask->block_size());
    f.Add(mask->num_blocks());
    for (int64_t b : mask->row_begin()) f.Add(b);
    for (int32_t k : mask->keys()) f.Add(k);
  }
  return f.value();
}

int64_t PaddingFingerprint(const Tensor& padding) {
  Fingerprint f;
  f.Add(padding.defined());
  if (padding.defined()) {
    const Tensor host = padding.to(Device::Cpu());
    f.AddBytes(host.data<uint8_t>(), host.numel());
  }
  return f.value();
}

int64_t DoubleBits(double x) {
  int64_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

enum class FieldKind { kInteger, kDType, kLayout, kBool, kReal, kFingerprint };

// One value of a call that every rank must pass alike (or, when not
// `compared`, whose rank-0 value every rank takes).
struct Field {
  const char* name;
  FieldKind kind;
  int64_t value;
  bool compared = true;
};

std::string DescribeField(FieldKind kind, int64_t value) {
  switch (kind) {
    case FieldKind::kDType:
      return DTypeName(static_cast<DType>(value));
    case FieldKind::kLayout:
      return SequenceLayoutName(static_cast<SequenceLayout>(value));
    case FieldKind::kBool:
      return value != 0 ? "true" : "false";
    case FieldKind::kReal: {
      double x;
      std::memcpy(&x, &value, sizeof(x));
      return absl::StrCat(x);
    }
    case FieldKind::kFingerprint:
      return absl::StrCat("fingerprint ", absl::Hex(value, absl::kZeroPad16));
    case FieldKind::kInteger:
      break;
  }
  return absl::StrCat(value);
}

std::vector<Field> PlanFields(const AttentionProblem& p,
                              SequenceLayout layout) {
  return {
      {"batch", FieldKind::kInteger, p.batch},
      {"heads", FieldKind::kInteger, p.heads},
      {"head_dim", FieldKind::kInteger, p.head_dim},
      {"dtype", FieldKind::kDType, static_cast<int64_t>(p.dtype)},
      {"n", FieldKind::kInteger, p.n},
      {"layout", FieldKind::kLayout, static_cast<int64_t>(layout)},
      {"causal", FieldKind::kBool, p.plan.causal},
      {"pattern", FieldKind::kFingerprint, PatternFingerprint(p.pattern)},
      {"block mask", FieldKind::kFingerprint,
       BlockMaskFingerprint(p.pattern.block_mask.get())},
      {"scale", FieldKind::kReal, DoubleBits(p.scale)},
      {"dropout", FieldKind::kReal, DoubleBits(p.dropout)},
  };
}

std::vector<Field> CallFields(const AttentionCall& call) {
  return {
      {"dropout offset", FieldKind::kInteger,
       static_cast<int64_t>(call.dropout_offset)},
      {"key_padding_mask", FieldKind::kFingerprint,
       PaddingFingerprint(call.key_padding)},
      // Each rank's generator has its own seed (a trainer seeds every rank's
      // thread apart, for the dropout of its own tokens); the ring draws
      // rank 0's stream.
      {"dropout seed", FieldKind::kInteger,
       static_cast<int64_t>(call.dropout_seed), /*compared=*/false},
  };
}

// Gathers every rank's `fields` and throws lc::Error (InvalidArgument, on
// every rank alike) naming the first compared field on which the ranks
// disagree and each rank's value; a failed gather aborts the group and
// throws. Returns rank 0's values.
std::vector<int64_t> CheckRanksAgree(Communicator& comm,
                                     const std::vector<Field>& fields,
                                     Device device) {
  const int size = comm.size();
  const auto count = static_cast<int64_t>(fields.size());
  Tensor mine = Empty({count}, DType::kInt64);
  for (int64_t i = 0; i < count; ++i) {
    mine.data<int64_t>()[i] = fields[i].value;
  }
  const Tensor all = Empty({size, count}, DType::kInt64, device);
  const absl::Status gathered = comm.AllGather(mine.to(device), all);
  if (!gathered.ok()) {
    comm.Abort(gathered);
    throw Error(absl::Status(gathered.code(),
                             absl::StrCat("RingAttention on rank ", comm.rank(),
                                          ": ", gathered.message())));
  }
  const Tensor host = all.to(Device::Cpu());
  const int64_t* values = host.data<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    if (!fields[i].compared) continue;
    // Ranks grouped by their value, in order of first appearance.
    std::vector<std::pair<int64_t, std::vector<int>>> groups;
    for (int r = 0; r < size; ++r) {
      const int64_t value = values[r * count + i];
      auto it = std::find_if(groups.begin(), groups.end(),
                             [&](const auto& g) { return g.first == value; });
      if (it == groups.end()) {
        groups.push_back({value, {r}});
      } else {
        it->second.push_back(r);
      }
    }
    if (groups.size() == 1) continue;
    std::string detail;
    for (const auto& [value, ranks] : groups) {
      absl::StrAppend(&detail, detail.empty() ? "" : "; ",
                      DescribeField(fields[i].kind, value), " on rank",
                      ranks.size() > 1 ? "s " : " ",
                      absl::StrJoin(ranks, ", "));
    }
    throw Error(absl::InvalidArgumentError(absl::StrCat(
        "RingAttention on rank ", comm.rank(), ": the ranks disagree on ",
        fields[i].name, " (", detail,
        "); every rank must pass the same shapes (but for its own tokens), "
        "dtype, n, layout, pattern and options")));
  }
  return std::vector<int64_t>(values, values + count);
}

}  // namespace

void CheckRingPlanAgreement(Communicator& comm, const AttentionProblem& p,
                            SequenceLayout layout) {
  if (comm.size() > 1) CheckRanksAgree(comm, PlanFields(p, layout), p.device);
}

uint64_t CheckRingCallAgreement(Communicator& comm, const AttentionProblem& p,
                                const AttentionCall& call) {
  if (comm.size() == 1) return call.dropout_seed;
  const std::vector<Field> fields = CallFields(call);
  const std::vector<int64_t> first = CheckRanksAgree(comm, fields, p.device);
  const size_t seed_at =
      std::find_if(fields.begin(), fields.end(),
                   [](const Field& f) {
                     return std::strcmp(f.name, "dropout seed") == 0;
                   }) -
      fields.begin();
  return static_cast<uint64_t>(first[seed_at]);
}

}  // namespace lc
