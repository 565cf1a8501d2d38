#!/usr/bin/env bash
# Builds kvc's parser fuzz targets (tests/fuzz/fuzz_*.cpp: the .npy reader, the JSON parser, the
# trace config reader and the whole trace-directory reader) with clang's libFuzzer, AddressSanitizer
# and UndefinedBehaviorSanitizer, and runs each for a bounded time from the committed seed corpus.
# Any crash, sanitizer report, leak or failed fuzz property fails the script; the crashing input
# is saved as BUILD/artifacts/TARGET/crash-* (replay it with `BUILD/TARGET FILE`).
#
# usage: scripts/fuzz-parsers.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  default 25 (CI); try 600 or more locally
#   TARGET              fuzz_npy fuzz_json fuzz_trace_config fuzz_trace_dir (default: all)
# environment: CXX (default clang++-14, else clang++), KVC_FUZZ_BUILD (default build-fuzz),
#   KVC_FUZZ_JOBS (parallel fuzzing processes per target, default 1)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds=${1:-25}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(fuzz_npy fuzz_json fuzz_trace_config fuzz_trace_dir)
fi
build=${KVC_FUZZ_BUILD:-build-fuzz}
jobs=${KVC_FUZZ_JOBS:-1}
cxx=${CXX:-}
if [[ -z ${cxx} ]]; then
  if command -v clang++-14 >/dev/null 2>&1; then cxx=clang++-14; else cxx=clang++; fi
fi
if ! command -v "${cxx}" >/dev/null 2>&1; then
  echo "fuzz-parsers: ${cxx} not found (Debian: apt-get install clang-14 libclang-rt-14-dev)" >&2
  exit 2
fi

declare -A corpus_of=([fuzz_npy]=npy [fuzz_json]=json [fuzz_trace_config]=trace_config
  [fuzz_trace_dir]=trace_dir)
flags=(-std=c++17 -g -O1 -fno-omit-frame-pointer "-fsanitize=fuzzer,address,undefined"
  -fno-sanitize-recover=all -Iinclude -Itests/fuzz)
mkdir -p "${build}"
build=$(cd "${build}" && pwd)  # libFuzzer runs inside it (parallel jobs write fuzz-N.log to cwd)
parallel=()
((jobs <= 1)) || parallel=(-jobs="${jobs}" -workers="${jobs}")
status=0
summary=()
for target in "${targets[@]}"; do
  source_file="tests/fuzz/${target}.cpp"
  if [[ ! -f ${source_file} || -z ${corpus_of[${target}]:-} ]]; then
    echo "fuzz-parsers: unknown target ${target}" >&2
    exit 2
  fi
  echo "=== ${target}: building with ${cxx} ==="
  "${cxx}" "${flags[@]}" "${source_file}" -o "${build}/${target}"
  # The working corpus starts from the committed seeds and grows in the build dir only.
  work="${build}/corpus/${target}"
  artifacts="${build}/artifacts/${target}/"
  mkdir -p "${work}" "${artifacts}"
  cp -n "tests/fuzz/corpus/${corpus_of[${target}]}/"* "${work}/" 2>/dev/null || true
  echo "=== ${target}: fuzzing for ${seconds} s ==="
  log="${build}/${target}.log"
  start=${SECONDS}
  # -rss_limit_mb bounds memory per input; -max_len lets .npy headers and traces grow.
  if (cd "${build}" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1 "${build}/${target}" -max_total_time="${seconds}" \
    -max_len=8192 -rss_limit_mb=2048 -timeout=10 "${parallel[@]}" -print_final_stats=1 \
    -artifact_prefix="${artifacts}" "${work}" >"${log}" 2>&1); then
    runs=$(grep -ho 'stat::number_of_executed_units: *[0-9]*' "${log}" "${build}"/fuzz-*.log \
      2>/dev/null | awk '{s += $2} END {print s + 0}' || true)
    summary+=("$(printf '%-18s ok      %6d s %10d runs  corpus %d' "${target}" \
      $((SECONDS - start)) "${runs}" "$(find "${work}" -type f | wc -l)")")
  else
    status=1
    tail -n 40 "${log}"
    summary+=("$(printf '%-18s FAILED  %6d s  (log %s, inputs in %s)' "${target}" \
      $((SECONDS - start)) "${log}" "${artifacts}")")
  fi
  rm -f "${build}"/fuzz-*.log
done
echo
echo "=== fuzz-parsers summary (${seconds} s per target) ==="
printf '  %s\n' "${summary[@]}"
exit "${status}"
