# shellcheck shell=bash
# Sourced (from the repository root) by the scripts that run on a GPU machine:
# scripts/bench-suite.sh, scripts/gpu-check.sh, scripts/gpu-sanitize.sh.

# kvc_prepare_env: sets `out` to the absolute path of $OUT (default ./out, created); puts
# /usr/local/cuda/bin on PATH where nvcc is not found; sets `prefix_args` to the CMake arguments
# that find doctest and Google Benchmark in .devdeps (packed by scripts/pack-device-deps.sh; the
# lent GPU machine has neither) when it is present, and adds its libraries to LD_LIBRARY_PATH.
kvc_prepare_env() {
  out=${OUT:-./out}
  mkdir -p "${out}"
  out=$(cd "${out}" && pwd)
  if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export PATH="/usr/local/cuda/bin:${PATH}"
  fi
  prefix_args=()
  if [[ -d .devdeps ]]; then
    # shellcheck disable=SC2034  # read by the sourcing script
    prefix_args=("-DCMAKE_PREFIX_PATH=${PWD}/.devdeps")
    export LD_LIBRARY_PATH="${PWD}/.devdeps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
  fi
}
