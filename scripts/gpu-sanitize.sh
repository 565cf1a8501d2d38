#!/usr/bin/env bash
# Runs the whole GPU test binary (kvc_gpu_tests) under each compute-sanitizer tool: memcheck
# (out-of-bounds and misaligned accesses, leaks), racecheck (shared-memory hazards), initcheck
# (reads of uninitialised device memory) and synccheck (invalid __syncthreads/__syncwarp use).
# One log per tool in $OUT, a summary table last, exit status non-zero when any tool reports an
# error, when the binary is missing, or when the GPU tests were skipped (no usable device).
# Not run in CI (no GPU there): run it on a GPU machine (docs/reliability.md).
#
# Usage: scripts/gpu-sanitize.sh [--build-dir DIR] [--build] [--jobs N] [--filter PATTERN]
#                                [--tools "memcheck racecheck initcheck synccheck"]
#   --build-dir DIR   build directory holding tests/kvc_gpu_tests (default: build-gpu)
#   --build           configure (Release, every instantiation) and build kvc_gpu_tests first
#   --jobs N          build parallelism (default: 16)
#   --filter PATTERN  doctest test-case filter (-tc, wildcards); default: every GPU test case
#   --tools LIST      the tools to run, space separated (default: all four)
# Output: $OUT/sanitize-<tool>.log ($OUT defaults to ./out).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
build_dir="build-gpu"
build=0
jobs=16
filter=""
tools="memcheck racecheck initcheck synccheck"
while (($# > 0)); do
  case "$1" in
    --build-dir) build_dir=${2:?--build-dir needs a directory}; shift ;;
    --build) build=1 ;;
    --jobs) jobs=${2:?--jobs needs a number}; shift ;;
    --filter) filter=${2:?--filter needs a pattern}; shift ;;
    --tools) tools=${2:?--tools needs a list}; shift ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-sanitize: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh
kvc_prepare_env  # out, PATH, prefix_args (.devdeps: doctest on the GPU machine)
sanitizer=$(command -v compute-sanitizer || true)
if [[ -z ${sanitizer} && -x /usr/local/cuda/bin/compute-sanitizer ]]; then
  sanitizer=/usr/local/cuda/bin/compute-sanitizer
fi

if ((build)); then
  echo "--- build (log: ${out}/sanitize-build.log)"
  if ! { cmake -S . -B "${build_dir}" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVC_CI_MINIMAL=OFF \
    "${prefix_args[@]}" &&
    cmake --build "${build_dir}" -j "${jobs}" --target kvc_gpu_tests; } \
    >"${out}/sanitize-build.log" 2>&1; then
    tail -n 20 "${out}/sanitize-build.log"
    echo "gpu-sanitize: build failed" >&2
    exit 1
  fi
fi
binary="${build_dir}/tests/kvc_gpu_tests"
if [[ ! -x ${binary} ]]; then
  echo "gpu-sanitize: ${binary} not found (build it, or pass --build)" >&2
  exit 1
fi
if [[ -z ${sanitizer} ]]; then
  echo "gpu-sanitize: compute-sanitizer not found (CUDA toolkit)" >&2
  exit 1
fi

doctest_args=(-ts=gpu)
[[ -n ${filter} ]] && doctest_args+=("-tc=${filter}")
names=()
results=()
times=()
failed=0
for tool in ${tools}; do
  case "${tool}" in
    memcheck) options=(--tool memcheck --leak-check full) ;;
    racecheck) options=(--tool racecheck --racecheck-report all) ;;
    initcheck) options=(--tool initcheck) ;;
    synccheck) options=(--tool synccheck) ;;
    *) echo "gpu-sanitize: unknown tool '${tool}'" >&2; exit 2 ;;
  esac
  log="${out}/sanitize-${tool}.log"
  echo "--- ${tool} (log: ${log})"
  start=${SECONDS}
  "${sanitizer}" "${options[@]}" --error-exitcode 1 --print-limit 100 "${binary}" \
    "${doctest_args[@]}" >"${log}" 2>&1
  rc=$?
  errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+' "${log}" | awk '{s += $3} END {print s + 0}')
  result="ok"
  if ((rc != 0)); then
    result="FAIL (exit ${rc}, ${errors} errors)"
  elif ((errors > 0)); then
    result="FAIL (${errors} errors)"
  elif grep -q "kvc: no CUDA device: skipped" "${log}"; then
    result="FAIL (GPU tests skipped: no usable device)"
  elif ! grep -q 'Status: SUCCESS' "${log}"; then
    result="FAIL (no doctest success line)"
  fi
  if [[ ${result} != ok ]]; then
    failed=1
    tail -n 20 "${log}" | sed 's/^/    /'
  fi
  names+=("${tool}")
  results+=("${result}")
  times+=("$((SECONDS - start))")
done

echo
echo "=== gpu-sanitize summary (${binary}, logs in ${out}) ==="
printf '  %-10s %8s  %s\n' tool seconds result
for i in "${!names[@]}"; do
  printf '  %-10s %8d  %s\n' "${names[$i]}" "${times[$i]}" "${results[$i]}"
done
exit "${failed}"
