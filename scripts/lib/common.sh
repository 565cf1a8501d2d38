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

# kvc_use_prebuilt DIR: uses a build made on the CPU machine and packed by
# scripts/pack-prebuilt.sh (DIR holds prebuilt.tgz, or is an unpacked copy). Unpacks it, links
# the source and build paths its CTest files name to this checkout and the unpacked copy (where
# a real build already lives at that path, it is used as it is), and sets `build_dir` to that
# path. Returns non-zero with a message when it cannot.
kvc_use_prebuilt() {
  local prebuilt=$1 unpacked paths source_path build_path
  if [[ -f ${prebuilt}/prebuilt.tgz ]]; then
    unpacked=${TMPDIR:-/tmp}/kvc-prebuilt
    if ! { rm -rf "${unpacked}" && mkdir -p "${unpacked}" &&
      tar -xzf "${prebuilt}/prebuilt.tgz" -C "${unpacked}"; }; then
      echo "kvc: cannot unpack ${prebuilt}/prebuilt.tgz" >&2
      return 1
    fi
    prebuilt=${unpacked}
  fi
  paths="${prebuilt}/KVC_PREBUILT_PATHS"
  [[ -f ${paths} ]] || { echo "kvc: ${paths} missing (scripts/pack-prebuilt.sh)" >&2; return 1; }
  source_path=$(sed -n 1p "${paths}")
  build_path=$(sed -n 2p "${paths}")
  prebuilt=$(cd "${prebuilt}" && pwd)
  if [[ ${source_path} != "${PWD}" ]]; then
    if ! { mkdir -p "$(dirname "${source_path}")" && ln -sfn "${PWD}" "${source_path}"; }; then
      echo "kvc: cannot link ${source_path} to ${PWD}" >&2
      return 1
    fi
  fi
  if [[ -d ${build_path} && ! -L ${build_path} ]]; then
    echo "kvc: ${build_path} exists: using it instead of ${prebuilt}"
  elif ! ln -sfn "${prebuilt}" "${build_path}"; then
    echo "kvc: cannot link ${build_path} to ${prebuilt}" >&2
    return 1
  fi
  # shellcheck disable=SC2034  # read by the sourcing script
  build_dir=${build_path}
}
