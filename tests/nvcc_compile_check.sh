#!/usr/bin/env bash
# Compile-only check of pysnell's CUDA kernels with plain nvcc, for sm_80 and sm_90a (.ci/run calls it
# when nvcc exists). Nothing runs; objects go to a temporary directory that is removed afterwards.
#
# The rule: every .cu file under csrc/ is a kernel file that includes only CUDA headers (and csrc's own
# .cuh/.h headers), takes raw pointers and a stream, and compiles standalone: all of them are compiled
# here. The torch binding is the single .cpp file, csrc/binding.cpp: it needs torch's CUDA headers and
# libraries, which the CPU torch wheel lacks, so it is not built here, only syntax-checked (below). A
# kernel source that includes torch, c10, ATen or pybind11 fails this check.
#
# Optional: PYSNELL_CHECK_BINDING=1 also syntax-checks binding.cpp with g++ against the installed torch's
# headers (a stub stands in for the one generated CUDA header the CPU wheel does not ship); about 30 s.
# PYSNELL_CHECK_BINDING=only does that check alone (.ci/run runs it once `make test` has made .venv).
# NVCC_JOBS (default: the core count) compiles files in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-nvcc}"
ARCH_FLAGS=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a)
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

check_binding() {
  local PY torch_dir cuda_inc stub
  PY="${PYTHON:-.venv/bin/python}"
  torch_dir="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
  cuda_inc="$(dirname "$(dirname "$(command -v "$NVCC")")")/include"
  stub="$out/stub"
  mkdir -p "$stub/c10/cuda/impl"
  echo '#pragma once' >"$stub/c10/cuda/impl/cuda_cmake_macros.h"
  g++ -std=c++17 -Wno-c++20-extensions -fsyntax-only -Icsrc -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
    -I"$stub" -I"$cuda_inc" -I/usr/local/cuda/include csrc/binding.cpp
  echo "  ok   csrc/binding.cpp (syntax only)"
}

if [ "${PYSNELL_CHECK_BINDING:-0}" = "only" ]; then
  check_binding
  echo "nvcc_compile_check: binding passed"
  exit 0
fi

mapfile -t kernels < <(find csrc -name '*.cu' | sort)
if [ "${#kernels[@]}" -eq 0 ]; then
  echo "nvcc_compile_check: no .cu files under csrc/" >&2
  exit 1
fi

mapfile -t kernel_headers < <(find csrc -name '*.cuh' -o -name '*.h' | sort)
if grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch|c10|ATen|pybind11)/' \
  "${kernels[@]}" "${kernel_headers[@]}"; then
  echo "nvcc_compile_check: kernel sources must include only CUDA headers (torch belongs in csrc/binding.cpp)" >&2
  exit 1
fi

echo "nvcc_compile_check: $("$NVCC" --version | grep -o 'release [0-9.]*'), ${#kernels[@]} files, sm_80 + sm_90a"
export NVCC out
compile_one() {
  local src="$1" obj start
  obj="$out/$(basename "$src").o"
  start=$(date +%s)
  # torch's extension builds add these (no implicit half/bf16 conversions): compile as they will
  if "$NVCC" -std=c++17 -O3 -Icsrc -Xcompiler -fPIC -c "$src" -o "$obj" \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a 2>"$obj.log"; then
    echo "  ok   $src ($(( $(date +%s) - start )) s)"
    grep -i warning "$obj.log" || true
  else
    echo "  FAIL $src" >&2
    cat "$obj.log" >&2
    return 1
  fi
}
export -f compile_one
: "${ARCH_FLAGS[@]}"  # documented above; compile_one spells them out (arrays do not cross xargs)
printf '%s\n' "${kernels[@]}" | xargs -P "${NVCC_JOBS:-$(nproc)}" -I{} bash -c 'compile_one "$1"' _ {}
# Link the objects together, as the extension does: catches symbols defined in a header that several
# .cu files include (a "multiple definition" that only shows at link time on the GPU machine).
"$NVCC" -shared "$out"/*.o -o "$out/pysnell_kernels.so"
echo "  ok   link of ${#kernels[@]} objects"

if [ "${PYSNELL_CHECK_BINDING:-0}" = "1" ]; then
  check_binding
fi
echo "nvcc_compile_check: passed"
