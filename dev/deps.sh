#!/usr/bin/env bash
# Makes sure the build's Debian packages are present. Run by `make` before configuring.
# As root it installs what is missing with apt-get; otherwise it prints the exact apt line and fails.
set -euo pipefail

missing=()
have_header() { [ -f "/usr/include/$1" ]; }
have_header nlohmann/json.hpp || missing+=(nlohmann-json3-dev)
have_header gtest/gtest.h || missing+=(libgtest-dev)
have_header pcre2.h || missing+=(libpcre2-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
{ [ -f /usr/lib/x86_64-linux-gnu/libgtest.a ] || [ -f /usr/lib/aarch64-linux-gnu/libgtest.a ] ||
  [ -f /usr/lib/libgtest.a ] || ls /usr/lib/*/libgtest.so >/dev/null 2>&1; } || missing+=(libgtest-dev)
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)

if [ ${#missing[@]} -gt 0 ]; then
  # shellcheck disable=SC2207
  missing=($(printf '%s\n' "${missing[@]}" | sort -u))
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "deps: missing packages. Install them with:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

if ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "deps: the CUDA toolkit (nvcc) is required to build, even on machines without a GPU." >&2
  echo "  Install NVIDIA's CUDA toolkit 13 (it provides nvcc, cuBLAS, cuDNN and NCCL)." >&2
  exit 1
fi
