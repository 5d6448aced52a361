// The tensor-core policies' two products on one tile (attention_sm90_probe.h)
// against float64 products of the same bfloat16 inputs: the first step of
// the Hopper kernels, checked on its own so that a shared-memory layout or
// wgmma descriptor error is found here, not through a whole attention call.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "attention/attention_sm90_probe.h"
#include "core/cuda.h"
#include "core/tensor.h"
#include "gtest/gtest.h"
#include "tests/cuda/cuda_test_util.h"

namespace lc {
namespace {

// c = a b^T and o = bf16(p) v in float64 from the (bfloat16-valued) inputs;
// a: [128, d], b and v: [64, d], p: [128, 64] (rounded to bfloat16 first,
// as the probe rounds it).
void Reference(const std::vector<double>& a, const std::vector<double>& b,
               const std::vector<double>& p, const std::vector<double>& v,
               int64_t d, std::vector<double>* c, std::vector<double>* o) {
  c->assign(128 * 64, 0.0);
  o->assign(128 * d, 0.0);
  for (int64_t i = 0; i < 128; ++i) {
    for (int64_t j = 0; j < 64; ++j) {
      for (int64_t k = 0; k < d; ++k) {
        (*c)[i * 64 + j] += a[i * d + k] * b[j * d + k];
        (*o)[i * d + k] += p[i * 64 + j] * v[j * d + k];
      }
    }
  }
}

class TensorCoreTileTest : public CudaTest {
 protected:
  void SetUp() override {
    CudaTest::SetUp();
    if (IsSkipped()) return;
    cudaDeviceProp prop;
    ASSERT_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
    if (prop.major != 9 || prop.minor != 0) {
      GTEST_SKIP() << "the probe is built for sm_90a; this GPU is "
                   << prop.major << "." << prop.minor;
    }
  }
};

// Products of at most 128 terms of bfloat16 values accumulated in float32:
// 1e-5 relative to the product's norm covers float32 accumulation; the
// inputs are exact in both (bfloat16 values, float64 reference).
constexpr double kTolerance = 1e-5;

TEST_F(TensorCoreTileTest, BothPoliciesMatchFloat64OnOneTile) {
  const Device gpu = Device::Cuda(0);
  for (TensorCorePolicy policy :
       {TensorCorePolicy::kMmaSync, TensorCorePolicy::kWgmma}) {
    for (int64_t d : {64, 128}) {
      const std::string what =
          std::string(policy == TensorCorePolicy::kWgmma ? "wgmma"
                                                         : "mma.sync") +
          " d" + std::to_string(d);
      SCOPED_TRACE(what);
      const uint64_t seed = SeedOfCase(what);
      const Tensor a = RandomNormal({128, d}, DType::kBFloat16, gpu, seed);
      const Tensor b = RandomNormal({64, d}, DType::kBFloat16, gpu, seed + 1);
      const Tensor v = RandomNormal({64, d}, DType::kBFloat16, gpu, seed + 2);
      // p rounded to bfloat16 up front, so the reference sees what the
      // probe multiplies.
      const Tensor p = RandomNormal({128, 64}, DType::kBFloat16, gpu, seed + 3)
                           .to(DType::kFloat32);
      // Poisoned outputs: every element must be written.
      const Tensor c = Full({128, 64}, std::nan(""), DType::kFloat32, gpu);
      const Tensor o = Full({128, d}, std::nan(""), DType::kFloat32, gpu);
      RunTensorCoreTileProbe(policy, static_cast<int>(d), a.raw_data(),
                             b.raw_data(), p.raw_data(), v.raw_data(),
                             c.raw_data(), o.raw_data());
      auto host = [](const Tensor& t) {
        return t.to(Device::Cpu()).to(DType::kFloat64);
      };
      std::vector<double> want_c, want_o;
      Reference(host(a).ToVector(), host(b).ToVector(), host(p).ToVector(),
                host(v).ToVector(), d, &want_c, &want_o);
      ExpectCudaClose(c, FromVector(want_c, {128, 64}, DType::kFloat64),
                      kTolerance, what + " c = a b^T");
      ExpectCudaClose(o, FromVector(want_o, {128, d}, DType::kFloat64),
                      kTolerance, what + " o = p v");
    }
  }
}

}  // namespace
}  // namespace lc
