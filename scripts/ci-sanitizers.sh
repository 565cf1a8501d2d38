#!/usr/bin/env bash
# Builds kvc's host targets with AddressSanitizer + UndefinedBehaviorSanitizer (-DKVC_SANITIZE,
# cmake/KvcSanitizers.cmake) in a separate build directory and runs the host and tools tests
# there: the host unit tests, the differential fuzzer (reference vs naive model, shorter budget),
# the parser seed corpus, and the kvc-replay round trips. No GPU target is built.
#
# usage: scripts/ci-sanitizers.sh [BUILD_DIR]   (default build-asan)
# environment: KVC_SANITIZE (default address,undefined), KVC_DIFFERENTIAL_SECONDS (default 10),
#   JOBS (default 2)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=${1:-build-asan}
sanitize=${KVC_SANITIZE:-address,undefined}
jobs=${JOBS:-2}

python_args=()
for python in python3 /usr/bin/python3; do
  if "${python}" -c 'import numpy' >/dev/null 2>&1; then
    python_args=("-DPython3_EXECUTABLE=$(command -v "${python}")")
    break
  fi
done
cmake -S . -B "${build}" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVC_CI_MINIMAL=ON \
  -DKVC_SANITIZE="${sanitize}" -DKVC_DIFFERENTIAL_SECONDS="${KVC_DIFFERENTIAL_SECONDS:-10}" \
  -DKVC_BUILD_EXAMPLES=OFF -DKVC_BUILD_BENCHMARKS=OFF -DKVC_INSTALL=OFF "${python_args[@]}"
cmake --build "${build}" -j "${jobs}" --target kvc_host_tests kvc-replay kvc-make-trace \
  kvc_fuzz_differential kvc_fuzz_corpus_npy kvc_fuzz_corpus_json kvc_fuzz_corpus_trace_config \
  kvc_fuzz_corpus_trace_dir
# halt_on_error: the first report fails the test; leaks are errors too.
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
ctest --test-dir "${build}" -L 'host|tools' --output-on-failure -j "${jobs}"
