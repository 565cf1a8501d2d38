#!/usr/bin/env bash
# Full check on a machine with a GPU (the lent H100/H200: 16 cores, CMake 4, Ninja; doctest and
# Google Benchmark carried in .devdeps): configure Release with every kernel instantiation, build, run the
# GPU and host tests, optionally compute-sanitizer (memcheck, racecheck) on the GPU tests, run
# every built benchmark with JSON output, and print a summary.
#
# Usage: scripts/gpu-check.sh [--sanitize] [--filter PATTERN] [--bench-filter REGEX] [--no-bench]
#                             [--no-tests] [--build-dir DIR] [--jobs N] [--skip-build]
#   --sanitize            also run the GPU test binary under compute-sanitizer memcheck and
#                         racecheck
#   --filter PATTERN      doctest test-case filter (-tc, wildcards) for the sanitizer runs,
#                         e.g. '*policy maths*' (default: every GPU test case)
#   --bench-filter REGEX  --benchmark_filter for every benchmark binary (default: all)
#   --no-bench            skip the benchmarks
#   --build-dir DIR       build directory (default: build-gpu)
#   --jobs N              build and ctest parallelism (default: 16; GPU test cases share the GPU)
#   --bench-timeout S     time limit of each benchmark binary (default: 300)
#   --test-timeout S      time limit of each test case (default: 600)
#   --no-tests            skip the tests and the GPU runs of the examples
#   --skip-build          use the binaries already in the build directory
#   --prebuilt DIR        use a build made on the CPU machine and packed by
#                         scripts/pack-prebuilt.sh (carried): links the source and build paths
#                         its CTest files name to this checkout and DIR, then as --skip-build
# Output: every phase logs to $OUT/<phase>.log ($OUT defaults to ./out); benchmark results go to
# $OUT/<binary>.json. (The device tool returns at most 8 files: on the lent machine, point OUT at
# a scratch folder and tar it into the tool's $OUT.) Carry .devdeps (scripts/pack-device-deps.sh)
# where doctest / Google Benchmark are missing. A failing phase does not stop the script: it is
# reported in the final table and the script exits non-zero at the end.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
sanitize=0
filter=""
bench_filter=""
run_bench=1
build_dir=build-gpu
jobs=16
run_tests=1
bench_timeout=300
test_timeout=600
skip_build=0
prebuilt=""
while (($# > 0)); do
  case "$1" in
    --sanitize) sanitize=1 ;;
    --filter) filter=${2:?--filter needs a pattern}; shift ;;
    --bench-filter) bench_filter=${2:?--bench-filter needs a regex}; shift ;;
    --no-bench) run_bench=0 ;;
    --build-dir) build_dir=${2:?--build-dir needs a directory}; shift ;;
    --jobs) jobs=${2:?--jobs needs a number}; shift ;;
    --no-tests) run_tests=0 ;;
    --test-timeout) test_timeout=${2:?--test-timeout needs seconds}; shift ;;
    --bench-timeout) bench_timeout=${2:?--bench-timeout needs seconds}; shift ;;
    --skip-build) skip_build=1 ;;
    --prebuilt) prebuilt=${2:?--prebuilt needs a directory}; skip_build=1; shift ;;
    -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh
kvc_prepare_env  # out (absolute $OUT), PATH, prefix_args / LD_LIBRARY_PATH for .devdeps (carried)

names=()
results=()
times=()
failed=0

if [[ -n ${prebuilt} ]]; then
  kvc_use_prebuilt "${prebuilt}" || exit 2  # sets build_dir
fi

# run_phase NAME COMMAND...: runs COMMAND with its output in $OUT/NAME.log, records the result.
run_phase() {
  local name=$1
  shift
  local log="${out}/${name}.log"
  local start=${SECONDS}
  echo "--- ${name} (log: ${log})"
  "$@" >"${log}" 2>&1
  local rc=$?
  local result="ok"
  if ((rc != 0)); then
    result="FAIL (exit ${rc})"
    failed=1
    tail -n 20 "${log}" | sed 's/^/    /'
  fi
  names+=("${name}")
  results+=("${result}")
  times+=("$((SECONDS - start))")
}

skip_phase() {  # skip_phase NAME REASON
  names+=("$1")
  results+=("skipped: $2")
  times+=(0)
}

# Marks the last phase failed when its log says GPU tests were skipped: on this machine that
# means the device was not usable, which must not pass silently.
fail_if_gpu_skipped() {
  local last=$((${#names[@]} - 1))
  # (ctest prints "***Skipped" for a case that printed the message; doctest prints the message.)
  if grep -q -e "kvc: no CUDA device: skipped" -e '\*\*\*Skipped' "${out}/${names[$last]}.log"; then
    results[last]="FAIL (GPU tests skipped: no usable device)"
    failed=1
  fi
}

# The examples' GPU paths (each checks itself against the CPU reference where it says so).
run_gpu_examples() {
  local dir="${build_dir}/examples" rc=0
  "${dir}/kvc_policy_comparison" --device gpu || rc=1
  "${dir}/kvc_minimal_dmc" --device gpu --steps 48 || rc=1
  "${dir}/kvc_engine_loop" --device gpu --policy all --layers 4 --batch 16 --steps 64 || rc=1
  return "${rc}"
}

device_info() {
  nvidia-smi || true
  nvcc --version
  cmake --version
  ninja --version
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  git status --short 2>/dev/null || true
}

run_phase device device_info
if ((skip_build)); then
  if [[ -x ${build_dir}/tests/kvc_gpu_tests ]]; then
    run_phase build-skipped echo "using the binaries in ${build_dir}"
  else
    run_phase build-skipped false  # no binaries to use
  fi
else
  run_phase configure cmake -S . -B "${build_dir}" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DKVC_CI_MINIMAL=OFF "${prefix_args[@]}"
  if [[ ${results[-1]} == ok ]]; then
    run_phase build cmake --build "${build_dir}" -j "${jobs}"
  else
    skip_phase build "configure failed"
  fi
fi

gpu_tests="${build_dir}/tests/kvc_gpu_tests"
if ((!run_tests)); then
  skip_phase tests "--no-tests"
elif [[ ${results[-1]} == ok ]]; then
  # GPU test cases run in parallel: each holds little device memory, and their CPU reference
  # checks are what takes the time.
  run_phase test-gpu ctest --test-dir "${build_dir}" -L gpu --output-on-failure -j "${jobs}" \
    --timeout "${test_timeout}"
  fail_if_gpu_skipped
  # Host tests, examples (CPU paths) and tools (kvc-replay round trips: GPU backend when present).
  # (With --skip-build the install test is left out: it needs the object files.)
  host_args=(-LE gpu)
  ((skip_build)) && host_args+=(-E install)
  run_phase test-host ctest --test-dir "${build_dir}" "${host_args[@]}" --output-on-failure \
    -j "${jobs}"
  run_phase examples-gpu run_gpu_examples
else
  skip_phase test-gpu "build failed"
  skip_phase test-host "build failed"
fi

if ((sanitize)); then
  if [[ -x ${gpu_tests} ]] && command -v compute-sanitizer >/dev/null 2>&1; then
    doctest_args=(-ts=gpu)
    [[ -n ${filter} ]] && doctest_args+=("-tc=${filter}")
    run_phase memcheck compute-sanitizer --tool memcheck --leak-check full --error-exitcode 1 \
      "${gpu_tests}" "${doctest_args[@]}"
    fail_if_gpu_skipped
    run_phase racecheck compute-sanitizer --tool racecheck --error-exitcode 1 \
      "${gpu_tests}" "${doctest_args[@]}"
    fail_if_gpu_skipped
  else
    skip_phase memcheck "no ${gpu_tests} or no compute-sanitizer"
    skip_phase racecheck "no ${gpu_tests} or no compute-sanitizer"
    failed=1
  fi
fi

if ((run_bench)); then
  shopt -s nullglob
  rm -f "${out}"/kvc_bench_*.json  # results of an earlier run would mix into the summary
  benches=()
  for binary in "${build_dir}"/benchmarks/kvc_bench_*; do
    [[ -f ${binary} && -x ${binary} ]] && benches+=("${binary}")
  done
  if ((${#benches[@]} == 0)); then
    skip_phase bench "no benchmark binaries in ${build_dir}/benchmarks"
  fi
  for binary in "${benches[@]}"; do
    name=$(basename "${binary}")
    bench_args=(--benchmark_format=json "--benchmark_out=${out}/${name}.json")
    [[ -n ${bench_filter} ]] && bench_args+=("--benchmark_filter=${bench_filter}")
    run_phase "${name}" timeout "${bench_timeout}" "${binary}" "${bench_args[@]}"
    # A benchmark that reports an error (SkipWithError) still exits 0: count those as failures.
    errors=$(grep -c '"error_occurred": true' "${out}/${name}.json" 2>/dev/null || true)
    if [[ ${results[-1]} == ok && ${errors:-0} -gt 0 ]]; then
      results[-1]="FAIL (${errors} benchmark errors)"
      failed=1
    fi
  done
  # PyTorch SDPA baselines of the dense decode shapes and the prefill shapes, in the same run
  # (JSON as .json.txt so that summarize.py does not read them as Google Benchmark output).
  if python3 -c 'import torch' >/dev/null 2>&1; then
    run_phase sdpa_decode python3 benchmarks/baselines/sdpa_decode.py \
      --out "${out}/sdpa_decode.json.txt"
    run_phase sdpa_prefill python3 benchmarks/baselines/sdpa_prefill.py \
      --out "${out}/sdpa_prefill.json.txt"
  else
    skip_phase sdpa "no PyTorch"
  fi
fi

echo
echo "=== benchmarks ==="
shopt -s nullglob
jsons=("${out}"/*.json)
if ((${#jsons[@]} > 0)); then
  python3 benchmarks/summarize.py "${jsons[@]}" || { echo "summarize.py failed"; failed=1; }
else
  echo "no benchmark results"
fi
if [[ -s ${out}/kvc_bench_prefill.json || -s ${out}/kvc_bench_prefill_store.json ]]; then
  echo
  echo "=== prefill against PyTorch SDPA (issue 6 targets) ==="
  python3 benchmarks/compare_prefill.py "${out}" || { echo "compare_prefill.py failed"; failed=1; }
fi

echo
echo "=== gpu-check summary (logs in ${out}) ==="
for i in "${!names[@]}"; do
  printf '  %-32s %6s s  %s\n' "${names[$i]}" "${times[$i]}" "${results[$i]}"
done
if ((failed)); then
  echo "gpu-check: FAILED"
  exit 1
fi
echo "gpu-check: all phases passed"

