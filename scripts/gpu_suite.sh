#!/usr/bin/env bash
# The GPU suite in two halves, for a GPU machine without Bazel:
#
#   scripts/gpu_suite.sh stage   # here: build the GPU binaries (-c opt) and
#                                # copy them into .device_bin/ (git-ignored)
#   scripts/gpu_suite.sh run [STEP...]
#                                # there: run the steps from .device_bin/
#                                # (default: env tests sanitize attention
#                                # train cli), logs under $OUT (or
#                                # ./gpu_suite_out), a summary table last
#
# Steps: env (GPU, driver, ldd), tests (cuda_test, nccl_test), sanitize
# (compute-sanitizer memcheck and racecheck; memcheck of the cuDNN path),
# attention (every workload of attention_cuda_benchmark: our kernels and
# cuDNN's, block-sparse, the ring; then PyTorch's SDPA and FlexAttention on
# the same block masks), train
# (the training step on both attention backends, then PyTorch's),
# cli (attention_cli against a float64 oracle), maxctx (longest context,
# ours and PyTorch's), scaling (the experiments, SCALING_EXPERIMENTS to pick,
# each cut off after SCALING_TIMEOUT s; CSVs in $OUT/scaling.tgz), profile
# (Nsight Compute: every kernel of a training step, summed by name). Each
# step's full output is in $OUT/<step>.log; every step is cut off after
# STEP_TIMEOUT seconds (default 300). PyTorch (python3 with torch) is used
# only as the yardstick of the benchmarks; nothing of the project depends
# on it.
set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cd "$(dirname "$SELF")/.."
BIN=.device_bin
TARGETS=(
  //tests:cuda_test
  //tests:nccl_test
  //attention:attention_cuda_benchmark
  //attention:attention_host_benchmark
  //attention:attention_cli
  //train:train_benchmark
  //experiments:scaling
)

stage() {
  # Portable x86-64: the binaries run on another machine, whatever CPU this
  # one has (.bazelrc); bazel-bin then points at the portable tree.
  bazel build -c opt --config=portable "${TARGETS[@]}" || exit 1
  rm -rf "$BIN" && mkdir -p "$BIN"
  for t in "${TARGETS[@]}"; do
    local path="bazel-bin/${t#//}"
    path="${path/://}"
    cp "$path" "$BIN/" || exit 1
  done
  chmod u+w "$BIN"/*
  strip "$BIN"/*
  # Static abseil/gtest and every kernel's machine code make ~10 MB per
  # binary; compressed they fit the 64 MiB a device call may carry.
  tar -C "$BIN" -cJf /tmp/gpu_suite_bin.tar.xz . && rm -f "$BIN"/* &&
    mv /tmp/gpu_suite_bin.tar.xz "$BIN/bin.tar.xz"
  du -sh "$BIN"
}

run() {
  if [[ -f "$BIN/bin.tar.xz" ]]; then
    tar -C "$BIN" -xJf "$BIN/bin.tar.xz" && rm -f "$BIN/bin.tar.xz"
  fi
  local out="${OUT:-$PWD/gpu_suite_out}"
  mkdir -p "$out"
  export LC_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
  # The device image carries NCCL in a Python wheel, not under
  # /usr/local/cuda.
  local nccl_lib
  nccl_lib="$(python3 -c 'import nvidia.nccl, os; print(os.path.join(os.path.dirname(nvidia.nccl.__file__), "lib"))' 2>/dev/null)"
  [[ -n "$nccl_lib" ]] && export LD_LIBRARY_PATH="$nccl_lib:${LD_LIBRARY_PATH:-}"
  local steps=("$@")
  ((${#steps[@]} == 0)) && steps=(env tests sanitize attention train cli)
  local summary=()
  for step in "${steps[@]}"; do
    local start=$SECONDS
    OUT="$out" timeout "${STEP_TIMEOUT:-300}" bash -c \
      "source '$SELF' functions; step_$step" >"$out/$step.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-10s rc=%-3s %4ss' "$step" "$rc" "$((SECONDS - start))")")
  done
  echo "=== summary ==="
  printf '%s\n' "${summary[@]}"
  for step in "${steps[@]}"; do
    echo "=== $step (tail) ==="
    tail -n "${TAIL_LINES:-25}" "$out/$step.log"
  done
}

step_env() {
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  for b in "$BIN"/*; do echo "== ldd $b"; ldd "$b" | grep -E "not found|cuda|cublas|cudnn|nccl" ; done
}

step_tests() {
  "$BIN/cuda_test" --gtest_brief=1
  local rc=$?
  "$BIN/nccl_test" --gtest_brief=1 || rc=1
  return $rc
}

step_sanitize() {
  local filter='CudaTest.AttentionDropout*:CudaTest.AttentionQueryWithoutKeys*:CudaTest.AttentionTakesNonContiguous*:CudaTest.AttentionEveryPatternMatchesCpuInBFloat16OnTensorCores:CudaTest.FillKernel*:CudaTest.AddInPlace*:ElementwiseCudaTest.Binary*:*.ApplyRotary*:*.SumAndMean*:*.MaxMatchesCpu:*LayerNorm*:*RmsNorm*'
  compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$BIN/cuda_test" --gtest_filter="$filter" --gtest_brief=1 || return 1
  compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$BIN/cuda_test" --gtest_filter="$filter" --gtest_brief=1 || return 1
  # Our glue around cuDNN's attention (strided views, workspace, stats
  # copies): memcheck only, since racecheck would inspect cuDNN's kernels.
  compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$BIN/cuda_test" --gtest_filter='CudaTest.AttentionOnCudnn*' --gtest_brief=1
}

# Every workload of our benchmark (the block_sparse masks written for
# FlexAttention on the way), then the PyTorch yardsticks: SDPA on the dilated
# and dense workloads, FlexAttention on the same block masks.
step_attention() {
  local masks=/tmp/block_masks rc=0
  "$BIN/attention_cuda_benchmark" --dump_block_masks="$masks" \
    --workloads=dilated,all_heads,dense,block_sparse || rc=1
  "$BIN/attention_cuda_benchmark" --workloads=ring,ring_dilated || rc=1
  python3 attention/pytorch_dilated_baseline.py bench || rc=1
  python3 attention/pytorch_flex_baseline.py --block_masks="$masks" \
    --json="$OUT/torch_flex.json" || rc=1
  return $rc
}

step_train() {
  "$BIN/train_benchmark"
  "$BIN/train_benchmark" --attention_backend=own
  python3 train/pytorch_train_baseline.py bench
}

step_maxctx() {
  "$BIN/train_benchmark" --max_context
  python3 train/pytorch_train_baseline.py max_context
}

# One experiment at a time, each cut off after SCALING_TIMEOUT seconds
# (default 150), so that one slow experiment leaves the others' CSVs.
step_scaling() {
  local dir=/tmp/scaling rc=0
  for e in ${SCALING_EXPERIMENTS:-memory_vs_ranks communication \
    time_vs_length max_context}; do
    echo "== $e"
    # communication counts bytes in float32, on the FMA kernels: n = 16K
    # keeps its dense (r = 1) calls short.
    local extra=()
    [[ "$e" == communication ]] && extra=(--n=16384)
    timeout "${SCALING_TIMEOUT:-150}" "$BIN/scaling" --device=cuda \
      --experiment="$e" --out_dir="$dir" --plot=false "${extra[@]}" || rc=1
    tar -czf "$OUT/scaling.tgz" -C "$dir" .
  done
  return $rc
}

# Where a training step's GPU time goes: every kernel of two steps (the
# benchmark's warm-up step and its timed one) timed by Nsight Compute,
# summed by kernel name.
step_profile() {
  ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    --print-units base \
    "$BIN/train_benchmark" --warmup=1 --repeats=1 --recompute=off \
    >"$OUT/profile.csv" || return 1
  python3 - "$OUT/profile.csv" <<'PY'
import collections, csv, sys
# The program's own output comes first; ncu's table starts at its header.
rows = list(csv.reader(open(sys.argv[1])))
first = next(i for i, r in enumerate(rows) if r[:1] == ["ID"])
head = rows[first]
name, value = head.index("Kernel Name"), head.index("Metric Value")
total, count = collections.Counter(), collections.Counter()
for r in rows[first + 1:]:
    if len(r) != len(head):
        continue
    key = r[name].split("(")[0].replace("void ", "")
    for scope in ("lc::", "internal::", "<unnamed>::"):
        key = key.replace(scope, "")
    key = key[:60]
    total[key] += float(r[value].replace(",", "")) / 1e6
    count[key] += 1
all_ms = sum(total.values())
print(f"{'kernel':60s} {'calls':>6s} {'ms':>9s} {'%':>6s}")
for key, ms in total.most_common(30):
    print(f"{key:60s} {count[key]:6d} {ms:9.3f} {100 * ms / all_ms:6.1f}")
print(f"{'all kernels (2 steps)':60s} {sum(count.values()):6d} {all_ms:9.3f}")
PY
}

step_cli() {
  local dir=/tmp/attention_check
  python3 attention/pytorch_dilated_baseline.py check --dir="$dir" &&
    python3 attention/pytorch_dilated_baseline.py compare --dir="$dir" \
      --cli="$BIN/attention_cli" --device=cuda --dtype=float32
}

case "${1:-}" in
  functions) ;;  # sourced by run() to call one step
  stage) stage ;;
  run) shift; run "$@" ;;
  *)
    echo "usage: $0 stage | run [env tests sanitize attention train cli" \
      "maxctx scaling profile]" >&2
    exit 2
    ;;
esac
