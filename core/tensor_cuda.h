// The CUDA kernels behind the core tensor functions (core/tensor.cc and
// core/random.cc): fill, arange, uniform draws, a strided copy that converts
// between any two dtypes, and in-place accumulation. Each function works on
// buffers of CUDA device `device`, queues its work on
// CurrentCudaStream(device) and throws lc::Error when a launch fails.
// Element conversions are the CPU's (core/tensor.cc): to bfloat16 through
// float32 with round-to-nearest-even (NaN becomes 0x7fc0), float to integer
// truncating, so a CUDA result equals the CPU's bit for bit.
#ifndef LONGCTX_CORE_TENSOR_CUDA_H_
#define LONGCTX_CORE_TENSOR_CUDA_H_

#include <cstdint>

#include "core/dtype.h"
#include "core/shape.h"

namespace lc {

// data: `numel` dense elements of `dtype`, each set to `value` converted to
// `dtype`.
void FillCuda(int device, void* data, DType dtype, int64_t numel, double value);

// data[i] = start + i * step for i < numel, in float64 with one rounding per
// operation (no fused multiply-add, like the CPU loop), converted to `dtype`.
void ArangeCuda(int device, void* data, DType dtype, int64_t numel,
                double start, double step);

// data[i] = PhiloxUniform(seed, offset, i) (core/philox.h) converted to
// `dtype`, a floating dtype, for i < numel: the elements of the CPU's Rand.
void UniformCuda(int device, void* data, DType dtype, int64_t numel,
                 uint64_t seed, uint64_t offset);

// dst[index] = src[index] converted from `src_dtype` to `dst_dtype` for
// every index of `shape`; dst and src point at each operand's first element
// and their strides (in elements, one per dim of `shape`) may be anything,
// e.g. transposed or dilated views. At most 8 dims after merging the dims
// that are contiguous in both operands, else lc::Error. dst must not overlap
// src.
void StridedCopyCuda(int device, const Shape& shape, void* dst, DType dst_dtype,
                     const Shape& dst_strides, const void* src, DType src_dtype,
                     const Shape& src_strides);

// dst[index] += src[index] for every index of `shape`, both of `dtype` (a
// floating dtype: bfloat16 adds in float32) and strided like in
// StridedCopyCuda.
void AddInPlaceCuda(int device, const Shape& shape, DType dtype, void* dst,
                    const Shape& dst_strides, const void* src,
                    const Shape& src_strides);

}  // namespace lc

#endif  // LONGCTX_CORE_TENSOR_CUDA_H_
