#!/usr/bin/env bash
# The whole benchmark suite on a GPU machine, in one command: builds the benchmark binaries and
# kvc-e2e, then runs
#   1. kvc-e2e, memory-budget mode (prompt 2048 + generate 2048 on the whole GPU): Llama-2-7B with
#      full, DMC 2x/4x/8x, H2O 4x, TOVA 4x; the GQA shape (full = "GQA", dmc:4 = "DMC+GQA");
#      Llama-2-13B full and DMC 4x/8x; the 70B tensor-parallel shard full and DMC 4x/8x;
#   2. kvc-e2e, fixed-batch mode (Llama-2-7B, batch 1..256, every policy);
#   3. the PyTorch baseline (benchmarks/baselines/hf_llama_decode.py) and kvc's full cache at the
#      same batch and cache length (31 x 4096);
#   4. the Google Benchmark microbenchmarks (decode, update, prefill) with JSON output;
#   5. plots and tables (scripts/plot_results.py; where matplotlib is missing, run it again on the
#      returned folder).
# Every part logs to $OUT/<part>.log and writes JSON to $OUT; a failing part is reported in the
# summary table, and the script exits non-zero at the end.
#
# Usage: scripts/bench-suite.sh [--parts budget,fixed,baseline,micro,plots] [--quick]
#                               [--build-dir DIR] [--jobs N] [--skip-build] [--prebuilt DIR]
#   --parts   the parts to run, in this order (default: all, in the order above)
#   --quick   fewer policies and steps (a smoke run of every part)
#   --prebuilt DIR  run the binaries of a build packed by scripts/pack-prebuilt.sh (carried)
#                   instead of building here (as gpu-check.sh --prebuilt)
# Run time measured on an H200 (2026-12-03, a prebuilt build, every part but micro): baseline 98 s
# (torch.compile included), budget 49 s, fixed 21 s, plots 2 s; micro 30-45 s. Building on the
# device instead was not timed (--prebuilt avoids it). Use --parts to split across device calls.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
parts="budget,fixed,baseline,micro,plots"
quick=0
build_dir=build-bench
jobs=16
skip_build=0
prebuilt=""
while (($# > 0)); do
  case "$1" in
    --parts) parts=${2:?--parts needs a list}; shift ;;
    --quick) quick=1 ;;
    --build-dir) build_dir=${2:?--build-dir needs a directory}; shift ;;
    --jobs) jobs=${2:?--jobs needs a number}; shift ;;
    --skip-build) skip_build=1 ;;
    --prebuilt) prebuilt=${2:?--prebuilt needs a directory}; skip_build=1; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-suite: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh
kvc_prepare_env  # out (absolute $OUT), PATH, prefix_args / LD_LIBRARY_PATH for .devdeps
if [[ -n ${prebuilt} ]]; then
  kvc_use_prebuilt "${prebuilt}" || exit 2  # sets build_dir
fi

names=()
results=()
times=()
run_part() {  # run_part NAME COMMAND...: logs to $out/NAME.log
  local name=$1
  shift
  local start=${SECONDS}
  echo "=== ${name}: $*"
  if "$@" >"${out}/${name}.log" 2>&1; then
    results+=("ok")
  else
    results+=("FAILED (exit $?)")
  fi
  names+=("${name}")
  times+=($((SECONDS - start)))
  tail -n 25 "${out}/${name}.log"
}

if ((skip_build == 0)); then
  run_part configure cmake -S . -B "${build_dir}" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_EXAMPLES=OFF -DKVC_BUILD_TOOLS=OFF -DKVC_INSTALL=OFF \
    "${prefix_args[@]}"
  run_part build cmake --build "${build_dir}" -j "${jobs}"
fi
e2e="${build_dir}/benchmarks/kvc-e2e"
steps=16
if ((quick)); then steps=4; fi

part_budget() {
  if ((quick)); then
    run_part e2e_budget_7b "${e2e}" --model 7b --policies full,dmc:4 --steps "${steps}" \
      --json "${out}/e2e_budget_7b.json"
  else
    run_part e2e_budget_7b "${e2e}" --model 7b --policies full,dmc:2,dmc:4,dmc:8,h2o:4,tova:4 \
      --steps "${steps}" --json "${out}/e2e_budget_7b.json"
    run_part e2e_budget_7b_gqa "${e2e}" --model 7b-gqa --policies full,dmc:4 \
      --steps "${steps}" --json "${out}/e2e_budget_7b_gqa.json"
    run_part e2e_budget_13b "${e2e}" --model 13b --policies full,dmc:4,dmc:8 \
      --steps "${steps}" --json "${out}/e2e_budget_13b.json"
    run_part e2e_budget_70b "${e2e}" --model 70b-tp2 --policies full,dmc:4,dmc:8 \
      --steps "${steps}" --json "${out}/e2e_budget_70b.json"
  fi
}
part_fixed() {
  policies=full,dmc:4,h2o:4,tova:4
  batches=1,8,32,64,128,256
  if ((quick)); then policies=full,dmc:4; batches=1,32; fi
  run_part e2e_fixed_7b "${e2e}" --model 7b --mode fixed --policies "${policies}" \
    --batches "${batches}" --prompt 1024 --generate 0 --context 1000 --steps "${steps}" \
    --json "${out}/e2e_fixed_7b.json"
}
part_baseline() {
  # The same positions in both: a 4096-token cache, warm-up 5 and `steps` timed steps at its end.
  # (KVC_BASELINE_TIMEOUT bounds the PyTorch run: torch.compile can take minutes.)
  run_part hf_llama_decode timeout "${KVC_BASELINE_TIMEOUT:-600}" \
    python3 benchmarks/baselines/hf_llama_decode.py --batch 31 \
    --context 4096 --steps "${steps}" --warmup 5 --out "${out}/hf_llama_decode.json"
  run_part e2e_fixed_7b_b31 "${e2e}" --model 7b --mode fixed --policies full --batches 31 \
    --prompt 4096 --generate 0 --context $((4096 - 5 - steps)) --warmup 5 --steps "${steps}" \
    --json "${out}/e2e_fixed_7b_b31.json"
}
part_micro() {
  for binary in "${build_dir}"/benchmarks/kvc_bench_*; do
    [[ -x ${binary} ]] || continue
    name=$(basename "${binary}")
    run_part "${name}" "${binary}" --benchmark_format=json --benchmark_out="${out}/${name}.json" \
      --benchmark_out_format=json
  done
}
part_plots() {
  run_part plots python3 scripts/plot_results.py "${out}"
}
# The parts in the order given (put the one that matters most first when time is short).
IFS=, read -r -a part_list <<<"${parts}"
for part in "${part_list[@]}"; do
  case "${part}" in
    budget | fixed | baseline | micro | plots) "part_${part}" ;;
    *) echo "bench-suite: unknown part '${part}'" >&2; exit 2 ;;
  esac
done

echo
echo "=== bench-suite summary (logs and JSON in ${out}) ==="
status=0
for i in "${!names[@]}"; do
  printf '  %-24s %-18s %5d s\n' "${names[$i]}" "${results[$i]}" "${times[$i]}"
  [[ ${results[$i]} == ok ]] || status=1
done
if [[ -f ${out}/tables.md ]]; then
  echo
  cat "${out}/tables.md"
fi
exit "${status}"
