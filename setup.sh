#!/usr/bin/env bash
# Installs the Debian 12 packages needed to build and test this project
# offline with Bazel (see WORKSPACE). CUDA is NOT installed here: it must
# already be present under /usr/local/cuda. Idempotent: does nothing (no apt)
# when every package is already installed.
set -euo pipefail

PACKAGES=(
  bazel-bootstrap       # Bazel 4.2.3 (pulls in default-jdk-headless)
  default-jdk-headless  # Bazel's server JVM / @local_jdk
  g++                   # host C++ compiler (also nvcc's host compiler)
  git                   # .ci/run lists tracked files for clang-format
  libeigen3-dev         # @eigen//:eigen
  libabsl-dev           # @absl//:absl (static libabsl_*.a)
  libgtest-dev          # @gtest//:gtest, :gtest_main (static)
  libgmock-dev          # gmock, part of @gtest//:gtest
  libbenchmark-dev      # @benchmark//:benchmark, :benchmark_main
  libtorch-dev          # @torch//:torch (reference implementations in tests)
  clang-format          # formatting check in .ci/run (Debian 12: v14)
  python3-matplotlib    # plotting scripts
)

if [[ ! -x /usr/local/cuda/bin/nvcc ]]; then
  echo "ERROR: /usr/local/cuda/bin/nvcc not found. This project needs the CUDA" >&2
  echo "toolkit (13.x) installed under /usr/local/cuda; setup.sh does not install it." >&2
  exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Abbrev}' "${pkg}" 2>/dev/null || true)"
  if [[ "${status}" != ii* ]]; then
    missing+=("${pkg}")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "setup.sh: all ${#PACKAGES[@]} packages already installed."
else
  SUDO=()
  if [[ "$(id -u)" -ne 0 ]]; then
    SUDO=(sudo)
  fi
  echo "setup.sh: installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update
  "${SUDO[@]}" apt-get install -y --no-install-recommends "${PACKAGES[@]}"
  echo "setup.sh: done."
fi

# The CPU code's instruction set (see .bazelrc): x86-64-v3 (AVX2, FMA,
# BMI1/2, F16C, LZCNT, MOVBE) when this machine runs it, else baseline
# x86-64. Written to the git-ignored .bazelrc.machine on every run.
machine_rc="$(cd "$(dirname "$0")" && pwd)/.bazelrc.machine"
probe="$(mktemp -d)"
printf '%s\n' 'int main(void) {' '  __builtin_cpu_init();' \
  '  return __builtin_cpu_supports("x86-64-v3") ? 0 : 1;' '}' >"${probe}/v3.c"
if gcc "${probe}/v3.c" -o "${probe}/v3" 2>/dev/null && "${probe}/v3"; then
  echo "build --config=x86_64_v3" >"${machine_rc}"
  echo "setup.sh: this CPU runs x86-64-v3: the build targets it (--config=portable for any x86-64)."
else
  : >"${machine_rc}"
  echo "setup.sh: this CPU lacks x86-64-v3: the build targets baseline x86-64."
fi
rm -rf "${probe}"
