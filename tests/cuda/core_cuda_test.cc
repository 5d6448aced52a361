// GPU checks of the core's CUDA path: the caching allocator (reuse per
// stream, RecordStream, emptying, statistics, out-of-memory, threads),
// streams, events and pinned buffers, and the tensor functions on CUDA
// (fill, strided copies between every dtype pair, conversions, AddInPlace,
// Arange, Rand) against the CPU, bit for bit where the CPU's conversions are
// reproduced exactly. Each test skips itself when no CUDA device is present;
// with LC_REQUIRE_GPU=1 in the environment (the device runs set it) a missing
// GPU is a failure instead of a skip.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda.h"
#include "core/random.h"
#include "core/status.h"
#include "core/tensor.h"
#include "core/tensor_cuda.h"
#include "gtest/gtest.h"
#include "tests/cuda/cuda_test_util.h"

namespace lc {
namespace {

const Device kCuda = Device::Cuda(0);
constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat64,
                                DType::kBFloat16, DType::kInt64, DType::kUInt8};

// Starts a test from an empty cache with zeroed counts; blocks of tensors
// other tests keep alive stay reserved.
CudaCacheStats FreshCache() {
  SynchronizeCudaStream(0);
  EmptyCudaCache();
  ResetCudaCachingAllocatorStats(0);
  const CudaCacheStats stats = CudaCachingAllocatorStats(0);
  EXPECT_EQ(stats.cached_bytes, 0);
  return stats;
}

// `bytes` bytes on cuda:0 as a uint8 tensor.
Tensor Bytes(int64_t bytes) { return Empty({bytes}, DType::kUInt8, kCuda); }

// Values in [0, 247.3) with fractions: in range for every dtype (uint8
// included, so float-to-integer conversions are defined in C++ and truncate
// alike on both sides) and mostly not representable in bfloat16.
std::vector<double> TestValues(int64_t n) {
  std::vector<double> values(n);
  for (int64_t i = 0; i < n; ++i) values[i] = (i * 37 % 1000) * 0.2473;
  return values;
}

std::string Message(const Error& e) {
  return std::string(e.status().message());
}

// ---- The caching allocator ----

TEST_F(CudaTest, FreedBlockIsReusedOnTheSameStream) {
  const CudaCacheStats base = FreshCache();
  void* first = nullptr;
  {
    Tensor t = Empty({250}, DType::kFloat32, kCuda);  // 1000 bytes -> 1024
    first = t.raw_data();
  }
  CudaCacheStats stats = CudaCachingAllocatorStats(0);
  EXPECT_EQ(stats.cuda_mallocs, 1);
  EXPECT_EQ(stats.cache_hits, 0);
  EXPECT_EQ(stats.cached_bytes, 1024);
  EXPECT_EQ(stats.reserved_bytes, base.reserved_bytes + 1024);
  Tensor again = Empty({250}, DType::kFloat32, kCuda);
  EXPECT_EQ(again.raw_data(), first);
  stats = CudaCachingAllocatorStats(0);
  EXPECT_EQ(stats.cuda_mallocs, 1);
  EXPECT_EQ(stats.cache_hits, 1);
  EXPECT_EQ(stats.cached_bytes, 0);
}

TEST_F(CudaTest, CachedBlockServesOnlyRequestsAtMostAQuarterSmaller) {
  FreshCache();
  void* block = nullptr;
  {
    Tensor t = Bytes(5 << 20);  // class 6 MiB
    block = t.raw_data();
  }
  {
    Tensor t = Bytes((4 << 20) + 1);  // class 6 MiB: the same block
    EXPECT_EQ(t.raw_data(), block);
  }
  {
    // Class 2 MiB: the 6 MiB block is more than 25% larger, so a new one.
    Tensor t = Bytes(2 << 20);
    EXPECT_NE(t.raw_data(), block);
  }
  const CudaCacheStats stats = CudaCachingAllocatorStats(0);
  EXPECT_EQ(stats.cuda_mallocs, 2);
  EXPECT_EQ(stats.cache_hits, 1);
  EXPECT_EQ(stats.cached_bytes, (6 << 20) + (2 << 20));
}

TEST_F(CudaTest, StatisticsAreExactForKnownSizes) {
  const CudaCacheStats base = FreshCache();
  const int64_t tensor_bytes_before = DeviceMemoryStats(kCuda).current_bytes;
  // Request -> size class: up to 1 MiB in 512-byte steps (at least 512),
  // beyond in 2 MiB steps.
  const std::vector<std::pair<int64_t, int64_t>> sizes = {
      {0, 512},
      {1, 512},
      {1000, 1024},
      {1 << 20, 1 << 20},
      {(1 << 20) + 1, 2 << 20},
      {(3 << 20) + 5, 4 << 20}};
  int64_t requested = 0, reserved = 0;
  {
    std::vector<Tensor> live;
    std::vector<void*> pointers;
    for (const auto& [request, size_class] : sizes) {
      live.push_back(Bytes(request));
      pointers.push_back(live.back().raw_data());
      requested += request;
      reserved += size_class;
      const CudaCacheStats stats = CudaCachingAllocatorStats(0);
      EXPECT_EQ(stats.reserved_bytes, base.reserved_bytes + reserved)
          << request << " bytes";
    }
    // Zero-byte tensors get blocks of their own too.
    std::sort(pointers.begin(), pointers.end());
    EXPECT_EQ(std::unique(pointers.begin(), pointers.end()), pointers.end());
    EXPECT_EQ(DeviceMemoryStats(kCuda).current_bytes,
              tensor_bytes_before + requested);
    EXPECT_EQ(live[0].ToVector(), std::vector<double>());
  }
  CudaCacheStats stats = CudaCachingAllocatorStats(0);
  EXPECT_EQ(stats.cuda_mallocs, static_cast<int64_t>(sizes.size()));
  EXPECT_EQ(stats.cached_bytes, reserved);
  EXPECT_EQ(stats.peak_reserved_bytes, base.reserved_bytes + reserved);
  EXPECT_EQ(DeviceMemoryStats(kCuda).current_bytes, tensor_bytes_before);

  EmptyCudaCache();
  stats = CudaCachingAllocatorStats(0);
  EXPECT_EQ(stats.cached_bytes, 0);
  EXPECT_EQ(stats.reserved_bytes, base.reserved_bytes);
  ResetCudaCachingAllocatorStats(0);
  stats = CudaCachingAllocatorStats(0);
  EXPECT_EQ(stats.cuda_mallocs, 0);
  EXPECT_EQ(stats.peak_reserved_bytes, base.reserved_bytes);
}

TEST_F(CudaTest, BlocksAreNotReusedAcrossStreams) {
  FreshCache();
  void* first = nullptr;
  {
    Tensor t = Bytes(1000);
    first = t.raw_data();
  }
  CudaStream other(0);
  {
    CudaStreamGuard guard(0, other.get());
    Tensor t = Bytes(1000);
    EXPECT_NE(t.raw_data(), first);
  }
  CudaCacheStats stats = CudaCachingAllocatorStats(0);
  EXPECT_EQ(stats.cuda_mallocs, 2);
  EXPECT_EQ(stats.cache_hits, 0);
  // Back on this thread's stream, its own block comes back.
  Tensor t = Bytes(1000);
  EXPECT_EQ(t.raw_data(), first);
  EXPECT_EQ(CudaCachingAllocatorStats(0).cache_hits, 1);
}

TEST_F(CudaTest, BlockFreedOnAnotherThreadReturnsToItsStream) {
  FreshCache();
  Tensor t = Bytes(3000);
  void* first = t.raw_data();
  std::thread other([owned = std::move(t)]() mutable { owned = Tensor(); });
  other.join();
  Tensor again = Bytes(3000);
  EXPECT_EQ(again.raw_data(), first);
  EXPECT_EQ(CudaCachingAllocatorStats(0).cache_hits, 1);
}

// A host function that holds up its stream until *gate is set (or 10 s
// passed, so a broken test fails instead of hanging).
void CUDART_CB WaitForGate(void* gate) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!static_cast<std::atomic<bool>*>(gate)->load() &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

TEST_F(CudaTest, RecordStreamDelaysReuseUntilTheStreamIsDone) {
  FreshCache();
  std::atomic<bool> gate{false};
  CudaStream side(0);
  // Opens the gate however the test ends, before `side` synchronizes.
  struct OpenAtExit {
    std::atomic<bool>* gate;
    ~OpenAtExit() { *gate = true; }
  } open_at_exit{&gate};
  LC_CUDA_CHECK(cudaLaunchHostFunc(side.get(), WaitForGate, &gate));

  void* first = nullptr;
  {
    Tensor t = Bytes(1 << 20);
    first = t.raw_data();
    RecordStream(*t.storage(), side.get());
    RecordStream(*t.storage(), side.get());  // recording twice is harmless
  }
  // The free waits for `side`, which is held up: a new block.
  Tensor while_busy = Bytes(1 << 20);
  EXPECT_NE(while_busy.raw_data(), first);
  EXPECT_EQ(CudaCachingAllocatorStats(0).cache_hits, 0);
  EXPECT_EQ(CudaCachingAllocatorStats(0).cached_bytes, 1 << 20);

  gate = true;
  LC_CUDA_CHECK(cudaStreamSynchronize(side.get()));
  Tensor after = Bytes(1 << 20);
  EXPECT_EQ(after.raw_data(), first);
  EXPECT_EQ(CudaCachingAllocatorStats(0).cache_hits, 1);
  EXPECT_EQ(CudaCachingAllocatorStats(0).cuda_mallocs, 2);
}

TEST_F(CudaTest, RecordStreamRejectsHostStorage) {
  Tensor host = Zeros({4});
  CudaStream side(0);
  EXPECT_THROW(RecordStream(*host.storage(), side.get()), Error);
}

TEST_F(CudaTest, ImpossibleAllocationRetriesOnceThenNamesTheSize) {
  FreshCache();
  { Tensor cached = Bytes(4096); }  // released by the retry
  try {
    Empty({int64_t{1} << 50}, DType::kFloat32, kCuda);
    ADD_FAILURE() << "expected an out-of-memory error";
  } catch (const Error& e) {
    EXPECT_EQ(e.status().code(), absl::StatusCode::kResourceExhausted);
    const std::string message = Message(e);
    EXPECT_NE(message.find("4503599627370496 bytes"), std::string::npos)
        << message;
    EXPECT_NE(message.find("cuda:0"), std::string::npos) << message;
    EXPECT_NE(message.find("reserved"), std::string::npos) << message;
    EXPECT_NE(message.find("4096 were cached"), std::string::npos) << message;
  }
  const CudaCacheStats stats = CudaCachingAllocatorStats(0);
  EXPECT_EQ(stats.oom_retries, 1);
  EXPECT_EQ(stats.cached_bytes, 0);
  // The device is usable afterwards.
  EXPECT_EQ(Full({3}, 2.0, DType::kFloat32, kCuda).ToVector(),
            std::vector<double>({2, 2, 2}));
}

TEST_F(CudaTest, AllocatorServesManyThreadsFreeingEachOthersTensors) {
  const CudaCacheStats base = FreshCache();
  const int64_t tensor_bytes_before = DeviceMemoryStats(kCuda).current_bytes;
  constexpr int kThreads = 8, kIterations = 100, kSlots = 8;
  std::mutex mu;
  std::vector<Tensor> mailbox(kSlots);
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int id = 0; id < kThreads; ++id) {
    threads.emplace_back([&, id] {
      for (int it = 0; it < kIterations; ++it) {
        const int64_t n = 1 + (it * 7919 + id * 104729) % 400000;
        Tensor t = Full({n}, id, DType::kFloat32, kCuda);
        if (t.at({0}) != id || t.at({n - 1}) != id) ++wrong;
        {
          std::lock_guard<std::mutex> lock(mu);
          std::swap(mailbox[(id + it) % kSlots], t);
        }
        // `t` now holds another thread's tensor (or none): freed here.
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  mailbox.clear();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(DeviceMemoryStats(kCuda).current_bytes, tensor_bytes_before);
  const CudaCacheStats stats = CudaCachingAllocatorStats(0);
  EXPECT_EQ(stats.reserved_bytes - stats.cached_bytes, base.reserved_bytes);
  EXPECT_GT(stats.cache_hits, 0);
  EmptyCudaCache();
  EXPECT_EQ(CudaCachingAllocatorStats(0).reserved_bytes, base.reserved_bytes);
}

// ---- Streams, events, pinned buffers ----

TEST_F(CudaTest, EachThreadHasItsOwnStream) {
  const cudaStream_t mine = CurrentCudaStream(0);
  EXPECT_EQ(CurrentCudaStream(0), mine);
  cudaStream_t theirs = nullptr;
  std::thread other([&] { theirs = CurrentCudaStream(0); });
  other.join();
  EXPECT_NE(theirs, nullptr);
  EXPECT_NE(theirs, mine);
  EXPECT_NE(mine, nullptr);  // never the legacy default stream
}

TEST_F(CudaTest, StreamGuardsNestAndRestore) {
  const cudaStream_t own = CurrentCudaStream(0);
  CudaStream a(0), b(0);
  {
    CudaStreamGuard outer(0, a.get());
    EXPECT_EQ(CurrentCudaStream(0), a.get());
    {
      CudaStreamGuard inner(0, b.get());
      EXPECT_EQ(CurrentCudaStream(0), b.get());
      // Kernels follow the guard: a fill on `b`, read after syncing `b`.
      Tensor t = Full({1000}, 7.0, DType::kFloat32, kCuda);
      LC_CUDA_CHECK(cudaStreamSynchronize(b.get()));
      EXPECT_EQ(t.at({999}), 7.0);
    }
    EXPECT_EQ(CurrentCudaStream(0), a.get());
    {
      // A guard to the legacy default stream (null) restores too.
      CudaStreamGuard to_null(0, nullptr);
      EXPECT_EQ(CurrentCudaStream(0), nullptr);
    }
    EXPECT_EQ(CurrentCudaStream(0), a.get());
  }
  EXPECT_EQ(CurrentCudaStream(0), own);
}

TEST_F(CudaTest, EventsTimeWorkOnAStream) {
  const cudaStream_t stream = CurrentCudaStream(0);
  CudaEvent start(0), stop(0);
  start.Record(stream);
  Tensor t = Full({int64_t{1} << 26}, 1.0, DType::kFloat32, kCuda);
  stop.Record(stream);
  stop.Synchronize();
  EXPECT_TRUE(stop.Done());
  EXPECT_GT(stop.ElapsedMsSince(start), 0.0f);
  // Another stream can wait for the event on the device.
  CudaStream other(0);
  stop.Wait(other.get());
  LC_CUDA_CHECK(cudaStreamSynchronize(other.get()));
}

TEST_F(CudaTest, PinnedBuffersRoundTripAsynchronously) {
  constexpr int64_t kCount = 100003;
  PinnedBuffer in(kCount * 4), out(kCount * 4);
  float* host_in = static_cast<float*>(in.data());
  for (int64_t i = 0; i < kCount; ++i) host_in[i] = 0.5f * i - 7;
  const cudaStream_t stream = CurrentCudaStream(0);
  Tensor device = Empty({kCount}, DType::kFloat32, kCuda);
  LC_CUDA_CHECK(cudaMemcpyAsync(device.raw_data(), in.data(), kCount * 4,
                                cudaMemcpyHostToDevice, stream));
  AddInPlace(device, device);  // doubles, on the same stream
  LC_CUDA_CHECK(cudaMemcpyAsync(out.data(), device.raw_data(), kCount * 4,
                                cudaMemcpyDeviceToHost, stream));
  SynchronizeCudaStream(0);
  const float* host_out = static_cast<const float*>(out.data());
  for (int64_t i = 0; i < kCount; ++i) {
    ASSERT_EQ(host_out[i], 2 * host_in[i]) << i;
  }
  EXPECT_THROW(PinnedBuffer(-1), Error);
}

// ---- Tensor functions on CUDA ----

TEST_F(CudaTest, FillKernelWritesEveryElementOfEveryDtype) {
  for (DType dtype : kAllDTypes) {
    // Odd size: the grid-stride loop must cover the tail.
    Tensor t = Full({1000003}, 3.0, dtype, kCuda);
    EXPECT_TRUE(t.device().is_cuda());
    const std::vector<double> host = t.ToVector();
    ASSERT_EQ(host.size(), 1000003u);
    for (size_t i = 0; i < host.size(); ++i) {
      ASSERT_EQ(host[i], 3.0) << DTypeName(dtype) << " element " << i;
    }
  }
  // The value is converted like on the CPU (bfloat16 rounding included).
  for (DType dtype : kAllDTypes) {
    EXPECT_EQ(Full({5}, 200.7, dtype, kCuda).ToVector(),
              Full({5}, 200.7, dtype).ToVector())
        << DTypeName(dtype);
  }
  // Zeros are a memset: every element of every dtype, over a buffer that
  // held other values (a reused block); -0 keeps its sign bit.
  for (DType dtype : kAllDTypes) {
    Tensor t = Full({1000003}, 5.0, dtype, kCuda);
    FillCuda(kCuda.index, t.raw_data(), dtype, t.numel(), 0.0);
    EXPECT_EQ(t.ToVector(), std::vector<double>(1000003, 0.0))
        << DTypeName(dtype);
  }
  for (DType dtype : {DType::kFloat64, DType::kFloat32, DType::kBFloat16}) {
    const std::vector<double> negative_zero =
        Full({3}, -0.0, dtype, kCuda).ToVector();
    for (double v : negative_zero) {
      EXPECT_TRUE(v == 0 && std::signbit(v)) << DTypeName(dtype) << " " << v;
    }
  }
  EXPECT_EQ(Ones({4}, DType::kBFloat16, kCuda).ToVector(),
            std::vector<double>(4, 1.0));
}

TEST_F(CudaTest, CopiesRoundTripAndMemoryIsCounted) {
  MemoryTracker& tracker = DeviceMemoryTracker(kCuda);
  const int64_t before = tracker.stats().current_bytes;
  Tensor host = Arange(0, 1000, 1, DType::kFloat32).reshape({10, 100});
  {
    Tensor device = host.to(kCuda);
    EXPECT_EQ(tracker.stats().current_bytes - before, 4000);
    EXPECT_EQ(device.at({3, 7}), 307);
    EXPECT_EQ(device.to(Device::Cpu()).ToVector(), host.ToVector());
    // A strided host source is packed before the copy.
    Tensor strided = Zeros({100, 10}, DType::kFloat32, kCuda);
    CopyInto(strided, host.transpose(0, 1));
    EXPECT_EQ(strided.at({7, 3}), 307);
  }
  EXPECT_EQ(tracker.stats().current_bytes, before);
}

// dst = src through strided views on every pair of devices, for every dtype
// pair, against the CPU: a [6, 7, 5] source seen permuted and dilated as
// [5, 3, 7], written into a permuted view of a [7, 5, 3] destination.
TEST_F(CudaTest, StridedCopiesConvertEveryDtypePairLikeTheCpu) {
  const Shape source_shape = {6, 7, 5};
  const std::vector<double> values = TestValues(NumElements(source_shape));
  auto source_view = [](const Tensor& t) {
    return t.permute({2, 0, 1}).slice(1, 1, 6, 2);  // [5, 3, 7]
  };
  auto destination_view = [](const Tensor& t) {
    return t.permute({1, 2, 0});  // [5, 3, 7] of a [7, 5, 3]
  };
  for (DType src_dtype : kAllDTypes) {
    const Tensor src_cpu = FromVector(values, source_shape, src_dtype);
    const Tensor src_cuda = src_cpu.to(kCuda);
    for (DType dst_dtype : kAllDTypes) {
      SCOPED_TRACE(DTypeName(src_dtype) + " -> " + DTypeName(dst_dtype));
      // The views cover every destination element.
      Tensor expected = Zeros({7, 5, 3}, dst_dtype);
      CopyInto(destination_view(expected), source_view(src_cpu));
      const std::vector<double> want = expected.ToVector();

      Tensor cuda_to_cuda = Zeros({7, 5, 3}, dst_dtype, kCuda);
      CopyInto(destination_view(cuda_to_cuda), source_view(src_cuda));
      EXPECT_EQ(cuda_to_cuda.ToVector(), want) << "cuda -> cuda";

      Tensor cpu_to_cuda = Zeros({7, 5, 3}, dst_dtype, kCuda);
      CopyInto(destination_view(cpu_to_cuda), source_view(src_cpu));
      EXPECT_EQ(cpu_to_cuda.ToVector(), want) << "cpu -> cuda";

      Tensor cuda_to_cpu = Zeros({7, 5, 3}, dst_dtype);
      CopyInto(destination_view(cuda_to_cpu), source_view(src_cuda));
      EXPECT_EQ(cuda_to_cpu.ToVector(), want) << "cuda -> cpu";
    }
  }
}

TEST_F(CudaTest, CopiesOfManyDimsMergeContiguousDimsOrFailClearly) {
  const Shape shape(9, 2);  // 9 dims of size 2
  const std::vector<double> values = TestValues(512);
  const Tensor cpu = FromVector(values, shape, DType::kFloat64);
  const Tensor cuda = cpu.to(kCuda);
  // Dense (a conversion, so the kernel runs): merges to one dim.
  EXPECT_EQ(cuda.to(DType::kFloat32).ToVector(),
            cpu.to(DType::kFloat32).ToVector());
  // Reversed dims: nothing merges, 9 > 8 dims.
  std::vector<int64_t> reversed(9);
  for (int d = 0; d < 9; ++d) reversed[d] = 8 - d;
  try {
    cuda.permute(reversed).contiguous();
    ADD_FAILURE() << "expected an error for 9 unmergeable dims";
  } catch (const Error& e) {
    EXPECT_NE(Message(e).find("at most 8"), std::string::npos) << Message(e);
  }
  // 8 dims that do not merge are fine.
  const Tensor eight = cuda.reshape({4, 2, 2, 2, 2, 2, 2, 2});
  std::vector<int64_t> reversed8(8);
  for (int d = 0; d < 8; ++d) reversed8[d] = 7 - d;
  EXPECT_EQ(eight.permute(reversed8).contiguous().ToVector(),
            cpu.reshape({4, 2, 2, 2, 2, 2, 2, 2})
                .permute(reversed8)
                .contiguous()
                .ToVector());
}

TEST_F(CudaTest, DtypeConversionsRoundLikeTheCpu) {
  // Ties between bfloat16 neighbours (round to even both ways), values that
  // round up to infinity, infinities, subnormals, signed zero, negatives.
  const float tie_down = 1.0f + 1.0f / 256;  // between 1 and 1 + 2^-7
  const float tie_up = 1.0f + 3.0f / 256;    // rounds to 1 + 2^-6
  const float big = 3.3961776e38f;           // rounds up to infinity
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<double> special = {tie_down, tie_up, -tie_up,  big,
                                 -big,     inf,    -inf,     1e-40,
                                 -0.0,     0.0,    1.0 / 3,  -123.456789,
                                 65504.5,  1e30,   -2.5e-39, 7.0000001};
  Tensor randoms = RandomNormal({1000}, DType::kFloat64, Device::Cpu(), 11);
  for (double v : randoms.ToVector()) special.push_back(v * 1000);
  const Shape shape = {static_cast<int64_t>(special.size())};
  for (DType from : {DType::kFloat64, DType::kFloat32, DType::kBFloat16}) {
    const Tensor cpu = FromVector(special, shape, from);
    const Tensor cuda = cpu.to(kCuda);
    for (DType to : {DType::kFloat64, DType::kFloat32, DType::kBFloat16}) {
      SCOPED_TRACE(DTypeName(from) + " -> " + DTypeName(to));
      const Tensor converted = cuda.to(to);
      EXPECT_EQ(converted.dtype(), to);
      EXPECT_TRUE(converted.device().is_cuda());
      EXPECT_EQ(converted.ToVector(), cpu.to(to).ToVector());
      // And back.
      EXPECT_EQ(converted.to(from).ToVector(), cpu.to(to).to(from).ToVector());
    }
  }
  // Integers: in-range values truncate like on the CPU.
  const Tensor cpu = FromVector(TestValues(500), {500}, DType::kFloat32);
  for (DType to : {DType::kInt64, DType::kUInt8}) {
    EXPECT_EQ(cpu.to(kCuda).to(to).ToVector(), cpu.to(to).ToVector())
        << DTypeName(to);
    EXPECT_EQ(cpu.to(to).to(kCuda).to(DType::kBFloat16).ToVector(),
              cpu.to(to).to(DType::kBFloat16).ToVector())
        << DTypeName(to);
  }
}

TEST_F(CudaTest, ContiguousCloneAndElementAccess) {
  const Tensor cpu = FromVector(TestValues(24), {2, 3, 4}, DType::kFloat32);
  const Tensor cuda = cpu.to(kCuda);
  EXPECT_EQ(cuda.contiguous().raw_data(), cuda.raw_data());
  const Tensor transposed = cuda.transpose(0, 2).contiguous();
  EXPECT_TRUE(transposed.is_contiguous());
  EXPECT_EQ(transposed.ToVector(), cpu.transpose(0, 2).contiguous().ToVector());
  const Tensor copy = cuda.clone();
  EXPECT_NE(copy.raw_data(), cuda.raw_data());
  copy.set({1, 2, 3}, 5.5);
  EXPECT_EQ(copy.at({1, 2, 3}), 5.5);
  EXPECT_EQ(cuda.at({1, 2, 3}), cpu.at({1, 2, 3}));
  EXPECT_EQ(cuda.slice(2, 1, 2).slice(1, 2, 3).slice(0, 1, 2).item(),
            cpu.at({1, 2, 1}));
  EXPECT_NE(cuda.ToString().find("cuda:0"), std::string::npos);
  EXPECT_EQ(FromVector({1, 2, 3}, {3}, DType::kInt64, kCuda).ToVector(),
            std::vector<double>({1, 2, 3}));
  EXPECT_THROW(cuda.at({2, 0, 0}), Error);
}

TEST_F(CudaTest, AddInPlaceAccumulatesThroughStridedViews) {
  for (DType dtype : {DType::kFloat64, DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(DTypeName(dtype));
    const Tensor base = RandomNormal({8, 6, 10}, dtype, Device::Cpu(), 21);
    const Tensor addend = RandomNormal({12, 8, 12}, dtype, Device::Cpu(), 22);
    auto dst_view = [](const Tensor& t) { return t.slice(2, 1, 10, 3); };
    auto src_view = [](const Tensor& t) {
      return t.permute({1, 0, 2}).slice(1, 0, 12, 2).slice(2, 1, 4);
    };  // both [8, 6, 3]
    // clone(): for float64, to(kFloat64) returns base itself, which must
    // stay unchanged for the CUDA run below.
    Tensor expected = base.to(DType::kFloat64).clone();
    AddInPlace(dst_view(expected), src_view(addend.to(DType::kFloat64)));
    Tensor cuda = base.to(kCuda);
    AddInPlace(dst_view(cuda), src_view(addend.to(kCuda)));
    ExpectCudaClose(cuda, expected, CudaRelativeTolerance(dtype), "AddInPlace");
    // Elements outside the view are untouched.
    EXPECT_EQ(cuda.slice(2, 0, 1).ToVector(), base.slice(2, 0, 1).ToVector());
  }
  // Dense operands take the vectorized kernel: an odd size (the tail after
  // the 16-byte packets) and a start one element into the buffer (not
  // 16-byte aligned, one element at a time).
  for (DType dtype : {DType::kFloat64, DType::kFloat32, DType::kBFloat16}) {
    for (int64_t start : {0, 1}) {
      SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " start ", start));
      const Tensor base = RandomNormal({100003}, dtype, Device::Cpu(), 23);
      const Tensor addend = RandomNormal({100003}, dtype, Device::Cpu(), 24);
      Tensor expected = base.to(DType::kFloat64).clone();
      AddInPlace(expected.slice(0, start, 100003),
                 addend.to(DType::kFloat64).slice(0, start, 100003));
      Tensor cuda = base.to(kCuda);
      AddInPlace(cuda.slice(0, start, 100003),
                 addend.to(kCuda).slice(0, start, 100003));
      ExpectCudaClose(cuda, expected, CudaRelativeTolerance(dtype),
                      "dense AddInPlace");
    }
  }
  const Tensor ints = Zeros({4}, DType::kInt64, kCuda);
  EXPECT_THROW(AddInPlace(ints, ints), Error);
  const Tensor host = Zeros({4}, DType::kFloat32);
  try {
    AddInPlace(host.to(kCuda), host);
    ADD_FAILURE() << "expected a device mismatch error";
  } catch (const Error& e) {
    EXPECT_NE(Message(e).find("cuda:0"), std::string::npos) << Message(e);
  }
}

TEST_F(CudaTest, ArangeMatchesTheCpu) {
  struct Case {
    double start, end, step;
    DType dtype;
  };
  for (const Case& c : std::vector<Case>{{0, 1000.5, 0.1, DType::kFloat64},
                                         {-3, 7, 0.3, DType::kFloat32},
                                         {5, -5, -0.7, DType::kBFloat16},
                                         {0, 250, 1, DType::kUInt8},
                                         {-7, 1e6, 3, DType::kInt64},
                                         {1, 1, 1, DType::kFloat32}}) {
    SCOPED_TRACE(DTypeName(c.dtype) + " from " + std::to_string(c.start));
    const Tensor cuda = Arange(c.start, c.end, c.step, c.dtype, kCuda);
    EXPECT_TRUE(cuda.device().is_cuda());
    EXPECT_EQ(cuda.ToVector(),
              Arange(c.start, c.end, c.step, c.dtype).ToVector());
  }
}

TEST_F(CudaTest, RandIsBitIdenticalToTheCpu) {
  for (DType dtype : {DType::kFloat32, DType::kFloat64, DType::kBFloat16}) {
    SCOPED_TRACE(DTypeName(dtype));
    Generator cpu_gen(1234), cuda_gen(1234);
    for (int draw = 0; draw < 2; ++draw) {
      const Tensor cpu = Rand({1001, 3}, cpu_gen, dtype);
      const Tensor cuda = Rand({1001, 3}, cuda_gen, dtype, kCuda);
      EXPECT_TRUE(cuda.device().is_cuda());
      EXPECT_EQ(cuda.ToVector(), cpu.ToVector()) << "draw " << draw;
    }
    EXPECT_EQ(cuda_gen.offset(), cpu_gen.offset());
    // Randn draws on the CPU for every device (see core/random.cc).
    EXPECT_EQ(Randn({77}, cuda_gen, dtype, kCuda).ToVector(),
              Randn({77}, cpu_gen, dtype).ToVector());
  }
  Generator gen(1);
  EXPECT_THROW(Rand({3}, gen, DType::kInt64, kCuda), Error);
}

TEST_F(CudaTest, CopiesBetweenTwoDevices) {
  if (CudaDeviceCount() < 2) GTEST_SKIP() << "needs two CUDA devices";
  const Device second = Device::Cuda(1);
  const Tensor cpu = FromVector(TestValues(60), {3, 4, 5}, DType::kFloat32);
  const Tensor a = cpu.to(kCuda);
  Tensor b = Zeros({5, 4, 3}, DType::kBFloat16, second);
  CopyInto(b.permute({2, 1, 0}), a);
  Tensor expected = Zeros({5, 4, 3}, DType::kBFloat16);
  CopyInto(expected.permute({2, 1, 0}), cpu);
  EXPECT_EQ(b.ToVector(), expected.ToVector());
  EXPECT_EQ(b.to(kCuda).to(Device::Cpu()).ToVector(), expected.ToVector());
}

// ---- Errors ----

// Runs with and without a GPU: a device index past the last is a clear
// error from factories and from the allocator's statistics.
TEST(CudaDeviceTest, MissingDeviceIsAClearError) {
  const int count = CudaDeviceCount();
  for (int index : {count, std::max(7, count)}) {
    try {
      Zeros({2}, DType::kFloat32, Device::Cuda(index));
      ADD_FAILURE() << "expected an error for cuda:" << index;
    } catch (const Error& e) {
      EXPECT_NE(Message(e).find("CUDA device " + std::to_string(index) +
                                " does not exist"),
                std::string::npos)
          << e.status();
    }
  }
  try {
    CudaCachingAllocatorStats(std::max(7, count));
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(Message(e).find("does not exist"), std::string::npos)
        << e.status();
  }
  EXPECT_THROW(
      FromVector({1, 2}, {2}, DType::kFloat32, Device::Cuda(7 + count)), Error);
}

}  // namespace
}  // namespace lc
