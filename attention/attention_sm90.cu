// The tensor-core kernels (attention_tensor_core.cuh) on Hopper's policy
// (attention_sm90.cuh), instantiated here: the only file built for sm_90a,
// so that the wgmma instructions reach no other target. attention_cuda.cu
// launches them on compute capability 9.0 devices.
#include "attention/attention_sm90.cuh"
#include "attention/attention_tensor_core.cuh"

namespace lc {
namespace attention_cuda {

LC_TENSOR_CORE_LAUNCHERS(, Wgmma, 64, float)
LC_TENSOR_CORE_LAUNCHERS(, Wgmma, 64, bf16)
LC_TENSOR_CORE_LAUNCHERS(, Wgmma, 128, float)
LC_TENSOR_CORE_LAUNCHERS(, Wgmma, 128, bf16)

}  // namespace attention_cuda
}  // namespace lc
