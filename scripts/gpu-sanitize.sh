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
#   --parallel N      run N sanitizer processes at once, one per (tool, GPU test case)
#                     (default: 1 = one process per tool over the whole binary)
#   --timeout S       time limit of each sanitizer process (default: none)
# Output: $OUT/sanitize-<tool>.log ($OUT defaults to ./out).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
build_dir="build-gpu"
build=0
jobs=16
filter=""
tools="memcheck racecheck initcheck synccheck"
parallel=1
timeout_s=0
while (($# > 0)); do
  case "$1" in
    --build-dir) build_dir=${2:?--build-dir needs a directory}; shift ;;
    --build) build=1 ;;
    --jobs) jobs=${2:?--jobs needs a number}; shift ;;
    --filter) filter=${2:?--filter needs a pattern}; shift ;;
    --tools) tools=${2:?--tools needs a list}; shift ;;
    --parallel) parallel=${2:?--parallel needs a number}; shift ;;
    --timeout) timeout_s=${2:?--timeout needs seconds}; shift ;;
    -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
# Jobs: one per tool, or (--parallel > 1) one per (tool, test case).
# A job is named by a test-case pattern ("" = every case). Commas separate doctest filters, so
# a comma inside a case name becomes the one-character wildcard '?'.
sources=("")
if ((parallel > 1)); then
  sources=()
  while IFS= read -r name; do
    [[ -n ${name} ]] && sources+=("${name//,/?}")
  done < <("${binary}" "${doctest_args[@]}" --list-test-cases --no-intro=true 2>/dev/null |
    grep -v -e '^===' -e '^\[doctest\]')
  if ((${#sources[@]} == 0)); then
    echo "gpu-sanitize: no test cases listed by ${binary}" >&2
    exit 1
  fi
fi
# Log file of a job: sanitize-TOOL[-NN].log, NN the index of its test case.
log_of() {  # log_of TOOL INDEX
  if [[ -z ${sources[$2]} ]]; then echo "${out}/sanitize-$1.log"; else printf '%s/sanitize-%s-%02d.log' "${out}" "$1" "$2"; fi
}
options_of() {
  case "$1" in
    memcheck) echo "--tool memcheck --leak-check full" ;;
    racecheck) echo "--tool racecheck --racecheck-report all" ;;
    initcheck) echo "--tool initcheck" ;;
    synccheck) echo "--tool synccheck" ;;
    *) return 1 ;;
  esac
}
# run_job TOOL INDEX: one sanitizer process over test case pattern sources[INDEX].
run_job() {
  local tool=$1 index=$2 log options
  local pattern=${sources[$index]}
  options=$(options_of "${tool}") || { echo "gpu-sanitize: unknown tool '${tool}'" >&2; return 2; }
  log=$(log_of "${tool}" "${index}")
  local args=(-ts=gpu)
  if [[ -n ${pattern} ]]; then args+=("-tc=${pattern}"); else args=("${doctest_args[@]}"); fi
  local limit=()
  ((timeout_s > 0)) && limit=(timeout "${timeout_s}")
  # shellcheck disable=SC2086  # options are words
  "${limit[@]}" "${sanitizer}" ${options} --error-exitcode 1 --print-limit 100 "${binary}" \
    "${args[@]}" >"${log}" 2>&1
  echo $? >"${log}.rc"
}
for tool in ${tools}; do options_of "${tool}" >/dev/null || { echo "unknown tool ${tool}" >&2; exit 2; }; done
# A sanitizer job outliving this script (killed by an outer timeout) would share the GPU with
# whatever runs next, benchmarks included: take every job down with the script.
trap 'kill $(jobs -p) 2>/dev/null; pkill -P $$ 2>/dev/null' EXIT
trap 'exit 143' TERM INT
start=${SECONDS}
running=0
for tool in ${tools}; do
  for index in "${!sources[@]}"; do
    echo "--- ${tool}${sources[$index]:+ ${sources[$index]}}"
    run_job "${tool}" "${index}" &
    running=$((running + 1))
    if ((running >= parallel)); then
      wait -n
      running=$((running - 1))
    fi
  done
done
wait
elapsed=$((SECONDS - start))

names=()
results=()
failed=0
for tool in ${tools}; do
  for index in "${!sources[@]}"; do
    log=$(log_of "${tool}" "${index}")
    rc=$(cat "${log}.rc" 2>/dev/null || echo 99)
    errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+' "${log}" | awk '{s += $3} END {print s + 0}')
    hazards=$(grep -Eo 'RACECHECK SUMMARY: [0-9]+ hazard' "${log}" | awk '{s += $3} END {print s + 0}')
    result="ok"
    if grep -q "terminated before first instrumented API call" "${log}" &&
      grep -q 'Status: SUCCESS' "${log}"; then
      result="ok (host-only case: nothing to instrument)"
    elif ((rc == 124)); then
      result="FAIL (timed out)"
    elif ((rc != 0)); then
      result="FAIL (exit ${rc}, ${errors} errors)"
    elif ((errors > 0 || hazards > 0)); then
      result="FAIL (${errors} errors, ${hazards} hazards)"
    elif grep -q "kvc: no CUDA device: skipped" "${log}"; then
      result="FAIL (GPU tests skipped: no usable device)"
    elif ! grep -q 'Status: SUCCESS' "${log}"; then
      result="FAIL (no doctest success line)"
    else
      cases=$(sed -n 's/.*test cases: *\([0-9]*\) |.*/\1/p' "${log}" | tail -1)
      result="ok (${cases:-?} cases, ${errors} errors)"
    fi
    if [[ ${result} != ok* ]]; then
      failed=1
      tail -n 20 "${log}" | sed 's/^/    /'
    fi
    names+=("${tool}${sources[$index]:+ $(basename "${log}" .log): ${sources[$index]:0:60}}")
    results+=("${result}")
  done
done

echo
echo "=== gpu-sanitize summary (${binary}, logs in ${out}, ${elapsed} s) ==="
for i in "${!names[@]}"; do
  printf '  %-100s %s\n' "${names[$i]}" "${results[$i]}"
done
exit "${failed}"
