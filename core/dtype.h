// Element types of tensors: float32, float64 and bfloat16 (storage only;
// ops compute bfloat16 in float32) for values, int64 for indices (token ids,
// embedding and index_select) and uint8 for masks; with their sizes, names
// and C++ types.
#ifndef LONGCTX_CORE_DTYPE_H_
#define LONGCTX_CORE_DTYPE_H_

#include <cstdint>
#include <cstring>
#include <string>

namespace lc {

enum class DType : uint8_t { kFloat32, kFloat64, kBFloat16, kInt64, kUInt8 };

// Brain float: the top 16 bits of an IEEE float32. Conversion from float
// rounds to nearest even and keeps NaN a NaN.
struct bfloat16 {
  uint16_t bits = 0;

  bfloat16() = default;
  explicit bfloat16(float f) : bits(FromFloat(f)) {}
  explicit operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }

  static uint16_t FromFloat(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN.
    const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>((u + rounding) >> 16);
  }
};

// Bytes per element.
int64_t DTypeSize(DType dtype);

// Calls fn(T{}) with T the storage type of `dtype` (bfloat16 as its bits):
// for code that treats every dtype alike (fills, copies, conversions).
template <typename Fn>
void DispatchAll(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(float{});
    case DType::kFloat64:
      return fn(double{});
    case DType::kBFloat16:
      return fn(bfloat16{});
    case DType::kInt64:
      return fn(int64_t{});
    case DType::kUInt8:
      return fn(uint8_t{});
  }
}
// "float32", "float64", "bfloat16", "int64" or "uint8".
std::string DTypeName(DType dtype);
// Whether values of `dtype` are floating point (the dtypes ops differentiate).
inline bool IsFloating(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat64 ||
         dtype == DType::kBFloat16;
}

// The C++ type that stores one element of each dtype, and back.
template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kFloat32;
};
template <>
struct DTypeOf<double> {
  static constexpr DType value = DType::kFloat64;
};
template <>
struct DTypeOf<bfloat16> {
  static constexpr DType value = DType::kBFloat16;
};
template <>
struct DTypeOf<int64_t> {
  static constexpr DType value = DType::kInt64;
};
template <>
struct DTypeOf<uint8_t> {
  static constexpr DType value = DType::kUInt8;
};

// The dtype ops compute in for inputs of `dtype`: bfloat16 computes in
// float32, the others in themselves.
inline DType ComputeDType(DType dtype) {
  return dtype == DType::kBFloat16 ? DType::kFloat32 : dtype;
}

}  // namespace lc

#endif  // LONGCTX_CORE_DTYPE_H_
