#!/usr/bin/env bash
# The GPU suite in two halves, for a GPU machine without Bazel:
#
#   scripts/gpu_suite.sh stage   # here: build the GPU binaries (-c opt) and
#                                # copy them into .device_bin/ (git-ignored)
#   scripts/gpu_suite.sh run [STEP...]
#                                # there: run the steps (default: all) from
#                                # .device_bin/, logs under $OUT (or
#                                # ./gpu_suite_out), a summary table last
#
# Steps: env tests sanitize attention train cli maxctx scaling. Each step's
# full output is in $OUT/<step>.log (the scaling CSVs and plots in
# $OUT/scaling.tgz); every step is cut off after STEP_TIMEOUT seconds
# (default 300); the summary prints one line per step and the tail of each
# log. PyTorch (python3 with torch) is used only as the
# yardstick of the benchmarks; nothing of the project depends on it.
set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cd "$(dirname "$SELF")/.."
BIN=.device_bin
TARGETS=(
  //tests:cuda_test
  //tests:nccl_test
  //attention:attention_cuda_benchmark
  //attention:attention_cli
  //train:train_benchmark
  //experiments:scaling
)

stage() {
  bazel build -c opt "${TARGETS[@]}" || exit 1
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
  for b in "$BIN"/*; do echo "== ldd $b"; ldd "$b" | grep -E "not found|cuda|cublas|nccl" ; done
}

step_tests() {
  "$BIN/cuda_test" --gtest_brief=1
  local rc=$?
  "$BIN/nccl_test" --gtest_brief=1 || rc=1
  return $rc
}

step_sanitize() {
  local filter='CudaTest.AttentionDropout*:CudaTest.AttentionQueryWithoutKeys*:CudaTest.AttentionTakesNonContiguous*:CudaTest.AttentionEveryPatternMatchesCpuInBFloat16OnTensorCores'
  compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$BIN/cuda_test" --gtest_filter="$filter" --gtest_brief=1 || return 1
  compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$BIN/cuda_test" --gtest_filter="$filter" --gtest_brief=1
}

step_attention() {
  "$BIN/attention_cuda_benchmark"
  "$BIN/attention_cuda_benchmark" --workloads=ring
  python3 attention/pytorch_dilated_baseline.py bench
}

step_train() {
  "$BIN/train_benchmark"
  python3 train/pytorch_train_baseline.py bench
}

step_maxctx() {
  "$BIN/train_benchmark" --max_context
  python3 train/pytorch_train_baseline.py max_context
}

step_scaling() {
  local dir=/tmp/scaling
  "$BIN/scaling" --device=cuda --out_dir="$dir" --plot=false
  local rc=$?
  tar -czf "$OUT/scaling.tgz" -C "$dir" .
  return $rc
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
      "maxctx scaling]" >&2
    exit 2
    ;;
esac
