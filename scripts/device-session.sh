#!/usr/bin/env bash
# One device call that does everything the GPU machine is needed for, in an order that keeps the
# timings clean: GPU tests and the examples' GPU paths, then the microbenchmarks (with the SDPA
# baselines), then the end-to-end suite, then the Nsight Compute profile of the kernels
# (scripts/gpu-profile.sh), then the GPU differential fuzzer (scripts/gpu-fuzz.sh), and only
# then compute-sanitizer (its jobs are slow and
# share the GPU: run before or beside the benchmarks they would slow them down, as happened once
# on 2026-12-03). Each phase has its own time limit; logs, JSON and plots go to a scratch folder
# that is packed into $OUT/session.tgz (the device tool returns 8 files at most).
#
# Usage (on the GPU machine, repository root, .devbuild and .devdeps carried):
#   scripts/device-session.sh [--phases tests,bench,suite,timeline,profile,fuzz,sanitize]
#                             [--prebuilt DIR] [--limits T,B,S,Z] [--profile-limit P]
#                             [--fuzz-cases N] [--fuzz-limit F] [--tools LIST]
#   --phases   which phases, always run in the order above (default: all but profile, fuzz)
#   --prebuilt build packed by scripts/pack-prebuilt.sh (default: .devbuild)
#   --limits   seconds for tests, bench, suite, sanitize (default: 170,120,220,200); the
#              sanitize limit is the whole phase's
#   --sanitize-job S  seconds of each sanitizer job (one per tool and test case, 10 at a time;
#              default 150)
#   --profile-limit  seconds for the profile phase (default: 150)
#   --fuzz-cases N   cases of the fuzz phase (default: 2000); --fuzz-limit its seconds (300)
#   --tools    compute-sanitizer tools (default: "memcheck racecheck")
#   --bench-filter REGEX  --benchmark_filter of the bench phase (default: every benchmark)
#   --sanitize-filter PATTERN  doctest test-case filter of the sanitize phase (default: all)
# Prints the phases' summaries last.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
phases="tests,bench,suite,sanitize"
prebuilt=.devbuild
limits="170,120,220,200"
limit_profile=150
fuzz_cases=2000
limit_fuzz=300
tools="memcheck racecheck"
sanitize_job=150
bench_filter=()
sanitize_filter=()
while (($# > 0)); do
  case "$1" in
    --phases) phases=${2:?--phases needs a list}; shift ;;
    --prebuilt) prebuilt=${2:?--prebuilt needs a directory}; shift ;;
    --limits) limits=${2:?--limits needs four numbers}; shift ;;
    --profile-limit) limit_profile=${2:?--profile-limit needs seconds}; shift ;;
    --fuzz-cases) fuzz_cases=${2:?--fuzz-cases needs a number}; shift ;;
    --fuzz-limit) limit_fuzz=${2:?--fuzz-limit needs seconds}; shift ;;
    --tools) tools=${2:?--tools needs a list}; shift ;;
    --sanitize-job) sanitize_job=${2:?--sanitize-job needs seconds}; shift ;;
    --bench-filter) bench_filter=(--bench-filter "${2:?--bench-filter needs a regex}"); shift ;;
    --sanitize-filter) sanitize_filter=(--filter "${2:?--sanitize-filter needs a pattern}"); shift ;;
    -h | --help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "device-session: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
IFS=, read -r limit_tests limit_bench limit_suite limit_sanitize <<<"${limits}"
has_phase() { [[ ",${phases}," == *",$1,"* ]]; }

final_out=${OUT:-./out}
mkdir -p "${final_out}"
final_out=$(cd "${final_out}" && pwd)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/kvc-session.XXXXXX")
export OUT="${scratch}"
# Unpacked and linked once here; every phase then runs on that build directory.
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh
kvc_prepare_env
kvc_use_prebuilt "${prebuilt}" >/dev/null || exit 2  # sets build_dir

status=0
phase() {  # phase NAME LIMIT COMMAND...: output in $scratch/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "=== ${name} (limit ${limit} s)"
  timeout "${limit}" "$@" >"${scratch}/${name}.txt" 2>&1 || status=1
}
if has_phase tests; then
  phase tests "${limit_tests}" scripts/gpu-check.sh --skip-build --build-dir "${build_dir}" \
    --no-bench --jobs 16 --test-timeout "$((limit_tests - 10))"
fi
if has_phase bench; then
  phase bench "${limit_bench}" scripts/gpu-check.sh --skip-build --build-dir "${build_dir}" \
    --no-tests --bench-timeout "$((limit_bench - 20))" "${bench_filter[@]}"
fi
if has_phase suite; then
  export KVC_BASELINE_TIMEOUT=$((limit_suite / 2))
  phase suite "${limit_suite}" scripts/bench-suite.sh --skip-build --build-dir "${build_dir}" \
    --parts baseline,budget,fixed,plots
fi
if has_phase timeline; then
  # Per-call timeline of decode attention (benchmarks/experiments/decode_timeline.cu).
  phase timeline 120 "${build_dir}/benchmarks/kvc_decode_timeline"
fi
if has_phase profile; then
  # The shapes furthest from their targets (issues 5 and 6) and the dense references.
  phase profile "${limit_profile}" scripts/gpu-profile.sh --build-dir "${build_dir}" \
    --decode decode/full_32x32_B64_L4096 --decode decode/mixB_32x32_B64_L4096 \
    --decode decode/mixA_32x4_B64_L4096 --decode decode/mixA_32x32_B8_L4096 \
    --decode decode/full_32x4_B64_L4096 --prefill prefill/causal_32x32_B1_N4096
fi
if has_phase fuzz; then
  phase fuzz "${limit_fuzz}" scripts/gpu-fuzz.sh --build-dir "${build_dir}" \
    --cases "${fuzz_cases}"
fi
if has_phase sanitize; then
  export KVC_STORE_TEST_STEPS=20
  phase sanitize "${limit_sanitize}" scripts/gpu-sanitize.sh \
    --build-dir "${build_dir}" --tools "${tools}" --parallel 10 \
    --timeout "${sanitize_job}" "${sanitize_filter[@]}"
fi

tar -czf "${final_out}/session.tgz" -C "${scratch}" . || status=1
for name in tests bench suite timeline profile fuzz sanitize; do
  [[ -f ${scratch}/${name}.txt ]] || continue
  echo
  echo "=== ${name}: last lines"
  tail -n 25 "${scratch}/${name}.txt"
done
exit "${status}"
