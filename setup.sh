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
  exit 0
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
  SUDO=(sudo)
fi

echo "setup.sh: installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update
"${SUDO[@]}" apt-get install -y --no-install-recommends "${PACKAGES[@]}"
echo "setup.sh: done."
