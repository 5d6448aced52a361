#include "experiments/measure.h"

#include <omp.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "attention/tile_plan.h"
#include "core/autograd.h"
#include "core/check.h"
#include "core/cuda.h"
#include "core/memory.h"
#include "core/random.h"
#include "core/status.h"
#include "distributed/sequence_parallel.h"
#include "distributed/thread_communicator.h"
#include "models/transformer_lm.h"
#include "ops/elementwise.h"
#include "train/optimizer.h"
#include "train/trainer.h"

namespace lc {
namespace scaling {
namespace {

using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start)
      .count();
}

// CPU time of the whole process (all threads), in milliseconds.
double ProcessCpuMs() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

void Synchronize(Device device) {
  if (device.is_cuda()) SynchronizeCudaStream(device.index);
}

template <typename T>
T Median(std::vector<T> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

// The allocator of one device type while a budget is set: an allocation
// that would take a memory scope of the allocating thread (a rank) past the
// budget fails with ResourceExhausted; otherwise the type's previous
// allocator serves it. Never destroyed, since buffers it allocated may
// outlive the budget (they are freed through the same previous allocator).
class BudgetAllocator : public Allocator {
 public:
  explicit BudgetAllocator(Allocator* base) : base_(base) {}

  Allocator* base() const { return base_; }
  void set_budget(int64_t budget) { budget_ = budget; }

  void* Allocate(int64_t bytes, Device device) override {
    const int64_t budget = budget_;
    if (budget > 0) {
      for (const auto& tracker : MemoryScope::Active()) {
        const int64_t held = tracker->stats().current_bytes;
        if (held + bytes > budget) {
          throw Error(absl::ResourceExhaustedError(absl::StrCat(
              "allocating ", bytes, " bytes on ", device.ToString(), " with ",
              held, " held would exceed the memory budget of ", budget,
              " bytes per rank")));
        }
      }
    }
    return base_->Allocate(bytes, device);
  }
  void Deallocate(void* ptr, int64_t bytes, Device device) override {
    base_->Deallocate(ptr, bytes, device);
  }

 private:
  Allocator* const base_;
  std::atomic<int64_t> budget_{0};
};

// Installs the BudgetAllocator of the device's type while alive.
class ScopedMemoryBudget {
 public:
  ScopedMemoryBudget(Device device, int64_t budget) : type_(device.type) {
    static BudgetAllocator* const cpu =
        new BudgetAllocator(GetAllocator(Device::Cpu()));
    if (device.is_cpu()) {
      allocator_ = cpu;
    } else {
      static BudgetAllocator* const cuda =
          new BudgetAllocator(GetAllocator(device));
      allocator_ = cuda;
    }
    allocator_->set_budget(budget);
    SetAllocator(type_, allocator_);
  }
  ~ScopedMemoryBudget() {
    SetAllocator(type_, allocator_->base());
    allocator_->set_budget(0);
  }
  ScopedMemoryBudget(const ScopedMemoryBudget&) = delete;
  ScopedMemoryBudget& operator=(const ScopedMemoryBudget&) = delete;

 private:
  DeviceType type_;
  BudgetAllocator* allocator_ = nullptr;
};

// Random bytes and their next-token targets (the last position unscored).
std::pair<Tensor, Tensor> RandomSequence(int64_t n, int64_t vocab) {
  Generator gen(7);
  std::vector<double> ids;
  ids.reserve(n);
  for (double u : Rand({1, n}, gen, DType::kFloat64).ToVector()) {
    ids.push_back(std::min<double>(std::floor(u * vocab), vocab - 1));
  }
  std::vector<double> targets(ids.begin() + 1, ids.end());
  targets.push_back(-100);
  return {FromVector(ids, {1, n}, DType::kInt64),
          FromVector(targets, {1, n}, DType::kInt64)};
}

}  // namespace

AttentionInputs RandomInputs(const ScalingOptions& options, int64_t n,
                             DType dtype, uint64_t seed) {
  Generator gen(seed);
  const Shape shape = {options.batch, n, options.heads, options.head_dim};
  // Uniform in [-1, 1): Rand draws on the device itself (Randn draws on the
  // host, which takes minutes for the GPU's 4M-token inputs); the timings do
  // not depend on the values.
  const auto draw = [&] {
    NoGradGuard no_grad;
    return AddScalar(MulScalar(Rand(shape, gen, dtype, options.device), 2), -1);
  };
  AttentionInputs inputs;
  inputs.q = draw();
  inputs.k = draw();
  inputs.v = draw();
  inputs.grad_out = draw();
  return inputs;
}

void SetRankThreads(const ScalingOptions& options, int ranks) {
  omp_set_num_threads(options.threads > 0
                          ? options.threads
                          : std::max(1, omp_get_num_procs() / ranks));
}

CallSample MeasureOnce(const ScalingOptions& options,
                       const AttentionInputs& inputs,
                       const AttentionCall& call) {
  Tensors leaves = {inputs.q.detach(), inputs.k.detach(), inputs.v.detach()};
  for (Tensor& t : leaves) t.set_requires_grad(true);
  Synchronize(options.device);
  auto tracker = std::make_shared<MemoryTracker>();
  CallSample sample;
  {
    MemoryScope scope(tracker);
    const double cpu_start = ProcessCpuMs();
    const auto start = Clock::now();
    const Tensor out = call(leaves[0], leaves[1], leaves[2]);
    Synchronize(options.device);
    sample.forward_ms = MsSince(start);
    out.backward(inputs.grad_out);
    Synchronize(options.device);
    sample.total_ms = MsSince(start);
    sample.cpu_ms = ProcessCpuMs() - cpu_start;
  }
  sample.peak_bytes = tracker->stats().peak_bytes;
  return sample;
}

CallCost Summarize(const ScalingOptions& options,
                   const std::vector<CallSample>& samples) {
  LC_CHECK(!samples.empty());
  std::vector<double> forward, total;
  std::vector<int64_t> peak;
  double wall = 0, cpu = 0;
  for (const CallSample& s : samples) {
    forward.push_back(s.forward_ms);
    total.push_back(s.total_ms);
    peak.push_back(s.peak_bytes);
    wall += s.total_ms;
    cpu += s.cpu_ms;
  }
  CallCost cost;
  cost.forward_ms = Median(forward);
  cost.total_ms = Median(total);
  cost.peak_bytes = Median(peak);
  cost.calls = static_cast<int>(samples.size());
  if (options.device.is_cpu() && wall > 0) {
    cost.cpu_share = cpu / (wall * omp_get_max_threads());
  }
  return cost;
}

CallCost MeasureCall(const ScalingOptions& options,
                     const AttentionInputs& inputs, const AttentionCall& call,
                     double budget_s) {
  // The first call of a shape also builds (and caches) its tile plans on
  // the host, a second or more for a block-sparse n of 256K: it is not
  // counted.
  const CallSample first = MeasureOnce(options, inputs, call);
  const int calls = first.total_ms <= budget_s * 1e3 ? options.repeats : 1;
  std::vector<CallSample> samples;
  for (int i = 0; i < calls; ++i) {
    samples.push_back(MeasureOnce(options, inputs, call));
  }
  CallCost cost = Summarize(options, samples);
  cost.first_call_ms = first.total_ms;
  return cost;
}

absl::StatusOr<std::vector<int64_t>> TrainingStepPeaks(
    const ScalingOptions& options, int k, int64_t n, bool recompute,
    int64_t budget) {
  TransformerConfig config = options.model;
  config.context = n;
  config.recompute = recompute;
  config.attention.ranks = k;
  LC_RETURN_IF_ERROR(ValidateTransformerConfig(config));
  const auto [tokens, targets] = RandomSequence(n, config.vocab_size);
  const int64_t scored = n - 1;
  const SequenceLayout layout = config.attention.layout;
  std::vector<int64_t> peaks(k, 0);
  std::unique_ptr<ScopedMemoryBudget> limit;
  if (budget > 0) {
    limit = std::make_unique<ScopedMemoryBudget>(config.device, budget);
  }
  LC_RETURN_IF_ERROR(RunRanks(k, [&](Communicator& comm) -> absl::Status {
    SetRankThreads(options, k);
    const int rank = comm.rank();
    auto tracker = std::make_shared<MemoryTracker>();
    {
      MemoryScope scope(tracker);
      Generator init(0);
      LC_ASSIGN_OR_RETURN(std::shared_ptr<TransformerLM> model,
                          TransformerLM::Create(config, init));
      model->Train();
      LC_ASSIGN_OR_RETURN(AdamW optimizer,
                          AdamW::Create(model->NamedParameters()));
      const SequenceParallelContext sp{&comm, n};
      LC_RETURN_IF_ERROR(
          OptimizerStep(*model, optimizer, model->Parameters(),
                        SplitSequence(tokens, k, rank, layout),
                        SplitSequence(targets, k, rank, layout), scored,
                        /*clip=*/1.0, /*lr=*/1e-3, &comm, k > 1 ? &sp : nullptr)
              .status());
    }
    peaks[rank] = tracker->stats().peak_bytes;
    return absl::OkStatus();
  }));
  return peaks;
}

int64_t AttendedPairs(const AttentionPattern& pattern, int64_t n) {
  TilePlanOptions plan;
  plan.block_mask = pattern.block_mask.get();
  int64_t pairs = 0;
  for (const std::vector<DilatedPattern>& head : pattern.head_patterns) {
    ForEachTile(head, n, {0, n}, {0, n}, plan, [&](const Tile& tile) {
      pairs += tile.q.count * tile.k.count;
    });
  }
  return pairs;
}

std::string SparsePatternName(SparsePattern pattern) {
  switch (pattern) {
    case SparsePattern::kLocalWindow:
      return "local_window";
    case SparsePattern::kDilatedSparse:
      return "dilated_sparse";
    case SparsePattern::kGlobalLocal:
      return "global_local";
    case SparsePattern::kRandom:
      return "random";
    case SparsePattern::kExplicit:
      return "explicit";
  }
  LC_CHECK(false) << "unknown sparse pattern " << static_cast<int>(pattern);
  return "";
}

void Progress(const ScalingOptions& options, const std::string& experiment,
              const std::string& line) {
  if (options.progress == nullptr) return;
  *options.progress << "[" << experiment << "] " << line << std::endl;
}

std::string Cell(int64_t value) { return absl::StrCat(value); }

std::string Cell(double value, int digits) {
  return absl::StrFormat("%.*f", digits, value);
}

std::string MiB(int64_t bytes) {
  return absl::StrFormat("%.1f MiB", bytes / 1048576.0);
}

}  // namespace scaling
}  // namespace lc
