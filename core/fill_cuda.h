// Fills a dense CUDA buffer with one value (the CUDA twin of the CPU fill in
// tensor.cc's Full).
#ifndef LONGCTX_CORE_FILL_CUDA_H_
#define LONGCTX_CORE_FILL_CUDA_H_

#include <cstdint>

#include "core/dtype.h"

namespace lc {

// data: `numel` elements of `dtype` on the current CUDA device. Throws
// lc::Error if the launch fails.
void FillCuda(void* data, DType dtype, int64_t numel, double value);

}  // namespace lc

#endif  // LONGCTX_CORE_FILL_CUDA_H_
