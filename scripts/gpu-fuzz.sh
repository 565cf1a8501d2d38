#!/usr/bin/env bash
# GPU differential fuzzing (issue 9): runs the fuzz case of the GPU test binary
# (tests/gpu/test_fuzz_gpu.cu: random operation sequences on random KVCache configurations,
# checked against the CPU reference after every operation) for many cases. A failure prints the
# case's seed; replay it with --seed. Not run in CI (no GPU there); the host-only differential
# fuzzer (reference vs a naive model) runs in CI.
#
# Usage: scripts/gpu-fuzz.sh [--build-dir DIR] [--cases N] [--ops N] [--seed S]
#   --build-dir DIR  build holding tests/kvc_gpu_tests (default: build-gpu)
#   --cases N        random cases (default: 2000)
#   --ops N          operations per case (default: 24)
#   --seed S         replay the one case with seed S (printed by a failure)
# Output: the doctest log on stdout; exit status non-zero on a failure or a skipped run.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
build_dir="build-gpu"
cases=2000
ops=24
seed=""
while (($# > 0)); do
  case "$1" in
    --build-dir) build_dir=${2:?--build-dir needs a directory}; shift ;;
    --cases) cases=${2:?--cases needs a number}; shift ;;
    --ops) ops=${2:?--ops needs a number}; shift ;;
    --seed) seed=${2:?--seed needs a number}; shift ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-fuzz: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
binary="${build_dir}/tests/kvc_gpu_tests"
[[ -x ${binary} ]] || { echo "gpu-fuzz: ${binary} not found (build first)" >&2; exit 2; }
export KVC_GPU_FUZZ_CASES="${cases}" KVC_GPU_FUZZ_OPS="${ops}"
if [[ -n ${seed} ]]; then export KVC_GPU_FUZZ_SEED="${seed}"; fi
log=$(mktemp)
"${binary}" -ts=gpu "-tc=gpu fuzz:*" --success=false 2>&1 | tee "${log}"
status=${PIPESTATUS[0]}
if grep -q "kvc: no CUDA device: skipped" "${log}"; then
  echo "gpu-fuzz: no CUDA device, nothing ran" >&2
  status=1
fi
rm -f "${log}"
exit "${status}"
